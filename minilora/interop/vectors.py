"""Reference vectors: what a port of minilora must reproduce, tensor by tensor.

``write_vectors(folder)`` (``minilora vectors --out DIR``) writes one safetensors file per
case and a ``manifest.json``. A case is one op of ``functional.py``, a ``LoRALinear`` layer,
or a tiny GPT with LoRA; its file holds

* the inputs (and weights) under their argument names: ``x``, ``weight``, ``lora_A``, ...,
  or module paths for the GPT (``blocks.0.attn.q_proj.lora_A``);
* ``grad_output``: the upstream gradient dL/d(output), random (a ones gradient would let a
  wrong softmax or layer-norm backward pass);
* the outputs (``output``, or ``logits`` and ``loss`` for the GPT);
* ``grad.<input>``: dL/d(input) for every input that needs a gradient. Frozen inputs
  (the base weight of a LoRA layer) have none, and a port must compute none.

The manifest lists, per case, the function, its settings, the call order of its inputs,
and for every tensor its role, shape, dtype and tolerance; plus the format version, the
seed and the dtype of the whole set. The same seed and dtype give byte-identical files.

``check_vectors(folder)`` (``minilora vectors --check DIR``) validates a set written by
another implementation, which copies the inputs from minilora's set and writes its own
outputs and gradients: inputs must be minilora's exactly, outputs and gradients must agree
within the tolerance of the dtype, and every tensor gets a line saying whether it does.
docs/porting.md walks through it.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import safetensors.numpy

from minilora import __version__, backend
from minilora import functional as F
from minilora.autograd import Tensor
from minilora.interop.files import JSON_LIMIT, read_file
from minilora.interop.safetensors_files import (
    atomic_write,
    check_data_sha256,
    finish_interrupted_write,
    serialize,
)
from minilora.lora import LoRAConfig, LoRALinear, apply_lora, lora_scaling
from minilora.model import GPT, GPTConfig

FORMAT = "minilora.vectors"
FORMAT_VERSION = "1"
MANIFEST_NAME = "manifest.json"

# |got - want| <= atol + rtol·|want|, elementwise, for outputs and gradients.
# float64: two correct implementations differ only in rounding and summation order;
# PyTorch vs minilora on this set differ by at most 1.1e-13 relative (the GPT's logits).
# rtol 1e-9 leaves ten-thousandfold room for a port that sums in another order and still
# fails on any mistake in the math (a wrong layer-norm eps, 1e-6 for 1e-5, moves outputs
# by ~5e-6 relative). float32: rounding at eps = 1.2e-7 is amplified by long sums,
# softmax and layer norm; PyTorch vs minilora use at most 18% of atol 1e-6 + rtol 1e-4
# (the GPT's logits again, max error 1.6e-6 on values of a few units): a fivefold margin.
# A float32 set checks the port's float32 code; the float64 set checks its math.
TOLERANCES = {
    "float64": {"rtol": 1e-9, "atol": 1e-12},
    "float32": {"rtol": 1e-4, "atol": 1e-6},
}


# ======================================================================================
# The cases
# ======================================================================================


@dataclass
class Case:
    """One reference computation.

    ``make(gen, dtype)`` draws the inputs (a dict in call order); ``run(arrays)`` builds
    the computation from them and returns ``(leaves, outputs)``: the tensors whose
    gradients are recorded, by input name, and the outputs by name. The backward starts
    from ``outputs[backward_from]`` with a random ``grad_output``.
    """

    name: str
    function: str  # what it exercises, for readers of the manifest
    make: Callable
    run: Callable
    grads: tuple[str, ...]  # inputs that get a gradient; every other float input is frozen
    attrs: dict = field(default_factory=dict)
    outputs: tuple[str, ...] = ("output",)
    backward_from: str = "output"


def _uniform(gen, shape, dtype, low=-2.0, high=2.0):
    return gen.uniform(shape, low, high, dtype=dtype)


def _nonzero(gen, shape, dtype):
    """Magnitudes in [0.5, 2) with random signs: safe to divide by."""
    sign = gen.integers(0, 2, shape) * 2 - 1
    return (gen.uniform(shape, 0.5, 2.0, dtype=backend.float64) * sign).astype(dtype)


def _distinct(gen, shape, dtype, low=-2.0, high=2.0):
    """Values at least (high - low)/size apart: no ties for max."""
    size = math.prod(shape)
    spacing = (high - low) / size
    values = gen.permutation(size) + 0.5 * gen.random((size,), dtype=backend.float64)
    return (low + spacing * values).reshape(shape).astype(dtype)


def _op(name, fn, draws, grads=None, attrs=None, **kw) -> Case:
    """A case for one functional op: ``draws`` maps input names to draw functions."""

    def make(gen, dtype):
        return {k: draw(gen, dtype) for k, draw in draws.items()}

    def run(arrays):
        leaves = {k: Tensor(a, requires_grad=k in grads_) for k, a in arrays.items()}
        return leaves, {"output": fn(*leaves.values())}

    grads_ = tuple(grads) if grads is not None else tuple(draws)
    return Case(name, f"minilora.functional.{name}", make, run, grads_, attrs or {}, **kw)


def _u(shape, low=-2.0, high=2.0):
    return lambda gen, dtype: _uniform(gen, shape, dtype, low, high)


def _dropout_case() -> Case:
    p = 0.25

    class _Given:  # a generator that hands dropout the stored uniform numbers
        def __init__(self, u):
            self.u = u

        def random(self, shape, dtype, device):
            return self.u

    def make(gen, dtype):
        return {"x": _uniform(gen, (3, 4), dtype), "uniform": gen.random((3, 4), dtype=dtype)}

    def run(arrays):
        x = Tensor(arrays["x"], requires_grad=True)
        return {"x": x}, {"output": F.dropout(x, p, True, _Given(arrays["uniform"]))}

    return Case("dropout", "minilora.functional.dropout", make, run, ("x",), {"p": p})


def _cross_entropy_case() -> Case:
    def make(gen, dtype):
        targets = gen.integers(0, 5, (2, 3))
        targets[0, 1] = -100  # ignored: no loss, no gradient, not counted in the mean
        return {"logits": _uniform(gen, (2, 3, 5), dtype, -3, 3), "targets": targets}

    def run(arrays):
        logits = Tensor(arrays["logits"], requires_grad=True)
        loss = F.softmax_cross_entropy(logits, arrays["targets"], ignore_index=-100)
        return {"logits": logits}, {"output": loss}

    return Case(
        "softmax_cross_entropy",
        "minilora.functional.softmax_cross_entropy",
        make,
        run,
        ("logits",),
        {"ignore_index": -100},
    )


def _embedding_case() -> Case:
    def make(gen, dtype):
        ids = backend.array([[1, 4, 1, 0], [6, 1, 4, 2]], dtype=backend.int64)  # repeats add up
        return {"ids": ids, "weight": _uniform(gen, (7, 3), dtype)}

    def run(arrays):
        weight = Tensor(arrays["weight"], requires_grad=True)
        return {"weight": weight}, {"output": F.embedding(arrays["ids"], weight)}

    return Case("embedding", "minilora.functional.embedding", make, run, ("weight",))


def _getitem_case() -> Case:
    def make(gen, dtype):
        index = backend.array([0, 2, 2, 4], dtype=backend.int64)  # row 2 twice: grads add
        return {"a": _uniform(gen, (5, 3), dtype), "index": index}

    def run(arrays):
        a = Tensor(arrays["a"], requires_grad=True)
        return {"a": a}, {"output": F.getitem(a, arrays["index"])}

    return Case("getitem", "minilora.functional.getitem", make, run, ("a",))


LORA_LAYER = {"in_features": 6, "out_features": 5, "r": 2, "lora_alpha": 3.0}


def _lora_layer_case(name: str, use_rslora: bool) -> Case:
    """A LoRALinear with a frozen weight and bias and a non-zero B (so dA is not zero)."""
    s = LORA_LAYER
    attrs = {
        **s,
        "use_rslora": use_rslora,
        "scaling": lora_scaling(s["lora_alpha"], s["r"], use_rslora),
    }

    def make(gen, dtype):
        n_in, n_out, r = s["in_features"], s["out_features"], s["r"]
        return {
            "x": _uniform(gen, (2, 3, n_in), dtype),
            "weight": _uniform(gen, (n_out, n_in), dtype, -1, 1),
            "bias": _uniform(gen, (n_out,), dtype, -1, 1),
            "lora_A": _uniform(gen, (r, n_in), dtype, -1, 1),
            "lora_B": _uniform(gen, (n_out, r), dtype, -1, 1),
        }

    def run(arrays):
        dtype = arrays["x"].dtype
        layer = LoRALinear(
            s["in_features"],
            s["out_features"],
            r=s["r"],
            lora_alpha=s["lora_alpha"],
            use_rslora=use_rslora,
            dtype=dtype,
            generator=backend.Generator(0),
        )
        for k in ("weight", "bias", "lora_A", "lora_B"):
            getattr(layer, k).data = arrays[k].copy()
        layer.weight.requires_grad_(False)
        layer.bias.requires_grad_(False)
        x = Tensor(arrays["x"], requires_grad=True)
        y = layer(x)
        merged = Tensor(layer.merged_weight())  # W + s·B·A, what merge() writes
        leaves = {
            "x": x,
            "weight": layer.weight,
            "bias": layer.bias,
            "lora_A": layer.lora_A,
            "lora_B": layer.lora_B,
        }
        return leaves, {"output": y, "merged_weight": merged}

    return Case(
        name,
        "minilora.LoRALinear",
        make,
        run,
        ("x", "lora_A", "lora_B"),
        attrs,
        outputs=("output", "merged_weight"),
    )


GPT_CONFIG = {
    "vocab_size": 11,
    "block_size": 6,
    "n_layer": 2,
    "n_head": 2,
    "n_embd": 8,
    "dropout": 0.0,
    "bias": True,
}
GPT_LORA = {
    "r": 2,
    "lora_alpha": 4.0,
    "target_modules": ["q_proj", "v_proj"],
    "use_rslora": False,
    "bias": "none",
    "lora_dropout": 0.0,
}


def _gpt_model(dtype) -> GPT:
    """The case's GPT with LoRA; its initial values are overwritten by the drawn ones."""
    # building a GPT draws from the global generator: use a throwaway one and put the
    # caller's back afterwards
    saved = backend.set_default_generator(backend.Generator(0))
    try:
        model = GPT(GPTConfig(**GPT_CONFIG), dtype=dtype)
    finally:
        backend.set_default_generator(saved)
    apply_lora(model, LoRAConfig(**GPT_LORA), generator=backend.Generator(0))
    return model


