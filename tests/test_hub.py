"""Hub ids (minilora/interop/hub.py): ``load_model("gpt2")``, ``--base gpt2`` and ``--base
org/name`` resolve through huggingface_hub's cache, honouring HF_HOME and HF_HUB_OFFLINE; a
local folder of that name wins; without huggingface_hub, or offline without a cached copy,
one line says what to do.

The cache is laid out here as huggingface_hub lays it out (``HF_HOME/hub/models--org--name``
with ``blobs/<sha256>``, ``snapshots/<rev>/<file>`` linking to them, and ``refs/main``), holding
random tiny GPT-2s (config.json, model.safetensors, tokenizer.json). huggingface_hub reads
HF_HOME and HF_HUB_OFFLINE when it is imported, so what reads them runs in a fresh process.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizer_files import VOCAB_SIZE, write_small_tokenizer

from minilora import backend
from minilora.cli import main
from minilora.interop import hub
from minilora.interop.model_files import load_model

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SHAPE = dict(vocab_size=VOCAB_SIZE, n_positions=16, n_embd=16, n_layer=1, n_head=2)
REVISION = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as refs/main holds
MODELS = {"gpt2": 0, "org/tiny-gpt2": 1}  # hub id -> the seed of its random weights
IDX = np.array([[116, 104, 101, 32, 108, 111, 119]], dtype=np.int64)  # "the low"
GENERATE = ["generate", "--prompt", "the low", "--max-new-tokens", "4", "--no-progress"]


def write_gpt2(folder: Path, seed: int) -> None:
    """A random tiny GPT-2 folder with its tokenizer.json."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import load_memory
    finally:
        sys.path.remove(str(BENCHMARKS))
    load_memory.write_gpt2_folder(folder, SHAPE, seed)
    write_small_tokenizer(folder / "tokenizer.json")


def cache_model(hf_home: Path, repo_id: str, seed: int) -> Path:
    """Put a random GPT-2 in the hub cache under ``hf_home`` as ``repo_id``, laid out as
    huggingface_hub does; returns its snapshot folder."""
    made = hf_home / "made" / repo_id
    write_gpt2(made, seed)
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    for folder in (repo / "blobs", repo / "refs", snapshot):
        folder.mkdir(parents=True)
    for file in sorted(made.iterdir()):
        data = file.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob))
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    if os.name != "posix":
        pytest.skip("the cache's snapshots link to its blobs (POSIX symbolic links)")
    home = tmp_path_factory.mktemp("hf_home")
    for repo_id, seed in MODELS.items():
        cache_model(home, repo_id, seed)
    return home


def snapshot_of(hf_home: Path, repo_id: str) -> Path:
    return hf_home / "hub" / ("models--" + repo_id.replace("/", "--")) / "snapshots" / REVISION


def offline(hf_home: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    """``python argv...`` in a fresh process, with HF_HOME=hf_home and HF_HUB_OFFLINE=1."""
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    for other in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
        env.pop(other, None)  # these would override HF_HOME
    command = [sys.executable, *argv]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def logits(model) -> np.ndarray:
    return backend.to_numpy(model(backend.array(IDX, dtype=backend.int64))[0].data)


LOAD_BY_ID = """
import sys
import numpy as np
from minilora import backend
from minilora.interop.model_files import load_model
idx = backend.array(np.array({idx}), dtype=backend.int64)
np.savez("logits.npz", **{{name: backend.to_numpy(load_model(name)(idx)[0].data)
                          for name in sys.argv[1:]}})
"""


def test_load_model_finds_hub_ids_in_the_cache_of_hf_home_offline(hf_home, tmp_path):
    pytest.importorskip("huggingface_hub", reason="hub ids need huggingface_hub")
    script = LOAD_BY_ID.format(idx=IDX.tolist())
    done = offline(hf_home, tmp_path, "-c", script, *MODELS)
    assert done.returncode == 0, done.stderr
    got = np.load(tmp_path / "logits.npz")
    for repo_id in MODELS:  # each id gives its own model: the snapshot's, bit for bit
        want = logits(load_model(snapshot_of(hf_home, repo_id)))
        np.testing.assert_array_equal(got[repo_id], want)
    assert not np.allclose(got["gpt2"], got["org/tiny-gpt2"])  # two models, not one twice


def test_cli_generates_from_a_hub_id_with_its_cached_tokenizer(hf_home, tmp_path, capsys):
    pytest.importorskip("huggingface_hub", reason="hub ids need huggingface_hub")
    done = offline(hf_home, tmp_path, "-m", "minilora", *GENERATE, "--base", "org/tiny-gpt2")
    assert done.returncode == 0, done.stderr
    assert main([*GENERATE, "--base", str(snapshot_of(hf_home, "org/tiny-gpt2"))]) == 0
    want = capsys.readouterr().out
    assert done.stdout == want and want.startswith("the low")


def test_an_id_offline_and_not_cached_is_one_line_and_exit_2(hf_home, tmp_path):
    pytest.importorskip("huggingface_hub", reason="hub ids need huggingface_hub")
    done = offline(hf_home, tmp_path, "-m", "minilora", *GENERATE, "--base", "org/not-cached")
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1, done.stderr
    err = done.stderr
    assert "minilora generate: error: --base: org/not-cached is not a local file" in err
    assert str(hf_home / "hub") in err and "HF_HUB_OFFLINE is set" in err


@pytest.fixture
def without_hub(monkeypatch):
    """huggingface_hub not installed: importing it raises ImportError."""
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)


def test_without_huggingface_hub_an_id_says_to_install_the_extra(
    without_hub, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # no folder named gpt2 here
    with pytest.raises(
        ValueError, match=r'install huggingface_hub \(pip install -e "\.\[hub\]" in a clone'
    ):
        load_model("gpt2")
    assert main([*GENERATE, "--base", "org/tiny-gpt2"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "org/tiny-gpt2" in err
    assert 'pip install -e ".[hub]"' in err


def test_a_local_folder_named_like_an_id_wins(without_hub, tmp_path, monkeypatch):
    """Never a hub lookup (huggingface_hub is absent here) when the folder exists."""
    monkeypatch.chdir(tmp_path)
    for repo_id, seed in MODELS.items():
        write_gpt2(tmp_path / repo_id, seed)
        want = logits(load_model(tmp_path / repo_id))
        np.testing.assert_array_equal(logits(load_model(repo_id)), want)


@pytest.mark.parametrize(
    "name, is_id",
    [
        ("gpt2", True),
        ("openai-community/gpt2", True),
        ("org/my_model.v2", True),
        ("base.safetensors", False),  # a model file's name: never a hub id
        ("gpt2/", False),
        ("a/b/c", False),
        ("/abs/gpt2", False),
        ("./gpt2", False),
        ("", False),
    ],
)
def test_which_names_are_hub_ids(name, is_id):
    assert hub.is_hub_id(name) is is_id


def test_a_missing_path_that_is_no_hub_id_is_refused_as_before(without_hub, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_model(str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_model("missing.safetensors")  # in the working folder, not on the hub
