"""Optimizers (minilora.optim): state only for trainable parameters, parameter groups,
AdamW and SGD against NumPy references of torch's formulas, gradient clipping, validation."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import float_dtypes, gpt_configs, seeds, token_batches

import minilora
from minilora import GPT, SGD, AdamW, Parameter, clip_grad_norm_

# --------------------------------------------------------------------------------------
# NumPy references, written from torch's documented algorithms (not from minilora)
# --------------------------------------------------------------------------------------


def ref_adamw(params, grads_per_step, lr, betas, eps, wd):
    """torch.optim.AdamW (amsgrad=False, maximize=False) in float64:
    θ ← θ − lr·λ·θ;  m ← β1 m + (1−β1) g;  v ← β2 v + (1−β2) g²;
    m̂ = m / (1−β1ᵗ);  v̂ = v / (1−β2ᵗ);  θ ← θ − lr · m̂ / (√v̂ + ε)."""
    b1, b2 = betas
    params = [p.astype(np.float64).copy() for p in params]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            params[i] = params[i] - lr * wd * params[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat = m[i] / (1 - b1**t)
            v_hat = v[i] / (1 - b2**t)
            params[i] = params[i] - lr * m_hat / (np.sqrt(v_hat) + eps)
    return params


def ref_sgd(params, grads_per_step, lr, momentum, wd):
    """torch.optim.SGD (dampening=0, nesterov=False):
    d ← g + λ·θ;  b ← d at the first step, else μ·b + d;  θ ← θ − lr·b (b = d without μ)."""
    params = [p.astype(np.float64).copy() for p in params]
    bufs = [None] * len(params)
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            d = g + wd * params[i]
            if momentum:
                bufs[i] = d.copy() if bufs[i] is None else momentum * bufs[i] + d
                d = bufs[i]
            params[i] = params[i] - lr * d
    return params


def make_params(seed, shapes, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [Parameter(rng.normal(size=s).astype(dtype)) for s in shapes]


param_shapes = st.lists(
    st.lists(st.integers(1, 4), min_size=1, max_size=2).map(tuple), min_size=1, max_size=3
)


def run_steps(opt, params, grads_per_step):
    for grads in grads_per_step:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.astype(p.dtype)
        opt.step()


# --------------------------------------------------------------------------------------
# State only for trainable parameters
# --------------------------------------------------------------------------------------


@st.composite
def partly_frozen_gpts(draw):
    config = draw(gpt_configs())
    seed = draw(seeds)
    dtype = draw(float_dtypes)
    minilora.manual_seed(seed)
    model = GPT(config, dtype=dtype)
    names = [n for n, _ in model.named_parameters()]
    frozen = set(draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names) - 1)))
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    idx, targets = draw(token_batches(config, min_len=2))  # T = 1: attention q/k get 0 grad
    return model, frozen, idx, targets, dtype


@pytest.mark.parametrize("kind", ["adamw", "sgd_momentum", "sgd"])
@given(case=partly_frozen_gpts())
def test_state_only_for_trainable_parameters(kind, case):
    model, frozen, idx, targets, dtype = case
    params = dict(model.named_parameters())
    rng = np.random.default_rng(0)
    # a stray gradient on a frozen parameter (set by hand) must still be ignored
    for name in frozen:
        params[name].grad = rng.normal(size=params[name].shape).astype(dtype)
    before = {n: p.data.copy() for n, p in params.items()}
    opt = {
        "adamw": lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.1),
        "sgd_momentum": lambda ps: SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.1),
        "sgd": lambda ps: SGD(ps, lr=1e-2),
    }[kind](model.parameters())
    for _ in range(2):
        model(idx, targets)[1].backward()
        opt.step()
    trainable = {n: p for n, p in params.items() if n not in frozen}
    expected_keys = set() if kind == "sgd" else {id(p) for p in trainable.values()}
    assert set(opt.state) == expected_keys
    numel = sum(p.size for p in trainable.values())
    itemsize = np.dtype(dtype).itemsize
    moments = {"adamw": 2, "sgd_momentum": 1, "sgd": 0}[kind]
    assert opt.state_nbytes() == moments * itemsize * numel
    for name in frozen:  # not even weight decay touches a frozen parameter
        assert params[name].data.tobytes() == before[name].tobytes(), name
    # every trainable parameter with a non-zero gradient moved (a k_proj bias can get an
    # exactly zero gradient: softmax ignores a shift shared by all keys)
    for name, p in trainable.items():
        if p.grad.any():
            assert not np.array_equal(p.data, before[name]), f"{name} did not move"


def test_adamw_state_is_float32_two_moments_per_trainable_element():
    minilora.manual_seed(0)
    layer = minilora.Linear(6, 5)  # float32: 30 + 5 elements
    layer.bias.requires_grad_(False)
    opt = AdamW(layer.parameters())
    x = minilora.Tensor(np.ones((2, 6), np.float32))
    layer(x).sum().backward()
    opt.step()
    assert list(opt.state) == [id(layer.weight)]
    assert opt.state_nbytes() == 2 * 4 * 30
    state = opt.state[id(layer.weight)]
    assert state["exp_avg"].dtype == np.float32 and state["exp_avg"].shape == (5, 6)


def test_parameters_without_gradient_are_skipped():
    params = make_params(0, [(3,), (2, 2)])
    before = params[1].data.copy()
    opt = AdamW(params, lr=0.1, weight_decay=0.5)
    params[0].grad = np.ones(3)
    opt.step()
    assert id(params[1]) not in opt.state
    assert np.array_equal(params[1].data, before), "no gradient: no update, not even decay"


# --------------------------------------------------------------------------------------
# AdamW and SGD against the references
# --------------------------------------------------------------------------------------


@given(
    shapes=param_shapes,
    seed=seeds,
    n_steps=st.integers(1, 5),
    lr=st.floats(1e-3, 0.1),
    betas=st.tuples(st.floats(0.0, 0.99), st.floats(0.0, 0.9999)),
    eps=st.sampled_from([1e-8, 1e-6, 1e-3]),
    wd=st.floats(0.0, 0.5),
)
def test_adamw_matches_torch_formula(shapes, seed, n_steps, lr, betas, eps, wd):
    params = make_params(seed, shapes)
    start = [p.data.copy() for p in params]
    rng = np.random.default_rng(seed + 1)
    # |g| >= 0.1, so eps never swamps a gradient and every update is big enough to judge
    grads = [
        [rng.choice([-1.0, 1.0], size=s) * rng.uniform(0.1, 2.0, size=s) for s in shapes]
        for _ in range(n_steps)
    ]
    opt = AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    for t in range(1, n_steps + 1):  # step by step, against the reference run for t steps
        previous = [p.data.copy() for p in params]
        run_steps(opt, params, grads[t - 1 : t])
        expected = ref_adamw(start, grads[:t], lr, betas, eps, wd)
        for p, e, s in zip(params, expected, previous, strict=True):
            # compare the updates themselves, relatively: a wrong bias correction or a coupled
            # decay changes an update by far more than 1e-7 of itself
            np.testing.assert_allclose(p.data - s, e - s, rtol=1e-7, atol=1e-12)
            if t == 1:  # the first Adam update (beside the decay) is ±lr·|g|/(|g| + eps)
                assert np.abs(e - s * (1 - lr * wd)).min() > 0.5 * lr
    assert all(opt.state[id(p)]["step"] == n_steps for p in params)


def test_adamw_one_step_moves_each_element_by_lr():
    """At t = 1, m̂/√v̂ = sign(g): the first AdamW step is lr·sign(g) (plus decay)."""
    p = Parameter(np.array([1.0, -2.0, 3.0]))
    p.grad = np.array([0.5, -1e-3, 40.0])
    AdamW([p], lr=0.01, eps=0.0, weight_decay=0.1).step()
    expected = np.array([1.0, -2.0, 3.0]) * (1 - 0.01 * 0.1) - 0.01 * np.sign([0.5, -1e-3, 40.0])
    np.testing.assert_allclose(p.data, expected, rtol=1e-14)


@given(
    shapes=param_shapes,
    seed=seeds,
    n_steps=st.integers(1, 5),
    lr=st.floats(1e-3, 0.5),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    wd=st.sampled_from([0.0, 0.01, 0.3]),
    dtype=float_dtypes,
)
def test_sgd_matches_torch_formula(shapes, seed, n_steps, lr, momentum, wd, dtype):
    params = make_params(seed, shapes, dtype)
    start = [p.data.copy() for p in params]
    rng = np.random.default_rng(seed + 1)
    grads = [[rng.normal(size=s) for s in shapes] for _ in range(n_steps)]
    opt = SGD(params, lr=lr, momentum=momentum, weight_decay=wd)
    run_steps(opt, params, grads)
    # the grads reach the optimizer in the parameter's dtype: use the same in the reference
    grads = [[g.astype(dtype).astype(np.float64) for g in gs] for gs in grads]
    expected = ref_sgd(start, grads, lr, momentum, wd)
    tol = 1e-12 if dtype == np.float64 else 2e-6  # float32: a few roundings per step
    for p, e in zip(params, expected, strict=True):
        assert p.dtype == dtype
        np.testing.assert_allclose(p.data, e, rtol=tol, atol=tol)


@given(seed=seeds, lrs=st.tuples(st.floats(1e-3, 0.1), st.floats(1e-3, 0.1)))
def test_param_groups_use_their_own_settings(seed, lrs):
    params = make_params(seed, [(3, 2), (4,), (2,)])
    start = [p.data.copy() for p in params]
    rng = np.random.default_rng(seed + 1)
    grads = [[rng.normal(size=p.shape) for p in params] for _ in range(3)]
    groups = [
        {"params": params[:2], "lr": lrs[0]},
        {"params": params[2:], "lr": lrs[1], "weight_decay": 0.0},
    ]
    opt = AdamW(groups, lr=123.0, weight_decay=0.2)
    assert [g["lr"] for g in opt.param_groups] == list(lrs)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
    run_steps(opt, params, grads)
    first = ref_adamw(start[:2], [g[:2] for g in grads], lrs[0], (0.9, 0.999), 1e-8, 0.2)
    second = ref_adamw(start[2:], [g[2:] for g in grads], lrs[1], (0.9, 0.999), 1e-8, 0.0)
    for p, e, s in zip(params, first + second, start, strict=True):
        np.testing.assert_allclose(p.data - s, e - s, rtol=1e-7, atol=1e-12)

    sgd_params = make_params(seed, [(2,), (2,)])
    sgd_start = [p.data.copy() for p in sgd_params]
    sgd = SGD([{"params": sgd_params[:1]}, {"params": sgd_params[1:], "lr": lrs[1]}], lr=lrs[0])
    run_steps(sgd, sgd_params, [[np.ones(2), np.ones(2)]])
    np.testing.assert_allclose(sgd_params[0].data, sgd_start[0] - lrs[0], rtol=1e-14)
    np.testing.assert_allclose(sgd_params[1].data, sgd_start[1] - lrs[1], rtol=1e-14)


def test_zero_grad_clears_every_group():
    params = make_params(0, [(2,), (3,)])
    opt = SGD([{"params": params[:1]}, {"params": params[1:]}], lr=0.1)
    for p in params:
        p.grad = np.ones(p.shape)
    opt.zero_grad()
    assert all(p.grad is None for p in params)


# --------------------------------------------------------------------------------------
# Gradient clipping
# --------------------------------------------------------------------------------------


@given(shapes=param_shapes, seed=seeds, max_norm=st.floats(0.01, 10.0), dtype=float_dtypes)
def test_clip_grad_norm_returns_pre_clip_norm_and_scales_to_max_norm(shapes, seed, max_norm, dtype):
    params = make_params(seed, shapes, dtype) + make_params(seed, [(2,)], dtype)
    rng = np.random.default_rng(seed + 1)
    for p in params[:-1]:  # the last one has no gradient and is ignored
        p.grad = (rng.normal(size=p.shape) * rng.uniform(0.01, 3.0)).astype(dtype)
    before = [p.grad.copy() for p in params[:-1]]
    norm = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in before))
    returned = clip_grad_norm_(iter(params), max_norm)  # any iterable, as torch
    assert returned == pytest.approx(norm, rel=1e-12)
    after = [p.grad for p in params[:-1]]
    assert params[-1].grad is None
    if norm <= max_norm:
        assert all(np.array_equal(a, b) for a, b in zip(after, before, strict=True))
    else:
        new_norm = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in after))
        # torch divides by (norm + 1e-6), so the clipped norm is max_norm·norm/(norm + 1e-6);
        # float32 adds one rounding per element
        assert new_norm == pytest.approx(max_norm, rel=1e-6 / norm + 1e-6)
        coef = max_norm / (norm + 1e-6)
        for a, b in zip(after, before, strict=True):  # one common factor: directions kept
            np.testing.assert_allclose(a, b * coef, rtol=1e-6 if dtype == np.float32 else 1e-12)


def test_clip_grad_norm_without_gradients_and_bad_max_norm():
    params = make_params(0, [(2,)])
    assert clip_grad_norm_(params, 1.0) == 0.0
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_(params, -1.0)


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("opt_cls", [AdamW, SGD])
@pytest.mark.parametrize("lr", [-1e-3, float("nan"), "0.1", None, True])
def test_bad_lr_is_refused_naming_lr(opt_cls, lr):
    with pytest.raises(ValueError, match="lr="):
        opt_cls(make_params(0, [(2,)]), lr=lr)


@pytest.mark.parametrize(
    "make, named",
    [
        (lambda ps: AdamW(ps, betas=(1.0, 0.999)), "betas"),
        (lambda ps: AdamW(ps, betas=(0.9,)), "betas"),
        (lambda ps: AdamW(ps, eps=-1.0), "eps"),
        (lambda ps: AdamW(ps, weight_decay=-0.1), "weight_decay"),
        (lambda ps: SGD(ps, momentum=-0.9), "momentum"),
        (lambda ps: SGD([{"params": ps, "nesterov": True}]), "nesterov"),
        (lambda ps: AdamW([]), "empty"),
    ],
)
def test_bad_settings_are_refused_naming_them(make, named):
    with pytest.raises(ValueError, match=named):
        make(make_params(0, [(2,)]))


def test_non_tensor_params_are_refused():
    with pytest.raises(TypeError, match="Tensor"):
        SGD([np.zeros(2)], lr=0.1)


def test_float16_lora_trains_through_float32_master_weights():
    """A float16 base with float16 adapters trains: AdamW's eps (1e-8) underflows to 0 in
    float16, and B's zero gradient at step 1 (B = 0 at init) made A's step 2 a 0/0. The
    optimizer keeps a float32 master weight and float32 moments per float16 parameter and
    rounds each step into it."""
    minilora.manual_seed(0)
    config = minilora.GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=16)
    model = GPT(config, dtype=np.float16)
    lora = minilora.LoRAConfig(r=4, lora_alpha=16, target_modules=["v_proj", "fc2"])
    minilora.apply_lora(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = AdamW(trainable, lr=1e-2)
    idx = np.random.default_rng(0).integers(0, 16, (4, 8))
    losses = []
    for _ in range(30):
        loss = model(idx[:, :-1], idx[:, 1:])[1]
        losses.append(float(loss.data))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert np.isfinite(losses).all(), losses
    assert losses[-1] < losses[0] - 0.05, losses
    for p in trainable:
        state = opt.state[id(p)]
        assert p.dtype == np.float16
        assert state["master"].dtype == state["exp_avg"].dtype == state["exp_avg_sq"].dtype
        assert state["master"].dtype == np.float32
        np.testing.assert_array_equal(p.data, state["master"].astype(np.float16))


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_float16_updates_below_half_a_unit_add_up(kind):
    """100 steps of 1e-4 each on a float16 1.0 (whose unit in the last place is 1e-3):
    each step alone rounds back to 1.0, the float32 master weight adds them up to 0.99."""
    p = Parameter(np.ones(3, np.float16))
    opt = AdamW([p], lr=1e-4, weight_decay=0.0) if kind == "adamw" else SGD([p], lr=1e-4)
    for _ in range(100):
        p.grad = np.ones(3, np.float16)
        opt.step()
    np.testing.assert_allclose(p.data, 0.99, rtol=1e-3)
