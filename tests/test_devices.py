"""Devices: the whole library on "cpu", on the "standin" device and, when present, on "cuda".

Most tests take the ``device`` fixture (tests/conftest.py), so each runs once per device.
"standin" is a CPU stand-in for a GPU (tests/standin.py): NumPy data behind CuPy's
rules, so that a host fallback (``numpy.asarray`` of a device array, a NumPy function
called on one, a device array handed to safetensors) fails here, without a GPU, exactly
as it would on CuPy. Its numbers are NumPy's, so on "standin" every result must be
*bitwise* the CPU's; on "cuda" results agree within float32 tolerance, and exactly where
the computation has one rounding per element (elementwise arithmetic, copies, indexing).

What is promised, and tested here:

* ``Tensor.to``, ``Module.to`` and ``device=`` on constructors put every array on the
  device and back, unchanged; random numbers are the same on every device for a seed;
* every op gives the CPU's values on every device, forward and backward;
* an op mixing devices raises ValueError naming both; nothing copies to the host silently;
* optimizer state lives on its parameter's device; a LoRA training step, a merge and
  checkpoint round trips work from and to every device; so does the CLI (``--device``,
  ``MINILORA_DEVICE``);
* the stand-in really refuses what CuPy refuses (the guard itself is tested), and a host
  fallback put into an op makes a training step fail on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import standin
from helpers import TINY_2x2, make_gpt

import minilora as ml
from minilora import backend, cli
from minilora import functional as F
from minilora.cli import jobs
from minilora.data import DigitTasks
from minilora.experiments import demo
from minilora.interop import model_files, peft_adapters, peft_config
from minilora.train import evaluate, train

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def host(x) -> np.ndarray:
    """A NumPy copy of a Tensor or an array on any device."""
    return backend.to_numpy(x.data if isinstance(x, ml.Tensor) else x).copy()


def assert_same(got, want, device: str, exact: bool = False, rtol=1e-5, atol=1e-6) -> None:
    """``got`` (from ``device``) equals ``want`` (from the CPU): bitwise on the CPU and the
    stand-in (both compute with NumPy), and where ``exact``; within tolerance on a GPU."""
    got, want = host(got), host(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    if exact or device in ("cpu", "standin"):
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def tiny_gpt(device: str, seed: int = 0, **changes) -> ml.GPT:
    return make_gpt(TINY_2x2, seed, device=device, **changes)


def batch(device: str, seed: int = 1, n: int = 4):
    """Token ids and targets (n, 8) on ``device``; targets -100 except the last 3 columns."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, TINY_2x2.vocab_size, size=(n, TINY_2x2.block_size))
    y = np.full_like(x, -100)
    y[:, -3:] = rng.integers(0, TINY_2x2.vocab_size, size=(n, 3))
    return backend.to_device(x, device), backend.to_device(y, device)


def params_on(model, device: str) -> bool:
    return all(p.device == device for p in model.parameters())


# --------------------------------------------------------------------------------------
# The stand-in device refuses what CuPy refuses (the guard itself)
# --------------------------------------------------------------------------------------


def test_standin_arrays_refuse_implicit_conversion_to_numpy():
    x = backend.to_device(np.arange(6.0, dtype=np.float32).reshape(2, 3), "standin")
    for convert in (
        lambda: np.asarray(x),
        lambda: np.array(x),
        lambda: np.asarray([x[0], x[1]]),
        lambda: np.concatenate([x, x]),
        lambda: np.zeros((2, 3), np.float32)[x.astype(backend.int64)],
    ):
        with pytest.raises(TypeError, match="Implicit conversion to a NumPy array"):
            convert()
    with pytest.raises(TypeError):
        np.exp(x)  # NumPy ufuncs refuse it (CuPy would dispatch; minilora never calls np.*)
    with pytest.raises(TypeError):
        memoryview(x)
    with pytest.raises(AttributeError, match="no attribute 'tobytes'"):
        x.tobytes()
    with pytest.raises((TypeError, AttributeError)):
        safetensors.numpy.save({"w": x})  # a device array never reaches a file unconverted


def test_standin_refuses_to_mix_with_host_arrays_as_cupy_does():
    x = backend.to_device(np.ones(3, np.float32), "standin")
    h = np.ones(3, np.float32)
    for mix in (lambda: x + h, lambda: h + x, lambda: x * h, lambda: standin.standin.exp(h)):
        with pytest.raises(TypeError, match="Unsupported type"):
            mix()
    with pytest.raises(TypeError, match="Unsupported type"):
        x[...] = h


