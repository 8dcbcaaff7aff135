"""Where a training step of the multi-branch network spends its time on a GPU (recorded, not a target).

1. Step time: full-width resnet18_cifar on 1x28x28 inputs (Fashion-MNIST's shape), batch 128, SGD,
   synthetic data on the GPU, for the plain backbone and the all-branch code, with cudnn.benchmark
   off/on, bf16 autocast off/on, and channels_last + bf16 + benchmark. Mean of 40 steps after 10.
2. Data loading: one epoch of the Fashion-MNIST training loader (batch 128, training transforms) with
   0, 2 and 4 worker processes, no GPU work.
3. Per op: forward + backward of each IREPS branch alone (conv + BN) at the four stage shapes of the
   network (64x28x28 ... 512x4x4), batch 128, float32 and bf16; and the same weights embedded in a
   zero 3x3 kernel (one plain 3x3 convolution) for the non-3x3 convolution branches.
4. A torch.profiler table of three all-branch training steps, sorted by CUDA time.

    python benchmarks/gpu_train_probe.py        # on a GPU machine; writes results/gpu_train_<gpu>.{json,md}

Without CUDA it exits with status 2 and one line.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from _common import describe_machine, write_results

from irep_deploy import ArchCode, build_model  # noqa: E402
from irep_deploy.ops import REGISTRY  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ((64, 28), (128, 14), (256, 7), (512, 4))


def timed_ms(fn: Callable[[], Any], n: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1000.0


def step_ms(code: Optional[ArchCode], benchmark: bool, bf16: bool, channels_last: bool = False) -> float:
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = benchmark
    torch.manual_seed(0)
    model = build_model("resnet18_cifar", arch=code, width=1.0, num_classes=10, in_channels=1).to(dev).train()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(128, 1, 28, 28, device=dev).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (128,), device=dev)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return timed_ms(step, n=40, warmup=10)


def loader_s(workers: int) -> float:
    from irep_deploy.data import load_data, train_loader
    data = load_data("fashion-mnist", parts=("train",))
    loader = train_loader(data.train, 128, seed=0, workers=workers)
    t0 = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - t0


def embedded_3x3(conv: nn.Conv2d) -> Callable[[], torch.Tensor]:
    """The conv's weights scattered into a zero 3x3 kernel (differentiable), as a function."""
    (kh, kw), (dh, dw) = conv.kernel_size, conv.dilation
    rows = [(2 - dh * (kh - 1)) // 2 + dh * i for i in range(kh)]
    cols = [(2 - dw * (kw - 1)) // 2 + dw * j for j in range(kw)]
    w = conv.weight
    index = (torch.arange(w.shape[0], device=w.device)[:, None, None, None],
             torch.arange(w.shape[1], device=w.device)[None, :, None, None],
             torch.tensor(rows, device=w.device)[None, None, :, None],
             torch.tensor(cols, device=w.device)[None, None, None, :])
    return lambda: w.new_zeros(w.shape[0], w.shape[1], 3, 3).index_put(index, w)


def op_times() -> Dict[str, float]:
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    out: Dict[str, float] = {}
    for ch, hw in STAGES:
        x = torch.randn(128, ch, hw, hw, device=dev, requires_grad=True)
        for bf16 in (False, True):
            for name, spec in REGISTRY.items():
                if name == "identity":
                    continue
                branch = spec.build(ch, ch, 1, 1).to(dev).train()
                key = "{}x{} {} bf16={}".format(ch, hw, name, bf16)

                def native() -> None:
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                        y = branch(x)
                    y.float().sum().backward()
                out[key] = timed_ms(native)
                conv = getattr(branch, "conv", None)
                if isinstance(conv, nn.Conv2d) and conv.kernel_size not in ((1, 1), (3, 3)):
                    kernel = embedded_3x3(conv)

                    def as_3x3() -> None:
                        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                            y = branch.bn(F.conv2d(x, kernel(), None, 1, 1))
                        y.float().sum().backward()
                    out[key + " as3x3"] = timed_ms(as_3x3)
    return out


def profile_table() -> str:
    from torch.profiler import ProfilerActivity, profile
    dev = torch.device("cuda")
    model = build_model("resnet18_cifar", arch=ArchCode.full("resnet18_cifar"), width=1.0, num_classes=10,
                        in_channels=1).to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(128, 1, 28, 28, device=dev), torch.randint(0, 10, (128,), device=dev)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)


def markdown(result: Dict[str, Any]) -> str:
    steps, ops = result["step_ms"], result["op_ms"]
    lines = ["# Where a multi-branch training step spends its time on a GPU", "",
             "Command: `{}`".format(result["command"]), "", "Machine: " + result["machine"]["summary"], ""]
    lines += result.get("notes", [])
    lines += ["## 1. Step time, resnet18_cifar width 1.0, 1x28x28, batch 128 (ms per step)", "",
              "| setting | plain | all branches | ratio |", "|---|---|---|---|"]
    for setting in sorted({k.split(" ", 1)[1] for k in steps}):
        p, f = steps.get("plain " + setting), steps.get("full " + setting)
        lines.append("| {} | {:.1f} | {:.1f} | {:.1f}x |".format(setting, p, f, f / p))
    lines += ["", "## 2. One epoch of the Fashion-MNIST training loader (468 batches of 128), seconds", "",
              "| workers | s |", "|---|---|"]
    lines += ["| {} | {:.1f} |".format(k.split("=")[1], v) for k, v in result["loader_s"].items()]
    lines += ["", "## 3. One branch alone, forward + backward, batch 128 (ms)", "",
              "| shape | op | float32 | bf16 | float32 as a 3x3 | bf16 as a 3x3 |", "|---|---|---|---|---|---|"]
    for ch, hw in STAGES:
        for name in [n for n in REGISTRY if n != "identity"]:
            cells = []
            for suffix in ("bf16=False", "bf16=True", "bf16=False as3x3", "bf16=True as3x3"):
                v = ops.get("{}x{} {} {}".format(ch, hw, name, suffix))
                cells.append("-" if v is None else "{:.2f}".format(v))
            lines.append("| {}x{}x{} | {} | {} |".format(ch, hw, hw, name, " | ".join(cells)))
    lines += ["", "## 4. Profile of three all-branch steps (float32), sorted by CUDA time", "", "```",
              result["profile"], "```", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="results stem (default benchmarks/results/gpu_train_<gpu name>)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_train_probe: no CUDA GPU visible to torch; nothing measured", file=sys.stderr)
        return 2
    machine = describe_machine()
    stem = args.out or str(RESULTS / "gpu_train_{}".format(re.sub(r"[^a-z0-9]+", "_", machine["cuda"].lower()).strip("_")))
    result: Dict[str, Any] = {"command": "python " + " ".join(sys.argv), "machine": machine, "step_ms": {}}
    full = ArchCode.full("resnet18_cifar")
    for name, code in (("plain", None), ("full", full)):
        for benchmark in (False, True):
            for bf16 in (False, True):
                result["step_ms"]["{} benchmark={} bf16={}".format(name, benchmark, bf16)] = step_ms(code, benchmark, bf16)
        result["step_ms"]["{} benchmark=True bf16=True channels_last".format(name)] = step_ms(code, True, True, True)
    result["loader_s"] = {"workers={}".format(w): loader_s(w) for w in (0, 2, 4)}
    result["op_ms"] = op_times()
    result["profile"] = profile_table()
    write_results(stem, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
