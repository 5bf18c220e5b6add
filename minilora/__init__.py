"""minilora: LoRA from nothing, in NumPy, with every backward written by hand."""

# Importing fast registers the fast ops (backend.FAST_OPS); importing variants registers
# DoRA, PiSSA, embedding LoRA and the patterns with lora.py's extension points. gradcheck is
# the module: its function is minilora.gradcheck.gradcheck(fn, inputs).
from minilora import fast, functional, gradcheck, variants
from minilora.autograd import Function, Tensor, is_grad_enabled, no_grad
from minilora.backend import get_ops, manual_seed, set_ops, use_ops
from minilora.gradcheck import GradcheckError
from minilora.lora import (
    LoRAConfig,
    LoraConfig,
    LoRALinear,
    apply_lora,
    disable_adapters,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_and_unload,
    merge_lora,
    print_trainable_parameters,
    unmerge_lora,
)
from minilora.model import GPT, GPTConfig, KVCache
from minilora.nn import Linear, Module, Parameter
from minilora.optim import SGD, AdamW, clip_grad_norm_
from minilora.variants.loraplus import create_loraplus_optimizer

__version__ = "0.1.0"

__all__ = [
    "GPT",
    "SGD",
    "AdamW",
    "Function",
    "GPTConfig",
    "GradcheckError",
    "KVCache",
    "Linear",
    "LoRAConfig",
    "LoraConfig",
    "LoRALinear",
    "Module",
    "Parameter",
    "Tensor",
    "apply_lora",
    "clip_grad_norm_",
    "create_loraplus_optimizer",
    "disable_adapters",
    "fast",
    "functional",
    "get_ops",
    "gradcheck",
    "is_grad_enabled",
    "lora_state_dict",
    "manual_seed",
    "mark_only_lora_as_trainable",
    "merge_and_unload",
    "merge_lora",
    "no_grad",
    "print_trainable_parameters",
    "set_ops",
    "unmerge_lora",
    "use_ops",
    "variants",
]