def test_standin_allows_what_cupy_allows():
    data = np.arange(6.0, dtype=np.float32).reshape(2, 3)
    x = backend.to_device(data, "standin")
    got = x.get()  # the explicit copy to the host
    assert type(got) is np.ndarray
    got[0, 0] = 99.0
    assert float(x[0, 0]) == 0.0  # a copy: the device array did not change
    total = x.sum()
    assert backend.device_of(total) == "standin" and total.shape == ()  # 0-d, not a scalar
    assert float(total) == 15.0 and int(x[1, 2]) == 5 and bool(x[0, 1])
    assert x.tolist() == data.tolist() and x[1, 1].item() == 4.0
    assert f"{x[1, 1]:.1f}" == "4.0"
    rows = x[np.array([1, 0])]  # a host index array is copied to the device, as in CuPy
    np.testing.assert_array_equal(rows.get(), data[[1, 0]])
    assert [backend.device_of(r) for r in x] == ["standin", "standin"]


def test_standin_module_offers_only_functions_cupy_has():
    xp = standin.standin
    assert xp.exp(backend.to_device(np.zeros(2), "standin")).get().tolist() == [1.0, 1.0]
    with pytest.raises(AttributeError):
        xp.broadcast_shapes  # NumPy has it, CuPy does not: minilora must not use it  # noqa: B018
    with pytest.raises(AttributeError):
        xp.random  # no NumPy submodule leaks through  # noqa: B018


def test_a_host_fallback_in_an_op_fails_a_training_step_on_the_standin(monkeypatch, reference_ops):
    """Break the library on purpose: GELU computes its tanh with NumPy on the host."""

    def gelu_on_the_host(self, x):
        self.x = x
        self.t = np.tanh(np.asarray(x) * 0.79788456)  # the fallback a GPU would refuse
        return 0.5 * x * (1.0 + self.t)

    monkeypatch.setattr(F.GELUFunction, "forward", gelu_on_the_host)
    x, y = batch("cpu")
    tiny_gpt("cpu")(x, y)  # NumPy accepts it: a CPU-only suite cannot see the bug
    x, y = batch("standin")
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array"):
        tiny_gpt("standin")(x, y)


def test_recording_copies_sees_every_move_between_devices():
    with backend.recording_copies() as copies:
        d = backend.to_device(np.zeros((2, 3)), "standin")
        backend.to_device(d, "standin")  # already there: no copy
        backend.to_numpy(d)
        backend.to_numpy(np.zeros(2))  # host to host: no copy
    assert [(c.source, c.target, c.shape) for c in copies] == [
        ("cpu", "standin", (2, 3)),
        ("standin", "cpu", (2, 3)),
    ]


# --------------------------------------------------------------------------------------
# Tensors and modules move between devices
# --------------------------------------------------------------------------------------


def test_device_fixture_gives_a_working_device(device):
    t = ml.Tensor([1.0, 2.0], device=device)
    assert t.device == device and backend.device_of(t.data) == device
    assert backend.get_array_module(t.data) is backend.module_for(device)


def test_tensor_to_round_trip(device):
    t = ml.Tensor([[1.5, -2.0], [3.25, 1e-30]], requires_grad=True)
    d = t.to(device)
    assert d.device == device and backend.device_of(d.data) == device
    assert d.requires_grad and d.dtype == t.dtype
    assert d.to(device) is d  # already there: the same tensor
    back = d.to("cpu")
    assert back.device == "cpu"
    np.testing.assert_array_equal(back.numpy(), t.numpy())
    assert ml.Tensor(d).device == device  # wrapping keeps the device


def test_tensor_to_refuses_an_op_output_it_would_cut_from_the_graph():
    y = ml.Tensor([1.0, 2.0], requires_grad=True) * 2.0  # produced by Mul
    with pytest.raises(RuntimeError, match=r"to\('standin'\).*leaf.*Mul"):
        y.to("standin")
    assert y.to("cpu") is y  # already there: nothing is cut
    assert y.detach().to("standin").device == "standin"  # a leaf moves


def test_module_to_moves_parameters_and_gradients_in_place(device):
    model = tiny_gpt("cpu")
    x, y = batch("cpu")
    model(x, y)[1].backward()
    params = model.parameters()
    before = {name: host(p) for name, p in model.named_parameters()}
    grads = {name: host(p.grad) for name, p in model.named_parameters()}
    assert model.to(device) is model
    assert model.parameters() == params  # the same objects: optimizers stay valid
    assert params_on(model, device) and model.device == device
    assert all(backend.device_of(p.grad) == device for p in params)
    model.to("cpu")
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(host(p), before[name])
        np.testing.assert_array_equal(host(p.grad), grads[name])


