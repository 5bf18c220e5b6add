"""Produce a reference-vector set with PyTorch (and PEFT), for ``minilora vectors --check``.

This is what a porter does with their own implementation, shown for PyTorch: read
minilora's set (``minilora vectors --out ref``), take each case's inputs and upstream
gradient, run the port's forward and backward on them, and write the outputs and gradients
into a new folder beside a copy of the manifest::

    python -m examples.torch_vectors ref torch_set
    minilora vectors --check torch_set

It reads the files with plain ``json`` and ``safetensors`` and never imports minilora, so it
checks the format as much as the math. ``LoRALinear`` is PEFT's LoRA layer and the GPT is
:mod:`examples.torch_gpt` wrapped by ``peft.get_peft_model``: two independent
implementations of what minilora computes.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import safetensors.numpy
import torch
from torch.nn import functional as F

from examples.torch_gpt import TorchGPT, load_minilora_state, minilora_name


def _attention(t, a):
    q, k, v = t["q"], t["k"], t["v"]
    T, hs = q.shape[-2], q.shape[-1]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, T)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    return F.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v


def _cached_attention(t, a):
    """The newest Tq queries against Tk keys: query i sits at position Tk - Tq + i."""
    q, k, v = t["q"], t["k"], t["v"]
    Tq, Tk, hs = q.shape[-2], k.shape[-2], q.shape[-1]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, Tq, Tk)
    future = torch.triu(torch.ones(Tq, Tk, dtype=torch.bool), Tk - Tq + 1)
    return F.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v


def _cross_entropy(t, a):
    logits, targets = t["logits"], t["targets"]
    V = logits.shape[-1]
    return F.cross_entropy(
        logits.reshape(-1, V), targets.reshape(-1), ignore_index=a["ignore_index"]
    )


# Each op: (tensors by input name, attrs from the manifest) -> output.
OPS = {
    "add": lambda t, a: t["a"] + t["b"],
    "sub": lambda t, a: t["a"] - t["b"],
    "mul": lambda t, a: t["a"] * t["b"],
    "div": lambda t, a: t["a"] / t["b"],
    "neg": lambda t, a: -t["a"],
    "pow": lambda t, a: t["a"] ** a["exponent"],
    "exp": lambda t, a: torch.exp(t["a"]),
    "log": lambda t, a: torch.log(t["a"]),
    "tanh": lambda t, a: torch.tanh(t["a"]),
    "sum": lambda t, a: t["a"].sum(dim=tuple(a["axis"]), keepdim=a["keepdims"]),
    "mean": lambda t, a: t["a"].mean(dim=tuple(a["axis"]), keepdim=a["keepdims"]),
    # amax, not max(dim): amax splits the gradient between ties, as minilora does
    "max": lambda t, a: torch.amax(t["a"], dim=tuple(a["axis"]), keepdim=a["keepdims"]),
    "reshape": lambda t, a: t["a"].reshape(a["shape"]),
    "permute": lambda t, a: t["a"].permute(a["dims"]),
    "getitem": lambda t, a: t["a"][t["index"]],
    "matmul": lambda t, a: t["a"] @ t["b"],
    "linear": lambda t, a: F.linear(t["x"], t["weight"], t["bias"]),
    "lora_linear": lambda t, a: (
        F.linear(t["x"], t["weight"], t["bias"])
        + a["scaling"] * ((t["x"] @ t["lora_A"].T) @ t["lora_B"].T)
    ),
    "gelu": lambda t, a: F.gelu(t["x"], approximate="tanh"),
    "layer_norm": lambda t, a: F.layer_norm(
        t["x"], t["x"].shape[-1:], t["weight"], t["bias"], a["eps"]
    ),
    "softmax": lambda t, a: F.softmax(t["x"], dim=a["axis"]),
    "log_softmax": lambda t, a: F.log_softmax(t["x"], dim=a["axis"]),
    "softmax_cross_entropy": _cross_entropy,
    "embedding": lambda t, a: F.embedding(t["ids"], t["weight"]),
    # minilora's rule: keep an element where its uniform draw u >= p, scale by 1/(1-p)
    "dropout": lambda t, a: t["x"] * (t["uniform"] >= a["p"]).to(t["x"].dtype) / (1 - a["p"]),
    "causal_self_attention": _attention,
    "cached_attention": _cached_attention,
}


def _peft():
    import peft  # only the LoRA cases need it

    return peft


class _One(torch.nn.Module):
    """A module holding one Linear, so PEFT can target it by name."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.proj = torch.nn.Linear(n_in, n_out)

    def forward(self, x):
        return self.proj(x)


