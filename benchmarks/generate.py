"""Generation: tokens per second with a KV cache, minilora against a PyTorch loop with one.

The same GPT (the same weights) generates greedily from the same prompt, alternated run
after run: minilora's ``GPT.generate`` (KV cache), the same without the cache
(``use_cache=False``: the whole window recomputed per token, the old path), and two PyTorch
eager loops over the port in ``examples/torch_gpt.py`` with a preallocated KV cache, one
attending with ``scaled_dot_product_attention`` (what a PyTorch user writes) and one with
the port's explicit softmax(q kᵀ) v. The prompt runs once, then one token per step until
the window is full (block_size). Target: minilora tokens/s >= PyTorch's, at batch 1 and 16.

    python benchmarks/generate.py [--quick] [--threads N] [--configs tiny,small,medium]
"""

from __future__ import annotations

import math

import common
import numpy as np
from common import CONFIGS, ms

from minilora import no_grad

BATCHES = (1, 16)
DEFAULT_REPEATS = {"tiny": 40, "small": 15, "medium": 7}


def prompt_length(block_size: int) -> int:
    return max(1, block_size // 8)


def torch_generate(twin, idx, n_new: int, sdpa: bool):
    """Greedy decoding with a preallocated KV cache over ``TorchGPT``'s modules."""
    torch = common.optional_torch()
    TF = torch.nn.functional
    cfg = twin.config
    B, T0 = idx.shape
    nh, hs = cfg.n_head, cfg.n_embd // cfg.n_head
    keys = torch.zeros(cfg.n_layer, B, nh, cfg.block_size, hs)
    values = torch.zeros_like(keys)

    def attend(q, k, v, causal):  # (B, nh, Tq, hs) against (B, nh, Tk, hs)
        if sdpa:
            return TF.scaled_dot_product_attention(q, k, v, is_causal=causal)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))
        if causal:
            Tq = q.shape[2]
            scores = scores.masked_fill(twin.blocks[0].attn.future[:Tq, :Tq], float("-inf"))
        return TF.softmax(scores, dim=-1) @ v

    def forward(new, start):  # new (B, Tn) at positions start.. -> logits at the last
        Tn = new.shape[1]
        x = twin.tok_emb(new) + twin.pos_emb(torch.arange(start, start + Tn))
        for i, block in enumerate(twin.blocks):
            a, h = block.attn, block.ln1(x)

            def heads(t):
                return t.view(B, Tn, nh, hs).transpose(1, 2)

            q, k, v = heads(a.q_proj(h)), heads(a.k_proj(h)), heads(a.v_proj(h))
            keys[i, :, :, start : start + Tn] = k
            values[i, :, :, start : start + Tn] = v
            k_all, v_all = keys[i, :, :, : start + Tn], values[i, :, :, : start + Tn]
            y = attend(q, k_all, v_all, causal=start == 0 and Tn > 1)
            x = x + a.o_proj(y.transpose(1, 2).reshape(B, Tn, cfg.n_embd))
            x = x + block.mlp(block.ln2(x))
        return twin.lm_head(twin.ln_f(x[:, -1]))  # (B, vocab)

    with torch.inference_mode():
        out = [idx]
        logits = forward(idx, 0)
        for t in range(n_new):
            nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
            out.append(nxt)
            if t + 1 < n_new:
                logits = forward(nxt, T0 + t)
        return torch.cat(out, dim=1)


