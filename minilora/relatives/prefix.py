"""Prefix tuning (Li & Liang 2021, arXiv 2101.00190): a frozen GPT steered by P learned vectors.

Two kinds, chosen by ``PrefixConfig.prefix_type``:

* ``"layer"`` (Li & Liang's prefix tuning): in every layer, P learned keys and values are
  put before the tokens' own, and every query attends to them as well as to the tokens
  before it. The prefix is a KV cache of P "virtual tokens" that are never computed,
  only learned: ``L·2·P·C`` parameters.
* ``"embedding"`` (prompt tuning, Lester et al. 2021): P learned vectors are put before
  the embedded tokens at the input, and the frozen model runs on the P + T positions;
  the logits of the virtual positions are dropped, so the output keeps shape (B, T, V).
  ``P·C`` parameters.

Positions: in both kinds the prefix takes the first P positions, as if P tokens had come
first (Hugging Face models do the same when PEFT passes a prefix as ``past_key_values``),
so the tokens sit at positions P .. P+T-1 and a model with ``block_size`` learned
positions accepts ``block_size - P`` tokens: ``GPT.context_length``. The virtual vectors
take no position embedding of their own (a learned vector would absorb it).

The prefix brings its own modules; the book's GPT has no branch for it.
:func:`apply_prefix_tuning` turns the GPT into a :class:`PrefixGPT` in place (the same
object, modules and parameters, with ``model.prefix`` added), whose hooks put the tokens at
positions P.., the virtual tokens before them (``embed``) and the prefix first in a KV
cache (``kv_cache``); with prefix-layer, each block's attention becomes a
:class:`PrefixAttention`, whose queries also see the prefix's keys and values.

``prefix_projection=True`` is Li & Liang's reparameterisation, which they found trains
more stably: the prefix is the output of an MLP, ``(P, C) -> Linear(C, h) -> tanh ->
Linear(h, width)``, from a smaller learned (P, C) matrix; once trained,
:func:`collapse_prefix` replaces the MLP by its output, the plain prefix.

The layout and names follow PEFT's ``PrefixEncoder``: ``prefix.embedding`` (P, width)
holds, per virtual token, every layer's key and value side by side (width L·2·C:
layer 0's key, layer 0's value, layer 1's key, ...) or the virtual token itself (width
C); with the projection it is (P, C), followed by ``prefix.transform.{0,1}`` (PEFT's
``transform.0`` and ``transform.2``, its tanh being ``transform.1``). Math: docs/math.md,
"Prefix tuning".
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from minilora import backend
from minilora import functional as F
from minilora.autograd import Tensor, no_grad
from minilora.interop.safetensors_files import (
    atomic_write,
    check_destination,
    read_safetensors,
    serialize,
)
from minilora.model import GPT, CausalSelfAttention, KVCache, check_positive_int
from minilora.nn import Linear, Module, ModuleList, Parameter

PREFIX_TYPES = ("layer", "embedding")
PREFIX_FORMAT = "minilora.prefix"
PREFIX_FORMAT_VERSION = "1"


@dataclass
class PrefixConfig:
    """Prefix-tuning settings, with PEFT's field names where it has them."""

    prefix_type: str = "layer"  # "layer": keys and values in every layer; "embedding": input
    num_virtual_tokens: int = 4  # P, the prefix length (the context shrinks by it)
    prefix_projection: bool = False  # Li & Liang's reparameterisation by an MLP
    encoder_hidden_size: int = 32  # h, the MLP's hidden width (with prefix_projection)

    def __post_init__(self):
        if self.prefix_type not in PREFIX_TYPES:
            raise ValueError(
                f"PrefixConfig: prefix_type={self.prefix_type!r} must be one of {PREFIX_TYPES}"
            )
        check_positive_int("PrefixConfig", "num_virtual_tokens", self.num_virtual_tokens)
        if not isinstance(self.prefix_projection, bool):
            raise ValueError(
                f"PrefixConfig: prefix_projection={self.prefix_projection!r} must be True or False"
            )
        check_positive_int("PrefixConfig", "encoder_hidden_size", self.encoder_hidden_size)

    def to_dict(self) -> dict:
        return asdict(self)


def _width(config: PrefixConfig, n_layer: int, C: int) -> int:
    """Numbers per virtual token: every layer's key and value (L·2·C), or one vector (C)."""
    return n_layer * 2 * C if config.prefix_type == "layer" else C


