"""PiSSA (``LoRAConfig(init_lora_weights="pissa")``): A and B from the top-r SVD of W0, the
frozen weight replaced by the residual.

The init's algebra (s·B·A is the best rank-r part, the residual the rest), the model's
output unchanged at init, the fact that disabling the adapter no longer gives the base
model, and the rank-2r conversion to a plain LoRA adapter for the ORIGINAL base
(``save_adapter(..., path_initial_model_for_weight_conversion=...)``): the original base
plus the converted adapter is the PiSSA model. With PyTorch and PEFT installed: PEFT's
PiSSA init gives the same update and residual, and PEFT loads the converted adapter, and
the unconverted one, on the original base with the same logits.
"""

import copy
import json
import os

import numpy as np
import pytest
from helpers import TINY_2x2, make_gpt, randomize_weights, snapshot
from hypothesis import given
from hypothesis import strategies as st
from strategies import seeds

import minilora as ml
from minilora import LoRAConfig
from minilora.interop import peft_adapters, safetensors_files
from minilora.lora import lora_layers
from minilora.variants import pissa

pytestmark = pytest.mark.usefixtures("ops")

IDX = np.array([[1, 4, 1, 0, 9, 3], [6, 1, 4, 2, 10, 5]], dtype=np.int64)
PISSA = LoRAConfig(
    r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "fc1"], init_lora_weights="pissa"
)


