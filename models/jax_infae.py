"""∞-AE fitted, scored, ranked and evaluated on the JAX device: the accelerator path.

The same model as :mod:`models.infinite_ae` (kernel once per support, one Cholesky solve per λ,
λ chosen on validation, test metrics), with every step on the device and one compiled program
per step, whatever the λ or the batch:

* ``K = k(X, X)`` and ``α = (K + λ̃I)⁻¹X`` are jitted on the support's shape; λ̃ is an argument
  (λ̃ = λ · trace(K)/n from K's diagonal summed in float64 on the host, as NumPy does);
* validation and test score **padded user batches of a fixed size**: histories travel as
  fixed-capacity coordinate lists and are densified on the device, the kernel row block, the
  score product (full float32, ``Precision.HIGHEST``) and the ranking and metrics
  (:mod:`models.jax_ranking`) run in one jitted function; only metric sums come back;
* when the validation users are the support users themselves, their scores ``X − λ̃α`` are a
  dynamic slice of the padded support (one program for every batch);
* a λ whose float32 Cholesky is not finite is solved by the host's stabilising ladder
  (:func:`models.infinite_ae.solve_alpha_info`) and uploaded.

No jitted function closes over a data set: supports, α, histories and targets are arguments.
Figures equal the NumPy path's to float32 rounding (the products are summed in another order, so
near-ties may rank differently); the NumPy path stays the default on CPU.

Pure: no file I/O, no Prefect or MLflow; imports only JAX, NumPy, SciPy and :mod:`models`.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from jax import lax

from models.infinite_ae import (FULL_DATA_LAMBDAS, EvalSet, InfAE, LambdaGridError, LambdaResult,
                                SkippedLambdaWarning, UnstableLambdaError, _dense32,
                                _solve_recording, check_select_metric, evaluation_plan)
from models.jax_ranking import (TRACES, DeviceAccumulator, DeviceEvalSet, batch_metric_sums,
                                finish, top_k_exact)
from models.kernels import NTKConfig, ntk_jax

HIGHEST = lax.Precision.HIGHEST
DEFAULT_BATCH = 2048


# -- jitted steps (module level: one cache for every caller) -----------------------------------
@functools.partial(jax.jit, static_argnums=(1,))
def _kernel(x: jax.Array, config: NTKConfig) -> jax.Array:
    TRACES["kernel"] += 1
    sq = jnp.sum(x * x, axis=1)
    return ntk_jax(jnp.matmul(x, x.T, precision=HIGHEST), sq, sq, x.shape[1], config)


@jax.jit
def _solve(kernel: jax.Array, x: jax.Array, lam_scaled: jax.Array) -> tuple[jax.Array, jax.Array]:
    TRACES["solve"] += 1
    # full float32 also where XLA expands the triangular solves into blocked products (GPUs
    # default to TF32 there)
    with jax.default_matmul_precision("float32"):
        a = kernel + lam_scaled * jnp.eye(kernel.shape[0], dtype=kernel.dtype)
        factor = jax.scipy.linalg.cho_factor(a, lower=True)
        alpha = jax.scipy.linalg.cho_solve(factor, x)
    return alpha, jnp.all(jnp.isfinite(alpha))


def _densify(rows: jax.Array, cols: jax.Array, vals: jax.Array, b: int, m: int) -> jax.Array:
    return jnp.zeros((b, m), jnp.float32).at[rows, cols].add(vals, mode="drop")


def _cross_scores(support: jax.Array, support_sq: jax.Array, alpha: jax.Array, h: jax.Array,
                  config: NTKConfig) -> jax.Array:
    dots = jnp.matmul(h, support.T, precision=HIGHEST)
    kernel = ntk_jax(dots, jnp.sum(h * h, axis=1), support_sq, h.shape[1], config)
    return jnp.matmul(kernel, alpha, precision=HIGHEST)


@functools.partial(jax.jit, static_argnames=("config", "ks", "sort", "auc"))
def _cross_metrics(support: jax.Array, support_sq: jax.Array, alpha: jax.Array,
                   arrays: dict[str, jax.Array], weights: jax.Array, *, config: NTKConfig,
                   ks: tuple[int, ...], sort: bool, auc: bool) -> dict[str, jax.Array]:
    """Scores of a padded history batch ``k(H, X) α`` and their metric sums, in one program."""
    TRACES["cross_metrics"] += 1
    b, m = arrays["p"].shape[0], support.shape[1]
    h = _densify(arrays["context_rows"], arrays["context_cols"], arrays["context_vals"], b, m)
    scores = _cross_scores(support, support_sq, alpha, h, config)
    return batch_metric_sums(scores, arrays, weights, ks=ks, sort=sort, auc=auc)


@functools.partial(jax.jit, static_argnames=("config",))
def _cross_kernel(support: jax.Array, support_sq: jax.Array, arrays: dict[str, jax.Array], *,
                  config: NTKConfig) -> jax.Array:
    """``k(H, X)`` of a padded history batch (b × n): reused by every λ of a grid."""
    TRACES["cross_kernel"] += 1
    b, m = arrays["p"].shape[0], support.shape[1]
    h = _densify(arrays["context_rows"], arrays["context_cols"], arrays["context_vals"], b, m)
    dots = jnp.matmul(h, support.T, precision=HIGHEST)
    return ntk_jax(dots, jnp.sum(h * h, axis=1), support_sq, m, config)


@functools.partial(jax.jit, static_argnames=("ks", "sort", "auc"))
def _kernel_metrics(kernel: jax.Array, alpha: jax.Array, arrays: dict[str, jax.Array],
                    weights: jax.Array, *, ks: tuple[int, ...], sort: bool,
                    auc: bool) -> dict[str, jax.Array]:
    """Scores ``k(H, X) α`` from a kept kernel block, and their metric sums."""
    TRACES["kernel_metrics"] += 1
    scores = jnp.matmul(kernel, alpha, precision=HIGHEST)
    return batch_metric_sums(scores, arrays, weights, ks=ks, sort=sort, auc=auc)


_HISTORY_KEYS = ("p", "context_rows", "context_cols", "context_vals")
# k(H, X) of a λ grid's validation users is kept on the device up to this size (as the NumPy path)
CROSS_CACHE_BYTES = 512 * 2**20


@functools.partial(jax.jit, static_argnames=("ks", "sort", "auc"))
def _support_metrics(x_pad: jax.Array, alpha_pad: jax.Array, lam_scaled: jax.Array,
                     start: jax.Array, arrays: dict[str, jax.Array], weights: jax.Array, *,
                     ks: tuple[int, ...], sort: bool, auc: bool) -> dict[str, jax.Array]:
    """Scores ``X − λ̃α`` of support rows ``start …`` (the validation users are the support) and
    their metric sums; ``alpha_pad`` zeros and λ̃ = 0 give ``X`` itself (λ = 0, no solve)."""
    TRACES["support_metrics"] += 1
    b = arrays["p"].shape[0]
    rows = lax.dynamic_slice_in_dim(x_pad, start, b, axis=0)
    alpha = lax.dynamic_slice_in_dim(alpha_pad, start, b, axis=0)
    return batch_metric_sums(rows - lam_scaled * alpha, arrays, weights, ks=ks, sort=sort, auc=auc)


@functools.partial(jax.jit, static_argnames=("n_rows", "config", "k"))
def _top_k_batch(support: jax.Array, support_sq: jax.Array, alpha: jax.Array, rows: jax.Array,
                 cols: jax.Array, vals: jax.Array, *, n_rows: int, config: NTKConfig,
                 k: int) -> tuple[jax.Array, jax.Array]:
    """Top-``k`` unseen items of a padded history batch (coordinates), and their scores."""
    TRACES["top_k"] += 1
    m = support.shape[1]
    h = _densify(rows, cols, vals, n_rows, m)
    scores = _cross_scores(support, support_sq, alpha, h, config)
    masked = scores.at[rows, cols].set(-jnp.inf, mode="drop")
    items = top_k_exact(masked, k)
    return items, jnp.take_along_axis(jnp.where(jnp.isnan(masked), -jnp.inf, masked), items, axis=1)


# -- the model on the device --------------------------------------------------------------------
@dataclass
class DeviceInfAE:
    """A fitted ∞-AE whose support and α live on the device."""

    support: jax.Array  # n × m
    alpha: jax.Array  # n × m
    lam: float
    lam_scaled: float
    config: NTKConfig = NTKConfig()

    @functools.cached_property
    def support_sq(self) -> jax.Array:
        return jnp.sum(self.support * self.support, axis=1)

    def to_host(self) -> InfAE:
        """The same model as a NumPy :class:`models.infinite_ae.InfAE`."""
        return InfAE(support=np.asarray(self.support), alpha=np.asarray(self.alpha), lam=self.lam,
                     lam_scaled=self.lam_scaled, config=self.config)

    def evaluate(self, data: EvalSet | DeviceEvalSet, *, batch: int = DEFAULT_BATCH,
                 metrics: Iterable[str] | None = None, stats: dict[str, Any] | None = None,
                 k_max: int = 100) -> dict[str, float]:
        """Metrics of the model on ``data`` (histories = ``data.context``), all on the device."""
        plan = evaluation_plan(metrics, k_max)
        prepared = _prepared(data, batch, plan.ks)
        auc = plan.auc and prepared.negatives is not None
        weights = jnp.asarray(prepared.weights)
        acc = DeviceAccumulator(plan.ks)
        pending = None
        for index in range(prepared.n_batches):
            arrays = _device_arrays(prepared, index, auc=auc, context=True)
            sums = _cross_metrics(self.support, self.support_sq, self.alpha, arrays, weights,
                                  config=self.config, ks=plan.ks, sort=plan.sort, auc=auc)
            if pending is not None:
                acc.add(pending)
            pending = sums
        acc.add(pending)
        return finish(acc, metrics, stats)

    def recommend(self, histories: sp.spmatrix, k: int = 100, *, batch: int = DEFAULT_BATCH
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` unseen items (int32) and their scores of every history row, best first."""
        hist = sp.csr_matrix(histories, dtype=np.float32)
        n, m = hist.shape
        from models.jax_ranking import _capacity, _coords, _max_batch_nnz

        cap = _capacity(_max_batch_nnz(hist, batch))
        kk = min(k, m)
        items = np.empty((n, kk), dtype=np.int32)
        scores = np.empty((n, kk), dtype=np.float32)
        pending: tuple[int, Any] | None = None
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            rows, cols, vals = _coords(hist, start, stop, batch, cap)
            out = _top_k_batch(self.support, self.support_sq, self.alpha, rows, cols, vals,
                               n_rows=batch, config=self.config, k=kk)
            if pending is not None:
                _store(items, scores, *pending)
            pending = (start, stop, out)
        if pending is not None:
            _store(items, scores, *pending)
        return items, scores