def prefix_parameter_count(config: PrefixConfig, n_layer: int, n_embd: int) -> int:
    """Trainable parameters that prefix tuning adds, in closed form:
    prefix-layer L·2·P·C, prefix-embedding P·C; with ``prefix_projection`` the (P, C)
    matrix plus the MLP's weights and biases, C·h + h + h·width + width."""
    P, C, h = config.num_virtual_tokens, n_embd, config.encoder_hidden_size
    width = _width(config, n_layer, C)
    if not config.prefix_projection:
        return P * width
    return P * C + (C * h + h) + (h * width + width)


class PrefixEncoder(Module):
    """The prefix's parameters, held by the GPT as ``model.prefix``; ``forward()`` gives the
    prefix (P, width) for all layers at once (width as in :func:`_width`)."""

    def __init__(self, config: PrefixConfig, model: GPT, generator=None):
        cfg = model.config
        C, dtype, device = cfg.n_embd, model.tok_emb.weight.dtype, model.device
        gen = generator or backend.default_generator()
        self.config = config
        self.num_virtual_tokens = P = config.num_virtual_tokens
        self.n_head, self.n_embd = cfg.n_head, C
        width = _width(config, cfg.n_layer, C)
        rows = C if config.prefix_projection else width
        # N(0, 0.02²) as GPT-2's embeddings: the prefix starts small beside the tokens'
        self.embedding = Parameter(gen.normal((P, rows), std=0.02, dtype=dtype, device=device))
        self.transform = None
        if config.prefix_projection:
            h = config.encoder_hidden_size
            kw = {"dtype": dtype, "device": device, "generator": gen}
            self.transform = ModuleList([Linear(C, h, **kw), Linear(h, width, **kw)])

    def forward(self) -> Tensor:
        if self.transform is None:
            return self.embedding  # (P, width)
        first, second = self.transform
        return second(F.tanh(first(self.embedding)))  # (P, C) -> (P, h) -> (P, width)

    def layer_kv(self, layer: int, B: int) -> tuple[Tensor, Tensor]:
        """Layer ``layer``'s prefix keys and values, each (B, nh, P, hs), the same for
        every sequence of the batch (prefix-layer)."""
        P, C, nh = self.num_virtual_tokens, self.n_embd, self.n_head
        prefix = self()  # (P, L·2·C); with the MLP, recomputed per layer (it is small)
        xp = backend.get_array_module(prefix.data)
        every_row = xp.zeros(B, dtype=backend.int64)  # row 0, B times: dL/d(prefix) sums over B

        def heads(t: Tensor) -> Tensor:  # (P, C) -> (B, nh, P, hs)
            return t.reshape(1, P, nh, C // nh).permute(0, 2, 1, 3)[every_row]

        k = prefix[:, 2 * layer * C : (2 * layer + 1) * C]  # (P, C)
        v = prefix[:, (2 * layer + 1) * C : (2 * layer + 2) * C]
        return heads(k), heads(v)

    def virtual_tokens(self, B: int) -> Tensor:
        """The P virtual tokens (B, P, C), the same for every sequence (prefix-embedding)."""
        prefix = self()  # (P, C)
        every_row = backend.get_array_module(prefix.data).zeros(B, dtype=backend.int64)
        return prefix.reshape(1, self.num_virtual_tokens, self.n_embd)[every_row]

    def extra_repr(self) -> str:
        c = self.config
        return f"{c.prefix_type}, num_virtual_tokens={c.num_virtual_tokens}"


class _LayerPrefix:
    """What a PrefixAttention calls for its prefix: ``(B) -> (k, v)``, each
    (B, nh, P, hs). Not a Module, so the parameters are found once, under ``prefix``."""

    def __init__(self, encoder: PrefixEncoder, layer: int):
        self.encoder, self.layer = encoder, layer

    def __call__(self, B: int) -> tuple[Tensor, Tensor]:
        return self.encoder.layer_kv(self.layer, B)


class PrefixAttention(CausalSelfAttention):
    """A block's attention whose queries also see the prefix's P keys and values, put
    before the tokens' own (prefix-layer). Same projections, same parameter names."""

    @classmethod
    def from_attention(cls, attn: CausalSelfAttention, prefix: _LayerPrefix) -> PrefixAttention:
        """Take over ``attn`` (the same projections, no copy) and add its layer's prefix."""
        layer = cls.__new__(cls)
        vars(layer).update(vars(attn))
        layer.prefix = prefix
        return layer

    def attend(self, q: Tensor, k: Tensor, v: Tensor, cache: KVCache | None, layer: int) -> Tensor:
        """q, k, v (B, nh, T, hs) -> (B, nh, T, hs): query i sees the P prefix keys and the
        tokens' keys 0..i. With a ``cache``, the prefix is already in it
        (:meth:`PrefixGPT.kv_cache`), so the plain attention over the cache is the same."""
        if cache is not None:
            return super().attend(q, k, v, cache, layer)
        k_prefix, v_prefix = self.prefix(q.shape[0])  # (B, nh, P, hs) each
        k, v = F.cat([k_prefix, k], axis=2), F.cat([v_prefix, v], axis=2)  # (B, nh, P+T, hs)
        return F.cached_attention(q, k, v)  # T queries, the last T of P + T positions


class PrefixGPT(GPT):
    """A GPT steered by a prefix, held as ``prefix`` (a :class:`PrefixEncoder`): what
    :func:`apply_prefix_tuning` and :func:`load_prefix` turn a GPT into, in place. The
    tokens sit at positions P .. P+T-1, so ``block_size - P`` of them fit."""

    prefix: PrefixEncoder

    @property
    def context_length(self) -> int:
        return self.config.block_size - self.prefix.num_virtual_tokens

    def describe_context(self) -> str:
        P, kept = self.prefix.num_virtual_tokens, self.context_length
        return f"{super().describe_context()}, less the {P} its prefix takes: at most {kept}"

    def embed(self, idx) -> Tensor:
        """The tokens (B, T) at positions P .. P+T-1: (B, T, C); with prefix-embedding,
        the P virtual tokens first, (B, P + T, C)."""
        x = self.embed_tokens(idx, start=self.prefix.num_virtual_tokens)  # (B, T, C)
        if self.prefix.config.prefix_type == "layer":  # the prefix is in the attentions
            return x
        return F.cat([self.prefix.virtual_tokens(x.shape[0]), x], axis=1)  # (B, P + T, C)

    def kv_cache(self, batch_size: int) -> KVCache:
        """A :class:`KVCache` holding the prefix's keys and values already: prefix-layer's
        own, or prefix-embedding's virtual tokens run through the model."""
        cache = super().kv_cache(batch_size)
        with no_grad():
            if self.prefix.config.prefix_type == "layer":
                for i in range(len(self.blocks)):
                    k, v = self.prefix.layer_kv(i, batch_size)  # (B, nh, P, hs) each
                    cache.append(i, k.data, v.data)
            else:
                x = self.prefix.virtual_tokens(batch_size)  # (B, P, C) at positions 0 .. P-1
                for i, block in enumerate(self.blocks):
                    x = block(x, cache, i)
        cache.length += self.prefix.num_virtual_tokens
        return cache

    def forward_cached(self, idx, cache: KVCache):
        """As :meth:`GPT.forward_cached`, refusing a cache without the prefix first (an
        empty ``KVCache(...)`` would run the model without its prefix)."""
        P = self.prefix.num_virtual_tokens
        if cache.length < P:
            raise ValueError(
                f"the cache holds {cache.length} positions but the model's prefix takes {P}: "
                "make the cache with model.kv_cache(batch_size), which puts the prefix first"
            )
        return super().forward_cached(idx, cache)


def _check_model(model, caller: str) -> None:
    if not isinstance(model, GPT):
        raise TypeError(f"{caller}: model must be a GPT, got {type(model).__name__}")


def _check_fits(config: PrefixConfig, model: GPT, caller: str) -> None:
    """A prefix must leave at least one position for the tokens."""
    P, block_size = config.num_virtual_tokens, model.config.block_size
    if P >= block_size:
        raise ValueError(
            f"{caller}: num_virtual_tokens={P} leaves no position for tokens: the prefix takes "
            f"P positions of block_size={block_size}, so P must be at most {block_size - 1}"
        )


def _attach(model: GPT, encoder: PrefixEncoder) -> list[Parameter]:
    """Freeze the base, make the model a PrefixGPT holding ``encoder`` (and, prefix-layer,
    its attentions PrefixAttentions)."""
    model.requires_grad_(False)
    # in place, as the API promises: the caller's GPT object gains PrefixGPT's methods and
    # keeps every module and parameter (LoRA swaps its layers; the model itself cannot be)
    model.__class__ = PrefixGPT
    model.prefix = encoder
    if encoder.config.prefix_type == "layer":
        for i, block in enumerate(model.blocks):
            block.attn = PrefixAttention.from_attention(block.attn, _LayerPrefix(encoder, i))
    return encoder.requires_grad_(True).parameters()


def apply_prefix_tuning(model: GPT, config: PrefixConfig, generator=None) -> list[Parameter]:
    """Add a prefix to ``model`` (in place) and freeze everything else; returns the
    trainable parameters added, :func:`prefix_parameter_count` of them. The model then
    accepts at most ``model.context_length = block_size - P`` tokens."""
    _check_model(model, "apply_prefix_tuning")
    if not isinstance(config, PrefixConfig):
        raise TypeError(f"config must be a PrefixConfig, got {type(config).__name__}")
    if isinstance(model, PrefixGPT):
        raise ValueError("apply_prefix_tuning: the model already has a prefix")
    _check_fits(config, model, "apply_prefix_tuning")
    return _attach(model, PrefixEncoder(config, model, generator))


def collapse_prefix(model: GPT) -> None:
    """Replace a reparameterised prefix's MLP by its output, the plain prefix the model
    computes with (the logits do not change); the config's ``prefix_projection`` becomes
    False. For inference and smaller files (PEFT's ``PrefixEncoder`` in inference mode
    likewise has no MLP); the collapsed prefix trains as a plain one."""
    _check_model(model, "collapse_prefix")
    encoder = model.prefix if isinstance(model, PrefixGPT) else None
    if encoder is None or encoder.transform is None:
        raise ValueError("collapse_prefix: the model has no prefix with prefix_projection=True")
    with no_grad():
        plain = encoder().data.copy()  # (P, width)
    encoder.embedding = Parameter(plain, requires_grad=encoder.embedding.requires_grad)
    encoder.transform = None
    encoder.config = PrefixConfig(**{**encoder.config.to_dict(), "prefix_projection": False})


def save_prefix(model: GPT, path) -> None:
    """Write the prefix's parameters (``prefix.embedding``, ...) and its config to one
    ``.safetensors`` file, atomically."""
    _check_model(model, "save_prefix")
    if not isinstance(model, PrefixGPT):
        raise ValueError("save_prefix: the model has no prefix (apply_prefix_tuning first)")
    path = check_destination(Path(path), "save_prefix")
    tensors = {
        name: backend.to_numpy(p.data).copy()
        for name, p in model.named_parameters()
        if name.startswith("prefix.")
    }
    metadata = {
        "format": PREFIX_FORMAT,
        "format_version": PREFIX_FORMAT_VERSION,
        "config": json.dumps(model.prefix.config.to_dict(), sort_keys=True),
    }
    atomic_write([(path, serialize(tensors, metadata))])


def load_prefix(model: GPT, path) -> PrefixConfig:
    """Read a file written by :func:`save_prefix` into ``model``: onto a model without a
    prefix (one is added, the base frozen, as :func:`apply_prefix_tuning`), or into one
    with a prefix of the same config. Everything is checked before the model is changed:
    a wrong format, config or shape raises ``ValueError`` and leaves the model untouched."""
    _check_model(model, "load_prefix")
    path = Path(path)
    tensors, metadata = read_safetensors(path, "load_prefix")
    config = _read_config(path, metadata)
    _check_fits(config, model, f"load_prefix: {path}")
    has_prefix = isinstance(model, PrefixGPT)
    if has_prefix and model.prefix.config != config:
        raise ValueError(
            f"load_prefix: {path} holds a prefix with {config}, but the model has one with "
            f"{model.prefix.config}"
        )
    outside = sorted(name for name in tensors if not name.startswith("prefix."))
    if outside:
        raise ValueError(f"load_prefix: {path} holds tensors outside the prefix: {outside}")
    encoder = model.prefix if has_prefix else PrefixEncoder(config, model, backend.Generator(0))
    state = {name.removeprefix("prefix."): array for name, array in tensors.items()}
    try:
        encoder.load_state_dict(state)  # checks every key and shape before copying any
    except ValueError as e:
        raise ValueError(f"load_prefix: {path} does not fit this model: {e}") from None
    if not has_prefix:
        _attach(model, encoder)
    return config


def _read_config(path: Path, metadata: dict) -> PrefixConfig:
    if metadata.get("format") != PREFIX_FORMAT:
        raise ValueError(
            f"load_prefix: {path} is not a prefix file (format {metadata.get('format')!r}, "
            f"expected {PREFIX_FORMAT!r}; save_prefix writes one)"
        )
    if metadata.get("format_version") != PREFIX_FORMAT_VERSION:
        raise ValueError(
            f"load_prefix: {path} has format_version {metadata.get('format_version')!r}, "
            f"expected {PREFIX_FORMAT_VERSION!r}"
        )
    try:
        values = json.loads(metadata.get("config", ""))
    except json.JSONDecodeError as e:
        raise ValueError(f"load_prefix: {path} has a config that is not JSON: {e}") from None
    names = {f.name for f in fields(PrefixConfig)}
    if not isinstance(values, dict) or set(values) != names:
        raise ValueError(
            f"load_prefix: {path} has config {values!r}, expected the keys {sorted(names)}"
        )
    try:
        return PrefixConfig(**values)
    except ValueError as e:
        raise ValueError(f"load_prefix: {path}: {e}") from None