def run_lora_layer(t: dict, a: dict):
    """PEFT's LoRA layer on the case's weights: (outputs, gradients)."""
    peft = _peft()
    base = _One(a["in_features"], a["out_features"]).to(t["x"].dtype)
    config = peft.LoraConfig(
        r=a["r"],
        lora_alpha=a["lora_alpha"],
        target_modules=["proj"],
        use_rslora=a["use_rslora"],
        lora_dropout=0.0,
    )
    model = peft.get_peft_model(base, config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.base_layer.weight.copy_(t["weight"])
        layer.base_layer.bias.copy_(t["bias"])
        layer.lora_A["default"].weight.copy_(t["lora_A"])
        layer.lora_B["default"].weight.copy_(t["lora_B"])
    x = t["x"].clone().requires_grad_(True)
    y = model(x)
    y.backward(t["grad_output"])
    grads = {
        "x": x.grad,
        "lora_A": layer.lora_A["default"].weight.grad,
        "lora_B": layer.lora_B["default"].weight.grad,
    }
    layer.merge()  # W ← W + s·B·A, PEFT's merge
    outputs = {"output": y, "merged_weight": layer.base_layer.weight}
    return outputs, grads


def run_gpt(t: dict, a: dict):
    """TorchGPT wrapped by PEFT, with the case's weights: (outputs, gradients)."""
    peft = _peft()
    config, lora = type("Config", (), a["config"]), a["lora"]
    dtype = t["tok_emb.weight"].dtype
    port = TorchGPT(config).to(dtype)
    model = peft.get_peft_model(
        port,
        peft.LoraConfig(
            r=lora["r"],
            lora_alpha=lora["lora_alpha"],
            target_modules=lora["target_modules"],
            lora_dropout=lora["lora_dropout"],
            bias=lora["bias"],
            use_rslora=lora["use_rslora"],
        ),
    )
    params = {k: v for k, v in t.items() if k not in ("idx", "targets", "grad_output")}
    load_minilora_state(model, {k: v.numpy() for k, v in params.items()})
    logits, loss = model(t["idx"], t["targets"])
    loss.backward(t["grad_output"])
    grads = {minilora_name(n): p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {"logits": logits, "loss": loss}, grads


def run_case(name: str, entry: dict, tensors: dict):
    """(outputs, gradients by input name) for one manifest case, computed with PyTorch."""
    a = entry["attrs"]
    if name.startswith("lora_layer"):
        return run_lora_layer(tensors, a)
    if name == "gpt_lora":
        return run_gpt(tensors, a)
    leaves = {}
    for k, v in tensors.items():
        if k in entry["requires_grad"]:
            v = v.clone().requires_grad_(True)
        leaves[k] = v
    out = OPS[name](leaves, a)
    out.backward(tensors["grad_output"])
    grads = {k: leaves[k].grad for k in entry["requires_grad"]}
    return {"output": out}, grads


def write_torch_vectors(reference, out) -> Path:
    """Read minilora's set in ``reference``; write PyTorch's outputs and gradients to
    ``out`` (with the same inputs and a copy of the manifest)."""
    reference, out = Path(reference), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((reference / "manifest.json").read_text())
    for name, entry in manifest["cases"].items():
        arrays = safetensors.numpy.load_file(str(reference / entry["file"]))
        keep = set(entry["inputs"]) | {"grad_output"}
        tensors = {k: torch.from_numpy(v.copy()) for k, v in arrays.items() if k in keep}
        outputs, grads = run_case(name, entry, tensors)
        result = {k: t.numpy() for k, t in tensors.items()}
        result.update({k: v.detach().numpy().copy() for k, v in outputs.items()})
        result.update({f"grad.{k}": v.detach().numpy().copy() for k, v in grads.items()})
        safetensors.numpy.save_file(result, str(out / entry["file"]))
    shutil.copyfile(reference / "manifest.json", out / "manifest.json")
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m examples.torch_vectors REFERENCE_DIR OUT_DIR")
    print(f"wrote {write_torch_vectors(sys.argv[1], sys.argv[2])}")
