"""Parity of the whole model, the LoRA layer, adapters and optimizers with PyTorch and PEFT.

* the GPT against its PyTorch port (examples/torch_gpt.py), without LoRA and with LoRA
  applied by PEFT on the port: logits, loss and every parameter's gradient, and the same
  parameters trainable on both sides;
* ``LoRALinear`` against PEFT's LoRA layer on the same weights: forward, gradients,
  scaling (rsLoRA too), merge and unmerge, and the initialisation of ``A`` and ``B``;
* adapters both ways: minilora's folder loads with ``PeftModel.from_pretrained`` and PEFT's
  ``save_pretrained`` folder loads with ``minilora.interop.peft_adapters.load_adapter``, same
  logits;
* ``SGD`` and ``AdamW`` steps against ``torch.optim``.

Skipped, with the reason, when PyTorch or PEFT is not installed. Tolerances are those of
tests/test_parity_ops.py (float64 tight, float32 PyTorch's own defaults).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import TINY_2x2
from hypothesis import given
from hypothesis import strategies as st
from peft_helpers import peft_config
from strategies import gpt_configs, lora_configs, token_batches

import minilora as ml
from minilora.interop import peft_adapters
from minilora.lora import lora_layers

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # PEFT must never try the network
torch = pytest.importorskip("torch", reason="parity tests need PyTorch: pip install -e '.[oracle]'")

from examples.torch_gpt import TorchGPT, load_minilora_state, minilora_name  # noqa: E402

pytestmark = [pytest.mark.oracle, pytest.mark.usefixtures("ops")]  # both op paths

# float64: |minilora - torch| <= 1e-12 + 1e-10·|torch|, elementwise, as for single ops
# (tests/test_parity_ops.py): only rounding and summation order differ; the worst case
# measured on whole GPTs (400 random models, HYPOTHESIS_PROFILE=dev) uses 0.3% of it.
# float32: |minilora - torch| <= 1e-4·|torch| + 1e-5·max(1, max|torch|). A GPT chains ~15
# ops per block, and layer norm (dividing by σ) and softmax amplify each op's ulp-level
# differences; a gradient element is a sum of terms as large as the tensor's largest
# element, so its absolute error follows that scale, not its own (measured: 1.6e-5 on an
# element of 0.02 beside elements of 6). Worst over 200 random models per test
# (HYPOTHESIS_PROFILE=dev, two runs): 21% of the allowance. A wrong formula, scaling or
# trainable set is off by orders of magnitude more.
# The LoRA layer and the optimizers are single ops, held to test_parity_ops.py's tolerances.
MODEL_TOL = {
    np.float64: {"rtol": 1e-10, "atol": 1e-12},
    np.float32: {"rtol": 1e-4, "atol": 1e-5},  # atol times max(1, max|torch|)
}
OP_TOL = {
    np.float64: {"rtol": 1e-10, "atol": 1e-12},
    np.float32: {"rtol": 1.3e-6, "atol": 1e-5},
}
TORCH_DTYPE = {np.float64: torch.float64, np.float32: torch.float32}
DTYPES = [np.float64, np.float32]


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft", reason="LoRA parity needs PEFT: pip install -e '.[oracle]'")


def close(got, want, dtype, what: str, model: bool = False) -> None:
    """minilora's array against PyTorch's: same shape and dtype, values within OP_TOL, or
    MODEL_TOL for the outputs and gradients of a whole GPT (``model=True``)."""
    want = want.detach().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, torch {want.shape}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, torch {want.dtype}"
    tol = (MODEL_TOL if model else OP_TOL)[dtype]
    scale = max(1.0, float(np.abs(want).max())) if model and dtype == np.float32 else 1.0
    atol = tol["atol"] * scale
    np.testing.assert_allclose(got, want, rtol=tol["rtol"], atol=atol, err_msg=what)


def randomize(model: ml.Module, seed: int) -> None:
    """Weights with std 0.3 (GPT-2's 0.02 makes every logit nearly equal, which would hide
    mistakes), layer-norm weights 1 ± 0.1, and a non-zero lora_B, so every path counts.
    lora_B is divided by the layer's scaling, so that s·B·A has the size of a trained update
    whatever lora_alpha is (that is what the scaling is for, docs/math.md)."""
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        is_ln = leaf == "weight" and owner.endswith(("ln1", "ln2", "ln_f"))
        values = 1 + rng.uniform(-0.1, 0.1, p.shape) if is_ln else rng.normal(0, 0.3, p.shape)
        if leaf == "lora_B":
            values /= (model.get_submodule(owner) if owner else model).scaling
        p.data[...] = values


def run_both(model, port, idx, targets, dtype):
    """Forward and backward on both sides; compare logits, loss and every gradient, and
    that the same parameters train."""
    logits, loss = model(idx, targets)
    loss.backward()
    t_logits, t_loss = port(torch.tensor(idx), torch.tensor(targets))
    t_loss.backward()
    close(logits.data, t_logits, dtype, "logits", model=True)
    close(loss.data, t_loss, dtype, "loss", model=True)
    torch_params = {minilora_name(n): p for n, p in port.named_parameters()}
    assert set(torch_params) == {n for n, _ in model.named_parameters()}
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {n for n, p in torch_params.items() if p.requires_grad}
    for name, p in model.named_parameters():
        if name in trains:
            close(p.grad, torch_params[name].grad, dtype, f"gradient of {name}", model=True)
        else:
            assert p.grad is None and torch_params[name].grad is None, name


@st.composite
def ignored_targets(draw, config):
    idx, targets = draw(token_batches(config, min_len=2))
    targets[0, 0] = -100  # ignored: counted in neither the loss nor its mean
    return idx, targets


# --------------------------------------------------------------------------------------
# The GPT and its PyTorch port
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_gpt_matches_the_pytorch_port(dtype, data):
    config = data.draw(gpt_configs())
    ml.manual_seed(0)
    model = ml.GPT(config, dtype=dtype)
    randomize(model, data.draw(st.integers(0, 2**16)))
    port = TorchGPT(config).to(TORCH_DTYPE[dtype])
    load_minilora_state(port, model.state_dict())
    run_both(model, port, *data.draw(ignored_targets(config)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_gpt_with_lora_matches_peft_on_the_port(peft, dtype, data):
    """Any targets (lm_head and fc1 too), bias mode, rank, alpha and rsLoRA."""
    config = data.draw(gpt_configs())
    lora = data.draw(lora_configs(config))
    ml.manual_seed(0)
    model = ml.GPT(config, dtype=dtype)
    ml.apply_lora(model, lora)
    randomize(model, data.draw(st.integers(0, 2**16)))
    port = peft.get_peft_model(TorchGPT(config).to(TORCH_DTYPE[dtype]), peft_config(peft, lora))
    load_minilora_state(port, model.state_dict())
    run_both(model, port, *data.draw(ignored_targets(config)), dtype)


def test_load_minilora_state_refuses_a_mismatch_and_changes_nothing():
    config = ml.GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=1, n_embd=4)
    port = TorchGPT(config)
    before = {k: v.clone() for k, v in port.state_dict().items()}
    state = ml.GPT(config).state_dict()
    state["extra.weight"] = state.pop("ln_f.bias")
    state["tok_emb.weight"] = state["tok_emb.weight"][:3]
    with pytest.raises(ValueError) as info:
        load_minilora_state(port, state)
    for message in (
        "unexpected key 'extra.weight'",
        "missing key 'ln_f.bias'",
        "tok_emb.weight has shape (3, 4), expected (7, 4)",
    ):
        assert message in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in port.state_dict().items())


# --------------------------------------------------------------------------------------
# LoRALinear and PEFT's LoRA layer
# --------------------------------------------------------------------------------------


class One(torch.nn.Module):
    """One Linear named ``proj``, for PEFT to wrap."""

    def __init__(self, n_in, n_out, bias):
        super().__init__()
        self.proj = torch.nn.Linear(n_in, n_out, bias=bias)

    def forward(self, x):
        return self.proj(x)


def layer_pair(peft, dtype, r=3, alpha=5.0, use_rslora=False, bias=True, seed=0):
    """A minilora LoRALinear and PEFT's LoRA layer holding the same random weights."""
    n_in, n_out = 6, 5
    layer = ml.LoRALinear(
        n_in, n_out, bias, r=r, lora_alpha=alpha, use_rslora=use_rslora, dtype=dtype
    )
    ml.mark_only_lora_as_trainable(layer)
    randomize(layer, seed)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], use_rslora=use_rslora)
    model = peft.get_peft_model(One(n_in, n_out, bias).to(TORCH_DTYPE[dtype]), config)
    p = model.base_model.model.proj
    with torch.no_grad():
        p.base_layer.weight.copy_(torch.tensor(layer.weight.data))
        if bias:
            p.base_layer.bias.copy_(torch.tensor(layer.bias.data))
        p.lora_A["default"].weight.copy_(torch.tensor(layer.lora_A.data))
        p.lora_B["default"].weight.copy_(torch.tensor(layer.lora_B.data))
    return layer, model, p


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_matches_peft_layer(peft, dtype, use_rslora, bias):
    layer, model, p = layer_pair(peft, dtype, use_rslora=use_rslora, bias=bias)
    assert layer.scaling == p.scaling["default"]  # 5/3, or 5/√3 with rsLoRA
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 4, 6)).astype(dtype)
    g = rng.normal(size=(2, 4, 5)).astype(dtype)
    xt = ml.Tensor(x, requires_grad=True)
    y = layer(xt)
    y.backward(g)
    tx = torch.tensor(x, requires_grad=True)
    ty = model(tx)
    ty.backward(torch.tensor(g))
    close(y.data, ty, dtype, "output")
    close(xt.grad, tx.grad, dtype, "dx")
    close(layer.lora_A.grad, p.lora_A["default"].weight.grad, dtype, "d lora_A")
    close(layer.lora_B.grad, p.lora_B["default"].weight.grad, dtype, "d lora_B")
    assert layer.weight.grad is None and p.base_layer.weight.grad is None  # frozen
    close(layer.get_delta_weight(), p.get_delta_weight("default"), dtype, "delta weight")

    w0 = layer.weight.data.copy()
    layer.merge()
    p.merge()
    close(layer.weight.data, p.base_layer.weight, dtype, "merged weight")
    with ml.no_grad(), torch.no_grad():
        close(layer(ml.Tensor(x)).data, model(torch.tensor(x)), dtype, "merged output")
    layer.unmerge()
    p.unmerge()
    close(layer.weight.data, p.base_layer.weight, dtype, "unmerged weight")
    np.testing.assert_allclose(layer.weight.data, w0, **OP_TOL[dtype])


