"""Inference latency of LoRA's relatives: base, LoRA merged and unmerged, adapters, prefix.

Copies of the same random GPT, alternated forward after forward under ``no_grad`` on the
same T-token batch: the base model; LoRA on q_proj and v_proj (r = 8, non-zero ``B``)
unmerged and merged; Houlsby adapters (after attention and MLP) and Lin adapters (after the
MLP), bottleneck m = 8, non-zero ``up``; prefix-layer tuning with P = 8 virtual tokens
(every layer attends to T + P keys). The model's ``block_size`` is T + P so that every
variant takes the same T tokens.

The LoRA paper's Table 1 claim, measured here: adapters add sequential work that cannot be
merged away, which shows at batch 1 (small matmuls, per-op overhead counts) and fades at a
larger batch; merged LoRA is the base model. Targets reported, not asserted: at batch 1,
both adapters slower than merged LoRA; merged LoRA within 2% of the base (paired ratio).

    python benchmarks/relatives_latency.py [--quick] [--threads N] [--config medium]
"""

from __future__ import annotations

import common
import numpy as np
from common import ms

from minilora import (
    GPT,
    GPTConfig,
    LoRAConfig,
    apply_lora,
    manual_seed,
    merge_lora,
)
from minilora.relatives.adapters import AdapterConfig, apply_adapters
from minilora.relatives.prefix import PrefixConfig, apply_prefix_tuning

P = 8  # prefix length
SHAPES = {  # (n_layer, n_head, n_embd, T)
    "tiny": (2, 4, 64, 16),  # the demo's base model's shape (quick smoke test)
    "medium": (6, 8, 256, 128),
    "wide": (4, 8, 512, 128),
}
BATCHES = (1, 16)
DEFAULT_REPEATS = {1: 60, 16: 15}
VARIANTS = ("base", "lora_merged", "lora_unmerged", "adapter_houlsby", "adapter_lin", "prefix")


def nonzero(model: GPT, suffixes: tuple[str, ...], seed: int = 0) -> None:
    """Give zero-initialised trainable arrays trained-looking values, so that every bypass
    really computes something (and merged LoRA really changes the weights)."""
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if name.endswith(suffixes):
            p.data[...] = rng.normal(0.0, 0.02, p.shape).astype(p.dtype)


def models(config: GPTConfig) -> dict[str, GPT]:
    manual_seed(0)
    base = GPT(config)
    state = base.state_dict()

    def copy(insert) -> GPT:
        manual_seed(1)  # the same LoRA A in the merged and the unmerged copy
        model = GPT(config)
        model.load_state_dict(state)
        insert(model)
        return model.eval()

    lora = LoRAConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])

    def with_lora(m):
        apply_lora(m, lora)
        nonzero(m, ("lora_B",))

    def with_adapters(kind):
        def insert(m):
            apply_adapters(m, AdapterConfig(kind, 8))
            nonzero(m, ("adapter_up.weight", "adapter_up.bias"))

        return insert

    merged = copy(with_lora)
    merge_lora(merged)
    return {
        "base": base.eval(),
        "lora_merged": merged,
        "lora_unmerged": copy(with_lora),
        "adapter_houlsby": copy(with_adapters("houlsby")),
        "adapter_lin": copy(with_adapters("lin")),
        "prefix": copy(lambda m: apply_prefix_tuning(m, PrefixConfig("layer", P))),
    }


def run(name: str, batch_size: int, repeats: int) -> dict:
    n_layer, n_head, n_embd, T = SHAPES[name]
    config = GPTConfig(64, T + P, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    nets = models(config)
    x = np.random.default_rng(0).integers(0, 64, (batch_size, T), dtype=np.int64)
    fns = common.forwards(nets, x)
    outputs = {k: f().numpy() for k, f in fns.items()}
    times = common.alternate(fns, repeats, warmup=2)
    return {
        "config": name,
        "shape": f"L={n_layer} C={n_embd} nh={n_head} T={T} B={batch_size}",
        "batch_size": batch_size,
        "seq_len": T,
        "merged_matches_unmerged": bool(
            np.allclose(outputs["lora_merged"], outputs["lora_unmerged"], rtol=1e-4, atol=1e-5)
        ),
        **{k: common.summary(v) for k, v in times.items()},
        "over_base": {k: common.ratio(times, k, "base") for k in VARIANTS if k != "base"},
    }


def main(argv=None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--config", default="medium", choices=sorted(SHAPES), help="model shape")
    args = p.parse_args(argv)
    common.set_threads(args.threads, torch_too=False)
    name = "tiny" if args.quick else args.config
    rows = []
    for batch_size in BATCHES:
        repeats = 3 if args.quick else (args.repeats or DEFAULT_REPEATS[batch_size])
        rows.append(run(name, batch_size, repeats))
    print(
        f"\nforward latency under no_grad, {args.threads} thread(s): medians in ms, and the "
        "ratio to the base (the median of per-round ratios and their IQR, or within noise)"
    )
    table = [
        {
            "batch": r["batch_size"],
            "variant": k,
            "ms": ms(r[k]["median_s"]),
            "to base": r["over_base"][k]["text"] if k != "base" else "",
        }
        for r in rows
        for k in VARIANTS
    ]
    print(f"{rows[0]['shape'].rsplit(' B=', 1)[0]}, prefix P={P}, LoRA r=8, adapters m=8")
    print(
        common.table(
            table,
            [
                ("batch", "batch"),
                ("variant", "variant"),
                ("ms", "median ms"),
                ("to base", "/base, paired by round"),
            ],
        )
    )
    b1 = rows[0]["over_base"]
    merged_worst = max(r["over_base"]["lora_merged"]["ratio"] for r in rows)
    targets = {
        "adapters_slower_than_merged_at_batch_1": all(
            b1[k]["ratio"] > b1["lora_merged"]["ratio"] for k in ("adapter_houlsby", "adapter_lin")
        ),
        "merged_over_base_at_most": 1.02,
        "merged_over_base_worst_paired": merged_worst,
        "merged_within_2_percent": merged_worst <= 1.02,
    }
    print(f"targets: {targets}")
    result = {"rows": rows, "prefix_tokens": P, "targets": targets}
    common.write_json(args.out, "relatives_latency", result, args)
    return result


if __name__ == "__main__":
    main()
