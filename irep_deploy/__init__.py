"""irep-deploy: search, train, fuse and deploy re-parameterized CNNs (IREPS + DES).

The public names are imported on first use (PEP 562), so ``import irep_deploy`` and the CLI start
without importing torch: Ctrl-C while torch loads is then caught by the CLI like any other moment.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ArchCode": "arch", "IrepConv": "block", "Checkpoint": "checkpoint", "load_checkpoint": "checkpoint",
    "load_model": "checkpoint", "save_checkpoint": "checkpoint", "IrepError": "errors", "apply_arch": "binding",
    "build_model": "models", "current_arch": "binding", "fuse_model": "reparam", "to_torchvision": "reparam",
    "irepify": "surgery",
}

__all__ = ["__version__"] + sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError("module 'irep_deploy' has no attribute {!r}".format(name))
    value = getattr(importlib.import_module("." + module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> Any:
    return sorted(list(globals()) + list(_EXPORTS))
