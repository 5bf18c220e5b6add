"""DoRA (``LoRAConfig(use_dora=True)``): W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖ per output row.

The op's backward against finite differences of the function DoRA differentiates (the
norm a constant, taken from the unperturbed weights), and proof that the norm really is
detached; the layer's init (output exactly the base's, m the row norms of W0), its
formula, merge and unmerge (a square layer too), training, adapter files; and, when
PyTorch and PEFT are installed, parity with PEFT's DoRA on one layer and on a whole GPT,
and adapter folders both ways.
"""

import copy
import os

import numpy as np
import pytest
from helpers import TINY_2x2, make_gpt, randomize_weights, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import seeds

import minilora as ml
from minilora import GradcheckError, LoRAConfig, LoRALinear, Tensor, gradcheck
from minilora import functional as F
from minilora.interop import peft_adapters, safetensors_files
from minilora.lora import count_parameters, lora_layers

pytestmark = pytest.mark.usefixtures("ops")

IDX = np.array([[1, 4, 1, 0, 9, 3], [6, 1, 4, 2, 10, 5]], dtype=np.int64)
DORA = LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "fc1"], use_dora=True)


@st.composite
def dora_inputs(draw):
    """x (..., in), W (out, in), b (out,) or None, A (r, in), B (out, r), m (out,), s,
    x_lora or None; float64, B non-zero (B = 0 would hide dA and the norm's dependence)."""
    in_f, out_f = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    r = draw(st.integers(1, min(in_f, out_f)))
    lead = draw(st.lists(st.integers(1, 3), min_size=1, max_size=2).map(tuple))
    rng = np.random.default_rng(draw(seeds))
    x = rng.uniform(-2, 2, (*lead, in_f))
    W = rng.uniform(-1, 1, (out_f, in_f))
    b = rng.uniform(-1, 1, (out_f,)) if draw(st.booleans()) else None
    A = rng.uniform(-1, 1, (r, in_f))
    B = rng.uniform(-1, 1, (out_f, r))
    m = rng.uniform(0.5, 2, (out_f,))
    s = draw(st.sampled_from([0.5, 2.0, 16 / 3]))
    x_lora = rng.uniform(-2, 2, x.shape) if draw(st.booleans()) else None
    return x, W, b, A, B, m, s, x_lora


def dora_fn(s, has_b, has_d):
    """fn(*tensors) for gradcheck over [x, W0, (b), A, B, m, (x_lora)]."""

    def fn(*ts):
        ts = list(ts)
        x, W = ts.pop(0), ts.pop(0)
        b_ = ts.pop(0) if has_b else None
        A, B, m = ts.pop(0), ts.pop(0), ts.pop(0)
        d = ts.pop(0) if has_d else None
        return F.dora_linear(x, W, b_, A, B, m, s, d)

    return fn


@settings(max_examples=15)
@given(args=dora_inputs())
def test_gradcheck_dora_linear_with_the_norm_held_constant(args, monkeypatch):
    """DoRA differentiates L(x, A, B, m) with n = ‖W0 + s·B·A‖ a constant (the paper's
    section 4.3): the finite differences must see that function, so the norm is fixed at
    the unperturbed weights' value for every evaluation. Every input is checked with a
    random upstream gradient; W0 (input 1) is frozen and must get no gradient."""
    x, W, b, A, B, m, s, x_lora = args
    n0 = F.dora_weight_norm(W, A, B, s)
    inputs = [x, W] + ([] if b is None else [b]) + [A, B, m]
    inputs += [] if x_lora is None else [x_lora]
    fn = dora_fn(s, b is not None, x_lora is not None)
    with monkeypatch.context() as mp:
        mp.setattr(F, "dora_weight_norm", lambda *_: n0)
        assert gradcheck(fn, inputs, no_grads=(1,))


