"""Shared fixtures: the real test data in ``../shared/data`` and fixed random generators."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CRYODAY_TEST_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder; skips (or fails under CI) when a clone lacks it."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"test data folder {SHARED_DATA} is missing; CI must have it")
        pytest.skip(f"test data folder {SHARED_DATA} not found (set CRYODAY_TEST_DATA)")
    return SHARED_DATA


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20150607)
