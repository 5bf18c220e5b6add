"""What LoRA learns: the analyses of the LoRA paper's section 7, as pure functions.

Hu et al. (2021, arXiv 2106.09685) ask three questions of trained adapters. Each is a few
lines of linear algebra on the adapter's matrices, written here on arrays (a parameter's
``.data``, ``LoRALinear.get_delta_weight()``); notebooks/09_what_lora_learns.ipynb runs them
on the shipped base model. Everything is computed in float64.

1. **Do adapters of different ranks (or seeds) learn the same subspace?** (section 7.2,
   Figures 3 and 4.) Take the top-i right-singular vectors of one ``A`` (r₁, in) and the
   top-j of another (r₂, in), as the orthonormal columns of ``U_i`` (in, i) and ``U_j``
   (in, j); their normalised subspace similarity is

       φ(A₁, A₂, i, j) = ‖U_iᵀ U_j‖²_F / min(i, j)   ∈ [0, 1]

   ``‖U_iᵀ U_j‖²_F`` is the sum of the squared cosines of the principal angles between the
   two subspaces, so φ = 1 when the smaller subspace lies inside the larger one and φ = 0
   when they are orthogonal. Two *random* subspaces of R^in give E φ = max(i, j) / in.

2. **How does ΔW relate to W?** (section 7.3, Table 7.) With ``U`` (out, r) and ``V``
   (in, r) the top-r left and right singular vectors of ΔW, ``Uᵀ W V`` (r, r) is W seen
   inside ΔW's r-dimensional subspace (the paper writes ``Uᵀ W Vᵀ``, taking V as the
   rows ``Vᵀ`` of the SVD). The amplification factor

       ‖ΔW‖_F / ‖Uᵀ W V‖_F

   says how much ΔW magnifies the directions it shares with W. The paper compares the
   projection onto ΔW's subspace with the projection onto W's own top-r subspace (which is
   ``sqrt(σ₁² + ... + σ_r²)`` of W, the most W can put into r directions) and onto a random
   r-dimensional subspace.

3. **What does ΔW's spectrum look like next to W's?** :func:`singular_values` and
   :func:`stable_rank` (``‖M‖²_F / σ₁²``, between 1 and the rank: how many directions carry
   the matrix's energy).
"""

from __future__ import annotations

import numbers

from minilora import backend

# ======================================================================================
# Checks and singular subspaces
# ======================================================================================


