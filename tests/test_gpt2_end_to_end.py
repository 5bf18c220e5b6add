"""The two halves of GPT-2 support together, on a tiny random Hugging Face GPT-2 folder
(``save_pretrained`` and a tokenizer.json beside it), through the command line:

* ``minilora finetune --base DIR --data FILE.txt`` (and ``.jsonl``) writes an adapter that
  ``peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(DIR), ADAPTER)`` loads
  with minilora's logits; ``minilora generate --base DIR --adapter ADAPTER`` prints the
  text PEFT's greedy decoding gives;
* an adapter made in PEFT on that folder loads through ``minilora generate --adapter``, and
  ``minilora merge --base DIR`` writes a minilora model file with the same logits;
* targets a GPT-2 adapter cannot hold (the tied head) or that name no layer (GPT-2's own
  names, c_attn...) are refused before any training, in one line;
* docs/porting.md's worked example, "When you outgrow minilora", runs as written: its
  commands through the command line, then its Python blocks.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizer_files import END_OF_TEXT_ID, VOCAB_SIZE, write_small_tokenizer

import minilora as ml
from minilora import backend
from minilora.cli import main
from minilora.interop.model_files import load_model
from minilora.interop.peft_adapters import load_adapter
from minilora.lora import lora_layers
from minilora.text.bpe import load_tokenizer

torch = pytest.importorskip("torch", reason="GPT-2 tests need PyTorch: pip install -e '.[oracle]'")
transformers = pytest.importorskip("transformers", reason="GPT-2 tests need transformers")
peft = pytest.importorskip("peft", reason="GPT-2 adapter tests need PEFT")

pytestmark = pytest.mark.oracle

# the hand-written tokenizer's 263 tokens; a short context, so that a step is quick
SHAPE = dict(vocab_size=VOCAB_SIZE, n_embd=32, n_head=4, n_layer=2, n_positions=24)
SHAPE.update(bos_token_id=END_OF_TEXT_ID, eos_token_id=END_OF_TEXT_ID)
QUICK = ["--steps", "3", "--batch-size", "2", "--lr", "1e-2", "--no-progress", "--seed", "0"]
PROMPT = "the lower"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """gpt2/ (a random GPT2LMHeadModel, large weights so greedy tokens vary, and its
    tokenizer.json), a text file and a prompt/response file."""
    root = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SHAPE))
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.5 * torch.randn_like(p))
    hf.save_pretrained(root / "gpt2", safe_serialization=True)
    write_small_tokenizer(root / "gpt2" / "tokenizer.json")
    (root / "notes.txt").write_text("the low, the lower, the lowest; " * 20)
    pairs = [{"prompt": f"the {n} is", "response": " low" if n % 2 else " the"} for n in range(12)]
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    return root


def run(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def peft_model(folder: Path, adapter: Path):
    base = transformers.GPT2LMHeadModel.from_pretrained(folder)
    return peft.PeftModel.from_pretrained(base, adapter).eval()


def minilora_model(folder: Path, adapter: Path):
    model = load_model(folder)
    load_adapter(model, adapter)
    return model.eval()


def assert_same_logits(ours, theirs, idx, tol=1e-5):
    """float32 logits of two engines agree to ``tol`` relative to the logits' scale: their
    rounding errors (different summation orders, fast or reference ops) grow with the size
    of the values, so a fixed absolute tolerance would be met or missed by magnitude alone."""
    with torch.no_grad(), ml.no_grad():
        want = theirs(torch.from_numpy(idx)).logits.numpy()
        got = backend.to_numpy(ours(idx)[0].data)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)


def peft_greedy_text(folder: Path, adapter: Path, prompt: str, new: int) -> str:
    """What PEFT's greedy decoding on the folder's GPT-2 prints, as the CLI does it (cut
    at the end-of-text token)."""
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        out = peft_model(folder, adapter).generate(
            torch.tensor([ids]), max_new_tokens=new, do_sample=False, pad_token_id=0
        )
    completion = out[0, len(ids) :].tolist()
    eot = tokenizer.token_to_id("<|endoftext|>")
    if eot in completion:
        completion = completion[: completion.index(eot)]
    return tokenizer.decode(ids + completion)


@pytest.mark.parametrize("data", ["notes.txt", "pairs.jsonl"])
def test_finetuned_adapter_loads_in_peft_and_generates(root, tmp_path, capsys, data):
    gpt2, adapter = root / "gpt2", tmp_path / "adapter"
    # the default targets (q_proj, v_proj) exist on a loaded GPT-2
    out = run(capsys, "finetune", "--base", gpt2, "--data", root / data, "--out", adapter, *QUICK)
    assert "held-out loss before" in out and f"wrote {adapter}" in out
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_modules"] == ["attn.c_attn"] and config["fan_in_fan_out"]

    ours = minilora_model(gpt2, adapter)
    assert any(
        np.abs(backend.to_numpy(layer.lora_B.data)).max() > 0 for _, layer in lora_layers(ours)
    ), "training moved no lora_B: the comparison below would not test the adapter"
    idx = np.random.default_rng(1).integers(0, VOCAB_SIZE, (2, 20), dtype=np.int64)
    assert_same_logits(ours, peft_model(gpt2, adapter), idx)

    text = run(capsys, "generate", "--base", gpt2, "--adapter", adapter, "--prompt", PROMPT,
               "--max-new-tokens", 6)  # fmt: skip
    assert text.rstrip("\n") == peft_greedy_text(gpt2, adapter, PROMPT, 6)


def test_peft_adapter_generates_and_merges_in_minilora(root, tmp_path, capsys):
    gpt2, adapter = root / "gpt2", tmp_path / "peft-adapter"
    base = transformers.GPT2LMHeadModel.from_pretrained(gpt2)
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True
    )
    torch.manual_seed(3)
    tuned = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)  # a trained adapter: B is not zero
    tuned.save_pretrained(adapter)

    text = run(capsys, "generate", "--base", gpt2, "--adapter", adapter, "--prompt", PROMPT,
               "--max-new-tokens", 6)  # fmt: skip
    assert text.rstrip("\n") == peft_greedy_text(gpt2, adapter, PROMPT, 6)
    plain = run(capsys, "generate", "--base", gpt2, "--prompt", PROMPT, "--max-new-tokens", 6)
    assert plain != text, "the adapter changes no greedy token: the check above shows nothing"

    # merge on a GPT-2 folder writes a minilora model file: the base with the adapter folded in
    merged_path = tmp_path / "merged.safetensors"
    run(capsys, "merge", "--base", gpt2, "--adapter", adapter, "--out", merged_path)
    merged = load_model(merged_path)
    assert lora_layers(merged) == []
    assert merged.lm_head.weight is merged.tok_emb.weight  # still tied
    idx = np.random.default_rng(2).integers(0, VOCAB_SIZE, (2, 20), dtype=np.int64)
    # W0 + s·B·A is rounded to float32 once, where PEFT adds the two products: logits of
    # size ~5 agree to 1e-4, not to the unmerged comparison's 1e-5
    assert_same_logits(merged, peft_model(gpt2, adapter), idx, tol=1e-4)
    # and its text, with the folder's tokenizer
    shutil.copy(gpt2 / "tokenizer.json", tmp_path / "tokenizer.json")
    again = run(capsys, "generate", "--base", merged_path, "--tokenizer",
                tmp_path / "tokenizer.json", "--prompt", PROMPT, "--max-new-tokens", 6)  # fmt: skip
    assert again == text


def test_gpt2_names_as_targets_are_refused_before_training(root, tmp_path, capsys):
    code = main(["finetune", "--base", str(root / "gpt2"), "--data", str(root / "notes.txt"),
                 "--out", str(tmp_path / "a"), "--targets", "c_attn,mlp.c_proj",
                 *QUICK])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 2 and "held-out loss" not in out
    assert err.count("\n") == 1
    for word in ["GPT-2's names", "c_attn is q_proj,k_proj,v_proj", "fc2"]:
        assert word in err
    assert not (tmp_path / "a").exists()


def test_a_tied_head_adapter_trains_and_its_merge_is_refused(root, tmp_path, capsys):
    """LoRA on GPT-2's tied lm_head trains and saves (PEFT loads it: tests/
    test_gpt2_peft_matrix.py); merging it would change the embedding too, so `merge`
    says so in one line and writes nothing."""
    gpt2, adapter = root / "gpt2", tmp_path / "a"
    run(capsys, "finetune", "--base", gpt2, "--data", root / "notes.txt", "--out", adapter,
        "--targets", "q_proj,lm_head", *QUICK)  # fmt: skip
    code = main(["merge", "--base", str(gpt2), "--adapter", str(adapter),
                 "--out", str(tmp_path / "merged")])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1
    assert "lm_head shares its weight with tok_emb" in err and "nothing was merged" in err
    assert not (tmp_path / "merged").exists()


# --------------------------------------------------------------------------------------
# docs/porting.md, "When you outgrow minilora": its commands and code, run as written
# --------------------------------------------------------------------------------------


def doc_blocks(heading: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block of one section of docs/porting.md, in order:
    the test runs the documentation itself, so the two cannot drift apart."""
    text = (Path(__file__).parent.parent / "docs" / "porting.md").read_text(encoding="utf-8")
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    fences = section.split("```")[1::2]  # the insides of the fences
    return [tuple(fence.split("\n", 1)) for fence in fences]


