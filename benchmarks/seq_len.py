"""A training step at growing sequence length, and its peak memory, against PyTorch eager.

The medium model's width (L=6, C=256, nh=8, V=64) at T = 64, 128, 256, 512, with the batch
shrunk so that every step sees 2,048 tokens: the linear layers' work stays the same and
attention's (B·nh·T² per product) doubles with each T. Three steps alternate: minilora, the
PyTorch port of ``examples/torch_gpt.py`` (explicit softmax(q kᵀ) v, as minilora computes
it) and the same port attending with ``scaled_dot_product_attention`` (what a PyTorch user
writes). Targets: minilora / PyTorch <= 1.0 at T=512, and peak step memory <= PyTorch's.

Peak memory is measured the same way for every engine, each in a fresh process: the
resident set size (RSS) before a first training step, after the model, optimizer and batch
exist and one small no-grad forward has warmed the engine, subtracted from the process's
peak RSS during the step (Linux's VmHWM, reset just before the step). That counts what the
step itself holds at its peak (activations, gradients, AdamW's moments, temporaries),
whichever allocator holds it.

    python benchmarks/seq_len.py [--quick] [--threads N] [--seq-lens 64,128,256,512]
                                 [--no-memory]
"""

from __future__ import annotations

import json
import subprocess
import sys

import common
from common import ms

from minilora import AdamW, GPTConfig

TOKENS = 2048
ENGINES = ("minilora", "torch_explicit", "torch_sdpa")


