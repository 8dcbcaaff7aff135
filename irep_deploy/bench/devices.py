"""Device profiles and the environment record of a benchmark.

The parsers are pure functions over the text of /etc/nv_tegra_release, /proc/device-tree/model,
``nvpmodel -q`` and devfreq/cpufreq files, so they are tested on real-format samples; the readers
around them only open files and return None when a file is absent or unreadable.
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ..errors import DeviceMismatchError, IrepError

PROFILES = ("auto", "cpu", "gpu", "xavier", "orin", "a100", "h100")
# Which GPU names / board models a profile accepts (lower-case substrings).
_MATCH = {"xavier": ("xavier",), "orin": ("orin",), "a100": ("a100",), "h100": ("h100",)}


# -- pure parsers ------------------------------------------------------------------------------------
def parse_tegra_release(text: str) -> Optional[Dict[str, Any]]:
    """``# R35 (release), REVISION: 2.1, GCID: ..., BOARD: t186ref, ...`` -> release "R35.2.1" etc."""
    m = re.search(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    if not m:
        return None
    board = re.search(r"BOARD:\s*([^,\s]+)", text)
    return {"release": "R{}.{}".format(m.group(1), m.group(2)), "major": int(m.group(1)),
            "revision": m.group(2), "board": board.group(1) if board else None}


def parse_device_tree_model(text: str) -> Optional[str]:
    """The board model string (the file is NUL-terminated)."""
    model = text.replace("\x00", "").strip()
    return model or None


def jetson_kind(model: Optional[str]) -> Optional[str]:
    """``xavier`` / ``orin`` / other Jetson name in lower case / None for a non-Jetson model string."""
    if not model or "jetson" not in model.lower():
        return None
    low = model.lower()
    for kind in ("xavier", "orin", "nano", "tx2", "thor"):
        if kind in low:
            return kind
    return "jetson"


def parse_compatible(text: str) -> Optional[str]:
    """/proc/device-tree/compatible (NUL-separated): the SoC says the family when the model string
    does not (AGX Xavier boards report just ``Jetson-AGX``)."""
    entries = [e.strip() for e in text.split("\x00") if e.strip()]
    for entry in entries:
        if entry.endswith("tegra194"):
            return "xavier"
        if entry.endswith("tegra234"):
            return "orin"
    return None


def parse_nvpmodel(text: str) -> Optional[Dict[str, Any]]:
    """``nvpmodel -q`` output: ``NV Power Mode: MAXN`` then the mode id."""
    m = re.search(r"NV Power Mode:\s*(\S+)", text)
    if not m:
        return None
    ident = re.search(r"^\s*(\d+)\s*$", text[m.end():], re.MULTILINE)
    return {"name": m.group(1), "id": int(ident.group(1)) if ident else None}


def clocks_locked(min_freq: str, max_freq: str) -> Optional[bool]:
    """A devfreq/cpufreq domain is locked when its floor equals its ceiling (what jetson_clocks does)."""
    try:
        low, high = int(min_freq.strip()), int(max_freq.strip())
    except ValueError:
        return None
    return low == high


def parse_nvidia_smi(text: str) -> Optional[Dict[str, str]]:
    """``nvidia-smi --query-gpu=name,driver_version --format=csv,noheader`` (first GPU)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) < 2 or not parts[1]:
        return None
    return {"name": parts[0], "driver": parts[1]}


# -- readers -----------------------------------------------------------------------------------------
def _read(path: str) -> Optional[str]:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _run(cmd: List[str]) -> Optional[str]:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def _gpu_clock_lock(root: str = "/sys/class/devfreq") -> Optional[bool]:
    """The Jetson GPU's devfreq domain (gv11b on Xavier, ga10b on Orin)."""
    try:
        names = [n for n in os.listdir(root) if re.search(r"gv11b|ga10b|gpu", n)]
    except OSError:
        return None
    for name in names:
        low, high = _read(os.path.join(root, name, "min_freq")), _read(os.path.join(root, name, "max_freq"))
        if low is not None and high is not None:
            return clocks_locked(low, high)
    return None


@dataclass
class DeviceInfo:
    kind: str                    # cpu | xavier | orin | a100 | h100 | gpu | jetson
    name: str                    # human-readable: board model, GPU name or CPU model
    cuda: bool
    jetson: Optional[Dict[str, Any]] = None   # model, l4t release, power mode, clocks locked
    notes: List[str] = field(default_factory=list)


def cpu_model() -> str:
    text = _read("/proc/cpuinfo") or ""
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return m.group(1).strip() if m else (platform.processor() or platform.machine())


def detect() -> DeviceInfo:
    """What this machine is: a Jetson board, a data-centre GPU, another GPU, or a CPU."""
    model = parse_device_tree_model(_read("/proc/device-tree/model") or "")
    kind = jetson_kind(model)
    if kind == "jetson":
        kind = parse_compatible(_read("/proc/device-tree/compatible") or "") or kind
    cuda = torch.cuda.is_available()
    if kind is not None:
        info: Dict[str, Any] = {"model": model, "l4t": parse_tegra_release(_read("/etc/nv_tegra_release") or "")}
        info["power_mode"] = parse_nvpmodel(_run(["nvpmodel", "-q"]) or "")
        info["gpu_clocks_locked"] = _gpu_clock_lock()
        notes = [] if info["gpu_clocks_locked"] else [
            "GPU clocks are not locked (or unreadable): run `sudo jetson_clocks` for stable numbers"]
        return DeviceInfo(kind, model or "Jetson", cuda, info, notes)
    if cuda:
        name = torch.cuda.get_device_name(torch.cuda.current_device())
        low = name.lower()
        for profile, keys in _MATCH.items():
            if any(k in low for k in keys):
                return DeviceInfo(profile, name, True)
        return DeviceInfo("gpu", name, True)
    return DeviceInfo("cpu", cpu_model(), False)


def resolve(requested: str = "auto", force: bool = False, info: Optional[DeviceInfo] = None) -> DeviceInfo:
    """The device to benchmark on; refuses (unless ``force``) when the machine is not ``requested``."""
    if requested not in PROFILES:
        raise IrepError("unknown device {!r} (choose from {})".format(requested, ", ".join(PROFILES)))
    info = info or detect()
    if requested in ("auto", "cpu") or requested == info.kind or (requested == "gpu" and info.cuda):
        if requested == "cpu":
            return DeviceInfo("cpu", cpu_model(), False, info.jetson, list(info.notes))
        return info
    message = "--device {} was asked for, but this machine is {} ({})".format(requested, info.name, info.kind)
    if not force:
        raise DeviceMismatchError(message + "; run on that device, or pass --force to benchmark here anyway")
    info.notes.append(message + " (--force: numbers are for this machine, not a {})".format(requested))
    return info


def bench_profile(device: str) -> str:
    """The bench profile for a torch device string, so that callers holding one (``demo --device cuda``)
    can pass it on: ``cuda``/``cuda:N`` -> ``gpu`` (any CUDA GPU; refused on a machine without one),
    ``cpu`` -> ``cpu``; profile names pass through unchanged. ``bench`` runs on the current CUDA device."""
    if device in PROFILES:
        return device
    if device == "cuda" or re.fullmatch(r"cuda:\d+", device):
        return "gpu"
    raise IrepError("unknown device {!r} (choose from {}, or cuda / cuda:N)".format(device, ", ".join(PROFILES)))


def _version(module: str) -> Optional[str]:
    try:
        return str(__import__(module).__version__)
    except Exception:  # not installed, or broken install: the record just says None
        return None


def environment(info: Optional[DeviceInfo] = None) -> Dict[str, Any]:
    """What a result depends on, so results from different machines can be compared."""
    info = info or detect()
    env: Dict[str, Any] = {
        "device": asdict(info),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime"),
        "tensorrt": _version("tensorrt"),
        "gpu": None,
        "driver": None,
    }
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        env["gpu"] = torch.cuda.get_device_name(index)
        env["compute_capability"] = "{}.{}".format(*torch.cuda.get_device_capability(index))
        smi = parse_nvidia_smi(_run(["nvidia-smi", "--query-gpu=name,driver_version",
                                     "--format=csv,noheader"]) or "")
        env["driver"] = smi["driver"] if smi else None
    return env