@given(
    out_f=st.integers(1, 6),
    in_f=st.integers(1, 6),
    data=st.data(),
    s=st.sampled_from([0.5, 2.0, 16 / 3]),
    seed=seeds,
)
def test_pissa_init_splits_w_into_its_top_r_part_and_the_residual(out_f, in_f, data, s, seed):
    """s·B·A = U_r S_r V_rᵀ (the best rank-r approximation), W_res + s·B·A = W, the
    residual's singular values are S's tail, and B and A carry sqrt(S_r / s) each."""
    r = data.draw(st.integers(1, min(out_f, in_f)))
    W = np.random.default_rng(seed).normal(size=(out_f, in_f))
    A, B, residual = pissa.pissa_init(W, r, s)
    assert A.shape == (r, in_f) and B.shape == (out_f, r) and residual.dtype == W.dtype
    U, S, Vt = np.linalg.svd(W, full_matrices=False)
    top = (U[:, :r] * S[:r]) @ Vt[:r]
    np.testing.assert_allclose(s * B @ A, top, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(residual + s * B @ A, W, rtol=1e-12, atol=1e-12)
    tail = np.linalg.svd(residual, compute_uv=False)[: min(out_f, in_f) - r]
    np.testing.assert_allclose(tail, S[r:], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(B, axis=0), np.sqrt(S[:r] / s), rtol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(A, axis=1), np.sqrt(S[:r] / s), rtol=1e-10)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_pissa_model_at_init_computes_the_base_model(dtype):
    base = randomize_weights(make_gpt(TINY_2x2, dtype=dtype), 1)
    model = copy.deepcopy(base)
    ml.apply_lora(model, PISSA)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == np.float64 else {"rtol": 1e-5, "atol": 1e-5}
    np.testing.assert_allclose(logits(model), logits(base), **tol)
    for path, layer in lora_layers(model):  # the base weight really changed, and is frozen
        w0 = base.get_submodule(path).weight.data
        assert not layer.weight.requires_grad and layer.lora_B.data.any()
        assert np.abs(layer.weight.data - w0).max() > 0.1
        np.testing.assert_allclose(layer.weight.data + layer.get_delta_weight(), w0, **tol)


def test_disabling_a_pissa_adapter_runs_the_residual_not_the_base():
    """Documented: PiSSA rewrote the base, so the adapter disabled runs W_res. The logits
    are those of the base model with every adapted weight replaced by its residual, and
    far from the base model's."""
    base = randomize_weights(make_gpt(TINY_2x2, dtype=np.float64), 1)
    model = copy.deepcopy(base)
    ml.apply_lora(model, PISSA)
    residual_model = copy.deepcopy(base)
    for path, layer in lora_layers(model):
        residual_model.get_submodule(path).weight.data[...] = layer.weight.data
    with ml.disable_adapters(model):
        disabled = logits(model)
    np.testing.assert_array_equal(disabled, logits(residual_model))
    assert np.abs(disabled - logits(base)).max() > 0.1


def test_pissa_init_leaves_a_tied_weight_alone():
    """The residual is a new array: adapting lm_head, whose weight the token embedding
    shares, does not rewrite the embedding."""
    model = randomize_weights(make_gpt(TINY_2x2, dtype=np.float64), 1)
    model.lm_head.weight = model.tok_emb.weight  # tie them
    emb = model.tok_emb.weight.data.copy()
    ml.apply_lora(model, LoRAConfig(r=2, target_modules=["lm_head"], init_lora_weights="pissa"))
    np.testing.assert_array_equal(model.tok_emb.weight.data, emb)
    assert np.abs(model.lm_head.weight.data - emb).max() > 0.1


# --------------------------------------------------------------------------------------
# Saving: as a PiSSA adapter, and converted to a plain LoRA adapter of rank 2r
# --------------------------------------------------------------------------------------


def logits(model):
    model.eval()
    with ml.no_grad():
        return model(IDX)[0].data


def pissa_models(tmp_path, config=PISSA, seed=5):
    """(original base, trained PiSSA model, initial adapter folder): the adapter saved right
    after apply_lora, then A and B moved as if trained."""
    base = randomize_weights(make_gpt(TINY_2x2), 1)
    model = copy.deepcopy(base)
    ml.apply_lora(model, config)
    peft_adapters.save_adapter(model, tmp_path / "initial", config)
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.data += rng.normal(0, 0.3, p.shape)
    return base, model, tmp_path / "initial"


@pytest.mark.parametrize("use_rslora", [False, True])
def test_original_base_plus_converted_adapter_is_the_pissa_model(tmp_path, use_rslora):
    config = copy.deepcopy(PISSA)
    config.use_rslora = use_rslora
    base, model, initial = pissa_models(tmp_path, config)
    peft_adapters.save_adapter(
        model, tmp_path / "lora", config, path_initial_model_for_weight_conversion=initial
    )
    written = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert written["r"] == 4 and written["init_lora_weights"] is True
    assert written["lora_alpha"] == pytest.approx(4 * (np.sqrt(2) if use_rslora else 2))
    loaded = peft_adapters.load_adapter(base, tmp_path / "lora")
    assert loaded.r == 4 and loaded.scaling == pytest.approx(config.scaling)
    np.testing.assert_allclose(logits(base), logits(model), rtol=1e-5, atol=1e-5)
    # the plain LoRA adapter disabled is the original base again
    with ml.disable_adapters(base):
        np.testing.assert_array_equal(
            logits(base), logits(randomize_weights(make_gpt(TINY_2x2), 1))
        )


def test_the_converted_adapter_is_b_a_minus_the_initial_b0_a0(tmp_path):
    _, model, initial = pissa_models(tmp_path)
    peft_adapters.save_adapter(
        model, tmp_path / "lora", PISSA, path_initial_model_for_weight_conversion=initial
    )
    got, _ = safetensors_files.read_safetensors(
        tmp_path / "lora" / "adapter_model.safetensors", "t"
    )
    start, _ = safetensors_files.read_safetensors(initial / "adapter_model.safetensors", "t")
    key = "base_model.model.blocks.0.mlp.fc1."
    A, B = got[key + "lora_A.weight"], got[key + "lora_B.weight"]
    A0, B0 = start[key + "lora_A.weight"], start[key + "lora_B.weight"]
    layer = model.get_submodule("blocks.0.mlp.fc1")
    np.testing.assert_allclose(
        B @ A, layer.lora_B.data @ layer.lora_A.data - B0 @ A0, rtol=1e-5, atol=1e-6
    )


def test_a_pissa_adapter_saved_as_such_loads_on_the_original_base(tmp_path):
    """Unconverted, the file says init_lora_weights "pissa": loading it on the original
    base redoes the SVD (as PEFT does), and the model is the trained one."""
    base, model, _ = pissa_models(tmp_path)
    peft_adapters.save_adapter(model, tmp_path / "pissa", PISSA)
    config = peft_adapters.load_adapter(base, tmp_path / "pissa")
    assert config.init_lora_weights == "pissa"
    np.testing.assert_allclose(logits(base), logits(model), rtol=1e-5, atol=1e-5)


def test_conversion_refuses_what_it_cannot_convert(tmp_path):
    base, model, initial = pissa_models(tmp_path)
    before = snapshot(model)
    plain = LoRAConfig(r=2, lora_alpha=4, target_modules=PISSA.target_modules)
    with pytest.raises(ValueError, match="converts a PiSSA adapter"):
        peft_adapters.save_adapter(
            model, tmp_path / "x", plain, path_initial_model_for_weight_conversion=initial
        )
    other = copy.deepcopy(base)  # an initial adapter of another rank does not fit
    config3 = LoRAConfig(r=3, lora_alpha=4, target_modules=PISSA.target_modules)
    config3.init_lora_weights = "pissa"
    ml.apply_lora(other, config3)
    peft_adapters.save_adapter(other, tmp_path / "r3", config3)
    with pytest.raises(ValueError, match=r"r=3 in .*, expected 2"):
        peft_adapters.save_adapter(
            model, tmp_path / "x", PISSA, path_initial_model_for_weight_conversion=tmp_path / "r3"
        )
    assert not (tmp_path / "x" / "adapter_model.safetensors").exists()
    assert snapshot(model) == before


# --------------------------------------------------------------------------------------
# PEFT (oracle)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_peft():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch = pytest.importorskip("torch", reason="parity tests need PyTorch")
    peft = pytest.importorskip("peft", reason="PiSSA parity needs PEFT")
    return torch, peft


@pytest.mark.oracle
def test_peft_pissa_init_gives_the_same_update_and_residual(torch_peft):
    """Signs of singular vectors may differ between the two SVDs; s·B·A and the residual
    do not. PEFT refuses float64 for PiSSA, so its side runs in float32."""
    torch, peft = torch_peft
    layer = ml.LoRALinear(7, 5, r=3, lora_alpha=6, dtype=np.float64)
    w0 = np.random.default_rng(0).normal(size=(5, 7))
    layer.weight.data[...] = w0
    one = torch.nn.Sequential()
    one.add_module("proj", torch.nn.Linear(7, 5))
    with torch.no_grad():
        one.proj.weight.copy_(torch.tensor(w0))
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["proj"], init_lora_weights="pissa")
    p = peft.get_peft_model(one, config).base_model.model.proj
    A, B, residual = pissa.pissa_init(w0, 3, layer.scaling)
    their_update = (p.lora_B["default"].weight @ p.lora_A["default"].weight).detach().numpy()
    np.testing.assert_allclose(
        layer.scaling * B @ A, p.scaling["default"] * their_update, atol=1e-5
    )
    np.testing.assert_allclose(residual, p.base_layer.weight.detach().numpy(), atol=1e-5)


