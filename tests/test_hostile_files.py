"""Files that are not what they say (issue 27, item 6): every reader refuses a named pipe,
a device or a link to one before reading, a dangling or looping link says so, JSON files
have a size cap, config.json is checked against the tensors before anything is built, a
VeRA config cannot size the projections beyond what VeRA can use, patterns from files
run with a time limit, and the BPE does n log n work on a long word.

A reader that would block on a pipe, read /dev/zero forever or backtrack for hours must
not hang the suite: such cases run in a process of their own, with a timeout and a memory
cap, and a hang is a failure."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from helpers import TINY_2x2, make_gpt
from tokenizer_files import write_small_tokenizer

import minilora as ml
from minilora.interop import vectors
from minilora.interop.files import JSON_LIMIT
from minilora.interop.model_files import load_model, save_model
from minilora.interop.peft_adapters import load_adapter, save_adapter
from minilora.interop.vera_adapters import load_vera, save_vera
from minilora.text.bpe import BPETokenizer
from minilora.text.corpus import load_text_data
from minilora.variants import vera

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX pipes")
ROOT = Path(__file__).resolve().parent.parent


def run_isolated(code: str, timeout: float = 30) -> str:
    """Run ``code`` in a fresh Python (memory capped at 2 GB) and return its stdout; a
    hang or a crash fails the test instead of stopping the suite."""

    def limit_memory():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))

    try:
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            preexec_fn=limit_memory,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s: {code}")
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def refusal(call: str) -> str:
    """The message of the error ``call`` raises, run in its own process."""
    code = f"""
        import minilora.interop.model_files
        try:
            {call}
        except (ValueError, OSError) as e:
            print(type(e).__name__, e)
        else:
            print("no error")
    """
    return run_isolated(code).strip()


# --------------------------------------------------------------------------------------
# Pipes, devices and links to them
# --------------------------------------------------------------------------------------


def hostile(path: Path, kind: str) -> Path:
    """Make ``path`` a named pipe, or a link to /dev/zero."""
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    return path


KINDS = ["fifo", "zero"]
WHAT = {"fifo": r"a named pipe \(FIFO\)", "zero": "a character device"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("which", ["add.safetensors", "manifest.json"])
def test_a_vector_set_file_that_is_a_pipe_or_dev_zero_is_refused(tmp_path, kind, which):
    vectors.write_vectors(tmp_path)
    (tmp_path / which).unlink()
    hostile(tmp_path / which, kind)
    out = run_isolated(f"""
        from minilora.interop import vectors
        try:
            report = vectors.check_vectors({str(tmp_path)!r})
            print(*[r.detail for r in report.failures], sep="\\n")
        except ValueError as e:
            print(e)
    """)
    assert re.search(
        f"{re.escape(str(tmp_path / which))} is not a regular file: it is {WHAT[kind]}", out
    )


def test_vectors_check_on_the_command_line_refuses_dev_zero(tmp_path):
    vectors.write_vectors(tmp_path)
    (tmp_path / "manifest.json").unlink()
    hostile(tmp_path / "manifest.json", "zero")
    code = f"""
        import sys
        from minilora.cli import main
        sys.exit(main(["vectors", "--check", {str(tmp_path)!r}]))
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "manifest.json is not a regular file: it is a character device" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def adapter_dir(tmp_path) -> Path:
    model = make_gpt(TINY_2x2, 0, np.float32)
    config = ml.LoRAConfig(r=2, target_modules=["q_proj"])
    ml.apply_lora(model, config)
    save_adapter(model, tmp_path / "adapter", config)
    return tmp_path / "adapter"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("which", ["adapter_config.json", "adapter_model.safetensors"])
def test_an_adapter_file_that_is_a_pipe_or_dev_zero_is_refused(adapter_dir, kind, which):
    (adapter_dir / which).unlink()
    hostile(adapter_dir / which, kind)
    with pytest.raises(ValueError, match=f"is not a regular file: it is {WHAT[kind]}") as e:
        load_adapter(make_gpt(TINY_2x2, 0, np.float32), adapter_dir)
    if kind == "zero":
        assert "symbolic link to /dev/zero" in str(e.value)


@pytest.mark.parametrize("kind", KINDS)
def test_tokenizer_and_data_files_that_are_pipes_or_dev_zero_are_refused(tmp_path, kind):
    tokenizer = BPETokenizer.from_file(write_small_tokenizer(tmp_path / "t.json"))
    for name in ("tokenizer.json", "data.txt", "data.jsonl"):
        hostile(tmp_path / name, kind)
    with pytest.raises(ValueError, match=f"is not a regular file: it is {WHAT[kind]}"):
        BPETokenizer.from_file(tmp_path / "tokenizer.json")
    for name in ("data.txt", "data.jsonl"):
        with pytest.raises(ValueError, match=f"is not a regular file: it is {WHAT[kind]}"):
            load_text_data(tmp_path / name, tokenizer, 4)