def _gpt_case() -> Case:
    """A two-block GPT with LoRA on q_proj and v_proj: logits, loss, adapter gradients.

    Weights are drawn with std 0.3 (not GPT-2's 0.02) and lora_B is non-zero, so that
    every path changes the logits measurably; layer-norm weights are 1 ± 0.1.
    """

    def make(gen, dtype):
        V, T = GPT_CONFIG["vocab_size"], GPT_CONFIG["block_size"]
        idx = gen.integers(0, V, (2, T))
        targets = gen.integers(0, V, (2, T))
        targets[1, 0] = -100
        arrays = {"idx": idx, "targets": targets}
        for path, p in _gpt_model(dtype).named_parameters():
            if path.rsplit(".", 1)[0].endswith(("ln1", "ln2", "ln_f")) and path.endswith("weight"):
                arrays[path] = 1.0 + _uniform(gen, p.shape, dtype, -0.1, 0.1)
            else:
                arrays[path] = (gen.normal(p.shape, std=0.3, dtype=backend.float64)).astype(dtype)
        return arrays

    def run(arrays):
        dtype = arrays["tok_emb.weight"].dtype
        model = _gpt_model(dtype)
        params = dict(model.named_parameters())
        model.load_state_dict({k: a for k, a in arrays.items() if k in params})
        logits, loss = model(arrays["idx"], arrays["targets"])
        return params, {"logits": logits, "loss": loss}

    model_paths = [p for p, _ in _gpt_model(backend.float32).named_parameters()]
    grads = tuple(p for p in model_paths if p.rsplit(".", 1)[1] in ("lora_A", "lora_B"))
    attrs = {
        "config": GPT_CONFIG,
        "lora": GPT_LORA,
        "scaling": lora_scaling(GPT_LORA["lora_alpha"], GPT_LORA["r"], GPT_LORA["use_rslora"]),
    }
    return Case(
        "gpt_lora",
        "minilora.GPT + minilora.apply_lora",
        make,
        run,
        grads,
        attrs,
        outputs=("logits", "loss"),
        backward_from="loss",
    )


