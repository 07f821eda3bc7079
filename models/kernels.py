"""The neural tangent kernel of ∞-AE's network.

Sachdeva et al., "Infinite Recommendation Networks: A Data-Centric Approach", NeurIPS 2022
(arXiv 2206.02626). The autoencoder is

    stax.serial(Flatten(), [Dense(w, W_std=√2, b_std=0.1, parameterization='ntk'), Relu()] × depth,
                Dense(m, W_std=√2, b_std=0.1, parameterization='ntk'))

and ∞-AE is kernel ridge regression with its NTK (``get='ntk'``), which is the same for every
output item. Two computations of that kernel live here:

* :func:`stax_kernel_fn` — the definition, through neural-tangents (imports TensorFlow: slow
  start, ≈1 GB; imported lazily, only when asked for);
* :func:`ntk_kernel_fn` — the closed form of the same kernel (arc-cosine recursions), NumPy or
  JAX, no TensorFlow; used for fitting and serving. ``tests/models/test_kernels.py`` keeps the two
  equal (≤ 1e-5 relative, depths 1–3).

Closed form, with σ_w, σ_b and d input features, for rows x, y:

    Σ = σ_w² (x·y)/d + σ_b²,  q_x = Σ(x,x),  Θ = Σ
    repeat depth times:
        s = √(q_x q_y),  θ = arccos(clip(Σ/s, −1, 1))   (computed as atan2(s·sin θ, Σ))
        Σ ← σ_w² s (sin θ + (π − θ) cos θ)/(2π) + σ_b²
        Θ ← Σ + σ_w² Θ (π − θ)/(2π)
        q ← σ_w² q/2 + σ_b²
    NTK = Θ
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

KernelFn = Callable[..., Any]


@dataclass(frozen=True)
class NTKConfig:
    """Hyper-parameters of the network whose NTK is ∞-AE's kernel (the width does not matter)."""

    depth: int = 1
    w_std: float = math.sqrt(2.0)
    b_std: float = 0.1

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")


def _xp(array: Any):
    """NumPy for NumPy inputs, jax.numpy for JAX arrays (so one formula serves both)."""
    if isinstance(array, np.ndarray):
        return np
    import jax.numpy as jnp

    return jnp


def accelerated() -> bool:
    """True when JAX's default backend is a GPU/TPU (the big products and solves then run there)."""
    try:
        import jax

        return jax.default_backend() != "cpu"
    except Exception:  # pragma: no cover - jax always importable in the pinned set
        return False


# On an accelerator every new array shape is a new XLA compilation (with GEMM autotuning on
# GPUs: seconds each). Row counts are padded up to a multiple of this, so batches of a fixed size
# and their shorter last batch share one compiled program.
ACCELERATOR_ROW_MULTIPLE = 512


def pad_rows(a: np.ndarray, multiple: int = ACCELERATOR_ROW_MULTIPLE) -> np.ndarray:
    """``a`` with zero rows appended up to a multiple of ``multiple`` rows (itself if none needed)."""
    extra = -a.shape[0] % multiple
    if not extra:
        return a
    return np.concatenate([a, np.zeros((extra,) + a.shape[1:], dtype=a.dtype)])


def row_sq_norms(x: Any) -> np.ndarray:
    """``Σ_j x_ij²`` per row (float32) of a dense array or a SciPy sparse matrix, without an n×m
    temporary.

    Every NumPy caller of :func:`ntk_from_dots` uses this one function, so a support's norms are
    bit-identical wherever they are computed (full scoring, blocked scoring, the fit).
    """
    import scipy.sparse as sp

    if not sp.issparse(x):
        x = np.asarray(x, dtype=np.float32)
        return np.einsum("ij,ij->i", x, x)
    rows = sp.csr_matrix(x)
    sq = np.zeros(rows.shape[0], dtype=np.float32)
    nonempty = np.diff(rows.indptr) > 0
    if rows.nnz:
        sq[nonempty] = np.add.reduceat(rows.data * rows.data, rows.indptr[:-1][nonempty])
    return sq


