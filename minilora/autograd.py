"""A reverse-mode autograd engine whose every backward formula is written by hand.

Two classes carry it:

* :class:`Tensor` holds an array (``data``), its gradient (``grad``), whether it needs one
  (``requires_grad``) and, when an op produced it, the :class:`Function` node that did.
* :class:`Function` is one node of the graph. Its ``forward`` and ``backward`` work on raw
  arrays (NumPy or CuPy). Before ``forward`` runs, the node is told which inputs need a
  gradient (``needs_input_grad``), and ``backward`` computes only those: this is where
  LoRA's savings come from, since a frozen weight never gets a weight-gradient matmul.

``loss.backward()`` sorts the graph iteratively (a graph thousands of nodes deep works;
Python's recursion limit never comes into it), walks it once in reverse topological order,
and sums the gradients of a tensor that feeds several ops (LoRA's ``x`` feeds both ``W``
and ``B·A``). Derivations of each op's backward are in ``docs/math.md``.

Semantics, following PyTorch:

* Only leaf tensors (created by the user, ``requires_grad=True``) keep ``.grad``.
  Gradients *accumulate*: a second ``backward`` through a new graph adds to ``.grad``;
  call ``zero_grad`` (on a module or optimizer) or set ``t.grad = None`` between steps.
* ``backward`` frees the arrays each node saved, so a second ``backward`` through the
  *same* graph raises ``RuntimeError``; pass ``retain_graph=True`` to keep them.
* Inside ``with no_grad():`` ops build no graph at all.
"""

from __future__ import annotations

import contextlib

from minilora import backend

_grad_enabled = True