def _cases() -> list[Case]:
    shape, bshape = (2, 3, 4), (3, 1)  # b broadcasts over a: its gradient is summed back
    pos = _u(shape, 0.5, 2.0)
    return [
        _op("add", F.add, {"a": _u(shape), "b": _u(bshape)}),
        _op("sub", F.sub, {"a": _u(shape), "b": _u(bshape)}),
        _op("mul", F.mul, {"a": _u(shape), "b": _u(bshape)}),
        _op("div", F.div, {"a": _u(shape), "b": lambda g, d: _nonzero(g, bshape, d)}),
        _op("neg", F.neg, {"a": _u(shape)}),
        _op("pow", lambda a: F.pow(a, 2.5), {"a": pos}, attrs={"exponent": 2.5}),
        _op("exp", F.exp, {"a": _u(shape)}),
        _op("log", F.log, {"a": pos}),
        _op("tanh", F.tanh, {"a": _u(shape)}),
        _op(
            "sum",
            lambda a: F.sum(a, axis=1),
            {"a": _u(shape)},
            attrs={"axis": [1], "keepdims": False},
        ),
        _op(
            "mean",
            lambda a: F.mean(a, axis=(0, 2), keepdims=True),
            {"a": _u(shape)},
            attrs={"axis": [0, 2], "keepdims": True},
        ),
        _op(
            "max",
            lambda a: F.max(a, axis=-1),
            {"a": lambda g, d: _distinct(g, shape, d)},
            attrs={"axis": [-1], "keepdims": False},
        ),
        _op("reshape", lambda a: F.reshape(a, 4, 6), {"a": _u(shape)}, attrs={"shape": [4, 6]}),
        _op(
            "permute", lambda a: F.permute(a, 2, 0, 1), {"a": _u(shape)}, attrs={"dims": [2, 0, 1]}
        ),
        _getitem_case(),
        _op("matmul", F.matmul, {"a": _u((2, 3, 4)), "b": _u((4, 5))}),
        _op("linear", F.linear, {"x": _u((2, 3, 4)), "weight": _u((5, 4)), "bias": _u((5,))}),
        _op(
            "lora_linear",
            lambda *t: F.lora_linear(*t, scaling=1.5),
            {
                "x": _u((2, 3, 4)),
                "weight": _u((5, 4)),
                "bias": _u((5,)),
                "lora_A": _u((2, 4)),
                "lora_B": _u((5, 2)),
            },
            attrs={"scaling": 1.5},
        ),
        _op("gelu", F.gelu, {"x": _u(shape, -3.0, 3.0)}),
        _op(
            "layer_norm",
            lambda *t: F.layer_norm(*t, eps=1e-5),
            {"x": _u((2, 3, 6)), "weight": _u((6,), 0.5, 1.5), "bias": _u((6,))},
            attrs={"eps": 1e-5},
        ),
        _op(
            "softmax",
            lambda x: F.softmax(x, axis=-1),
            {"x": _u((2, 3, 5), -3, 3)},
            attrs={"axis": -1},
        ),
        _op(
            "log_softmax",
            lambda x: F.log_softmax(x, axis=-1),
            {"x": _u((2, 3, 5), -3, 3)},
            attrs={"axis": -1},
        ),
        _cross_entropy_case(),
        _embedding_case(),
        _dropout_case(),
        _op(
            "causal_self_attention",
            F.causal_self_attention,
            {"q": _u((2, 2, 4, 3)), "k": _u((2, 2, 4, 3)), "v": _u((2, 2, 4, 3))},
        ),
        _op(  # two new queries against five positions' keys (a KV cache's step)
            "cached_attention",
            F.cached_attention,
            {"q": _u((2, 2, 2, 3)), "k": _u((2, 2, 5, 3)), "v": _u((2, 2, 5, 3))},
        ),
        _lora_layer_case("lora_layer", use_rslora=False),
        _lora_layer_case("lora_layer_rslora", use_rslora=True),
        _gpt_case(),
    ]