@pytest.mark.parametrize("init", ["gaussian", "kaiming"])
def test_lora_init_matches_peft(peft, init):
    """B starts at zero on both sides; A is drawn from the same distribution: PEFT's
    "gaussian" is N(0, (1/r)²) and its default (True, loralib's) is kaiming-uniform,
    U(-1/√in, 1/√in), not the paper's Gaussian."""
    n_in, n_out, r = 256, 16, 16  # 4096 entries of A: their std is known to ~1%
    layer = ml.LoRALinear(
        n_in, n_out, r=r, lora_alpha=r, init_lora_weights=init, generator=ml.backend.Generator(0)
    )
    torch.manual_seed(0)
    peft_init = True if init == "kaiming" else "gaussian"
    config = peft.LoraConfig(
        r=r, lora_alpha=r, target_modules=["proj"], init_lora_weights=peft_init
    )
    p = peft.get_peft_model(One(n_in, n_out, True), config).base_model.model.proj
    a_ml, a_peft = layer.lora_A.data, p.lora_A["default"].weight.detach().numpy()
    assert not layer.lora_B.data.any() and not p.lora_B["default"].weight.detach().numpy().any()
    if init == "gaussian":
        want_std = 1 / r
    else:
        bound = 1 / np.sqrt(n_in)
        want_std = bound / np.sqrt(3)  # the std of U(-b, b)
        for a in (a_ml, a_peft):
            assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
    for side, a in (("minilora", a_ml), ("PEFT", a_peft)):
        assert abs(a.std() / want_std - 1) < 0.05, (side, a.std(), want_std)
        assert abs(a.mean()) < 0.05 * want_std, (side, a.mean())


