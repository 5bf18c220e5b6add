"""Closed-form accounting: parameters, training memory and FLOPs, from a tiny model to GPT-3.

Everything here is integer arithmetic on a model *shape*; no array is allocated, so the
same functions answer for a 2-layer toy and for GPT-3 175B. The formulas are derived in
docs/accounting.md, and the property tests in tests/test_accounting.py check each one
against what an instantiated minilora model actually has and does (parameters counted,
gradient and optimizer-state bytes read from the arrays, matrix products recorded by
``backend.counting()``, arrays saved for the backward pass).

Two things are described:

* a :class:`ModelShape`: minilora's GPT (``n_layer``, ``n_embd``, ``n_head``,
  ``vocab_size``, ``block_size``, ``bias``) plus ``tied``: whether ``lm_head`` shares the
  token embedding, as in the released GPT-2 and GPT-3 (minilora's own GPT is untied);
* a :class:`LoRASpec`: target leaf names, a rank per target (one ``r`` or a dict), and
  the bias mode (``"none"``, ``"all"``, ``"lora_only"``, as ``lora.mark_only_lora_as_trainable``).
  ``lora=None`` means full fine-tuning (every parameter trains).

Shapes: C = n_embd, V = vocab_size, L = n_layer, nh = n_head, B = batch, T = sequence
length, N = B·T rows through every linear layer. Weights are (out, in), as in PyTorch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields

from minilora import backend, fast
from minilora.functional import check_probability
from minilora.lora import LoRAConfig, check_bias_mode, check_rank
from minilora.model import GPTConfig, check_positive_int, check_sizes

#: The leaf names LoRA can target, in model order.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", "lm_head")

#: Bytes per element of the dtypes the accounting knows (bfloat16 for the record: minilora
#: itself computes in float16/32/64).
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}

#: Optimizer state arrays kept per trainable parameter, each the parameter's size.
OPTIMIZER_STATES = {"adamw": 2, "sgd-momentum": 1, "sgd": 0}


# ======================================================================================
# Shapes and LoRA settings
# ======================================================================================


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a GPT as minilora builds it (see ``model.py``), plus weight tying.

    ``tied=True``: ``lm_head.weight`` *is* ``tok_emb.weight`` (GPT-2, GPT-3), so the
    (V, C) matrix is counted, stored and updated once. ``dropout`` (model dropout, training
    mode) only changes the activation estimate: each active dropout saves its mask.
    """

    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    block_size: int
    bias: bool = True
    tied: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        check_sizes("ModelShape", self)

    @classmethod
    def from_config(cls, config: GPTConfig, tied: bool | None = None) -> ModelShape:
        """The shape of ``GPT(config)``: tied as ``config.tie_word_embeddings`` says (a
        GPT-2 checkpoint; minilora's own GPT is untied) unless ``tied`` is given."""
        tied = config.tie_word_embeddings if tied is None else tied
        return cls(
            config.n_layer,
            config.n_embd,
            config.n_head,
            config.vocab_size,
            config.block_size,
            bias=config.bias,
            tied=tied,
            dropout=config.dropout,
        )

    def module_shape(self, name: str) -> tuple[int, int]:
        """The weight shape (out, in) of the linear layer with leaf name ``name``."""
        C = self.n_embd
        shapes = {
            "q_proj": (C, C),
            "k_proj": (C, C),
            "v_proj": (C, C),
            "o_proj": (C, C),
            "fc1": (4 * C, C),
            "fc2": (C, 4 * C),
            "lm_head": (self.vocab_size, C),
        }
        if name not in shapes:
            raise ValueError(f"unknown module {name!r}; valid names: {', '.join(TARGET_MODULES)}")
        return shapes[name]

    def module_count(self, name: str) -> int:
        """How many layers carry this leaf name: one per block, one lm_head."""
        self.module_shape(name)
        return 1 if name == "lm_head" else self.n_layer

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class LoRASpec:
    """Which linear layers get an adapter, with which rank, and which biases train.

    ``r`` is one rank for every target, or a dict ``{leaf_name: rank}`` (per-module ranks;
    ``target_modules`` then defaults to its keys and, if given, must name the same modules).
    Ranks are checked against a model shape by :meth:`ranks`, where each target's weight
    shape is known. ``lora_dropout`` > 0 only changes the activation estimate.
    """

    target_modules: list[str] | None = None
    r: int | dict[str, int] = 8
    bias: str = "none"
    lora_dropout: float = 0.0

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            self.target_modules = [t.strip() for t in self.target_modules.split(",") if t.strip()]
        if self.target_modules is None:
            self.target_modules = list(self.r) if isinstance(self.r, dict) else ["q_proj", "v_proj"]
        self.target_modules = list(dict.fromkeys(self.target_modules))  # drop repeats
        if not self.target_modules:
            raise ValueError("LoRASpec: target_modules is empty; name at least one module")
        names = list(self.target_modules) + (list(self.r) if isinstance(self.r, dict) else [])
        unknown = [t for t in dict.fromkeys(names) if t not in TARGET_MODULES]
        if unknown:
            raise ValueError(
                f"unknown target module(s) {', '.join(map(repr, unknown))}; valid names: "
                f"{', '.join(TARGET_MODULES)}"
            )
        if isinstance(self.r, dict) and set(self.r) != set(self.target_modules):
            raise ValueError(
                f"LoRASpec: per-module ranks name {sorted(self.r)} but target_modules is "
                f"{sorted(self.target_modules)}; give a rank for exactly the targeted modules"
            )
        check_bias_mode(self.bias, "LoRASpec")
        check_probability("LoRASpec", "lora_dropout", self.lora_dropout)

    @classmethod
    def from_config(cls, config: LoRAConfig) -> LoRASpec:
        """The spec of a config with one rank per leaf name in every layer; a config with
        ``rank_pattern``, ``layers_to_transform`` or ``trainable_token_indices`` is refused
        (count such a model with ``lora.count_parameters``); ``alpha_pattern`` changes no
        count."""
        tokens = config.trainable_token_indices
        if config.rank_pattern or config.layers_to_transform not in (None, []) or tokens:
            raise ValueError(
                f"LoRASpec: rank_pattern={config.rank_pattern!r}, layers_to_transform="
                f"{config.layers_to_transform!r}, trainable_token_indices={tokens!r}: the "
                "closed-form counts take one rank per module name in every layer and no "
                "trainable tokens; count this model with lora.count_parameters"
            )
        return cls(list(config.target_modules), config.r, config.bias, config.lora_dropout)

    def ranks(self, shape: ModelShape) -> dict[str, int]:
        """``{target: r}`` in model order, each rank checked against the target's weight."""
        out = {}
        for name in TARGET_MODULES:
            if name not in self.target_modules:
                continue
            r = self.r[name] if isinstance(self.r, dict) else self.r
            check_rank(r, shape.module_shape(name), name)
            out[name] = r
        return out


