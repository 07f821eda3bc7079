"""The closed-form NTK (used for fitting and serving) equals neural-tangents' stax kernel."""

import numpy as np
import pytest

from models.kernels import NTKConfig, ntk_from_dots, ntk_kernel_fn, stax_kernel_fn


def _binary(rng, n, m, density=0.2):
    return (rng.random((n, m)) < density).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_closed_form_equals_stax_float64(depth):
    try:  # jax.experimental.enable_x64 is gone from newer jax (0.11 has jax.enable_x64)
        from jax import enable_x64
    except ImportError:  # jax 0.4.x
        from jax.experimental import enable_x64
    import jax.numpy as jnp

    rng = np.random.default_rng(depth)
    x, y = _binary(rng, 12, 30), _binary(rng, 7, 30)
    config = NTKConfig(depth=depth)
    with enable_x64(True):
        xj, yj = jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64)
        expected = np.asarray(stax_kernel_fn(30, config)(xj, yj))
        dots = xj @ yj.T
        got = np.asarray(ntk_from_dots(dots, (xj * xj).sum(1), (yj * yj).sum(1), 30, config))
    rel = np.abs(got - expected).max() / np.abs(expected).max()
    assert rel <= 1e-5, rel


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_float32_numpy_path_close_to_stax(depth):
    rng = np.random.default_rng(10 + depth)
    x = _binary(rng, 20, 50)
    config = NTKConfig(depth=depth)
    expected = np.asarray(stax_kernel_fn(50, config)(x, None))
    got = ntk_kernel_fn(config)(x)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-6)


def test_kernel_is_symmetric_psd_and_blockwise_consistent():
    rng = np.random.default_rng(0)
    x = _binary(rng, 40, 25)
    k = ntk_kernel_fn()(x)
    np.testing.assert_allclose(k, k.T, rtol=1e-6)
    assert np.linalg.eigvalsh(k.astype(np.float64)).min() > -1e-4 * np.trace(k)
    # a block computed alone equals the same block of the whole matrix
    np.testing.assert_allclose(ntk_kernel_fn()(x[:7], x[10:20]), k[:7, 10:20], rtol=1e-6)


def test_features_must_match():
    with pytest.raises(ValueError, match="features"):
        ntk_kernel_fn()(np.ones((2, 3), np.float32), np.ones((2, 4), np.float32))


def test_depth_must_be_positive():
    with pytest.raises(ValueError):
        NTKConfig(depth=0)


def test_pad_rows_appends_zero_rows_up_to_the_multiple():
    from models.kernels import pad_rows

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    padded = pad_rows(a, 4)
    assert padded.shape == (4, 4) and np.array_equal(padded[:3], a) and not padded[3].any()
    assert pad_rows(padded, 4) is padded
    assert pad_rows(np.ones(5, np.float32), 4).shape == (8,)


def test_row_sq_norms_sparse_equals_dense_with_empty_rows():
    import scipy.sparse as sp

    from models.kernels import row_sq_norms

    x = np.random.default_rng(3).random((7, 9)).astype(np.float32)
    x[x < 0.6] = 0.0
    x[[0, 4]] = 0.0  # empty rows
    dense = row_sq_norms(x)
    assert dense.dtype == np.float32 and dense[0] == dense[4] == 0.0
    np.testing.assert_allclose(row_sq_norms(sp.csr_matrix(x)), dense, rtol=1e-6)
    np.testing.assert_allclose(row_sq_norms(x.astype(np.float64)), (x * x).sum(axis=1), rtol=1e-6)