@contextlib.contextmanager
def no_grad():
    """Run ops without recording a graph (evaluation, optimizer updates, merging)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled() -> bool:
    return _grad_enabled


class Tensor:
    """An array plus what autograd needs to know about it.

    ``Tensor(data, requires_grad=False, dtype=None, device="cpu")``: ``data`` may be an
    array, a Python number or nested list, or another ``Tensor`` (its data is shared).
    Floating data defaults to float32; integer data (token ids) stays integer.
    """

    __array_priority__ = 1000  # make ``ndarray + Tensor`` call Tensor.__radd__

    def __init__(self, data, requires_grad: bool = False, dtype=None, device: str | None = None):
        if isinstance(data, Tensor):
            data = data.data
        if device is None:
            device = backend.device_of(data)
        if dtype is None and not hasattr(data, "dtype"):
            # Python data: floats become float32, ints stay int64
            probe = backend.array(data)
            dtype = backend.DEFAULT_DTYPE if backend.is_floating(probe) else probe.dtype
        self.data = backend.array(data, dtype=dtype, device=device)
        self.grad = None
        self._ctx: Function | None = None  # the node that produced this tensor, if any
        self.requires_grad = False
        if requires_grad:
            self.requires_grad_(True)

    @classmethod
    def _from_op(cls, data, ctx: Function | None) -> Tensor:
        """Wrap an op's output array without copying or re-validating it."""
        t = cls.__new__(cls)
        t.data, t.grad, t._ctx = data, None, ctx
        t.requires_grad = ctx is not None
        return t

    # ---- metadata -------------------------------------------------------------------

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def device(self) -> str:
        return backend.device_of(self.data)

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return int(self.data.size)

    @property
    def is_leaf(self) -> bool:
        return self._ctx is None

    @property
    def grad_fn(self) -> Function | None:
        """The graph node (a :class:`Function`) that produced this tensor; None for a leaf.

        Its ``inputs`` are the tensors it was applied to (a :class:`GraphInput`, without
        the array, for those another node produced), so the graph can be walked by hand.
        """
        return self._ctx

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        dev = f", device='{self.device}'" if self.device != "cpu" else ""
        return f"Tensor({backend.to_numpy(self.data)!r}{grad}{dev})"

    # ---- autograd -------------------------------------------------------------------

    def requires_grad_(self, requires_grad: bool = True) -> Tensor:
        """Mark a leaf tensor as trainable (``True``) or frozen (``False``), in place."""
        if requires_grad and not backend.is_floating(self.data):
            raise TypeError(
                f"requires_grad=True needs floating-point data, but this tensor has dtype "
                f"{self.dtype}; only float tensors can have gradients"
            )
        if not requires_grad and self._ctx is not None:
            raise RuntimeError(
                "requires_grad_(False) is only allowed on leaf tensors; use detach()"
            )
        self.requires_grad = bool(requires_grad)
        return self

    def detach(self) -> Tensor:
        """A new leaf tensor sharing this data, cut off from the graph."""
        return Tensor._from_op(self.data, None)

    def numpy(self):
        """This tensor's data as a NumPy array (copied to the host if on a GPU)."""
        return backend.to_numpy(self.data)

    def item(self) -> float:
        if self.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}")
        return self.numpy().reshape(()).item()

    def to(self, device: str) -> Tensor:
        """This leaf tensor on ``device`` (itself if already there), keeping ``requires_grad``.

        Only leaves move (parameters, inputs): moving an op's output would cut it from the
        graph that produced it, so that is refused; move the inputs instead.
        """
        if backend.check_device(device) == self.device:
            return self
        if self._ctx is not None:
            raise RuntimeError(
                f"to({device!r}) is only allowed on leaf tensors; this tensor was produced by "
                f"{type(self._ctx).__name__} and moving it would cut the graph (move the "
                "inputs, or the module, instead)"
            )
        out = Tensor(backend.to_device(self.data, device))
        out.requires_grad = self.requires_grad
        return out

    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into the ``.grad`` of every leaf that requires it.

        ``grad`` is the upstream gradient (same shape as ``self``); it may be omitted only
        for a tensor with one element (a loss), where it defaults to 1.
        """
        if not self.requires_grad:
            raise RuntimeError(
                "backward() called on a tensor that does not require grad: no input of the "
                "ops that produced it has requires_grad=True (did you freeze everything, or "
                "compute it under no_grad()?)"
            )
        xp = backend.get_array_module(self.data)
        if grad is None:
            if self.size != 1:
                raise ValueError(
                    f"backward() without a gradient needs a tensor with one element, got shape "
                    f"{self.shape}; pass grad= with that shape"
                )
            grad = xp.ones(self.data.shape, dtype=self.dtype)
        else:
            grad = grad.data if isinstance(grad, Tensor) else grad
            if tuple(grad.shape) != self.shape:
                raise ValueError(
                    f"grad has shape {tuple(grad.shape)}, expected {self.shape} (the shape of "
                    f"the tensor backward() is called on)"
                )

        grads = {id(self): grad}  # gradient accumulated so far, per tensor
        for t in reversed(_topological_order(self)):
            g = grads.pop(id(t), None)
            if g is None:
                continue
            fn = t._ctx
            if fn is None:  # a leaf: accumulate into .grad (copied: g may be shared)
                g = g.astype(t.dtype, copy=True)
                t.grad = g if t.grad is None else t.grad + g
                continue
            if fn.released:
                raise RuntimeError(
                    f"backward() through a {type(fn).__name__} node whose saved arrays were "
                    "already freed by an earlier backward(); pass retain_graph=True to the "
                    "first call to backward through the same graph twice"
                )
            input_grads = fn.backward(g)
            if not isinstance(input_grads, tuple):
                input_grads = (input_grads,)
            for inp, need, ig in zip(fn.inputs, fn.needs_input_grad, input_grads, strict=True):
                if not need:
                    continue
                if ig is None or tuple(ig.shape) != inp.shape:
                    got = None if ig is None else tuple(ig.shape)
                    raise RuntimeError(
                        f"{type(fn).__name__}.backward returned a gradient of shape {got} for "
                        f"an input of shape {inp.shape}"
                    )
                prev = grads.get(id(inp))
                grads[id(inp)] = ig if prev is None else prev + ig
            if not retain_graph:
                fn.release()

    # The operators (``a + b``, ``a @ b``, ``a[i]``) and array methods (``reshape``,
    # ``sum``, ``T`` ...) are the ops of functional.py, attached to this class there.


def _topological_order(root: Tensor) -> list[Tensor]:
    """Tensors that lead to ``root`` (needing grad), every input before its consumers.

    An iterative depth-first search: each tensor is pushed once to be expanded and once
    more to be emitted after everything it depends on has been emitted.
    """
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        t, expanded = stack.pop()
        if expanded:
            order.append(t)
            continue
        if id(t) in visited:
            continue
        visited.add(id(t))
        stack.append((t, True))
        if t._ctx is not None:
            for inp in t._ctx.inputs:
                if inp is not None and inp.requires_grad and id(inp) not in visited:
                    stack.append((inp, False))
    return order


class Function:
    """One differentiable op: ``forward`` and ``backward`` on raw arrays.

    Subclasses implement

    * ``forward(self, *arrays) -> array``: compute the output, and save (as attributes)
      what the backward needs. ``self.needs_input_grad[i]`` already says whether input ``i``
      will need a gradient, so nothing is saved or computed for frozen inputs.
    * ``backward(self, grad_output) -> tuple``: one gradient array per input, ``None``
      where ``needs_input_grad`` is False. Gradients have exactly the input's shape.

    Non-tensor settings (an axis, a probability) go to the constructor. Use an op as
    ``Sum(axis=0)(x)`` or the shortcut ``Sum.apply(x, axis=0)``.
    """

    inputs: tuple
    needs_input_grad: tuple
    released = False

    @classmethod
    def apply(cls, *inputs, **settings) -> Tensor:
        return cls(**settings)(*inputs)

    def __call__(self, *inputs) -> Tensor:
        tensors = tuple(x if x is None or isinstance(x, Tensor) else Tensor(x) for x in inputs)
        arrays = [None if t is None else t.data for t in tensors]
        _check_devices_and_dtypes(type(self).__name__, arrays)
        if not _grad_enabled:  # inference: no gradient, no graph, nothing more to decide
            self.needs_input_grad = (False,) * len(arrays)
            return Tensor._from_op(self.forward(*arrays), None)
        self.needs_input_grad = tuple(t is not None and t.requires_grad for t in tensors)
        out = self.forward(*arrays)
        if any(self.needs_input_grad):
            # The node keeps its inputs to route gradients back. An input another node made
            # is kept as a GraphInput (its node and shape, not its array): an activation
            # that no backward saved, and that the caller no longer holds, is then freed
            # during the forward instead of living until the backward. Leaves are kept as
            # they are (their .grad is set at the end).
            self.inputs = tuple(
                t if t is None or t._ctx is None else GraphInput.of(t) for t in tensors
            )
            return Tensor._from_op(out, self)
        return Tensor._from_op(out, None)  # nothing to differentiate: no graph node

    def forward(self, *arrays):
        raise NotImplementedError

    def backward(self, grad_output):
        raise NotImplementedError

    def release(self) -> None:
        """Drop saved arrays once the backward has run (frees activation memory)."""
        inputs = self.inputs
        self.__dict__.clear()
        self.inputs, self.needs_input_grad, self.released = inputs, (), True


class GraphInput:
    """What a graph node keeps of an input that another node produced.

    The producing node (``_ctx``), the shape and dtype: all that ``backward`` needs to
    route a gradient, without the array. One per tensor (cached on it), so that a tensor
    used by several ops is one input everywhere and its gradients add up.
    """

    __slots__ = ("_ctx", "shape", "dtype")
    requires_grad = True
    is_leaf = False
    grad = None

    @classmethod
    def of(cls, t: Tensor) -> GraphInput:
        handle = t.__dict__.get("_graph_input")
        if handle is None:
            handle = t._graph_input = cls.__new__(cls)
            handle._ctx, handle.shape, handle.dtype = t._ctx, t.shape, t.dtype
        return handle

    @property
    def grad_fn(self) -> Function:
        return self._ctx

    def __repr__(self) -> str:
        return f"GraphInput(shape={self.shape}, grad_fn={type(self._ctx).__name__})"


def _check_devices_and_dtypes(op: str, arrays: list) -> None:
    """Refuse to mix devices (never copy silently) or floating dtypes in one op.

    This runs for every op, so it starts with cheap tests: arrays of one type live on one
    device, and dtype.kind "f" marks floating dtypes.
    """
    arrays = [a for a in arrays if a is not None]
    if len(arrays) < 2:
        return  # one array: nothing to mix
    first_type, first_dtype = type(arrays[0]), arrays[0].dtype
    if all(type(a) is first_type and a.dtype == first_dtype for a in arrays):
        return  # the usual case: one device, one dtype
    if len({type(a) for a in arrays}) > 1:
        devices = {backend.device_of(a) for a in arrays}
        if len(devices) > 1:
            raise ValueError(
                f"{op}: inputs are on different devices {sorted(devices)}; move them to one "
                "device with .to(device) first"
            )
    float_dtypes = {a.dtype for a in arrays if a.dtype.kind == "f"}
    if len(float_dtypes) > 1:
        names = sorted(str(d) for d in float_dtypes)
        raise TypeError(
            f"{op}: inputs have different floating dtypes {names}; cast them to "
            "one dtype first (minilora never promotes silently)"
        )