def ntk_from_dots(
    dots: Any,
    sq_x: Any,
    sq_y: Any,
    n_features: int,
    config: NTKConfig = NTKConfig(),
) -> Any:
    """NTK from the raw dot products ``dots[i, j] = x_i·y_j`` and squared norms of the rows.

    Elementwise, so it serves any block of a larger Gram matrix. NumPy inputs go through one
    jitted, fused XLA computation (≈15× faster than NumPy's temporaries) and come back as NumPy;
    JAX inputs stay JAX (traceable, differentiable).
    """
    if isinstance(dots, np.ndarray):
        fn = _jitted_ntk(int(n_features), config)
        dots = dots.astype(np.float32, copy=False)
        sq_x = np.asarray(sq_x, np.float32)
        sq_y = np.asarray(sq_y, np.float32)
        if accelerated() and dots.shape[0] % ACCELERATOR_ROW_MULTIPLE:
            rows = dots.shape[0]  # padded rows have zero norms: finite (b_std > 0) and cut off
            return np.asarray(fn(pad_rows(dots), pad_rows(sq_x), sq_y))[:rows]
        return np.asarray(fn(dots, sq_x, sq_y))
    return _ntk_from_dots(dots, sq_x, sq_y, n_features, config)


@functools.lru_cache(maxsize=32)
def _jitted_ntk(n_features: int, config: NTKConfig) -> Callable[..., Any]:
    import jax

    return jax.jit(lambda d, a, b: _ntk_from_dots(d, a, b, n_features, config))


def _ntk_from_dots(
    dots: Any,
    sq_x: Any,
    sq_y: Any,
    n_features: int,
    config: NTKConfig = NTKConfig(),
) -> Any:
    """The recursion on JAX arrays (NumPy inputs reach it through :func:`_jitted_ntk`).

    Written as neural-tangents writes its ReLU kernel, ``s·sin θ = √(q_x q_y − Σ²)`` and
    ``θ = atan2(s·sin θ, Σ)`` — the module docstring's recursion without its ``arccos``, whose
    derivative is infinite where ``θ = 0`` (the diagonal of ``k(X, X)``): gradients stay finite,
    which Distill-CF, differentiating through this kernel, needs.
    """
    import jax.numpy as xp

    safe_sqrt = _safe_sqrt()
    w2 = config.w_std**2
    b2 = config.b_std**2
    sigma = dots * (w2 / n_features) + b2
    q_x = sq_x * (w2 / n_features) + b2
    q_y = sq_y * (w2 / n_features) + b2
    theta_ntk = sigma
    inv_2pi = 1.0 / (2.0 * math.pi)
    for _ in range(config.depth):
        root = safe_sqrt(q_x[:, None] * q_y[None, :] - sigma * sigma)  # s · sin θ
        pi_minus = math.pi - xp.arctan2(root, sigma)
        e_relu = (root + pi_minus * sigma) * inv_2pi  # s (sin θ + (π − θ) cos θ) / 2π
        sigma = w2 * e_relu + b2
        theta_ntk = sigma + w2 * theta_ntk * (pi_minus * inv_2pi)
        q_x = w2 * q_x / 2.0 + b2
        q_y = w2 * q_y / 2.0 + b2
    return theta_ntk