def test_constructors_create_every_array_on_the_device(device):
    model = tiny_gpt(device)
    assert model.device == device and params_on(model, device)
    ml.apply_lora(model, ml.LoRAConfig(r=2, lora_alpha=4))
    assert params_on(model, device)  # lora_A and lora_B too
    layers = [
        ml.Linear(4, 3, device=device),
        ml.nn.Embedding(5, 4, device=device),
        ml.nn.LayerNorm(4, device=device),
        ml.LoRALinear(4, 3, r=2, device=device),
    ]
    assert all(params_on(layer, device) for layer in layers)
    assert ml.Parameter(backend.zeros((2,), device=device)).device == device
    assert ml.Parameter([1.0, 2.0], device=device).device == device
    assert backend.device_of(backend.ones((2,), device=device)) == device
    assert backend.device_of(backend.arange(3, device=device)) == device


def test_same_seed_gives_the_same_numbers_on_every_device(device):
    draws = []
    for dev in ("cpu", device):
        g = backend.Generator(123)
        draws.append(
            [
                g.normal((3, 4), std=0.5, device=dev),
                g.uniform((5,), -1.0, 1.0, device=dev),
                g.random((2, 2), dtype=backend.float64, device=dev),
                g.integers(0, 10, (7,), device=dev),
            ]
        )
    for got, want in zip(draws[1], draws[0], strict=True):
        assert backend.device_of(got) == device
        assert_same(got, want, device, exact=True)
    # initialisation and dropout masks come from those draws
    for (_, p_dev), (_, p_cpu) in zip(
        tiny_gpt(device).named_parameters(), tiny_gpt("cpu").named_parameters(), strict=True
    ):
        assert_same(p_dev, p_cpu, device, exact=True)
    masks = [
        F.dropout(
            ml.Tensor(np.ones((4, 6), np.float32)).to(dev), 0.5, generator=backend.Generator(7)
        )
        for dev in ("cpu", device)
    ]
    assert_same(masks[1], masks[0], device, exact=True)


# --------------------------------------------------------------------------------------
# Every op gives the CPU's values on every device, forward and backward
# --------------------------------------------------------------------------------------


def _ids(like: ml.Tensor, values) -> ml.Tensor:
    return ml.Tensor(backend.array(values, dtype=backend.int64, device=like.device))


# name: (function of tensors, input shapes, exact on a GPU?)
OPS = {
    "add": (lambda a, b: a + b, [(2, 3), (3,)], True),
    "sub": (lambda a, b: a - b, [(3, 2), (3, 1)], True),  # exact: reductions of 2 terms
    "mul": (lambda a, b: a * b, [(2, 3), (2, 3)], True),
    "div": (lambda a, b: a / (b * b + 1.0), [(2, 3), (2, 3)], False),
    "neg": (lambda a: -a, [(4,)], True),
    "pow": (lambda a: a**3, [(4,)], False),
    "exp": (F.exp, [(2, 3)], False),
    "log": (lambda a: F.log(a * a + 1.0), [(2, 3)], False),
    "tanh": (F.tanh, [(2, 3)], False),
    "sum": (lambda a: a.sum(axis=1), [(2, 3, 4)], False),
    "mean": (lambda a: a.mean(axis=(0, 2), keepdims=True), [(2, 3, 4)], False),
    "max": (lambda a: a.max(axis=-1), [(2, 5)], True),
    "reshape": (lambda a: a.reshape(6, 4), [(2, 3, 4)], True),
    "permute": (lambda a: a.permute(2, 0, 1), [(2, 3, 4)], True),
    "getitem": (lambda a: a[[0, 2, 0]], [(3, 4)], True),  # repeated rows accumulate
    "matmul": (lambda a, b: a @ b, [(2, 3, 4), (4, 5)], False),
    "linear": (F.linear, [(2, 3, 4), (5, 4), (5,)], False),
    "lora_linear": (
        lambda x, w, b, A, B: F.lora_linear(x, w, b, A, B, 2.0),
        [(2, 3, 4), (5, 4), (5,), (2, 4), (5, 2)],
        False,
    ),
    "gelu": (F.gelu, [(2, 3)], False),
    "layer_norm": (F.layer_norm, [(2, 3, 8), (8,), (8,)], False),
    "softmax": (F.softmax, [(2, 5)], False),
    "log_softmax": (F.log_softmax, [(2, 5)], False),
    "cross_entropy": (
        lambda z: F.softmax_cross_entropy(z, _ids(z, [[1, -100], [4, 0]])),
        [(2, 2, 5)],
        False,
    ),
    "embedding": (lambda w: F.embedding(_ids(w, [[1, 3, 1]]), w), [(5, 4)], True),
    "dropout": (lambda a: F.dropout(a, 0.5, generator=backend.Generator(3)), [(4, 6)], True),
    "attention": (F.causal_self_attention, [(1, 2, 4, 3)] * 3, False),
}


