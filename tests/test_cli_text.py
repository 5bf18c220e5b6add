"""``minilora finetune --data`` and ``minilora generate --base``: LoRA on a text file or on
prompt/response pairs lowers the held-out loss it prints and writes an adapter that loads;
generate prints the text the model and adapter give; every bad input is one line and a
non-zero exit. A tiny minilora model file and the hand-written tokenizer.json of
tests/tokenizer_files.py stand in for GPT-2, so no download is needed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tokenizer_files import VOCAB_SIZE, write_small_tokenizer

import minilora as ml
from minilora import backend
from minilora.cli import main
from minilora.interop import model_files, peft_adapters
from minilora.text import corpus as text
from minilora.text.bpe import load_tokenizer

PACKAGE = Path(ml.__file__).resolve().parent
# LoRA on the MLP output and the head too: the base is untrained, so the attention
# projections alone would move its loss slowly
FAST = ["--steps", "30", "--lr", "3e-2", "--batch-size", "8", "--no-progress"]
FAST += ["--targets", "q_proj,v_proj,fc2,lm_head", "--lora-alpha", "16"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A model file (vocab the tokenizer's size), the tokenizer, data files good and bad."""
    root = tmp_path_factory.mktemp("text")
    write_small_tokenizer(root / "tokenizer.json")
    for name, vocab_size in (("model", VOCAB_SIZE), ("small_vocab", 100)):
        ml.manual_seed(0)
        config = ml.GPTConfig(vocab_size=vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)
        model_files.save_model(ml.GPT(config), root / f"{name}.safetensors")
    (root / "notes.txt").write_text("the low, the lower, the lowest; " * 40)
    pairs = [{"prompt": f"the {n} is", "response": " low" if n % 2 else " the"} for n in range(30)]
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    (root / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    long_line = {"prompt": "the " * 20, "response": "low"}
    (root / "long.jsonl").write_text(json.dumps(long_line) + "\n" + json.dumps(pairs[0]) + "\n")
    (root / "short.txt").write_text("the")
    (root / "notes.csv").write_text("the low")
    (root / "corrupt.json").write_text("{not json")
    (root / "folder").mkdir()
    return root


def finetune_argv(root: Path, data: str, out: Path) -> list[str]:
    return [
        "finetune",
        "--base",
        str(root / "model.safetensors"),
        "--tokenizer",
        str(root / "tokenizer.json"),
        "--data",
        str(root / data),
        "--out",
        str(out),
        *FAST,
    ]


def losses(out: str) -> tuple[float, float]:
    before = float(re.search(r"held-out loss before: ([\d.]+)", out).group(1))
    after = float(re.search(r"held-out loss after: +([\d.]+)", out).group(1))
    return before, after


@pytest.mark.parametrize("data", ["notes.txt", "pairs.jsonl"])
def test_finetune_on_text_lowers_the_held_out_loss_and_writes_an_adapter_that_loads(
    root, tmp_path, capsys, data
):
    assert main(finetune_argv(root, data, tmp_path / "adapter")) == 0
    before, after = losses(capsys.readouterr().out)
    assert after < before / 2, (before, after)
    # the adapter, loaded onto the base, gives the held-out loss that was printed
    model = model_files.load_model(root / "model.safetensors")
    config = peft_adapters.load_adapter(model, tmp_path / "adapter")
    assert (config.r, config.lora_alpha) == (4, 16)
    assert sorted(config.target_modules) == ["fc2", "lm_head", "q_proj", "v_proj"]
    tokenizer = load_tokenizer(root / "tokenizer.json")
    held = text.load_text_data(root / data, tokenizer, 16, 0.1, seed=0).held_out()
    assert text.held_out_loss(model, *held) == pytest.approx(after, abs=1e-4)
    base = model_files.load_model(root / "model.safetensors")
    assert text.held_out_loss(base, *held) == pytest.approx(before, abs=1e-4)


def test_finetune_on_text_writes_minilora_adapter_by_default(root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = finetune_argv(root, "notes.txt", tmp_path / "x")
    argv = argv[: argv.index("--out")] + argv[argv.index("--out") + 2 :]
    assert main([*argv, "--steps", "1"]) == 0
    assert (tmp_path / "minilora-adapter" / "adapter_config.json").exists()
    assert "wrote minilora-adapter" in capsys.readouterr().out


def test_generate_prints_the_text_the_model_and_adapter_give(root, tmp_path, capsys):
    assert main(finetune_argv(root, "notes.txt", tmp_path / "adapter")) == 0
    capsys.readouterr()
    argv = ["generate", "--base", str(root / "model.safetensors")]
    argv += ["--tokenizer", str(root / "tokenizer.json"), "--adapter", str(tmp_path / "adapter")]
    assert main([*argv, "--prompt", "the low, the", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    # the same completion, computed here: greedy, cut at the end-of-text token
    model = model_files.load_model(root / "model.safetensors")
    peft_adapters.load_adapter(model, tmp_path / "adapter")
    tokenizer = load_tokenizer(root / "tokenizer.json")
    ids = tokenizer.encode("the low, the")
    out = model.generate(backend.array([ids], dtype=backend.int64), 6, temperature=0.0)
    new = backend.to_numpy(out)[0, len(ids) :].tolist()
    eot = tokenizer.token_to_id("<|endoftext|>")
    new = new[: new.index(eot)] if eot in new else new
    assert printed == tokenizer.decode(ids + new) + "\n"
    assert printed.startswith("the low, the") and len(new) > 0
    # sampling: a seed repeats its text; top-k 1 is greedy
    sample = [*argv, "--prompt", "the", "--temperature", "1", "--seed", "3"]
    assert main(sample) == 0 and main(sample) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first == second
    # a prompt longer than the block: the model sees its last 16 tokens
    long_prompt = "the low, the lower, " * 4
    assert main([*argv, "--prompt", long_prompt, "--max-new-tokens", "3"]) == 0
    context = tokenizer.encode(long_prompt)
    assert len(context) > 16
    out = model.generate(backend.array([context[-16:]], dtype=backend.int64), 3, temperature=0.0)
    new = backend.to_numpy(out)[0, 16:].tolist()
    new = new[: new.index(eot)] if eot in new else new
    assert capsys.readouterr().out == tokenizer.decode(context + new) + "\n"
    top_1 = ["--top-k", "1", "--temperature", "2"]  # a sample among one token: greedy
    assert main([*argv, "--prompt", "the low, the", "--max-new-tokens", "6", *top_1]) == 0
    assert capsys.readouterr().out == printed


def test_a_base_folder_supplies_its_tokenizer(root, tmp_path, monkeypatch, capsys):
    """A Hugging Face folder holds tokenizer.json beside the weights; the folder's weights
    are model_files.load_model's business (here it is given the model file instead)."""
    folder = tmp_path / "gpt2"
    folder.mkdir()
    write_small_tokenizer(folder / "tokenizer.json")
    real = model_files.load_model
    monkeypatch.setattr(
        model_files,
        "load_model",
        lambda path, device="cpu": real(
            root / "model.safetensors" if Path(path) == folder else path
        ),
    )
    assert (
        main(["generate", "--base", str(folder), "--prompt", "the", "--max-new-tokens", "2"]) == 0
    )
    assert capsys.readouterr().out.startswith("the")


# (argv with {root} for the fixture's folder, a fragment the error line must contain)
M, T = ["--base", "{root}/model.safetensors"], ["--tokenizer", "{root}/tokenizer.json"]
BAD = {
    "missing data": (["finetune", *M, *T, "--data", "{root}/none.txt"], "no such file"),
    "data of another kind": (["finetune", *M, *T, "--data", "{root}/notes.csv"], "expected .txt"),
    "a bad JSONL line": (["finetune", *M, *T, "--data", "{root}/bad.jsonl"], "line 2 is not JSON"),
    "an example too long": (
        ["finetune", *M, *T, "--data", "{root}/long.jsonl"],
        "line 1: prompt + response + end-of-text is 24 tokens",  # 22 of prompt, "low", the end
    ),
    "a text too short": (["finetune", *M, *T, "--data", "{root}/short.txt"], "a longer text"),
    "data without a base": (["finetune", *T, "--data", "{root}/notes.txt"], "needs --base"),
    "a model file without a tokenizer": (
        ["finetune", *M, "--data", "{root}/notes.txt"],
        "holds no tokenizer: give --tokenizer",
    ),
    "a folder without a tokenizer": (
        ["finetune", "--base", "{root}/folder", "--data", "{root}/notes.txt"],
        "has no tokenizer.json",
    ),
    "a missing tokenizer": (
        ["finetune", *M, "--tokenizer", "{root}/none.json", "--data", "{root}/notes.txt"],
        "no such file",
    ),
    "a corrupt tokenizer": (
        ["finetune", *M, "--tokenizer", "{root}/corrupt.json", "--data", "{root}/notes.txt"],
        "corrupt.json",
    ),
    "a tokenizer larger than the model": (
        ["finetune", "--base", "{root}/small_vocab.safetensors", *T, "--data", "{root}/notes.txt"],
        f"has {VOCAB_SIZE} tokens but the model's vocab_size is 100",
    ),
    "a block larger than the model's": (
        ["finetune", *M, *T, "--data", "{root}/notes.txt", "--block-size", "17"],
        "--block-size 17 is more than the model's block_size 16",
    ),
    "--targets twice": (
        ["finetune", *M, *T, "--data", "{root}/notes.txt", "--targets", "q_proj,fc2,q_proj"],
        "--targets: q_proj is given twice",
    ),
    "--held-out 0": (["finetune", *M, *T, "--data", "{root}/notes.txt", "--held-out", "0"], "0 is"),
    "--held-out 1.5": (
        ["finetune", *M, *T, "--data", "{root}/notes.txt", "--held-out", "1.5"],
        "--held-out",
    ),
    "a task with text": (
        ["finetune", *M, *T, "--data", "{root}/notes.txt", "--task", "D"],
        "--task cannot be used with --data",
    ),
    "full fine-tuning of text": (
        ["finetune", *M, *T, "--data", "{root}/notes.txt", "--method", "full"],
        "trains a LoRA adapter",
    ),
    "text options for the digits": (
        ["finetune", *T, "--out", "{root}/a"],
        "--tokenizer cannot be used without --data",
    ),
    "digits without --out": (["finetune", "--steps", "1"], "--out is required"),
    "an adapter into the package": (
        ["finetune", *M, *T, "--data", "{root}/notes.txt", "--out", str(PACKAGE / "a")],
        "inside the installed minilora package",
    ),
    "generate: an empty prompt": (["generate", *M, *T, "--prompt", ""], "--prompt is empty"),
    "generate: --model with --base": (
        ["generate", *M, *T, "--model", "{root}/model.safetensors", "--prompt", "a"],
        "--model cannot be used with --base",
    ),
    "generate: --top-k for the digits": (
        ["generate", "--prompt", "S 1 2 =", "--top-k", "2"],
        "--top-k cannot be used without --base",
    ),
    "generate: --top-k over the vocabulary": (
        ["generate", *M, *T, "--prompt", "a", "--top-k", "1000"],
        "--top-k 1000 is more than the vocab_size",
    ),
    "generate: no tokenizer": (["generate", *M, "--prompt", "a"], "give --tokenizer"),
}


@pytest.mark.parametrize("argv, fragment", BAD.values(), ids=BAD.keys())
def test_bad_text_invocation_is_one_line_and_a_non_zero_exit(root, capsys, argv, fragment):
    argv = [a.replace("{root}", str(root)) for a in argv]
    before = {p: p.stat().st_mtime_ns for p in PACKAGE.rglob("*") if p.is_file()}
    try:
        status = main(argv)
    except SystemExit as e:  # argparse
        status = e.code
    err = capsys.readouterr().err
    assert status not in (0, None), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert fragment in err, err
    assert {p: p.stat().st_mtime_ns for p in PACKAGE.rglob("*") if p.is_file()} == before
