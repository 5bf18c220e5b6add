"""The grader: each task of an assignment checked by properties, in a process of its own.

``grade(name, folder)`` (``minilora grade NAME DIR``) starts a fresh Python with ``DIR``
first on its path and ``MINILORA_OPS=reference`` (so the fast path never shadows a
student's op), imports the ``minilora`` package found there (and refuses any other), and
runs every task's checks against it. Four modules come from the installed library instead,
so that a student's copy cannot change how it is graded: this one, ``assignments`` (the
manifest), ``checks`` (what each task must satisfy, minilora/course/checks.py) and ``gradcheck``.

Isolation: while a task is checked, every *other* target of the assignment is replaced by
the reference implementation, compiled from the installed library's source and bound to
the student's module (the student's source is that source, minus the stubs). One missing
or wrong function costs only its own task's points.

The checks (minilora/course/checks.py) draw their random shapes and values from a seed
derived from the submission (:func:`submission_seed`: the same code scores the same on
every run) unless one is given. A failure is one line a student can act on: what was
checked, which entry, the value found and the value expected, and a hint. Never a
traceback.

A task whose functions are the released reference's, but for comments, docstrings,
whitespace and local names (:func:`identical_to_reference`), is marked so beside its score,
for staff to judge; it changes no points.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import functools
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path

from minilora import backend, fast, functional
from minilora.course import assignments
from minilora.course.checks import CHECKS, CheckFailed, Context

F = functional
f64 = backend.float64


# ======================================================================================
# Inside the grading process: isolation and running the checks
# ======================================================================================


def reference_function(target: str, student_module, reference_root: Path):
    """The reference implementation of ``target``, compiled from the library's source in
    ``reference_root`` and bound to the student's module (its globals, its classes)."""
    module_name, qualname = assignments.split_target(target)
    fcode = _reference_code(reference_root / assignments.target_file(module_name), qualname)
    current = _lookup(student_module, qualname)
    owner_name = qualname.rpartition(".")[0]
    owner = _lookup(student_module, owner_name) if owner_name else None
    closure = tuple(types.CellType(owner) for _ in fcode.co_freevars) or None  # super()
    fn = types.FunctionType(
        fcode, student_module.__dict__, fcode.co_name, current.__defaults__, closure
    )
    fn.__kwdefaults__, fn.__qualname__ = current.__kwdefaults__, qualname
    return fn


@functools.cache
def _reference_code(path: Path, qualname: str) -> types.CodeType:
    """The code object of ``qualname``'s ``def`` in the source file ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    node = assignments.find_def(tree, qualname)
    owner_name, _, name = qualname.rpartition(".")
    # compiled inside a class of the same name, so that super() finds its __class__ cell
    fields = {"type_params": []} if sys.version_info >= (3, 12) else {}
    wrapped = ast.ClassDef(
        name=owner_name or "_", bases=[], keywords=[], body=[node], decorator_list=[], **fields
    )
    ast.copy_location(wrapped, node)
    module = ast.Module(body=[wrapped], type_ignores=[])
    code = compile(ast.fix_missing_locations(module), str(path), "exec")
    class_code = next(c for c in code.co_consts if isinstance(c, types.CodeType))
    return next(
        c for c in class_code.co_consts if isinstance(c, types.CodeType) and c.co_name == name
    )


def _lookup(module, qualname: str):
    obj = module
    for part in qualname.split("."):
        if part not in vars(obj):
            raise LookupError(
                f"{module.__name__} has no {qualname}: keep every function the assignment "
                "names, under its name (renamed or deleted?)"
            )
        obj = vars(obj)[part]
    return obj


def _assign(module, qualname: str, fn) -> None:
    owner_name, _, name = qualname.rpartition(".")
    setattr(_lookup(module, owner_name) if owner_name else module, name, fn)


@contextlib.contextmanager
def isolated(assignment, task, reference_root: Path):
    """Every target of ``assignment`` but ``task``'s runs the reference implementation."""
    swapped = []
    mine = set(task.targets)
    for other in assignment.tasks:
        for target in other.targets:
            if target in mine:
                continue
            module_name, qualname = assignments.split_target(target)
            module = importlib.import_module(f"minilora.{module_name}")
            swapped.append((module, qualname, _lookup(module, qualname)))
            _assign(module, qualname, reference_function(target, module, reference_root))
    try:
        yield
    finally:
        for module, qualname, original in reversed(swapped):
            _assign(module, qualname, original)


