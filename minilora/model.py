"""A tiny GPT: a pre-LayerNorm decoder-only Transformer with learned positions.

The structure and names follow nanoGPT and the Hugging Face models PEFT targets, so LoRA
targets are named as in PEFT (``target_modules=["q_proj", "v_proj"]``)::

    tok_emb, pos_emb                          token and position embeddings
    blocks.{i}.ln1                            LayerNorm before attention
    blocks.{i}.attn.{q_proj,k_proj,v_proj}    (C -> C) projections
    blocks.{i}.attn.o_proj                    (C -> C) output projection
    blocks.{i}.ln2                            LayerNorm before the MLP
    blocks.{i}.mlp.fc1, .fc2                  (C -> 4C -> C) with GELU between
    ln_f, lm_head                             final LayerNorm, (C -> vocab) without bias

Shapes: B = batch, T = time (sequence length), C = n_embd, nh = n_head, hs = C // nh.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

from minilora import backend
from minilora import functional as F
from minilora.autograd import Tensor, is_grad_enabled, no_grad
from minilora.nn import Dropout, Embedding, LayerNorm, Linear, Module, ModuleList


@dataclass
class GPTConfig:
    vocab_size: int = 16  # number of token ids
    block_size: int = 32  # longest sequence the model accepts (positions learned)
    n_layer: int = 2  # Transformer blocks
    n_head: int = 2  # attention heads per block
    n_embd: int = 32  # width C of the residual stream; must divide by n_head
    dropout: float = 0.0  # on embeddings and residual branches, training only
    bias: bool = True  # biases in Linear layers and LayerNorms
    layer_norm_epsilon: float = 1e-5  # the eps of every LayerNorm (GPT-2's name)
    tie_word_embeddings: bool = False  # lm_head.weight *is* tok_emb.weight (one Parameter)

    def __post_init__(self):
        check_sizes("GPTConfig", self)
        eps = self.layer_norm_epsilon
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < math.inf:
            raise ValueError(
                f"GPTConfig: layer_norm_epsilon={eps!r} must be a positive finite number"
            )
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(
                f"GPTConfig: tie_word_embeddings={self.tie_word_embeddings!r} must be a bool"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def check_positive_int(owner: str, name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}: {name}={value!r} must be a positive integer")


def check_sizes(owner: str, shape) -> None:
    """Validate the sizes of a GPT shape (a GPTConfig, or accounting's ModelShape)."""
    for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
        check_positive_int(owner, name, getattr(shape, name))
    if shape.n_embd % shape.n_head:
        raise ValueError(
            f"{owner}: n_embd={shape.n_embd} must be divisible by n_head={shape.n_head}"
        )
    F.check_probability(owner, "dropout", shape.dropout)


class KVCache:
    """The keys and values of every position a model has seen, for incremental decoding.

    ``GPT.generate`` feeds the prompt once, then one new token per step: each step needs the
    keys and values of all earlier positions, which do not change (a position only attends
    to positions before it), so they are kept here instead of recomputed. Per layer,
    ``keys[i]`` and ``values[i]`` are (B, nh, block_size, hs), filled up to ``length``:
    2·L·B·block_size·C elements in all (``accounting.kv_cache_bytes``). Why reusing them
    gives the same tokens: docs/math.md, "Incremental decoding with a KV cache".
    """

    def __init__(self, config: GPTConfig, batch_size: int, *, dtype, device: str = "cpu"):
        check_positive_int("KVCache", "batch_size", batch_size)
        nh, hs = config.n_head, config.n_embd // config.n_head
        shape = (batch_size, nh, config.block_size, hs)
        self.keys = [backend.zeros(shape, dtype, device) for _ in range(config.n_layer)]
        self.values = [backend.zeros(shape, dtype, device) for _ in range(config.n_layer)]
        self.capacity = config.block_size
        self.length = 0  # positions stored (the same in every layer after a forward)

    def append(self, layer: int, k, v) -> tuple:
        """Store the new positions' k, v (B, nh, Tn, hs) after the ``length`` stored ones;
        returns this layer's keys and values of all positions so far, (B, nh, length+Tn, hs).
        ``length`` itself moves on once every layer has appended (``GPT.forward_cached``)."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class CausalSelfAttention(Module):
    def __init__(self, config: GPTConfig, dtype, device):
        C, bias = config.n_embd, config.bias
        self.n_head = config.n_head
        self.q_proj = Linear(C, C, bias, dtype=dtype, device=device)
        self.k_proj = Linear(C, C, bias, dtype=dtype, device=device)
        self.v_proj = Linear(C, C, bias, dtype=dtype, device=device)
        # GPT-2 scales the init of projections into the residual stream by 1/sqrt(2 n_layer)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        self.o_proj = Linear(C, C, bias, init_std=residual_std, dtype=dtype, device=device)
        self.resid_dropout = Dropout(config.dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        """x (B, T, C); with a ``cache``, x holds only the T positions after the cached ones
        (this is layer ``layer``), and their keys and values join the cache."""
        B, T, C = x.shape
        nh = self.n_head

        def heads(t: Tensor) -> Tensor:  # (B, T, C) -> (B, nh, T, hs)
            return t.reshape(B, T, nh, C // nh).permute(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        y = self.attend(q, k, v, cache, layer)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # heads side by side again
        return self.resid_dropout(self.o_proj(y))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, cache: KVCache | None, layer: int) -> Tensor:
        """softmax(q·kᵀ/√hs)·v over the keys each query may see: q, k, v (B, nh, T, hs) ->
        (B, nh, T, hs). Query i sees keys 0..i, and with a ``cache`` every cached position
        before them too (the new keys and values join the cache first). A subclass that
        gives the queries other keys to see overrides this (minilora/relatives/)."""
        if cache is None:
            return F.causal_self_attention(q, k, v)
        k_all, v_all = cache.append(layer, k.data, v.data)  # (B, nh, length + T, hs)
        if cache.length == 0:  # nothing earlier: plain causal attention
            return F.causal_self_attention(q, k, v)
        return F.cached_attention(q, Tensor(k_all), Tensor(v_all))  # new queries, all keys


class MLP(Module):
    def __init__(self, config: GPTConfig, dtype, device):
        C, bias = config.n_embd, config.bias
        self.fc1 = Linear(C, 4 * C, bias, dtype=dtype, device=device)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        self.fc2 = Linear(4 * C, C, bias, init_std=residual_std, dtype=dtype, device=device)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(Module):
    def __init__(self, config: GPTConfig, dtype, device):
        C, eps = config.n_embd, config.layer_norm_epsilon
        self.ln1 = LayerNorm(C, eps, bias=config.bias, dtype=dtype, device=device)
        self.attn = CausalSelfAttention(config, dtype, device)
        self.ln2 = LayerNorm(C, eps, bias=config.bias, dtype=dtype, device=device)
        self.mlp = MLP(config, dtype, device)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        x = x + self.attn(self.ln1(x), cache, layer)  # (B, T, C)
        return x + self.mlp(self.ln2(x))


class GPT(Module):
    """``GPT(config)(idx, targets=None) -> (logits, loss)``.

    ``idx``: integer token ids (B, T) with T <= block_size. ``logits``: (B, T, vocab_size).
    ``loss``: mean cross-entropy against ``targets`` (B, T) (positions with target -100
    are ignored), or None without targets.
    """

    def __init__(self, config: GPTConfig, *, dtype=backend.DEFAULT_DTYPE, device: str = "cpu"):
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        C = config.n_embd
        self.tok_emb = Embedding(config.vocab_size, C, dtype=dtype, device=device)
        self.pos_emb = Embedding(config.block_size, C, dtype=dtype, device=device)
        self.drop = Dropout(config.dropout)
        self.blocks = ModuleList([Block(config, dtype, device) for _ in range(config.n_layer)])
        eps = config.layer_norm_epsilon
        self.ln_f = LayerNorm(C, eps, bias=config.bias, dtype=dtype, device=device)
        self.lm_head = Linear(C, config.vocab_size, bias=False, dtype=dtype, device=device)
        if config.tie_word_embeddings:  # GPT-2: the head reuses the embedding, (vocab, C)
            # one Parameter in two places: both uses add into its one .grad, and
            # named_parameters lists it once, as tok_emb.weight
            self.lm_head.weight = self.tok_emb.weight

    @property
    def device(self) -> str:
        return self.tok_emb.weight.device

    @property
    def context_length(self) -> int:
        """The most tokens a forward accepts: block_size (a subclass whose :meth:`embed`
        puts learned positions before the tokens accepts fewer, minilora/relatives/)."""
        return self.config.block_size

    def describe_context(self) -> str:
        """Why the context is ``context_length`` tokens long, for the error a longer
        input gets."""
        return f"block_size is {self.config.block_size}"

    def _device_ids(self, name: str, ids):
        """Token ids as an integer (batch, time) array on the model's device. Host ids (a
        list, a NumPy array) are moved there; ids on another device are refused (they would
        be copied through the host)."""
        data = ids.data if isinstance(ids, Tensor) else backend.array(ids)  # stays on its device
        where = backend.device_of(data)
        if where not in ("cpu", self.device):
            raise ValueError(
                f"{name} is on device {where!r} but the model is on {self.device!r}; move "
                f"one of them with .to({self.device!r}) or .to({where!r}) first"
            )
        if not backend.is_integer(data):
            raise ValueError(f"{name} must hold integer token ids, got dtype {data.dtype}")
        if data.ndim != 2:
            raise ValueError(f"{name} must have shape (batch, time), got {tuple(data.shape)}")
        T = data.shape[1]
        if T > self.context_length:
            raise ValueError(
                f"{name} has {T} positions but {self.describe_context()}; crop the sequence "
                "or use a model with a larger block_size"
            )
        return backend.to_device(data, self.device)

    def _check_id_ranges(self, idx, targets) -> None:
        """Every id in [0, vocab_size) (targets may also be -100, ignored): the one range
        check of a forward pass, with a single read from the device for both arrays."""
        if idx.size == 0:
            return  # nothing to check (and min/max of nothing is undefined)
        xp = backend.get_array_module(idx)
        ranges = [idx.min(), idx.max()]
        if targets is not None:
            kept = xp.where(targets == -100, 0, targets)  # ignored positions count as 0
            ranges += [kept.min(), kept.max()]
        lo_hi = xp.stack(ranges).tolist()  # one read from the device for all four
        V = self.config.vocab_size
        for name, lo, hi in zip(("idx", "targets"), lo_hi[0::2], lo_hi[1::2], strict=False):
            if lo < 0 or hi >= V:
                bad = lo if lo < 0 else hi
                raise ValueError(f"{name} contains id {bad}, outside the vocabulary [0, {V})")

    def forward(self, idx, targets=None) -> tuple[Tensor, Tensor | None]:
        idx = self._device_ids("idx", idx)
        if targets is not None:
            targets = self._device_ids("targets", targets)
            if targets.shape != idx.shape:
                raise ValueError(
                    f"targets have shape {tuple(targets.shape)}, expected {tuple(idx.shape)} "
                    "(the shape of idx)"
                )
        self._check_id_ranges(idx, targets)
        T = idx.shape[1]
        x = self.drop(self.embed(idx))  # (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        if x.shape[1] > T:  # embed put learned inputs before the tokens: keep the tokens'
            x = x[:, -T:]
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab_size)
        loss = None if targets is None else F.softmax_cross_entropy(logits, targets)
        return logits, loss

    def embed_tokens(self, idx, start: int = 0) -> Tensor:
        """Token plus position embeddings of ids ``idx`` (B, T) at positions start ..
        start+T-1: (B, T, C)."""
        positions = backend.arange(idx.shape[1], dtype=backend.int64, device=self.device)
        return self.tok_emb(idx) + self.pos_emb(positions + start)  # (B, T, C) + (T, C)

    def embed(self, idx) -> Tensor:
        """The blocks' input in a forward over ids ``idx`` (B, T): the tokens at positions
        0 .. T-1, (B, T, C). A subclass that puts learned inputs or positions before the
        tokens overrides this (minilora/relatives/); the forward keeps the last T outputs."""
        return self.embed_tokens(idx)

    def kv_cache(self, batch_size: int) -> KVCache:
        """An empty :class:`KVCache` for ``batch_size`` sequences, on the model's device (a
        subclass whose :meth:`embed` puts positions before the tokens puts them here too)."""
        return KVCache(self.config, batch_size, dtype=self.tok_emb.weight.dtype, device=self.device)

    def forward_cached(self, idx, cache: KVCache):
        """Logits (B, Tn, vocab_size) array for ``idx`` (B, Tn): the Tn positions that follow
        the ``cache.length`` ones already in ``cache``, whose keys and values are reused;
        the new positions' keys and values are added. Inference only (under ``no_grad``):
        no gradient flows into cached keys. The logits equal the last Tn rows of
        ``self(whole sequence)`` (docs/math.md, "Incremental decoding with a KV cache")."""
        if is_grad_enabled():
            raise RuntimeError(
                "forward_cached is for inference: call it under no_grad() (a gradient "
                "would not reach the positions whose keys and values are cached)"
            )
        idx = self._device_ids("idx", idx)
        self._check_id_ranges(idx, None)
        B, T = idx.shape
        if B != cache.keys[0].shape[0]:
            raise ValueError(f"idx has batch {B} but the cache holds {cache.keys[0].shape[0]}")
        if cache.length + T > cache.capacity:
            raise ValueError(
                f"the cache holds {cache.length} positions and idx adds {T}, more than "
                f"block_size={cache.capacity}"
            )
        return self._decode(idx, cache)

    def _decode(self, idx, cache: KVCache):
        """``forward_cached`` on ids already checked (generate's own tokens): the work alone."""
        x = self.drop(self.embed_tokens(idx, cache.length))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        cache.length += idx.shape[1]
        return self.lm_head(self.ln_f(x)).data  # (B, T, vocab_size)

    def generate(
        self,
        idx,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: backend.Generator | None = None,
        use_cache: bool = True,
    ):
        """Append ``max_new_tokens`` sampled ids to ``idx`` (B, T); returns (B, T + new).

        ``temperature=0`` picks the most likely token (greedy); ``top_k`` samples only among
        the k most likely. Runs without a graph, in whatever mode the model is in.

        The prompt runs once and each new token then costs one position's forward, with
        the earlier positions' keys and values reused from a :class:`KVCache` (``use_cache``;
        the tokens are those of recomputing the whole window every step, which
        ``use_cache=False`` does). Once the sequence outgrows ``block_size``, the window is
        cropped to the last ``block_size`` tokens: every token then moves to a new
        position, no cached key is valid any more, and each further step recomputes the
        cropped window.
        """
        if temperature < 0:
            raise ValueError(f"temperature={temperature!r} must be >= 0 (0 means greedy)")
        if top_k is not None and not 1 <= top_k <= self.config.vocab_size:
            raise ValueError(f"top_k={top_k!r} must be in [1, vocab_size={self.config.vocab_size}]")
        idx = self._device_ids("idx", idx)
        self._check_id_ranges(idx, None)
        xp = backend.get_array_module(idx)
        gen = generator or backend.default_generator()
        context = self.context_length
        cache = self.kv_cache(idx.shape[0]) if use_cache else None
        new = idx  # the positions the cache has not seen yet
        with no_grad():
            for _ in range(max_new_tokens):
                if cache is not None and cache.length + new.shape[1] <= cache.capacity:
                    logits = self._decode(new, cache)[:, -1, :]  # (B, vocab), ids checked
                else:  # past block_size: positions shift, so recompute the cropped window
                    cache = None
                    logits = self(idx[:, -context:])[0].data[:, -1, :]
                nxt = self._next_token(logits, temperature, top_k, gen)[:, None]
                idx = xp.concatenate([idx, nxt.astype(idx.dtype)], axis=1)
                new = idx[:, -1:]
        return idx

    def _next_token(self, logits, temperature: float, top_k: int | None, gen):
        """The next id per row of ``logits`` (B, vocab): the most likely one, or a sample."""
        xp = backend.get_array_module(logits)
        if temperature == 0:
            return logits.argmax(axis=-1)
        # (logits - max) / T, not logits / T: the same softmax, but every value is <= 0, so a
        # tiny T sends the others to -inf (probability 0: the greedy choice) where logits / T
        # overflowed to inf - inf = NaN. float16 samples in float32, and a T its dtype cannot
        # hold (1e-320 is 0 in float32) is its smallest positive number (docs/math.md,
        # "Sampling at a small temperature").
        logits = F.float32_if_half(logits)  # (B, vocab)
        smallest = float(xp.finfo(logits.dtype).smallest_subnormal)
        with warnings.catch_warnings():  # an overflow to -inf is meant: probability 0
            warnings.simplefilter("ignore", RuntimeWarning)
            logits = (logits - logits.max(axis=-1, keepdims=True)) / max(temperature, smallest)
        if top_k is not None:
            kth = xp.sort(logits, axis=-1)[:, -top_k][:, None]
            logits = xp.where(logits < kth, -xp.inf, logits)
        probs = F.softmax(Tensor(logits)).data  # (B, vocab)
        cdf = xp.cumsum(probs, axis=-1)
        u = gen.random((probs.shape[0], 1), dtype=probs.dtype, device=self.device)
        # inverse-CDF sampling: the first id whose cumulative probability exceeds u; u is
        # scaled by the total so that rounding in cdf never overshoots it
        nxt = (cdf <= u * cdf[:, -1:]).sum(axis=-1)
        return xp.minimum(nxt, probs.shape[-1] - 1)
