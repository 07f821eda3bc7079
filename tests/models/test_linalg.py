"""The in-place SPD solve equals LAPACK's Cholesky solve, and reports non-SPD systems."""

import numpy as np
import pytest
import scipy.linalg as sla

from models.linalg import spd_solve


def _spd(n: int, m: int, seed: int = 0, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.random((n, m)) < 0.05).astype(dtype)
    a = x @ x.T
    a[np.diag_indices(n)] += a.trace() / n
    return a, x


def _reference(a: np.ndarray, b: np.ndarray, shift: float = 0.0) -> np.ndarray:
    a64 = a.astype(np.float64) + shift * np.eye(a.shape[0])
    return sla.cho_solve(sla.cho_factor(a64, lower=True), b.astype(np.float64))


@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("shift", [0.0, 3.5])
def test_equals_lapack_and_leaves_inputs_alone(dtype, tol, shift):
    a, x = _spd(300, 90, dtype=dtype)
    a0, x0 = a.copy(), x.copy()
    got = spd_solve(a, x, shift=shift)
    expected = _reference(a, x, shift)
    assert got.dtype == dtype and got.flags.c_contiguous
    np.testing.assert_allclose(got, expected, rtol=0, atol=tol * np.abs(expected).max())
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(x, x0)


def test_work_buffers_are_used_in_place_and_reusable():
    a, x = _spd(257, 40)
    work = np.empty_like(a)
    out = np.empty_like(x)
    first = spd_solve(a, x, shift=1.0, a_work=work, out=out)
    assert first is out
    np.testing.assert_allclose(first, _reference(a, x, 1.0), rtol=0, atol=2e-5 * np.abs(first).max())
    second = spd_solve(a, x, shift=7.0, a_work=work, out=out)  # same buffers, another shift
    assert second is out
    np.testing.assert_allclose(second, _reference(a, x, 7.0), rtol=0, atol=2e-5 * np.abs(second).max())
    with pytest.raises(ValueError, match="work buffer"):
        spd_solve(a, x, out=np.empty((257, 40), dtype=np.float32, order="F"))


def test_vector_rhs_equals_a_column():
    a, x = _spd(120, 10)
    np.testing.assert_allclose(spd_solve(a, x[:, 3]), spd_solve(a, x)[:, 3], rtol=1e-6, atol=1e-7)


def test_not_positive_definite_gives_none():
    a, x = _spd(200, 20)
    a[150, 150] = -1.0
    assert spd_solve(a, x) is None
    assert spd_solve(np.ones((200, 200), dtype=np.float32), x) is None  # rank one


def test_shape_mismatch_is_an_error():
    a, x = _spd(100, 10)
    with pytest.raises(ValueError, match="square system"):
        spd_solve(a, x[:50])
