"""How the grader scores: a correct forward/backward pair never loses points (issue 24,
item 4), and what Gradescope gets (item 8): points per check, hidden tests baked into the
autograder and shown once grades are published, execution times, a whole-run limit, the
dependencies pinned, and the folder graded when a submission holds several."""

from __future__ import annotations

import ast
import json
import re
import shutil
import zipfile
from importlib import metadata
from pathlib import Path

from minilora import cli
from minilora.course import assignments, grading

PACKAGE = assignments.PACKAGE_DIR


def reference_copy(folder: Path) -> Path:
    shutil.copytree(PACKAGE, folder / "minilora", ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def lora_function_renamed(folder: Path) -> Path:
    """A reference copy whose LoRALinearFunction saves ``u`` as ``saved_u``: a correct pair
    that does not keep the reference forward's attribute names."""
    reference_copy(folder)
    path = folder / "minilora" / "functional.py"
    text = path.read_text(encoding="utf-8")
    node = assignments.find_def(ast.parse(text), "LoRALinearFunction.backward")
    start = text.index("class LoRALinearFunction")
    end = sum(len(line) for line in text.splitlines(keepends=True)[: node.end_lineno])
    body, count = re.subn(r"self\.u\b", "self.saved_u", text[start:end])
    assert count >= 2, "LoRALinearFunction no longer saves self.u"
    path.write_text(text[:start] + body + text[end:], encoding="utf-8")
    return folder


# --------------------------------------------------------------------------------------
# A correct pair never loses points
# --------------------------------------------------------------------------------------


def test_a_correct_pair_with_its_own_saved_names_scores_full_marks(tmp_path):
    folder = lora_function_renamed(tmp_path)
    for task in ("a3.3", "a3.4"):
        report = grading.grade("a3", folder, task, seed=3)
        assert report.ok, report.format()


def test_a_correct_backward_scores_while_its_forward_is_a_stub(tmp_path):
    package = assignments.make_copy("a3", tmp_path)
    path = package / "functional.py"
    text = path.read_text(encoding="utf-8")
    ours = (PACKAGE / "functional.py").read_text(encoding="utf-8")
    qualname = "LoRALinearFunction.backward"
    stub = assignments.find_def(ast.parse(text), qualname)
    ref = assignments.find_def(ast.parse(ours), qualname)
    lines = text.splitlines(keepends=True)
    lines[stub.lineno - 1 : stub.end_lineno] = ours.splitlines(keepends=True)[
        ref.lineno - 1 : ref.end_lineno
    ]
    path.write_text("".join(lines), encoding="utf-8")
    report = grading.grade("a3", tmp_path, "a3.4", seed=3)
    assert report.ok and report.earned == 4, report.format()


def test_the_backward_stub_states_what_the_forward_saves(tmp_path):
    package = assignments.make_copy("a3", tmp_path)
    text = (package / "functional.py").read_text(encoding="utf-8")
    stub = assignments.find_def(ast.parse(text), "LoRALinearFunction.backward")
    lines = text.splitlines()[stub.lineno - 1 : stub.end_lineno]
    assert "        #   self.u = u if need_B else None" in lines
    assert "        #   self.x_shape = x.shape" in lines


def test_a_backward_missing_an_attribute_is_told_what_the_forward_saves(tmp_path):
    """A backward that reads its own name while its forward is a stub: the message says
    which forward ran and where the names it saves are listed."""
    package = assignments.make_copy("a3", tmp_path)
    path = package / "functional.py"
    text = path.read_text(encoding="utf-8")
    stub = assignments.find_def(ast.parse(text), "LoRALinearFunction.backward")
    lines = text.splitlines(keepends=True)
    lines[stub.end_lineno - 1] = "        return self.my_saved_u\n"
    path.write_text("".join(lines), encoding="utf-8")
    failure = grading.grade("a3", tmp_path, "a3.4", seed=3).tasks[0].failures[0]
    assert "has no attribute 'my_saved_u'" in failure
    assert failure.endswith(
        "the reference forward runs, and saves the names the stub's comment lists"
    )


# --------------------------------------------------------------------------------------
# Gradescope
# --------------------------------------------------------------------------------------


def hidden_tests(folder: Path) -> Path:
    """Two hidden checks of a3.5 (2 points, two checks of its own): one passes, one fails."""
    folder.mkdir()
    (folder / "hidden_a3.py").write_text(
        "def check_a3_5_merged_flag(ctx):\n"
        "    layer = ctx.module('lora').LoRALinear(3, 3, r=1)\n"
        "    assert layer.merged is False, 'a new layer is not merged'\n\n\n"
        "def check_a3_5_never(ctx):\n"
        "    assert False, 'a hidden property'\n"
    )
    return folder


def test_points_are_split_among_a_tasks_checks(tmp_path, capsys):
    folder = reference_copy(tmp_path / "sub")
    results, hidden = tmp_path / "results.json", hidden_tests(tmp_path / "hidden")
    argv = ["grade", "a3", str(folder), "--task", "a3.5", "--seed", "1"]
    assert cli.main([*argv, "--extra-tests", str(hidden), "--gradescope", str(results)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"a3\.5 .* 1\.5 of 2  FAIL", out), out  # 3 of 4 checks, 0.5 each
    assert "total: 1.5 of 2 points" in out
    written = json.loads(results.read_text())
    assert written["score"] == 1.5
    tests = [t for t in written["tests"] if t["max_score"] > 0]
    assert [(t["visibility"], t["score"], t["max_score"]) for t in tests] == [
        ("visible", 1.0, 1.0),
        ("after_published", 0.5, 1.0),
    ]
    assert tests[1]["output"] == "check_a3_5_never: a hidden property"
    assert all(t["execution_time"] > 0 for t in tests) and written["execution_time"] > 0


def test_the_autograder_bakes_in_hidden_tests_and_pins_versions(tmp_path):
    hidden, out = hidden_tests(tmp_path / "hidden"), tmp_path / "autograder.zip"
    argv = ["assignments", "autograder", "a3", "--out", str(out), "--extra-tests", str(hidden)]
    assert cli.main(argv) == 0
    with zipfile.ZipFile(out) as z:
        assert z.read("hidden/hidden_a3.py") == (hidden / "hidden_a3.py").read_bytes()
        run = z.read("run_autograder").decode()
        setup = z.read("setup.sh").decode()
    assert "--extra-tests /autograder/source/hidden" in run
    for name in ("numpy", "safetensors", "regex"):
        assert f"{name}=={metadata.version(name)}" in setup
    assert "--no-deps /autograder/source/minilora-src" in setup


def test_the_whole_run_has_a_time_limit(tmp_path):
    report = grading.grade("a3", reference_copy(tmp_path), seed=1, timeout=1e-3)
    assert {f for t in report.tasks for f in t.failures} == {
        "not graded: the whole run took longer than 0.001 s"
    }
    assert report.earned == 0


def test_the_report_names_the_folder_it_chose(tmp_path, capsys):
    root = tmp_path / "submission"
    reference_copy(root / "b" / "work")
    assignments.make_copy("a3", root / "a")
    assignments.make_copy("a3", root / "__MACOSX")
    results = tmp_path / "results.json"
    argv = ["grade", "a3", str(root), "--task", "a3.2", "--gradescope", str(results)]
    assert cli.main(argv) == 1  # a/ (a stub) is the shallowest: graded
    chose = (
        "graded a/minilora: the shallowest of 2 minilora/ folders in the submission "
        "(a/minilora, b/work/minilora)"
    )
    assert chose in capsys.readouterr().out
    assert chose in json.loads(results.read_text())["output"]
