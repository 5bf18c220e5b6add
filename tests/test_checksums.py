"""Checksums: every file minilora writes records the SHA-256 of its tensor data.

safetensors has no checksum of its own: a bit flipped on disk or in transfer loads without
a word. minilora's writers (``safetensors_files.serialize``) put the hex SHA-256 of the
data section (every byte after the header) in the metadata under ``DATA_SHA256_KEY``; the
readers refuse a file whose data does not match, naming it. Files without the key (PEFT,
transformers, an older minilora) load as before. Format: docs/porting.md, "Checksums" (in
"Names across libraries").
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest
import safetensors
import safetensors.numpy
from helpers import TINY_2x2, join, make_gpt, randomize_weights, split

import minilora as ml
from minilora.experiments import demo
from minilora.interop import model_files, peft_adapters, safetensors_files, vectors, vera_adapters
from minilora.relatives import adapters, prefix
from minilora.variants import vera

KEY = safetensors_files.DATA_SHA256_KEY



def flip_bit(path: Path, bit: int = 0) -> None:
    """Flip one bit in the middle of the file's data section (the header is untouched)."""
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    data[8 + n + (len(data) - 8 - n) // 2] ^= 1 << bit
    path.write_bytes(bytes(data))


def base() -> ml.GPT:
    return randomize_weights(make_gpt(TINY_2x2), 0)


# Each kind of file minilora writes: (write it under tmp_path and return its path,
# load it). The adapter files are loaded into a fresh base model.


def _model(tmp_path):
    path = tmp_path / "model.safetensors"
    model_files.save_model(base(), path)
    return path, lambda: model_files.load_model(path)


def _lora(tmp_path):
    model, config = base(), ml.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"])
    ml.apply_lora(model, config)
    peft_adapters.save_adapter(model, tmp_path / "lora", config)
    path = tmp_path / "lora" / "adapter_model.safetensors"
    return path, lambda: peft_adapters.load_adapter(base(), tmp_path / "lora")


def _vera(tmp_path):
    model, config = base(), vera.VeraConfig(r=2, target_modules=["q_proj"])
    vera.apply_vera(model, config)
    vera_adapters.save_vera(model, tmp_path / "vera", config)
    path = tmp_path / "vera" / "adapter_model.safetensors"
    return path, lambda: vera_adapters.load_vera(base(), tmp_path / "vera")


def _adapters(tmp_path):
    model, config = base(), adapters.AdapterConfig("houlsby", 2)
    adapters.apply_adapters(model, config)
    path = tmp_path / "adapters.safetensors"
    adapters.save_adapters(model, path, config)
    return path, lambda: adapters.load_adapters(base(), path)


def _prefix(tmp_path):
    model = base()
    prefix.apply_prefix_tuning(model, prefix.PrefixConfig())
    path = tmp_path / "prefix.safetensors"
    prefix.save_prefix(model, path)
    return path, lambda: prefix.load_prefix(base(), path)


KINDS = {"model": _model, "lora": _lora, "vera": _vera, "adapters": _adapters}
KINDS["prefix"] = _prefix


@pytest.fixture(scope="module")
def vector_set(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vectors") / "set"
    vectors.write_vectors(folder)
    return folder


@pytest.mark.parametrize("kind", KINDS)
def test_every_file_records_the_sha256_of_its_data_and_stays_readable(kind, tmp_path):
    path, load = KINDS[kind](tmp_path)
    header, body = split(path.read_bytes())
    assert header["__metadata__"][KEY] == hashlib.sha256(body).hexdigest()
    # still a plain safetensors file (what PEFT and transformers read): string metadata
    with safetensors.safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata()
    assert metadata[KEY] == header["__metadata__"][KEY]
    assert all(isinstance(v, str) for v in metadata.values())
    assert set(safetensors.numpy.load_file(path)) == set(header) - {"__metadata__"}
    load()  # and minilora reads it back


@pytest.mark.parametrize("kind", KINDS)
def test_the_checksum_of_a_fresh_save_is_stable(kind, tmp_path):
    (tmp_path / "1").mkdir(), (tmp_path / "2").mkdir()
    first, _ = KINDS[kind](tmp_path / "1")
    second, _ = KINDS[kind](tmp_path / "2")
    assert KEY in split(first.read_bytes())[0]["__metadata__"]
    assert first.read_bytes() == second.read_bytes()  # the checksum too


@pytest.mark.parametrize("bit", [0, 7])
@pytest.mark.parametrize("kind", KINDS)
def test_one_flipped_bit_in_the_data_is_refused_naming_the_file(kind, bit, tmp_path):
    path, load = KINDS[kind](tmp_path)
    flip_bit(path, bit)
    with pytest.raises(ValueError) as info:
        load()
    message = str(info.value)
    assert str(path) in message and "is corrupt" in message and "bit flips" in message


def test_a_flipped_bit_that_makes_a_nan_is_called_corrupt(tmp_path):
    # the real cause is the flipped bit, not training: the checksum is checked first
    path, load = _model(tmp_path)
    header, body = split(path.read_bytes())
    begin = header["ln_f.weight"]["data_offsets"][0]  # 1.0 = 0x3f800000; 0x7f800001 is NaN
    body = bytearray(body)
    body[begin + 3] ^= 0x40
    body[begin] ^= 0x01
    path.write_bytes(join(header, bytes(body)))
    with pytest.raises(ValueError, match="is corrupt") as info:
        load()
    assert "NaN" not in str(info.value)


@pytest.mark.parametrize("kind", KINDS)
def test_a_flipped_bit_in_a_file_without_the_key_loads_as_before(kind, tmp_path):
    # files written by PEFT, transformers or an older minilora carry no checksum
    path, load = KINDS[kind](tmp_path)
    header, body = split(path.read_bytes())
    del header["__metadata__"][KEY]
    path.write_bytes(join(header, body))
    flip_bit(path)
    load()
    assert split(path.read_bytes())[1] != body


def test_a_peft_written_adapter_without_the_key_loads(tmp_path):
    path, load = _lora(tmp_path)
    tensors = safetensors.numpy.load_file(path)
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})  # as PEFT writes
    load()


