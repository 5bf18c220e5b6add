"""Where a training step's time goes: matmuls, other op math, the optimizer, the engine.

One training step (forward, backward, AdamW) is instrumented:

* **matmul**: time inside ``backend.matmul`` (every matrix product in minilora goes
  through it), attributed to the op that called it;
* **other ops**: the rest of each ``Function.forward`` / ``Function.backward`` (softmax,
  layer norm, GELU, reshapes, sums ...);
* **optimizer**: ``AdamW.step``;
* **engine**: everything else: building the graph (``Function.__call__``, checks, module
  calls), walking it backwards, summing gradients that fan out, freeing saved arrays.

The limit the engine can approach is the time of its matmuls alone: the matrix products
of the step, recorded with their very operands, are replayed back to back with NumPy
(and with PyTorch, which shows how much of the gap to PyTorch is its faster BLAS). The
plain step, the instrumented step and the replays alternate in one run.

    python benchmarks/breakdown.py [--quick] [--threads N] [--configs small,medium]
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import common
from common import CONFIGS, ms

from minilora import AdamW, autograd, backend, fast, functional

DEFAULT_REPEATS = {"tiny": 20, "small": 10, "medium": 6}
MATMULS = ((backend, "matmul"), (functional, "mm"), (fast.ops, "mm"))


def _function_classes():
    """Every ``Function`` subclass (recursively) that defines its own forward/backward."""
    todo, out = list(autograd.Function.__subclasses__()), []
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


class Instrument:
    """A context manager that times matmuls and every op's forward and backward.

    ``record=True`` also keeps each matmul's operands (for the replay), which keeps those
    arrays alive: use it for one step only.
    """

    def __init__(self, record: bool = False):
        self.record = record
        self.operands: list[tuple[str, object, object]] = []
        self.reset()

    def reset(self) -> None:
        self.matmul_s = 0.0
        self.ops = defaultdict(float)  # (op, "forward"/"backward") -> seconds, matmul included
        self.op_matmul = defaultdict(float)  # (op, phase) -> seconds in matmul
        self._current = None

    def __enter__(self) -> Instrument:
        # every module's own name for the product (fast.py's attention calls fast.ops.mm)
        self._saved = [(m, n, getattr(m, n)) for m, n in MATMULS]
        original = backend.matmul

        def timed_matmul(a, b, name: str = "matmul"):
            t0 = time.perf_counter()
            out = original(a, b, name)
            dt = time.perf_counter() - t0
            self.matmul_s += dt
            if self._current is not None:
                self.op_matmul[self._current] += dt
            if self.record:
                self.operands.append((name, a, b))
            return out

        for module, name, _ in self._saved:
            setattr(module, name, timed_matmul)
        for cls in _function_classes():
            for phase in ("forward", "backward"):
                if phase in vars(cls):
                    self._saved.append((cls, phase, vars(cls)[phase]))
                    setattr(cls, phase, self._timed(cls.__name__, phase, vars(cls)[phase]))
        return self

    def _timed(self, op: str, phase: str, fn):
        key = (op, phase)

        def wrapper(fn_self, *args):
            outer, self._current = self._current, key
            t0 = time.perf_counter()
            try:
                return fn(fn_self, *args)
            finally:
                self.ops[key] += time.perf_counter() - t0
                self._current = outer

        return wrapper

    def __exit__(self, *exc) -> None:
        for owner, name, value in reversed(self._saved):
            setattr(owner, name, value)


def _phased_step(model, optimizer, x, y) -> dict:
    """One step, timing its three phases."""
    t0 = time.perf_counter()
    _, loss = model(x, y)
    t1 = time.perf_counter()
    optimizer.zero_grad()
    loss.backward()
    t2 = time.perf_counter()
    optimizer.step()
    t3 = time.perf_counter()
    return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "step": t3 - t0}


def run(name: str, repeats: int, with_torch: bool) -> dict:
    bench = CONFIGS[name]
    model = common.build_model(bench)
    x, y = common.batch(bench)
    twin = common.torch_twin(model) if with_torch else None
    optimizer = AdamW(model.parameters(), lr=1e-3)
    plain = common.minilora_step(model, optimizer, x, y)
    plain()  # creates the optimizer state

    with Instrument(record=True) as rec:  # the operands of one step, for the replays
        _phased_step(model, optimizer, x, y)
    operands = [(a, b) for _, a, b in rec.operands]
    shapes = [(n, tuple(a.shape), tuple(b.shape)) for n, a, b in rec.operands]
    del rec

    def replay_numpy():
        for a, b in operands:
            a @ b  # noqa: B018  (the product is the work being timed)

    per_step: list[dict] = []
    inst = Instrument()

    def instrumented():
        inst.reset()
        with inst:
            phases = _phased_step(model, optimizer, x, y)
        ops = sum(inst.ops.values())
        per_step.append(
            {
                **phases,
                "matmul": inst.matmul_s,
                "other_ops": ops - inst.matmul_s,
                "engine": phases["forward"] + phases["backward"] - ops,
                "ops": dict(inst.ops),
                "op_matmul": dict(inst.op_matmul),
            }
        )

    fns = {"step": plain, "instrumented": instrumented, "matmuls_alone": replay_numpy}
    if twin is not None:
        torch = common.optional_torch()
        t_operands = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in operands]

        def replay_torch():
            for a, b in t_operands:
                a @ b  # noqa: B018

        fns["torch_matmuls_alone"] = replay_torch
        fns["torch_step"] = common.torch_step(*twin, x, y)
    times = common.alternate(fns, repeats, warmup=1)
    per_step = per_step[1:]  # drop the warm-up round

    def med(key):
        return statistics.median(s[key] for s in per_step)

    def share(key):
        return statistics.median(s[key] / s["step"] for s in per_step)

    categories = {
        k: {"median_s": med(k), "share": share(k)}
        for k in ("matmul", "other_ops", "optimizer", "engine")
    }
    op_names = sorted({k for s in per_step for k in s["ops"]}, key=lambda k: (k[0], k[1]))
    ops = []
    for key in op_names:
        total = statistics.median(s["ops"].get(key, 0.0) for s in per_step)
        mm_s = statistics.median(s["op_matmul"].get(key, 0.0) for s in per_step)
        ops.append({"op": key[0], "phase": key[1], "median_s": total, "matmul_s": mm_s})
    ops.sort(key=lambda r: -r["median_s"])
    result = {
        "config": name,
        "shape": bench.describe(),
        "matmuls_per_step": len(shapes),
        "matmul_flops": sum(2 * a[-1] * _prod(_out_shape(a, b)) for _, a, b in shapes),
        "step": common.summary(times["step"]),
        "instrumented_step": common.summary(times["instrumented"]),
        "instrumentation_overhead": common.ratio(times, "instrumented", "step"),
        "phases": {k: med(k) for k in ("forward", "backward", "optimizer")},
        "categories": categories,
        "matmul_share": categories["matmul"]["share"],
        "matmuls_alone": common.summary(times["matmuls_alone"]),
        "step_over_matmuls_alone": common.ratio(times, "step", "matmuls_alone"),
        "ops": ops,
        "matmul_shapes": [list(s) for s in shapes],
    }
    if twin is not None:
        result.update(
            {
                "torch_step": common.summary(times["torch_step"]),
                "torch_matmuls_alone": common.summary(times["torch_matmuls_alone"]),
                "step_over_torch_step": common.ratio(times, "step", "torch_step"),
                "numpy_over_torch_matmuls": common.ratio(
                    times, "matmuls_alone", "torch_matmuls_alone"
                ),
                "torch_step_over_torch_matmuls": common.ratio(
                    times, "torch_step", "torch_matmuls_alone"
                ),
            }
        )
    return result


def _out_shape(a: tuple, b: tuple) -> tuple:
    batch = tuple(max(x, y) for x, y in zip(a[:-2], b[:-2], strict=False)) or a[:-2] or b[:-2]
    return (*batch, a[-2], b[-1])


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def print_report(r: dict) -> None:
    step = r["step"]["median_s"]
    print(
        f"\n{r['config']} ({r['shape']}): step {ms(step):.1f} ms (median), "
        f"instrumented / plain step, paired by round: {r['instrumentation_overhead']['text']}"
    )
    rows = [
        {"part": k, "ms": ms(v["median_s"]), "share": f"{100 * v['share']:.0f}%"}
        for k, v in r["categories"].items()
    ]
    rows.append(
        {
            "part": "matmuls alone (NumPy replay)",
            "ms": ms(r["matmuls_alone"]["median_s"]),
            "share": f"step / this: {r['step_over_matmuls_alone']['text']}",
        }
    )
    if "torch_step" in r:
        rows.append(
            {
                "part": "matmuls alone (PyTorch replay)",
                "ms": ms(r["torch_matmuls_alone"]["median_s"]),
                "share": f"NumPy/PyTorch {r['numpy_over_torch_matmuls']['text']}",
            }
        )
        rows.append(
            {
                "part": "PyTorch step",
                "ms": ms(r["torch_step"]["median_s"]),
                "share": f"minilora/PyTorch {r['step_over_torch_step']['text']}",
            }
        )
    print(common.table(rows, [("part", "part"), ("ms", "median ms"), ("share", "share")]))
    top = [
        {
            "op": f"{o['op']}.{o['phase']}",
            "ms": ms(o["median_s"]),
            "mm": ms(o["matmul_s"]),
            "rest": ms(o["median_s"] - o["matmul_s"]),
        }
        for o in r["ops"][:12]
    ]
    print("ops (the 12 slowest):")
    print(
        common.table(top, [("op", "op"), ("ms", "ms"), ("mm", "of which matmul"), ("rest", "rest")])
    )


def main(argv=None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--configs", default="tiny,small,medium", help="comma-separated names")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch columns")
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    with_torch = not args.no_torch and common.optional_torch() is not None
    names = ["tiny"] if args.quick else args.configs.split(",")
    rows = []
    for name in names:
        repeats = 3 if args.quick else (args.repeats or DEFAULT_REPEATS.get(name, 6))
        rows.append(run(name, repeats, with_torch))
        print_report(rows[-1])
    result = {"rows": rows, "target": {"config": "medium", "matmul_share_at_least": 0.6}}
    medium = [r for r in rows if r["config"] == "medium"]
    if medium:
        result["target"]["matmul_share"] = medium[0]["matmul_share"]
        result["target"]["met"] = medium[0]["matmul_share"] >= 0.6
    common.write_json(args.out, "breakdown", result, args)
    return result


if __name__ == "__main__":
    main()