def _shape(shape) -> ModelShape:
    if isinstance(shape, ModelShape):
        return shape
    if isinstance(shape, Preset):
        return shape.shape
    if isinstance(shape, GPTConfig):
        return ModelShape.from_config(shape)
    raise TypeError(f"expected a ModelShape or GPTConfig, got {type(shape).__name__}")


def _spec(lora) -> LoRASpec | None:
    if lora is None or isinstance(lora, LoRASpec):
        return lora
    if isinstance(lora, LoRAConfig):
        return LoRASpec.from_config(lora)
    raise TypeError(f"expected a LoRASpec, LoRAConfig or None, got {type(lora).__name__}")


def dtype_bytes(dtype) -> int:
    """Bytes per element: ``"float16"``, a NumPy dtype or scalar type (anything named)."""
    name = dtype if isinstance(dtype, str) else getattr(dtype, "name", None)
    if name is None:
        name = getattr(dtype, "__name__", None)
    if name not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r} is not known; expected one of {list(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


# ======================================================================================
# Presets: real decoder shapes
# ======================================================================================


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    shape: ModelShape
    published_params: int  # the size the authors publish, to compare against
    source: str


_GPT2_SOURCE = (
    "Radford et al. 2019, 'Language Models are Unsupervised Multitask Learners': Table 2 "
    "(layers, d_model) and section 2.3 (vocabulary 50,257, context 1024); heads from the "
    "released checkpoints' hparams.json (openai/gpt-2). Published sizes as corrected in the "
    "openai/gpt-2 README ('our original parameter counts were wrong', so the paper's "
    "117M/345M/762M/1542M read 124M/355M/774M/1558M), which the released checkpoints match "
    "with lm_head tied to the token embedding."
)
_GPT3_SOURCE = (
    "Brown et al. 2020, 'Language Models are Few-Shot Learners': Table 2.1 (n_params 175.0B, "
    "n_layers 96, d_model 12288, n_heads 96, d_head 128) and section 2.1 (context window "
    "2048; the GPT-2 model and tokenization, hence vocabulary 50257). GPT-3 alternates dense "
    "and locally banded sparse attention, which changes no parameter count; the FLOP count "
    "here assumes dense attention."
)


def _gpt2(L, C, nh):
    return ModelShape(L, C, nh, vocab_size=50257, block_size=1024, bias=True, tied=True)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("gpt2-small", "GPT-2 small", _gpt2(12, 768, 12), 124_000_000, _GPT2_SOURCE),
        Preset("gpt2-medium", "GPT-2 medium", _gpt2(24, 1024, 16), 355_000_000, _GPT2_SOURCE),
        Preset("gpt2-large", "GPT-2 large", _gpt2(36, 1280, 20), 774_000_000, _GPT2_SOURCE),
        Preset("gpt2-xl", "GPT-2 XL", _gpt2(48, 1600, 25), 1_558_000_000, _GPT2_SOURCE),
        Preset(
            "gpt3-175b",
            "GPT-3 175B",
            ModelShape(96, 12288, 96, vocab_size=50257, block_size=2048, bias=True, tied=True),
            175_000_000_000,
            _GPT3_SOURCE,
        ),
    )
}
PRESET_ALIASES = {"gpt2": "gpt2-small", "gpt3": "gpt3-175b"}