def _run_op(fn, shapes, device):
    """Forward and backward of ``fn`` on ``device`` with fixed inputs and upstream gradient;
    returns [output, grad of each input] as host arrays."""
    g = backend.Generator(0)
    inputs = [ml.Tensor(g.normal(s, device=device), requires_grad=True) for s in shapes]
    out = fn(*inputs)
    assert out.device == device
    out.backward(g.normal(out.shape, device=device))
    assert all(backend.device_of(t.grad) == device for t in inputs)
    return [host(out)] + [host(t.grad) for t in inputs]


@pytest.mark.parametrize("name", list(OPS))
def test_op_gives_the_cpu_values_on_every_device(device, name):
    fn, shapes, exact = OPS[name]
    want = _run_op(fn, shapes, "cpu")
    got = _run_op(fn, shapes, device)
    for g, w in zip(got, want, strict=True):
        assert_same(g, w, device, exact=exact)


@pytest.mark.parametrize(
    "name", ["lora_linear", "layer_norm", "attention", "cross_entropy", "embedding", "getitem"]
)
def test_gradcheck_passes_on_every_device(device, name):
    fn, shapes, _ = OPS[name]
    g = backend.Generator(1)
    inputs = [ml.Tensor(g.normal(s, dtype=backend.float64, device=device)) for s in shapes]
    assert ml.gradcheck.gradcheck(fn, inputs)


# --------------------------------------------------------------------------------------
# Mixing devices is an error; nothing copies to the host silently
# --------------------------------------------------------------------------------------


def test_an_op_mixing_devices_raises_naming_both(device):
    if device == "cpu":
        pytest.skip("mixing needs a device other than the CPU")
    a = ml.Tensor([[1.0, 2.0]], requires_grad=True)
    b = a.to(device)
    for mix in (lambda: a + b, lambda: b * a, lambda: F.linear(a, b, None), lambda: a @ b.T):
        with pytest.raises(ValueError) as info:
            mix()
        assert "'cpu'" in str(info.value) and repr(device) in str(info.value)
    model = tiny_gpt("cpu")
    x, _ = batch(device)
    with pytest.raises(ValueError, match=f"idx is on device {device!r}.*model is on 'cpu'"):
        model(x)


def test_a_training_step_copies_nothing_to_the_host_but_the_loss(device):
    model = tiny_gpt(device, dropout=0.1)
    ml.apply_lora(model, ml.LoRAConfig(r=2, lora_alpha=4, lora_dropout=0.1))
    opt = ml.AdamW(model.parameters(), lr=1e-2)
    x, y = batch(device)
    with backend.recording_copies() as copies:
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        ml.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss.item()
    to_host = [c for c in copies if c.target == "cpu"]
    if device == "cpu":
        assert copies == []
    else:
        assert [(c.source, c.shape) for c in to_host] == [(device, ())]  # loss.item()
        # the other copies are dropout masks drawn on the host (same numbers everywhere)
        assert all(c.source == "cpu" and c.target == device for c in copies if c not in to_host)


# --------------------------------------------------------------------------------------
# Optimizers, training, merging and checkpoints on every device
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda p: ml.AdamW(p, lr=1e-2), lambda p: ml.SGD(p, 0.1, 0.9)])
def test_optimizer_state_lives_on_the_parameter_device(device, make):
    model = tiny_gpt(device)
    ml.apply_lora(model, ml.LoRAConfig(r=2, lora_alpha=4))
    opt = make(model.parameters())
    x, y = batch(device)
    model(x, y)[1].backward()
    opt.step()
    arrays = [v for s in opt.state.values() for v in s.values() if hasattr(v, "nbytes")]
    assert arrays and all(backend.device_of(v) == device for v in arrays)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert set(opt.state) == {id(p) for p in trainable}  # none for a frozen weight
    assert all(host(v).dtype == np.float32 for v in arrays)


