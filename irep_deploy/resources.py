"""Memory a batch will need, estimated and refused before it is allocated.

A check batch (``fuse``, ``export``'s verification), a benchmark input (``bench``) or an evaluation
batch (``eval``, ``quantize``'s calibration) is sized by flags or by a checkpoint header's
``input_size``; a size nobody meant (``--batch 4096 --input-size 4096``, a header claiming 4096 on an
8x8 network) would otherwise swap, hang or die in the allocator with a traceback. The estimate is
rough on purpose, and errs high:

    input bytes + ACTIVATION_FACTOR x (the largest activation of the network at that input)

The largest activation is measured by one forward pass of the network at batch 1 and a small size
(at most :data:`PROBE_SIZE`), scaled to the requested batch and area (convolutional activations grow
with the area); a network known only by its file (ONNX, engine) is assumed to expand its input
:data:`UNKNOWN_EXPANSION` times. The limit is half the memory available now (``MemAvailable``,
lowered by a cgroup limit and by ``RLIMIT_AS``); a check batch, which only verifies an equivalence,
is further held to :data:`CHECK_LIMIT_BYTES`. ``IREP_DEPLOY_MEMORY_LIMIT`` (bytes, or with a K/M/G/T
suffix) replaces both.
"""
from __future__ import annotations

import os
import resource
from typing import Any, Optional, Sequence, Type

import torch
import torch.nn as nn

from .errors import CheckpointError, IrepError, UsageError
from .precision import exact_fp32

MEMORY_LIMIT_ENV = "IREP_DEPLOY_MEMORY_LIMIT"
AVAILABLE_FRACTION = 0.5
CHECK_LIMIT_BYTES = 1 << 30
#: live activations at the peak of an inference pass, in units of the largest one: a layer's input and
#: output plus a branch output being summed into them (a multi-branch block)
ACTIVATION_FACTOR = 3
PROBE_SIZE = 32
UNKNOWN_EXPANSION = 16
_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as handle:
            text = handle.read().strip()
        return int(text)
    except (OSError, ValueError):
        return None  # "max", or no such controller


def _cgroup_room() -> Optional[int]:
    """What the memory cgroup still allows (v2, else v1); None without a limit."""
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is None:
        limit = _read_int("/sys/fs/cgroup/memory/memory.limit_in_bytes")
        used = _read_int("/sys/fs/cgroup/memory/memory.usage_in_bytes")
    if limit is None or limit >= 1 << 60:
        return None
    return max(0, limit - (used or 0))


def available_memory() -> Optional[int]:
    """Bytes this process can still allocate, as far as the OS says; None when it does not say."""
    candidates = [_meminfo_available(), _cgroup_room()]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        candidates.append(soft)
    known = [c for c in candidates if c is not None]
    return min(known) if known else None


def parse_bytes(text: str) -> int:
    """``"8G"`` -> 8 GiB; plain digits are bytes."""
    t = text.strip().upper().rstrip("B").rstrip("I")
    suffix = t[-1:] if t[-1:] in _SUFFIXES and t[-1:] else ""
    number = t[:-1] if suffix else t
    try:
        value = float(number) * _SUFFIXES[suffix]
    except ValueError as exc:
        raise UsageError("{}={!r}: expected bytes, e.g. 8G or 500M".format(MEMORY_LIMIT_ENV, text)) from exc
    if not value > 0 or value == float("inf"):
        raise UsageError("{}={!r}: must be a positive size".format(MEMORY_LIMIT_ENV, text))
    return int(value)


def memory_limit(check: bool = False) -> Optional[int]:
    """The most bytes one batch may need: ``IREP_DEPLOY_MEMORY_LIMIT`` if set, else half the available
    memory, held to :data:`CHECK_LIMIT_BYTES` for a ``check`` batch. None: nothing known, no limit."""
    override = os.environ.get(MEMORY_LIMIT_ENV)
    if override:
        return parse_bytes(override)
    available = available_memory()
    limit = None if available is None else int(available * AVAILABLE_FRACTION)
    if check:
        limit = CHECK_LIMIT_BYTES if limit is None else min(limit, CHECK_LIMIT_BYTES)
    return limit


def _numel(out: Any) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel()
    if isinstance(out, (list, tuple)):
        return sum(_numel(o) for o in out)
    if isinstance(out, dict):
        return sum(_numel(o) for o in out.values())
    return 0


