"""The grader against a student who attacks it: every attempt of issue 24's first item.

Each test hands in a copy of the reference whose ``lora_scaling`` (task a3.2) is replaced
by an attack, and grades it with small time limits: the attack must cost that task (or
that check) only, with one line saying why, and change nothing the grader trusts: the
score, the installed package, the report and results.json.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from minilora import cli
from minilora.course import assignments, grading, sandbox
from minilora.course import worker as wire

PACKAGE = assignments.PACKAGE_DIR
LINUX = sys.platform == "linux"
UNFINISHED = "grading did not finish"


def attacked(folder: Path, body: str) -> Path:
    """A reference copy in ``folder`` whose ``lora_scaling`` runs ``body`` (then returns
    the right value, so that only the attack can cost points)."""
    shutil.copytree(PACKAGE, folder / "minilora", ignore=shutil.ignore_patterns("__pycache__"))
    lora = folder / "minilora" / "lora.py"
    lines = textwrap.indent(textwrap.dedent(body), "    ")
    lora.write_text(
        lora.read_text(encoding="utf-8")
        + "\n\ndef lora_scaling(lora_alpha, r, use_rslora=False):\n"
        + lines
        + "\n    return lora_alpha / (r**0.5 if use_rslora else r)\n",
        encoding="utf-8",
    )
    return folder


@pytest.fixture
def markers():
    """A folder the worker can write to whatever user it runs as (for markers)."""
    folder = Path(tempfile.mkdtemp(prefix="minilora-attack-"))
    folder.chmod(0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def lost(report) -> dict:
    return {t.id: t.failures[0] for t in report.tasks if t.failures}


def test_a_stub_that_forges_the_results_and_exits_loses_its_check(tmp_path, capsys):
    results = tmp_path / "results.json"
    folder = attacked(
        tmp_path / "sub",
        f"""
        import json, os
        with open({str(results)!r}, "w") as f:
            json.dump({{"score": 15, "tests": []}}, f)
        os._exit(0)
        """,
    )
    argv = ["grade", "a3", str(folder), "--seed", "1", "--gradescope", str(results)]
    assert cli.main(argv) == 1
    assert "a3.2" in capsys.readouterr().out
    written = json.loads(results.read_text())
    assert written["score"] == 14  # every task but a3.2's one point
    failed = [t for t in written["tests"] if t["score"] < t["max_score"]]
    assert [t["name"][:4] for t in failed] == ["a3.2"]
    output = failed[0]["output"]  # as nobody (root grading) the write itself is refused
    assert "check_lora_scaling: the process died: exit status 0" in output or (
        "PermissionError: [Errno 13] Permission denied" in output
    )


def test_emptying_the_checks_table_changes_nothing(tmp_path):
    folder = attacked(
        tmp_path,
        """
        import minilora.course.checks as checks
        checks.CHECKS.clear()
        return 0.0
        """,
    )
    report = grading.grade("a3", folder, "a3.2", seed=1)
    assert report.earned == 0
    assert "lora_scaling(" in lost(report)["a3.2"] and "expected" in lost(report)["a3.2"]


def test_the_installed_checks_cannot_be_opened_from_the_students_code(tmp_path):
    installed = PACKAGE / "course" / "checks.py"
    before = installed.read_bytes()
    folder = attacked(
        tmp_path,
        f"""
        with open({str(installed)!r}, "a") as f:
            f.write("\\nCHECKS.clear()\\n")
        """,
    )
    report = grading.grade("a3", folder, "a3.2", seed=1)
    assert installed.read_bytes() == before and not report.tampered
    assert lost(report)["a3.2"].startswith("your code raised PermissionError: the grader refused")


def test_a_stub_that_runs_a_program_is_refused(tmp_path, markers):
    """A program started by the student's code would escape the audit hook: none starts."""
    marker = markers / "ran"
    folder = attacked(tmp_path, f"import os\nos.system('touch {marker}')")
    report = grading.grade("a3", folder, "a3.2", seed=1)
    assert lost(report)["a3.2"] == (
        "your code raised PermissionError: the grader runs no programs for your code "
        "(in minilora/lora.py, line "
        f"{(folder / 'minilora' / 'lora.py').read_text().count(chr(10)) - 1}, lora_scaling)"
    )
    assert not marker.exists()


