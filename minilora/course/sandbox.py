"""The trusted side of grading: the student's code in a worker process, reached by proxy.

:class:`Worker` starts minilora/course/worker.py (by path, ``python -I -B``: nothing of the
installed ``minilora`` is imported there) on a copy of the submission in a scratch folder,
and talks to it over two pipes (the protocol is worker.py's). :class:`Remote` is the
student as a check sees it (the interface of ``student.InProcess``): its ``module(name)``
returns a :class:`Proxy`, a stand-in that forwards attribute access, calls, indexing,
iteration and ``+ - * / @ ** -`` to the worker and brings back values by copy and other
objects as new proxies. An exception raised by the student's code comes back as a
:class:`StudentError` (an instance of the built-in exception the student's derived from,
so ``getattr(obj, name, None)`` and ``except TypeError`` behave as in one process).

What the worker gets, on Linux (elsewhere what the platform has): a session of its own,
killed as a group when the check ends, and its other descendants swept (the grader is the
*subreaper* of its workers' orphans: a child that forks and calls ``setsid`` still comes
back to the grader, which kills it); death with the grader (``PR_SET_PDEATHSIG``); limits
on memory (``RLIMIT_AS``), CPU time, file size and, where it runs as another user,
processes; one BLAS thread; HOME, TMPDIR and the working folder in its scratch folder. Where
the grader runs as root, the worker runs as an unprivileged user (``nobody`` by default) who
owns only the scratch folder. A worker that dies, hangs or runs out of memory costs the
check it was serving, with one line saying so (:class:`WorkerLost`).
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import ctypes.util
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from minilora.course import worker as wire

WORKER_SCRIPT = Path(wire.__file__).resolve()
CAP = 1 << 28  # the longest message a worker may send: 256 MiB
STDERR_CAP = 1 << 24  # what a worker may write to its stderr file (and any file): 16 MiB
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
LIVE: set[int] = set()  # the workers not closed yet: never taken for orphans


class WorkerLost(BaseException):
    """The worker serving a check died, hung or broke the protocol: the check is lost.
    A BaseException, so that no ``except Exception`` in a check can swallow it."""


class StudentError(Exception):
    """An exception raised by the student's code in the worker: ``type_name``, ``message``
    and ``where`` (the innermost line of the student's package: file, line, function)."""

    def __init__(self, type_name: str, message: str, where):
        super().__init__(message)
        self.type_name, self.message, self.where = type_name, message, where


@functools.cache
def _error_class(base: str) -> type:
    """StudentError, also an instance of the built-in exception ``base`` names."""
    builtin = getattr(builtins, base, None)
    if not (isinstance(builtin, type) and issubclass(builtin, Exception)):
        return StudentError
    return type(f"Student{base}", (StudentError, builtin), {})


def clean(text: str) -> str:
    """A string from the worker made safe to print and to write as UTF-8."""
    return str(text).encode("utf-8", "replace").decode("utf-8")


@dataclass
class Limits:
    """What a worker may use: seconds per check, bytes of memory (address space), and the
    user it runs as when the grader is root (None: ``nobody``, if it can run Python)."""

    seconds: float = 60.0
    memory: int = 2 << 30
    user: str | None = None


def memory_text(limit: int) -> str:
    return f"{limit / 2**30:g} GiB" if limit >= 2**30 else f"{limit / 2**20:g} MiB"


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name and sys.platform == "linux" else None


@functools.cache
def become_subreaper() -> bool:
    """Make this process adopt its workers' orphans (Linux), so that none escapes the sweep."""
    libc = _libc()
    return bool(libc) and libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


@functools.cache
def can_run_as(user: str) -> bool:
    """Whether ``user`` can start this Python (its folders readable and searchable)."""
    try:
        run = subprocess.run(
            [sys.executable, "-I", "-c", "import numpy"],
            user=user,
            group=_group_of(user),
            extra_groups=[],
            capture_output=True,
            cwd="/",
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError, KeyError):
        return False
    return run.returncode == 0


def _group_of(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_gid


def worker_user(limits: Limits) -> str | None:
    """The user a worker runs as: ``limits.user`` (which must work), else ``nobody`` when
    this process is root and nobody can run Python; None: this process's user."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    if limits.user is not None:
        if not can_run_as(limits.user):
            raise ValueError(
                f"--user {limits.user}: that user cannot run {sys.executable} (no such user, "
                "or the interpreter's folders are not readable to it)"
            )
        return limits.user
    return "nobody" if can_run_as("nobody") else None


def _limit_child(memory: int, cpu_seconds: int, other_user: bool, parent: int):
    """The preexec function of a worker (runs in the child, after it changed user)."""
    libc = _libc()

    def limit():
        if libc is not None:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # the grader died before the line above
                raise ChildProcessError("the grader is gone")
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the cap fails instead
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (STDERR_CAP, STDERR_CAP))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if other_user:  # counts every process of the user: only sensible for a user of its own
            resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))

    return limit


def _proc_children(uid: int | None, since: int) -> list[int]:
    """This process's children (Linux /proc) that started at ``since`` clock ticks after
    boot or later and belong to ``uid``: the orphans it adopted from a worker."""
    found = []
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else []:
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            owner = os.stat(entry.path).st_uid
        except (OSError, ValueError):
            continue
        ppid, start = int(fields[1]), int(fields[19])
        if ppid == os.getpid() and start >= since and (uid is None or owner == uid):
            found.append(int(entry.name))
    return found


def _start_time(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError):
        return 0


class Worker:
    """One worker process serving one check: started on a fresh copy of the submission,
    told by :meth:`open` which targets run the reference, killed with its descendants by
    :meth:`close`. It starts importing the student's package as soon as it is made."""

    def __init__(self, package: Path, scratch: Path, protected: list, hidden: list, limits):
        self.limits, self.deadline = limits, None
        self.scratch = scratch
        for name in ("home", "tmp", "submission"):
            (scratch / name).mkdir(parents=True)
        shutil.copytree(
            package, scratch / "submission" / "minilora", ignore=_ignore, symlinks=False
        )
        user = worker_user(limits)
        self.uid = None
        if user is not None:
            import pwd

            entry = pwd.getpwnam(user)
            self.uid = entry.pw_uid
            for path in [scratch, *scratch.rglob("*")]:
                os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
        self.stderr_path = scratch / "stderr.txt"
        # the worker reads from_grader and writes to_grader
        self.read_fd, to_grader = os.pipe()
        from_grader, self.write_fd = os.pipe()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(scratch / "home"),
            "TMPDIR": str(scratch / "tmp"),
            "MINILORA_OPS": "reference",
            "LANG": "C.UTF-8",
            **{v: "1" for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")},
        }
        cpu = int(limits.seconds) + 5
        become_subreaper()
        with open(self.stderr_path, "wb") as stderr:
            if user is not None:
                os.chown(self.stderr_path, self.uid, _group_of(user))
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-B", str(WORKER_SCRIPT), str(from_grader), str(to_grader)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                pass_fds=(from_grader, to_grader),
                cwd=scratch / "home",
                env=env,
                start_new_session=True,
                preexec_fn=_limit_child(limits.memory, cpu, user is not None, os.getpid()),
                **(
                    {"user": user, "group": _group_of(user), "extra_groups": []}
                    if user is not None
                    else {}
                ),
            )
        LIVE.add(self.process.pid)
        os.close(from_grader)
        os.close(to_grader)
        self.started = _start_time(self.process.pid)
        self.folder = scratch / "submission"
        hello = {
            "folder": str(self.folder),
            "protected": protected,
            "hidden": hidden,
            "cap": 1 << 26,
        }
        with contextlib.suppress(OSError):  # a worker that died at once: open() says why
            wire.send(self.write_fd, hello, [])

    def open(self, swaps: list, deadline: float):
        """Send the swaps; the worker's answer, once it has imported the student's package
        (which it started on when it was made) and applied them: None, or the error raised
        on import (``{"type", "message", ...}``)."""
        self.deadline = deadline
        try:
            wire.send(self.write_fd, {"swaps": swaps}, [])
        except OSError:
            raise WorkerLost(self.death()) from None
        header, _ = self._receive()
        if "fatal" in header:
            raise WorkerLost(clean(header["fatal"]))
        return header.get("error")

    def _receive(self):
        try:
            return wire.receive(self.read_fd, CAP, self.deadline)
        except TimeoutError:
            raise WorkerLost(f"took longer than {self.limits.seconds:g} s") from None
        except (EOFError, OSError):
            raise WorkerLost(self.death()) from None
        except wire.ProtocolError as e:
            raise WorkerLost(f"the worker broke the protocol: {e}") from None

    def death(self) -> str:
        """Why the worker stopped answering, in one line."""
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        with contextlib.suppress(OSError), open(self.stderr_path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4000))
            lines = f.read().decode("utf-8", errors="replace").strip().splitlines()
            if lines:
                return f"the process died: {lines[-1].strip()[:300]}"
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else -code
            if -code == signal.SIGXCPU:
                return f"took longer than {self.limits.seconds:g} s (of CPU time)"
            return f"the process died: killed by signal {name}"
        return f"the process died: exit status {code}"

    def request(self, op: str, args: tuple, kwargs: dict | None = None):
        buffers: list = []
        header = {
            "op": op,
            "args": wire.pack(list(args), buffers, _handle_or_refuse),
            "kwargs": wire.pack(dict(kwargs or {}), buffers, _handle_or_refuse),
        }
        try:
            wire.send(self.write_fd, header, buffers)
        except OSError:
            raise WorkerLost(self.death()) from None
        header, buffers = self._receive()
        if "error" in header:
            raise self.error(header["error"])
        try:
            return wire.unpack(header.get("ok"), buffers, lambda i: Proxy(self, i))
        except (wire.ProtocolError, KeyError, ValueError, TypeError, IndexError) as e:
            raise WorkerLost(f"the worker broke the protocol: {e}") from None

    def error(self, data: dict) -> StudentError:
        if data.get("base") == "MemoryError" or data.get("type") == "MemoryError":
            raise WorkerLost(f"ran out of memory (limit {memory_text(self.limits.memory)})")
        where = data.get("where")
        if where is not None:
            where = (clean(where[0]), int(where[1]), clean(where[2]))
        cls = _error_class(str(data.get("base", "Exception")))
        return cls(clean(data.get("type", "Exception")), clean(data.get("message", "")), where)

    def close(self) -> None:
        """Kill the worker's session, then every orphan it left behind; reap them all."""
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        pid = self.process.pid
        for _ in range(200):
            try:
                os.killpg(pid, signal.SIGKILL)
                group_alive = True
            except (ProcessLookupError, PermissionError):
                group_alive = False
            with contextlib.suppress(ChildProcessError):
                self.process.poll()
            orphans = _proc_children(self.uid, self.started) if self.started else []
            orphans = [p for p in orphans if p != pid and p not in LIVE]
            for orphan in orphans:
                with contextlib.suppress(OSError):
                    os.kill(orphan, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(orphan, 0)
            if not group_alive and not orphans and self.process.returncode is not None:
                break
            time.sleep(0.01)
        LIVE.discard(pid)
        shutil.rmtree(self.scratch, ignore_errors=True)


def _ignore(folder, names):
    return [n for n in names if n == "__pycache__"]


def _handle_or_refuse(x) -> dict:
    if isinstance(x, Proxy):
        return {"t": "h", "id": object.__getattribute__(x, "_id")}
    raise TypeError(
        f"a check cannot hand a {type(x).__name__} to the student's code: only values "
        "(arrays, numbers, strings, dtypes, tuples, lists, dicts of them) and the student's "
        "own objects cross"
    )


class Proxy:
    """A stand-in for an object of the student's that lives in the worker."""

    __slots__ = ("_worker", "_id")

    def __init__(self, worker: Worker, id_: int):
        object.__setattr__(self, "_worker", worker)
        object.__setattr__(self, "_id", id_)

    def _ask(self, op, /, *args, **kwargs):
        return object.__getattribute__(self, "_worker").request(op, (self, *args), kwargs)

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)  # numpy's and Python's protocol probes stay here
        return self._ask("getattr", name)

    def __setattr__(self, name, value):
        self._ask("setattr", name, value)

    def __call__(self, *args, **kwargs):
        return self._ask("call", *args, **kwargs)

    def __getitem__(self, key):
        return self._ask("getitem", key)

    def __setitem__(self, key, value):
        self._ask("setitem", key, value)

    def __len__(self):
        return self._ask("len")

    def __iter__(self):
        return iter(self._ask("iter"))

    def __contains__(self, item):
        return self._ask("contains", item)

    def __bool__(self):
        return self._ask("bool")

    def __repr__(self):
        return clean(self._ask("repr"))