def get_preset(name: str) -> Preset:
    """A preset by name (``"gpt2"`` and ``"gpt3"`` are aliases); unknown names list the known."""
    key = PRESET_ALIASES.get(name, name)
    if key not in PRESETS:
        aliases = ", ".join(f"{a} = {b}" for a, b in PRESET_ALIASES.items())
        raise ValueError(
            f"unknown preset {name!r}; known presets: {', '.join(PRESETS)} (aliases: {aliases})"
        )
    return PRESETS[key]


# ======================================================================================
# Parameter counts
# ======================================================================================


def block_params(shape: ModelShape) -> int:
    """One Transformer block: 12·C² weights, plus 13·C with biases (9C linear, 4C norms) or
    2·C without (the two LayerNorm weights)."""
    C = shape.n_embd
    return 12 * C * C + (13 * C if shape.bias else 2 * C)


def total_params(shape, tied: bool | None = None) -> int:
    """All parameters of the base model (no adapter): embeddings V·C + block·C, L blocks,
    ln_f, and lm_head V·C unless tied to the token embedding."""
    s = _shape(shape)
    tied = s.tied if tied is None else tied
    C, V = s.n_embd, s.vocab_size
    ln_f = 2 * C if s.bias else C
    return V * C + s.block_size * C + s.n_layer * block_params(s) + ln_f + (0 if tied else V * C)


def bias_params(shape) -> int:
    """Every bias (what ``bias="all"`` trains): per block 9·C in linears + 2·C in norms,
    plus ln_f's C. Zero for a model built with ``bias=False``."""
    s = _shape(shape)
    return (s.n_layer * 11 * s.n_embd + s.n_embd) if s.bias else 0


def lora_params(shape, lora) -> int:
    """Adapter parameters: r·(in + out) per adapted matrix (|Θ| = 2·L̂·d·r when square)."""
    s, spec = _shape(shape), _spec(lora)
    total = 0
    for name, r in spec.ranks(s).items():
        out_f, in_f = s.module_shape(name)
        total += s.module_count(name) * r * (in_f + out_f)
    return total