CASES = {c.name: c for c in _cases()}


# ======================================================================================
# Computing and writing a set
# ======================================================================================


def _case_generator(seed: int, name: str) -> backend.Generator:
    """Each case draws from its own stream, so adding a case never changes another."""
    return backend.Generator(seed * 2**32 + zlib.crc32(name.encode()))


def compute_case(case: Case, seed: int = 0, dtype: str = "float64") -> dict:
    """Every tensor of one case as host arrays: inputs, grad_output, outputs, grad.<input>.

    Computed on the reference ops (functional.py): they are what a port reproduces."""
    dtype_ = backend.resolve_dtype(dtype)
    gen = _case_generator(seed, case.name)
    arrays = case.make(gen, dtype_)
    with backend.use_ops("reference"):
        leaves, outputs = case.run(arrays)
        out = outputs[case.backward_from]
        grad_output = gen.normal(out.shape, dtype=dtype_)
        out.backward(grad_output)
    tensors = {k: backend.to_numpy(a).copy() for k, a in arrays.items()}
    tensors["grad_output"] = backend.to_numpy(grad_output).copy()
    for k, t in outputs.items():
        tensors[k] = backend.to_numpy(t.data).copy()
    for k, t in leaves.items():
        if k in case.grads:
            tensors[f"grad.{k}"] = backend.to_numpy(t.grad).copy()
        elif t.grad is not None:  # a frozen input that got a gradient is a minilora bug
            raise RuntimeError(f"vectors: {case.name}: frozen input {k} received a gradient")
    return tensors


