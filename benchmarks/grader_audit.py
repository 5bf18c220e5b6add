"""Audit the course grader: every wrong implementation caught on every seed, the reference
never failed, and how long a whole assignment takes to grade.

    python benchmarks/grader_audit.py                      # 20 and 400 seeds: long
    python benchmarks/grader_audit.py --mutation-seeds 2 --reference-seeds 5   # a look

Three parts, each through the grader's public API (``grading.grade``, a process per run):

1. every mutation of tests/test_assignments.py and tests/test_grader_mutations.py applied
   to a copy of the reference package, graded on seeds 0 .. N-1 (the whole assignment;
   for a4 the task a4.1, as a4.2 is a fine-tune): caught on a seed means exactly its own
   task lost points, with a failure containing the mutation's words;
2. the reference package graded on seeds 0 .. M-1 (a1, a2, a3 and a4.1), and a4.2 (the
   fine-tune, ten seconds a run) on seeds 0 .. K-1, separately: every failure is false;
3. each whole assignment (a4 with its fine-tune) graded one at a time, three times: the
   median seconds.

Parts 1 and 2 run ``--jobs`` grading processes at once; part 3 runs alone. Prints the
counts and times; nothing is asserted here (tests/test_grader_mutations.py asserts).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the mutation tables live with their tests

from test_assignments import FAST, PACKAGES, reference_copy  # noqa: E402
from test_assignments import MUTATIONS as FIRST_MUTATIONS  # noqa: E402
from test_grader_mutations import MUTATIONS, mutate  # noqa: E402

from minilora.course import grading  # noqa: E402


def caught(report, task_id: str, said: str) -> bool:
    lost = {t.id: t.failures for t in report.tasks if t.failures}
    return list(lost) == [task_id] and any(said in line for line in lost[task_id])


TABLE = FIRST_MUTATIONS + MUTATIONS


# Each grading runs in a process of its own (ProcessPoolExecutor): grade() kills every
# process its workers leave behind, so two gradings must never share a process.
def grade_mutation(job) -> tuple[int, int, bool]:
    i, seed, copy = job
    name, assignment, task_id, *_, said = TABLE[i]
    report = grading.grade(assignment, copy, FAST[assignment], seed)
    return i, seed, caught(report, task_id, said)


def grade_reference(job) -> list[str]:
    copy, name, task, seed = job
    report = grading.grade(name, copy, task, seed)
    return [f"{name} seed {seed} {t.id}: {t.failures[0]}" for t in report.tasks if t.failures]


def audit_mutations(folder: Path, seeds: range, jobs: int) -> list[tuple[str, list[int]]]:
    """(name, the seeds it escaped on) for every mutation."""
    copies = []
    for i, (_, _, _, filename, right, wrong, _) in enumerate(TABLE):
        copy = reference_copy(folder / f"m{i}")
        mutate(copy, filename, right, wrong)
        copies.append(copy)
    escaped = {i: [] for i in range(len(TABLE))}
    with ProcessPoolExecutor(jobs) as pool:
        jobs_ = [(i, seed, copies[i]) for i in range(len(TABLE)) for seed in seeds]
        for i, seed, ok in pool.map(grade_mutation, jobs_):
            if not ok:
                escaped[i].append(seed)
    return [(TABLE[i][0], escaped[i]) for i in range(len(TABLE))]


def audit_reference(copy: Path, runs: list[tuple[str, str | None, int]], jobs: int):
    """The reference in ``copy`` graded on each (assignment, task, seed): its failures."""
    with ProcessPoolExecutor(jobs) as pool:
        jobs_ = [(copy, *run) for run in runs]
        return [line for failures in pool.map(grade_reference, jobs_) for line in failures]


def time_assignments(copy: Path, repeats: int) -> dict[str, float]:
    """Median seconds to grade each whole assignment (a4 with its fine-tune), alone."""
    times = {}
    for name in PACKAGES:
        runs = []
        for seed in range(repeats):
            start = time.perf_counter()
            grading.grade(name, copy, None, seed)
            runs.append(time.perf_counter() - start)
        times[name] = statistics.median(runs)
    return times


def report_mutations(folder: Path, seeds: int, jobs: int) -> None:
    start = time.perf_counter()
    results = audit_mutations(folder, range(seeds), jobs)
    every = [name for name, escaped in results if not escaped]
    print(
        f"mutations caught on every seed: {len(every)} of {len(results)} "
        f"(seeds 0..{seeds - 1}; {time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    for name, escaped in results:
        if escaped:
            print(f"  escaped on seeds {escaped}: {name}")


def report_reference(copy: Path, what: str, runs: list, jobs: int) -> None:
    start = time.perf_counter()
    failures = audit_reference(copy, runs, jobs)
    print(
        f"reference, {what}: {len(failures)} false failures in {len(runs)} gradings "
        f"({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    for line in failures[:20]:
        print(f"  {line}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutation-seeds", type=int, default=20, help="0: skip part 1")
    parser.add_argument("--reference-seeds", type=int, default=400, help="0: skip part 2")
    parser.add_argument("--reference-first", type=int, default=0, help="part 2's first seed")
    parser.add_argument("--finetune-seeds", type=int, default=12, help="0: skip a4.2")
    parser.add_argument("--repeats", type=int, default=3, help="0: skip part 3")
    parser.add_argument("--jobs", type=int, default=2, help="grading processes at once")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="grader-audit-") as tmp:
        folder = Path(tmp)
        copy = reference_copy(folder / "reference")
        if args.mutation_seeds:
            report_mutations(folder, args.mutation_seeds, args.jobs)
        if args.reference_seeds:
            seeds = range(args.reference_first, args.reference_first + args.reference_seeds)
            runs = [(n, FAST[n], s) for s in seeds for n in PACKAGES]
            report_reference(
                copy, f"a1 a2 a3 a4.1 on seeds {seeds[0]}..{seeds[-1]}", runs, args.jobs
            )
        if args.finetune_seeds:
            seeds = range(args.finetune_seeds)
            runs = [("a4", "a4.2", s) for s in seeds]
            report_reference(copy, f"a4.2 (the fine-tune) on seeds 0..{seeds[-1]}", runs, args.jobs)
        if args.repeats:
            times = time_assignments(copy, args.repeats)
            shown = ", ".join(f"{n} {s:.1f} s" for n, s in times.items())
            print(f"seconds per whole assignment (median of {args.repeats}, alone): {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