def trainable_bias_params(shape, lora) -> int:
    """The biases a LoRA setup trains: none, all of them, or those of adapted layers."""
    s, spec = _shape(shape), _spec(lora)
    if not s.bias or spec.bias == "none":
        return 0
    if spec.bias == "all":
        return bias_params(s)
    return sum(  # "lora_only": lm_head has no bias
        s.module_count(n) * s.module_shape(n)[0] for n in spec.ranks(s) if n != "lm_head"
    )


def trainable_params(shape, lora=None) -> int:
    """Parameters that train: all of them under full fine-tuning (``lora=None``), else the
    adapters plus the biases the bias mode trains."""
    s, spec = _shape(shape), _spec(lora)
    if spec is None:
        return total_params(s)
    return lora_params(s, spec) + trainable_bias_params(s, spec)


def all_params(shape, lora=None) -> int:
    """The model's parameters with the adapter included (PEFT's "all params")."""
    s, spec = _shape(shape), _spec(lora)
    return total_params(s) + (0 if spec is None else lora_params(s, spec))


def param_counts(shape, lora=None) -> dict:
    s, spec = _shape(shape), _spec(lora)
    base = total_params(s)
    adapter = 0 if spec is None else lora_params(s, spec)
    trainable = trainable_params(s, spec)
    return {
        "total_params": base,
        "total_params_tied": total_params(s, tied=True),
        "total_params_untied": total_params(s, tied=False),
        "lora_params": adapter,
        "all_params": base + adapter,
        "trainable_params": trainable,
        "trainable_fraction": trainable / (base + adapter),
    }


# ======================================================================================
# A symbolic training step: what minilora's engine computes and saves
# ======================================================================================


@dataclass
class StepTrace:
    """What one forward + backward of minilora's engine does, derived without arrays.

    ``records``: how many matrix products of each ``(phase, name, flops)``, named as
    ``functional.py`` names them (``"linear"``, ``"linear.dweight"``, ``"lora.dA"``,
    ``"attention.dq"`` ...), flops counted as ``backend.matmul`` does (2·m·k·n). ``saved``:
    every floating array the graph keeps for the backward pass (activations, not
    parameters), key -> elements.
    """

    batch_size: int
    seq_len: int
    records: Counter = field(default_factory=Counter)
    saved: dict[str, int] = field(default_factory=dict)

    def flops(self, phase: str | None = None, name: str | None = None) -> int:
        return sum(
            f * count
            for (p, n, f), count in self.records.items()
            if phase in (None, p) and name in (None, n)
        )

    def by_name(self, phase: str | None = None) -> Counter:
        """``Counter((name, flops))`` of the products, for comparison with a real count."""
        out = Counter()
        for (p, n, f), count in self.records.items():
            if phase in (None, p):
                out[n, f] += count
        return out

    def add(self, other: StepTrace, copies: int) -> None:
        """Add ``copies`` times what ``other`` (one Transformer block) computes and saves."""
        for key, count in other.records.items():
            self.records[key] += count * copies
        for key, elements in other.saved.items():
            self.saved[key] = elements * copies

    @property
    def activation_elements(self) -> int:
        return sum(self.saved.values())


def _trainability(s: ModelShape, spec: LoRASpec | None):
    """Functions saying which parameters train, for full fine-tuning or a LoRA spec."""
    ranks = {} if spec is None else spec.ranks(s)

    def linear(name):  # -> (weight trains, bias trains, LoRA rank or 0)
        has_bias = s.bias and name != "lm_head"
        if spec is None:
            return True, has_bias, 0
        r = ranks.get(name, 0)
        return False, has_bias and (spec.bias == "all" or (spec.bias == "lora_only" and r)), r

    # LayerNorm weight trains / bias trains; embeddings train
    ln = (True, s.bias) if spec is None else (False, s.bias and spec.bias == "all")
    return linear, ln, spec is None


