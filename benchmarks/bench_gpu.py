"""The GPU record: the CUDA suite's result, the paper's Table 1 at its own scale, and batch-1
latency of fused vs plain vs multi-branch ResNet-18 in eager mode and with CUDA graphs.

1. Suite: ``pytest -m cuda`` (tests/gpu and every test marked ``cuda``), its summary line recorded.
2. Table 1 (population evaluation): full-width resnet18_cifar SuperNet, a population of codes at 2/3 of
   the branches, each scored on the same validation tensors (batch 512) by the library's search code:
   fused (``fuse_model(supernet, arch=code)``, fusion time included) against the multi-branch SuperNet
   with the code active, both through ``evaluation.evaluate_models``; fused and multi-branch alternate code by
   code. Populations 64/128/256 are the first 64/128/256 codes. The validation tensors are random
   (CIFAR-10 is not on this machine; evaluation time does not depend on pixel values).
3. Latency: ``irep_deploy.bench.latency.bench --compare`` on ResNet-18 with every branch on (CIFAR layout,
   32x32, and ImageNet layout, 224x224), batch 1, backends torch (eager) and cudagraph, rounds
   interleaved; host latency and CUDA-event GPU time. Paper (A100, eager): 3.93 ms and 3.59 ms.

Without CUDA it exits with status 2 and one line. ``--device cpu --smoke`` runs the same code paths at
tiny size on the CPU (the test of this script). Writes ``results/gpu_<gpu>.{json,md}``.

    python benchmarks/bench_gpu.py                          # on a GPU machine: the recorded run
    python benchmarks/bench_gpu.py --device cpu --smoke --out /tmp/gpu_smoke
"""
from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch

from _common import describe_machine, gpu_device_refusal, write_results

from irep_deploy import ArchCode, build_model, fuse_model, save_checkpoint  # noqa: E402
from irep_deploy.bench.latency import bench, format_table  # noqa: E402
from irep_deploy.search.supernet import SuperNet  # noqa: E402
from irep_deploy.evaluation import evaluate_models  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAPER_A100_EAGER_MS = {"fused": 3.59, "multi-branch": 3.93}  # the paper's batch-1 ResNet-18 numbers


def sizes(smoke: bool) -> Dict[str, Any]:
    if smoke:
        return dict(width=0.125, populations=[1, 2], batch=8, images=12, latency_width=0.125,
                    layouts=[("resnet18_cifar", 32), ("resnet18", 32)], duration=0.0, rounds=2, min_iters=4,
                    suite="tests/gpu/test_suite_skips.py")  # the suite step, not the whole suite again
    return dict(width=1.0, populations=[64, 128, 256], batch=512, images=5000, latency_width=1.0,
                layouts=[("resnet18_cifar", 32), ("resnet18", 224)], duration=10.0, rounds=5, min_iters=100,
                suite="tests")


# -- 1. the CUDA suite ------------------------------------------------------------------------------
def suite(path: str) -> Dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rfEs", "--tb=line", "-p",
                           "no:cacheprovider", path],
                          cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    summary = next((l.strip("= ") for l in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|error)", l)),
                   lines[-1] if lines else "no output")
    print("CUDA suite: " + summary, flush=True)
    return {"command": "pytest -m cuda -q -rfEs --tb=line " + path, "returncode": proc.returncode,
            "summary": summary, "tail": lines[-60:]}