def commands(code: str) -> list[list[str]]:
    """The argument lists of the ``minilora`` commands of a bash block."""
    lines = code.replace("\\\n", " ").splitlines()
    argvs = [shlex.split(line, comments=True) for line in lines]
    assert all(argv[0] == "minilora" for argv in argvs if argv), code
    return [argv[1:] for argv in argvs if argv]


def test_outgrow_minilora_example_runs(root, tmp_path, monkeypatch, capsys):
    blocks = doc_blocks("When you outgrow minilora")
    assert [language for language, _ in blocks] == ["bash", "python", "python"]
    # the tiny GPT-2 with a 128-token context, as the commands' --block-size asks
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**SHAPE, "n_positions": 128}))
    hf.save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    shutil.copy(root / "gpt2" / "tokenizer.json", tmp_path / "gpt2")
    (tmp_path / "notes.txt").write_text("the low, the lower, the lowest; " * 40)
    monkeypatch.chdir(tmp_path)

    argvs = commands(blocks[0][1])
    assert [argv[0] for argv in argvs] == ["finetune", "generate"]
    quick = ["--steps", "5", "--no-progress"]  # the files are what is tested, not training
    for argv in argvs:
        run(capsys, *argv, *(quick if argv[0] == "finetune" else []))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    namespace = {}
    for _, code in blocks[1:]:
        exec(compile(code, "porting.md", "exec"), namespace)
    assert (tmp_path / "gpt2-tuned" / "model.safetensors").exists()
