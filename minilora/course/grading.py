"""The grader: each check of an assignment run by this (trusted) process against the
student's code in a worker process of its own.

``grade(name, folder)`` (``minilora grade NAME DIR``) copies the ``minilora`` package in
``DIR`` into a scratch folder and, for every check of every task, starts a fresh worker
(minilora/course/worker.py, under the limits of minilora/course/sandbox.py) that imports
that copy on the reference ops. The checks (minilora/course/checks.py), the expected
values, the hidden tests (``--extra-tests``, loaded here and never shown to the worker)
and the score stay in this process: a check reaches the student's code through proxies
(``sandbox.Remote``), and nothing the worker prints, writes or patches can set a score.
A worker that dies, hangs past the check's time limit or runs out of memory loses that
check only. The SHA-256 of every file of the installed package is taken before and after
the run: if one changed, the report refuses to give a score.

Isolation: while a task is checked, every *other* target of the assignment runs the
reference implementation (its source sent to the worker, compiled there into the student's
module: :func:`swaps`). One missing or wrong function costs only its own task's points. A
backward is graded with the student's own forward when the student wrote it (whatever it
saves for the backward), and with the reference forward while that forward is a stub.

A task's points are split equally among its checks (partial credit). The random shapes and
values come from a seed derived from the submission (:func:`submission_seed`: the same code
scores the same on every run) unless one is given. A failure is one line a student can act
on: what was checked, which entry, the value found and the value expected, and a hint.
Never a traceback.

A task whose functions are the released reference's, but for comments, docstrings,
whitespace and local names (:func:`identical_to_reference`), is marked so beside its score,
for staff to judge; it changes no points.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import functools
import hashlib
import importlib.util
import os
import shutil
import signal
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from minilora import backend
from minilora.course import assignments, sandbox
from minilora.course.checks import CHECKS, CheckFailed, Context

STOPPED = "not graded: the grader was stopped"
UNFINISHED = "grading did not finish"


class Stopped(BaseException):
    """SIGTERM or SIGINT reached the grader: it reports what it has."""


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and SIGINT raise :class:`Stopped` in the block (main thread only)."""

    def stop(signum, frame):
        raise Stopped(signal.Signals(signum).name)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ======================================================================================
# What the worker is told: the reference source of the other tasks' targets
# ======================================================================================


def is_stub(package: Path, target: str) -> bool:
    """Whether ``target`` in the student's ``package`` is still a stub (its body, after the
    docstring, starts with ``raise NotImplementedError``), or cannot be read."""
    module, qualname = assignments.split_target(target)
    try:
        source = (package / assignments.target_file(module)).read_text(encoding="utf-8")
        body = assignments.find_def(ast.parse(source), qualname).body
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError, RecursionError):
        return True
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    first = body[0]
    raised = (
        first.exc.func if isinstance(first, ast.Raise) and isinstance(first.exc, ast.Call) else None
    )
    return isinstance(raised, ast.Name) and raised.id == "NotImplementedError"


def own_forwards(task, package: Path) -> set[str]:
    """The ``forward`` of each class whose ``backward`` ``task`` grades, where the student
    wrote it (not a stub)."""
    forwards = {t.removesuffix(".backward") + ".forward" for t in task.targets}
    return {f for f in forwards if f.endswith(".forward") and not is_stub(package, f)}


@functools.cache
def _reference_source(name: str) -> tuple[str, ast.Module]:
    """The installed library's source of the package file ``name``, and its tree."""
    source = (assignments.PACKAGE_DIR / name).read_text(encoding="utf-8")
    return source, ast.parse(source)


def swaps(assignment, task, package: Path) -> list[list[dict]]:
    """What the worker compiles into the student's module, the ways a check may be run:
    for every target of the other tasks, the reference ``def``'s source, from the installed
    library. A backward whose forward the student wrote is graded with it first (whatever
    it saves for the backward), then, if that fails, with the reference forward: a correct
    pair never loses points, and a wrong forward costs only its own task."""
    own = own_forwards(task, package)
    ways = [_swaps(assignment, set(task.targets) | own)]
    return ways + [_swaps(assignment, set(task.targets))] if own else ways


