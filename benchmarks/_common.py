"""Shared by the benchmark scripts: what machine a result came from and writing results files
(atomically: an interrupted run leaves the previous results as they were), each with its provenance
(``provenance.py``: commit, dirty tree, command, machine, date, dependency digests). Ratios of paired
timings and their trust rule live in ``benchstats.py``.

The scripts run as ``python benchmarks/SCRIPT.py``, so this directory is on ``sys.path`` already.
"""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence, Union

import torch

from irep_deploy._io import atomic_write
from irep_deploy.bench.devices import cpu_model

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (bad_input.py): provenance beside it
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402


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


def gpu_device_refusal(script: str, device: str, smoke: bool) -> Optional[str]:
    """The one line a GPU benchmark ``script`` exits 2 with for its ``--device``/``--smoke``, or None:
    the record needs a CUDA GPU; ``--device cpu`` runs its sections at tiny size (``--smoke``) only."""
    if device not in ("cuda", "cpu"):
        return "{}: --device must be cuda or cpu, got {!r}".format(script, device)
    if device == "cpu" and not smoke:
        return "{}: --device cpu is for --smoke runs only; the record needs a CUDA GPU".format(script)
    if device == "cuda" and not torch.cuda.is_available():
        return "{}: no CUDA GPU visible to torch (torch.cuda.is_available() is False); nothing measured".format(script)
    return None


def write_text(path: Union[str, Path], text: str) -> None:
    """Write ``text`` to ``path`` (creating its directory) atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as handle:
        handle.write(text)


def write_json(path: Union[str, Path], data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_results(stem: Union[str, Path], result: Optional[Dict[str, Any]], markdown: str,
                  depends: Iterable[Any] = (), ignore: Sequence[str] = provenance.PLUMBING) -> None:
    """``STEM.json`` and ``STEM.md``, the one writer of results files: the JSON gets ``provenance``
    (``provenance.record``; ``depends``: input files beyond the code, e.g. another results file) and the
    markdown a line naming it. ``result`` None: a markdown-only file, its record in a last-line comment.
    ``ignore``: files whose changes cannot move the numbers (default: the package's plumbing)."""
    stem_path = Path(stem)
    prov = provenance.record(describe_machine()["summary"], depends, ignore)
    if "package_from" in prov:
        print("note: irep_deploy was imported from {}, not this checkout (an install of another tree? run with "
              "PYTHONPATH=.): the record says so, and check_results.py will list the file as stale".format(
                  prov["package_from"]))
    text = markdown.rstrip("\n") + "\n\n" + provenance.summary_line(prov) + "\n"
    if result is None:
        write_text(stem_path.with_suffix(".md"), provenance.embed(text, prov))
        print("wrote {}".format(stem_path.with_suffix(".md")))
        return
    result["provenance"] = prov
    write_json(stem_path.with_suffix(".json"), result)
    write_text(stem_path.with_suffix(".md"), text)
    print("wrote {} and {}".format(stem_path.with_suffix(".json"), stem_path.with_suffix(".md")))


def git_state() -> Dict[str, Any]:
    """The checkout's commit and whether its tracked files differ from it (``provenance.git_state``)."""
    return provenance.git_state()
