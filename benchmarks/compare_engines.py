"""Before and after: this working tree's engine against an earlier revision, in one run.

The ``minilora/`` package of a git revision (default: the commit before the performance
work) is extracted into a temporary folder under the name ``minilora_baseline`` (its
imports rewritten), so both versions load into one process and their training steps, and
the forward + backward of single ops (GELU, layer norm, attention), alternate. This is
how the before/after numbers in docs/performance.md were measured.

``--allocator`` instead compares minilora with and without its ``malloc`` setting
(``backend.keep_freed_host_memory``), which is process-wide: it alternates whole processes,
each timing ``--repeats`` steps, with ``MINILORA_KEEP_FREED_MEMORY`` set to 0 and to 1.

    python benchmarks/compare_engines.py [--baseline REV] [--configs tiny,small] [--quick]
    python benchmarks/compare_engines.py --allocator [--configs small]
"""

from __future__ import annotations

import importlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import common
from common import CONFIGS, ms

import minilora

BEFORE = "03347d6"  # the last commit before the performance work (issue 9)


def extract(rev: str, into: Path) -> str:
    """Write ``minilora/`` at ``rev`` to ``into/minilora_baseline``; return the module name."""
    root = common.ROOT
    names = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", rev, "minilora/"],
        cwd=root, check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    target = into / "minilora_baseline"
    for name in names:
        data = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=root, check=True,
                              capture_output=True).stdout  # fmt: skip
        path = target / Path(name).relative_to("minilora")
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".py"):
            text = data.decode()
            text = re.sub(r"\bfrom minilora\b", "from minilora_baseline", text)
            text = re.sub(r"\bimport minilora\b", "import minilora_baseline as minilora", text)
            path.write_text(text)
        else:
            path.write_bytes(data)
    sys.path.insert(0, str(into))
    return "minilora_baseline"


def step_fn(ml, bench, x, y):
    ml.manual_seed(0)
    model = ml.GPT(ml.GPTConfig(**bench.config.to_dict()))
    return common.minilora_step(model, ml.AdamW(model.parameters(), lr=1e-3), x, y)