def ntk_from_dots_numpy(dots: np.ndarray, sq_x: np.ndarray, sq_y: np.ndarray, n_features: int,
                        config: NTKConfig = NTKConfig()) -> np.ndarray:
    """:func:`ntk_from_dots`'s recursion in NumPy float32, in the calling thread, reusing its
    buffers — for a few rows at a time (the served model): no XLA dispatch, whose hand-off to
    another thread costs more than the arithmetic of a request's row. Equal to the jitted kernel
    up to float32 rounding. ``dots`` is overwritten."""
    w2 = np.float32(config.w_std**2)
    b2 = np.float32(config.b_std**2)
    scale = np.float32(config.w_std**2 / n_features)
    inv_2pi = np.float32(1.0 / (2.0 * math.pi))
    pi = np.float32(math.pi)
    sigma = np.asarray(dots, dtype=np.float32)
    sigma *= scale
    sigma += b2
    q_x = np.asarray(sq_x, dtype=np.float32) * scale + b2
    q_y = np.asarray(sq_y, dtype=np.float32) * scale + b2
    theta = sigma.copy()
    root = np.empty_like(sigma)
    angle = np.empty_like(sigma)
    for _ in range(config.depth):
        np.multiply(q_x[:, None], q_y[None, :], out=root)
        root -= sigma * sigma
        np.maximum(root, 0, out=root)
        np.sqrt(root, out=root)  # s · sin θ
        np.arctan2(root, sigma, out=angle)
        np.subtract(pi, angle, out=angle)  # π − θ
        sigma *= angle
        sigma += root
        sigma *= inv_2pi * w2
        sigma += b2  # w² E[relu] + b²
        theta *= angle
        theta *= inv_2pi * w2
        theta += sigma
        q_x = w2 * q_x / 2 + b2
        q_y = w2 * q_y / 2 + b2
    return theta


# the traceable recursion, for code that differentiates through the kernel (Distill-CF)
ntk_jax = _ntk_from_dots


@functools.lru_cache(maxsize=1)
def _safe_sqrt() -> Callable[[Any], Any]:
    """``√max(x, 0)`` with a zero tangent where ``x`` is (numerically) 0, as neural-tangents'
    ``_sqrt``: for parallel rows d√x/dx is infinite but multiplies an exact 0. Built on first use,
    so importing this module does not import JAX."""
    import jax
    import jax.numpy as jnp

    @jax.custom_jvp
    def safe_sqrt(x: Any) -> Any:
        return jnp.sqrt(jnp.maximum(x, 0.0))

    @safe_sqrt.defjvp
    def safe_sqrt_jvp(primals: tuple[Any], tangents: tuple[Any]) -> tuple[Any, Any]:
        (x,), (t,) = primals, tangents
        root = safe_sqrt(x)
        positive = x > 1e-30
        return root, jnp.where(positive, t / (2.0 * jnp.where(positive, root, 1.0)), 0.0)

    return safe_sqrt


def ntk_kernel_fn(config: NTKConfig = NTKConfig()) -> KernelFn:
    """Closed-form NTK ``kernel_fn(x, y=None)`` → ``k(x, y)`` (``n_x × n_y``), NumPy or JAX.

    With NumPy inputs the dot products run in float32 BLAS; the result is float32.
    """

    def kernel_fn(x: Any, y: Any = None) -> Any:
        xp = _xp(x)
        same = y is None
        y = x if same else y
        if x.shape[1] != y.shape[1]:
            raise ValueError(f"x has {x.shape[1]} features but y has {y.shape[1]}")
        x = x.astype(xp.float32)
        y = y.astype(xp.float32)
        dots = x @ y.T
        sq_x = (x * x).sum(axis=1)
        sq_y = sq_x if same else (y * y).sum(axis=1)
        return ntk_from_dots(dots, sq_x, sq_y, x.shape[1], config)

    return kernel_fn


def stax_kernel_fn(n_items: int, config: NTKConfig = NTKConfig()) -> KernelFn:
    """The kernel as neural-tangents defines it: ``kernel_fn(x, y=None)`` → NTK (JAX array).

    Imports neural-tangents (and with it TensorFlow) on first call of this factory.
    """
    from neural_tangents import stax  # lazy: ≈6 s and ≈1 GB of TensorFlow

    layers = [stax.Flatten()]
    for _ in range(config.depth):
        layers += [
            stax.Dense(n_items, W_std=config.w_std, b_std=config.b_std, parameterization="ntk"),
            stax.Relu(),
        ]
    layers.append(stax.Dense(n_items, W_std=config.w_std, b_std=config.b_std, parameterization="ntk"))
    _, _, nt_kernel_fn = stax.serial(*layers)

    def kernel_fn(x: Any, y: Any = None) -> Any:
        return nt_kernel_fn(x, y, "ntk")

    return kernel_fn
