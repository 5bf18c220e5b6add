"""a5: a port is graded by running it on fresh inputs (minilora/course/ports.py).

The ports here are small Python scripts. ``PORT`` computes each case with minilora's own
layers from the inputs it is given, as a faithful port would; the others are what students
and forgers try: handing in the set ``minilora vectors --out`` writes, a rsLoRA scaling of
α/r, a port that never ends or leaves a process behind, files that are pipes or devices.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import safetensors.numpy

from minilora import cli
from minilora.course import grading, ports
from minilora.interop import vectors

# A port, written with minilora: read IN's manifest and inputs, compute every output and
# gradient, write OUT (inputs, outputs, gradients and the manifest), as examples/torch_vectors.py
# does with PyTorch. BUG (an edit of one line) turns it into a port with a bug.
PORT = """
import json, shutil, sys
from pathlib import Path
import safetensors.numpy
from minilora import backend
from minilora.interop import vectors

IN, OUT = Path(sys.argv[1]), Path(sys.argv[2])
manifest = json.loads((IN / "manifest.json").read_text())
for name, entry in manifest["cases"].items():
    stored = safetensors.numpy.load_file(str(IN / entry["file"]))
    grad_output = stored.pop("grad_output")
    arrays = {k: stored[k] for k in entry["inputs"]}  # in call order
    case = vectors.CASES[name]
    BUG = None
    with backend.use_ops("reference"):
        leaves, outputs = case.run({k: v.copy() for k, v in arrays.items()})
        outputs[case.backward_from].backward(grad_output)
    result = dict(arrays, grad_output=grad_output)
    result.update({k: t.data.copy() for k, t in outputs.items()})
    result.update({f"grad.{k}": leaves[k].grad.copy() for k in case.grads})
    safetensors.numpy.save_file(result, str(OUT / entry["file"]))
