"""irep-deploy: search, train, fuse and deploy re-parameterized CNNs (IREPS + DES)."""
from __future__ import annotations

__version__ = "0.1.0"

from .arch import ArchCode  # noqa: E402
from .block import IrepConv  # noqa: E402
from .checkpoint import Checkpoint, load_checkpoint, load_model, save_checkpoint  # noqa: E402
from .errors import IrepError  # noqa: E402
from .models import apply_arch, build_model, current_arch  # noqa: E402
from .reparam import fuse_model, to_torchvision  # noqa: E402

__all__ = [
    "__version__", "ArchCode", "IrepConv", "Checkpoint", "IrepError", "apply_arch", "build_model",
    "current_arch", "fuse_model", "to_torchvision", "save_checkpoint", "load_checkpoint", "load_model",
]