# -- 2. Table 1: population evaluation -------------------------------------------------------------
def _synced(device: torch.device, fn: Any) -> float:
    """Wall time of one whole population pass (the quantity of Table 1); the GPU queue is drained first."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def table1(device: torch.device, width: float, populations: Sequence[int], batch: int, images: int) -> Dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    val = [(torch.randn(n, 3, 32, 32, generator=gen).to(device), torch.randint(0, 10, (n,), generator=gen).to(device))
           for n in [batch] * (images // batch) + ([images % batch] if images % batch else [])]
    torch.manual_seed(0)
    supernet = SuperNet(build_model("resnet18_cifar", width=width, num_classes=10, supernet=True)).to(device).eval()
    template = ArchCode.full("resnet18_cifar")
    codes = [ArchCode.random("resnet18_cifar", count=template.budget(2 / 3), seed=1000 + i)
             for i in range(max(populations))]

    def fused(code: ArchCode) -> None:
        evaluate_models([fuse_model(supernet.model, arch=code)], val, device)

    def multi(code: ArchCode) -> None:
        supernet.activate(code)
        evaluate_models([supernet.model], val, device)

    fused(codes[0]), multi(codes[0])  # warm-up: cuDNN autotuning, allocator
    times: Dict[str, List[float]] = {"fused": [], "multi-branch": []}
    for i, code in enumerate(codes):  # alternate which goes first, so drift hits both alike
        order = [("fused", fused), ("multi-branch", multi)][:: 1 if i % 2 == 0 else -1]
        for name, fn in order:
            times[name].append(_synced(device, lambda: fn(code)))
    rows = []
    for p in populations:
        f, m = sum(times["fused"][:p]), sum(times["multi-branch"][:p])
        rows.append({"population": p, "fused_s": f, "multi_branch_s": m, "speedup": m / f})
        print("population {}: multi-branch {:.2f} s, fused {:.2f} s, speedup {:.2f}x".format(p, m, f, m / f),
              flush=True)
    return {"model": "resnet18_cifar", "width": width, "batch": batch, "images": images,
            "branches_per_code": codes[0].count(), "rows": rows, "per_code_s": times}


# -- 3. batch-1 latency ---------------------------------------------------------------------------
def latency(device: torch.device, layouts: Sequence[Any], width: float, duration: float, rounds: int,
            min_iters: int, tmp: Path) -> List[Dict[str, Any]]:
    out = []
    for backbone, size in layouts:
        ckpt = tmp / "{}.pt".format(backbone)
        model = build_model(backbone, arch=ArchCode.full(backbone), width=width)
        save_checkpoint(ckpt, model.eval())
        report = bench(ckpt, device="gpu" if device.type == "cuda" else "cpu",
                       backends=["torch", "cudagraph"] if device.type == "cuda" else ["torch"], batches=[1],
                       duration_s=duration, min_iters=min_iters, compare=True, rounds=rounds, input_size=size)
        print(format_table(report), flush=True)
        out.append({"backbone": backbone, "input_size": size, "width": width, "table": format_table(report),
                    "results": [{"variant": r.variant, "backend": r.backend, "host_median_ms": r.host.median,
                                 "gpu_median_ms": r.gpu.median if r.gpu else None, "cv": r.host.cv}
                                for r in report.results],
                    "ratios": report.ratios, "warnings": report.warnings})
    return out


def markdown(result: Dict[str, Any]) -> str:
    lines = ["# GPU record: CUDA suite, Table 1, batch-1 latency", "", "Command: `{}`".format(result["command"]), "",
             "Machine: " + result["machine"]["summary"], "", "## CUDA suite", "",
             "`{}`: **{}** (exit status {})".format(result["suite"]["command"], result["suite"]["summary"],
                                                    result["suite"]["returncode"]), ""]
    failed = [l for l in result["suite"].get("tail", []) if l.startswith(("FAILED", "ERROR"))]
    lines += ["- " + l for l in failed] + ([""] if failed else [])
    lines += ["## Table 1: population evaluation, fused vs multi-branch", ""]
    t = result["table1"] or {"model": "-", "width": "-", "branches_per_code": "-", "images": "-", "batch": "-",
                             "rows": []}
    if result["table1"] is None:
        lines += ["(not measured yet)", ""]
    lines += ["{} width {}, {} branches per code, {} validation images, batch {} (random tensors).".format(
        t["model"], t["width"], t["branches_per_code"], t["images"], t["batch"]), "",
        "| population | multi-branch s | fused s | speedup |", "|---|---|---|---|"]
    lines += ["| {} | {:.2f} | {:.2f} | {:.2f}x |".format(r["population"], r["multi_branch_s"], r["fused_s"],
                                                         r["speedup"]) for r in t["rows"]]
    lines += ["", "## Batch-1 latency (paper, A100 eager: multi-branch {} ms, fused {} ms)".format(
        PAPER_A100_EAGER_MS["multi-branch"], PAPER_A100_EAGER_MS["fused"]), ""]
    for block in result["latency"]:
        lines += ["{} at {}x{}, width {}, every branch on:".format(block["backbone"], block["input_size"],
                                                                 block["input_size"], block["width"]),
                  "", "```", block["table"], "```", ""]
        lines += ["- warning: " + w for w in block["warnings"]]
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] = ()) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --smoke only)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script's code paths in seconds")
    p.add_argument("--skip-suite", action="store_true", help="do not run the CUDA suite first")
    p.add_argument("--out", help="results stem (default benchmarks/results/gpu_<gpu name>)")
    args = p.parse_args(list(argv) or None)
    refusal = gpu_device_refusal("bench_gpu", args.device, args.smoke)
    if refusal is not None:
        print(refusal, file=sys.stderr)
        return 2
    device = torch.device(args.device)
    size = sizes(args.smoke)
    machine = describe_machine()
    stem = args.out or str(RESULTS / "gpu_{}".format(re.sub(r"[^a-z0-9]+", "_", (machine["cuda"] or "cpu").lower())
                                                     .strip("_")))
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/bench_gpu.py"] + list(argv or sys.argv[1:]))
    result: Dict[str, Any] = {"command": command, "machine": machine, "smoke": args.smoke, "sizes": size}
    result["suite"] = ({"command": "(skipped)", "returncode": None, "summary": "not run (--skip-suite)"}
                       if args.skip_suite else suite(size["suite"]))
    result["table1"], result["latency"] = None, []
    write_results(stem, result, markdown(result))  # each section is kept as soon as it is measured
    result["table1"] = table1(device, size["width"], size["populations"], size["batch"], size["images"])
    write_results(stem, result, markdown(result))
    with tempfile.TemporaryDirectory() as tmp:
        result["latency"] = latency(device, size["layouts"], size["latency_width"], size["duration"], size["rounds"],
                                    size["min_iters"], Path(tmp))
    write_results(stem, result, markdown(result))
    return 0 if result["suite"]["returncode"] in (None, 0) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