def _matrix(x, name: str):
    """``x`` as a float64 matrix, or a TypeError/ValueError naming ``name``."""
    xp = backend.get_array_module(x)
    if not isinstance(x, xp.ndarray):
        raise TypeError(
            f"{name} must be an array (a parameter's .data, get_delta_weight()), "
            f"got {type(x).__name__}"
        )
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}, expected a non-empty matrix (rows, columns)"
        )
    if not (backend.is_floating(x) or backend.is_integer(x)):
        raise TypeError(f"{name} has dtype {x.dtype}, expected real numbers")
    if not bool(xp.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf; its singular vectors are undefined")
    return x.astype(backend.float64)


def _check_count(value, name: str, top: int, what: str) -> None:
    """Refuse ``value`` unless it is an integer in [1, top]."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not 1 <= value <= top:
        raise ValueError(f"{name}={value!r} must be an integer in [1, {top}] ({what})")


def singular_values(matrix):
    """σ₁ ≥ σ₂ ≥ ... ≥ σ_min(rows, cols) ≥ 0 of ``matrix`` (rows, cols), float64, descending."""
    m = _matrix(matrix, "matrix")
    xp = backend.get_array_module(m)
    return xp.linalg.svd(m, compute_uv=False)  # (min(rows, cols),), descending


def stable_rank(matrix) -> float:
    """``‖M‖²_F / ‖M‖²_2 = Σ σ_k² / σ₁²``: 1 for a rank-1 matrix, ``n`` for an orthogonal
    (n, n) one, never above the rank. A robust count of the directions a matrix uses."""
    s = singular_values(matrix)
    if not float(s[0]) > 0:
        raise ValueError("matrix is zero: its stable rank ‖M‖²_F / σ₁² is undefined")
    xp = backend.get_array_module(s)
    return float(xp.sum(s**2) / s[0] ** 2)


def top_singular_subspace(matrix, r: int):
    """The top-``r`` singular vectors of ``matrix`` (out, in): ``U`` (out, r), orthonormal
    columns, and ``Vh`` (r, in), orthonormal rows, so that ``U Σ_r Vh`` is the best rank-r
    approximation. Only the subspaces are unique (up to rotations within them, and only
    when σ_r > σ_{r+1}); every quantity in this module depends on the subspaces alone."""
    m = _matrix(matrix, "matrix")
    _check_count(r, "r", min(m.shape), f"at most min(out, in) of the shape {tuple(m.shape)}")
    xp = backend.get_array_module(m)
    U, _, Vh = xp.linalg.svd(m, full_matrices=False)  # (out, k), (k,), (k, in)
    return U[:, :r], Vh[:r]


def random_subspace(shape: tuple, r: int, generator: backend.Generator, device: str = "cpu"):
    """A uniformly random r-dimensional pair of subspaces for a matrix of ``shape`` (out, in):
    ``U`` (out, r) and ``Vh`` (r, in) with orthonormal columns and rows, from the QR
    decomposition of Gaussian matrices (the span of a Gaussian matrix is uniform)."""
    if not isinstance(generator, backend.Generator):
        raise TypeError(f"generator must be a minilora.backend.Generator, got {generator!r}")
    if len(shape) != 2 or not all(isinstance(n, numbers.Integral) and n > 0 for n in shape):
        raise ValueError(f"shape={shape!r} must be (out, in), two positive integers")
    _check_count(r, "r", min(shape), f"at most min(out, in) of the shape {tuple(shape)}")
    xp = backend.module_for(device)
    out_f, in_f = shape
    U, _ = xp.linalg.qr(generator.normal((out_f, r), dtype=backend.float64, device=device))
    V, _ = xp.linalg.qr(generator.normal((in_f, r), dtype=backend.float64, device=device))
    return U, V.T  # (out, r), (r, in)


# ======================================================================================
# Section 7.2: subspace similarity of two adapters' A matrices (Figures 3 and 4)
# ======================================================================================


def _right_vectors(A1, A2):
    """The right-singular vectors of two ``lora_A`` (r₁, in) and (r₂, in) of one layer, as
    rows, strongest first: (min(r₁, in), in) and (min(r₂, in), in)."""
    m1, m2 = _matrix(A1, "A1"), _matrix(A2, "A2")
    if m1.shape[1] != m2.shape[1]:
        raise ValueError(
            f"A1 has shape {tuple(m1.shape)} and A2 {tuple(m2.shape)}: they must share "
            "in_features (the second size), being lora_A (r, in) of the same layer"
        )
    xp = backend.get_array_module(m1)
    return tuple(xp.linalg.svd(m, full_matrices=False)[2] for m in (m1, m2))


def subspace_similarity(A1, A2, i: int, j: int) -> float:
    """φ(A1, A2, i, j) = ‖U_iᵀ U_j‖²_F / min(i, j), in [0, 1].

    ``A1`` (r₁, in) and ``A2`` (r₂, in) are two adapters' ``lora_A`` for the same layer;
    ``U_i`` (in, i) holds the top-i right-singular vectors of A1 and ``U_j`` (in, j) the
    top-j of A2 (the paper's section 7.2). ``i`` ≤ min(r₁, in), ``j`` ≤ min(r₂, in).
    """
    V1, V2 = _right_vectors(A1, A2)  # (k₁, in), (k₂, in)
    _check_count(i, "i", V1.shape[0], f"the top singular directions of A1 {tuple(A1.shape)}")
    _check_count(j, "j", V2.shape[0], f"the top singular directions of A2 {tuple(A2.shape)}")
    overlap = backend.matmul(V1[:i], V2[:j].T, "analysis.overlap")  # U_iᵀ U_j: (i, j)
    xp = backend.get_array_module(overlap)
    return float(xp.sum(overlap**2)) / min(i, j)


def subspace_similarity_grid(A1, A2):
    """φ(A1, A2, i, j) for every i in 1..k₁ and j in 1..k₂ (k = min(r, in)): an array
    (k₁, k₂) whose entry [i-1, j-1] is φ(i, j), the paper's Figure 3.

    All at once: with C = V₁ V₂ᵀ (k₁, k₂) the cosines between the singular vectors,
    ‖U_iᵀ U_j‖²_F is the sum of C² over its top-left i × j block, a 2-D cumulative sum.
    """
    V1, V2 = _right_vectors(A1, A2)  # (k₁, in), (k₂, in)
    cosines = backend.matmul(V1, V2.T, "analysis.overlap")  # (k₁, k₂)
    xp = backend.get_array_module(cosines)
    blocks = xp.cumsum(xp.cumsum(cosines**2, axis=0), axis=1)  # [i-1, j-1] = ‖U_iᵀ U_j‖²_F
    i = xp.arange(1, V1.shape[0] + 1, dtype=backend.float64)[:, None]  # (k₁, 1)
    j = xp.arange(1, V2.shape[0] + 1, dtype=backend.float64)[None, :]  # (1, k₂)
    return blocks / xp.minimum(i, j)  # (k₁, k₂)


# ======================================================================================
# Section 7.3: ΔW against W (Table 7)
# ======================================================================================


def projection_norm(weight, U, Vh) -> float:
    """‖Uᵀ W Vhᵀ‖_F: the part of ``weight`` (out, in) inside the subspaces of ``U``
    (out, r) and ``Vh`` (r, in), each with orthonormal columns / rows."""
    w = _matrix(weight, "weight")
    U, Vh = _matrix(U, "U"), _matrix(Vh, "Vh")
    if U.shape[0] != w.shape[0] or Vh.shape[1] != w.shape[1] or U.shape[1] != Vh.shape[0]:
        raise ValueError(
            f"U {tuple(U.shape)} and Vh {tuple(Vh.shape)} must be (out, r) and (r, in) for "
            f"weight {tuple(w.shape)} = (out, in)"
        )
    inside = backend.matmul(backend.matmul(U.T, w, "analysis.project"), Vh.T, "analysis.project")
    xp = backend.get_array_module(inside)
    return float(xp.linalg.norm(inside))  # ‖(r, r)‖_F


def _check_same_shape(delta_weight, weight):
    if delta_weight.shape != weight.shape:
        raise ValueError(
            f"delta_weight has shape {tuple(delta_weight.shape)} and weight "
            f"{tuple(weight.shape)}: both must be (out, in) of the same layer"
        )


def amplification_factor(delta_weight, weight, r: int) -> float:
    """‖ΔW‖_F / ‖Uᵀ W V‖_F with U, V the top-``r`` singular vectors of ``delta_weight``
    (out, in) (the paper's section 7.3; r is the adapter's rank). W = ``weight`` (out, in)
    is the frozen pretrained matrix. When ΔW = c · W_r, W's own best rank-r part, the
    factor is exactly |c|: ΔW then spans W's top subspace, where ‖Uᵀ W V‖_F = ‖W_r‖_F."""
    _check_same_shape(delta_weight, weight)
    dw = _matrix(delta_weight, "delta_weight")
    inside = projection_norm(weight, *top_singular_subspace(dw, r))
    if not inside > 0:
        raise ValueError("weight has no component in delta_weight's subspace: no finite factor")
    xp = backend.get_array_module(dw)
    return float(xp.linalg.norm(dw)) / inside


def amplification_table(delta_weight, weight, r: int, generator: backend.Generator) -> dict:
    """One column of the paper's Table 7 for a layer: ‖Uᵀ W V‖_F with U, V the top-``r``
    singular vectors of ΔW (``"on_delta_weight"``), of W itself (``"on_weight"``, the most
    any r-dimensional subspace holds) and of a random subspace from ``generator``
    (``"on_random"``), beside ‖W‖_F, ‖ΔW‖_F and the amplification factor."""
    _check_same_shape(delta_weight, weight)
    dw, w = _matrix(delta_weight, "delta_weight"), _matrix(weight, "weight")
    xp = backend.get_array_module(w)
    random = random_subspace(w.shape, r, generator, backend.device_of(w))
    return {
        "r": r,
        "on_delta_weight": projection_norm(w, *top_singular_subspace(dw, r)),
        "on_weight": projection_norm(w, *top_singular_subspace(w, r)),
        "on_random": projection_norm(w, *random),
        "weight_norm": float(xp.linalg.norm(w)),
        "delta_weight_norm": float(xp.linalg.norm(dw)),
        "amplification": amplification_factor(dw, w, r),
    }