def _swaps(assignment, mine: set[str]) -> list[dict]:
    out = []
    for other in assignment.tasks:
        for target in other.targets:
            if target in mine or any(s["target"] == target for s in out):
                continue
            module, qualname = assignments.split_target(target)
            source, tree = _reference_source(assignments.target_file(module))
            node = assignments.find_def(tree, qualname)
            lines = source.splitlines(keepends=True)[node.lineno - 1 : node.end_lineno]
            out.append(
                {
                    "target": target,
                    "module": module,
                    "qualname": qualname,
                    "source": textwrap.dedent("".join(lines)),
                    "line": node.lineno,
                    "file": f"<reference {assignments.target_file(module)}>",
                }
            )
    return out


def installed_digests() -> dict[str, str]:
    """SHA-256 of every file of the installed package the grader runs on (``*.py`` and the
    handouts), by path relative to the package."""
    root = assignments.PACKAGE_DIR
    paths = [*root.rglob("*.py"), *assignments.HANDOUT_DIR.rglob("*")]
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(paths)
        if p.is_file() and "__pycache__" not in p.parts
    }


# ======================================================================================
# Running the checks
# ======================================================================================


def describe_error(error: BaseException) -> str:
    """One line for an exception raised by the student's code: what and where."""
    if isinstance(error, NotImplementedError):
        return f"not implemented: {error}"
    if isinstance(error, sandbox.StudentError):
        name, message, found = error.type_name, error.message, error.where
        where = f" (in {found[0]}, line {found[1]}, {found[2]})" if found else ""
        saved = ""
        if isinstance(error, AttributeError) and found and found[2] == "backward":
            saved = (
                "; a backward reads what its forward saved: with your forward still a stub, "
                "the reference forward runs, and saves the names the stub's comment lists"
            )
        return f"your code raised {name}: {message.strip()}{where}{saved}"
    return f"your code raised {type(error).__name__}: {str(error).strip()}"