def largest_activation(model: nn.Module, in_channels: int, size: int) -> Optional[int]:
    """Elements of the largest module output for one ``in_channels`` x ``size`` x ``size`` image,
    measured at a size of at most :data:`PROBE_SIZE` and scaled by the area; None if the network
    cannot run at the probe size (its own run then reports why)."""
    probe = min(size, PROBE_SIZE)
    largest = [0]

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        largest[0] = max(largest[0], _numel(output))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    modes = [(m, m.training) for m in model.modules()]  # each its own: a mixed mode comes back as it was
    model.eval()  # in training mode the probe would move BatchNorm's running statistics
    try:
        # exact_fp32: a check's every forward runs in true float32, the probe's too (tests observe it)
        with torch.no_grad(), exact_fp32():
            model(torch.zeros(1, in_channels, probe, probe, device=device))
    except (RuntimeError, ValueError, IndexError, TypeError):
        return None
    finally:
        for m, training in modes:
            m.training = training
        for h in handles:
            h.remove()
    return int(largest[0] * (size / probe) ** 2)


def estimate_bytes(shape: Sequence[int], model: Optional[nn.Module] = None, element_bytes: int = 4) -> int:
    """Bytes an inference pass on a batch of ``shape`` (N x C x H x W) needs (see the module docstring)."""
    batch, channels = int(shape[0]), int(shape[1])
    per_image = 1
    for d in shape[1:]:
        per_image *= int(d)
    act = largest_activation(model, channels, int(shape[-1])) if model is not None else None
    if act is None:
        act = per_image * UNKNOWN_EXPANSION
    return element_bytes * batch * (per_image + ACTIVATION_FACTOR * act)


def _gib(n: int) -> str:
    return "{:.1f} GiB".format(n / (1 << 30)) if n >= 1 << 28 else "{:.0f} MiB".format(n / (1 << 20))


def require_memory(shape: Sequence[int], model: Optional[nn.Module], purpose: str, blame: str,
                   error: Type[IrepError] = UsageError, check: bool = False) -> int:
    """Refuse (``error``, its line starting with ``blame``: the flags or the file that chose the size) a
    batch of ``shape`` whose estimate exceeds :func:`memory_limit`; returns the estimate."""
    need = estimate_bytes(shape, model)
    _refuse(need, shape, purpose, blame, error, check)
    return need


def require_check_input(shape: Sequence[int], purpose: str, blame: str, error: Type[IrepError] = IrepError) -> None:
    """A check's input sized by recorded data (a checkpoint header's ``input_size``), refused before
    it is allocated when the input, times :data:`UNKNOWN_EXPANSION` for what the check keeps of it,
    is beyond a check batch's limit. No probe forward: the check itself is the one forward there is."""
    need = 4 * UNKNOWN_EXPANSION
    for d in shape:
        need *= int(d)
    _refuse(need, shape, purpose, blame, error, check=True)


def _refuse(need: int, shape: Sequence[int], purpose: str, blame: str, error: Type[IrepError], check: bool) -> None:
    limit = memory_limit(check)
    if limit is not None and need > limit:
        why = ("{} is set".format(MEMORY_LIMIT_ENV) if os.environ.get(MEMORY_LIMIT_ENV) else
               "{}half the available memory; {} raises it".format(
                   "a check batch's cap, or " if check else "", MEMORY_LIMIT_ENV))
        raise error("{}: {} of shape {} would need about {}, more than the limit of {} ({})".format(
            blame, purpose, "x".join(str(int(d)) for d in shape), _gib(need), _gib(limit), why))


def size_flags(batch_flag: str, batch: int, input_size: Optional[int]) -> str:
    """The flags that sized a batch, as the user typed them (``--input-size`` only when given)."""
    return "{} {}".format(batch_flag, batch) + (" --input-size {}".format(input_size) if input_size else "")


def require_input_memory(model: Optional[nn.Module], batch: int, in_channels: int, size: int,
                         header_size: Optional[int], source: str, purpose: str, flags: str,
                         check: bool = False) -> int:
    """:func:`require_memory` for a batch sized by flags, at a spatial size that is the header's when
    ``size == header_size``: a header whose size alone is too large is the file's fault (CheckpointError
    naming ``source``), anything else the flags' (UsageError naming ``flags``). One image past the check
    batch's cap is no classifier's input size, so the header is held to that cap, whatever ``check``."""
    if header_size is not None and size == header_size:
        require_memory((1, in_channels, size, size), model, "one image", "{}: header input_size {}".format(
            source, header_size), CheckpointError, check=True)
    return require_memory((batch, in_channels, size, size), model, purpose, flags, UsageError, check)