def test_a_stub_that_loads_the_installed_reference_is_refused(tmp_path):
    folder = attacked(
        tmp_path,
        f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("ref", {str(PACKAGE / "lora.py")!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.lora_scaling(lora_alpha, r, use_rslora)
        """,
    )
    report = grading.grade("a3", folder, "a3.2", seed=1)
    assert "the grader refused to open" in lost(report)["a3.2"]
    assert "one of the grader's files" in lost(report)["a3.2"]


def test_a_changed_installed_file_makes_the_grader_refuse_to_report(tmp_path, monkeypatch, capsys):
    """Simulated: the digests after the run differ from those before."""
    calls = []
    real = grading.installed_digests

    def digests():
        calls.append(1)
        found = real()
        if len(calls) > 1:
            found["course/checks.py"] = "0" * 64
        return found

    monkeypatch.setattr(grading, "installed_digests", digests)
    folder = attacked(tmp_path / "sub", "pass")
    results = tmp_path / "results.json"
    argv = ["grade", "a3", str(folder), "--task", "a3.2", "--gradescope", str(results)]
    assert cli.main(argv) == 1
    out = capsys.readouterr().out
    assert out.strip().endswith(
        "refusing to report a score: these files of the installed minilora changed while "
        "grading: course/checks.py"
    )
    written = json.loads(results.read_text())
    assert written["score"] == 0 and "refusing to report" in written["output"]
    assert all(t["score"] == 0 for t in written["tests"])


def test_the_hidden_tests_never_reach_the_worker(tmp_path, monkeypatch):
    secret = "a-hidden-property-7f3a"
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "hidden_a3.py").write_text(
        "def check_a3_2_secret(ctx):\n"
        f"    assert ctx.module('lora').lora_scaling(2, 4) == 0.5, '{secret}'\n"
    )
    sent = []
    real_send = wire.send

    def send(fd, header, buffers):
        sent.append(json.dumps(header) + "".join(b.decode("latin-1") for b in buffers))
        real_send(fd, header, buffers)

    monkeypatch.setattr(wire, "send", send)
    folder = attacked(  # everything the worker could know, in its failure message
        tmp_path / "sub",
        """
        import os, sys
        raise RuntimeError(repr((sys.argv, dict(os.environ), open("/proc/self/cmdline").read())))
        """,
    )
    report = grading.grade("a3", folder, "a3.2", seed=1, extra_tests=hidden)
    shown = "\n".join(report.tasks[0].failures)
    assert "your code raised RuntimeError" in shown
    assert sent and all(secret not in m and str(hidden) not in m for m in sent)
    assert secret not in shown and str(hidden) not in shown


def test_bytes_that_are_not_utf8_still_give_a_report(tmp_path, capsys):
    folder = attacked(
        tmp_path / "sub",
        """
        import os, sys
        sys.stdout.buffer.write(b"\\xff\\xfe out\\n")
        sys.stderr.buffer.write(b"\\xff\\xfe\\xc3 err\\n")
        sys.stderr.flush()
        os._exit(3)
        """,
    )
    results, report = tmp_path / "results.json", tmp_path / "report.json"
    argv = ["grade", "a3", str(folder), "--task", "a3.2", "--gradescope", str(results)]
    assert cli.main([*argv, "--json", str(report)]) == 1
    assert "the process died: \ufffd\ufffd\ufffd err" in capsys.readouterr().out
    assert json.loads(results.read_text())["score"] == 0
    assert "\ufffd" in json.loads(report.read_text())["tasks"][0]["failures"][0]


@pytest.mark.skipif(not LINUX, reason="the sweep of orphans reads /proc")
def test_a_forked_child_does_not_outlive_the_grader(tmp_path, markers):
    folder = attacked(
        tmp_path,
        f"""
        import os, time
        if not os.path.exists("{markers}/started"):  # the first call only
            if os.fork() == 0:
                os.setsid()
                with open("{markers}/started", "w") as f:
                    f.write(str(os.getpid()))
                time.sleep(2)
                open("{markers}/late", "w").close()
                os._exit(0)
            time.sleep(0.5)  # the child has started
        """,
    )
    report = grading.grade("a3", folder, "a3.2", seed=1)
    assert report.ok, report.format()
    pid = int((markers / "started").read_text())
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped
    time.sleep(2)  # past the child's sleep
    assert not (markers / "late").exists()


def test_a_sleeping_import_costs_its_checks_within_the_limit(tmp_path):
    folder = attacked(tmp_path, "pass")
    init = folder / "minilora" / "__init__.py"
    init.write_text(init.read_text() + "\nimport time\ntime.sleep(10**6)\n")
    report = grading.grade("a3", folder, seed=1, check_timeout=3)
    assert report.earned == 0
    assert {f for f in lost(report).values()} == {"importing minilora failed: took longer than 3 s"}


def test_a_loop_that_swallows_the_time_out_loses_its_check(tmp_path):
    folder = attacked(
        tmp_path,
        """
        import time
        while True:
            try:
                time.sleep(0.01)
            except BaseException:
                pass
        """,
    )
    report = grading.grade("a3", folder, "a3.2", seed=1, check_timeout=3)
    assert lost(report) == {"a3.2": "check_lora_scaling_hard_cases: took longer than 3 s"}


def test_running_out_of_memory_loses_its_task_only(tmp_path):
    folder = attacked(tmp_path, "import numpy\nnumpy.ones(2**28)")  # 2 GiB of float64
    report = grading.grade("a3", folder, "a3.2", seed=1, memory=1 << 30)
    assert lost(report) == {
        "a3.2": "check_lora_scaling_hard_cases: ran out of memory (limit 1 GiB)"
    }


@pytest.mark.skipif(not LINUX, reason="signals and /proc")
def test_a_stopped_grader_writes_its_report_and_results(tmp_path, markers):
    folder = attacked(
        tmp_path / "sub",
        f"""
        import time
        open("{markers}/sleeping", "w").close()
        time.sleep(60)
        """,
    )
    results = tmp_path / "results.json"
    grader = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "minilora",
            "grade",
            "a3",
            str(folder),
            "--gradescope",
            str(results),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        while not (markers / "sleeping").exists() and grader.poll() is None:
            time.sleep(0.05)
        before = json.loads(results.read_text())  # written before grading, and after a3.1
        unfinished = [t["name"][:4] for t in before["tests"] if t["output"] == UNFINISHED]
        assert before["score"] == 2 and unfinished[0] == "a3.2"
    finally:
        grader.send_signal(signal.SIGTERM)
        out, _ = grader.communicate(timeout=60)
    assert grader.returncode == 1
    assert "not graded: the grader was stopped" in out
    written = json.loads(results.read_text())
    visible = [t for t in written["tests"] if t["visibility"] == "visible"]
    assert [t["name"][:4] for t in visible][:2] == ["a3.1", "a3.2"]
    assert visible[1]["output"].startswith("not graded: the grader was stopped")


@pytest.mark.skipif(
    not (LINUX and os.geteuid() == 0 and sandbox.can_run_as("nobody")),
    reason="needs root, and a Python that the user nobody can run",
)
def test_as_root_the_worker_cannot_write_outside_its_scratch(tmp_path):
    target = tmp_path / "grader-file.txt"
    target.write_text("the grader's")
    folder = attacked(
        tmp_path / "sub",
        f"""
        import ctypes, os
        libc = ctypes.CDLL(None)  # around the audit hook: only the user's rights remain
        fd = libc.open({str(target).encode()!r}, os.O_WRONLY | os.O_APPEND)
        if fd < 0:
            raise PermissionError("open failed with errno " + str(ctypes.get_errno()))
        """,
    )
    report = grading.grade("a3", folder, "a3.2", seed=1)
    assert "PermissionError: open failed" in lost(report)["a3.2"]
    assert target.read_text() == "the grader's"


@pytest.fixture
def own_tmp(monkeypatch):
    """A temporary folder for this test alone, for the graders it starts (``TMPDIR``) and for
    this process (``tempfile.tempdir``): a grader started by a test running beside it, which
    sweeps the scratch folders of killed graders first, does not look there."""
    folder = Path(tempfile.mkdtemp(prefix="minilora-tmp-"))
    folder.chmod(0o1777)  # as /tmp: a worker dropped to another user reads its scratch copy
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(not LINUX, reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_grader_takes_its_worker_along_and_leaves_valid_results(
    tmp_path, markers, own_tmp
):
    folder = attacked(
        tmp_path / "sub",
        f"""
        import os, time
        with open("{markers}/worker", "w") as f:
            f.write(str(os.getpid()))
        time.sleep(60)
        """,
    )
    results = tmp_path / "results.json"
    command = [sys.executable, "-m", "minilora", "grade", "a3", str(folder)]
    grader = subprocess.Popen(
        [*command, "--gradescope", str(results)],
        stdout=subprocess.PIPE,
        env={**os.environ, "TMPDIR": str(own_tmp)},
    )
    try:
        while not (markers / "worker").exists() and grader.poll() is None:
            time.sleep(0.05)
    finally:
        grader.kill()
        grader.communicate()
    pid = int((markers / "worker").read_text())
    for _ in range(600):  # the worker dies with the grader (a zombie counts as dead)
        stat = Path(f"/proc/{pid}/stat")
        if not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the worker {pid} outlived the grader")
    stale = list(own_tmp.glob(f"minilora-grade-{grader.pid}-*"))
    assert stale  # the killed grader's scratch folder, removed by the next grader
    grading.remove_stale_scratch()
    assert not any(p.exists() for p in stale)
    written = json.loads(results.read_text())  # after a3.1: a valid file, a3.2 unfinished
    shown = {t["name"][:4]: t["output"] for t in written["tests"] if t["visibility"] == "visible"}
    assert shown["a3.2"] == UNFINISHED


def test_the_hidden_tests_cannot_be_opened_even_by_a_student_who_guessed_the_path(tmp_path):
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "hidden_a3.py").write_text("def check_a3_2_secret(ctx):\n    pass\n")
    folder = attacked(tmp_path / "sub", f"open({str(hidden / 'hidden_a3.py')!r}).read()")
    report = grading.grade("a3", folder, "a3.2", seed=1, extra_tests=hidden)
    assert "your code raised PermissionError: the grader refused to open" in lost(report)["a3.2"]
