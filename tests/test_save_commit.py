"""A save is one commit: an adapter folder (LoRA or VeRA) holds the old adapter or the new
one after the saving process is killed (SIGKILL) or interrupted (SIGINT, Ctrl-C) at any
step of the save (minilora.interop.safetensors_files.atomic_write).

A forked child saves with every file-system call it makes (open, write through fsync,
chmod, rename, remove) wrapped: before call number k it tells the parent and waits, and the
parent sends the signal. k runs over every call of the save, then one past the last.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import time

import numpy as np
import pytest
from helpers import TINY_2x2, make_gpt

import minilora as ml
from minilora.interop import safetensors_files
from minilora.interop.peft_adapters import load_adapter, save_adapter
from minilora.interop.vera_adapters import load_vera, save_vera
from minilora.lora import lora_layers
from minilora.variants.vera import VeraConfig, apply_vera, vera_layers

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork and signals")

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]
STEPS = ("open", "fsync", "chmod", "replace", "rename", "remove", "unlink", "mkdir")


def _save_until(step: int, save, folder, sig) -> int | None:
    """Run ``save(folder)`` in a forked child stopped before its file-system call number
    ``step`` and sent ``sig`` there. None when it stopped; else the number of calls the
    save made (``step`` was past the last one)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            calls = [0]

            def pausing(real):
                def call(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == step + 1:
                        os.write(write, b"stopped\n")
                        time.sleep(60)  # until the parent's signal
                    return real(*args, **kwargs)

                return call

            for name in STEPS:
                setattr(os, name, pausing(getattr(os, name)))
            save(folder)
            os.write(write, f"done {calls[0]}\n".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        said = pipe.readline().split()
    if said == ["stopped"]:
        os.kill(pid, sig)
    _, status = os.waitpid(pid, 0)
    if said == ["stopped"]:
        return None
    assert said[0] == "done" and os.waitstatus_to_exitcode(status) == 0, (said, status)
    return int(said[1])


def _two_lora_adapters():
    """(base, save old, save new, what a loaded model holds): the two adapters have the
    same shapes and another lora_alpha and B, so any mix of their files loads as a third."""
    base = make_gpt(TINY_2x2)
    models = {}
    for alpha, shift in ((4, 1.0), (16, 2.0)):
        model = copy.deepcopy(base)
        config = ml.LoRAConfig(r=2, lora_alpha=alpha, target_modules=["q_proj", "v_proj"])
        ml.apply_lora(model, config)
        for _, layer in lora_layers(model):
            layer.lora_B.data += shift
        models[alpha] = (model, config)

    def saver(alpha):
        return lambda folder: save_adapter(*models[alpha][:1], folder, models[alpha][1])

    def loaded(folder):
        model = copy.deepcopy(base)
        config = load_adapter(model, folder)
        return config.lora_alpha, [layer.lora_B.data.copy() for _, layer in lora_layers(model)]

    expected = {a: (a, [m.lora_B.data for _, m in lora_layers(models[a][0])]) for a in models}
    return saver(4), saver(16), loaded, expected[4], expected[16]


def _two_vera_adapters():
    base = make_gpt(TINY_2x2)
    models = {}
    for r, shift in ((2, 1.0), (4, 2.0)):
        model = copy.deepcopy(base)
        config = VeraConfig(r=r, target_modules=["q_proj", "v_proj"])
        apply_vera(model, config)
        for _, layer in vera_layers(model):
            layer.vera_lambda_b.data += shift
        models[r] = (model, config)

    def saver(r):
        return lambda folder: save_vera(models[r][0], folder, models[r][1])

    def loaded(folder):
        model = copy.deepcopy(base)
        config = load_vera(model, folder)
        return config.r, [m.vera_lambda_b.data.copy() for _, m in vera_layers(model)]

    expected = {
        r: (r, [m.vera_lambda_b.data for _, m in vera_layers(models[r][0])]) for r in models
    }
    return saver(2), saver(4), loaded, expected[2], expected[4]


def _same(got, want) -> bool:
    return got[0] == want[0] and all(
        np.array_equal(a, b) for a, b in zip(got[1], want[1], strict=True)
    )


@pytest.mark.parametrize("adapters", [_two_lora_adapters, _two_vera_adapters], ids=["lora", "vera"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_a_save_stopped_at_any_step_leaves_the_old_adapter_or_the_new_one(tmp_path, adapters, sig):
    save_old, save_new, loaded, old, new = adapters()
    seen = set()
    step = 0
    while True:
        folder = tmp_path / f"step{step}"
        save_old(folder)
        calls = _save_until(step, save_new, folder, sig)
        got = loaded(folder)  # completes a save killed after its commit point
        which = "old" if _same(got, old) else "new" if _same(got, new) else None
        assert which, f"stopped before file-system call {step + 1}: a mix of the two adapters"
        seen.add(which)
        # Ctrl-C cleans up; a killed save leaves hidden temporary files, for the next save
        files = [n for n in os.listdir(folder) if sig == signal.SIGINT or n[0] != "."]
        assert sorted(files) == ADAPTER_FILES
        if calls is not None:
            break
        step += 1
    assert calls == step and step > 10 and seen == {"old", "new"}
    for folder in tmp_path.iterdir():  # a stopped save never stops the next one
        save_old(folder)
        assert sorted(os.listdir(folder)) == ADAPTER_FILES
        assert _same(loaded(folder), old)


def test_a_config_edited_by_hand_still_loads(tmp_path):
    # base_model_name_or_path and other bookkeeping keys PEFT ignores: a user fills them in
    save_old, _, loaded, old, _ = _two_lora_adapters()
    save_old(tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = "my-base"
    path.write_text(json.dumps(config, indent=4))
    assert _same(loaded(tmp_path / "a"), old)


@pytest.mark.parametrize(
    "record",
    [{"adapter_config.json": "../../x"}, {"../a": ".a.minilora-tmp-1"}, {"x": "y"}, []],
)
def test_a_journal_that_minilora_did_not_write_is_refused_not_followed(tmp_path, record):
    save_old, _, _, _, _ = _two_lora_adapters()
    folder = tmp_path / "a"
    save_old(folder)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    (folder / safetensors_files.JOURNAL_NAME).write_text(json.dumps({"minilora_journal": record}))
    with pytest.raises(ValueError, match="is not the journal of a minilora save"):
        load_adapter(make_gpt(TINY_2x2), folder)
    assert all(p.read_bytes() == data for p, data in before.items())
