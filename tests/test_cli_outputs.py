"""Nothing overwritten, wasted or left half-written without a word: an --out that exists (a
file) or is not empty (a folder) is refused before any work unless --overwrite is given; a
fine-tune refuses before its first step an adapter it could not save; Ctrl-C ends a command
with one line and exit status 130, leaving no partial file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.numpy
from tokenizer_files import VOCAB_SIZE, write_small_tokenizer

from minilora import model
from minilora.cli import main
from minilora.course import assignments
from minilora.experiments import compare, demo
from minilora.interop import model_files, peft_adapters, vectors


@pytest.fixture
def outs(tmp_path) -> dict:
    """An existing file and a folder that holds one, each with content to keep."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("mine")
    (tmp_path / "model.safetensors").write_text("mine too")
    return {"folder": tmp_path / "folder", "file": tmp_path / "model.safetensors"}


def fails(*args, **kwargs):
    pytest.fail("the work started before --out was checked")


# argv ({folder}, {file}: the outs), and what must not be called before the refusal
EXISTING = {
    "demo": (["demo", "--out", "{folder}"], (demo, "run_demo")),
    "compare": (["compare", "--out", "{folder}"], (compare, "run_compare")),
    "pretrain": (["pretrain", "--out", "{file}"], (demo, "pretrain")),
    "finetune-lora": (["finetune", "--out", "{folder}"], (demo, "fine_tune_on_digit_task")),
    "finetune-full": (
        ["finetune", "--method", "full", "--out", "{file}"],
        (demo, "fine_tune_on_digit_task"),
    ),
    "finetune-text": (
        ["finetune", "--base", "b.safetensors", "--data", "d.txt", "--out", "{folder}"],
        (model_files, "load_model"),
    ),
    "merge": (["merge", "--adapter", "a", "--out", "{file}"], (peft_adapters, "load_adapter")),
    "vectors": (["vectors", "--out", "{folder}"], (vectors, "write_vectors")),
    "autograder": (
        ["assignments", "autograder", "a1", "--out", "{file}"],
        (assignments, "autograder_zip"),
    ),
}


@pytest.mark.parametrize("argv, work", EXISTING.values(), ids=EXISTING.keys())
def test_an_existing_output_is_refused_before_any_work(outs, monkeypatch, capsys, argv, work):
    monkeypatch.setattr(*work, fails)
    argv = [a.format(**outs) for a in argv]
    out = Path(argv[argv.index("--out") + 1])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"--out {out} " in err and "--overwrite" in err, err
    assert (outs["folder"] / "notes.txt").read_text() == "mine"
    assert outs["file"].read_text() == "mine too"


def test_overwrite_writes_into_an_existing_output_and_an_empty_folder_needs_none(
    outs, tmp_path, capsys
):
    quick = ["--steps", "1", "--batch-size", "2", "--no-progress"]
    assert main(["finetune", *quick, "--out", str(outs["folder"]), "--overwrite"]) == 0
    assert sorted(os.listdir(outs["folder"])) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "notes.txt",  # the files of other names stay
    ]
    assert (
        main(["finetune", "--method", "full", *quick, "--out", str(outs["file"]), "--overwrite"])
        == 0
    )
    assert model_files.load_model(outs["file"]).config == demo.load_base().config
    (tmp_path / "empty").mkdir()  # an empty folder is a fresh output (CI's mktemp -d)
    assert main(["finetune", *quick, "--out", str(tmp_path / "empty")]) == 0


def test_finetune_saves_a_gpt2_embedding_adapter_in_gpt2s_names(tmp_path, monkeypatch):
    """LoRA on a GPT-2's pos_emb (a minilora model file made from a GPT-2 folder) was refused
    before its first step while GPT-2's names held no embedding adapter; now it trains and
    is saved on transformer.wpe, as PEFT names it."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import load_memory

    shape = dict(vocab_size=VOCAB_SIZE, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    load_memory.write_gpt2_folder(tmp_path / "gpt2", shape)
    write_small_tokenizer(tmp_path / "gpt2" / "tokenizer.json")
    (tmp_path / "notes.txt").write_text("the low, the lower, the lowest; " * 40)
    argv = ["finetune", "--base", str(tmp_path / "gpt2"), "--data", str(tmp_path / "notes.txt")]
    argv += ["--targets", "pos_emb", "--steps", "2", "--out", str(tmp_path / "a"), "--no-progress"]
    assert main(argv) == 0
    names = safetensors.numpy.load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert any("wpe.lora_embedding_A" in name for name in names), sorted(names)


def _as_from_a_terminal() -> None:
    """In the child before it runs: SIGINT handled by default and not blocked, as in a
    command typed in a terminal (a process inherits an ignored or blocked SIGINT from its
    parent, and then Python leaves Ctrl-C ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_ctrl_c_during_a_real_run_leaves_no_partial_file(tmp_path):
    """``python -m minilora demo`` in a process of its own, sent SIGINT once it trains."""
    out = tmp_path / "demo"
    out.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-m", "minilora", "demo", "--no-progress", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=_as_from_a_terminal,
    )
    seen = []
    try:
        for line in child.stdout:  # the base is scored; the fine-tuning runs next
            seen.append(line)
            if line.startswith("base accuracy"):
                break
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130, (seen[-2:], err[-1000:])
    assert err == "minilora demo: interrupted\n"
    assert list(out.rglob("*")) == []  # stopped before its first file: nothing half-written


INTERRUPTED = {
    "demo": ["demo", "--quick", "--out", "{out}"],
    "compare": ["compare", "--quick", "--out", "{out}"],
    "pretrain": ["pretrain", "--steps", "5", "--out", "{out}/base.safetensors"],
    "finetune": ["finetune", "--steps", "5", "--out", "{out}/adapter"],
    "eval": ["eval"],
    "generate": ["generate", "--prompt", "D 3 1 ="],
    "vectors": ["vectors", "--out", "{out}/vectors"],
}


@pytest.mark.parametrize("argv", INTERRUPTED.values(), ids=INTERRUPTED.keys())
def test_ctrl_c_in_any_command_that_runs_the_model_is_one_line_and_status_130(
    tmp_path, monkeypatch, capsys, argv
):
    """The interrupt arrives in the model's first block, wherever the command is."""

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model.Block, "forward", interrupted)
    out = tmp_path / "out"
    out.mkdir()
    argv = [a.replace("{out}", str(out)) for a in argv] + ["--no-progress"] * (
        argv[0] not in ("vectors",)
    )
    assert main(argv) == 130
    assert capsys.readouterr().err == f"minilora {argv[0]}: interrupted\n"
    assert [p for p in out.rglob("*") if p.is_file()] == []  # nothing half-written
