"""minilora's GPT, ported to PyTorch: the worked example of docs/porting.md.

The module tree and parameter names are minilora's (``blocks.0.attn.q_proj.weight``, ...),
so a minilora state dict loads by name (:func:`load_minilora_state`) and PEFT targets
``q_proj``/``v_proj`` exactly as it would on a Hugging Face model::

    from examples.torch_gpt import TorchGPT, load_minilora_state

    port = TorchGPT(model.config)                          # model: a minilora GPT
    load_minilora_state(port, model.state_dict())
    peft_model = peft.get_peft_model(port, peft.LoraConfig(r=4, lora_alpha=8,
                                     target_modules=["q_proj", "v_proj"]))

Every line mirrors minilora/model.py: pre-LayerNorm blocks, GELU with the tanh
approximation, causal attention computed explicitly (scores, mask, softmax, values) rather
than with ``scaled_dot_product_attention``, so the two compute the same numbers in the same
order. ``config`` is any object with minilora's ``GPTConfig`` fields (a ``GPTConfig`` works).
Shapes: B batch, T time, C = n_embd, nh = n_head, hs = C // nh.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        C, bias = config.n_embd, config.bias
        self.n_head = config.n_head
        self.q_proj = nn.Linear(C, C, bias=bias)
        self.k_proj = nn.Linear(C, C, bias=bias)
        self.v_proj = nn.Linear(C, C, bias=bias)
        self.o_proj = nn.Linear(C, C, bias=bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        mask = torch.triu(torch.ones(config.block_size, config.block_size, dtype=torch.bool), 1)
        self.register_buffer("future", mask, persistent=False)  # True above the diagonal

    def forward(self, x):
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head

        def heads(t):  # (B, T, C) -> (B, nh, T, hs)
            return t.view(B, T, nh, hs).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, T)
        scores = scores.masked_fill(self.future[:T, :T], float("-inf"))
        y = F.softmax(scores, dim=-1) @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # heads side by side again
        return self.resid_dropout(self.o_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        C, bias = config.n_embd, config.bias
        self.fc1 = nn.Linear(C, 4 * C, bias=bias)
        self.fc2 = nn.Linear(4 * C, C, bias=bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):  # (B, T, C) -> (B, T, 4C) -> (B, T, C)
        return self.dropout(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))  # pre-LN: normalise the branch input, not the sum
        return x + self.mlp(self.ln2(x))


class TorchGPT(nn.Module):
    """``TorchGPT(config)(idx, targets=None) -> (logits, loss)``, as minilora's ``GPT``.

    Parameters are created in float32 (``.double()`` for float64) with PyTorch's default
    init; load real weights with :func:`load_minilora_state`.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        C = config.n_embd
        self.tok_emb = nn.Embedding(config.vocab_size, C)
        self.pos_emb = nn.Embedding(config.block_size, C)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(C, eps=1e-5, bias=config.bias)
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"idx has {T} positions but block_size is {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C) + (T, C)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab_size)
        loss = None
        if targets is not None:  # mean over targets that are not -100, as minilora
            V = logits.shape[-1]
            loss = F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-100)
        return logits, loss


# PEFT's per-adapter parts of a LoRA layer, each ``<part>.<adapter>.weight``
LORA_PARTS = ("lora_A", "lora_B", "lora_magnitude_vector")


def minilora_name(torch_name: str) -> str:
    """The minilora parameter path of a PyTorch parameter, plain or wrapped by PEFT:
    ``base_model.model.<path>.base_layer.weight`` -> ``<path>.weight`` and
    ``base_model.model.<path>.lora_A.<adapter>.weight`` -> ``<path>.lora_A`` (likewise
    ``lora_B`` and DoRA's ``lora_magnitude_vector``) and
    ``base_model.model.<path>.lora_embedding_A.<adapter>`` -> ``<path>.lora_embedding_A``."""
    name = torch_name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    parts = name.split(".")
    if len(parts) >= 3 and parts[-3] in LORA_PARTS and parts[-1] == "weight":
        return ".".join(parts[:-2])  # drop the adapter name and ".weight"
    if len(parts) >= 2 and parts[-2] in ("lora_embedding_A", "lora_embedding_B"):
        return ".".join(parts[:-1])  # an embedding's adapter: Parameters, no ".weight"
    return name


