"""Shared by the benchmark scripts: what machine a result came from, and writing results files."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any, Dict

import torch


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe_machine() -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    info["summary"] = "{} ({} cores, {} torch threads), Python {}, torch {}{}".format(
        info["cpu"], info["cpu_count"], info["torch_threads"], info["python"], info["torch"],
        ", GPU " + info["cuda"] if info["cuda"] else "")
    return info


def write_results(stem: str, result: Dict[str, Any], markdown: str) -> None:
    stem_path = Path(stem)
    stem_path.parent.mkdir(parents=True, exist_ok=True)
    stem_path.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem_path.with_suffix(".md").write_text(markdown)
    print("wrote {} and {}".format(stem_path.with_suffix(".json"), stem_path.with_suffix(".md")))