def _store(items: np.ndarray, scores: np.ndarray, start: int, stop: int, out: Any) -> None:
    got_items, got_scores = jax.device_get(out)
    items[start:stop] = got_items[: stop - start]
    scores[start:stop] = got_scores[: stop - start]


def _prepared(data: EvalSet | DeviceEvalSet, batch: int, ks: tuple[int, ...]) -> DeviceEvalSet:
    if isinstance(data, DeviceEvalSet):
        if data.ks == ks:
            return data
        data = data.data
    cache = getattr(data, "_device_sets", None)
    if cache is None:
        cache = {}
        try:
            data._device_sets = cache  # one preparation per evaluation set, batch and cut-offs
        except AttributeError:  # pragma: no cover - slotted objects
            pass
    key = (batch, ks)
    if key not in cache:
        cache[key] = DeviceEvalSet(data, batch, ks)
    return cache[key]


def _device_arrays(prepared: DeviceEvalSet, index: int, *, auc: bool, context: bool
                   ) -> dict[str, jax.Array]:
    """A batch's arrays on the device, kept for the next λ (an evaluation set is scored per λ)."""
    cache = prepared.__dict__.setdefault("_on_device", {})
    key = (index, auc, context)
    if key not in cache:
        cache[key] = jax.device_put(prepared.batch_arrays(index, auc=auc, context=context))
    return cache[key]