class CheckTimeout(BaseException):
    """A check ran past its time limit in this process (a hidden test that never ends); a
    BaseException, so that no ``except Exception`` in a check swallows it."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise :class:`CheckTimeout` in the block after ``seconds``, where the platform has
    SIGALRM and this is the main thread; the worker's answers have their own deadline."""
    import threading

    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise CheckTimeout(f"took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def verdict(check, ctx: Context) -> str | None:
    """None if ``check`` passes on ``ctx``, else its one-line failure."""
    try:
        check(ctx)
    except CheckFailed as e:
        return str(e)
    except AssertionError as e:  # a hidden test written with assert
        return f"{check.__name__}: {e}" if str(e) else f"{check.__name__} failed"
    except sandbox.WorkerLost as e:
        return f"{check.__name__}: {e}"
    except (Exception, SystemExit) as e:  # whatever the student's code raises is a result
        return describe_error(e)
    return None


@dataclass
class CheckResult:
    name: str
    failure: str | None
    hidden: bool = False  # from --extra-tests
    seconds: float = 0.0


@dataclass
class Run:
    """One grading run's settings and state: limits, the end of the whole run, the scratch
    folder, and an import failure seen once (the same for every later check)."""

    package: Path
    limits: sandbox.Limits
    deadline: float
    timeout: float
    scratch: Path
    protected: list[str]
    hidden: list[str]  # SHA-256 of the hidden tests' folders: refused, never named
    import_failure: str | None = None
    count: int = 0

    spare: sandbox.Worker | None = None

    def worker(self) -> sandbox.Worker:
        """A worker for the next check; the one after it starts importing meanwhile."""
        taken = self.spare or self.start()
        self.spare = self.start()
        return taken

    def start(self) -> sandbox.Worker:
        self.count += 1
        scratch = self.scratch / f"check-{self.count}"
        return sandbox.Worker(self.package, scratch, self.protected, self.hidden, self.limits)

    def close(self) -> None:
        if self.spare is not None:
            self.spare.close()

    def check(self, check, seed: int, ways: list[list]) -> str | None:
        """Run one check against a fresh worker for each way of swapping (:func:`swaps`)
        until one passes: None, else the first way's failure."""
        failures = [self.check_once(check, seed, swapped) for swapped in ways[:1]]
        for swapped in ways[1:]:
            if failures[0] is None or self.import_failure is not None:
                break
            if self.check_once(check, seed, swapped) is None:
                return None
        return failures[0]

    def check_once(self, check, seed: int, swaps_: list) -> str | None:
        """Run one check against a fresh worker; None if it passes."""
        if self.import_failure is not None:
            return self.import_failure
        left = self.deadline - time.monotonic()
        if left <= 0:
            return f"not graded: the whole run took longer than {self.timeout:g} s"
        seconds = min(self.limits.seconds, left)
        worker = self.worker()
        try:
            try:  # the import has a limit of its own, as long as a check's
                error = worker.open(swaps_, time.monotonic() + seconds)
            except sandbox.WorkerLost as e:
                if "took longer" in str(e) or "died" in str(e):  # on import: every check
                    self.import_failure = f"importing minilora failed: {e}"
                return self.import_failure or str(e)
            if error is not None:
                self.import_failure = (
                    f"importing minilora from {self.package.parent} failed: "
                    f"{sandbox.clean(error['type'])}: {sandbox.clean(error['message'])}"
                )
                return self.import_failure
            seconds = min(self.limits.seconds, self.deadline - time.monotonic())
            worker.deadline = time.monotonic() + seconds
            ctx = Context(seed, self.package.parent, student=sandbox.Remote(worker))
            with backend.use_ops("reference"), time_limit(seconds):
                return verdict(check, ctx)
        except CheckTimeout as e:
            return f"{check.__name__}: {e}"
        finally:
            worker.close()


def run_checks(task, checks, seed: int, check_one) -> list[CheckResult]:
    """Each of ``checks`` run by ``check_one(check, seed)``, with its time."""
    results = []
    for i, (check, hidden) in enumerate(checks):
        start = time.monotonic()
        failure = check_one(check, seed + 1000 * i)
        results.append(CheckResult(check.__name__, failure, hidden, time.monotonic() - start))
    return results


def failure_lines(task, results: list[CheckResult]) -> list[str]:
    """The failures of a task's checks, each said once (a stub fails every check alike), and
    the task's hint under any that is not a stub's."""
    failures = list(dict.fromkeys(r.failure for r in results if r.failure is not None))
    if any(not f.startswith(("not implemented", "not graded")) for f in failures):
        failures.append(f"hint: {task.hint}")
    return failures


def load_extra_checks(folder) -> dict[str, list]:
    """Hidden tests: every ``check_a1_7*`` function in ``folder/*.py`` grades task a1.7.
    They run in the grader's process, like the checks: they reach the student's code
    through ``ctx`` (``ctx.module("lora")``), never by importing ``minilora``."""
    extra: dict[str, list] = {}
    for path in sorted(Path(folder).glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"_minilora_extra_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for name, fn in vars(module).items():
            parts = name.split("_")
            if name.startswith("check_a") and len(parts) >= 3 and callable(fn):
                extra.setdefault(f"{parts[1]}.{parts[2]}", []).append(fn)
    return extra


# ======================================================================================
# The seed, copies of the reference
# ======================================================================================


def submission_files(assignment, folder: Path) -> list[Path]:
    """The files a submission is graded on: the assignment's graded files in ``folder``'s
    ``minilora/``."""
    return [folder / name for name in assignments.graded_files(assignment)]


def submission_seed(assignment, folder) -> int:
    """The seed of a run given none: SHA-256 over the names (relative to ``folder``) and
    contents of :func:`submission_files`, its first four bytes as an integer halved into
    [0, 2**31). The same code gets the same seed; an edit to a graded file, another.
    A missing file counts as missing; a path that is not a regular file (a pipe, a
    device) is never opened."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in submission_files(assignment, folder):
        data = path.read_bytes() if path.is_file() else None
        size = -1 if data is None else len(data)
        digest.update(f"{path.relative_to(folder).as_posix()}\0{size}\0".encode())
        digest.update(data or b"")
    return int.from_bytes(digest.digest()[:4], "big") >> 1


class _Canonical(ast.NodeTransformer):
    """Docstrings dropped, and each local name (``names``) renamed ``v#0``, ``v#1``, ... in
    the order the tree is walked: attribute names, globals and called functions stay."""

    def __init__(self, names: set[str]):
        self.names, self.renamed = names, {}

    def rename(self, name: str) -> str:
        if name not in self.names:
            return name
        return self.renamed.setdefault(name, f"v#{len(self.renamed)}")

    def visit_Name(self, node):
        node.id = self.rename(node.id)
        return node

    def visit_arg(self, node):
        node.arg = self.rename(node.arg)
        return self.generic_visit(node)  # its annotation

    def visit_ExceptHandler(self, node):
        node.name = node.name and self.rename(node.name)
        return self.generic_visit(node)

    def generic_visit(self, node):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and (
            isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
        return super().generic_visit(node)


def canonical_function(source: str, qualname: str) -> str:
    """``qualname``'s ``def`` in ``source`` as :class:`_Canonical` writes it (``ast.dump``):
    equal for two functions that differ only in comments, docstrings, whitespace and the
    names of their arguments and local variables."""
    node = copy.deepcopy(assignments.find_def(ast.parse(source), qualname))
    names, declared = set(), set()
    for n in ast.walk(node):
        if isinstance(n, ast.arg):
            names.add(n.arg)
        elif isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load):
            names.add(n.id)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            names.add(n.name)
        elif isinstance(n, (ast.Global, ast.Nonlocal)):
            declared.update(n.names)
    return ast.dump(_Canonical(names - declared).visit(node))


def identical_to_reference(task, package: Path) -> bool:
    """Whether every target of ``task`` in the student's ``package`` equals the released
    reference's (the installed library's source) by :func:`canonical_function`. A task
    with no targets (a port's), or a file that is missing or does not parse, is not."""
    for target in task.targets:
        module, qualname = assignments.split_target(target)
        name = assignments.target_file(module)
        if not (package / name).is_file():
            return False
        try:
            theirs = canonical_function((package / name).read_text(encoding="utf-8"), qualname)
        except (UnicodeDecodeError, SyntaxError, ValueError, RecursionError):
            return False
        ours = (assignments.PACKAGE_DIR / name).read_text(encoding="utf-8")
        if theirs != canonical_function(ours, qualname):
            return False
    return bool(task.targets)


IDENTICAL_NOTE = (
    "for staff: this task's functions equal the released reference but for comments, "
    "docstrings, whitespace and local names; no points were taken"
)


def points_text(x: float) -> str:
    """``2``, ``1.33``: points as the table and results.json show them."""
    return f"{round(x, 2):g}"


@dataclass
class TaskResult:
    id: str
    title: str
    points: int
    failures: list[str]
    identical: bool = False  # its functions are the released reference's (for staff)
    checks: list[CheckResult] = field(default_factory=list)

    def share(self, hidden: bool | None = None) -> tuple[float, float]:
        """(earned, possible) of the checks (the hidden ones, the others, or all): a task's
        points split equally among its checks."""
        if not self.checks:
            return (0.0 if self.failures else self.points), self.points
        each = self.points / len(self.checks)
        mine = [c for c in self.checks if hidden is None or c.hidden == hidden]
        return each * sum(c.failure is None for c in mine), each * len(mine)

    @property
    def earned(self) -> float:
        return self.share()[0]

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.checks)


@dataclass
class Report:
    assignment: str
    folder: str
    seed: int
    tasks: list[TaskResult]
    changed: list[str] = field(default_factory=list)  # files edited outside the tasks
    seed_from: str = "--seed"  # or "submission" (submission_seed), "fresh" (a port's inputs)
    tampered: list[str] = field(default_factory=list)  # installed files changed by the run
    chosen: str = ""  # how the graded folder was chosen among several
    stopped: bool = False  # the grader was stopped before the end
    caution: str = ""  # for the instructor: a protection that could not be had here

    @property
    def earned(self) -> float:
        return 0.0 if self.tampered else sum(t.earned for t in self.tasks)

    @property
    def note(self) -> str:
        """For the instructor: what the student changed outside the assignment's functions
        (the grader's own modules come from the installed library whatever they say)."""
        if not self.changed:
            return ""
        return (
            "note: outside the assignment's functions, these files differ from the installed "
            f"minilora's: {', '.join(self.changed)}"
        )

    @property
    def refusal(self) -> str:
        if not self.tampered:
            return ""
        return (
            "refusing to report a score: these files of the installed minilora changed while "
            f"grading: {', '.join(self.tampered)}"
        )

    @property
    def seed_text(self) -> str:
        said = {"submission": " from the submission", "fresh": ", fresh inputs"}
        return f"seed {self.seed}{said.get(self.seed_from, '')}"

    @property
    def possible(self) -> int:
        return sum(t.points for t in self.tasks)

    @property
    def ok(self) -> bool:
        return not self.tampered and all(not t.failures for t in self.tasks)

    def format(self) -> str:
        width = max(len(t.title) for t in self.tasks)
        lines = [f"minilora grade {self.assignment}: {self.folder} ({self.seed_text})"]
        lines += [x for x in (self.chosen, self.caution) if x]
        lines.append(f"{'task':<6} {'title':<{width}}  points")
        for t in self.tasks:
            mark = ("ok" if not t.failures else "FAIL") + (
                "  identical to the reference" if t.identical else ""
            )
            score = f"{points_text(t.earned)} of {t.points}"
            lines.append(f"{t.id:<6} {t.title:<{width}}  {score}  {mark}")
            lines += [f"       - {f}" for f in t.failures]
        lines.append(f"total: {points_text(self.earned)} of {self.possible} points")
        return "\n".join(lines + [x for x in (self.note, self.refusal) if x])

    def gradescope(self) -> dict:
        """Gradescope's results.json: a visible test per task, one shown after the grades
        are published for its hidden checks (``--extra-tests``), and after a task whose
        code is identical to the reference a test of 0 points that only staff see."""
        tests = []
        for t in self.tasks:
            for hidden in (False, True):
                earned, possible = t.share(hidden)
                mine = [c for c in t.checks if c.hidden == hidden]
                if hidden and not mine:
                    continue
                failures = [c.failure for c in mine if c.failure is not None]
                shown = failures + ([t.failures[-1]] if failures and not hidden else [])
                shown = shown if t.checks else t.failures  # not run: why
                tests.append(
                    {
                        "name": f"{t.id} {t.title}" + (" (hidden tests)" if hidden else ""),
                        "score": 0 if self.tampered else round(earned, 2),
                        "max_score": round(possible, 2),
                        "output": "\n".join(shown) or "passed",
                        "visibility": "after_published" if hidden else "visible",
                        "execution_time": round(sum(c.seconds for c in mine), 2),
                    }
                )
            if t.identical:
                tests.append(
                    {
                        "name": f"{t.id} identical to the reference",
                        "score": 0,
                        "max_score": 0,
                        "output": IDENTICAL_NOTE,
                        "visibility": "hidden",
                    }
                )
        head = f"minilora grade {self.assignment}, {self.seed_text}"
        return {
            "score": round(self.earned, 2),
            "output": "\n".join(
                filter(None, [head, self.chosen, self.caution, self.note, self.refusal])
            ),
            "execution_time": round(sum(t.seconds for t in self.tasks), 2),
            "tests": tests,
        }

    def to_dict(self) -> dict:
        return {
            "assignment": self.assignment,
            "folder": self.folder,
            "chosen": self.chosen,
            "seed": self.seed,
            "seed_from": self.seed_from,
            "earned": round(self.earned, 2),
            "possible": self.possible,
            "changed": self.changed,
            "tampered": self.tampered,
            "stopped": self.stopped,
            "tasks": [
                {
                    "id": t.id,
                    "title": t.title,
                    "points": t.points,
                    "earned": round(t.earned, 2),
                    "failures": t.failures,
                    "identical_to_reference": t.identical,
                    "checks": [
                        {"name": c.name, "passed": c.failure is None, "hidden": c.hidden}
                        for c in t.checks
                    ],
                }
                for t in self.tasks
            ],
        }


def unfinished(name: str, folder, task: str | None, why: str) -> Report:
    """The report of a run that has not finished: every check "not graded" (what
    ``--gradescope`` holds before grading starts)."""
    assignment = assignments.get_assignment(name)
    tasks = [assignment.task(task)] if task else list(assignment.tasks)
    return Report(name, str(folder), 0, [TaskResult(t.id, t.title, t.points, [why]) for t in tasks])


def find_package(root: Path) -> tuple[Path, str]:
    """The folder holding the ``minilora/`` package to grade under ``root``: ``root`` itself
    if it holds one, else the shallowest below it (alphabetical among equals; ``__MACOSX``
    and hidden folders skipped), with a note naming the others when there are several."""
    root = Path(root)
    if (root / "minilora" / "__init__.py").is_file():
        return root, ""
    found = sorted(
        (
            p.parent.parent
            for p in root.glob("**/minilora/__init__.py")
            if not any(part.startswith((".", "__MACOSX")) for part in p.relative_to(root).parts)
        ),
        key=lambda p: (len(p.relative_to(root).parts), str(p)),
    )
    if not found:
        raise ValueError(f"{root} has no minilora/ package (expected {root}/minilora/__init__.py)")
    if len(found) == 1:
        return found[0], ""
    names = ", ".join(str(p.relative_to(root) / "minilora") for p in found)
    return found[0], (
        f"graded {found[0].relative_to(root) / 'minilora'}: the shallowest of {len(found)} "
        f"minilora/ folders in the submission ({names})"
    )


def grade(
    name: str,
    folder=".",
    task: str | None = None,
    seed: int | None = None,
    extra_tests=None,
    timeout: float = 540,
    check_timeout: float = 60,
    memory: int = 2 << 30,
    user: str | None = None,
    progress=None,
    port: str | None = None,
) -> Report:
    """Grade the ``minilora`` package in ``folder`` (or the one :func:`find_package` finds
    below it) on assignment ``name`` (one task with ``task``): each check against a worker
    process of its own (``memory`` bytes at most, run as ``user`` when this is root). A
    check is stopped after ``check_timeout`` seconds, the whole run after ``timeout``;
    ``seed`` None derives one from the submission (:func:`submission_seed`).
    ``progress(report)`` is called with the report so far after each task. For a port (a5),
    ``folder`` holds the port and ``port`` its command (default: ``folder/port.txt``), run
    on fresh inputs (minilora/course/ports.py)."""
    assignment = assignments.get_assignment(name)
    tasks = [assignment.task(task)] if task else list(assignment.tasks)
    folder, chosen = Path(folder), ""
    if extra_tests is not None and not Path(extra_tests).is_dir():
        raise ValueError(f"--extra-tests {extra_tests} is not a folder")
    if port is not None and not assignment.port:
        raise ValueError(f"--port is for a porting assignment; {name} grades a minilora/ package")
    if assignment.port:
        return _grade_port(name, tasks, folder, seed, port, timeout)
    folder, chosen = find_package(folder)
    extra = load_extra_checks(extra_tests) if extra_tests else {}
    seed_from = "submission" if seed is None else "--seed"
    seed = submission_seed(assignment, folder) if seed is None else seed
    changed = assignments.changed_files(assignment, folder / "minilora")
    report = Report(name, str(folder), seed, [], changed, seed_from, chosen=chosen)
    before = installed_digests()
    try:
        limits = sandbox.Limits(check_timeout, memory, user)
        if os.name == "posix" and os.geteuid() == 0 and sandbox.worker_user(limits) is None:
            report.caution = (
                "caution: the student's code ran as root (the user nobody cannot run "
                f"{sys.executable}): give --user, or an interpreter every user can read"
            )
        _grade_package(report, assignment, tasks, folder, extra, limits, timeout, progress)
    except Stopped:
        report.stopped = True
    done = {t.id for t in report.tasks}
    report.tasks += [
        TaskResult(t.id, t.title, t.points, [STOPPED]) for t in tasks if t.id not in done
    ]
    after = installed_digests()
    report.tampered = sorted(
        k for k in before.keys() | after.keys() if before.get(k) != after.get(k)
    )
    return report


def _checks(task, extra: dict) -> list:
    return [(c, False) for c in CHECKS[task.id]] + [(c, True) for c in extra.get(task.id, [])]


def _grade_port(name: str, tasks, folder: Path, seed, port, timeout: float) -> Report:
    """A port, run on fresh inputs and compared here (minilora/course/ports.py)."""
    # imported here: ports' vectors compute their cases on import
    from minilora.course import ports

    seed_from, seed = ("fresh", ports.fresh_seed()) if seed is None else ("--seed", seed)
    results = ports.grade_port(tasks, folder, seed, port, min(timeout, ports.TIMEOUT))
    report = [TaskResult(t.id, t.title, t.points, results[t.id]) for t in tasks]
    return Report(name, str(folder), seed, report, [], seed_from)


def _task_result(task, results: list[CheckResult], package: Path) -> TaskResult:
    return TaskResult(
        task.id,
        task.title,
        task.points,
        failure_lines(task, results),
        identical_to_reference(task, package),
        results,
    )


SCRATCH_PREFIX = "minilora-grade-"  # then the grader's process id


def remove_stale_scratch() -> None:
    """Remove the scratch folders of graders that were killed outright (their process id,
    in the folder's name, is gone)."""
    for path in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-*"):
        pid = path.name[len(SCRATCH_PREFIX) :].partition("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:  # alive, another user's
            continue


def _grade_package(report, assignment, tasks, folder, extra, limits, timeout, progress) -> None:
    """The student's ``minilora`` package in ``folder``, each check in a worker of its own."""
    package = (folder / "minilora").resolve()
    protected = [str(assignments.PACKAGE_DIR)]  # not the hidden tests: their path stays here
    hidden = sorted(
        {
            hashlib.sha256(
                os.path.realpath(Path(c.__code__.co_filename).parent).encode()
            ).hexdigest()
            for checks in extra.values()
            for c in checks
        }
    )
    remove_stale_scratch()
    with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-") as scratch:
        os.chmod(scratch, 0o755)  # a worker of another user reaches its own folder in it
        run = Run(
            package, limits, time.monotonic() + timeout, timeout, Path(scratch), protected, hidden
        )
        try:
            _run_tasks(report, assignment, tasks, package, extra, run, progress)
        finally:
            run.close()


def _run_tasks(report, assignment, tasks, package, extra, run, progress) -> None:
    """Each task's checks, in order; ``progress`` told after each."""
    for t in tasks:
        ways = swaps(assignment, t, package)
        results = run_checks(
            t, _checks(t, extra), report.seed, lambda c, s, ways=ways: run.check(c, s, ways)
        )
        report.tasks.append(_task_result(t, results, package))
        if progress is not None:  # the tasks still to run, marked so
            rest = [TaskResult(r.id, r.title, r.points, [UNFINISHED]) for r in tasks]
            progress(dataclasses.replace(report, tasks=report.tasks + rest[len(report.tasks) :]))
