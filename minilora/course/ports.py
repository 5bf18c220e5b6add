"""a5: a port graded by running it on inputs nobody has seen.

``minilora grade a5 DIR`` reads the port's command from ``DIR/port.txt`` (or ``--port
"CMD"``), for example ``python my_port.py IN OUT``. It draws a fresh seed (``--seed``
repeats a run), writes to a new folder the inputs and upstream gradients of the graded
cases of minilora's reference vectors (docs/porting.md; no outputs, no gradients, no seed:
``vectors.write_inputs``), runs the command in ``DIR`` with ``IN`` and ``OUT`` replaced by
that folder and an empty one, and compares what the port wrote to ``OUT`` with minilora's
own results for that seed, tensor by tensor (``vectors.check_vectors``). The expected
results are computed after the port has finished and never leave this process, so a set
handed out by ``minilora vectors --out`` cannot pass: only a port that computes does.

The port runs in a session of its own; when it ends, or after ``timeout`` seconds, the whole
session is killed, so a process it started does not outlive the grading.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import signal
import subprocess
import tempfile
from pathlib import Path

from minilora.interop import vectors
from minilora.interop.files import read_file

PORT_FILE = "port.txt"  # the port's command, one line, in the submission's folder
TIMEOUT = 300.0  # seconds a port may run (the GPT case is the longest: well under one)
TASK_CASES = {  # each task of a5, graded by the cases of the reference vectors it names
    "a5.1": ("linear", "lora_linear"),
    "a5.2": ("lora_layer", "lora_layer_rslora"),
    "a5.3": ("gpt_lora",),
}


def fresh_seed() -> int:
    """A seed in [0, 2**31) that no one could have known before the run."""
    return secrets.randbelow(2**31)


def port_command(folder: Path, command: str | None = None) -> list[str]:
    """The port's argv: ``command``, or the first line of ``folder/port.txt`` that is not
    empty or a ``#`` comment, split as a shell would. It must name ``IN`` and ``OUT``."""
    where = "--port"
    if command is None:
        where = str(folder / PORT_FILE)
        if not os.path.lexists(folder / PORT_FILE):
            raise ValueError(
                f"{folder} has no {PORT_FILE}: write your port's command in it, for example "
                "'python my_port.py IN OUT', or give it with --port"
            )
        text = read_file(folder / PORT_FILE, "grade a5", "a text file", 4096)
        lines = text.decode("utf-8", errors="replace").splitlines()
        command = next((s for s in map(str.strip, lines) if s and not s.startswith("#")), "")
    try:
        argv = shlex.split(command)
    except ValueError as e:
        raise ValueError(f"{where}: {command!r} is not a command line: {e}") from None
    if "IN" not in argv or "OUT" not in argv:
        raise ValueError(
            f"{where}: {command!r} must name the folders IN (the inputs, written by the "
            "grader) and OUT (for the port's set), for example 'python my_port.py IN OUT'"
        )
    return argv


def run_port(argv: list[str], folder: Path, inputs: Path, out: Path, timeout: float) -> str:
    """Run the port; "" when it exits with status 0, else one line saying why not."""
    argv = [str(inputs) if a == "IN" else str(out) if a == "OUT" else a for a in argv]
    with tempfile.TemporaryFile() as log:
        try:
            process = subprocess.Popen(
                argv,
                cwd=folder,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        except OSError as e:
            return f"the port's command {argv[0]!r} could not start: {e.strerror or e}"
        try:
            status = process.wait(timeout)
        except subprocess.TimeoutExpired:
            return f"the port ran longer than {timeout:g} s and was stopped"
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # it, and whatever it started
            process.wait()
        if status == 0:
            return ""
        log.seek(max(0, log.seek(0, os.SEEK_END) - 4096))
        lines = log.read().decode("utf-8", errors="replace").strip().splitlines()
        return f"the port exited with status {status}" + (f": {lines[-1]}" if lines else "")


def grade_port(tasks, folder: Path, seed: int, command: str | None, timeout: float) -> dict:
    """``{task id: failure lines}`` for a port: fresh inputs in, its results compared."""
    argv = port_command(folder, command)
    cases = [case for t in tasks for case in TASK_CASES[t.id]]
    with tempfile.TemporaryDirectory(prefix="minilora-port-") as tmp:
        inputs, out = Path(tmp, "in"), Path(tmp, "out")
        vectors.write_inputs(inputs, seed, cases)
        out.mkdir()
        error = run_port(argv, folder, inputs, out, timeout)
        if error:
            return {t.id: [error] for t in tasks}
        return {t.id: _compare(out, TASK_CASES[t.id], seed) for t in tasks}


def _compare(out: Path, cases: tuple[str, ...], seed: int) -> list[str]:
    """The failure lines of the port's set in ``out`` for ``cases``, against minilora's."""
    try:
        report = vectors.check_vectors(out, cases, seed=seed)
    except (ValueError, FileNotFoundError) as e:
        return [f"the port's set in OUT: {e}"]
    bad = report.failures
    if not bad:
        return []
    shown = "; ".join(r.line() for r in bad[:3])
    more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
    return [f"{len(bad)} of {len(report.results)} tensors wrong: {shown}{more}"]
