"""FLOPs of one training step (forward + backward) of the networks that gpu_train_probe.py times:
full-width resnet18_cifar on 1x28x28 inputs at batch 128, the plain backbone against every branch on,
counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products; BatchNorm,
activations and the branch sums are not counted, so the all-branch count is a lower bound).

    python benchmarks/count_flops.py          # seconds on a CPU; writes results/flops.{json,md}
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict

import torch
from torch.utils.flop_counter import FlopCounterMode

from _common import describe_machine, write_results

from irep_deploy import ArchCode, build_model  # noqa: E402

BACKBONE = "resnet18_cifar"


def step_flops(code: Any, batch: int, width: float) -> Dict[str, int]:
    """Forward and backward FLOPs of one training step (a multiply-add counts 2)."""
    torch.manual_seed(0)
    model = build_model(BACKBONE, arch=code, width=width, num_classes=10, in_channels=1).train()
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    with FlopCounterMode(display=False) as fwd:
        loss = torch.nn.functional.cross_entropy(model(x), y)
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    return {"forward": fwd.get_total_flops(), "backward": bwd.get_total_flops(),
            "step": fwd.get_total_flops() + bwd.get_total_flops(), "branches": code.count() if code else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "flops"))
    args = parser.parse_args()
    rows = {"plain": step_flops(None, args.batch, args.width),
            "all_branches": step_flops(ArchCode.full(BACKBONE), args.batch, args.width)}
    ratio = {k: rows["all_branches"][k] / rows["plain"][k] for k in ("forward", "backward", "step")}
    result = {"command": "python " + " ".join(sys.argv), "machine": describe_machine(), "backbone": BACKBONE,
              "width": args.width, "batch": args.batch, "input": [1, 28, 28], "flops": rows,
              "all_over_plain": ratio, "counter": "torch.utils.flop_counter.FlopCounterMode (torch {})".format(
                  torch.__version__)}
    lines = ["# FLOPs of one training step: plain vs all branches", "",
             "Command: `{}`".format(result["command"]), "",
             "{} width {}, batch {} of 1x28x28 (gpu_train_probe.py's step), counted by {}: convolutions and "
             "matrix products, a multiply-add as 2 FLOPs; BatchNorm, activations and branch sums are not "
             "counted.".format(BACKBONE, args.width, args.batch, result["counter"]), "",
             "| network | branches | forward GFLOP | backward GFLOP | step GFLOP |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append("| {} | {} | {:.1f} | {:.1f} | {:.1f} |".format(
            name.replace("_", " "), r["branches"], r["forward"] / 1e9, r["backward"] / 1e9, r["step"] / 1e9))
    lines += ["", "All branches / plain: forward {forward:.2f}x, backward {backward:.2f}x, step {step:.2f}x.".format(
        **ratio)]
    write_results(args.out, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