def _lora_run(device: str, steps: int = 2):
    """A LoRA model trained ``steps`` AdamW steps on ``device`` (dropout on); returns the
    model, its config, the losses and the frozen weights before training (host copies)."""
    model = tiny_gpt(device, dropout=0.1)
    config = ml.LoRAConfig(
        r=2,
        lora_alpha=4,
        target_modules=["q_proj", "v_proj", "fc1"],
        lora_dropout=0.1,
        bias="lora_only",
    )
    ml.apply_lora(model, config)
    frozen = {n: host(p) for n, p in model.named_parameters() if not p.requires_grad}
    opt = ml.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = batch(device)
    losses = []
    for _ in range(steps):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, config, losses, frozen


def test_lora_training_step_merge_and_checkpoints_on_every_device(device, tmp_path):
    model, config, losses, frozen = _lora_run(device)
    ref, _, ref_losses, _ = _lora_run("cpu")
    assert params_on(model, device)
    if device == "cuda":
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    else:
        assert losses == ref_losses
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert_same(p, q, device)
        if name in frozen:
            np.testing.assert_array_equal(host(p), frozen[name])  # bitwise untouched
    assert host(model.blocks[0].attn.q_proj.lora_B).any()  # B moved off zero

    # an adapter saved from the device loads onto a fresh base on the CPU and the device
    peft_adapters.save_adapter(model, tmp_path / "adapter", config)
    peft_adapters.save_adapter(ref, tmp_path / "ref_adapter", config)
    for dev in ("cpu", device):
        base = tiny_gpt(dev, dropout=0.1)
        peft_adapters.load_adapter(base, tmp_path / "adapter")
        assert params_on(base, dev)
        for (_, p), (_, q) in zip(base.named_parameters(), model.named_parameters(), strict=True):
            np.testing.assert_array_equal(host(p), host(q))

    # merge: the same outputs from one matmul per layer, still on the device
    model.eval()
    x, _ = batch(device, seed=5)
    with ml.no_grad():
        unmerged = host(model(x)[0])
        ml.merge_lora(model)
        merged = host(model(x)[0])
    np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-6)
    assert params_on(model, device)

    # a whole model saved from the device loads to either device, bit for bit
    merged_model = ml.merge_and_unload(model)
    model_files.save_model(merged_model, tmp_path / "model.safetensors")
    for dev in ("cpu", device):
        loaded = model_files.load_model(tmp_path / "model.safetensors", device=dev)
        assert params_on(loaded, dev)
        for (_, p), (_, q) in zip(
            loaded.named_parameters(), merged_model.named_parameters(), strict=True
        ):
            np.testing.assert_array_equal(host(p), host(q))
    if device != "cuda":  # the same numbers give the same bytes, whatever the device
        ml.merge_and_unload(ref)
        model_files.save_model(ref, tmp_path / "ref.safetensors")
        assert (tmp_path / "model.safetensors").read_bytes() == (
            tmp_path / "ref.safetensors"
        ).read_bytes()
        assert (tmp_path / "adapter" / peft_config.ADAPTER_WEIGHTS_NAME).read_bytes() == (
            tmp_path / "ref_adapter" / peft_config.ADAPTER_WEIGHTS_NAME
        ).read_bytes()


def test_train_evaluate_and_generate_on_every_device(device):
    results = {}
    for dev in ("cpu", device):
        model = tiny_gpt(dev, vocab_size=16, block_size=18)
        ml.apply_lora(model, ml.LoRAConfig(r=2, lora_alpha=4))
        opt = ml.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        tasks, data = DigitTasks(("D",)), backend.Generator(1)

        def get_batch(step, tasks=tasks, data=data, dev=dev):
            return tasks.batch(data, 8, dev)

        history = train(model, opt, get_batch, 2, progress=False)
        x, y = tasks.eval_set(seed=3, n=8, device=dev)
        metrics = evaluate(model, x, y)
        metrics_host_y = evaluate(model, x, backend.to_numpy(y))  # host targets are moved
        greedy = model.generate(x[:, :5], 4, temperature=0)
        sampled = model.generate(
            x[:, :5], 4, temperature=1.0, top_k=5, generator=backend.Generator(9)
        )
        assert backend.device_of(greedy) == dev and backend.device_of(sampled) == dev
        assert metrics == metrics_host_y
        results[dev] = ([h["loss"] for h in history], metrics, host(greedy), host(sampled))
    if device != "cuda":  # on a GPU, only close: a near-tie may pick another token
        assert results[device][:2] == results["cpu"][:2]
        np.testing.assert_array_equal(results[device][2], results["cpu"][2])
        np.testing.assert_array_equal(results[device][3], results["cpu"][3])


