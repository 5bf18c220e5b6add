"""What several test files share: the tiny model configurations, a model builder, snapshots.

Two configurations, chosen for what the tests need:

* ``TINY``: the smallest GPT (one layer, one head, width 4, 7 token ids, 4 positions), for
  properties and whole-model gradient checks, which cost two forward passes per element;
* ``TINY_2x2``: two layers and two heads (width 8, 11 token ids, 6 positions), for what
  only shows with more than one layer or head: checkpoints, devices, PyTorch parity, the
  accounting of what each layer saves.
"""

from __future__ import annotations

import json
import struct

import numpy as np

import minilora as ml
from minilora.lora import lora_layers

TINY = ml.GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=1, n_embd=4)
TINY_2x2 = ml.GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8)


def make_gpt(
    config: ml.GPTConfig = TINY, seed: int = 0, dtype=np.float32, device: str = "cpu", **changes
) -> ml.GPT:
    """A GPT built after ``manual_seed(seed)``; ``changes`` replace fields of ``config``."""
    if changes:
        config = ml.GPTConfig(**{**config.to_dict(), **changes})
    ml.manual_seed(seed)
    return ml.GPT(config, dtype=dtype, device=device)


def randomize_weights(model: ml.Module, seed: int, scale: float = 0.5) -> ml.Module:
    """O(1) weights instead of GPT-2's 0.02 init (layer-norm weights around 1), so every
    layer, and every adapter, changes the logits by a visible amount and every gradient is
    far above gradcheck's atol (with 0.02 weights, attention gradients are ~1e-6 and a
    wrong backward would pass)."""
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        is_ln_weight = name.endswith(".weight") and name.split(".")[-2].startswith("ln")
        p.data[...] = float(is_ln_weight) + scale * rng.standard_normal(p.shape)
    return model


def snapshot(model: ml.Module) -> dict:
    """Everything a refused operation must leave as it was, bitwise: each parameter's dtype,
    shape, ``requires_grad`` and bytes, and each LoRA layer's rank and merged flag."""
    return {
        "parameters": {
            name: (p.data.dtype, p.shape, p.requires_grad, ml.backend.to_numpy(p.data).tobytes())
            for name, p in model.named_parameters()
        },
        "lora": [(path, layer.r, layer.merged) for path, layer in lora_layers(model)],
    }


def adapted(config, dtype=np.float64, seed: int = 0) -> ml.Module:
    """TINY_2x2 with random weights and ``apply_lora(config)`` on top."""
    model = randomize_weights(make_gpt(TINY_2x2, seed, dtype), seed)
    ml.apply_lora(model, config)
    return model


def randomize_trainable(model: ml.Module, seed: int, std: float) -> None:
    """Every trainable parameter drawn from N(0, std²): an adapter as after training."""
    rng = np.random.default_rng(seed)
    for _, p in model.named_parameters():
        if p.requires_grad:
            p.data[...] = rng.normal(0, std, p.shape)


def logits_of(model: ml.Module, idx) -> np.ndarray:
    """The model's logits on ``idx`` in eval mode, without a graph, as a host array."""
    model.eval()
    with ml.no_grad():
        return ml.backend.to_numpy(model(idx)[0].data)


def split(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file's bytes as (header dict, data section)."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict, body: bytes) -> bytes:
    """safetensors bytes from a header dict and a data section (the header padded to 8)."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body
