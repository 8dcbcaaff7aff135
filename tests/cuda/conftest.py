"""The CUDA suite (`pytest -m cuda`, `make test-gpu`): every test here needs a CUDA GPU.

tests/conftest.py gives each test collected under tests/cuda the ``cuda`` marker and, where torch
sees no CUDA device, skips it with that reason (as it does for a ``cuda``-marked test anywhere), so
the suite runs everywhere and says plainly what it could not run.
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def cuda() -> torch.device:
    """The GPU the suite runs on (the current CUDA device)."""
    return torch.device("cuda", torch.cuda.current_device())
