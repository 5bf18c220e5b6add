"""The command line under hostile use: every bad invocation is one line on stderr and a
non-zero exit, never a traceback; an invalid value is refused, never swapped for a
default; nothing is written inside the installed package; --out is checked before work."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minilora as ml
from minilora import cli
from minilora.cli import main
from minilora.experiments import demo
from minilora.interop import model_files, safetensors_files

PACKAGE = Path(ml.__file__).resolve().parent
BASE = demo.base_model_path()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """Hostile paths: a plain file, a folder, a symlink loop, a file of NaN weights
    and a good adapter."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "file.txt").write_text("not a model")
    (root / "folder").mkdir()
    os.symlink(root / "loop_b", root / "loop_a")
    os.symlink(root / "loop_a", root / "loop_b")
    model = demo.load_base()
    model.lm_head.weight.data[0, 0] = np.nan  # as a diverged training run leaves it
    model_files.save_model(model, root / "nan.safetensors")
    flipped = bytearray(BASE.read_bytes())
    flipped[-1] ^= 1  # one bit of the tensor data, flipped on disk or in transfer
    (root / "flipped.safetensors").write_bytes(bytes(flipped))
    text_model = ml.GPT(ml.GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=1, n_embd=8))
    model_files.save_model(text_model, root / "text.safetensors")  # not the digits' 16 tokens
    adapter = root / "adapter"
    assert (
        main(
            [
                "finetune",
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--out",
                str(adapter),
                "--no-progress",
            ]
        )
        == 0
    )
    return {"root": root, "adapter": adapter}