def bench_for(T: int, tokens: int = TOKENS) -> common.Bench:
    return common.Bench(
        f"T={T}", GPTConfig(64, T, n_layer=6, n_head=8, n_embd=256), max(1, tokens // T)
    )


def use_sdpa(twin) -> None:
    """Make each of the port's attention layers call scaled_dot_product_attention."""
    torch = common.optional_torch()
    TF = torch.nn.functional
    for block in twin.blocks:
        attn = block.attn

        def forward(x, attn=attn):
            B, T, C = x.shape
            nh = attn.n_head

            def heads(t):  # (B, T, C) -> (B, nh, T, hs)
                return t.view(B, T, nh, C // nh).transpose(1, 2)

            q, k, v = heads(attn.q_proj(x)), heads(attn.k_proj(x)), heads(attn.v_proj(x))
            y = TF.scaled_dot_product_attention(q, k, v, is_causal=True)
            return attn.resid_dropout(attn.o_proj(y.transpose(1, 2).reshape(B, T, C)))

        attn.forward = forward


def steps(bench: common.Bench, engines=ENGINES) -> dict:
    """One training-step closure per engine, from the same weights and batch."""
    model = common.build_model(bench)
    x, y = common.batch(bench)
    out = {}
    for engine in engines:
        if engine == "minilora":
            out[engine] = common.minilora_step(model, AdamW(model.parameters()), x, y)
        else:
            twin, opt = common.torch_twin(model)
            if engine == "torch_sdpa":
                use_sdpa(twin)
            out[engine] = common.torch_step(twin, opt, x, y)
    return out


def _status_bytes(field: str) -> int:
    """A memory line of /proc/self/status (Linux), in bytes: VmRSS now, VmHWM its peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS (Linux >= 4.0: "5" to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_child(engine: str, T: int, threads: int, tokens: int = TOKENS) -> dict:
    """Run in a fresh process: the step's peak RSS over the RSS before it."""
    common.set_threads(threads)
    bench = bench_for(T, tokens)
    step = steps(bench, [engine])[engine]
    warm = common.Bench(bench.name, bench.config, 1)  # one sequence, no graph
    wx, _ = common.batch(warm)
    if engine == "minilora":
        from minilora import no_grad

        model = common.build_model(warm)
        with no_grad():
            model(wx)
    else:
        torch = common.optional_torch()
        twin, _ = common.torch_twin(common.build_model(warm))
        with torch.no_grad():
            twin(torch.from_numpy(wx))
    _reset_peak_rss()
    before = _status_bytes("VmRSS")
    step()
    peak = _status_bytes("VmHWM")  # this process's own peak (getrusage's ru_maxrss would
    # carry the parent's RSS over the fork and exec, which is larger than a small step)
    return {"engine": engine, "T": T, "peak_step_bytes": max(0, peak - before)}


def peak_memory(engine: str, T: int, threads: int, tokens: int = TOKENS) -> int:
    code = (
        "import sys, json; sys.path.insert(0, 'benchmarks'); import seq_len; "
        f"print(json.dumps(seq_len.memory_child({engine!r}, {T}, {threads}, {tokens})))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=common.ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(run.stdout.strip().splitlines()[-1])["peak_step_bytes"]


def run(T: int, repeats: int, memory: bool, threads: int, tokens: int) -> dict:
    bench = bench_for(T, tokens)
    fns = steps(bench)
    first = {k: f() for k, f in fns.items()}
    times = common.alternate(fns, repeats, warmup=1)
    row = {
        "T": T,
        "shape": bench.describe(),
        "batch_size": bench.batch_size,
        "first_loss": first,
        **{k: common.summary(v) for k, v in times.items()},
        "over_torch_explicit": common.ratio(times, "minilora", "torch_explicit"),
        "over_torch_sdpa": common.ratio(times, "minilora", "torch_sdpa"),
    }
    if memory:
        row["peak_step_bytes"] = {e: peak_memory(e, T, threads, tokens) for e in ENGINES}
    return row


def main(argv=None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--seq-lens", default="64,128,256,512", help="comma-separated T values")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    args = p.parse_args(argv)
    if common.optional_torch() is None:
        raise SystemExit('seq_len.py needs PyTorch (pip install -e ".[oracle]")')
    common.set_threads(args.threads)
    seq_lens = [64] if args.quick else [int(t) for t in args.seq_lens.split(",")]
    tokens = 128 if args.quick else TOKENS
    rows = []
    for T in seq_lens:
        repeats = 3 if args.quick else (args.repeats or 10)
        rows.append(run(T, repeats, not args.no_memory, args.threads, tokens))
        r = rows[-1]
        print(
            f"T={T}: minilora {ms(r['minilora']['median_s']):.1f} ms, "
            f"torch sdpa {ms(r['torch_sdpa']['median_s']):.1f} ms",
            flush=True,
        )
    table = []
    for r in rows:
        line = {
            "T": r["T"],
            "B": r["batch_size"],
            "ml": ms(r["minilora"]["median_s"]),
            "expl": ms(r["torch_explicit"]["median_s"]),
            "sdpa": ms(r["torch_sdpa"]["median_s"]),
            "r_expl": r["over_torch_explicit"]["text"],
            "r_sdpa": r["over_torch_sdpa"]["text"],
        }
        if "peak_step_bytes" in r:
            mem = r["peak_step_bytes"]
            line.update(
                m_ml=mem["minilora"] / 2**20,
                m_expl=mem["torch_explicit"] / 2**20,
                m_sdpa=mem["torch_sdpa"] / 2**20,
                m_r=mem["minilora"] / max(1, mem["torch_sdpa"]),
            )
        table.append(line)
    columns = [
        ("T", "T"),
        ("B", "B"),
        ("ml", "minilora ms"),
        ("expl", "torch explicit ms"),
        ("sdpa", "torch sdpa ms"),
        ("r_expl", "ml/explicit"),
        ("r_sdpa", "ml/sdpa"),
    ]
    if not args.no_memory:
        columns += [
            ("m_ml", "ml peak MiB"),
            ("m_expl", "explicit MiB"),
            ("m_sdpa", "sdpa MiB"),
            ("m_r", "ml/sdpa mem"),
        ]
    print(
        f"\ntraining step by sequence length, {tokens} tokens, {args.threads} thread(s); "
        "medians, time ratios paired by round (median and IQR, or within noise)"
    )
    print(common.table(table, columns))
    result = {"tokens_per_step": tokens, "rows": rows}
    longest = rows[-1]
    result["target"] = {
        "T": longest["T"],
        "over_torch_sdpa_at_most": 1.0,
        "ratio": longest["over_torch_sdpa"]["ratio"],
        "met": longest["over_torch_sdpa"]["ratio"] <= 1.0,
    }
    common.write_json(args.out, "seq_len", result, args)
    return result


if __name__ == "__main__":
    main()
