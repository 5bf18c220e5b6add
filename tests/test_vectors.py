"""Reference vectors for porters (minilora.interop.vectors, ``minilora vectors``).

What is promised, and tested here:

* a set written by minilora passes ``--check``, tensor by tensor, and two runs write
  byte-identical files (without touching the caller's random stream);
* a set with one tensor perturbed, missing, of the wrong dtype, or with a gradient for a
  frozen input fails, with a line naming that tensor and exit code 1; a subtle mistake (a
  layer-norm eps of 1e-6 instead of 1e-5) fails the float64 check;
* a set written by another implementation, PyTorch and PEFT (examples/torch_vectors.py),
  passes in float64 and float32, and the same port with one op wrong fails (oracle).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import minilora as ml
from minilora import backend, cli
from minilora import functional as F
from minilora.interop import vectors


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vectors") / "ref"
    vectors.write_vectors(folder)
    return folder


def copy_set(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit(folder: Path, case: str, change) -> None:
    """Rewrite one case file after ``change(tensors)`` edits its dict of arrays."""
    path = folder / f"{case}.safetensors"
    tensors = dict(safetensors.numpy.load_file(path))
    change(tensors)
    safetensors.numpy.save_file(tensors, path)


def failing(report) -> list[tuple[str, str]]:
    return [(r.case, r.tensor) for r in report.failures]


def check_cli(folder: Path, capsys, *extra: str) -> tuple[int, str]:
    rc = cli.main(["vectors", "--check", str(folder), *extra])
    return rc, capsys.readouterr().out


# --------------------------------------------------------------------------------------
# minilora's own set
# --------------------------------------------------------------------------------------


def test_minilora_set_passes_check_tensor_by_tensor(ref, capsys):
    manifest = json.loads((ref / "manifest.json").read_text())
    report = vectors.check_vectors(ref)
    assert report.ok and not report.failures
    n_tensors = sum(len(c["tensors"]) for c in manifest["cases"].values())
    assert len(report.results) == n_tensors  # one line per tensor, none skipped
    rc, out = check_cli(ref, capsys)
    assert rc == 0
    assert f"PASS: {n_tensors} of {n_tensors} tensors match" in out
    assert "ok       gpt_lora/grad.blocks.1.attn.v_proj.lora_A: grad" in out


def test_every_op_a_lora_layer_and_a_gpt_are_covered():
    ops = set(F.__all__) - {"unbroadcast"}
    assert ops <= set(vectors.CASES), ops - set(vectors.CASES)
    assert {"lora_layer", "lora_layer_rslora", "gpt_lora"} <= set(vectors.CASES)


def test_manifest_describes_every_file(ref):
    text = (ref / "manifest.json").read_text()
    manifest = json.loads(text)
    assert text == json.dumps(manifest, indent=2, sort_keys=True) + "\n"  # sorted keys
    assert manifest["format"] == "minilora.vectors" and manifest["format_version"] == "1"
    assert (manifest["seed"], manifest["dtype"]) == (0, "float64")
    assert manifest["tolerances"] == vectors.TOLERANCES
    assert sorted(p.name for p in ref.iterdir()) == sorted(
        ["manifest.json", *(c["file"] for c in manifest["cases"].values())]
    )
    for name, case in manifest["cases"].items():
        tensors = safetensors.numpy.load_file(ref / case["file"])
        assert sorted(tensors) == sorted(case["tensors"]), name
        for key, entry in case["tensors"].items():
            assert list(tensors[key].shape) == entry["shape"], (name, key)
            assert tensors[key].dtype.name == entry["dtype"], (name, key)
            if entry["role"] in ("output", "grad"):
                assert (entry["rtol"], entry["atol"]) == (1e-9, 1e-12)
        grads = {k[5:] for k in case["tensors"] if k.startswith("grad.")}
        assert grads == set(case["requires_grad"]), name
        assert not grads & set(case["no_grad"]), name
    gpt = manifest["cases"]["gpt_lora"]
    assert gpt["no_grad"] and all(".lora_" not in k for k in gpt["no_grad"])  # base frozen
    assert manifest["cases"]["lora_layer"]["no_grad"] == ["weight", "bias"]


def test_two_runs_write_byte_identical_files_and_leave_the_seed_alone(tmp_path):
    ml.manual_seed(5)
    vectors.write_vectors(tmp_path / "a")
    after = backend.default_generator().normal((4,))
    ml.manual_seed(5)
    expected = backend.default_generator().normal((4,))
    np.testing.assert_array_equal(after, expected)  # the caller's stream did not move
    ml.manual_seed(123)
    vectors.write_vectors(tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_another_seed_gives_other_inputs(tmp_path):
    vectors.write_vectors(tmp_path / "s1", seed=1)
    assert vectors.check_vectors(tmp_path / "s1").ok
    a = safetensors.numpy.load_file(tmp_path / "s1" / "gelu.safetensors")["x"]
    b = vectors.compute_case(vectors.CASES["gelu"], seed=0)["x"]
    assert not np.array_equal(a, b)


def test_cli_out_writes_the_set(tmp_path, capsys):
    assert cli.main(["vectors", "--out", str(tmp_path / "v"), "--dtype", "float32"]) == 0
    assert "wrote 30 cases (float32, seed 0)" in capsys.readouterr().out
    assert json.loads((tmp_path / "v" / "manifest.json").read_text())["dtype"] == "float32"


# --------------------------------------------------------------------------------------
# Sets that must fail
# --------------------------------------------------------------------------------------

PERTURB = [
    ("gelu", "output"),
    ("gpt_lora", "grad.blocks.1.attn.v_proj.lora_A"),
    ("gpt_lora", "loss"),
    ("lora_layer_rslora", "merged_weight"),
    ("softmax_cross_entropy", "grad.logits"),
    ("layer_norm", "x"),  # an input: it must be minilora's, bit for bit
    ("dropout", "grad_output"),
]


@pytest.mark.parametrize(("case", "tensor"), PERTURB)
def test_one_perturbed_tensor_fails_and_is_named(ref, tmp_path, capsys, case, tensor):
    folder = copy_set(ref, tmp_path / "bad")

    def nudge(t):  # one element, by 1e-7 relative: 100x the float64 tolerance
        a = t[tensor].copy()
        a.reshape(-1)[-1] *= 1 + 1e-7
        t[tensor] = a

    edit(folder, case, nudge)
    report = vectors.check_vectors(folder)
    assert not report.ok
    assert failing(report) == [(case, tensor)]
    rc, out = check_cli(folder, capsys)
    assert rc == 1
    assert f"MISMATCH {case}/{tensor}:" in out
    assert out.strip().endswith("tensors match, 1 do not")


def test_missing_tensor_file_and_frozen_gradient_fail(ref, tmp_path, capsys):
    folder = copy_set(ref, tmp_path / "bad")
    edit(folder, "gelu", lambda t: t.pop("grad.x"))
    edit(folder, "lora_layer", lambda t: t.update({"grad.weight": np.zeros((5, 6))}))
    (folder / "embedding.safetensors").unlink()
    report = vectors.check_vectors(folder)
    assert sorted(failing(report)) == [
        ("embedding", "*"),
        ("gelu", "grad.x"),
        ("lora_layer", "grad.weight"),
    ]
    rc, out = check_cli(folder, capsys, "--quiet")
    assert rc == 1
    assert "MISSING  gelu/grad.x" in out
    assert "MISMATCH lora_layer/grad.weight: a gradient for a frozen input" in out
    assert "MISSING  embedding/*" in out
    assert "ok " not in out  # --quiet prints only the failures and the verdict


def test_wrong_dtype_or_shape_fails(ref, tmp_path):
    folder = copy_set(ref, tmp_path / "bad")
    edit(folder, "gelu", lambda t: t.update({"output": t["output"].astype(np.float32)}))
    edit(folder, "sum", lambda t: t.update({"output": t["output"][None]}))
    report = vectors.check_vectors(folder)
    assert sorted(failing(report)) == [("gelu", "output"), ("sum", "output")]
    details = {r.case: r.detail for r in report.failures}
    assert "float32 (2, 3, 4), expected float64 (2, 3, 4)" in details["gelu"]
    assert "(1, 2, 4), expected float64 (2, 4)" in details["sum"]


def test_a_wrong_layer_norm_eps_fails_the_float64_check(ref, tmp_path):
    """A port with eps 1e-6 instead of 1e-5: outputs move by ~5e-6 relative, far outside
    the float64 tolerance (a float32 check could not see this; the float64 set can)."""
    folder = copy_set(ref, tmp_path / "eps")

    def wrong_eps(t):
        x, w, b = (ml.Tensor(t[k], requires_grad=True) for k in ("x", "weight", "bias"))
        y = F.layer_norm(x, w, b, eps=1e-6)
        y.backward(t["grad_output"])
        t.update({"output": y.data, "grad.x": x.grad, "grad.weight": w.grad, "grad.bias": b.grad})

    edit(folder, "layer_norm", wrong_eps)
    report = vectors.check_vectors(folder)
    assert {c for c, _ in failing(report)} == {"layer_norm"}
    assert ("layer_norm", "output") in failing(report)


def test_float32_set_checks_with_float32_tolerances(tmp_path):
    folder = tmp_path / "f32"
    vectors.write_vectors(folder, dtype="float32")
    assert vectors.check_vectors(folder).ok

    def scale(factor):
        def change(t):
            t["logits"] = (t["logits"] * np.float32(factor)).astype(np.float32)

        return change

    edit(folder, "gpt_lora", scale(1 + 2e-7))  # a rounding-size difference: allowed
    assert vectors.check_vectors(folder).ok
    edit(folder, "gpt_lora", scale(1 + 1e-3))  # a real one: refused
    assert failing(vectors.check_vectors(folder)) == [("gpt_lora", "logits")]


def test_case_option_checks_a_port_in_progress(ref, tmp_path, capsys):
    folder = tmp_path / "partial"
    folder.mkdir()
    shutil.copy(ref / "manifest.json", folder)
    shutil.copy(ref / "gelu.safetensors", folder)
    shutil.copy(ref / "linear.safetensors", folder)
    rc, out = check_cli(folder, capsys, "--case", "gelu", "--case", "linear")
    assert rc == 0 and "PASS" in out
    assert not vectors.check_vectors(folder).ok  # the other cases are missing
    assert vectors.check_vectors(folder, cases=["gelu"]).ok


def test_a_folder_that_is_not_a_vector_set_is_an_error(ref, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no folder"):
        vectors.check_vectors(tmp_path / "nothing")
    folder = copy_set(ref, tmp_path / "bad")
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        vectors.check_vectors(folder)
    manifest = json.loads((ref / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "format_version": "9"}))
    with pytest.raises(ValueError, match="format_version='9'"):
        vectors.check_vectors(folder)
    with pytest.raises(ValueError, match="unknown cases"):
        vectors.check_vectors(ref, cases=["nope"])
    assert cli.main(["vectors", "--check", str(folder)]) == 2  # an error, not a mismatch
    assert "minilora vectors: error: vectors --check:" in capsys.readouterr().err
    (folder / "gelu.safetensors").write_bytes(b"\x00" * 5)  # a corrupt case file
    (folder / "manifest.json").write_text(json.dumps(manifest))
    report = vectors.check_vectors(folder)
    assert (
        failing(report) == [("gelu", "*")]
        and "not a valid safetensors" in report.failures[0].detail
    )


# --------------------------------------------------------------------------------------
# Another implementation: PyTorch and PEFT (oracle)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_vectors():
    pytest.importorskip("torch", reason="the cross check needs PyTorch: pip install -e '.[oracle]'")
    pytest.importorskip("peft", reason="the cross check needs PEFT: pip install -e '.[oracle]'")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from examples import torch_vectors

    return torch_vectors


@pytest.mark.oracle
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_pytorch_and_peft_set_passes_the_check(torch_vectors, tmp_path, dtype, capsys):
    vectors.write_vectors(tmp_path / "ref", dtype=dtype)
    out = torch_vectors.write_torch_vectors(tmp_path / "ref", tmp_path / "torch")
    differ = 0  # really computed by PyTorch, not copied: rounding shows somewhere
    for name in vectors.CASES:
        ours = safetensors.numpy.load_file(tmp_path / "ref" / f"{name}.safetensors")
        theirs = safetensors.numpy.load_file(out / f"{name}.safetensors")
        differ += sum(not np.array_equal(ours[k], theirs[k]) for k in ours)
    assert differ >= 5
    report = vectors.check_vectors(out)
    assert report.ok, "\n".join(r.line() for r in report.failures)
    rc, text = check_cli(out, capsys)
    assert rc == 0 and "PASS" in text


@pytest.mark.oracle
def test_a_pytorch_port_with_a_wrong_op_fails_the_check(torch_vectors, tmp_path, monkeypatch):
    """The exact (erf) GELU instead of GPT-2's tanh approximation: a classic porting slip,
    ~1e-3 off, caught in the gelu case and named tensor by tensor."""
    vectors.write_vectors(tmp_path / "ref")
    exact = lambda t, a: torch_vectors.F.gelu(t["x"])  # noqa: E731
    monkeypatch.setitem(torch_vectors.OPS, "gelu", exact)
    report = vectors.check_vectors(
        torch_vectors.write_torch_vectors(tmp_path / "ref", tmp_path / "t")
    )
    assert failing(report) == [("gelu", "output"), ("gelu", "grad.x")]