def test_gradcheck_dora_linear_trainable_base_with_the_norm_held_constant(monkeypatch):
    """W0 too, when it trains (full fine-tuning of a DoRA layer), gets lora_linear's dW
    scaled by m / n: finite differences with the norm fixed agree."""
    rng = np.random.default_rng(3)
    x, W = rng.uniform(-2, 2, (2, 3, 4)), rng.uniform(-1, 1, (5, 4))
    A, B, m, b = (
        rng.uniform(-1, 1, (2, 4)),
        rng.uniform(-1, 1, (5, 2)),
        rng.uniform(0.5, 2, 5),
        rng.uniform(-1, 1, 5),
    )
    n0 = F.dora_weight_norm(W, A, B, 2.0)
    monkeypatch.setattr(F, "dora_weight_norm", lambda *_: n0)
    assert gradcheck(lambda *t: F.dora_linear(*t, 2.0), [x, W, b, A, B, m])


def test_the_norm_is_detached_the_full_derivative_differs():
    """The check above could fail: through the live norm (finite differences of
    dora_linear as it is, n recomputed from the perturbed A and B), A's and B's gradients
    are not the detached ones. x and m do not enter the norm, so theirs agree either way."""
    rng = np.random.default_rng(0)
    x, W = rng.uniform(-2, 2, (3, 4)), rng.uniform(-1, 1, (3, 4))
    A, B, m = rng.uniform(-1, 1, (2, 4)), rng.uniform(-1, 1, (3, 2)), rng.uniform(0.5, 2, 3)
    fn = dora_fn(2.0, False, False)
    with pytest.raises(GradcheckError, match="input 2"):  # A: the norm's term is missing
        gradcheck(fn, [x, W, A, B, m], no_grads=(1, 3))
    with pytest.raises(GradcheckError, match="input 3"):  # B likewise
        gradcheck(fn, [x, W, A, B, m], no_grads=(1, 2))
    assert gradcheck(fn, [x, W, A, B, m], no_grads=(1, 2, 3))  # x and m: exact as they are


@given(args=dora_inputs())
def test_dora_linear_is_its_formula(args):
    """y = (m / ‖W0 + s·B·A‖) ⊙ (x W0ᵀ + s·(d Aᵀ) Bᵀ) + b, written out in NumPy; with d = x
    that is x W'ᵀ + b for W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖ (per output row)."""
    x, W, b, A, B, m, s, x_lora = args
    d = x if x_lora is None else x_lora
    adapted = W + s * B @ A
    n = np.sqrt((adapted**2).sum(axis=1))
    want = (m / n) * (x @ W.T + s * (d @ A.T) @ B.T) + (0 if b is None else b)
    y = F.dora_linear(x, W, b, A, B, m, s, x_lora).data
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    if x_lora is None:
        W_prime = (m / n)[:, None] * adapted
        np.testing.assert_allclose(
            y, x @ W_prime.T + (0 if b is None else b), rtol=1e-12, atol=1e-12
        )


def test_dora_linear_refuses_a_magnitude_of_the_wrong_shape():
    x, W, A, B = np.ones((2, 4)), np.ones((3, 4)), np.ones((2, 4)), np.ones((3, 2))
    with pytest.raises(ValueError, match=r"magnitude has shape \(4,\), expected \(3,\)"):
        F.dora_linear(x, W, None, A, B, np.ones(4), 1.0)


# --------------------------------------------------------------------------------------
# The layer and the model
# --------------------------------------------------------------------------------------


def test_dora_model_at_init_is_the_base_model_bitwise_and_m_is_the_row_norms():
    base = randomize_weights(make_gpt(TINY_2x2), 1)
    model = copy.deepcopy(base)
    ml.apply_lora(model, DORA)
    with ml.no_grad():
        assert np.array_equal(model(IDX)[0].data, base(IDX)[0].data)
    for path, layer in lora_layers(model):
        w0 = base.get_submodule(path).weight.data
        np.testing.assert_array_equal(
            layer.lora_magnitude_vector.data, np.sqrt((w0**2).sum(axis=1))
        )
        assert layer.lora_magnitude_vector.requires_grad and not layer.weight.requires_grad
    assert count_parameters(model)[0] == sum(
        layer.r * (layer.in_features + layer.out_features) + layer.out_features
        for _, layer in lora_layers(model)
    )


def dora_layer(n_in, n_out, dtype=np.float64, seed=0, bias=True):
    """A DoRA LoRALinear with random W0, A, B and m (as if trained)."""
    layer = LoRALinear(n_in, n_out, bias, r=2, lora_alpha=3, use_dora=True, dtype=dtype)
    rng = np.random.default_rng(seed)
    for p in layer.parameters():
        p.data[...] = rng.normal(0, 1, p.shape)
    layer.lora_magnitude_vector.data[...] = rng.uniform(0.5, 2, layer.out_features)
    return layer


