"""tasks/stop.py: where a SIGTERM/SIGINT may raise at once and where it only asks for a stop."""

from __future__ import annotations

import os
import signal

import pytest

from tasks import stop


@pytest.fixture(autouse=True)
def fresh_flag(monkeypatch):
    # the process-wide Prefect client settings stay as they are for the tests that follow
    monkeypatch.setattr(stop, "_fail_fast", lambda: None)
    stop.reset()
    yield
    stop.reset()


def _compiled_in(path: str, src: str, ns: dict) -> None:
    exec(compile(src, path, "exec"), ns)


def _frame_in(path: str, called_from: str | None = None):
    """A frame of code compiled as if it lived in ``path``, called from code in
    ``called_from``."""
    ns: dict = {}
    _compiled_in(path, "import sys\ndef here():\n    return sys._getframe()\n", ns)
    if called_from is None:
        return ns["here"]()
    _compiled_in(called_from, "def outer():\n    return here()\n", ns)
    return ns["outer"]()


def test_models_code_is_a_safe_point_and_tasks_code_is_not():
    root = os.path.dirname(os.path.dirname(stop.__file__))
    assert stop._at_safe_point(_frame_in(os.path.join(root, "models", "distill_cf.py")))
    assert not stop._at_safe_point(_frame_in(os.path.join(root, "tasks", "io.py")))
    models = os.path.join(root, "models", "infinite_ae.py")
    assert stop._at_safe_point(_frame_in("/venv/site-packages/numpy/linalg.py", models))
    # JAX writing its compilation cache for a models call: not safe
    assert not stop._at_safe_point(_frame_in("/venv/site-packages/jax/_src/lru_cache.py", models))


def test_in_a_deferred_region_a_signal_only_asks_and_check_raises():
    with stop.handling(), stop.deferred("fit"):
        os.kill(os.getpid(), signal.SIGTERM)  # handled here: not a safe point
        assert stop.requested() and stop.received() == signal.SIGTERM
        with pytest.raises(stop.Interrupted) as info:
            stop.check({"step": 3})  # a progress callback's argument is ignored
    assert info.value.where == "fit" and info.value.exit_code == 143
    assert isinstance(info.value, KeyboardInterrupt)  # never retried, never swallowed


def test_outside_a_deferred_region_and_on_a_second_signal_it_raises_at_once():
    with stop.handling():
        with pytest.raises(stop.Interrupted) as info:
            os.kill(os.getpid(), signal.SIGINT)
            raise AssertionError("not interrupted")
    assert info.value.exit_code == 130
    stop.reset()
    with stop.handling(), stop.deferred("distill"):
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(stop.Interrupted):
            os.kill(os.getpid(), signal.SIGTERM)  # the user insists
            raise AssertionError("not interrupted")


def test_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with stop.handling(), stop.deferred("x"):
        assert signal.getsignal(signal.SIGTERM) is stop._handler
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before