# --------------------------------------------------------------------------------------
# Links that lead nowhere, and files too large to be what they say
# --------------------------------------------------------------------------------------


def gpt2_folder(folder: Path, n_layer: int = 2, C: int = 8, V: int = 10, T: int = 4) -> Path:
    """A GPT-2 folder (config.json and model.safetensors, GPT-2's names and shapes) of
    random weights, written without PyTorch."""
    rng = np.random.default_rng(0)
    shapes = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (T, C)}
    shapes |= {"transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)}
    for i in range(n_layer):
        for name, shape in {
            "ln_1": (C,),
            "ln_2": (C,),
            "attn.c_attn": (C, 3 * C),
            "attn.c_proj": (C, C),
            "mlp.c_fc": (C, 4 * C),
            "mlp.c_proj": (4 * C, C),
        }.items():
            n_out = shape[-1]
            shapes[f"transformer.h.{i}.{name}.weight"] = shape
            shapes[f"transformer.h.{i}.{name}.bias"] = (n_out,)
    tensors = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in shapes.items()}
    folder.mkdir(exist_ok=True)
    safetensors.numpy.save_file(tensors, folder / "model.safetensors")
    config = dict(model_type="gpt2", vocab_size=V, n_positions=T, n_embd=C, n_layer=n_layer)
    (folder / "config.json").write_text(json.dumps({**config, "n_head": 2}))
    return folder


def test_the_gpt2_folder_written_here_loads(tmp_path):
    """The folder the tests below break is a valid one."""
    model = load_model(gpt2_folder(tmp_path))
    assert model.config.n_layer == 2


def test_a_dangling_or_looping_config_link_is_named_as_such(tmp_path):
    folder = gpt2_folder(tmp_path / "gpt2")
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to(tmp_path / "gone.json")
    with pytest.raises(FileNotFoundError, match="is a dangling symbolic link: its target"):
        load_model(folder)
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to(folder / "config.json")
    with pytest.raises(ValueError, match="config.json is a loop of symbolic links"):
        load_model(folder)


def test_a_json_file_larger_than_any_real_one_is_refused_unread(tmp_path, adapter_dir):
    folder = gpt2_folder(tmp_path / "gpt2")
    for path in (folder / "config.json", adapter_dir / "adapter_config.json"):
        with open(path, "r+b") as f:
            f.truncate(JSON_LIMIT + 1)  # sparse: no disk used
    with pytest.raises(
        ValueError, match=f"holds {JSON_LIMIT + 1:,} bytes, expected a JSON"
    ):
        load_model(folder)
    with pytest.raises(ValueError, match="expected a JSON file of at most"):
        load_adapter(make_gpt(TINY_2x2, 0, np.float32), adapter_dir)


# --------------------------------------------------------------------------------------
# Configs against the tensors, before anything is built
# --------------------------------------------------------------------------------------


def test_a_gpt2_config_with_a_million_layers_is_refused_at_once(tmp_path):
    folder = gpt2_folder(tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "n_layer": 10**6}))
    out = refusal(f"minilora.interop.model_files.load_model({str(folder)!r})")
    assert "config.json says n_layer=1000000, but the file holds 2 layers" in out
    assert out.count("\n") < 5  # one problem, not twelve million missing tensors