@pytest.mark.parametrize("shape", [(6, 6), (4, 7), (7, 4)], ids=["square", "wide", "tall"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_merge_is_the_dora_weight_and_unmerge_restores_w0(shape, dtype):
    """merged W = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖ (rows), the same outputs merged or not, and
    unmerge gives W0 back to rounding. The square layer catches a norm broadcast along the
    wrong axis (PEFT's bug that corrupted square GPT-2 weights on unmerge)."""
    n_in, n_out = shape
    layer = dora_layer(n_in, n_out, dtype)
    W0 = layer.weight.data.copy()
    A, B, m, s = (
        layer.lora_A.data,
        layer.lora_B.data,
        layer.lora_magnitude_vector.data,
        layer.scaling,
    )
    adapted = W0.astype(np.float64) + s * B.astype(np.float64) @ A.astype(np.float64)
    want = (m[:, None] / np.linalg.norm(adapted, axis=1, keepdims=True)) * adapted
    x = np.random.default_rng(1).normal(size=(3, n_in)).astype(dtype)
    layer.eval()
    with ml.no_grad():
        unmerged_y = layer(Tensor(x)).data
        layer.merge()
        merged_y = layer(Tensor(x)).data
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == np.float64 else {"rtol": 1e-5, "atol": 1e-5}
    np.testing.assert_allclose(layer.weight.data, want, **tol)
    np.testing.assert_allclose(merged_y, unmerged_y, **tol)
    layer.unmerge()
    np.testing.assert_allclose(layer.weight.data, W0, **tol)
    assert not layer.merged and layer.merged_norm is None


def test_merge_and_unload_keeps_the_dora_models_logits():
    model = randomize_weights(make_gpt(TINY_2x2, dtype=np.float64), 2)
    ml.apply_lora(model, DORA)
    randomize_weights(model, 3)  # trained-looking A, B and m
    model.eval()
    with ml.no_grad():
        before = model(IDX)[0].data
        ml.merge_and_unload(model)
        after = model(IDX)[0].data
    assert not lora_layers(model)
    np.testing.assert_allclose(after, before, rtol=1e-10, atol=1e-12)


def test_training_moves_m_a_and_b_and_leaves_w0_bitwise():
    model = randomize_weights(make_gpt(TINY_2x2), 4)
    ml.apply_lora(model, DORA)
    frozen = {n: p.data.copy() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.data.copy() for n, p in model.named_parameters() if p.requires_grad}
    opt = ml.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(IDX, IDX)[1].backward()
        opt.step()
    params = dict(model.named_parameters())
    for name, value in frozen.items():
        assert np.array_equal(params[name].data, value), name
    for name, value in trained.items():
        assert not np.array_equal(params[name].data, value), name
    assert any(n.endswith("lora_magnitude_vector") for n in trained)


def test_dora_config_is_checked():
    with pytest.raises(ValueError, match="use_dora='yes' must be True or False"):
        LoRAConfig(use_dora="yes")


# --------------------------------------------------------------------------------------
# Adapter files
# --------------------------------------------------------------------------------------


def trained_dora_model(seed=5):
    model = randomize_weights(make_gpt(TINY_2x2), 1)
    base = copy.deepcopy(model)
    ml.apply_lora(model, DORA)
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.data[...] = rng.normal(0, 0.5, p.shape) + (1.0 if p.ndim == 1 else 0.0)
    return base, model


def logits(model):
    model.eval()
    with ml.no_grad():
        return model(IDX)[0].data


def test_dora_adapter_round_trip_keys_config_and_logits(tmp_path):
    base, model = trained_dora_model()
    peft_adapters.save_adapter(model, tmp_path, DORA)
    tensors, _ = safetensors_files.read_safetensors(tmp_path / "adapter_model.safetensors", "test")
    assert "base_model.model.blocks.0.attn.q_proj.lora_magnitude_vector" in tensors  # PEFT's key
    assert tensors["base_model.model.blocks.0.attn.q_proj.lora_magnitude_vector"].shape == (8,)
    config = peft_adapters.load_adapter(base, tmp_path)
    assert config.use_dora
    np.testing.assert_array_equal(logits(base), logits(model))


def test_a_dora_file_without_its_magnitude_is_refused_leaving_the_model_untouched(tmp_path):
    _, model = trained_dora_model()
    peft_adapters.save_adapter(model, tmp_path, DORA)
    weights = tmp_path / "adapter_model.safetensors"
    tensors, _ = safetensors_files.read_safetensors(weights, "test")
    key = "base_model.model.blocks.1.mlp.fc1.lora_magnitude_vector"
    del tensors[key]
    weights.write_bytes(safetensors_files.serialize(tensors, {"format": "pt"}))
    target = randomize_weights(make_gpt(TINY_2x2), 1)
    before = snapshot(target)
    with pytest.raises(ValueError, match=f"missing key '{key}'"):
        peft_adapters.load_adapter(target, tmp_path)
    assert snapshot(target) == before


def test_a_dora_file_does_not_load_into_plain_lora_layers(tmp_path):
    _, model = trained_dora_model()
    peft_adapters.save_adapter(model, tmp_path, DORA)
    target = make_gpt(TINY_2x2)
    ml.apply_lora(target, LoRAConfig(r=2, lora_alpha=4, target_modules=DORA.target_modules))
    before = snapshot(target)
    with pytest.raises(ValueError, match="config says use_dora=True but the LoRA layer"):
        peft_adapters.load_adapter(target, tmp_path)
    assert snapshot(target) == before


# --------------------------------------------------------------------------------------
# PEFT parity (oracle)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_peft():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # PEFT must never try the network
    torch = pytest.importorskip("torch", reason="parity tests need PyTorch")
    peft = pytest.importorskip("peft", reason="DoRA parity needs PEFT")
    return torch, peft


TOL = {np.float64: {"rtol": 1e-10, "atol": 1e-12}, np.float32: {"rtol": 1e-5, "atol": 1e-5}}


def close(got, want, dtype, what):
    want = want.detach().numpy() if hasattr(want, "detach") else np.asarray(want)
    assert got.shape == want.shape, what
    np.testing.assert_allclose(got, want, err_msg=what, **TOL[dtype])


@pytest.mark.oracle
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(5, 5), (6, 4)], ids=["square", "rect"])
def test_dora_layer_matches_peft(torch_peft, dtype, shape):
    """Same W0, b, A, B, m: the same output, dx, dA, dB, dm (PEFT detaches the norm too),
    the same merged weight, and unmerge gives both back W0."""
    torch, peft = torch_peft
    n_in, n_out = shape
    layer = dora_layer(n_in, n_out, dtype, seed=2)
    ml.mark_only_lora_as_trainable(layer)
    one = torch.nn.Sequential()
    one.add_module("proj", torch.nn.Linear(n_in, n_out))
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["proj"], use_dora=True)
    model = peft.get_peft_model(
        one.to(torch.float64 if dtype == np.float64 else torch.float32), config
    )
    p = model.base_model.model.proj
    with torch.no_grad():
        p.base_layer.weight.copy_(torch.tensor(layer.weight.data))
        p.base_layer.bias.copy_(torch.tensor(layer.bias.data))
        p.lora_A["default"].weight.copy_(torch.tensor(layer.lora_A.data))
        p.lora_B["default"].weight.copy_(torch.tensor(layer.lora_B.data))
        p.lora_magnitude_vector["default"].weight.copy_(
            torch.tensor(layer.lora_magnitude_vector.data)
        )
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, n_in)).astype(dtype)
    g = rng.normal(size=(2, 3, n_out)).astype(dtype)
    xt = Tensor(x, requires_grad=True)
    y = layer(xt)
    y.backward(g)
    tx = torch.tensor(x, requires_grad=True)
    ty = model(tx)
    ty.backward(torch.tensor(g))
    close(y.data, ty, dtype, "output")
    close(xt.grad, tx.grad, dtype, "dx")
    close(layer.lora_A.grad, p.lora_A["default"].weight.grad, dtype, "dA")
    close(layer.lora_B.grad, p.lora_B["default"].weight.grad, dtype, "dB")
    close(
        layer.lora_magnitude_vector.grad,
        p.lora_magnitude_vector["default"].weight.grad,
        dtype,
        "dm",
    )
    w0 = layer.weight.data.copy()
    layer.merge()
    p.merge()
    close(layer.weight.data, p.base_layer.weight, dtype, "merged weight")
    layer.unmerge()
    p.unmerge()
    close(layer.weight.data, p.base_layer.weight, dtype, "unmerged weight")
    np.testing.assert_allclose(layer.weight.data, w0, **TOL[dtype])