def trace_step(
    shape, lora=None, batch_size: int = 1, seq_len: int | None = None, ops: str | None = None
) -> StepTrace:
    """Walk minilora's GPT forward + backward symbolically (see the class docstring).

    A node exists, and saves what its backward needs, only when one of its inputs requires
    a gradient (``autograd.Function``): under LoRA (bias="none") the embeddings and block
    0's first LayerNorm are frozen and nothing flows into them, so block 0's k_proj has no
    backward at all, and its q/v adapters need no input gradient. Each rule below mirrors
    one ``Function`` in functional.py; tests compare the result with a real step, exactly.
    Dropout masks are counted when ``shape.dropout`` / ``lora.lora_dropout`` are non-zero
    (training mode); they change no matrix product.

    ``ops``: the path traced, ``"fast"`` or ``"reference"`` (default: the one the engine
    runs on now, ``minilora.get_ops()``). They differ in attention only: the reference
    multiplies over the whole T×T square and saves P; the fast path multiplies each block
    of query rows with its key prefix only, saves a log-sum-exp per row instead of P, and
    recomputes each block's scores in the backward, except at T <= 64 (one block), where it
    saves P and recomputes nothing (``fast.ops.keeps_probabilities``).
    """
    s, spec = _shape(shape), _spec(lora)
    ops = backend.get_ops() if ops is None else backend.check_ops(ops, "trace_step: ops")
    T = s.block_size if seq_len is None else seq_len
    check_positive_int("trace_step", "batch_size", batch_size)
    check_positive_int("trace_step", "seq_len", T)
    if T > s.block_size:
        raise ValueError(f"seq_len={T} is larger than block_size={s.block_size}")
    return _StepTracer(s, spec, batch_size, T, ops).step()