# --------------------------------------------------------------------------------------
# The command line: --device and MINILORA_DEVICE
# --------------------------------------------------------------------------------------


@pytest.fixture
def seen_devices(monkeypatch):
    """Record the device of the model and data the CLI evaluates."""
    seen = []

    def spy(model, x, y, *args, **kwargs):
        seen.append((model.device, backend.device_of(x), backend.device_of(y)))
        return evaluate(model, x, y, *args, **kwargs)

    monkeypatch.setattr(jobs, "evaluate", spy)  # eval's, where the command calls it
    return seen


def test_cli_eval_and_generate_run_on_the_device_flag(device, capsys, seen_devices):
    outputs = {}
    for dev in ("cpu", device):
        assert cli.main(["eval", "--device", dev, "--examples", "8", "--no-progress"]) == 0
        assert seen_devices[-1] == (dev, dev, dev)
        assert cli.main(["generate", "--device", dev, "--prompt", "D 3 1 4 ="]) == 0
        outputs[dev] = capsys.readouterr().out
    if device != "cuda":
        assert outputs[device] == outputs["cpu"]


def test_cli_reads_the_device_from_minilora_device(monkeypatch, tmp_path, capsys, seen_devices):
    monkeypatch.setenv("MINILORA_DEVICE", "standin")
    assert cli.main(["eval", "--examples", "8", "--no-progress"]) == 0
    assert seen_devices[-1] == ("standin", "standin", "standin")
    assert cli.main(["eval", "--device", "cpu", "--examples", "8", "--no-progress"]) == 0
    assert seen_devices[-1] == ("cpu", "cpu", "cpu")  # the flag wins over the variable

    # the main job, shortened to seconds: every step of it runs on the stand-in
    def tiny(cls, seed=0):
        return cls(
            steps=2,
            batch_size=8,
            ranks=(1,),
            adapter_rank=1,
            eval_examples=8,
            latency_repeats=1,
            seed=seed,
        )

    monkeypatch.setattr(demo.DemoSettings, "quick", classmethod(tiny))
    assert cli.main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["device"] == "standin"
    assert "verdict:" in capsys.readouterr().out


@pytest.mark.skipif(backend.cuda_available(), reason="CuPy with a CUDA device is installed")
def test_cli_asking_for_cuda_without_a_gpu_says_how_to_get_one(monkeypatch, capsys):
    monkeypatch.setenv("MINILORA_DEVICE", "cuda")
    assert cli.main(["eval", "--examples", "8"]) == 2
    assert 'pip install -e ".[gpu]"' in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# MINILORA_REQUIRE_GPU turns a missing GPU from a skip into a failure
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("require", [None, "0", "1"])
def test_require_gpu_decides_between_skip_and_failure(monkeypatch, require, cuda_requirement):
    monkeypatch.setattr(backend, "cuda_available", lambda: False)  # as on a machine without
    if require is None:
        monkeypatch.delenv("MINILORA_REQUIRE_GPU", raising=False)
    else:
        monkeypatch.setenv("MINILORA_REQUIRE_GPU", require)
    expected = pytest.fail.Exception if require == "1" else pytest.skip.Exception
    with pytest.raises(expected, match="CuPy with a CUDA device is not available"):
        cuda_requirement()
    monkeypatch.setattr(backend, "cuda_available", lambda: True)
    cuda_requirement()  # a GPU is there: neither


@pytest.mark.skipif(backend.cuda_available(), reason="CuPy with a CUDA device is installed")
def test_require_gpu_makes_pytest_exit_non_zero_without_a_gpu():
    env = {**os.environ, "MINILORA_REQUIRE_GPU": "1"}
    node = "tests/test_devices.py::test_device_fixture_gives_a_working_device[cuda]"
    # only this one test: the project's addopts (--nbmake) and slow plugins are left out
    options = [
        "-q",
        "-o",
        "addopts=",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:xdist",
        "-p",
        "no:nbmake",
    ]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", *options, node],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 1 and "1 error" in out, out  # fails in the fixture, not skipped
    assert "MINILORA_REQUIRE_GPU=1 but CuPy with a CUDA device is not available" in out
