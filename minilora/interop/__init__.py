"""Interoperability (docs/porting.md): safetensors model files, PEFT adapter folders and
configs, Hugging Face GPT-2 folders, and the reference vectors a port is checked against.
"""
