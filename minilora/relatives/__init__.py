"""LoRA's relatives (docs/relatives.md): Houlsby and Lin adapter layers, and prefix tuning.
Each brings its own modules and leaves the book's model as the paper draws it.
"""