def op_fns(ml, rng):
    """Forward + backward of the ops that were rewritten, at the medium config's sizes; an
    AdamW step over the medium model's 4.8M parameters; and the engine's cost of one tiny
    op (``Function.__call__``, its checks and the graph node)."""
    import numpy as np  # noqa: PLC0415

    F = ml.functional

    def run(cls, args, g):
        def f():
            fn = cls()
            fn.needs_input_grad = (True,) * len(args)
            fn.forward(*args)
            fn.backward(g)

        return f

    def arr(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    h = arr(16, 128, 1024)
    x, w, b = arr(16, 128, 256), arr(256), arr(256)
    q, k, v = (arr(16, 128, 8, 32).transpose(0, 2, 1, 3) for _ in range(3))
    return {
        "GELU fwd+bwd (16,128,1024)": run(F.GELU, (h,), arr(*h.shape)),
        "LayerNorm fwd+bwd (16,128,256)": run(F.LayerNormFunction, (x, w, b), arr(*x.shape)),
        "attention fwd+bwd (16,8,128,32)": run(F.CausalSelfAttention, (q, k, v), arr(*q.shape)),
        "AdamW step (medium model)": adamw_step(ml, rng),
        "100 tiny ops (engine overhead)": tiny_op(ml),
    }


def adamw_step(ml, rng):
    model = ml.GPT(ml.GPTConfig(**CONFIGS["medium"].config.to_dict()))
    params = model.parameters()
    for p in params:
        p.grad = rng.standard_normal(p.shape).astype(p.dtype) * 1e-3
    return ml.AdamW(params, lr=1e-3).step


def tiny_op(ml):
    a = ml.Tensor([1.0], requires_grad=True)
    b = ml.Tensor([2.0], requires_grad=True)

    def f():
        for _ in range(100):
            a + b  # noqa: B018  (builds one node; the arithmetic is one element)

    return f


def compared(times: dict) -> dict:
    return {
        "after": common.summary(times["after"]),
        "before": common.summary(times["before"]),
        **common.ratio(times, "after", "before"),
    }


def engines(args) -> dict:
    import numpy as np  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        old = importlib.import_module(extract(args.baseline, Path(tmp)))
        result = {"baseline": args.baseline, "steps": [], "ops": []}
        for name in args.configs.split(","):
            bench = CONFIGS[name]
            x, y = common.batch(bench)
            fns = {"after": step_fn(minilora, bench, x, y), "before": step_fn(old, bench, x, y)}
            repeats = 3 if args.quick else (args.repeats or 10)
            times = common.alternate(fns, repeats, warmup=1)
            result["steps"].append({"config": name, **compared(times)})
        new_ops = op_fns(minilora, np.random.default_rng(0))
        old_ops = op_fns(old, np.random.default_rng(0))
        for name in new_ops:
            times = common.alternate({"after": new_ops[name], "before": old_ops[name]},
                                     3 if args.quick else (args.repeats or 10))  # fmt: skip
            result["ops"].append({"op": name, **compared(times)})
    rows = [{"what": f"training step, {r['config']}", **r} for r in result["steps"]]
    rows += [{"what": r["op"], **r} for r in result["ops"]]
    print(f"\nafter (this tree) vs before ({args.baseline}); medians in ms")
    print(common.table(
        [{"what": r["what"], "before": ms(r["before"]["median_s"]),
          "after": ms(r["after"]["median_s"]), "ratio": r["ratio"], "paired": r["paired"]}
         for r in rows],
        [("what", "what"), ("before", "before ms"), ("after", "after ms"),
         ("ratio", "after/before"), ("paired", "paired")],
    ))  # fmt: skip
    return result


def allocator(args) -> dict:
    """Alternate processes with the malloc setting off and on."""
    code = (
        "import sys, statistics, time; sys.path.insert(0, {bench!r}); import common; "
        "from minilora import AdamW; common.set_threads({threads}, torch_too=False); "
        "b = common.CONFIGS[{name!r}]; m = common.build_model(b); x, y = common.batch(b); "
        "s = common.minilora_step(m, AdamW(m.parameters(), lr=1e-3), x, y); s(); s(); "
        "ts = []\nfor _ in range({repeats}):\n t = time.perf_counter(); s(); "
        "ts.append(time.perf_counter() - t)\nprint(statistics.median(ts))"
    )
    result = {"allocator": []}
    for name in args.configs.split(","):
        repeats = 3 if args.quick else (args.repeats or 10)
        src = code.format(bench=str(Path(__file__).parent), threads=args.threads, name=name,
                          repeats=repeats)  # fmt: skip
        medians = {"0": [], "1": []}
        for i in range(2 if args.quick else 4):
            for flag in ("0", "1") if i % 2 == 0 else ("1", "0"):
                env = {**os.environ, "MINILORA_KEEP_FREED_MEMORY": flag}
                out = subprocess.run([sys.executable, "-c", src], env=env, check=True,
                                     capture_output=True, text=True).stdout  # fmt: skip
                medians[flag].append(float(out.split()[-1]))
        off, on = statistics.median(medians["0"]), statistics.median(medians["1"])
        result["allocator"].append({"config": name, "default_malloc_s": medians["0"],
                                    "keep_freed_s": medians["1"], "ratio": on / off})  # fmt: skip
        print(f"{name}: default malloc {ms(off):.1f} ms, keep freed memory {ms(on):.1f} ms, "
              f"ratio {on / off:.2f} (medians of per-process medians)")  # fmt: skip
    return result


def main(argv=None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--baseline", default=BEFORE, help=f"git revision (default {BEFORE})")
    p.add_argument("--configs", default="tiny,small", help="comma-separated names")
    p.add_argument("--allocator", action="store_true", help="compare the malloc setting")
    args = p.parse_args(argv)
    common.set_threads(args.threads, torch_too=False)
    result = allocator(args) if args.allocator else engines(args)
    name = "compare_allocator" if args.allocator else "compare_engines"
    common.write_json(args.out, name, result, args)
    return result


if __name__ == "__main__":
    main()