def load_minilora_state(torch_model: nn.Module, state: dict) -> list[str]:
    """Copy minilora arrays (``GPT.state_dict()``: path -> NumPy array) into a
    ``TorchGPT``, plain or wrapped by PEFT, by name; cast to each parameter's dtype.

    Strict: every PyTorch parameter must get an array and every array must find a
    parameter of the same shape; otherwise ``ValueError`` lists every problem and nothing
    is copied. Returns the PyTorch names that were loaded.
    """
    params = dict(torch_model.named_parameters())
    by_minilora = {minilora_name(n): n for n in params}
    problems = [f"unexpected key {k!r}" for k in sorted(set(state) - set(by_minilora))]
    problems += [
        f"missing key {k!r} (PyTorch name {by_minilora[k]!r})"
        for k in sorted(set(by_minilora) - set(state))
    ]
    for k in sorted(set(state) & set(by_minilora)):
        want, got = tuple(params[by_minilora[k]].shape), tuple(state[k].shape)
        if want != got:
            problems.append(f"{k} has shape {got}, expected {want}")
    if problems:
        raise ValueError("load_minilora_state refused the state:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for k, array in state.items():
            p = params[by_minilora[k]]
            p.copy_(torch.as_tensor(array).to(p.dtype))
    return [by_minilora[k] for k in state]


# --------------------------------------------------------------------------------------
# Adapter layers (Houlsby et al. 2019, Lin et al. 2020), as minilora/relatives/adapters.py
# --------------------------------------------------------------------------------------

ADAPTER_SITES = {"houlsby": ("attn.o_proj", "mlp.fc2"), "lin": ("mlp.fc2",)}


class AdapterLinear(nn.Module):
    """A frozen ``nn.Linear`` followed by a bottleneck adapter with a residual connection,
    ``y = h + up(act(down(h)))`` with ``h = x Wᵀ + b``: minilora's ``AdapterLinear``, with
    the same parameter names (``weight``, ``bias``, ``adapter_down.*``, ``adapter_up.*``)."""

    def __init__(self, linear: nn.Linear, bottleneck: int, nonlinearity: str = "gelu"):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias  # the wrapped layer's own
        C = linear.out_features
        factory = {"dtype": linear.weight.dtype, "device": linear.weight.device}
        self.adapter_down = nn.Linear(C, bottleneck, **factory)  # (m, C)
        self.adapter_up = nn.Linear(bottleneck, C, **factory)  # (C, m), zero: identity at init
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.nonlinearity = nonlinearity

    def forward(self, x):
        h = F.linear(x, self.weight, self.bias)  # (..., C): the frozen sublayer output
        z = self.adapter_down(h)  # (..., m)
        a = F.gelu(z, approximate="tanh") if self.nonlinearity == "gelu" else F.relu(z)
        return h + self.adapter_up(a)  # (..., C)


def apply_adapters(
    model: nn.Module,
    adapter_type: str = "houlsby",
    bottleneck: int = 8,
    nonlinearity: str = "gelu",
    train_layer_norms: bool = True,
) -> list[str]:
    """Wrap the sublayers ``adapter_type`` names in :class:`AdapterLinear` and freeze all
    but the adapters (and the LayerNorms with ``train_layer_norms``), as
    ``minilora.relatives.adapters.apply_adapters``; returns the adapted paths."""
    suffixes = ADAPTER_SITES[adapter_type]
    paths = [p for p, _ in model.named_modules() if p.endswith(tuple("." + s for s in suffixes))]
    for path in paths:
        parent, _, name = path.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, name, AdapterLinear(getattr(owner, name), bottleneck, nonlinearity))
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, AdapterLinear):
            m.adapter_down.requires_grad_(True)
            m.adapter_up.requires_grad_(True)
        elif isinstance(m, nn.LayerNorm) and train_layer_norms:
            m.requires_grad_(True)
    return paths


