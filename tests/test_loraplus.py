"""LoRA+ (minilora.variants.loraplus.create_loraplus_optimizer): B's learning rate is
``loraplus_lr_ratio`` times A's; biases, LayerNorm and DoRA's magnitude stay at A's rate.

The groups (every trainable parameter in exactly one, the rates and weight decays), and
one AdamW step that moves B exactly as a plain AdamW with ``lr · ratio`` would, and A and
the biases as one with ``lr``.
"""

import copy
import os

import numpy as np
import pytest
from helpers import TINY_2x2, make_gpt, randomize_weights

import minilora as ml
from minilora import LoRAConfig
from minilora.variants.loraplus import create_loraplus_optimizer, loraplus_groups

IDX = np.array([[1, 4, 1, 0, 9, 3], [6, 1, 4, 2, 10, 5]], dtype=np.int64)
CONFIG = LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj", "fc1"], bias="all", use_dora=True)


def adapted_model():
    model = randomize_weights(make_gpt(TINY_2x2), 1)
    ml.apply_lora(model, CONFIG)
    model.ln_f.weight.requires_grad_(True)  # a trainable LayerNorm weight, a vector too
    randomize_weights(model, 2)
    return model


def test_every_trainable_parameter_is_in_exactly_one_group_with_its_rate():
    model = adapted_model()
    opt = create_loraplus_optimizer(
        model, lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.1, betas=(0.8, 0.9)
    )
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable) and len(seen) == len(set(seen))
    by_name = {names[id(p)]: g for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    for name in trainable:
        leaf, group = name.rsplit(".", 1)[-1], by_name[name]
        assert group["betas"] == (0.8, 0.9)  # optimizer settings pass through
        if leaf == "lora_B":
            assert (group["lr"], group["weight_decay"]) == (pytest.approx(16e-3), 0.1), name
        elif leaf == "lora_A":
            assert (group["lr"], group["weight_decay"]) == (1e-3, 0.1), name
        else:  # biases, ln_f.weight, lora_magnitude_vector: A's rate, no decay
            assert params[name].ndim == 1, name
            assert (group["lr"], group["weight_decay"]) == (1e-3, 0.0), name
    groups = loraplus_groups(model)
    assert {n.rsplit(".", 1)[-1] for n, _ in groups["vectors"]} == {
        "bias",
        "weight",
        "lora_magnitude_vector",
    }
    assert not groups["embedding"]
    assert len(opt.param_groups) == 3  # the empty embedding group is left out


def manual_adamw(p, g, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.0):
    """One torch.optim.AdamW step from zero moments, written out."""
    p = p * (1 - lr * wd)
    m = (1 - b1) * g
    v = (1 - b2) * g * g
    return p - lr / (1 - b1) * m / (np.sqrt(v) / np.sqrt(1 - b2) + eps)


@pytest.mark.parametrize("ratio", [1.0, 16.0])
def test_a_step_moves_b_as_adamw_with_lr_times_the_ratio(ratio):
    model = adapted_model()
    for p in model.parameters():
        p.data = p.data.astype(np.float64)
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    opt = create_loraplus_optimizer(
        model, lr=1e-2, loraplus_lr_ratio=ratio, loraplus_weight_decay=0.05
    )
    model(IDX, IDX)[1].backward()
    grads = {n: p.grad.copy() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    for name, p in model.named_parameters():
        if name not in grads:
            assert np.array_equal(p.data, before[name]), name  # frozen: untouched
            continue
        leaf = name.rsplit(".", 1)[-1]
        lr = 1e-2 * ratio if leaf == "lora_B" else 1e-2
        wd = 0.05 if leaf in ("lora_A", "lora_B") else 0.0
        want = manual_adamw(before[name], grads[name], lr, wd=wd)
        np.testing.assert_allclose(p.data, want, rtol=1e-12, atol=1e-15, err_msg=name)


def test_embedding_lora_parameters_get_their_own_rate():
    """PEFT's third group: parameters named lora_embedding_A/B (embedding LoRA)."""
    model = adapted_model()
    model.tok_emb.lora_embedding_A = ml.Parameter(np.zeros((2, 11), dtype=np.float32))
    opt = create_loraplus_optimizer(model, lr=1e-3, loraplus_lr_ratio=4, loraplus_lr_embedding=5e-6)
    emb = [
        g for g in opt.param_groups if any(p is model.tok_emb.lora_embedding_A for p in g["params"])
    ]
    assert len(emb) == 1 and emb[0]["lr"] == 5e-6 and len(emb[0]["params"]) == 1


def test_sgd_works_too_and_bad_settings_are_refused():
    model = adapted_model()
    opt = create_loraplus_optimizer(model, ml.SGD, lr=0.1, loraplus_lr_ratio=2, momentum=0.9)
    assert {g["lr"] for g in opt.param_groups} == {0.1, 0.2}
    with pytest.raises(ValueError, match="loraplus_lr_ratio=-1 must be a finite non-negative"):
        create_loraplus_optimizer(model, lr=0.1, loraplus_lr_ratio=-1)
    with pytest.raises(ValueError, match="pass loraplus_weight_decay"):
        create_loraplus_optimizer(model, lr=0.1, loraplus_lr_ratio=2, weight_decay=0.1)
    with pytest.raises(TypeError, match="model must be a Module"):
        create_loraplus_optimizer([1], lr=0.1, loraplus_lr_ratio=2)
    frozen = copy.deepcopy(model)
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        create_loraplus_optimizer(frozen, lr=0.1, loraplus_lr_ratio=2)


@pytest.mark.oracle
def test_matrices_get_peft_rates_and_vectors_do_not():
    """The same model in PEFT (on the PyTorch port): every lora_A and lora_B gets the rate
    PEFT's create_loraplus_optimizer gives it. The vectors are where minilora departs on
    purpose: PEFT puts every 1-D parameter (here the biases and DoRA's magnitudes) in B's
    group at lr · ratio; minilora keeps them at lr (docs/math.md#lora-plus)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch = pytest.importorskip("torch", reason="parity tests need PyTorch")
    peft = pytest.importorskip("peft", reason="LoRA+ parity needs PEFT")
    from peft.optimizers import create_loraplus_optimizer as peft_loraplus

    from examples.torch_gpt import TorchGPT, minilora_name

    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "fc1"], bias="all", use_dora=True
    )
    port = peft.get_peft_model(TorchGPT(TINY_2x2), config)
    theirs = peft_loraplus(port, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    their_lr = {
        minilora_name(n): g["lr"]
        for g in theirs.param_groups
        for p in g["params"]
        for n, q in port.named_parameters()
        if q is p
    }
    model = randomize_weights(make_gpt(TINY_2x2), 1)
    ml.apply_lora(model, CONFIG)
    ours = create_loraplus_optimizer(model, lr=1e-3, loraplus_lr_ratio=16)
    names = {id(p): n for n, p in model.named_parameters()}
    our_lr = {names[id(p)]: g["lr"] for g in ours.param_groups for p in g["params"]}
    assert set(our_lr) == set(their_lr)
    for name, lr in our_lr.items():
        if name.endswith(("lora_A", "lora_B")):
            assert lr == pytest.approx(their_lr[name]), name
        else:
            assert (lr, their_lr[name]) == (pytest.approx(1e-3), pytest.approx(16e-3)), name