def peft_dora_config(peft):
    return peft.LoraConfig(
        r=DORA.r,
        lora_alpha=DORA.lora_alpha,
        target_modules=list(DORA.target_modules),
        use_dora=True,
    )


@pytest.mark.oracle
def test_dora_gpt_matches_peft_on_the_port(torch_peft):
    """A whole GPT (float64) with DoRA on q_proj, v_proj and fc1: logits, loss and every
    trainable parameter's gradient equal PEFT's on the PyTorch port."""
    torch, peft = torch_peft
    from examples.torch_gpt import TorchGPT, load_minilora_state, minilora_name

    model = randomize_weights(make_gpt(TINY_2x2, dtype=np.float64), 1)
    ml.apply_lora(model, DORA)
    randomize_weights(model, 6)
    port = peft.get_peft_model(TorchGPT(TINY_2x2).to(torch.float64), peft_dora_config(peft))
    load_minilora_state(port, model.state_dict())
    logits_, loss = model(IDX, IDX)
    loss.backward()
    t_logits, t_loss = port(torch.tensor(IDX), torch.tensor(IDX))
    t_loss.backward()
    close(logits_.data, t_logits, np.float64, "logits")
    close(loss.data, t_loss, np.float64, "loss")
    theirs = {minilora_name(n): p for n, p in port.named_parameters() if p.requires_grad}
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(theirs) == set(ours)
    for name, p in ours.items():
        close(p.grad, theirs[name].grad, np.float64, f"gradient of {name}")