# (argv with {root} for the hostile folder, a fragment the error line must contain)
BAD = {
    # nothing is ever written inside the package; pretrain needs --out
    "pretrain without --out": (["pretrain", "--steps", "1"], "--out"),
    "pretrain into the package": (
        ["pretrain", "--steps", "1", "--out", str(BASE)],
        "inside the installed minilora package",
    ),
    "merge into the package": (
        ["merge", "--adapter", "{root}/adapter", "--out", str(PACKAGE / "m.safetensors")],
        "inside the installed",
    ),
    "demo into the package": (["demo", "--quick", "--out", str(PACKAGE)], "inside the installed"),
    "vectors into the package": (["vectors", "--out", str(PACKAGE / "v")], "inside the installed"),
    # invalid values are refused before any work
    "pretrain --steps 0": (["pretrain", "--steps", "0", "--out", "{root}/m"], "--steps"),
    "finetune --steps -1": (["finetune", "--steps", "-1", "--out", "{root}/a"], "--steps"),
    "finetune --lr 0": (["finetune", "--lr", "0", "--out", "{root}/a"], "--lr"),
    "finetune --lr nan": (["finetune", "--lr", "nan", "--out", "{root}/a"], "--lr"),
    "finetune --alpha 0": (["finetune", "--alpha", "0", "--out", "{root}/a"], "--alpha"),
    "finetune --r 0": (["finetune", "--r", "0", "--out", "{root}/a"], "--r"),
    "finetune empty batch": (["finetune", "--batch-size", "0", "--out", "{root}/a"], "--batch"),
    "finetune no targets": (
        ["finetune", "--targets", ",", "--steps", "1", "--out", "{root}/a", "--no-progress"],
        "target_modules",
    ),
    "finetune --targets twice": (
        ["finetune", "--targets", "q_proj,v_proj,q_proj", "--steps", "1", "--out", "{root}/a"],
        "--targets: q_proj is given twice",
    ),
    "vectors --case twice": (
        ["vectors", "--check", "{root}/folder", "--case", "gelu", "--case", "gelu"],
        "--case: gelu is given twice",
    ),
    "eval --examples 0": (["eval", "--examples", "0"], "--examples"),
    "eval --threads 0": (["eval", "--threads", "0"], "--threads"),
    "eval --seed -1": (["eval", "--seed", "-1"], "--seed"),
    "eval unknown device": (["eval", "--device", "tpu"], "tpu"),
    "generate --max-new-tokens 0": (
        ["generate", "--prompt", "S 1 2 =", "--max-new-tokens", "0"],
        "--max-new-tokens",
    ),
    "generate --max-new-tokens -3": (
        ["generate", "--prompt", "S 1 2 =", "--max-new-tokens", "-3"],
        "--max-new-tokens",
    ),
    "generate --temperature nan": (
        ["generate", "--prompt", "S 1 2 =", "--temperature", "nan"],
        "--temperature",
    ),
    "generate --temperature -1": (
        ["generate", "--prompt", "S 1 2 =", "--temperature", "-1"],
        "--temperature",
    ),
    # prompts that lack the task's form get a message, not a guess
    "empty prompt": (["generate", "--prompt", ""], "--prompt is empty"),
    "blank prompt": (["generate", "--prompt", "   "], "--prompt is empty"),
    "prompt without '='": (["generate", "--prompt", "S 1 2"], "lacks the task's form"),
    "prompt without digits": (["generate", "--prompt", "S ="], "lacks the task's form"),
    "prompt too long": (["generate", "--prompt", "S 123456789 ="], "1 to 8 digits"),
    "prompt not a task": (["generate", "--prompt", "= 1 2 ="], "not a task"),
    "prompt with letters": (["generate", "--prompt", "S 1 D ="], "lacks the task's form"),
    # files and folders that are not what the option expects
    "model is a folder": (["eval", "--model", "{root}/folder"], "folder"),
    "model under a file": (["eval", "--model", "{root}/file.txt/model"], "Not a directory"),
    "model is a symlink loop": (["eval", "--model", "{root}/loop_a"], "symbolic links"),
    "model is /dev/zero": (["eval", "--model", "/dev/zero"], "not a regular file"),
    "model is not safetensors": (["eval", "--model", "{root}/file.txt"], "not a valid"),
    "model with NaN weights": (["eval", "--model", "{root}/nan.safetensors"], "lm_head.weight"),
    "model with a flipped bit": (
        ["eval", "--model", "{root}/flipped.safetensors"],
        "flipped.safetensors is corrupt",
    ),
    "adapter is a file": (["eval", "--adapter", "{root}/file.txt"], "is a file"),
    "adapter missing": (["eval", "--adapter", "{root}/none"], "no adapter folder"),
    "adapter is a symlink loop": (["eval", "--adapter", "{root}/loop_a"], "symbolic links"),
    "full finetune --out a folder": (
        ["finetune", "--method", "full", "--out", "{root}/folder"],
        "is a folder",
    ),
    "lora finetune --out a file": (["finetune", "--out", "{root}/file.txt"], "is a file"),
    "finetune --out under a file": (
        ["finetune", "--out", "{root}/file.txt/adapter"],
        "which is a file",
    ),
    "merge --out a folder": (
        ["merge", "--adapter", "{root}/adapter", "--out", "{root}/folder"],
        "is a folder",
    ),
    "generate --model of another vocabulary": (
        ["generate", "--model", "{root}/text.safetensors", "--prompt", "D 1 2 ="],
        "has a vocabulary of 50 tokens, not the 16 of the digit tasks",
    ),
    "eval --model of another vocabulary": (
        ["eval", "--model", "{root}/text.safetensors"],
        "use --base with generate or finetune --data",
    ),
    "unknown command": (["train"], "invalid choice"),
    "unknown option": (["eval", "--colour"], "unrecognized arguments"),
}


def run(capsys, argv: list[str]) -> tuple[int, str]:
    """Exit status and stderr of ``minilora argv``, run in this process (an exception
    escaping ``main`` fails the test, as a traceback would)."""
    try:
        status = main(argv)
    except SystemExit as e:  # argparse
        status = e.code
    return status, capsys.readouterr().err


