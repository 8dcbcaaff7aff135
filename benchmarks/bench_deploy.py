"""Fused vs plain backbone vs multi-branch latency on onnxruntime CPU (docs/performance.md).

Every model goes through the same export (legacy exporter, opset 17, onnxslim) and the same
onnxruntime CPU session; rounds interleave the models so that the drift of a shared machine hits
all of them alike. Writes benchmarks/results/deploy_cpu.{json,md}.

    python benchmarks/bench_deploy.py [--backbone resnet18_cifar --width 0.5 --duration 20 --rounds 10]
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

from _common import write_results

from irep_deploy import ArchCode, build_model, save_checkpoint
from irep_deploy.bench.latency import bench, format_table

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet18_cifar")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--batches", default="1,32")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per model and batch, over all rounds")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads (1: least noise on a shared box)")
    p.add_argument("--out", default=str(RESULTS / "deploy_cpu"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        # All branches on: the multi-branch model at its most expensive, as trained by the search space.
        model = build_model(args.backbone, arch=ArchCode.full(args.backbone), width=args.width)
        ckpt = Path(tmp) / "multi.pt"
        save_checkpoint(ckpt, model)
        report = bench(ckpt, device="cpu", backends=["ort"], batches=[int(b) for b in args.batches.split(",")],
                       duration_s=args.duration, min_iters=20, compare=True, threads=args.threads,
                       rounds=args.rounds)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/bench_deploy.py"] + sys.argv[1:])
    data = json.loads(report.to_json())
    data["command"] = command
    data["model"] = "{} width {} (random weights; latency does not depend on them), all branches on".format(
        args.backbone, args.width)
    env = report.environment
    lines = ["# Deploy latency on onnxruntime CPU", "", "Command: `{}`".format(command), "",
             "Machine: {} ({} logical CPUs, shared with other work), {}; Python {}, torch {}, onnxruntime {}, "
             "onnx {}; onnxruntime threads: {}".format(env["cpu"], env["cpu_count"], env["platform"], env["python"],
                                                       env["torch"], env["onnxruntime"], env["onnx"], args.threads),
             "", "Model: " + data["model"] + ". Every variant exported the same way (opset 17, onnxslim).", "",
             "```", format_table(report), "```", ""]
    for w in report.warnings:
        lines.append("- warning: " + w)
    write_results(args.out, data, "\n".join(lines) + "\n")
    print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