shutil.copy(IN / "manifest.json", OUT / "manifest.json")
"""


def write_port(folder: Path, source: str = PORT, command: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "my_port.py").write_text(source, encoding="utf-8")
    line = command or f"{sys.executable} my_port.py IN OUT"
    (folder / "port.txt").write_text(f"# my port\n\n{line}\n", encoding="utf-8")
    return folder


def lost(report: grading.Report) -> dict:
    return {t.id: t.failures for t in report.tasks if t.failures}


def test_a_port_that_computes_scores_full_marks_on_fresh_inputs(tmp_path):
    folder = write_port(tmp_path / "port")
    first = grading.grade("a5", folder)
    assert first.ok and first.earned == 10, first.format()
    assert first.seed_from == "fresh" and "fresh inputs" in first.format()
    second = grading.grade("a5", folder)
    assert second.ok and second.seed != first.seed  # drawn anew: nothing to copy
    assert grading.grade("a5", folder, seed=first.seed).seed_from == "--seed"


def test_the_handed_out_vectors_do_not_pass(tmp_path):
    """The set ``minilora vectors --out`` writes, copied to OUT, is minilora's answer for
    seed 0, not for the inputs the grader drew: every task fails."""
    vectors.write_vectors(tmp_path / "ref")
    copier = "import shutil, sys; shutil.copytree(sys.argv[1], sys.argv[2], dirs_exist_ok=True)"
    folder = write_port(
        tmp_path / "port", command=f"{sys.executable} my_port.py {tmp_path / 'ref'} OUT IN"
    )
    (folder / "my_port.py").write_text(copier, encoding="utf-8")
    report = grading.grade("a5", folder)
    assert report.earned == 0 and set(lost(report)) == {"a5.1", "a5.2", "a5.3"}
    assert "differs from minilora's" in lost(report)["a5.1"][0]


def test_the_inputs_hold_no_results_and_no_seed(tmp_path):
    manifest = vectors.write_inputs(tmp_path, 1234, ["lora_layer", "gpt_lora"])
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["seed"] is None and on_disk["seed"] is None
    assert sorted(on_disk["cases"]) == ["gpt_lora", "lora_layer"]
    for name, entry in on_disk["cases"].items():
        stored = safetensors.numpy.load_file(str(tmp_path / entry["file"]))
        roles = {k: entry["tensors"][k]["role"] for k in stored}
        assert set(roles.values()) <= {"input", "grad_output"} and "grad_output" in roles, name
        want = {k for k, e in entry["tensors"].items() if e["role"] in ("input", "grad_output")}
        assert set(stored) == want


def test_a_port_with_alpha_over_r_for_rslora_loses_a5_2_only(tmp_path):
    source = PORT.replace(
        "    BUG = None\n",
        "    if case.attrs.get('use_rslora'):\n"
        "        case = vectors._lora_layer_case(name, use_rslora=False)\n",
    )
    assert source != PORT
    report = grading.grade("a5", write_port(tmp_path, source))
    assert list(lost(report)) == ["a5.2"], report.format()
    assert "lora_layer_rslora/output" in lost(report)["a5.2"][0]


def test_a_port_that_fails_or_never_ends_costs_its_points_with_the_reason(tmp_path):
    crash = write_port(tmp_path / "crash", "raise SystemExit('my port is not done')")
    report = grading.grade("a5", crash)
    assert report.earned == 0
    assert lost(report)["a5.1"] == ["the port exited with status 1: my port is not done"]
    # it starts a child that would outlive it, then sleeps past the limit
    marker = tmp_path / "marker"
    child = f"import time; time.sleep(3); open({str(marker)!r}, 'w').close()"
    hang = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {child!r}])\n"
        "time.sleep(60)\n"
    )
    start = time.monotonic()
    tasks = [grading.assignments.get_assignment("a5").task("a5.1")]
    failures = ports.grade_port(tasks, write_port(tmp_path / "hang", hang), 7, None, timeout=1.0)
    assert time.monotonic() - start < 10
    assert failures == {"a5.1": ["the port ran longer than 1 s and was stopped"]}
    time.sleep(3.5)
    assert not marker.exists()  # the child was killed with the port


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_pipe_or_a_device_in_out_is_refused_without_blocking(tmp_path):
    evil = (
        "import json, os, shutil, sys\n"
        "IN, OUT = sys.argv[1], sys.argv[2]\n"
        "shutil.copy(os.path.join(IN, 'manifest.json'), OUT)\n"
        "os.mkfifo(os.path.join(OUT, 'linear.safetensors'))\n"
        "os.symlink('/dev/zero', os.path.join(OUT, 'lora_linear.safetensors'))\n"
    )
    start = time.monotonic()
    report = grading.grade("a5", write_port(tmp_path, evil), task="a5.1")
    assert time.monotonic() - start < 30
    (failure,) = lost(report)["a5.1"]
    assert "named pipe" in failure and "character device" in failure, failure


@pytest.mark.parametrize(
    "line, fragment",
    [
        (None, "has no port.txt: write your port's command in it"),
        ("python my_port.py 'IN OUT", "is not a command line"),
        ("python my_port.py", "must name the folders IN (the inputs"),
    ],
)
def test_a_bad_port_command_is_one_line_and_exit_2(tmp_path, capsys, line, fragment):
    if line is not None:
        (tmp_path / "port.txt").write_text(line + "\n", encoding="utf-8")
    assert cli.main(["grade", "a5", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1


def test_port_is_given_on_the_command_line_and_refused_for_a_package(tmp_path, capsys):
    folder = write_port(tmp_path)
    (folder / "port.txt").unlink()
    command = f"{sys.executable} my_port.py IN OUT"
    assert cli.main(["grade", "a5", str(folder), "--task", "a5.2", "--port", command]) == 0
    assert "a5.2" in capsys.readouterr().out
    assert cli.main(["grade", "a3", str(folder), "--port", command]) == 2
    assert "--port is for a porting assignment" in capsys.readouterr().err


def test_make_a5_writes_a_port_command_to_edit(tmp_path, capsys):
    assert cli.main(["assignments", "make", "a5", "--out", str(tmp_path)]) == 0
    assert f"write your port's command in {tmp_path / 'port.txt'}" in capsys.readouterr().out
    assert ports.port_command(tmp_path)[-3:] == ["my_port.py", "IN", "OUT"]


@pytest.mark.oracle
def test_the_pytorch_port_scores_full_marks_on_a5(tmp_path, monkeypatch):
    """examples/torch_vectors.py, an independent port (PyTorch and PEFT), passes a5."""
    pytest.importorskip("torch", reason="needs PyTorch: pip install -e '.[oracle]'")
    pytest.importorskip("peft", reason="needs PEFT: pip install -e '.[oracle]'")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = Path(__file__).resolve().parents[1]
    command = f"{sys.executable} -m examples.torch_vectors IN OUT"
    report = grading.grade("a5", root, port=command)
    assert report.ok and report.earned == 10, report.format()