def run(name: str, batch_size: int, repeats: int, full_window: bool) -> dict:
    bench = CONFIGS[name]
    cfg = bench.config
    model = common.build_model(bench)
    model.eval()
    T0 = prompt_length(cfg.block_size)
    n_new = cfg.block_size - T0
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab_size, (batch_size, T0), dtype=np.int64)

    def minilora_cached():
        with no_grad():
            return model.generate(prompt, n_new, temperature=0)

    def minilora_full():
        with no_grad():
            return model.generate(prompt, n_new, temperature=0, use_cache=False)

    fns = {"minilora": minilora_cached}
    if full_window:
        fns["no_cache"] = minilora_full
    twin = common.torch_twin(model)
    tokens = {"minilora": minilora_cached()}
    if twin is not None:
        twin = twin[0].eval()
        torch = common.optional_torch()
        tp = torch.from_numpy(prompt)
        fns["torch_sdpa"] = lambda: torch_generate(twin, tp, n_new, sdpa=True)
        fns["torch_explicit"] = lambda: torch_generate(twin, tp, n_new, sdpa=False)
        tokens["torch_sdpa"] = fns["torch_sdpa"]().numpy()
    times = common.alternate(fns, repeats, warmup=1)
    new_tokens = batch_size * n_new
    row = {
        "config": name,
        "shape": bench.describe(),
        "batch_size": batch_size,
        "prompt": T0,
        "new_tokens": n_new,
        **{k: common.summary(v) for k, v in times.items()},
        "tokens_per_s": {k: new_tokens / float(np.median(v)) for k, v in times.items()},
    }
    if full_window:
        row["no_cache_over_cached"] = common.ratio(times, "no_cache", "minilora")
    if twin is not None:
        row["same_tokens_as_torch"] = bool(np.array_equal(tokens["minilora"], tokens["torch_sdpa"]))
        for other in ("torch_sdpa", "torch_explicit"):
            row[f"minilora_over_{other}"] = common.ratio(times, "minilora", other)
    return row


def main(argv=None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--configs", default="tiny,small,medium", help="comma-separated names")
    p.add_argument("--no-full-window", action="store_true", help="skip minilora without the cache")
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    names = ["tiny"] if args.quick else args.configs.split(",")
    rows = []
    for name in names:
        for batch_size in (1,) if args.quick else BATCHES:
            repeats = 3 if args.quick else (args.repeats or DEFAULT_REPEATS.get(name, 10))
            rows.append(run(name, batch_size, repeats, not args.no_full_window))
    has_torch = "torch_sdpa" in rows[0]
    table = []
    for r in rows:
        tps = r["tokens_per_s"]
        line = {
            "config": r["config"],
            "batch": r["batch_size"],
            "new": r["new_tokens"],
            "ml": tps["minilora"],
            "ml_ms": ms(r["minilora"]["median_s"]),
            "nc": tps.get("no_cache"),
            "nc_x": r.get("no_cache_over_cached", {}).get("text"),
        }
        if has_torch:
            line.update(
                sdpa=tps["torch_sdpa"],
                expl=tps["torch_explicit"],
                r_sdpa=r["minilora_over_torch_sdpa"]["text"],
                r_expl=r["minilora_over_torch_explicit"]["text"],
                same="yes" if r["same_tokens_as_torch"] else "NO",
            )
        table.append(line)
    columns = [
        ("config", "config"),
        ("batch", "batch"),
        ("new", "new tokens"),
        ("ml", "minilora tok/s"),
        ("ml_ms", "ms/run"),
        ("nc", "no-cache tok/s"),
        ("nc_x", "no-cache/cached time"),
    ]
    if has_torch:
        columns += [
            ("sdpa", "torch sdpa tok/s"),
            ("expl", "torch explicit tok/s"),
            ("r_sdpa", "time minilora/sdpa"),
            ("r_expl", "time minilora/explicit"),
            ("same", "same tokens"),
        ]
    print(
        f"\ngeneration (greedy, KV cache), {args.threads} thread(s); medians, time ratios "
        "paired by round (median and IQR, or within noise)"
    )
    print(common.table(table, columns))
    result = {"rows": rows}
    if has_torch:
        worst = max(r["minilora_over_torch_sdpa"]["ratio"] for r in rows)
        result["target"] = {
            "minilora_time_over_torch_sdpa_at_most": 1.0,
            "worst": worst,
            "met": worst <= 1.0,
        }
    common.write_json(args.out, "generate", result, args)
    return result


if __name__ == "__main__":
    main()
