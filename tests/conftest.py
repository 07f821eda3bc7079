"""Shared fixtures. Keep this minimal."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
ML1M_PARQUET = SHARED_DATA / "ml-1m" / "interactions.parquet"


def _under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


@pytest.fixture(scope="session")
def ml1m_path() -> Path:
    """Path of ../shared/data/ml-1m/interactions.parquet: skips when absent, fails when CI=true.

    Mark tests that use it with ``@pytest.mark.realdata``.
    """
    if ML1M_PARQUET.is_file():
        return ML1M_PARQUET
    message = f"real data not found: {ML1M_PARQUET} (MovieLens-1M is not redistributed with the project)"
    if _under_ci():
        pytest.fail(message + "; CI=true requires it", pytrace=False)
    pytest.skip(message)
