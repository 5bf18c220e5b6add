"""What LoRA learns (minilora/study/analysis.py): the LoRA paper's section 7 analyses.

What is proven: the subspace similarity φ lies in [0, 1], is 1 for a matrix against itself
and for nested row spaces, 0 for orthogonal ones, depends only on the singular subspaces
(unchanged by scaling and by orthogonal mixing of A's rows; for any invertible mixing the
whole row space, i = r, is unchanged), and for independent random matrices averages
max(i, j) / in, as derived in ``test_random_subspaces_have_the_expected_similarity``; the
grid equals φ entry by entry. The amplification factor is exactly |c| for ΔW = c·W_r and
equals the projector formula ‖P_U W P_V‖_F computed without any SVD; W's own top-r
subspace holds the most of W; the spectra match NumPy's; bad input is refused by name.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import rng, seeds

from minilora import backend
from minilora.study.analysis import (
    amplification_factor,
    amplification_table,
    projection_norm,
    random_subspace,
    singular_values,
    stable_rank,
    subspace_similarity,
    subspace_similarity_grid,
    top_singular_subspace,
)

TOL = 1e-9  # float64 SVDs of small Gaussian matrices: errors ~1e-14 over the singular gaps


@st.composite
def adapter_pairs(draw, max_in: int = 9, max_r: int = 9):
    """Two Gaussian ``lora_A`` matrices (r₁, in) and (r₂, in) of one layer (r may exceed in)."""
    seed, in_f = draw(seeds), draw(st.integers(1, max_in))
    r1, r2 = draw(st.integers(1, max_r)), draw(st.integers(1, max_r))
    g = rng(seed)
    return g.standard_normal((r1, in_f)), g.standard_normal((r2, in_f))


def _orthogonal(n: int, seed: int) -> np.ndarray:
    return np.linalg.qr(rng(seed).standard_normal((n, n)))[0]


# --------------------------------------------------------------------------------------
# Subspace similarity φ (section 7.2)
# --------------------------------------------------------------------------------------


@given(pair=adapter_pairs())
def test_similarity_lies_in_zero_one_and_the_grid_is_phi_entry_by_entry(pair):
    A1, A2 = pair
    grid = subspace_similarity_grid(A1, A2)
    k1, k2 = min(A1.shape), min(A2.shape)
    assert grid.shape == (k1, k2)
    assert grid.min() >= -TOL and grid.max() <= 1 + TOL
    for i in range(1, k1 + 1):
        for j in range(1, k2 + 1):
            assert abs(grid[i - 1, j - 1] - subspace_similarity(A1, A2, i, j)) <= TOL


@given(pair=adapter_pairs())
def test_a_matrix_is_fully_similar_to_itself(pair):
    A = pair[0]
    # the smaller of two nested subspaces lies inside the larger: φ = 1 for every i and j
    np.testing.assert_allclose(subspace_similarity_grid(A, A), 1.0, rtol=0, atol=TOL)


@given(seed=seeds, in_f=st.integers(1, 9), data=st.data())
def test_similarity_counts_the_top_directions_two_matrices_share(seed, in_f, data):
    """Build A₁ and A₂ from known right-singular vectors, rows q_k of an orthogonal Q,
    strongest first: A₁'s are q_0..q_{r₁-1}, A₂'s are q_π(0)..q_π(r₂-1) for a permutation
    π. Then U_iᵀ U_j is a 0/1 matrix and φ(i, j) = |{0..i-1} ∩ {π(0)..π(j-1)}| / min(i, j)."""
    r1, r2 = data.draw(st.integers(1, in_f)), data.draw(st.integers(1, in_f))
    g = rng(seed)
    Q = _orthogonal(in_f, seed)
    perm = g.permutation(in_f)

    def with_directions(rows, s):
        strengths = np.arange(len(rows), 0, -1) + g.uniform(0, 0.5, len(rows))  # descending
        return _orthogonal(len(rows), s) @ (strengths[:, None] * Q[rows])  # rows mixed by O

    A1, A2 = with_directions(np.arange(r1), seed + 1), with_directions(perm[:r2], seed + 2)
    expected = np.array(
        [
            [len(set(range(i)) & set(perm[:j].tolist())) / min(i, j) for j in range(1, r2 + 1)]
            for i in range(1, r1 + 1)
        ]
    )
    np.testing.assert_allclose(subspace_similarity_grid(A1, A2), expected, rtol=0, atol=TOL)


@given(seed=seeds, in_f=st.integers(2, 9), data=st.data())
def test_nested_row_spaces_have_similarity_one(seed, in_f, data):
    r2 = data.draw(st.integers(1, in_f))
    r1 = data.draw(st.integers(1, r2))
    A2 = rng(seed).standard_normal((r2, in_f))
    A1 = rng(seed + 1).standard_normal((r1, r2)) @ A2  # its rows lie in A2's row space
    assert abs(subspace_similarity(A1, A2, r1, r2) - 1) <= TOL


@given(seed=seeds, in_f=st.integers(2, 9), data=st.data())
def test_orthogonal_row_spaces_have_similarity_zero(seed, in_f, data):
    r1 = data.draw(st.integers(1, in_f - 1))
    r2 = data.draw(st.integers(1, in_f - r1))
    Q = _orthogonal(in_f, seed)  # rows: an orthonormal basis of R^in
    A1 = rng(seed + 1).standard_normal((r1, r1)) @ Q[:r1]  # (r₁, in)
    A2 = rng(seed + 2).standard_normal((r2, r2)) @ Q[r1 : r1 + r2]  # (r₂, in), ⟂ A1's rows
    np.testing.assert_allclose(subspace_similarity_grid(A1, A2), 0.0, rtol=0, atol=TOL)


@given(pair=adapter_pairs(), seed=seeds, scale=st.floats(1e-3, 1e3), sign=st.sampled_from([-1, 1]))
def test_similarity_sees_only_the_singular_subspaces(pair, seed, scale, sign):
    """Scaling A, or mixing its rows by an orthogonal Q (QA = (QU)ΣVᵀ), keeps its right
    singular vectors and values: the whole grid is unchanged."""
    A1, A2 = pair
    grid = subspace_similarity_grid(A1, A2)
    Q = _orthogonal(A1.shape[0], seed)
    np.testing.assert_allclose(
        subspace_similarity_grid(sign * scale * A1, A2), grid, rtol=0, atol=1e-8
    )
    np.testing.assert_allclose(subspace_similarity_grid(Q @ A1, A2), grid, rtol=0, atol=1e-8)
    np.testing.assert_allclose(subspace_similarity_grid(A1, -2.5 * A2), grid, rtol=0, atol=1e-8)


@given(seed=seeds, in_f=st.integers(2, 9), data=st.data())
def test_the_whole_row_space_is_invariant_to_any_invertible_mixing(seed, in_f, data):
    """An invertible M (r, r) changes A's singular vectors but not its row space, so φ at
    i = r (the whole row space of A1) is unchanged for every j. (Inside, at i < r, the top
    directions do change: the order of directions is what M mixes.)"""
    r1, r2 = data.draw(st.integers(1, in_f)), data.draw(st.integers(1, in_f))
    A1 = rng(seed).standard_normal((r1, in_f))
    A2 = rng(seed + 1).standard_normal((r2, in_f))
    M = rng(seed + 2).standard_normal((r1, r1)) + 3 * np.eye(r1)  # invertible, conditioned
    assert abs(np.linalg.det(M)) > 1e-6
    np.testing.assert_allclose(
        subspace_similarity_grid(M @ A1, A2)[-1], subspace_similarity_grid(A1, A2)[-1], atol=1e-8
    )


@pytest.mark.parametrize("i, j, in_f", [(2, 16, 64), (16, 2, 64), (8, 8, 32), (1, 1, 8)])
def test_random_subspaces_have_the_expected_similarity(i, j, in_f):
    """Expectation: the top-j right-singular subspace of a Gaussian A₂ is uniformly random
    (A₂ and A₂Q have the same law for any orthogonal Q) and independent of A₁. For a
    uniformly random projector P_j, E P_j = (j / in)·I (rotation invariance, and tr P_j = j),
    so E ‖U_iᵀ U_j‖²_F = tr(U_iᵀ E[P_j] U_i) = i·j / in and E φ = max(i, j) / in = μ.

    Bound: φ lies in [0, 1], so Var φ ≤ μ(1 - μ) (Bhatia–Davis), and the mean of m
    independent draws has standard deviation at most s = sqrt(μ(1 - μ) / m). By Chebyshev,
    |mean - μ| > 6 s happens for at most 1/36 of all seeds whatever the law of φ (for a
    near-normal mean, about 2e-9); the seed here is fixed. A φ divided by max(i, j) instead
    of min(i, j) gives min(i, j) / in, which (2, 16, 64) puts 0.22 away, beyond 6 s = 0.13.
    """
    m, mu = 400, max(i, j) / in_f
    g = rng(i * 1000 + j * 10 + in_f)
    draws = [
        subspace_similarity(
            g.standard_normal((max(i, 3), in_f)), g.standard_normal((max(j, 3), in_f)), i, j
        )
        for _ in range(m)
    ]
    assert abs(np.mean(draws) - mu) <= 6 * math.sqrt(mu * (1 - mu) / m)


@pytest.mark.parametrize(
    "A1, A2, i, j, message",
    [
        ((4, 8), (6, 8), 5, 1, r"i=5 must be an integer in \[1, 4\]"),
        ((4, 8), (6, 8), 1, 7, r"j=7 must be an integer in \[1, 6\]"),
        ((4, 8), (6, 8), 0, 1, r"i=0 must be an integer in \[1, 4\]"),
        ((4, 8), (6, 8), True, 1, r"i=True must be an integer"),
        ((4, 8), (6, 8), 2.0, 1, r"i=2.0 must be an integer"),
        ((9, 3), (6, 3), 4, 1, r"i=4 must be an integer in \[1, 3\]"),  # r > in: in directions
        ((4, 8), (6, 7), 1, 1, r"A1 has shape \(4, 8\) and A2 \(6, 7\): they must share"),
        ((8,), (6, 8), 1, 1, r"A1 has shape \(8,\), expected a non-empty matrix"),
        ((4, 8), (2, 6, 8), 1, 1, r"A2 has shape \(2, 6, 8\), expected a non-empty matrix"),
        ((0, 8), (6, 8), 1, 1, r"A1 has shape \(0, 8\), expected a non-empty matrix"),
    ],
)
def test_similarity_refuses_bad_shapes_and_ranks(A1, A2, i, j, message):
    A1, A2 = np.ones(A1), np.ones(A2)
    with pytest.raises(ValueError, match=message):
        subspace_similarity(A1, A2, i, j)


def test_similarity_refuses_what_is_not_a_finite_real_array():
    A = rng(0).standard_normal((3, 5))
    with pytest.raises(TypeError, match="A1 must be an array .* got list"):
        subspace_similarity_grid(A.tolist(), A)
    with pytest.raises(TypeError, match="A2 has dtype complex128, expected real numbers"):
        subspace_similarity_grid(A, A.astype(complex))
    bad = A.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="A2 contains NaN or inf"):
        subspace_similarity(A, bad, 1, 1)


# --------------------------------------------------------------------------------------
# ΔW against W (section 7.3, Table 7)
# --------------------------------------------------------------------------------------


@st.composite
def layers(draw, max_side: int = 9):
    """A weight W (out, in), a rank r ≤ min(out, in), and a rank-r update ΔW = B A."""
    seed = draw(seeds)
    out_f, in_f = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    r = draw(st.integers(1, min(out_f, in_f)))
    g = rng(seed)
    W = g.standard_normal((out_f, in_f))
    delta = g.standard_normal((out_f, r)) @ g.standard_normal((r, in_f))
    return W, delta, r


@given(layer=layers(), c=st.floats(-100, 100).filter(lambda c: abs(c) > 1e-3))
def test_amplifying_w_own_top_directions_gives_exactly_the_scale(layer, c):
    """ΔW = c·W_r (W_r = U_r Σ_r V_rᵀ, W's best rank-r part) has W's top subspaces, where
    U_rᵀ W V_r = Σ_r, so ‖Uᵀ W V‖_F = ‖Σ_r‖_F = ‖W_r‖_F and the factor is |c|·‖W_r‖_F /
    ‖W_r‖_F = |c|."""
    W, _, r = layer
    U, S, Vh = np.linalg.svd(W, full_matrices=False)
    W_r = (U[:, :r] * S[:r]) @ Vh[:r]
    assert abs(amplification_factor(c * W_r, W, r) - abs(c)) <= 1e-9 * abs(c)


@given(layer=layers())
def test_amplification_equals_the_projector_formula(layer):
    """A second route, with no SVD: for ΔW of rank r, P_U = ΔW ΔW⁺ and P_V = ΔW⁺ ΔW are the
    projectors onto its column and row spaces, and ‖Uᵀ W V‖_F = ‖P_U W P_V‖_F (U, V have
    orthonormal columns, so multiplying by them keeps Frobenius norms)."""
    W, delta, r = layer
    pinv = np.linalg.pinv(delta, rcond=1e-10)
    projected = np.linalg.norm((delta @ pinv) @ W @ (pinv @ delta))
    assert abs(amplification_factor(delta, W, r) - np.linalg.norm(delta) / projected) <= (
        1e-7 * np.linalg.norm(delta) / projected
    )


@given(layer=layers(), seed=seeds)
def test_the_table_compares_delta_w_with_w_and_random_directions(layer, seed):
    W, delta, r = layer
    row = amplification_table(delta, W, r, backend.Generator(seed))
    s = np.linalg.svd(W, compute_uv=False)
    # no r-dimensional pair of subspaces holds more of W than its own top r: sqrt(Σ σ_k²)
    assert abs(row["on_weight"] - math.sqrt(np.sum(s[:r] ** 2))) <= 1e-9 * s[0]
    assert row["on_weight"] >= max(row["on_delta_weight"], row["on_random"]) - 1e-9 * s[0]
    U, Vh = random_subspace(W.shape, r, backend.Generator(seed))
    assert row["on_random"] == projection_norm(W, U, Vh)
    assert row["on_delta_weight"] == projection_norm(W, *top_singular_subspace(delta, r))
    assert row["weight_norm"] == pytest.approx(np.linalg.norm(W), rel=1e-12)
    assert row["delta_weight_norm"] == pytest.approx(np.linalg.norm(delta), rel=1e-12)
    assert row["amplification"] == row["delta_weight_norm"] / row["on_delta_weight"]
    assert row["r"] == r


@given(seed=seeds, out_f=st.integers(1, 9), in_f=st.integers(1, 9), data=st.data())
def test_subspaces_have_orthonormal_bases(seed, out_f, in_f, data):
    r = data.draw(st.integers(1, min(out_f, in_f)))
    M = rng(seed).standard_normal((out_f, in_f))
    for U, Vh in (
        top_singular_subspace(M, r),
        random_subspace(M.shape, r, backend.Generator(seed)),
    ):
        assert U.shape == (out_f, r) and Vh.shape == (r, in_f)
        np.testing.assert_allclose(U.T @ U, np.eye(r), atol=1e-12)
        np.testing.assert_allclose(Vh @ Vh.T, np.eye(r), atol=1e-12)
    U, Vh = top_singular_subspace(M, r)
    s = np.linalg.svd(M, compute_uv=False)
    np.testing.assert_allclose(np.diag(U.T @ M @ Vh.T), s[:r], rtol=1e-9, atol=1e-12)


def test_amplification_refuses_bad_input():
    W, delta = np.eye(4), np.zeros((4, 4))
    delta[1, 1] = 1.0
    with pytest.raises(ValueError, match=r"r=5 must be an integer in \[1, 4\]"):
        amplification_factor(delta, W, 5)
    with pytest.raises(ValueError, match=r"delta_weight has shape \(4, 3\) and weight \(4, 4\)"):
        amplification_factor(delta[:, :3], W, 1)
    orthogonal = np.zeros((4, 4))
    orthogonal[0, 0] = 1.0  # W = e₁e₁ᵀ has nothing in ΔW's direction e₂e₂ᵀ
    with pytest.raises(ValueError, match="weight has no component in delta_weight's subspace"):
        amplification_factor(delta, orthogonal, 1)
    with pytest.raises(ValueError, match=r"U \(4, 2\) and Vh \(1, 4\) must be \(out, r\)"):
        projection_norm(W, np.ones((4, 2)), np.ones((1, 4)))
    with pytest.raises(ValueError, match=r"shape=\(4, 0\) must be \(out, in\)"):
        random_subspace((4, 0), 1, backend.Generator(0))
    with pytest.raises(ValueError, match=r"r=3 must be an integer in \[1, 2\]"):
        random_subspace((2, 4), 3, backend.Generator(0))
    with pytest.raises(TypeError, match="generator must be a minilora.backend.Generator, got 0"):
        amplification_table(delta, W, 1, 0)
    assert amplification_factor(delta, W, np.int64(1)) == 1.0  # NumPy integers are integers


# --------------------------------------------------------------------------------------
# Spectra
# --------------------------------------------------------------------------------------


@given(seed=seeds, out_f=st.integers(1, 9), in_f=st.integers(1, 9), rank=st.integers(1, 9))
def test_spectra_are_numpys_svdvals_and_the_stable_rank_counts_directions(seed, out_f, in_f, rank):
    rank = min(rank, out_f, in_f)
    g = rng(seed)
    M = g.standard_normal((out_f, rank)) @ g.standard_normal((rank, in_f))
    s = singular_values(M)
    assert s.dtype == np.float64 and s.shape == (min(out_f, in_f),)
    assert np.all(np.diff(s) <= 0)  # descending
    np.testing.assert_allclose(s, np.linalg.svdvals(M), rtol=1e-12, atol=1e-12 * s[0])
    assert 1 - 1e-12 <= stable_rank(M) <= rank + 1e-9
    assert stable_rank(M) == pytest.approx(np.sum(s**2) / s[0] ** 2, rel=1e-12)


def test_stable_rank_of_rank_one_orthogonal_and_zero_matrices():
    g = rng(0)
    assert stable_rank(np.outer(g.standard_normal(5), g.standard_normal(3))) == pytest.approx(1)
    assert stable_rank(3 * _orthogonal(6, 1)) == pytest.approx(6)
    with pytest.raises(ValueError, match="matrix is zero"):
        stable_rank(np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"matrix has shape \(3,\)"):
        singular_values(np.ones(3))


# --------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------


def test_the_analyses_run_on_every_device(device):
    g = rng(3)
    A1, A2 = g.standard_normal((4, 8)), g.standard_normal((6, 8))
    W, delta = g.standard_normal((5, 8)), g.standard_normal((5, 2)) @ g.standard_normal((2, 8))
    on = {
        name: backend.to_device(x, device) for name, x in dict(A1=A1, A2=A2, W=W, d=delta).items()
    }
    grid = subspace_similarity_grid(on["A1"], on["A2"])
    assert backend.device_of(grid) == device
    np.testing.assert_allclose(backend.to_numpy(grid), subspace_similarity_grid(A1, A2), atol=TOL)
    assert subspace_similarity(on["A1"], on["A2"], 2, 3) == pytest.approx(
        subspace_similarity(A1, A2, 2, 3), abs=TOL
    )
    row = amplification_table(on["d"], on["W"], 2, backend.Generator(7))
    expected = amplification_table(delta, W, 2, backend.Generator(7))
    assert row == pytest.approx(expected, rel=1e-9)
    s = singular_values(on["W"])
    assert backend.device_of(s) == device
    np.testing.assert_allclose(backend.to_numpy(s), singular_values(W), rtol=1e-12)
    assert stable_rank(on["W"]) == pytest.approx(stable_rank(W), rel=1e-12)
