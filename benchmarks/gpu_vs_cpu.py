"""GPU against CPU: training steps (full fine-tuning and LoRA) and inference, per model size.

Each measurement is one call: a training step is forward, backward and an AdamW update;
inference is a forward pass under ``no_grad``. The devices alternate (cpu, cuda, cuda,
cpu, ...) and every time is taken between two ``backend.synchronize()`` calls, because a
GPU call returns before its work is done. The first call on each device is timed apart
(on a GPU it includes compiling CuPy's kernels) and left out of the medians.

    python benchmarks/gpu_vs_cpu.py [--devices cpu,cuda] [--quick] [--threads N]

Without a GPU, "cuda" is dropped with a message and the rest still runs (exit 0). Writes
benchmarks/results/gpu_vs_cpu.json.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import common
from common import ms

from minilora import GPT, AdamW, GPTConfig, LoRAConfig, apply_lora, backend, manual_seed, no_grad


@dataclass(frozen=True)
class Size:
    name: str
    config: GPTConfig
    batch_size: int

    def describe(self) -> str:
        c = self.config
        return f"L={c.n_layer} C={c.n_embd} T={c.block_size} B={self.batch_size}"


SIZES = [
    Size("small", GPTConfig(64, 64, n_layer=4, n_head=4, n_embd=128), 16),
    Size("medium", GPTConfig(64, 128, n_layer=6, n_head=8, n_embd=256), 16),
    Size("large", GPTConfig(64, 128, n_layer=4, n_head=8, n_embd=512), 16),
]
QUICK_SIZES = [
    Size("tiny", GPTConfig(16, 16, n_layer=1, n_head=2, n_embd=32), 8),
    Size("small", GPTConfig(64, 32, n_layer=2, n_head=4, n_embd=64), 8),
]
MODES = ("full", "lora", "inference")
LORA = LoRAConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])


def workload(size: Size, mode: str, device: str, dtype):
    """A function running one step of ``mode`` on ``device``; it returns the loss (or None)."""
    manual_seed(0)
    model = GPT(size.config, dtype=dtype, device=device)
    g = backend.Generator(1)
    shape = (size.batch_size, size.config.block_size)
    x = g.integers(0, size.config.vocab_size, shape, device=device)
    y = g.integers(0, size.config.vocab_size, shape, device=device)
    if mode == "inference":
        model.eval()

        def infer():
            with no_grad():
                model(x)

        return infer
    if mode == "lora":
        apply_lora(model, LORA)
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return common.minilora_step(model, opt, x, y)


def timed(fn) -> tuple[float, object]:
    backend.synchronize()  # nothing queued from before is counted
    t0 = time.perf_counter()
    out = fn()
    backend.synchronize()  # everything this call queued has finished
    return time.perf_counter() - t0, out


def run_size(size: Size, devices: list[str], repeats: int, dtype, deadline: float) -> list[dict]:
    rows = []
    for mode in MODES:
        if time.perf_counter() > deadline:
            print(f"  {size.name:<7}{mode:<10}skipped: past --max-seconds")
            continue
        fns = {d: workload(size, mode, d, dtype) for d in devices}
        first = {d: timed(fns[d]) for d in devices}  # compilation, caches, lazy state
        times = common.alternate(fns, repeats, warmup=0)  # the first calls were the warm-up
        row = {
            "size": size.name,
            "shape": size.describe(),
            "mode": mode,
            "tokens": size.batch_size * size.config.block_size,
        }
        for d in devices:
            row[d] = common.summary(times[d])
            row[d]["first_call_s"] = first[d][0]
            row[d]["first_loss"] = first[d][1]
            row[f"{d}_ms"] = ms(row[d]["median_s"])
        for d in devices:
            if d != "cpu" and "cpu" in devices:
                speedup = common.ratio(times, "cpu", d)  # CPU time / device time, by round
                row[f"{d}_speedup"], row[f"{d}_speedup_text"] = speedup, speedup["text"]
        rows.append(row)
        each = ", ".join(f"{d} {row[f'{d}_ms']:.2f} ms" for d in devices)
        print(f"  {size.name:<7}{mode:<10}{each}", flush=True)
    return rows


def _columns(devices: list[str]) -> list[tuple[str, str]]:
    cols = [("size", "size"), ("mode", "mode"), ("tokens", "tokens")]
    cols += [(f"{d}_ms", f"{d} ms") for d in devices]
    cols += [
        (f"{d}_speedup_text", f"{d} speed-up (paired)")
        for d in devices
        if d != "cpu" and "cpu" in devices
    ]
    return cols


def available(devices: list[str]) -> list[str]:
    usable = []
    for d in devices:
        try:
            usable.append(backend.check_device(d))
        except RuntimeError as e:
            print(f"no GPU: skipping {d!r} ({e})")
    return usable


def gpu_description() -> dict | None:
    cp = backend.cupy_module()
    if cp is None:
        return None
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"]
    return {
        "name": name.decode() if isinstance(name, bytes) else name,
        "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
        "cupy": cp.__version__,
        "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
    }


def main(argv=None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--devices", default="cpu,cuda", help="comma-separated (default cpu,cuda)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument(
        "--max-seconds",
        type=float,
        default=150.0,
        help="skip what remains once this much time has passed (default 150)",
    )
    p.set_defaults(
        threads=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    )  # the CPU at its best: every core
    args = p.parse_args(argv)
    devices = available([d for d in args.devices.split(",") if d])
    if not devices:
        print("no device to measure")
        return {}
    common.set_threads(args.threads, torch_too=False)
    sizes = QUICK_SIZES if args.quick else SIZES
    repeats = args.repeats or (2 if args.quick else 5)
    dtype = backend.resolve_dtype(args.dtype)
    print(
        f"devices {devices}, {args.dtype}, {repeats} timed calls each after one untimed, "
        f"CPU BLAS threads {args.threads}"
    )
    rows, deadline = [], time.perf_counter() + args.max_seconds
    for size in sizes:
        rows += run_size(size, devices, repeats, dtype, deadline)
    print()
    print(common.table(rows, _columns(devices)))
    firsts = ", ".join(f"{d} {max(r[d]['first_call_s'] for r in rows):.2f} s" for d in devices)
    print(f"slowest first call (compilation, caches): {firsts}")
    result = {
        "devices": devices,
        "dtype": args.dtype,
        "repeats": repeats,
        "gpu": gpu_description(),
        "sizes": {s.name: s.describe() for s in sizes},
        "rows": rows,
    }
    common.write_json(args.out, "gpu_vs_cpu", result, args)
    return result


if __name__ == "__main__":
    main()
