"""Peak memory of ``load_model`` on a GPT-2-small-shaped folder, against the weights' size.

A Hugging Face GPT-2 folder (``config.json`` and ``model.safetensors``, keys as
``save_pretrained`` writes them) of GPT-2 small's shape (124M parameters, float32) is written
with random weights, without PyTorch; then ``load_model(folder)`` runs under ``tracemalloc``
(NumPy reports its allocations to it), and the peak of what it traced is printed beside the
file's size. The model itself is one copy of the weights; everything above it is what the
load holds on the way.

    python benchmarks/load_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import safetensors.numpy

from minilora.interop.model_files import load_model

GPT2_SMALL = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
QUICK_SHAPE = dict(vocab_size=2000, n_positions=64, n_embd=64, n_layer=2, n_head=4)


def write_gpt2_folder(folder: Path, shape: dict, seed: int = 0) -> int:
    """A random GPT-2 of ``shape`` in ``folder``; returns the bytes of its weights."""
    rng = np.random.default_rng(seed)
    V, T, C = shape["vocab_size"], shape["n_positions"], shape["n_embd"]
    shapes = {"wte.weight": (V, C), "wpe.weight": (T, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(shape["n_layer"]):
        for name, (n_in, n_out) in {
            "attn.c_attn": (C, 3 * C),
            "attn.c_proj": (C, C),
            "mlp.c_fc": (C, 4 * C),
            "mlp.c_proj": (4 * C, C),
        }.items():
            shapes[f"h.{i}.{name}.weight"], shapes[f"h.{i}.{name}.bias"] = (n_in, n_out), (n_out,)
        for ln in ("ln_1", "ln_2"):
            shapes[f"h.{i}.{ln}.weight"] = shapes[f"h.{i}.{ln}.bias"] = (C,)
    tensors = {
        f"transformer.{name}": (0.02 * rng.standard_normal(s, dtype=np.float32))
        for name, s in shapes.items()
    }
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", **shape}))
    return sum(a.nbytes for a in tensors.values())


def peak_load(folder: Path) -> int:
    """tracemalloc's peak, in bytes, over ``load_model(folder)``."""
    tracemalloc.start()
    try:
        model = load_model(folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    del model
    return peak


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small shape (a test's)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        weights = write_gpt2_folder(Path(tmp), QUICK_SHAPE if args.quick else GPT2_SMALL)
        peak = peak_load(Path(tmp))
    result = {"weights_mib": weights / 2**20, "peak_mib": peak / 2**20, "ratio": peak / weights}
    print(
        f"load_model: weights {result['weights_mib']:,.0f} MiB, tracemalloc peak "
        f"{result['peak_mib']:,.0f} MiB ({result['ratio']:.2f} times the weights)"
    )
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
