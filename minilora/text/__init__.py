"""Text (docs/text.md): GPT-2's byte-level BPE, written to be read, and text files or
prompt/response pairs as training data.
"""
