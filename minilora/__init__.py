"""minilora: LoRA from nothing, in NumPy, with every backward written by hand."""

from minilora import functional
from minilora.autograd import Function, Tensor, is_grad_enabled, no_grad
from minilora.functional import manual_seed
from minilora.gradcheck import GradcheckError, gradcheck

__version__ = "0.1.0"

__all__ = [
    "Function",
    "GradcheckError",
    "Tensor",
    "functional",
    "gradcheck",
    "is_grad_enabled",
    "manual_seed",
    "no_grad",
]