class _StepTracer:
    """:func:`trace_step`'s walk: one method per ``Function`` of functional.py, recording
    the matrix products it runs and the arrays it saves in ``self.target`` (the whole step,
    or one Transformer block while a block is traced). Each method takes the key of its
    input and whether that input requires a gradient, and returns the same for its output."""

    def __init__(self, s: ModelShape, spec: LoRASpec | None, B: int, T: int, ops: str):
        self.s, self.B, self.T = s, B, T
        self.N, self.C = B * T, s.n_embd
        self.linear_train, (self.ln_w, self.ln_b), self.emb_train = _trainability(s, spec)
        self.lora_drop = spec is not None and spec.lora_dropout > 0
        self.drop = s.dropout > 0
        self.target = StepTrace(B, T)
        # attention's products: one over the T×T square (reference), or one per block of
        # query rows against its key prefix (fast path), each 2·B·C·rows·keys over all heads
        C = self.C
        if ops == "fast":
            self.products = [2 * B * C * (i1 - i0) * i1 for i0, i1 in fast.ops.query_blocks(T)]
        else:
            self.products = [2 * B * T * T * C]
        # the fast path saves a log-sum-exp per row and recomputes P, except at small T
        self.keeps_p = ops == "reference" or fast.ops.keeps_probabilities(T)

    def mm(self, phase, name, flops):
        self.target.records[phase, name, flops] += 1

    def save(self, key, elements):
        self.target.saved[key] = elements

    def dropout(self, key, rg):  # DropoutFunction saves its scaled mask, when it is a node
        if self.drop and rg:
            self.save(key + ".mask", self.N * self.C)

    def layer_norm(self, key, x_rg):  # LayerNormFunction saves xhat (N, C) and rstd (N, 1)
        if x_rg or self.ln_w or self.ln_b:
            self.save(key + ".xhat", self.N * self.C)
            self.save(key + ".rstd", self.N)
            return key + ".out", True
        return key + ".out", False

    def linear(self, key, leaf, x, x_rg, n_in, n_out):
        N, mm, save = self.N, self.mm, self.save
        w, b, r = self.linear_train(leaf)
        if not r:  # LinearFunction: x2 saved for dW; dx needs only the weight
            mm("forward", "linear", 2 * N * n_in * n_out)
            if not (x_rg or w or b):
                return key + ".out", False
            if w:
                save(x, N * n_in)
                mm("backward", "linear.dweight", 2 * N * n_out * n_in)
            if x_rg:
                mm("backward", "linear.dinput", 2 * N * n_out * n_in)
            return key + ".out", True
        # LoRALinearFunction: A and B always train, so the node always exists
        d = x  # the bypass input: x itself, or its dropout (a new array, plus a mask)
        if self.lora_drop:
            d = key + ".lora_dropout.out"
            if x_rg:
                save(key + ".lora_dropout.mask", N * n_in)
        mm("forward", "lora.A", 2 * N * n_in * r)
        mm("forward", "linear", 2 * N * n_in * n_out)
        mm("forward", "lora.B", 2 * N * r * n_out)
        save(d, N * n_in)  # for dA
        save(key + ".lora_u", N * r)  # u = d Aᵀ, for dB
        mm("backward", "lora.dB_path", 2 * N * n_out * r)  # g B, shared by dA and dx
        if w:
            save(x, N * n_in)
            mm("backward", "linear.dweight", 2 * N * n_out * n_in)
        mm("backward", "lora.dB", 2 * N * n_out * r)
        mm("backward", "lora.dA", 2 * N * r * n_in)
        if x_rg:
            mm("backward", "lora.dinput", 2 * N * r * n_in)
            mm("backward", "linear.dinput", 2 * N * n_out * n_in)
        return key + ".out", True

    def attention(self, key, q, k, v):  # saves q, k, v and P (B, nh, T, T), or lse (B, nh, T)
        B, T, nh = self.B, self.T, self.s.n_head
        for f in self.products:
            self.mm("forward", "attention.scores", f)
            self.mm("forward", "attention.values", f)
        (q, q_rg), (k, k_rg), (v, v_rg) = q, k, v
        if not (q_rg or k_rg or v_rg):
            return key + ".out", False
        if self.keeps_p:
            self.save(key + ".P", B * nh * T * T)
        else:
            self.save(key + ".lse", B * nh * T)
        for t in (q, k, v):
            self.save(t, self.N * self.C)
        for f in self.products:
            if not self.keeps_p:  # P recomputed from q, k and lse
                self.mm("backward", "attention.scores", f)
            if v_rg:
                self.mm("backward", "attention.dv", f)
            if q_rg or k_rg:
                self.mm("backward", "attention.dP", f)
            if q_rg:
                self.mm("backward", "attention.dq", f)
            if k_rg:
                self.mm("backward", "attention.dk", f)
        return key + ".out", True  # (B, T, C) after merging heads: a new array

    def block(self, i, x_rg):
        """Block ``i``, its input requiring a gradient or not; returns whether its output does."""
        p, C = f"blocks.{i}", self.C
        h, h_rg = self.layer_norm(p + ".ln1", x_rg)
        qkv = [
            self.linear(f"{p}.attn.{n}", n, h, h_rg, C, C) for n in ("q_proj", "k_proj", "v_proj")
        ]
        a, a_rg = self.attention(p + ".attn", *qkv)
        _, o_rg = self.linear(p + ".attn.o_proj", "o_proj", a, a_rg, C, C)
        self.dropout(p + ".attn.resid_dropout", o_rg)
        x_rg = x_rg or o_rg
        h, h_rg = self.layer_norm(p + ".ln2", x_rg)
        f, f_rg = self.linear(p + ".mlp.fc1", "fc1", h, h_rg, C, 4 * C)
        if f_rg:  # GELU saves one (N, 4C) array: its input (reference) or dy/dx (fast path)
            self.save(p + ".mlp.gelu.saved", self.N * 4 * C)
        _, f_rg = self.linear(p + ".mlp.fc2", "fc2", p + ".mlp.gelu.out", f_rg, 4 * C, C)
        self.dropout(p + ".mlp.dropout", f_rg)
        return x_rg or f_rg

    def step(self) -> StepTrace:
        """The whole model: embeddings, the blocks, ln_f, lm_head and the loss."""
        s, tr = self.s, self.target
        x_rg = self.emb_train  # the embedding sum needs a gradient only if an embedding trains
        self.dropout("drop", x_rg)
        i = 0
        while i < s.n_layer:  # constant time in n_layer: at most two kinds of block
            self.target = StepTrace(self.B, self.T)
            out_rg = self.block(i, x_rg)
            # a block whose input needs a gradient exactly when its output does is followed by
            # copies of itself (every later block sees the same input): count them at once
            copies = s.n_layer - i if out_rg == x_rg else 1
            tr.add(self.target, copies)
            x_rg, i = out_rg, i + copies
        self.target = tr
        h, h_rg = self.layer_norm("ln_f", x_rg)
        _, logits_rg = self.linear("lm_head", "lm_head", h, h_rg, self.C, s.vocab_size)
        if not logits_rg:  # cannot happen for full fine-tuning or a LoRA spec
            raise ValueError("nothing trains: the loss would not require a gradient")
        # SoftmaxCrossEntropy keeps log-probabilities or probabilities
        self.save("loss.saved", self.N * s.vocab_size)
        return tr