@pytest.mark.parametrize("argv, fragment", BAD.values(), ids=BAD.keys())
def test_bad_invocation_is_one_line_and_a_non_zero_exit(files, capsys, argv, fragment):
    argv = [a.replace("{root}", str(files["root"])) for a in argv]
    before = {p: p.stat().st_mtime_ns for p in PACKAGE.rglob("*") if p.is_file()}
    status, err = run(capsys, argv)
    assert status not in (0, None), err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert fragment in err, err
    assert {p: p.stat().st_mtime_ns for p in PACKAGE.rglob("*") if p.is_file()} == before


def test_pretrain_into_the_package_exits_before_training(monkeypatch, capsys):
    monkeypatch.setattr(demo, "pretrain", lambda *a, **k: pytest.fail("training started"))
    assert run(capsys, ["pretrain", "--out", str(BASE)])[0] == 2


@pytest.mark.parametrize("method, out", [("full", "{root}/folder"), ("lora", "{root}/file.txt")])
def test_finetune_checks_its_output_before_training(files, monkeypatch, capsys, method, out):
    monkeypatch.setattr(
        demo, "fine_tune_on_digit_task", lambda *a, **k: pytest.fail("training started")
    )
    out = out.replace("{root}", str(files["root"]))
    assert run(capsys, ["finetune", "--method", method, "--out", out])[0] == 2


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
def test_finetune_into_a_read_only_folder_is_refused_before_training(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    status, err = run(capsys, ["finetune", "--out", str(locked / "a"), "--no-progress"])
    assert status == 2 and "not writable" in err and len(err.splitlines()) == 1


def test_a_permission_error_is_one_line(monkeypatch, capsys):
    """(Tests run as root here, where permissions cannot be provoked: raise one.)"""

    def denied(path, caller):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(safetensors_files, "check_regular_file", denied)
    status, err = run(capsys, ["eval", "--model", "/some/model.safetensors"])
    assert status == 2
    assert err == "minilora eval: error: Permission denied: /some/model.safetensors\n"


def test_a_multi_line_error_becomes_one_line(files, tmp_path, capsys):
    config = json.loads((files["adapter"] / "adapter_config.json").read_text())
    config.update(r=3, use_qalora=True)
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    weights = files["adapter"] / "adapter_model.safetensors"
    (folder / "adapter_model.safetensors").write_bytes(weights.read_bytes())
    status, err = run(capsys, ["eval", "--adapter", str(folder)])
    assert status == 2 and len(err.splitlines()) == 1
    assert "use_qalora=True" in err and "; " in err


def test_values_are_honoured_not_swapped_for_defaults(monkeypatch, tmp_path, capsys):
    """--max-new-tokens 2 gives two tokens; --alpha and --lr reach the training as given."""
    assert main(["generate", "--prompt", "S 3 1 2 =", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.strip() == "S 3 1 2 = 1 2"
    seen = {}
    real = demo.fine_tune_on_digit_task

    def spy(base, method, settings, rank, progress, task, alpha):
        seen.update(alpha=alpha, lr=settings.lr_lora)
        return real(base, method, settings, rank, progress, task=task, alpha=alpha)

    monkeypatch.setattr(demo, "fine_tune_on_digit_task", spy)
    argv = ["finetune", "--steps", "1", "--batch-size", "2", "--alpha", "0.5", "--lr", "0.25"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    assert seen == {"alpha": 0.5, "lr": 0.25}
    written = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert written["lora_alpha"] == 0.5


def test_every_option_of_every_command_has_help():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {action.option_strings}"
        for name, sub in commands.choices.items()
        for action in sub._actions
        if action.option_strings and not action.help
    ]
    assert missing == []
    for name in ("finetune", "eval", "generate"):
        text = commands.choices[name].format_help()
        assert "D sort descending" in " ".join(text.split()), name  # what the letters mean


def test_console_script_shows_no_traceback(tmp_path):
    """The real entry point, in a process of its own: /dev/zero is refused before it is read."""
    result = subprocess.run(
        [sys.executable, "-m", "minilora", "eval", "--model", "/dev/zero"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "minilora eval: error: load_model: /dev/zero is not a regular file: it is a character "
        "device; reading it could block or never end"
    ]