def _operator(name: str, reflected: bool = False):
    def method(self, *other):
        worker = object.__getattribute__(self, "_worker")
        return worker.request("operator", (name, self, *other), {"reflected": reflected})

    method.__name__ = f"__{'r' if reflected else ''}{name}__"
    return method


for _name in ("add", "sub", "mul", "truediv", "matmul", "pow"):
    setattr(Proxy, f"__{_name}__", _operator(_name))
    setattr(Proxy, f"__r{_name}__", _operator(_name, reflected=True))
Proxy.__neg__ = _operator("neg")


class Remote:
    """The student's ``minilora`` in a worker process: the interface of
    ``student.InProcess``, each answer a value or a :class:`Proxy`."""

    def __init__(self, worker: Worker):
        self.worker, self.modules = worker, {}

    def module(self, name: str):
        if name not in self.modules:
            self.modules[name] = self.worker.request("module", (name,))
        return self.modules[name]

    def is_tensor(self, x) -> bool:
        return isinstance(x, Proxy) and self.worker.request("is_tensor", (x,))

    def value(self, x):
        return self.worker.request("value", (x,)) if isinstance(x, Proxy) else x

    def same(self, a, b) -> bool:
        if not (isinstance(a, Proxy) and isinstance(b, Proxy)):
            return a is b
        return self.worker.request("same", (a, b))

    def id(self, x) -> int:
        return self.worker.request("id", (x,)) if isinstance(x, Proxy) else id(x)