# --------------------------------------------------------------------------------------
# Adapter folders, both ways
# --------------------------------------------------------------------------------------

IDX = np.array([[1, 4, 1, 0, 9, 3], [6, 1, 4, 2, 10, 5]], dtype=np.int64)
ADAPTER_CASES = [
    ml.LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    ml.LoRAConfig(
        r=3,
        lora_alpha=5,
        target_modules=["q_proj", "fc1"],
        bias="lora_only",
        use_rslora=True,
        init_lora_weights="kaiming",
    ),
    ml.LoRAConfig(r=2, lora_alpha=8, target_modules=["v_proj", "lm_head"], bias="all"),
]
ADAPTER_IDS = ["q_v", "lora_only_rslora", "all_biases_lm_head"]


def base_model():
    ml.manual_seed(0)
    model = ml.GPT(TINY_2x2)
    randomize(model, 7)
    return model


def logits_of(model) -> np.ndarray:
    model.eval()
    with ml.no_grad():
        return model(IDX)[0].data


@pytest.mark.parametrize("lora", ADAPTER_CASES, ids=ADAPTER_IDS)
def test_minilora_adapter_loads_in_peft(peft, tmp_path, lora):
    model = base_model()
    base = model.state_dict()
    ml.apply_lora(model, lora)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    rng = np.random.default_rng(3)
    for name, p in model.named_parameters():  # as if trained: adapters and biases moved
        if name in trained:
            p.data[...] = rng.normal(0, 0.3, p.shape)
    peft_adapters.save_adapter(model, tmp_path, lora)

    port = TorchGPT(TINY_2x2)
    load_minilora_state(port, base)
    loaded = peft.PeftModel.from_pretrained(port, tmp_path)
    assert loaded.peft_config["default"].task_type is None  # minilora writes null
    torch_params = {minilora_name(n): p for n, p in loaded.named_parameters()}
    ours = dict(model.named_parameters())
    for name in trained:  # every tensor of the adapter arrived, bit for bit
        np.testing.assert_array_equal(
            torch_params[name].detach().numpy(), ours[name].data, err_msg=name
        )
    loaded.eval()
    with torch.no_grad():
        close(logits_of(model), loaded(torch.tensor(IDX))[0], np.float32, "logits", model=True)


