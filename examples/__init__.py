"""Worked examples that the tests import: ``from examples.torch_gpt import TorchGPT``."""