def describe_error(error: BaseException, student_root: Path) -> str:
    """One line for an exception raised by the student's code: what and where."""
    if isinstance(error, NotImplementedError):
        return f"not implemented: {error}"
    where = ""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        path = Path(frame.filename)
        # the innermost line of the student's package, above backend's helpers
        if path.is_relative_to(student_root) and path.name != "backend.py":
            where = (
                f" (in {path.relative_to(student_root.parent)}, line {frame.lineno}, {frame.name})"
            )
            break
    return f"your code raised {type(error).__name__}: {str(error).strip()}{where}"


class CheckTimeout(Exception):
    """A check ran past its time limit (a loop that never ends, say)."""


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise :class:`CheckTimeout` in the block after ``seconds`` (where the platform has
    SIGALRM, which Gradescope's Linux has; elsewhere only the whole run's timeout holds)."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise CheckTimeout(f"took longer than {seconds:g} s (a loop that never ends?)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_task(task, checks, seed: int, folder: Path, limit: float | None = None) -> list[str]:
    """The failure lines of one task's checks on ``folder`` (empty: full points), each
    check stopped after ``limit`` seconds."""
    failures = []
    for i, check in enumerate(checks):
        try:
            with backend.use_ops("reference"), time_limit(limit):
                check(Context(seed + 1000 * i, folder))
        except CheckTimeout as e:
            failures.append(f"{check.__name__} {e}")
        except CheckFailed as e:
            failures.append(str(e))
        except AssertionError as e:  # a hidden test written with assert
            failures.append(f"{check.__name__}: {e}" if str(e) else f"{check.__name__} failed")
        except (Exception, SystemExit) as e:  # whatever the student's code raises is a result
            failures.append(describe_error(e, folder / "minilora"))
    if any(not f.startswith("not implemented") for f in failures):
        failures.append(f"hint: {task.hint}")
    return failures


def load_extra_checks(folder) -> dict[str, list]:
    """Hidden tests: every ``check_a1_7*`` function in ``folder/*.py`` grades task a1.7."""
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


def worker(request: dict) -> dict:
    """Grade in this process (the student's ``minilora`` already imported): ``request`` has
    the assignment, task ids, seed, extra-tests folder and the reference source folder."""
    import minilora  # the student's

    # small matrices: one BLAS thread is fastest, and fair to others
    fast.process.set_num_threads(1)
    folder = Path(minilora.__file__).resolve().parent.parent
    assignment = assignments.get_assignment(request["assignment"])
    extra = load_extra_checks(request["extra_tests"]) if request["extra_tests"] else {}
    reference_root = Path(request["reference"])
    results = {}
    for task in assignment.tasks:
        if task.id not in request["tasks"]:
            continue
        checks = CHECKS[task.id] + extra.get(task.id, [])
        try:
            with isolated(assignment, task, reference_root):
                results[task.id] = run_task(
                    task, checks, request["seed"], folder, request["check_timeout"]
                )
        except LookupError as e:  # the student's package lacks a function the grader swaps
            results[task.id] = [str(e)]
    return results