# ======================================================================================
# FLOPs
# ======================================================================================


def flops_per_token(shape, lora=None, seq_len: int | None = None) -> dict:
    """Matmul FLOPs per token of one training step (forward, backward, total).

    Every product scales with N = B·T rows except attention's, which scale with B·T² (the
    reference ops) or with B·K(T), K(T) = Σ rows·keys over the blocks of query rows (the
    fast path). Per token they do not depend on the batch size and are exact integers,
    except K(T)/T on the fast path once T spans several blocks: rounded down here.
    """
    s = _shape(shape)
    tr = trace_step(s, lora, 1, seq_len)
    n = tr.seq_len
    fwd, bwd = tr.flops("forward"), tr.flops("backward")
    return {
        "forward": fwd // n,
        "backward": bwd // n,
        "total": (fwd + bwd) // n,
        "weight_gradient": tr.flops("backward", "linear.dweight") // n,
        "seq_len": n,
    }


def flops_comparison(shape, lora, seq_len: int | None = None) -> dict:
    """Full fine-tuning vs LoRA, per token, and the share of backward work LoRA removes.

    ``weight_gradient_share``: the part of full fine-tuning's backward that is weight
    gradients (``linear.dweight``), all of which LoRA skips for its frozen weights.
    ``backward_share_removed``: the net saving, 1 - backward(LoRA) / backward(full), which
    also counts the input gradients nothing needs under LoRA (below the first adapter) and
    the adapters' own small products.
    """
    full = flops_per_token(shape, None, seq_len)
    lo = flops_per_token(shape, lora, seq_len)
    return {
        "full_ft": full,
        "lora": lo,
        "weight_gradient_share": full["weight_gradient"] / full["backward"],
        "backward_share_removed": 1 - lo["backward"] / full["backward"],
        "step_share_removed": 1 - lo["total"] / full["total"],
    }


# ======================================================================================
# Memory
# ======================================================================================


def activation_bytes(
    shape, lora=None, dtype="float32", batch_size: int = 1, seq_len: int | None = None
) -> int:
    """Bytes of the floating arrays the graph saves for the backward pass, in ``dtype``.

    Full fine-tuning, dropout off, per block: (16·C + 2)·N + nh·B·T² elements on the
    reference ops, (16·C + 2)·N + nh·B·T on the fast path (see docs/accounting.md), plus
    ln_f and the softmax: 2·N·C + N + N·V. The path is the engine's current one
    (``minilora.get_ops()``), as for every function here built on ``trace_step``. Not
    included: the integer token ids and targets, the logits the model returns, and the
    transient gradient arrays of the backward pass itself.
    """
    return trace_step(shape, lora, batch_size, seq_len).activation_elements * dtype_bytes(dtype)


def optimizer_state_bytes(trainable: int, dtype="float32", optimizer: str = "adamw") -> int:
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer={optimizer!r} must be one of {list(OPTIMIZER_STATES)}")
    return OPTIMIZER_STATES[optimizer] * trainable * dtype_bytes(dtype)


