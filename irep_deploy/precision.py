"""The arithmetic that equivalence checks run in.

On Ampere and newer GPUs cuDNN runs float32 convolutions in TF32 by default (10-bit mantissa), so
two networks that are equal in exact arithmetic (multi-branch vs fused, torch vs onnxruntime) differ
by about 1e-3 relative there, against 1e-6 in true float32. Every check whose tolerance assumes
float32 runs inside :func:`exact_fp32`; training and benchmarks keep the user's (fast) setting.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """Turn TF32 off for cuDNN convolutions and CUDA matmuls inside the block, then restore it.

    Uses the flags that exist from torch 2.0 on (``allow_tf32``); on a CPU-only machine they are
    set and restored all the same and change nothing.
    """
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.backends.cuda.matmul.allow_tf32 = matmul