def kernel_matrix_device(support: Any, config: NTKConfig = NTKConfig()) -> jax.Array:
    """``K = k(X, X)`` on the device (n × n float32)."""
    return _kernel(jnp.asarray(_dense32(support)), config)


def scaled_lambda_device(kernel: jax.Array, lam: float) -> float:
    """λ̃ = λ · trace(K)/n, the trace summed in float64 on the host (as NumPy's
    ``scaled_lambda``)."""
    diag = np.asarray(jnp.diagonal(kernel))
    return float(lam) * float(np.sum(diag, dtype=np.float64)) / kernel.shape[0]


def solve_device(kernel: jax.Array, x: jax.Array, lam: float, trace_mean: float
                 ) -> tuple[jax.Array, float, str | None]:
    """α on the device for one λ: ``(α, λ̃ used, how)``; the host's ladder when not finite."""
    lam_scaled = float(lam) * trace_mean
    alpha, finite = _solve(kernel, x, jnp.float32(lam_scaled))
    if bool(finite):
        return alpha, lam_scaled, None
    alpha_host, lam_scaled, how = _solve_recording(np.asarray(kernel), np.asarray(x), lam)
    return jnp.asarray(alpha_host), lam_scaled, how


def fit_select_device(
    support: Any,
    val: EvalSet,
    lambdas: Iterable[float],
    config: NTKConfig = NTKConfig(),
    *,
    select_metric: str,
    support_is_val_context: bool = False,
    path_metrics: Iterable[str] | None = None,
    batch: int = DEFAULT_BATCH,
    kernel: jax.Array | None = None,
    on_lambda: Callable[[LambdaResult], None] | None = None,
) -> tuple[DeviceInfAE, list[LambdaResult]]:
    """:func:`models.infinite_ae.fit_select` on the device (same rules: one K, the λ with the best
    validation ``select_metric`` kept, the first on ties; λ not kept ranked only for
    ``path_metrics``; the kept λ gets every metric; λ = 0 on the support scored without a solve;
    a λ that cannot be solved skipped)."""
    check_select_metric(select_metric, val)
    lambdas = list(lambdas)
    if not lambdas:
        raise ValueError("the λ grid is empty")
    x = jnp.asarray(_dense32(support))
    n, m = x.shape
    if kernel is None:
        kernel = _kernel(x, config)
    trace_mean = scaled_lambda_device(kernel, 1.0)
    wanted = None if path_metrics is None else list(dict.fromkeys([*path_metrics, select_metric]))
    reduced = wanted is not None and evaluation_plan(wanted) != evaluation_plan(None)
    x_pad = zeros_pad = None
    if support_is_val_context:
        if val.context.shape[0] != n:
            raise ValueError("support_is_val_context: the support and the validation users differ")
        extra = -n % batch
        x_pad = jnp.pad(x, ((0, extra), (0, 0)))
        zeros_pad = jnp.zeros_like(x_pad)
    support_sq = jnp.sum(x * x, axis=1)
    # k(C, X) per batch, computed once for the grid when it is small enough (≤ 512 MB)
    cross: dict[int, jax.Array] = {}
    keep_cross = (not support_is_val_context
                  and -(-val.context.shape[0] // batch) * batch * n * 4 <= CROSS_CACHE_BYTES)

    def score(alpha: jax.Array | None, lam_scaled: float, metrics: list[str] | None
              ) -> dict[str, float]:
        plan = evaluation_plan(metrics)
        prepared = _prepared(val, batch, plan.ks)
        auc = plan.auc and prepared.negatives is not None
        weights = jnp.asarray(prepared.weights)
        acc = DeviceAccumulator(plan.ks)
        pending = None
        if support_is_val_context:
            a_pad = (zeros_pad if alpha is None
                     else jnp.pad(alpha, ((0, x_pad.shape[0] - n), (0, 0))))
        for index in range(prepared.n_batches):
            if support_is_val_context:
                arrays = _device_arrays(prepared, index, auc=auc, context=False)
                sums = _support_metrics(x_pad, a_pad, jnp.float32(lam_scaled),
                                        jnp.int32(index * batch), arrays, weights,
                                        ks=plan.ks, sort=plan.sort, auc=auc)
            elif keep_cross:
                arrays = _device_arrays(prepared, index, auc=auc, context=True)
                if index not in cross:
                    history = {key: arrays[key] for key in _HISTORY_KEYS}  # one trace for all plans
                    cross[index] = _cross_kernel(x, support_sq, history, config=config)
                sums = _kernel_metrics(cross[index], alpha, arrays, weights, ks=plan.ks,
                                       sort=plan.sort, auc=auc)
            else:
                arrays = _device_arrays(prepared, index, auc=auc, context=True)
                sums = _cross_metrics(x, support_sq, alpha, arrays, weights, config=config,
                                      ks=plan.ks, sort=plan.sort, auc=auc)
            if pending is not None:
                acc.add(pending)
            pending = sums
        acc.add(pending)
        return finish(acc, metrics, None)

    path: list[LambdaResult] = []
    best: LambdaResult | None = None
    best_alpha: jax.Array | None = None
    best_value = -math.inf
    best_computed: dict[str, float] = {}
    failures: list[UnstableLambdaError] = []
    for lam in lambdas:
        started = time.perf_counter()
        alpha, how = None, None
        lam_scaled = float(lam) * trace_mean
        if not (support_is_val_context and lam_scaled == 0.0):
            try:
                alpha, lam_scaled, how = solve_device(kernel, x, lam, trace_mean)
            except UnstableLambdaError as exc:
                failures.append(exc)
                warnings.warn(f"{exc}: λ={lam:g} skipped", SkippedLambdaWarning, stacklevel=2)
                result = LambdaResult(lam=float(lam), lam_scaled=lam_scaled, val={}, skipped=True,
                                      seconds=time.perf_counter() - started)
                path.append(result)
                if on_lambda is not None:
                    on_lambda(result)
                continue
        computed = score(alpha, lam_scaled, wanted if reduced else None)
        metrics = computed if wanted is None else {k: computed[k] for k in wanted if k in computed}
        result = LambdaResult(lam=float(lam), lam_scaled=lam_scaled, val=metrics,
                              stabilised=how is not None, how=how,
                              seconds=time.perf_counter() - started)
        path.append(result)
        if on_lambda is not None:
            on_lambda(result)
        if metrics[select_metric] > best_value:
            best_value, best = metrics[select_metric], result
            best_alpha, best_computed = alpha, computed
    if best is None:
        raise LambdaGridError(
            f"no λ of the grid {[float(v) for v in lambdas]} gives a positive definite K + λ̃I "
            f"(kernel {n} × {n}, float32); last: {failures[-1]}")
    if reduced:
        best.val = score(best_alpha, best.lam_scaled, None)
    elif wanted is not None:
        best.val = best_computed
    if best_alpha is None:
        try:
            best_alpha, best.lam_scaled, best.how = solve_device(kernel, x, best.lam, trace_mean)
            best.stabilised = best.how is not None
        except UnstableLambdaError as exc:
            raise LambdaGridError(f"the kept λ={best.lam:g} cannot be solved: {exc}") from exc
    model = DeviceInfAE(support=x, alpha=best_alpha, lam=best.lam, lam_scaled=best.lam_scaled,
                        config=config)
    return model, path


def make_validator(batch: int = DEFAULT_BATCH) -> Callable[..., tuple[float, dict[str, float],
                                                                        list[tuple[float, Any]]]]:
    """A Distill-CF validator (``distill(..., validate=…)``) that fits and ranks on the device:
    the same ``(best λ, its validation metrics, [(λ, value)])`` as
    :func:`models.distill_cf._validate`.
    The validation set is prepared once (its batches stay on the device across evaluations)."""

    def validate(support: np.ndarray, val: EvalSet, config: Any
                 ) -> tuple[float, dict[str, float], list[tuple[float, Any]]]:
        metric = config.select_metric
        model, path = fit_select_device(support, val, config.lambdas, config.kernel,
                                        select_metric=metric, path_metrics=(metric,), batch=batch)
        best = next(p for p in path if p.lam == model.lam)
        return model.lam, best.val, [(p.lam, p.val.get(metric)) for p in path]

    return validate


def device_memory() -> dict[str, Any]:
    """The first device's memory statistics (bytes in use, peak), where the backend reports them."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without statistics
        stats = {}
    keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
    return {k: int(stats[k]) for k in keys if k in stats}


__all__ = ["DeviceInfAE", "fit_select_device", "kernel_matrix_device", "solve_device",
           "scaled_lambda_device", "make_validator", "device_memory", "DEFAULT_BATCH"]