def peft_on_the_original_base(torch, peft, base, folder):
    from examples.torch_gpt import TorchGPT, load_minilora_state

    port = TorchGPT(TINY_2x2)
    load_minilora_state(port, base.state_dict())
    loaded = peft.PeftModel.from_pretrained(port, folder).eval()
    with torch.no_grad():
        return loaded(torch.tensor(IDX))[0].numpy()


@pytest.mark.oracle
def test_peft_loads_the_converted_adapter_on_the_original_base(torch_peft, tmp_path):
    torch, peft = torch_peft
    base, model, initial = pissa_models(tmp_path)
    peft_adapters.save_adapter(
        model, tmp_path / "lora", PISSA, path_initial_model_for_weight_conversion=initial
    )
    got = peft_on_the_original_base(torch, peft, base, tmp_path / "lora")
    np.testing.assert_allclose(got, logits(model), rtol=1e-5, atol=1e-5)


@pytest.mark.oracle
def test_peft_loads_the_unconverted_pissa_adapter_on_the_original_base(torch_peft, tmp_path):
    torch, peft = torch_peft
    base, model, _ = pissa_models(tmp_path)
    peft_adapters.save_adapter(model, tmp_path / "pissa", PISSA)
    got = peft_on_the_original_base(torch, peft, base, tmp_path / "pissa")
    np.testing.assert_allclose(got, logits(model), rtol=1e-4, atol=1e-4)


def test_a_pissa_file_is_refused_by_a_model_that_already_has_lora_layers(tmp_path):
    """Its A and B only mean something on the residuals, which only a base model gets."""
    _, model, initial = pissa_models(tmp_path)
    target = make_gpt(TINY_2x2)
    plain = LoRAConfig(r=2, lora_alpha=4, target_modules=PISSA.target_modules)
    ml.apply_lora(target, plain)
    before = snapshot(target)
    with pytest.raises(ValueError, match="loads only on a base model"):
        peft_adapters.load_adapter(target, initial)
    assert snapshot(target) == before
