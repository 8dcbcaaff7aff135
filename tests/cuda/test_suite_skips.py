"""The suite's own contract: it runs on a GPU and skips with a reason elsewhere."""
from __future__ import annotations

import torch


def test_suite_runs_on_the_gpu(cuda):
    # Collected only as part of the CUDA suite; on a machine without CUDA it is skipped with the reason.
    assert torch.cuda.is_available() and torch.zeros(1, device=cuda).is_cuda
