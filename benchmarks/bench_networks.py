"""The network matrix in numbers: every network of ``tests/networks.py`` (torchvision, timm, Ultralytics,
custom modules) through irepify -> random code -> fuse_model -> ONNX, with the matrix's own checks.

Recorded per network: its outcome (exact / refused / failed, and each failed check), blocks made
against the convs irepify's geometry rule accepts (3x3, padding 1, ...), the convs left out counted by
kind of reason (one example each), the code's branches, the start error (irepified vs original) and
the fused error (fused vs multi-branch, relative, FP32), the ONNX Conv and BatchNormalization counts
of the plain original and of the fused network, and the wall time of ``irepify`` and of
``fuse_model`` (one core, ``--rounds`` rounds: median [min, max]).

    OMP_NUM_THREADS=1 python benchmarks/bench_networks.py                 # the recorded run
    OMP_NUM_THREADS=1 python benchmarks/bench_networks.py --only yolov8n --only timm_resnetv2_18 --out /tmp/n
    python benchmarks/bench_networks.py --smoke --out /tmp/networks_smoke  # four light networks, one round

Writes ``results/networks.{json,md}`` (atomically), with the commit, whether the tree was dirty, the
command, the machine and the date. It asserts nothing: ``tests/test_network_matrix.py`` does.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from _common import describe_machine, git_state, write_results

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the matrix lives with the tests that assert it

import networks  # noqa: E402
from irep_deploy import fuse_model, irepify  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SMOKE = ("resnet18", "squeezenet1_0", "custom_tied_weights", "custom_partly_untraceable")


def timings(entry: networks.Entry, rounds: int) -> Dict[str, List[float]]:
    """Seconds of irepify and of fuse_model (the code's branches created, untimed, in between)."""
    original = networks.build_original(entry)
    runs: Dict[str, List[float]] = {"irepify": [], "fuse_model": [], "irepify + fuse_model": []}
    for _ in range(rounds):
        t0 = time.perf_counter()
        net = irepify(original, name="matrix:" + entry.name, input_size=entry.shape[-1])
        t1 = time.perf_counter()
        networks.make_branches(net, entry, networks.SEED)
        t2 = time.perf_counter()
        fuse_model(net)
        t3 = time.perf_counter()
        for key, value in (("irepify", t1 - t0), ("fuse_model", t3 - t2), ("irepify + fuse_model", t1 - t0 + t3 - t2)):
            runs[key].append(value)
    return runs


def row(entry: networks.Entry, rounds: int) -> Dict[str, Any]:
    start = time.perf_counter()
    missing = entry.requires and importlib.util.find_spec(entry.requires) is None
    if missing:
        return {"name": entry.name, "source": entry.source, "expected": entry.expected,
                "status": "not run ({} is not installed)".format(entry.requires), "passed": None}
    result = networks.check_network(entry)
    out: Dict[str, Any] = {
        "name": entry.name, "source": entry.source, "expected": entry.expected, "status": result.status,
        "passed": result.passed, "failures": result.failures,
        "message": result.message.strip().splitlines()[-1] if result.message else "",
        "input": list(entry.shape), "eligible": result.eligible, "blocks": result.blocks,
        "skipped": result.skipped, "skip_examples": result.skip_examples, "branches": result.branches,
        "start_error": result.start_error, "branch_effect": result.branch_effect, "fused_error": result.fused_error,
        "float32_floor": result.floor,
        "onnx_plain": result.onnx_original, "onnx_fused": result.onnx_fused, "seconds": None}
    if result.status != "refused" and "fuse_model" in result.seconds:  # irepify and fuse_model ran once
        out["seconds"] = timings(entry, rounds)
    out["check_s"] = round(time.perf_counter() - start, 1)
    print("{} ({:.0f} s)".format(result.line(), out["check_s"]), flush=True)
    return out


def spread(values: Optional[List[float]]) -> str:
    if not values:
        return "-"
    return "{:.3f} [{:.3f}, {:.3f}]".format(statistics.median(values), min(values), max(values))


def error(value: Optional[float]) -> str:
    return "-" if value is None else "{:.1e}".format(value)


def markdown(result: Dict[str, Any]) -> str:
    code, m, s = result["code"], result["machine"], result["settings"]
    rows = result["networks"]
    ran = [r for r in rows if r["passed"] is not None]
    lines = ["# The network matrix: irepify -> random code -> fuse_model -> ONNX", "",
             "Commit {}{}, command `{}`, {}. Machine: {}.".format(
                 code["commit"], " (tree dirty)" if code["dirty"] else "", result["command"], result["date"],
                 m["summary"]), "",
             "Checks (tests/networks.py): start error = irepified vs original, branch effect = multi-branch vs "
             "original, fused error = fused vs multi-branch (relative, FP32, limit {:g}); ONNX: the fused network's op "
             "counts must equal the plain original's (same exporter; Conv and BatchNormalization shown as plain -> "
             "fused). Times: one core, {} round(s), median [min, max] seconds.".format(s["tolerance"], s["rounds"]), "",
             "As expected: {} of {} networks run ({} not run).".format(
                 sum(bool(r["passed"]) for r in ran), len(ran), len(rows) - len(ran)), "",
             "| network | source | expected | status | blocks / eligible 3x3 | left out, by kind | branches "
             "| start error | fused error | ONNX Conv | ONNX BN | irepify s | fuse_model s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["passed"] is None:
            lines.append("| {} | {} | {} | {} |{}".format(r["name"], r["source"], r["expected"], r["status"], " |" * 9))
            continue
        plain, fused, secs = r["onnx_plain"], r["onnx_fused"], r["seconds"] or {}
        onnx_cell = (lambda op: "{} -> {}".format(plain.get(op, 0), fused.get(op, 0)) if fused else "-")
        lines.append("| {} | {} | {} | {}{} | {} / {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["name"], r["source"], r["expected"], r["status"], "" if r["passed"] else " (NOT as expected)",
            r["blocks"], r["eligible"], ", ".join("{} {}".format(k, v) for k, v in sorted(r["skipped"].items())) or "-",
            r["branches"], error(r["start_error"]), error(r["fused_error"]), onnx_cell("Conv"),
            onnx_cell("BatchNormalization"), spread(secs.get("irepify")), spread(secs.get("fuse_model"))))
    problems = [r for r in ran if r["failures"] or r["status"] == "refused"]
    if problems:
        lines += ["", "## Failed checks and refusals", ""]
        lines += ["- {}: {}".format(r["name"], "; ".join(r["failures"]) or r["message"]) for r in problems]
    floors = [r for r in ran if r.get("float32_floor") and r["passed"]]
    if floors:
        lines += ["", "## Fused errors above {:g} at the float32 floor".format(s["tolerance"]), "",
                  "Against the same network run in float64 (tests/networks.py, check 3):", ""]
        lines += ["- {}: the float32 multi-branch network is off by {:.2g}, the fused one by {:.2g}".format(
            r["name"], *r["float32_floor"]) for r in floors]
    lines += ["", "## One convolution left out per kind and network", ""]
    lines += ["- {}: {}".format(r["name"], "; ".join("{}: `{}`".format(k, v) for k, v in sorted(r["skip_examples"].items())))
              for r in ran if r.get("skip_examples")]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="a network of the matrix (repeatable; default: all): " + ", ".join(networks.BY_NAME))
    p.add_argument("--skip-slow", action="store_true", help="leave out the networks the tests mark slow")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of irepify and fuse_model per network")
    p.add_argument("--smoke", action="store_true", help="quick run: {}, one round".format(", ".join(SMOKE)))
    p.add_argument("--out", default=str(RESULTS / "networks"))
    args = p.parse_args()
    if args.smoke:
        args.only, args.rounds = args.only or list(SMOKE), 1
    try:
        entries = networks.select(args.only, include_slow=not args.skip_slow)
    except KeyError as exc:
        p.error(str(exc.args[0]))
    code = git_state()  # before any results file is rewritten: the tree as it was run
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = [row(entry, args.rounds) for entry in entries]
    omp = os.environ.get("OMP_NUM_THREADS")
    result = {
        "command": ("OMP_NUM_THREADS={} ".format(omp) if omp else "") + "python " + " ".join(
            shlex.quote(a) for a in ["benchmarks/bench_networks.py"] + sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": describe_machine(), "code": code,
        "settings": {"networks": [e.name for e in entries], "rounds": args.rounds, "tolerance": networks.TOL,
                     "opset": networks.OPSET, "seed": networks.SEED, "smoke": args.smoke},
        "networks": rows, "wall_s": round(time.perf_counter() - start, 1)}
    write_results(args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
