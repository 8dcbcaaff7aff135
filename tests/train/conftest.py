"""Shared settings for the data/train tests: one thread (2 shared cores), tiny models."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs with one torch thread (the ``one_thread`` fixture of tests/conftest.py)."""