@pytest.mark.oracle
def test_dora_adapter_folders_both_ways(torch_peft, tmp_path):
    torch, peft = torch_peft
    from examples.torch_gpt import TorchGPT, load_minilora_state

    base, model = trained_dora_model()
    peft_adapters.save_adapter(model, tmp_path / "ours", DORA)
    port = TorchGPT(TINY_2x2)
    load_minilora_state(port, base.state_dict())
    loaded = peft.PeftModel.from_pretrained(port, tmp_path / "ours").eval()
    with torch.no_grad():
        close(logits(model), loaded(torch.tensor(IDX))[0], np.float32, "PEFT loads minilora's")

    port = TorchGPT(TINY_2x2)
    load_minilora_state(port, base.state_dict())
    theirs = peft.get_peft_model(port, peft_dora_config(peft))
    torch.manual_seed(5)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    theirs.save_pretrained(tmp_path / "theirs")
    target = copy.deepcopy(base)
    config = peft_adapters.load_adapter(target, tmp_path / "theirs")
    assert config.use_dora
    theirs.eval()
    with torch.no_grad():
        close(logits(target), theirs(torch.tensor(IDX))[0], np.float32, "minilora loads PEFT's")


# --------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------


def test_dora_and_pissa_train_and_merge_on_every_device(device):
    """DoRA on PiSSA-initialised layers: a forward, backward and AdamW step, then merge and
    unmerge, give the CPU's numbers on every device (nothing falls back to the host)."""

    def run(dev):
        model = randomize_weights(make_gpt(TINY_2x2, dtype=np.float64), 1).to(dev)
        config = copy.deepcopy(DORA)
        config.init_lora_weights = "pissa"
        ml.apply_lora(model, config)
        opt = ml.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model(IDX, IDX)[1].backward()
        opt.step()
        model.eval()
        with ml.no_grad():
            out = [model(IDX)[0].data]
            ml.merge_lora(model)
            out.append(model(IDX)[0].data)
            ml.unmerge_lora(model)
            out.append(model(IDX)[0].data)
        return [ml.backend.to_numpy(o) for o in out]

    for got, want in zip(run(device), run("cpu"), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