# ======================================================================================
# Prefix tuning (minilora/relatives/prefix.py): the same parameters, names and positions
# ======================================================================================


class TorchPrefixEncoder(nn.Module):
    """minilora's ``PrefixEncoder``: ``embedding`` (P, width), or (P, C) followed by the MLP
    ``transform`` (C -> h -> width, tanh between). width = L·2·C for a prefix-layer (per
    layer its keys, then its values), C for a prefix-embedding."""

    def __init__(self, config, prefix_config):
        super().__init__()
        C, P = config.n_embd, prefix_config.num_virtual_tokens
        layer = prefix_config.prefix_type == "layer"
        width = config.n_layer * 2 * C if layer else C
        rows = C if prefix_config.prefix_projection else width
        self.embedding = nn.Parameter(torch.zeros(P, rows))
        self.transform = None
        if prefix_config.prefix_projection:
            h = prefix_config.encoder_hidden_size
            self.transform = nn.ModuleList([nn.Linear(C, h), nn.Linear(h, width)])

    def forward(self):  # (P, width)
        if self.transform is None:
            return self.embedding
        return self.transform[1](torch.tanh(self.transform[0](self.embedding)))


def prefix_attention(attn, x, k_prefix, v_prefix):
    """``attn`` (the port's CausalSelfAttention) over [prefix; tokens]: x (B, T, C); the
    prefix's keys and values (P, C). Query i sees the P prefix keys and tokens 0..i."""
    B, T, C = x.shape
    nh, hs, P = attn.n_head, C // attn.n_head, k_prefix.shape[0]

    def heads(t):  # (B, n, C) -> (B, nh, n, hs)
        return t.view(t.shape[0], -1, nh, hs).transpose(1, 2)

    q = heads(attn.q_proj(x))
    k = torch.cat([heads(k_prefix[None]).expand(B, -1, -1, -1), heads(attn.k_proj(x))], dim=2)
    v = torch.cat([heads(v_prefix[None]).expand(B, -1, -1, -1), heads(attn.v_proj(x))], dim=2)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, P + T)
    future = torch.ones(T, P + T, dtype=torch.bool, device=x.device).triu(P + 1)  # key > P + i
    y = F.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v  # (B, nh, T, hs)
    return attn.resid_dropout(attn.o_proj(y.transpose(1, 2).reshape(B, T, C)))


class TorchPrefixGPT(TorchGPT):
    """``TorchGPT`` with minilora's prefix (``prefix_config``: any object with
    ``PrefixConfig``'s fields). The prefix takes positions 0..P-1, the tokens P..P+T-1,
    so at most block_size - P tokens; the virtual tokens' logits are dropped. Freezing
    is the caller's (``requires_grad_``), as with PEFT."""

    def __init__(self, config, prefix_config):
        super().__init__(config)
        self.prefix_type = prefix_config.prefix_type
        self.prefix = TorchPrefixEncoder(config, prefix_config)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        P, C = self.prefix.embedding.shape[0], self.config.n_embd
        if T > self.config.block_size - P:
            raise ValueError(f"idx has {T} positions, at most {self.config.block_size - P}")
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(P, P + T, device=idx.device))
        prefix = self.prefix()  # (P, width)
        if self.prefix_type == "embedding":  # (B, P + T, C)
            x = torch.cat([prefix[None].expand(B, -1, -1), x], dim=1)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            if self.prefix_type == "layer":
                k, v = (
                    prefix[:, 2 * i * C : (2 * i + 1) * C],
                    prefix[:, (2 * i + 1) * C : (2 * i + 2) * C],
                )
                x = x + prefix_attention(block.attn, block.ln1(x), k, v)
            else:
                x = x + block.attn(block.ln1(x))
            x = x + block.mlp(block.ln2(x))
        logits = self.lm_head(self.ln_f(x[:, -T:]))  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            V = logits.shape[-1]
            loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100)
        return logits, loss