INPUT_ROLES = ("input", "grad_output")  # what a port is given; it computes the rest


def _role(case: Case, name: str) -> str:
    if name == "grad_output":
        return "grad_output"
    if name.startswith("grad."):
        return "grad"
    return "output" if name in case.outputs else "input"


def _manifest_case(case: Case, tensors: dict) -> dict:
    entries = {}
    for k, a in tensors.items():
        dtype = backend.dtype_name(a.dtype)
        entry = {"role": _role(case, k), "shape": list(a.shape), "dtype": dtype}
        if entry["role"] in ("output", "grad"):
            entry.update(TOLERANCES[dtype])
        entries[k] = entry
    inputs = [k for k in tensors if _role(case, k) == "input"]
    return {
        "file": f"{case.name}.safetensors",
        "function": case.function,
        "attrs": case.attrs,
        "inputs": inputs,
        "requires_grad": list(case.grads),
        "no_grad": [k for k in inputs if k not in case.grads and "float" in entries[k]["dtype"]],
        "outputs": list(case.outputs),
        "backward_from": case.backward_from,
        "tensors": entries,
    }


def reference_set(seed: int = 0, dtype: str = "float64", cases=None) -> tuple[dict, dict]:
    """(manifest, {case name: {tensor name: array}}) for the whole set (or the ``cases``
    named), in memory."""
    if dtype not in TOLERANCES:
        raise ValueError(f"dtype={dtype!r} must be one of {sorted(TOLERANCES)}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31:
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2**31)")
    names = _case_names(cases, "reference_set")
    data = {name: compute_case(CASES[name], seed, dtype) for name in names}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "generator": f"minilora {__version__}",
        "seed": seed,
        "dtype": dtype,
        "tolerances": TOLERANCES,
        "tolerance_rule": "|got - want| <= atol + rtol * |want|, elementwise",
        "cases": {name: _manifest_case(CASES[name], t) for name, t in data.items()},
    }
    return manifest, data


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def write_vectors(folder, seed: int = 0, dtype: str = "float64") -> dict:
    """Write the reference set to ``folder`` (created if needed): one safetensors file per
    case and ``manifest.json``. Byte-identical for the same seed and dtype. Returns the
    manifest."""
    manifest, data = reference_set(seed, dtype)
    _write_set(folder, manifest, data)
    return manifest


