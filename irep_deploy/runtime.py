"""Where a run executes: device, process group, mixed precision, deterministic kernels, RNG state.

Shared by ``train``, ``search`` and ``evaluation``; knows nothing of models or run directories.
Distributed calls are no-ops in a single process (``Dist().enabled`` is False), so callers need no
branches of their own. The layout follows timm's ``utils/distributed.py``.
"""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List

import torch
import torch.nn as nn

from .errors import IrepError, NotAvailableError, UsageError

AMP_MODES = ("none", "bf16", "fp16")
#: cuBLAS needs this workspace setting for deterministic matmuls; it is read when cuBLAS starts.
CUBLAS_WORKSPACE = ":4096:8"


# -- distributed ------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owned: bool = False  # this module created the process group (and destroys it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_main() -> bool:
    """Whether this process is rank 0 of its launch (torchrun sets RANK), known before the process
    group exists: the one that creates and locks the run directory."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def init_distributed(device: torch.device) -> Dist:
    """Join the process group described by torchrun's environment (WORLD_SIZE > 1); gloo on CPU,
    NCCL on CUDA. Without it, a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as tdist

    owned = not tdist.is_initialized()
    if owned:
        tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return Dist(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owned)


def close_distributed(dist: Dist) -> None:
    """Leave the process group if :func:`init_distributed` created it."""
    if dist.owned:
        import torch.distributed as tdist
        tdist.destroy_process_group()


def all_reduce(tensor: torch.Tensor, dist: Dist, op: str = "sum") -> torch.Tensor:
    """``tensor`` reduced in place over ranks (``sum``, ``min`` or ``max``); returned for chaining."""
    if dist.enabled:
        import torch.distributed as tdist
        tdist.all_reduce(tensor, op={"sum": tdist.ReduceOp.SUM, "min": tdist.ReduceOp.MIN,
                                     "max": tdist.ReduceOp.MAX}[op])
    return tensor


def all_sum(values: List[float], dist: Dist, device: torch.device) -> List[float]:
    """Plain numbers summed over ranks in one transfer (float64)."""
    if not dist.enabled:
        return values
    return all_reduce(torch.tensor(values, dtype=torch.float64, device=device), dist).tolist()


def barrier(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as tdist
        tdist.barrier()


def broadcast_buffers(module: nn.Module, dist: Dist) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics) before an evaluation.

    DDP broadcasts them only at the start of a training forward, and each rank's forward then updates
    its own copy, so after the last step the ranks hold different statistics; metrics and fitness
    must come from one model. The next training forward would overwrite them the same way, so
    training is unchanged.
    """
    if not dist.enabled:
        return
    import torch.distributed as tdist
    for buf in module.buffers():
        tdist.broadcast(buf, 0)


def wrap_ddp(module: nn.Module, dev: torch.device, dist: Dist, find_unused: bool) -> nn.Module:
    """``module`` under DistributedDataParallel when distributed, else itself. ``find_unused``: some
    parameters may get no gradient in a step (inactive branches, alpha/beta of codes without one)."""
    if not dist.enabled:
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None,
                                               find_unused_parameters=find_unused)


# -- device -----------------------------------------------------------------------------------------
def cuda_index(dev: torch.device) -> int:
    """The GPU this process uses. Under torchrun (LOCAL_RANK set) the local rank decides, so N
    processes use N GPUs; an explicit index naming another GPU is refused here rather than left to
    NCCL ("Duplicate GPU detected")."""
    local = os.environ.get("LOCAL_RANK")
    if local is None:
        return 0 if dev.index is None else dev.index
    if dev.index is not None and dev.index != int(local):
        raise IrepError("--device {} conflicts with LOCAL_RANK={} under torchrun: each process uses the GPU of its "
                        "local rank (give --device cuda; choose GPUs with CUDA_VISIBLE_DEVICES)".format(dev, local))
    return int(local)


def resolve_device(device: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a device, made current when it is a GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        index = cuda_index(dev)
        if not torch.cuda.is_available():
            raise NotAvailableError("--device {}: no CUDA GPU is visible to torch on this machine".format(device))
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
    return dev


@contextlib.contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """Deterministic kernels inside the block (``enabled``), the caller's settings restored after.

    cuDNN's default convolution backward and algorithm autotuning (``benchmark``) are not
    deterministic, so without this a resumed CUDA run continues the run but is not bit-identical.
    ``CUBLAS_WORKSPACE_CONFIG`` must be set before cuBLAS starts: enter this before anything touches
    the GPU. It stays set (a process-wide environment variable that costs a little workspace memory).
    """
    if not enabled:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    # warn_only: the backward of AdaptiveAvgPool2d (every backbone's head) has no deterministic CUDA
    # kernel by PyTorch's list and would stop every run; at the output sizes used here (1x1, 7x7 on 7x7)
    # each input gradient gets exactly one addition, so its result does not depend on the order.
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


# -- mixed precision --------------------------------------------------------------------------------
def autocast(amp: str, device: torch.device, cache: bool = True) -> Any:
    """The autocast context of an ``amp`` mode (a no-op for ``none``). ``cache=False``: no cache of
    weights cast to the low precision (inside a CUDA-graph capture, none may outlive it)."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


def make_scaler(amp: str, device: torch.device) -> Any:
    """A gradient scaler for fp16 (CUDA only); None otherwise."""
    if amp != "fp16":
        return None
    if device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA device (use bf16 on CPU)")
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()


# -- RNG state as plain data (weights_only-loadable) ------------------------------------------------
def rng_state() -> Dict[str, Any]:
    import numpy as np

    np_state = np.random.get_state()
    py_state = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [str(np_state[0]), torch.from_numpy(np_state[1].astype("int64")), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