# The grading process: the student's package first on the path (and nothing from the
# current folder: -I); then the grader's own modules from the installed library.
BOOTSTRAP = """
import importlib.util, json, sys
from pathlib import Path
folder, reference, request_file, result_file = sys.argv[1:5]
sys.path.insert(0, folder)
def answer(result):
    Path(result_file).write_text(json.dumps(result), encoding="utf-8")
try:
    import minilora
except BaseException as e:
    answer({"error": f"importing minilora from {folder} failed: {type(e).__name__}: {e}"})
    sys.exit(0)
found = Path(minilora.__file__).resolve().parent
if found != (Path(folder).resolve() / "minilora"):
    answer({"error": f"imported minilora from {found}, not from {folder}"})
    sys.exit(0)
try:
    import minilora.course
    for name in (
        "gradcheck", "course.assignments", "course.student", "course.checks", "course.grading"
    ):
        path = Path(reference, *name.split(".")).with_suffix(".py")
        spec = importlib.util.spec_from_file_location(f"minilora.{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        parent, _, attribute = name.rpartition(".")
        setattr(minilora.course if parent else minilora, attribute, module)
        spec.loader.exec_module(module)
    answer({"results": module.worker(json.loads(Path(request_file).read_text()))})
except BaseException as e:
    answer({"error": f"the grader could not run: {type(e).__name__}: {e}"})
"""


# ======================================================================================
# In the caller's process: start the grading process, report
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


@dataclass
class TaskResult:
    id: str
    title: str
    points: int
    failures: list[str]
    identical: bool = False  # its functions are the released reference's (for staff)

    @property
    def earned(self) -> int:
        return 0 if self.failures else self.points