def write_inputs(folder, seed: int, cases, dtype: str = "float64") -> dict:
    """Write only what a port needs to compute ``cases``: each case's inputs and
    ``grad_output``, and a manifest without the seed (the results stay here; the grader of
    a5 compares the port's results with :func:`check_vectors` given the seed)."""
    manifest, data = reference_set(seed, dtype, cases)
    manifest["seed"] = None
    for name, tensors in data.items():
        roles = manifest["cases"][name]["tensors"]
        data[name] = {k: a for k, a in tensors.items() if roles[k]["role"] in INPUT_ROLES}
    _write_set(folder, manifest, data)
    return manifest


def _write_set(folder, manifest: dict, data: dict) -> None:
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"vectors: {folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION}
    files = [
        (folder / manifest["cases"][name]["file"], serialize(t, {**meta, "case": name}))
        for name, t in data.items()
    ]
    files.append((folder / MANIFEST_NAME, manifest_bytes(manifest)))
    atomic_write(files)


def _case_names(cases, caller: str) -> list[str]:
    names = list(CASES) if cases is None else list(cases)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise ValueError(f"{caller}: unknown cases {unknown}; known: {list(CASES)}")
    return names


# ======================================================================================
# Checking a set written by another implementation
# ======================================================================================


@dataclass
class TensorResult:
    case: str
    tensor: str
    role: str
    status: str  # "ok", "mismatch", "missing", "error"
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def line(self) -> str:
        tag = {"ok": "ok", "mismatch": "MISMATCH", "missing": "MISSING", "error": "ERROR"}
        return f"{tag[self.status]:<9}{self.case}/{self.tensor}: {self.detail}"


@dataclass
class VectorReport:
    """The outcome of :func:`check_vectors`: one result per expected tensor."""

    folder: str
    seed: int
    dtype: str
    results: list[TensorResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.ok for r in self.results)

    @property
    def failures(self) -> list[TensorResult]:
        return [r for r in self.results if not r.ok]

    def format(self) -> str:
        lines = [f"checking {self.folder} against minilora (seed {self.seed}, {self.dtype})"]
        lines += [r.line() for r in self.results]
        n, bad = len(self.results), len(self.failures)
        verdict = "PASS" if self.ok else "FAIL"
        lines.append(f"{verdict}: {n - bad} of {n} tensors match, {bad} do not")
        return "\n".join(lines)


def _read_set_file(path: Path) -> dict:
    # the library checks that the header's sizes end where the file does: a regular file
    # is read up to its size, never past it
    data = read_file(path, "vectors --check", "a .safetensors file")
    try:
        safetensors.deserialize(data)
        tensors = safetensors.numpy.load(data)
    except BaseException as e:  # a Rust panic surfaces as a BaseException subclass
        if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from None
    check_data_sha256(path, "vectors --check")
    return tensors


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise FileNotFoundError(f"vectors --check: no folder at {folder}")
    data = read_file(path, "vectors --check", "a JSON file", JSON_LIMIT)
    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"vectors --check: {path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"vectors --check: {path} is not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"vectors --check: {path} has format_version={manifest.get('format_version')!r}; "
            f"this minilora checks version {FORMAT_VERSION!r}"
        )
    return manifest