@pytest.mark.parametrize("lora", ADAPTER_CASES, ids=ADAPTER_IDS)
def test_peft_adapter_loads_in_minilora(peft, tmp_path, lora):
    base = base_model()
    port = TorchGPT(TINY_2x2)
    load_minilora_state(port, base.state_dict())
    model = peft.get_peft_model(port, peft_config(peft, lora))
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # as if trained: B and the trained biases off their init
                p.normal_(0, 0.3)
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["r"] == lora.r

    config = peft_adapters.load_adapter(base, tmp_path)
    assert (config.r, config.lora_alpha, config.bias, config.use_rslora) == (
        lora.r,
        lora.lora_alpha,
        lora.bias,
        lora.use_rslora,
    )
    assert sorted(config.target_modules) == sorted(lora.target_modules)
    assert len(lora_layers(base)) == sum(1 for n, _ in port.named_modules() if n.endswith("lora_A"))
    model.eval()
    with torch.no_grad():
        close(logits_of(base), model(torch.tensor(IDX))[0], np.float32, "logits", model=True)


# --------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------


def optimizer_pair(dtype, seed=0):
    """Three trainable parameters and a frozen one, identical on both sides."""
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(size=s).astype(dtype) for s in ((4, 3), (3,), (2, 2, 2), (5,))]
    ours = [ml.Parameter(a.copy()) for a in arrays]
    theirs = [torch.nn.Parameter(torch.tensor(a)) for a in arrays]
    ours[3].requires_grad_(False)
    theirs[3].requires_grad_(False)
    return ours, theirs, rng


def step_both(ours, theirs, opt, t_opt, rng, dtype, steps):
    for step in range(steps):
        for p, t in zip(ours[:3], theirs[:3], strict=True):
            g = rng.normal(size=p.shape).astype(dtype)
            p.grad, t.grad = g, torch.tensor(g)
        opt.step()
        t_opt.step()
        for i, (p, t) in enumerate(zip(ours, theirs, strict=True)):
            close(p.data, t, dtype, f"parameter {i} after step {step + 1}")
    np.testing.assert_array_equal(ours[3].data, theirs[3].detach().numpy())  # frozen: untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_steps_match_torch(dtype, weight_decay):
    ours, theirs, rng = optimizer_pair(dtype)
    settings_ = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.01}]  # noqa: E731
    opt, t_opt = ml.AdamW(groups(ours), **settings_), torch.optim.AdamW(groups(theirs), **settings_)
    step_both(ours, theirs, opt, t_opt, rng, dtype, steps=3)  # step 1, then bias correction
    assert id(ours[3]) not in opt.state  # no moments for the frozen parameter


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 0.0), (0.9, 0.1)])
def test_sgd_steps_match_torch(dtype, momentum, weight_decay):
    ours, theirs, rng = optimizer_pair(dtype, seed=1)
    settings_ = dict(lr=0.1, momentum=momentum, weight_decay=weight_decay)
    opt, t_opt = ml.SGD(ours, **settings_), torch.optim.SGD(theirs, **settings_)
    step_both(ours, theirs, opt, t_opt, rng, dtype, steps=3)