def test_a_model_file_config_with_a_billion_layers_is_refused_at_once(tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(make_gpt(TINY_2x2, 0, np.float32), path)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    config = json.loads(header["__metadata__"]["config"])
    tensors = safetensors.numpy.load_file(path)
    metadata = {**header["__metadata__"], "config": json.dumps({**config, "n_layer": 10**9})}
    safetensors.numpy.save_file(tensors, path, metadata=metadata)
    out = refusal(f"minilora.interop.model_files.load_model({str(path)!r})")
    assert "config says n_layer=1000000000 but the file has blocks ['0', '1']" in out


def test_a_vera_rank_beyond_what_vera_can_use_is_refused_before_drawing(tmp_path):
    # q_proj and v_proj of TINY_2x2 are (8, 8): 64 rank-one directions at most
    model = make_gpt(TINY_2x2, 0, np.float32)
    config = vera.VeraConfig(r=65, target_modules=["q_proj", "v_proj"], save_projection=False)
    with pytest.raises(ValueError, match=r"r=65 is more than out \* in = 8 \* 8 = 64"):
        vera.apply_vera(model, config)
    assert not vera.vera_layers(model)
    vera.apply_vera(model, vera.VeraConfig(r=64, target_modules=config.target_modules))

    small = vera.VeraConfig(r=4, target_modules=["q_proj", "v_proj"], save_projection=False)
    saved = make_gpt(TINY_2x2, 0, np.float32)
    vera.apply_vera(saved, small)
    save_vera(saved, tmp_path, small)
    # the folder asks for r = 65: λ_d of 65 entries per layer, projections drawn from the key
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**raw, "r": 65}))
    tensors = safetensors.numpy.load_file(tmp_path / "adapter_model.safetensors")
    tensors = {
        k: np.ones(65, np.float32) if k.endswith("vera_lambda_d") else v for k, v in tensors.items()
    }
    safetensors.numpy.save_file(tensors, tmp_path / "adapter_model.safetensors")
    base = make_gpt(TINY_2x2, 0, np.float32)
    with pytest.raises(ValueError, match=r"nothing was changed:\n  r=65 is more than out \* in"):
        load_vera(base, tmp_path)
    assert not vera.vera_layers(base)


# --------------------------------------------------------------------------------------
# Regular expressions from files
# --------------------------------------------------------------------------------------

# 3**20 ways to match a 20-letter module path: `re` would run for hours (PEFT too)
SLOW = "(.|.|.)*b"


@pytest.mark.parametrize(
    "change",
    [
        {"target_modules": SLOW},
        {"rank_pattern": {SLOW: 4}},
        {"alpha_pattern": {SLOW: 4}},
    ],
    ids=["target_modules", "rank_pattern", "alpha_pattern"],
)
def test_a_catastrophically_backtracking_pattern_is_refused_in_time(adapter_dir, change):
    path = adapter_dir / "adapter_config.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, **change}))
    weights = adapter_dir / "adapter_model.safetensors"  # as PEFT writes it: no config digest
    safetensors.numpy.save_file(safetensors.numpy.load_file(weights), weights)
    out = refusal(f"""
            from tests.helpers import TINY_2x2, make_gpt
            import numpy as np
            from minilora.interop.peft_adapters import load_adapter
            load_adapter(make_gpt(TINY_2x2, 0, np.float32), {str(adapter_dir)!r})""")
    assert f"the regular expression {SLOW!r} took more than" in out
    assert "backtracks catastrophically" in out


def test_a_slow_vera_target_pattern_is_refused_in_time(tmp_path):
    config = vera.VeraConfig(r=4, target_modules=["q_proj"])
    model = make_gpt(TINY_2x2, 0, np.float32)
    vera.apply_vera(model, config)
    save_vera(model, tmp_path, config)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**raw, "target_modules": SLOW}))
    out = refusal(f"""
            from tests.helpers import TINY_2x2, make_gpt
            import numpy as np
            from minilora.interop.vera_adapters import load_vera
            load_vera(make_gpt(TINY_2x2, 0, np.float32), {str(tmp_path)!r})""")
    assert f"target_modules: the regular expression {SLOW!r} took more than" in out


# --------------------------------------------------------------------------------------
# The BPE on one very long word
# --------------------------------------------------------------------------------------


class CountingRanks(dict):
    """The merge ranks, counting how often the merge loop looks a pair up."""

    lookups = 0

    def __contains__(self, pair):
        CountingRanks.lookups += 1
        return super().__contains__(pair)

    def get(self, pair, default=None):
        CountingRanks.lookups += 1
        return super().get(pair, default)


def test_the_merge_loop_does_work_linear_in_the_word_length():
    # merges that grow one token left to right: "ab", then "abc", ... (200 merges): a loop
    # that searches every pair after each merge looks pairs up 200 * 200 / 2 times
    letters = [chr(c) for c in range(0x100, 0x100 + 200)]  # printable, bytes-as-characters
    vocab = {c: i for i, c in enumerate(letters)}
    merges = [("".join(letters[:k]), letters[k]) for k in range(1, len(letters))]
    vocab |= {a + b: len(letters) + n for n, (a, b) in enumerate(merges)}
    tokenizer = BPETokenizer(vocab, merges)
    tokenizer.ranks = CountingRanks(tokenizer.ranks)
    CountingRanks.lookups = 0
    word = "".join(letters)
    assert tokenizer.bpe(word) == [word]
    assert CountingRanks.lookups <= 3 * len(word)  # each pair once, then two per merge