def compare(got, want, rtol: float, atol: float) -> tuple[bool, str]:
    """(within tolerance, a one-line description) for two arrays of the same shape."""
    if want.size == 0:
        return True, "empty"
    g = got.astype(backend.float64)
    w = want.astype(backend.float64)
    err = abs(g - w)
    allowed = atol + rtol * abs(w)
    excess = err - allowed
    finite = bool((g == g).all()) and bool((abs(g) < float("inf")).all())
    worst = int(excess.argmax())
    ok = finite and bool((excess <= 0).all())
    max_err = float(err.max())
    if ok:
        return True, f"max |err| {max_err:.2e} (allowed {atol:g} + {rtol:g}·|want|)"
    where = backend.unravel_index(worst, tuple(want.shape))
    n_bad = int((~(excess <= 0)).sum())
    return False, (
        f"{n_bad} of {want.size} elements outside atol {atol:g} + rtol {rtol:g}·|want|; "
        f"worst at {where}: got {g.reshape(-1)[worst]:.9g}, want {w.reshape(-1)[worst]:.9g}"
    )


def check_vectors(folder, cases=None, seed: int | None = None) -> VectorReport:
    """Check the set in ``folder`` against minilora, tensor by tensor.

    The set's manifest gives the seed and dtype (``seed`` given: that seed, in float64,
    whatever the manifest says: how the a5 grader checks a port it gave fresh inputs);
    minilora recomputes its own set for them
    and compares: inputs (and ``grad_output``) must be bitwise minilora's (copy them from
    minilora's set), outputs and gradients must agree within ``TOLERANCES[dtype]`` and
    have minilora's shape and dtype. ``cases`` limits the check to some case names (a port
    in progress). A missing case file or tensor is a failure. Raises ``ValueError`` /
    ``FileNotFoundError`` when the folder is not a vector set at all.
    """
    folder = Path(folder)
    if folder.is_dir():  # a set whose writing was killed after its commit point: complete it
        finish_interrupted_write(folder, "vectors --check")
    manifest = _read_manifest(folder)
    if seed is None:
        seed, dtype = manifest.get("seed"), manifest.get("dtype")
    else:
        dtype = "float64"
    if dtype not in TOLERANCES:
        raise ValueError(
            f"vectors --check: manifest dtype={dtype!r}, expected one of {sorted(TOLERANCES)}"
        )
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31:
        raise ValueError(f"vectors --check: manifest seed={seed!r} must be an integer")
    names = _case_names(cases, "vectors --check")
    tol = TOLERANCES[dtype]
    report = VectorReport(str(folder), seed, dtype)
    for name in names:
        case = CASES[name]
        want = compute_case(case, seed, dtype)
        path = folder / f"{name}.safetensors"
        try:
            got = _read_set_file(path)
        except (FileNotFoundError, ValueError) as e:
            report.results.append(TensorResult(name, "*", "file", "missing", str(e)))
            continue
        for k, w in want.items():
            role = _role(case, k)
            if k not in got:
                report.results.append(TensorResult(name, k, role, "missing", f"no {k} in {path}"))
                continue
            g = got[k]
            if tuple(g.shape) != tuple(w.shape) or g.dtype != w.dtype:
                detail = (
                    f"{backend.dtype_name(g.dtype)} {tuple(g.shape)}, expected "
                    f"{backend.dtype_name(w.dtype)} {tuple(w.shape)}"
                )
                report.results.append(TensorResult(name, k, role, "mismatch", detail))
            elif role in INPUT_ROLES:
                same = bool((g == w).all())
                detail = (
                    f"{role}, identical to minilora's"
                    if same
                    else (
                        f"{role} differs from minilora's (seed {seed}); copy the inputs from "
                        "minilora's set instead of drawing your own"
                    )
                )
                report.results.append(
                    TensorResult(name, k, role, "ok" if same else "mismatch", detail)
                )
            else:
                ok, detail = compare(g, w, **tol)
                report.results.append(
                    TensorResult(name, k, role, "ok" if ok else "mismatch", f"{role}, {detail}")
                )
        for k in sorted(set(got) - set(want)):
            role = "grad" if k.startswith("grad.") else "unknown"
            detail = (
                "a gradient for a frozen input: a port must not compute one"
                if role == "grad"
                else "not part of the case"
            )
            report.results.append(TensorResult(name, k, role, "mismatch", detail))
    return report


__all__ = [
    "CASES",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "TOLERANCES",
    "VectorReport",
    "check_vectors",
    "compute_case",
    "reference_set",
    "write_inputs",
    "write_vectors",
]
