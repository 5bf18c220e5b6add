"""Modules: containers of parameters, with PyTorch's names and semantics.

A :class:`Module` finds its parameters and sub-modules from its attributes, in the order
they were assigned, so ``self.q_proj = Linear(...)`` is all it takes to register a layer
under the path ``q_proj``. Replacing an attribute replaces the layer, which is how
``lora.apply_lora`` swaps a ``Linear`` for a ``LoRALinear``.

Initialisation follows GPT-2: linear and embedding weights ~ N(0, 0.02²), biases zero,
layer-norm weight one and bias zero (the model scales residual projections further).
Random draws come from the global seeded generator (``minilora.manual_seed``) unless a
``generator`` is passed.
"""

from __future__ import annotations

from collections.abc import Iterator

from minilora import backend
from minilora import functional as F
from minilora.autograd import Tensor


class Parameter(Tensor):
    """A leaf tensor that a module owns; ``requires_grad=True`` unless frozen."""

    def __init__(self, data, requires_grad: bool = True, device: str | None = None):
        super().__init__(data, requires_grad=requires_grad, device=device)

    def __repr__(self) -> str:
        return (
            f"Parameter(shape={self.shape}, dtype={self.dtype}, requires_grad={self.requires_grad})"
        )


class Module:
    """Base class: parameters and sub-modules are discovered from attributes."""

    training: bool = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    # ---- traversal ------------------------------------------------------------------

    def named_children(self) -> Iterator[tuple[str, Module]]:
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """Every module in the tree with its dotted path ("" for the root), parents first."""
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator[Module]:
        for _, m in self.named_modules():
            yield m

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """Every parameter with its dotted path, each shared parameter once."""
        seen = set()
        for path, module in self.named_modules(prefix):
            for name, value in vars(module).items():
                if isinstance(value, Parameter) and id(value) not in seen:
                    seen.add(id(value))
                    yield (f"{path}.{name}" if path else name), value

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def get_submodule(self, path: str) -> Module:
        module = self
        for part in path.split(".") if path else []:
            child = vars(module).get(part)
            if not isinstance(child, Module):
                raise KeyError(f"no sub-module {part!r} on the way to {path!r}")
            module = child
        return module

    def set_submodule(self, path: str, module: Module) -> None:
        """Put ``module`` at the dotted ``path``, replacing what was there (PyTorch's name):
        how LoRA, adapters, quantization and the SVD swap a layer for their own."""
        parent, _, name = path.rpartition(".")
        setattr(self.get_submodule(parent), name, module)

    # ---- state ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """A snapshot: parameter path -> a *copy* of its array (later training won't change it)."""
        return {name: p.data.copy() for name, p in self.named_parameters()}

    def state_dict_problems(self, state: dict, strict: bool = True) -> list[str]:
        """What stops ``state`` from loading: wrong shapes, and with ``strict`` missing and
        unexpected keys (the checks of :meth:`load_state_dict`, without loading)."""
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        problems = []
        for name in sorted(set(params) & set(state)):
            got = tuple(state[name].shape)
            if got != params[name].shape:
                problems.append(f"{name} has shape {got}, expected {params[name].shape}")
        if strict and missing:
            problems.append(f"missing keys: {missing}")
        if strict and unexpected:
            problems.append(f"unexpected keys: {unexpected}")
        return problems

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy arrays into parameters by path, after checking every key and shape.

        All problems are reported together (missing keys, unexpected keys, wrong shapes),
        and nothing is changed unless everything checks out. ``strict=False`` allows
        missing and unexpected keys but never a wrong shape.
        """
        params = dict(self.named_parameters())
        problems = self.state_dict_problems(state, strict)
        # Cast and move every array before assigning any, so that an array that cannot be
        # cast (strings, objects) leaves every parameter as it was.
        arrays = {}
        for name in sorted(set(params) & set(state)):
            p = params[name]
            data = state[name].data if isinstance(state[name], Tensor) else state[name]
            try:
                arrays[name] = backend.array(data, dtype=p.dtype, device=p.device).copy()
            except (TypeError, ValueError) as e:
                problems.append(f"{name} cannot be cast to {backend.dtype_name(p.dtype)}: {e}")
        if problems:
            raise ValueError("load_state_dict refused the state dict:\n  " + "\n  ".join(problems))
        for name, array in arrays.items():
            params[name].data = array

    # ---- modes and devices ----------------------------------------------------------

    def train(self, mode: bool = True) -> Module:
        for m in self.modules():
            m.training = mode
        return self

    def eval(self) -> Module:
        return self.train(False)

    def to(self, device: str) -> Module:
        """Move every parameter to ``device`` in place (optimizers keep valid references)."""
        device = backend.check_device(device)
        for p in self.parameters():
            p.data = backend.to_device(p.data, device)
            if p.grad is not None:
                p.grad = backend.to_device(p.grad, device)
        return self

    def zero_grad(self) -> None:
        """Forget accumulated gradients (``grad = None``, as PyTorch's default)."""
        for p in self.parameters():
            p.grad = None

    def requires_grad_(self, requires_grad: bool = True) -> Module:
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    # ---- printing -------------------------------------------------------------------

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        children = list(self.named_children())
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not children:
            return head + ")"
        lines = [head]
        for name, child in children:
            lines.append("  " + f"({name}): {child!r}".replace("\n", "\n  "))
        return "\n".join(lines) + "\n)"


class ModuleList(Module):
    """A list of modules registered under the paths "0", "1", ..."""

    def __init__(self, modules=()):
        for i, m in enumerate(modules):
            setattr(self, str(i), m)

    def __len__(self) -> int:
        return sum(1 for _ in self.named_children())

    def __iter__(self) -> Iterator[Module]:
        return (m for _, m in self.named_children())

    def __getitem__(self, i: int) -> Module:
        return getattr(self, str(range(len(self))[i]))


def _normal(shape, std: float, dtype, device, generator) -> Parameter:
    gen = generator or backend.default_generator()
    return Parameter(gen.normal(shape, std=std, dtype=dtype, device=device))


class Linear(Module):
    """``y = x @ weight.T + bias``; ``weight`` (out_features, in_features), ``bias`` (out,)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        init_std: float = 0.02,
        dtype=backend.DEFAULT_DTYPE,
        device: str = "cpu",
        generator=None,
    ):
        _check_positive_int("in_features", in_features)
        _check_positive_int("out_features", out_features)
        self.in_features, self.out_features = in_features, out_features
        self.weight = _normal((out_features, in_features), init_std, dtype, device, generator)
        self.bias = Parameter(backend.zeros((out_features,), dtype, device)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)  # (..., in) -> (..., out)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}"


class Embedding(Module):
    """A lookup table: ``weight`` (num_embeddings, embedding_dim), row i for id i."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        init_std: float = 0.02,
        dtype=backend.DEFAULT_DTYPE,
        device: str = "cpu",
        generator=None,
    ):
        _check_positive_int("num_embeddings", num_embeddings)
        _check_positive_int("embedding_dim", embedding_dim)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = _normal((num_embeddings, embedding_dim), init_std, dtype, device, generator)

    def forward(self, ids) -> Tensor:
        return F.embedding(ids, self.weight)  # (...) -> (..., embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LayerNorm(Module):
    """Normalise over the last axis, then scale by ``weight`` and shift by ``bias``."""

    def __init__(
        self,
        normalized_shape: int,
        eps: float = 1e-5,
        bias: bool = True,
        *,
        dtype=backend.DEFAULT_DTYPE,
        device: str = "cpu",
    ):
        _check_positive_int("normalized_shape", normalized_shape)
        self.normalized_shape, self.eps = normalized_shape, eps
        self.weight = Parameter(backend.ones((normalized_shape,), dtype, device))
        self.bias = Parameter(backend.zeros((normalized_shape,), dtype, device)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


class Dropout(Module):
    """Zero activations with probability ``p`` in training; the identity in eval mode."""

    def __init__(self, p: float = 0.0, generator=None):
        if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p={p!r} must be a number in [0, 1)")
        self.p, self.generator = p, generator

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training, self.generator)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