def test_a_flipped_bit_in_a_vector_set_fails_the_check_naming_the_file(vector_set, tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    for f in vector_set.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    assert vectors.check_vectors(folder, ["matmul"]).ok
    path = folder / "matmul.safetensors"
    flip_bit(path)
    report = vectors.check_vectors(folder, ["matmul"])
    assert not report.ok
    (failure,) = report.failures
    assert str(path) in failure.detail and "is corrupt" in failure.detail


def test_a_vector_set_records_the_sha256_of_each_file(vector_set):
    for path in sorted(vector_set.glob("*.safetensors")):
        header, body = split(path.read_bytes())
        assert header["__metadata__"][KEY] == hashlib.sha256(body).hexdigest(), path


def test_the_check_in_docs_porting_runs_as_written(tmp_path, monkeypatch):
    # docs/porting.md, "Checksums": the few lines a port needs, run on a file minilora wrote
    text = (Path(__file__).parent.parent / "docs" / "porting.md").read_text(encoding="utf-8")
    section = text.split("**Checksums.**", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    path, _ = _lora(tmp_path)
    monkeypatch.chdir(path.parent)
    exec(compile(code, "porting.md", "exec"), {})
    flip_bit(path)
    with pytest.raises(AssertionError):
        exec(compile(code, "porting.md", "exec"), {})


def test_the_shipped_base_carries_its_checksum():
    # what `minilora pretrain` writes today: the same tensors, the key in the header
    header, body = split(demo.base_model_path().read_bytes())
    assert header["__metadata__"][KEY] == hashlib.sha256(body).hexdigest()
