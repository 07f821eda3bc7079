"""Retries by allow-list: a stage task retries only errors known to be transient (a connection
refused or reset, a timeout, a locked SQLite, MLflow's server-side codes); a ValueError, a bad
input or anything unknown fails at the first attempt. Real Prefect tasks with the stages' own
options (``tasks.runtime.task_options``), run in a flow on the test harness."""

from __future__ import annotations

import errno
import sqlite3

import pytest

from tasks.errors import InputError
from tasks.runtime import is_transient, task_options


class _MlflowLike(Exception):
    def __init__(self, code: str):
        super().__init__(code)
        self.error_code = code


def _wrapped(inner: BaseException) -> BaseException:
    """``inner`` as the cause of a generic error (how MLflow and Prefect wrap them)."""
    try:
        try:
            raise inner
        except BaseException as exc:
            raise RuntimeError("call failed") from exc
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize("exc", [
    ConnectionRefusedError(errno.ECONNREFUSED, "refused"), ConnectionResetError(), TimeoutError(),
    OSError(errno.ETIMEDOUT, "timed out"), sqlite3.OperationalError("database is locked"),
    _MlflowLike("TEMPORARILY_UNAVAILABLE"), _wrapped(ConnectionRefusedError()),
], ids=repr)
def test_known_transient_errors_are_retried(exc):
    assert is_transient(exc)


@pytest.mark.parametrize("exc", [
    ValueError("bad λ"), KeyError("fit"), TypeError(), ZeroDivisionError(), MemoryError(),
    FileNotFoundError(errno.ENOENT, "gone"), PermissionError(errno.EACCES, "denied"),
    RuntimeError("unknown"), sqlite3.OperationalError("no such table: runs"),
    _MlflowLike("INVALID_PARAMETER_VALUE"), _MlflowLike("RESOURCE_DOES_NOT_EXIST"),
    InputError("ratings.csv: line 3: bad id"), _wrapped(ValueError("inner")),
], ids=repr)
def test_everything_else_is_not(exc):
    assert not is_transient(exc)


def test_an_input_error_caused_by_a_connection_is_not_retried():
    try:
        try:
            raise ConnectionRefusedError()
        except ConnectionRefusedError as exc:
            raise InputError("tracking.uri http://x: cannot connect") from exc
    except InputError as err:
        assert not is_transient(err)


def test_a_stage_task_retries_a_connection_error_and_not_a_value_error(flow_env):
    from prefect import flow, task

    attempts = {"value": 0, "connection": 0}

    def fails_with(kind: str) -> None:
        attempts[kind] += 1
        if kind == "value":
            raise ValueError("K + λI: bad shape")
        if attempts[kind] < 3:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "tracking server refused")

    options = {**task_options(io=True), "retry_delay_seconds": 0}
    assert options["retries"] == 2
    stage = task(fails_with, name="stage", **options)

    @flow(name="retry-check")
    def check(kind: str):
        return stage(kind, return_state=True)

    assert check("value", return_state=True).is_failed() and attempts["value"] == 1  # no retry
    assert check("connection", return_state=True).is_completed()
    assert attempts["connection"] == 3  # two retries