# PEFT-built adapters with PEFT's options. Plain LoRA in any of PEFT's spellings loads and
# gives PEFT's logits; an option that changes the computation is refused, naming it.
PLAIN_PEFT = {
    "init false": dict(init_lora_weights=False),
    "init orthogonal": dict(init_lora_weights="orthogonal"),
    "full paths": dict(target_modules=["blocks.0.attn.q_proj", "blocks.1.mlp.fc2"]),
    "suffixes": dict(target_modules=["attn.q_proj", "mlp.fc1"]),
    "regex": dict(target_modules=r"blocks\.1\..*_proj"),
    "all-linear": dict(target_modules="all-linear"),
    "rank pattern equal to r": dict(rank_pattern={"q_proj": 2}),
    "every layer": dict(layers_to_transform=[0, 1], layers_pattern="blocks"),
    "layers_to_transform": dict(layers_to_transform=[1], layers_pattern="blocks"),
    "rank_pattern": dict(rank_pattern={"v_proj": 4}),
    "alpha_pattern": dict(alpha_pattern={"q_proj": 16}),
    "r above min(out, in)": dict(r=10, lora_alpha=20),  # n_embd is 8
}


def peft_adapter(peft, folder, dtype=None, **options):
    """A PEFT adapter for the port of ``base_model()``, as if trained, saved to ``folder``;
    returns PEFT's logits. ``dtype``: save the adapter's tensors in it (bfloat16, float16),
    rounded first so that PEFT's float32 logits are those of the saved values."""
    port = TorchGPT(TINY_2x2)
    load_minilora_state(port, base_model().state_dict())
    settings = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(port, peft.LoraConfig(**{**settings, **options}))
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # as if trained: B off zero
                p.normal_(0, 0.3)
                if dtype is not None:
                    p.copy_(p.to(dtype).float())
    model.eval()
    with torch.no_grad():
        want = model(torch.tensor(IDX))[0]
    if dtype is not None:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(dtype)
    model.save_pretrained(folder)
    return want


@pytest.mark.parametrize("options", PLAIN_PEFT.values(), ids=PLAIN_PEFT.keys())
def test_peft_adapter_with_plain_lora_options_loads_in_minilora(peft, tmp_path, options):
    want = peft_adapter(peft, tmp_path, **options)
    model = base_model()
    peft_adapters.load_adapter(model, tmp_path)
    close(logits_of(model), want, np.float32, "logits", model=True)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_peft_adapter_is_upcast_and_loads(peft, tmp_path, dtype):
    want = peft_adapter(peft, tmp_path, dtype=getattr(torch, dtype))
    model = base_model()
    with pytest.warns(UserWarning, match=f"{dtype} tensors; they were upcast to float32"):
        peft_adapters.load_adapter(model, tmp_path)
    close(logits_of(model), want, np.float32, "logits", model=True)


@pytest.mark.parametrize(
    "options, adapted",
    [
        (
            dict(target_modules=["q_proj", "lm_head"], exclude_modules=["lm_head"]),
            ["blocks.0.attn.q_proj", "blocks.1.attn.q_proj"],
        ),
        (
            dict(target_modules=["q_proj", "fc1"], exclude_modules=r"blocks\.1\..*"),
            ["blocks.0.attn.q_proj", "blocks.0.mlp.fc1"],
        ),
        (dict(target_modules=["fc1"], modules_to_save=["ln_f", "lm_head"]), None),
        (dict(target_modules=["fc1"], trainable_token_indices={"tok_emb": [1, 2]}), None),
    ],
    ids=["exclude-list", "exclude-regex", "modules_to_save", "trainable_token_indices"],
)
def test_peft_adapter_with_exclude_or_saved_modules_loads(peft, tmp_path, options, adapted):
    """PEFT's exclude_modules leaves targets out, its modules_to_save saves whole layers,
    its trainable_token_indices some rows of the embedding: all honoured, so the logits
    are PEFT's."""
    want = peft_adapter(peft, tmp_path, **options)
    model = base_model()
    config = peft_adapters.load_adapter(model, tmp_path)
    close(logits_of(model), want, np.float32, "logits", model=True)
    if adapted is not None:
        assert [p for p, _ in lora_layers(model)] == adapted
    assert config.modules_to_save == options.get("modules_to_save")


REFUSED_PEFT = {
    "alora_invocation_tokens": dict(alora_invocation_tokens=[1, 2]),
}


@pytest.mark.parametrize("key, options", REFUSED_PEFT.items(), ids=REFUSED_PEFT.keys())
def test_peft_adapter_with_an_option_minilora_lacks_is_refused_naming_it(
    peft, tmp_path, key, options
):
    peft_adapter(peft, tmp_path, **options)
    assert json.loads((tmp_path / "adapter_config.json").read_text())[key] == options[key]
    model = base_model()
    before = model.state_dict()
    with pytest.raises(ValueError, match=key) as info:
        peft_adapters.load_adapter(model, tmp_path)
    assert "nothing was changed" in str(info.value) or "not supported" in str(info.value)
    assert not lora_layers(model)
    assert all(np.array_equal(v, before[k]) for k, v in model.state_dict().items())