def train_memory(
    shape,
    lora=None,
    dtype="float32",
    batch_size: int = 1,
    seq_len: int | None = None,
    optimizer: str = "adamw",
) -> dict:
    """Training memory in bytes with everything in one ``dtype``: weights (all, adapter
    included), gradients and optimizer state (trainable only), saved activations.

    Mixed precision differs: a float16/bfloat16 run usually keeps float32 master weights and
    float32 Adam moments (minilora's optimizers do, for float16), i.e. more bytes per
    trainable parameter than this counts.
    """
    s, spec = _shape(shape), _spec(lora)
    nbytes = dtype_bytes(dtype)
    trainable = trainable_params(s, spec)
    out = {
        "weights": all_params(s, spec) * nbytes,
        "gradients": trainable * nbytes,
        "optimizer_state": optimizer_state_bytes(trainable, dtype, optimizer),
        "activations": activation_bytes(s, spec, dtype, batch_size, seq_len),
    }
    out["total"] = sum(out.values())
    return out


def kv_cache_bytes(shape, batch_size: int = 1, seq_len: int | None = None, dtype="float32") -> int:
    """Bytes of the keys and values incremental decoding keeps (``model.KVCache``): per
    layer a key and a value of width C for every position of every sequence, 2·L·B·T·C
    elements, with T = ``seq_len`` positions (default ``block_size``: minilora's cache
    holds that many from the start). Independent of LoRA: the cache holds activations,
    and merged or not, the keys have the same shape."""
    s = _shape(shape)
    check_positive_int("kv_cache_bytes", "batch_size", batch_size)
    T = s.block_size if seq_len is None else seq_len
    check_positive_int("kv_cache_bytes", "seq_len", T)
    return 2 * s.n_layer * batch_size * T * s.n_embd * dtype_bytes(dtype)


def adapter_bytes(shape, lora, dtype="float32") -> int:
    """Size of the adapter's tensors (what ``lora_state_dict`` holds and a PEFT folder
    stores): trainable parameters × bytes per element. The safetensors file adds a small
    JSON header (8 bytes + a few hundred)."""
    s, spec = _shape(shape), _spec(lora)
    if spec is None:
        raise ValueError("adapter_bytes needs a LoRA spec (full fine-tuning saves the model)")
    return trainable_params(s, spec) * dtype_bytes(dtype)


# ======================================================================================
# Everything at once (what ``minilora count`` prints)
# ======================================================================================


def report(
    shape,
    lora,
    dtype="float32",
    batch_size: int = 1,
    seq_len: int | None = None,
    optimizer: str = "adamw",
) -> dict:
    """Parameters, memory (full fine-tuning and LoRA) and FLOPs per token, as one dict.

    ``shape`` may be a :class:`Preset`; its name and published size are then included.
    """
    preset = shape if isinstance(shape, Preset) else None
    s, spec = _shape(shape), _spec(lora)
    T = s.block_size if seq_len is None else seq_len
    counts = param_counts(s, spec)
    full_mem = train_memory(s, None, dtype, batch_size, T, optimizer)
    lora_mem = train_memory(s, spec, dtype, batch_size, T, optimizer)
    fl = flops_comparison(s, spec, T)
    named = (
        {}
        if preset is None
        else {
            "preset": preset.name,
            "preset_title": preset.title,
            "published_params": preset.published_params,
        }
    )
    return {
        **named,
        "shape": s.to_dict(),
        "lora": {"ranks": spec.ranks(s), "bias": spec.bias, "lora_dropout": spec.lora_dropout},
        "dtype": dtype if isinstance(dtype, str) else str(dtype),
        "bytes_per_element": dtype_bytes(dtype),
        "optimizer": optimizer,
        "batch_size": batch_size,
        "seq_len": T,
        **counts,
        "trainable_params_full_ft": trainable_params(s, None),
        "adapter_bytes": adapter_bytes(s, spec, dtype),
        "full_ft_train_bytes": full_mem["total"],
        "lora_train_bytes": lora_mem["total"],
        "memory_full_ft": full_mem,
        "memory_lora": lora_mem,
        "flops_per_token_full_ft": fl["full_ft"]["total"],
        "flops_per_token_lora": fl["lora"]["total"],
        "flops_full_ft": fl["full_ft"],
        "flops_lora": fl["lora"],
        "weight_gradient_share": fl["weight_gradient_share"],
        "backward_share_removed": fl["backward_share_removed"],
        "step_share_removed": fl["step_share_removed"],
    }
