"""Dense SPD solves with many right-hand sides, laid out for LAPACK without copies.

∞-AE solves ``(K + λ̃I) α = X`` with ``K`` n×n and ``X`` n×m (m = items) for every λ of a grid.
NumPy arrays are row-major and LAPACK is column-major, so ``scipy.linalg.cho_factor`` /
``cho_solve`` on C-ordered arrays first transpose-copy ``K + λ̃I`` (146 MB on ML-1M) and ``X`` and
hand back a column-major α; on ML-1M that is ≈ 0.55 of 1.9 s per λ. :func:`spd_solve` works on
the transposed views instead: a C-ordered symmetric matrix *is* its own column-major transpose,
so ``potrf`` factorises it in place, and ``αᵀ = Xᵀ (K + λ̃I)⁻¹`` is two right-side triangular
solves (``trsm``) on the column-major view of a C-ordered α — in place again. Work buffers may be
passed in and reused across a λ grid (no fresh 100 MB allocations, no page faults).

Pure NumPy/SciPy: no I/O.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import get_blas_funcs, get_lapack_funcs


def spd_solve(a: np.ndarray, b: np.ndarray, *, shift: float = 0.0, a_work: np.ndarray | None = None,
              out: np.ndarray | None = None) -> np.ndarray | None:
    """``(a + shift·I)⁻¹ b`` for symmetric positive definite ``a`` (n×n) and ``b`` (n×m or n).

    ``a`` and ``b`` are left untouched: the factor goes to ``a_work`` (C-ordered n×n, reused if
    given) and the solution to ``out`` (C-ordered like ``b``, reused if given). The result is
    C-contiguous in ``a``'s dtype. Returns ``None`` when ``a + shift·I`` is not numerically
    positive definite (Cholesky breaks down or the solution is not finite).
    """
    n = a.shape[0]
    if a.ndim != 2 or a.shape != (n, n) or b.shape[0] != n:
        raise ValueError(f"shapes {a.shape} and {b.shape} do not make a square system")
    dtype = np.result_type(a.dtype, np.float32)
    work = _buffer(a_work, (n, n), dtype)
    np.copyto(work, a)
    if shift:
        work.flat[:: n + 1] += np.asarray(shift, dtype=dtype)
    # work is symmetric, so its Fortran-ordered view work.T is the same matrix: factorise in place
    potrf = get_lapack_funcs("potrf", (work,))
    factor, info = potrf(work.T, lower=True, overwrite_a=True, clean=False)
    if info != 0:
        return None
    x = _buffer(out, b.shape, dtype)
    np.copyto(x, b)
    # A x = b  ⇔  xᵀ A = bᵀ with A = L Lᵀ: solve Z Lᵀ = bᵀ, then xᵀ L = Z (right-side trsm on
    # the Fortran-ordered view xᵀ of the C-ordered x, in place)
    x_t = x.reshape(1, n) if x.ndim == 1 else x.T
    trsm = get_blas_funcs("trsm", (factor,))
    x_t = trsm(1.0, factor, x_t, side=1, lower=1, trans_a=1, overwrite_b=1)
    x_t = trsm(1.0, factor, x_t, side=1, lower=1, trans_a=0, overwrite_b=1)
    if not np.shares_memory(x_t, x):  # f2py had to copy (never for the buffers made here)
        np.copyto(x, x_t.reshape(n) if x.ndim == 1 else x_t.T)
    if not np.isfinite(x).all():
        return None
    return x


def _buffer(given: np.ndarray | None, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if given is None:
        return np.empty(shape, dtype=dtype)
    if given.shape != tuple(shape) or given.dtype != dtype or not given.flags.c_contiguous:
        raise ValueError(f"work buffer must be C-contiguous {dtype} {shape}, got {given.dtype} {given.shape}")
    return given
