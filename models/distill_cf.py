"""Distill-CF: learn a small synthetic set of users on which ∞-AE fits as well as on all users.

Sachdeva, Dhaliwal, Wu, McAuley, "Infinite Recommendation Networks: A Data-Centric Approach",
NeurIPS 2022 (arXiv 2206.02626), §4; spec: ``../shared/docs/algorithms.md`` ("Distill-CF").

Learnable logits ``X_raw ∈ ℝ^{μ×m}`` (μ = budget), initialised to μ random users' train rows.
A summary is a multi-Gumbel sample of them, S draws per row at temperature τ:

    F   = Σ_{j=1..S} s_j,   s_j = softmax_row((X_raw + G_j) / τ),   G_j ~ Gumbel(0, 1) i.i.d.
    X_s = hard_tanh(F)      (a soft indicator of the items drawn at least once; in [0, 1])

No gradient flows through the noise, so with ``g = ∂L/∂F``

    ∂L/∂X_raw = (1/τ) Σ_j s_j ⊙ (g − ⟨g, s_j⟩_row) = (1/τ) (g ⊙ F − Σ_j ⟨g, s_j⟩_row s_j),

which :func:`make_multi_gumbel_fn` computes as a ``jax.custom_vjp`` whose forward and backward
passes both ``lax.scan`` over the S draws and re-draw ``G_j`` from its seed: memory O(μ·m)
(plus S·μ softmax normalisers) whatever S is.

Loss, for the targets ``X_t`` (the real users' train rows) and ∞-AE's NTK ``k``:

    K_ss = k(X_s, X_s),  λ̃ = λ · tr(K_ss) / μ,  P = k(X_t, X_s) (K_ss + λ̃ I)⁻¹ X_s   (Cholesky)
    L = mean_u(−Σ_i X_t[u,i] · log_softmax(P[u])_i) + c · mean_r(Σ_i X_s[r,i]) / (N / n_users)

(N = train interactions, c = cardinality regulariser), with λ the best λ of the latest
evaluation. Adam; a fresh noise key every step; every scheduled evaluation fits ∞-AE on a fresh
sample of the current logits (:func:`models.infinite_ae.fit_select`, λ grid, validation
``select_metric``, any of :data:`models.metrics.METRIC_KEYS`), keeps the best summary by that
metric over every evaluation including step 0 (the initial real users) and stops after
``patience`` steps without improvement on it.

Speed on CPU. A step (μ = 500, S = 200, m = 3,706, all 6,040 users as targets) is ≈ 740 M noise
draws (S·μ·m forward, again backward) plus five 6,040 × 3,706 × 500 matrix products. What makes
it ≈ 3× faster than the reference (same quantities computed, float32 throughout):

* the Gumbel noise comes from a counter-based hash (two rounds of a 32-bit integer mixer keyed by
  64 bits per draw that ``jax.random`` derives from the step key): ≈ 0.3 ns of CPU per number
  against ≈ 5 ns for ``jax.random``'s threefry here ("rbg"/"unsafe_rbg" are no faster on XLA:CPU).
  ``noise="jax"`` keeps ``jax.random.uniform`` for comparison;
* ``exp(G/τ) = (−ln u)^(−1/τ)`` times ``exp((x − max x)/τ)`` computed once per pass: no per-draw
  row max, one exp and two polynomial logs per number (:func:`frechet_noise`);
* one jitted step (loss, gradient, Adam), compiled for 512-bit vectors where the CPU has them
  (:func:`compiler_options`), a one-pass softmax cross-entropy gradient
  (:func:`softmax_cross_entropy`), the m-wide half of the Cholesky solve as matrix products
  (:func:`cholesky_solve`) and OpenBLAS held to one thread during a step
  (:func:`single_threaded_blas`).

Pure: no file I/O, no Prefect or MLflow; callers log through ``on_step``.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from jax import lax

from models.infinite_ae import SUMMARY_LAMBDAS, EvalSet, check_select_metric, fit_select
from models.kernels import NTKConfig
from models.kernels import ntk_jax as ntk_fn  # the NTK, with gradients finite on the diagonal
from models.samplers import random_user_indices, rows_of

NOISE_KINDS = ("hash", "jax")
DEFAULT_EVAL_STEPS: tuple[int, ...] = (25, 50, 75, 100, 125, 150, 175, 200)


@dataclass(frozen=True)
class DistillConfig:
    """Hyper-parameters of Distill-CF (defaults: the paper's, for ML-1M)."""

    budget: int = 500  # μ, synthetic users
    samples: int = 200  # S, Gumbel draws per synthetic user
    tau: float = 10.0  # Gumbel-softmax temperature
    lr: float = 0.04  # Adam learning rate
    max_steps: int = 500
    reg: float = 1e-3  # c, cardinality regulariser
    patience: int = 150  # stop after this many steps since the best evaluation (step 0 included)
    min_steps: int = 0  # no early stop before this step (the first evaluations are noisy)
    seed: int = 0
    eval_steps: tuple[int, ...] = DEFAULT_EVAL_STEPS  # evaluate at these steps ...
    eval_every: int = 40  # ... and at every multiple of this
    lambdas: tuple[float, ...] = SUMMARY_LAMBDAS
    select_metric: str = "hr@100"  # picks each evaluation's λ, the best step and the early stop
    target_batch: int | None = None  # real users per step (None: all users with train rows)
    noise: str = "hash"  # "hash" (fast counter-based) or "jax" (jax.random.uniform, threefry)
    kernel: NTKConfig = field(default_factory=NTKConfig)

    def __post_init__(self) -> None:
        if (self.budget < 1 or self.samples < 1 or self.max_steps < 0 or self.patience < 1
                or self.min_steps < 0):
            raise ValueError("budget, samples and patience must be >= 1, max_steps and min_steps >= 0")
        if not self.tau > 0 or not self.lr > 0 or self.reg < 0 or self.eval_every < 1:
            raise ValueError("tau and lr must be > 0, reg >= 0, eval_every >= 1")
        if self.noise not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {NOISE_KINDS}, got {self.noise!r}")
        if not self.lambdas:
            raise ValueError("the λ grid is empty")
        check_select_metric(self.select_metric)

    def is_eval_step(self, step: int) -> bool:
        return step in self.eval_steps or step % self.eval_every == 0


@dataclass
class DistillResult:
    """The best summary found and how the run went."""

    summary: np.ndarray  # μ × m float32 in [0, 1] (the initial users' binary rows if best_step 0)
    best_step: int  # the evaluation kept (0: no later one beat the initial users on validation)
    best_lambda: float
    best_val: dict[str, float]  # validation metrics of ∞-AE on the summary at best_lambda
    init_val: dict[str, float]  # the same for the random users the logits started from
    init_users: np.ndarray  # indices of those users
    history: list[dict[str, Any]]  # one record per step (step 0: the initial evaluation)
    steps_run: int
    seconds_per_step: float  # median wall time of a training step (the first, compiling, excluded)
    config: DistillConfig


# -- noise -----------------------------------------------------------------------------------
def _mix32(v: jax.Array) -> jax.Array:
    """Wellons' "lowbias32": a bijection of uint32 with near-ideal avalanche."""
    v = v ^ lax.shift_right_logical(v, jnp.uint32(16))
    v = v * jnp.uint32(0x7FEB352D)
    v = v ^ lax.shift_right_logical(v, jnp.uint32(15))
    v = v * jnp.uint32(0x846CA68B)
    return v ^ lax.shift_right_logical(v, jnp.uint32(16))


def hash_uniform(seed_pair: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """Uniform(0, 1) float32 draws for a ``shape`` matrix, keyed by two uint32 words ``k0, k1``.

    Element ``(r, i)`` is ``(h + ½) / 2^23`` with ``h`` the top 23 bits of
    ``mix(mix((r·m + i) ⊕ k0) ⊕ k1)``. Exact in float32 and never 0 or 1, so ``−log(−log u)`` is
    finite (24 bits would round ``(2^24 − ½)/2^24`` up to 1). One round instead of two is 8%
    faster but shows structure in adjacent pairs (χ² p-values skewed); two rounds do not.
    """
    if shape[0] * shape[1] >= 2**32:
        raise ValueError(f"{shape[0]} × {shape[1]} draws overflow the 32-bit noise counter")
    rows = lax.broadcasted_iota(jnp.uint32, shape, 0)
    cols = lax.broadcasted_iota(jnp.uint32, shape, 1)
    bits = _mix32(_mix32((rows * jnp.uint32(shape[1]) + cols) ^ seed_pair[0]) ^ seed_pair[1])
    top = lax.shift_right_logical(bits, jnp.uint32(9)).astype(jnp.float32)
    return (top + 0.5) * (1.0 / 8388608.0)


def jax_uniform(seed_pair: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """Uniform(0, 1) float32 draws from ``jax.random`` (threefry key data ``seed_pair``)."""
    key = jax.random.wrap_key_data(seed_pair, impl="threefry2x32")
    return jax.random.uniform(key, shape, jnp.float32, minval=jnp.finfo(jnp.float32).tiny)


_UNIFORM_FNS = {"hash": hash_uniform, "jax": jax_uniform}


# The noise transform needs two logs per draw and element: a polynomial log specialised to positive
# normal float32 inputs is cheaper than XLA's general one. log(1 + f) = f − f²/2 + f³·Q(f) on
# [√½ − 1, √2 − 1], Q of degree 5 (weighted least squares, Lawson-refined): ≤ 3.4e-7 relative,
# which moves (−ln u)^(−1/τ) by ≤ 3.4e-7/τ relative (float32 rounding is 6e-8).
_LOG_POLY = (-0.1007217988371849, 0.15988348424434662, -0.17154543101787567,
             0.19928044080734253, -0.24982571601867676, 0.3333420753479004)


def _log_positive(x: jax.Array) -> jax.Array:
    """Natural log of positive normal float32: ``x = 2^k · z``, ``z ∈ [√½, √2)``, then a polynomial.

    The split is musl's ``logf``: subtracting the bits of √½ moves the exponent boundary to √½, so
    ``k`` is an arithmetic shift and ``z`` the remaining bits (no compare or select); ``z − 1`` is
    exact.
    """
    bits = lax.bitcast_convert_type(x, jnp.int32)
    offset = bits - 0x3F3504F3  # bits of √½
    exponent = lax.shift_right_arithmetic(offset, 23).astype(jnp.float32)
    f = lax.bitcast_convert_type(bits - (offset & -8388608), jnp.float32) - 1.0  # & 0xFF800000
    z = f * f
    poly = jnp.float32(_LOG_POLY[0])
    for c in _LOG_POLY[1:]:
        poly = poly * f + c
    return f + (poly * f * z - 0.5 * z) + exponent * 0.69314718055994531


def frechet_noise(u: jax.Array, tau: float) -> jax.Array:
    """``exp(G/τ) = (−ln u)^(−1/τ)`` for Gumbel ``G = −ln(−ln u)``, ``u ∈ (0, 1)``."""
    exponential = -_log_positive(u)  # Exp(1), in [6e-8, 16.7] for our u
    # XLA's exp, not a polynomial: XLA then rates the draw as costly and stores it once instead
    # of recomputing the noise inside each of its consumers (the backward pass has two)
    return jnp.exp(_log_positive(exponential) * (-1.0 / float(tau)))


def draw_seeds(key: jax.Array, samples: int, noise: str = "hash") -> jax.Array:
    """``samples × 2`` uint32 seeds, one pair per Gumbel draw, from a ``jax.random`` key."""
    if noise == "jax":
        return jax.random.key_data(jax.random.split(jax.random.wrap_key_data(
            jax.random.key_data(key), impl="threefry2x32"), samples))
    return jax.random.bits(key, (samples, 2), jnp.uint32)


def gumbel_noise(seed_pair: jax.Array, shape: tuple[int, int], noise: str = "hash") -> jax.Array:
    """Standard Gumbel noise ``G = −log(−log u)`` of one draw."""
    return -jnp.log(-jnp.log(_UNIFORM_FNS[noise](seed_pair, shape)))


# -- multi-Gumbel sampling -------------------------------------------------------------------
def make_multi_gumbel_fn(tau: float, noise: str = "hash") -> Callable[..., jax.Array]:
    """``multi_gumbel_fn(x_raw, seeds) = Σ_j softmax_row((x_raw + G_j)/τ)``, O(μm) memory.

    ``seeds``: ``S × 2`` uint32, one pair per draw (see :func:`draw_seeds`); both passes scan over
    them and re-draw each ``G_j``. The forward pass keeps the S·μ softmax normalisers so that the
    backward pass needs one row reduction per draw instead of two.
    """
    uniform_fn = _UNIFORM_FNS[noise]
    inv_tau = 1.0 / float(tau)

    def logit_weights(x_raw: jax.Array) -> jax.Array:
        # exp((x − max x)/τ): softmax is shift-invariant, and ≤ 1 so nothing overflows
        return jnp.exp((x_raw - jnp.max(x_raw, axis=1, keepdims=True)) * inv_tau)

    def noise_fn(seed_pair: jax.Array, shape: tuple[int, int]) -> jax.Array:
        # exp(G/τ) = (−ln u)^(−1/τ); a draw's unnormalised softmax is base · noise
        return frechet_noise(uniform_fn(seed_pair, shape), tau)

    def forward(x_raw: jax.Array, seeds: jax.Array) -> tuple[jax.Array, jax.Array]:
        base = logit_weights(x_raw)

        def body(total: jax.Array, seed_pair: jax.Array) -> tuple[jax.Array, jax.Array]:
            w = base * noise_fn(seed_pair, base.shape)
            inv_norm = 1.0 / jnp.sum(w, axis=1)
            return total + w * inv_norm[:, None], inv_norm

        return lax.scan(body, jnp.zeros_like(x_raw), seeds)

    @jax.custom_vjp
    def multi_gumbel_fn(x_raw: jax.Array, seeds: jax.Array) -> jax.Array:
        return forward(x_raw, seeds)[0]

    def fwd(x_raw: jax.Array, seeds: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        total, inv_norms = forward(x_raw, seeds)
        return total, (x_raw, seeds, total, inv_norms)

    def bwd(res: tuple[jax.Array, ...], g: jax.Array) -> tuple[jax.Array, None]:
        # Σ_j ⟨g, s_j⟩ s_j with s_j = base · n_j / r_j  =  base · Σ_j (⟨g·base, n_j⟩ / r_j²) n_j:
        # per draw one product-and-sum and one multiply-add on the noise n_j alone
        x_raw, seeds, total, inv_norms = res
        base = logit_weights(x_raw)
        g_base = g * base

        def body(acc: jax.Array, draw: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
            seed_pair, inv_norm = draw
            n = noise_fn(seed_pair, base.shape)
            coef = jnp.sum(g_base * n, axis=1) * (inv_norm * inv_norm)
            return acc + n * coef[:, None], None

        acc = lax.scan(body, jnp.zeros_like(x_raw), (seeds, inv_norms))[0]
        return (g * total - base * acc) * inv_tau, None

    multi_gumbel_fn.defvjp(fwd, bwd)
    return multi_gumbel_fn


def naive_multi_gumbel(x_raw: jax.Array, seeds: jax.Array, tau: float,
                       noise: str = "hash") -> jax.Array:
    """The same sum with all S softmax copies materialised (plain autodiff; for tests only)."""

    def one(seed_pair: jax.Array) -> jax.Array:
        return jax.nn.softmax((x_raw + gumbel_noise(seed_pair, x_raw.shape, noise)) / tau, axis=-1)

    return jnp.sum(jax.vmap(one)(seeds), axis=0)


def cholesky_solve(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a⁻¹ b`` for symmetric positive definite ``a`` (μ × μ) and wide ``b`` (μ × m), by Cholesky.

    ``a = L Lᵀ``; ``L⁻¹`` comes from one triangular solve with μ right-hand sides, then
    ``a⁻¹ b = L⁻ᵀ (L⁻¹ b)`` is two matrix products. Same result as a two-sided triangular solve
    with m right-hand sides (≤ 1e-5 relative), but the m-wide work runs as XLA matmuls on every
    core instead of one LAPACK ``trsm`` (0.04–0.33 s here, erratic when OpenBLAS threads compete).
    """
    factor = jnp.linalg.cholesky(a)
    identity = jnp.eye(a.shape[0], dtype=a.dtype)
    inv_factor = lax.linalg.triangular_solve(factor, identity, left_side=True, lower=True)
    highest = lax.Precision.HIGHEST  # full float32 on GPUs too (not TF32), wherever it is called
    return jnp.matmul(inv_factor.T, jnp.matmul(inv_factor, b, precision=highest), precision=highest)


@jax.custom_vjp
def softmax_cross_entropy(logits: jax.Array, targets: jax.Array, counts: jax.Array) -> jax.Array:
    """``mean_u(−Σ_i targets[u,i] · log_softmax(logits[u])_i)``, ``counts = Σ_i targets[u,i]``.

    Written as ``mean_u(counts_u · lse(logits_u) − Σ_i targets_ui logits_ui)`` with the gradient
    ``(counts_u · softmax(logits_u) − targets_u) / n`` in one pass (no gradient to the targets):
    autodiff of ``log_softmax`` makes several more passes over the n × m logits.
    """
    return _cross_entropy_fwd(logits, targets, counts)[0]


def _cross_entropy_fwd(logits: jax.Array, targets: jax.Array, counts: jax.Array
                       ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    peak = jnp.max(logits, axis=1)
    lse = peak + jnp.log(jnp.sum(jnp.exp(logits - peak[:, None]), axis=1))
    loss = jnp.mean(counts * lse - jnp.sum(targets * logits, axis=1))
    return loss, (logits, targets, counts, lse)


def _cross_entropy_bwd(res: tuple[jax.Array, ...], g: jax.Array) -> tuple[jax.Array, None, None]:
    logits, targets, counts, lse = res
    scale = g / logits.shape[0]
    return scale * (counts[:, None] * jnp.exp(logits - lse[:, None]) - targets), None, None


softmax_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


# -- loss and step -------------------------------------------------------------------------------
def make_loss_fn(
    n_items: int, cardinality_norm: float, config: DistillConfig = DistillConfig()
) -> tuple[Callable[..., jax.Array], Callable[[jax.Array, jax.Array], jax.Array]]:
    """``(loss_fn, sample_fn)`` for a data set with ``n_items`` items.

    ``sample_fn(x_raw, seeds) = hard_tanh(Σ_j softmax_row((x_raw + G_j)/τ))``;
    ``loss_fn(x_raw, seeds, lam, targets, targets_sq, target_counts=None)`` is L above
    (``targets_sq``, ``target_counts``: the targets' squared norms and row sums, computed once; the
    same for binary targets). ``cardinality_norm = N / n_users``.
    """
    multi_gumbel_fn = make_multi_gumbel_fn(config.tau, config.noise)
    kernel = config.kernel

    def sample_fn(x_raw: jax.Array, seeds: jax.Array) -> jax.Array:
        return jax.nn.hard_tanh(multi_gumbel_fn(x_raw, seeds))

    def loss_fn(x_raw: jax.Array, seeds: jax.Array, lam: jax.Array, targets: jax.Array,
                targets_sq: jax.Array, target_counts: jax.Array | None = None) -> jax.Array:
        if target_counts is None:
            target_counts = jnp.sum(targets, axis=1)
        support = sample_fn(x_raw, seeds)
        budget = support.shape[0]
        sq_s = jnp.sum(support * support, axis=1)
        k_ss = ntk_fn(support @ support.T, sq_s, sq_s, n_items, kernel)
        k_ts = ntk_fn(targets @ support.T, targets_sq, sq_s, n_items, kernel)
        lam_scaled = jnp.abs(lam) * jnp.trace(k_ss) / budget
        alpha = cholesky_solve(k_ss + lam_scaled * jnp.eye(budget, dtype=k_ss.dtype), support)
        logits = k_ts @ alpha
        cross_entropy = softmax_cross_entropy(logits, targets, target_counts)
        cardinality = jnp.mean(jnp.sum(support, axis=-1)) / cardinality_norm
        return cross_entropy + config.reg * cardinality

    return loss_fn, sample_fn


class AdamState(NamedTuple):
    params: jax.Array
    mu: jax.Array  # first moment
    nu: jax.Array  # second moment
    count: jax.Array  # updates done


def adam_init(params: jax.Array) -> AdamState:
    zeros = jnp.zeros_like(params)
    return AdamState(params, zeros, zeros, jnp.zeros((), jnp.int32))


def adam_update(state: AdamState, grad: jax.Array, lr: float, b1: float = 0.9, b2: float = 0.999,
                eps: float = 1e-8) -> AdamState:
    """One Adam step (Kingma & Ba 2015, bias-corrected moments)."""
    count = state.count + 1
    mu = b1 * state.mu + (1.0 - b1) * grad
    nu = b2 * state.nu + (1.0 - b2) * grad * grad
    t = count.astype(jnp.float32)
    mu_hat = mu / (1.0 - b1**t)
    nu_hat = nu / (1.0 - b2**t)
    return AdamState(state.params - lr * mu_hat / (jnp.sqrt(nu_hat) + eps), mu, nu, count)


def compiler_options() -> dict[str, Any]:
    """XLA options for the jitted step on CPU: 512-bit vectors where the CPU has them.

    LLVM tunes recent Intel CPUs to prefer 256-bit vectors; the noise transform is pure vector
    arithmetic, 1.25× faster at 512 bits on this machine's Xeon (fwd + bwd 2.7 s CPU against
    3.4 s). CPUs without AVX-512 just keep their widest vectors.
    """
    return {"xla_cpu_prefer_vector_width": 512} if jax.default_backend() == "cpu" else {}


def make_step_fn(n_items: int, cardinality_norm: float, config: DistillConfig = DistillConfig()
                 ) -> tuple[Callable[..., tuple[AdamState, jax.Array]], Callable[..., jax.Array]]:
    """``(step_fn, sample_fn)``, both jitted.

    ``step_fn(state, key, lam, targets, targets_sq) -> (state, loss)``: draws the step's seeds from
    ``key``, evaluates L and its gradient, and applies Adam, in one XLA computation.
    ``sample_fn(x_raw, key)``: a summary ``X_s`` (μ × m) drawn with ``key``.
    """
    loss_fn, sample_fn = make_loss_fn(n_items, cardinality_norm, config)
    value_and_grad_fn = jax.value_and_grad(loss_fn)

    # full float32 products on GPUs too (XLA's default there is TF32, 10-bit mantissas), so a
    # summary does not depend on the accelerator; CPUs compute float32 either way
    def step_fn(state: AdamState, key: jax.Array, lam: jax.Array, targets: jax.Array,
                targets_sq: jax.Array) -> tuple[AdamState, jax.Array]:
        with jax.default_matmul_precision("float32"):
            seeds = draw_seeds(key, config.samples, config.noise)
            loss, grad = value_and_grad_fn(state.params, seeds, lam, targets, targets_sq, targets_sq)
            return adam_update(state, grad, config.lr), loss

    def sample_with_key(x_raw: jax.Array, key: jax.Array) -> jax.Array:
        with jax.default_matmul_precision("float32"):
            return sample_fn(x_raw, draw_seeds(key, config.samples, config.noise))

    options = compiler_options()
    return (jax.jit(step_fn, compiler_options=options),
            jax.jit(sample_with_key, compiler_options=options))


def single_threaded_blas() -> contextlib.AbstractContextManager[Any]:
    """Limit OpenBLAS to one thread while a step runs (a no-op without ``threadpoolctl``).

    The step's small LAPACK calls (Cholesky, triangular inverse) go through SciPy's OpenBLAS,
    whose spinning threads compete with XLA's own: 2–70 ms per call on 2 cores, ≈ 0.1 s a step.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is in the pinned set
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


# -- the training loop ---------------------------------------------------------------------------
def _validate(support: np.ndarray, val: EvalSet, config: DistillConfig
              ) -> tuple[float, dict[str, float], list[tuple[float, float]]]:
    """∞-AE on ``support``, λ chosen on validation ``config.select_metric``.

    Returns ``(best λ, its validation metrics, [(λ, value of the selection metric)] for the grid)``
    (value None for a λ skipped because ``K + λ̃I`` could not be made definite).
    Only the kept λ needs every metric: the others are ranked for the selection metric alone.
    """
    metric = config.select_metric
    model, path = fit_select(support, val, config.lambdas, config.kernel,
                             select_metric=metric, path_metrics=(metric,))
    best = next(p for p in path if p.lam == model.lam)
    return model.lam, best.val, [(p.lam, p.val.get(metric)) for p in path]


def distill(
    train: Any,
    val: EvalSet,
    config: DistillConfig = DistillConfig(),
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> DistillResult:
    """Run Distill-CF on the ``train`` matrix (users × items, binary), validating on ``val``.

    ``val`` is the validation set of the same users (context = train rows, targets = validation
    items): each evaluation fits ∞-AE on a summary (λ re-chosen on the grid by
    ``config.select_metric``) and scores every user from their train row.

    Step 0 — the binary rows of the ``budget`` random real users the logits start from — is an
    evaluation like the others: the summary returned is the best of all evaluations by the
    selection metric (ties keep the earliest), so it is never worse on validation than that
    start (``best_step`` 0 then, and the summary is those rows). Patience counts steps since the
    best evaluation: the run stops at the first evaluation that does not improve on the best
    when at least ``patience`` steps separate them. The last step is always evaluated.

    ``on_step(info)`` is called after step 0 and after every step with ``step, loss, seconds,
    evaluated, select_metric, val_<metric>`` (this step's value, or None), ``last_val_<metric>``,
    ``best_val_<metric>``, ``best_step``, ``lambda`` and, at evaluated steps, ``val`` (all
    validation metrics at the kept λ), ``lambda_path`` (``[λ, value]`` of the selection metric
    for the whole grid) and ``eval_seconds``. ``<metric>`` is ``config.select_metric``.
    """
    train = sp.csr_matrix(train, dtype=np.float32, copy=True)
    train.data[:] = 1.0  # implicit feedback: binary (on our copy)
    n_users, n_items = train.shape
    if config.budget * n_items >= 2**32:
        raise ValueError("budget × items must stay below 2^32 (the noise counter is 32-bit)")
    metric = check_select_metric(config.select_metric, val)
    counts = np.diff(train.indptr)
    active = np.flatnonzero(counts > 0)
    cardinality_norm = float(train.nnz) / n_users
    key_name = f"val_{metric}"

    init_users = random_user_indices(train, config.budget, config.seed)
    init_rows = rows_of(train, init_users)
    step_fn, sample_fn = make_step_fn(n_items, cardinality_norm, config)

    batch = config.target_batch
    if not batch or batch >= len(active):
        batch = None
    batch_rng = np.random.default_rng([config.seed, 2])
    if batch is None:
        targets = jnp.asarray(rows_of(train, active))
        targets_sq = jnp.asarray(counts[active].astype(np.float32))

    root = jax.random.key(config.seed)
    train_root, eval_root = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)

    start = time.perf_counter()
    lam, init_val, lam_path = _validate(init_rows, val, config)
    # the best evaluation so far: (value, step, summary, λ, validation metrics); step 0 included
    best: tuple[float, int, np.ndarray, float, dict[str, float]] = (
        init_val[metric], 0, init_rows, lam, init_val)
    history: list[dict[str, Any]] = []
    record: dict[str, Any] = {"step": 0, "loss": None, "seconds": 0.0, "evaluated": True,
                              "select_metric": metric, key_name: init_val[metric],
                              f"last_{key_name}": init_val[metric],
                              f"best_{key_name}": init_val[metric], "best_step": 0,
                              "lambda": lam, "val": init_val, "lambda_path": lam_path,
                              "eval_seconds": time.perf_counter() - start}
    history.append(record)
    if on_step is not None:
        on_step(dict(record))

    state = adam_init(jnp.asarray(init_rows))
    last_value = init_val[metric]
    step_seconds: list[float] = []
    steps_run = 0
    for step in range(1, config.max_steps + 1):
        if batch is not None:
            rows = np.sort(batch_rng.choice(active, size=batch, replace=False))
            targets = jnp.asarray(rows_of(train, rows))
            targets_sq = jnp.asarray(counts[rows].astype(np.float32))
        start = time.perf_counter()
        with single_threaded_blas():
            step_key = jax.random.fold_in(train_root, step)
            state, loss = step_fn(state, step_key, jnp.float32(lam), targets, targets_sq)
            loss_value = float(loss)  # blocks until the step is done
        seconds = time.perf_counter() - start
        step_seconds.append(seconds)
        steps_run = step
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"Distill-CF loss is {loss_value} at step {step}")

        record = {"step": step, "loss": loss_value, "seconds": seconds, "evaluated": False,
                  "select_metric": metric, key_name: None, "lambda": lam}
        stop = False
        if config.is_eval_step(step) or step == config.max_steps:
            start = time.perf_counter()
            summary = np.asarray(sample_fn(state.params, jax.random.fold_in(eval_root, step)))
            lam, val_metrics, lam_path = _validate(summary, val, config)
            last_value = val_metrics[metric]
            record.update({"evaluated": True, key_name: last_value, "lambda": lam,
                           "val": val_metrics, "lambda_path": lam_path,
                           "eval_seconds": time.perf_counter() - start})
            if last_value > best[0]:
                best = (last_value, step, summary, lam, val_metrics)
            elif step >= config.min_steps and step - best[1] >= config.patience:
                stop = True
        record.update({f"last_{key_name}": last_value, f"best_{key_name}": best[0],
                       "best_step": best[1]})
        history.append(record)
        if on_step is not None:
            on_step(dict(record))
        if stop:
            break

    timed = step_seconds[1:] or step_seconds
    return DistillResult(
        summary=np.clip(best[2], 0.0, 1.0).astype(np.float32),
        best_step=best[1],
        best_lambda=best[3],
        best_val=best[4],
        init_val=init_val,
        init_users=init_users,
        history=history,
        steps_run=steps_run,
        seconds_per_step=float(np.median(timed)) if timed else float("nan"),
        config=config,
    )


__all__ = [
    "DistillConfig", "DistillResult", "distill", "make_multi_gumbel_fn", "naive_multi_gumbel",
    "make_loss_fn", "make_step_fn", "ntk_fn", "hash_uniform", "jax_uniform", "draw_seeds",
    "gumbel_noise", "frechet_noise", "softmax_cross_entropy", "cholesky_solve", "adam_init",
    "adam_update", "AdamState", "compiler_options", "single_threaded_blas",
]
