"""Shared by the benchmark scripts: what machine a result came from and writing results files
(atomically: an interrupted run leaves the previous results as they were).

The scripts run as ``python benchmarks/SCRIPT.py``, so this directory is on ``sys.path`` already.
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any, Dict, Union

import torch

from irep_deploy._io import atomic_write
from irep_deploy.bench.devices import cpu_model


def describe_machine() -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    info["summary"] = "{} ({} cores, {} torch threads), Python {}, torch {}{}".format(
        info["cpu"], info["cpu_count"], info["torch_threads"], info["python"], info["torch"],
        ", GPU " + info["cuda"] if info["cuda"] else "")
    return info


def write_text(path: Union[str, Path], text: str) -> None:
    """Write ``text`` to ``path`` (creating its directory) atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as handle:
        handle.write(text)


def write_json(path: Union[str, Path], data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_results(stem: Union[str, Path], result: Dict[str, Any], markdown: str) -> None:
    """``STEM.json`` and ``STEM.md``."""
    stem_path = Path(stem)
    write_json(stem_path.with_suffix(".json"), result)
    write_text(stem_path.with_suffix(".md"), markdown)
    print("wrote {} and {}".format(stem_path.with_suffix(".json"), stem_path.with_suffix(".md")))


def git_state() -> Dict[str, Any]:
    """The checkout's commit and whether its tracked files differ from it (``dirty``): a results file
    made from uncommitted code says so. ``commit`` is None outside a git checkout."""
    import subprocess
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git"] + list(args), cwd=str(root), stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, universal_newlines=True).stdout.strip()
        except OSError:
            return ""
    commit = git("rev-parse", "--short", "HEAD") or None
    return {"commit": commit, "dirty": bool(commit and git("status", "--porcelain", "--untracked-files=no"))}