@dataclass
class Report:
    assignment: str
    folder: str
    seed: int
    tasks: list[TaskResult]
    changed: list[str] = field(default_factory=list)  # files edited outside the tasks
    seed_from: str = "--seed"  # or "submission" (submission_seed), "fresh" (a port's inputs)

    @property
    def earned(self) -> int:
        return sum(t.earned for t in self.tasks)

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
    def seed_text(self) -> str:
        said = {"submission": " from the submission", "fresh": ", fresh inputs"}
        return f"seed {self.seed}{said.get(self.seed_from, '')}"

    @property
    def possible(self) -> int:
        return sum(t.points for t in self.tasks)

    @property
    def ok(self) -> bool:
        return all(not t.failures for t in self.tasks)

    def format(self) -> str:
        width = max(len(t.title) for t in self.tasks)
        lines = [
            f"minilora grade {self.assignment}: {self.folder} ({self.seed_text})",
            f"{'task':<6} {'title':<{width}}  points",
        ]
        for t in self.tasks:
            mark = ("ok" if not t.failures else "FAIL") + (
                "  identical to the reference" if t.identical else ""
            )
            lines.append(f"{t.id:<6} {t.title:<{width}}  {t.earned} of {t.points}  {mark}")
            lines += [f"       - {f}" for f in t.failures]
        lines.append(f"total: {self.earned} of {self.possible} points")
        return "\n".join(lines + ([self.note] if self.note else []))

    def gradescope(self) -> dict:
        """Gradescope's results.json: a visible test per task, and after a task whose code
        is identical to the reference a test of 0 points that only staff see ("hidden")."""
        tests = []
        for t in self.tasks:
            tests.append(
                {
                    "name": f"{t.id} {t.title}",
                    "score": t.earned,
                    "max_score": t.points,
                    "output": "\n".join(t.failures) or "passed",
                    "visibility": "visible",
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
        return {
            "score": self.earned,
            "output": "\n".join(
                filter(None, [f"minilora grade {self.assignment}, {self.seed_text}", self.note])
            ),
            "tests": tests,
        }

    def to_dict(self) -> dict:
        return {
            "assignment": self.assignment,
            "folder": self.folder,
            "seed": self.seed,
            "seed_from": self.seed_from,
            "earned": self.earned,
            "possible": self.possible,
            "changed": self.changed,
            "tasks": [
                {
                    "id": t.id,
                    "title": t.title,
                    "points": t.points,
                    "earned": t.earned,
                    "failures": t.failures,
                    "identical_to_reference": t.identical,
                }
                for t in self.tasks
            ],
        }


def grade(
    name: str,
    folder=".",
    task: str | None = None,
    seed: int | None = None,
    extra_tests=None,
    timeout: float = 900,
    check_timeout: float = 120,
    port: str | None = None,
) -> Report:
    """Grade the ``minilora`` package in ``folder`` on assignment ``name`` (one task with
    ``task``), in a separate process; ``seed`` None derives one from the submission
    (:func:`submission_seed`). A check is stopped
    after ``check_timeout`` seconds, the whole run after ``timeout``. For a port (a5),
    ``folder`` holds the port and ``port`` its command (default: ``folder/port.txt``), run
    on fresh inputs (minilora/course/ports.py)."""
    assignment = assignments.get_assignment(name)
    tasks = [assignment.task(task)] if task else list(assignment.tasks)
    folder = Path(folder)
    if extra_tests is not None and not Path(extra_tests).is_dir():
        raise ValueError(f"--extra-tests {extra_tests} is not a folder")
    if port is not None and not assignment.port:
        raise ValueError(f"--port is for a porting assignment; {name} grades a minilora/ package")
    if assignment.port:
        # imported here: the grading process loads this module beside a student's package,
        # and ports' vectors compute their cases on import, with the stubs
        from minilora.course import ports

        seed_from, seed = ("fresh", ports.fresh_seed()) if seed is None else ("--seed", seed)
        results = ports.grade_port(tasks, folder, seed, port, min(timeout, ports.TIMEOUT))
    else:
        seed_from = "submission" if seed is None else "--seed"
        seed = submission_seed(assignment, folder) if seed is None else seed
        results = _grade_package(
            assignment, tasks, seed, folder, extra_tests, timeout, check_timeout
        )
    report = [
        TaskResult(
            t.id, t.title, t.points, results[t.id], identical_to_reference(t, folder / "minilora")
        )
        for t in tasks
    ]
    changed = [] if assignment.port else assignments.changed_files(assignment, folder / "minilora")
    return Report(name, str(folder), seed, report, changed, seed_from)


def _grade_package(
    assignment, tasks, seed: int, folder: Path, extra_tests, timeout: float, check_timeout: float
) -> dict:
    """The student's ``minilora`` package in ``folder``, graded in a process of its own."""
    if not (folder / "minilora" / "__init__.py").is_file():
        raise ValueError(
            f"{folder} has no minilora/ package (expected {folder}/minilora/__init__.py)"
        )
    request = {
        "assignment": assignment.name,
        "tasks": [t.id for t in tasks],
        "seed": seed,
        "extra_tests": None if extra_tests is None else str(Path(extra_tests).resolve()),
        "reference": str(assignments.PACKAGE_DIR),
        "check_timeout": check_timeout,
    }
    with tempfile.TemporaryDirectory(prefix="minilora-grade-") as tmp:
        request_file, result_file = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request_file.write_text(json.dumps(request), encoding="utf-8")
        env = {**os.environ, "MINILORA_OPS": "reference"}
        # -I: nothing from the current folder or PYTHON* variables; -B: no __pycache__ in DIR
        argv = [sys.executable, "-I", "-B", "-c", BOOTSTRAP, str(folder.resolve())]
        argv += [request["reference"], str(request_file), str(result_file)]
        try:
            run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
            error = None if result_file.exists() else f"the grading process died: {_tail(run)}"
        except subprocess.TimeoutExpired:
            error = f"grading took longer than {timeout:g} s and was stopped"
        answer = json.loads(result_file.read_text()) if error is None else {"error": error}
    results = answer.get("results", {})
    return {t.id: results.get(t.id, [answer.get("error", "not run")]) for t in tasks}


def _tail(run: subprocess.CompletedProcess) -> str:
    lines = (run.stderr or run.stdout or f"exit status {run.returncode}").strip().splitlines()
    return lines[-1] if lines else f"exit status {run.returncode}"
