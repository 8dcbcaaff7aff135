"""Host syncs per step: training and search steps/s with the running metrics and the
non-finite-loss flag read on the host every step (what the old code did: ``loss.item()``, the flag,
``int(correct)``) against once per ``LOG_EVERY`` steps (the code now), on real Fashion-MNIST.

Both variants run in one process, alternating epoch by epoch, and the result is the median of the
per-round ratios. On a CPU a host read costs nothing (kernels run synchronously), so no gain is
expected here; the point of the change is a GPU, where each read stalls the launch queue. Writes
``results/step_sync_cpu.{json,md}``.

    python benchmarks/bench_step_sync.py            # the recorded run (about five minutes on 2 cores)
    python benchmarks/bench_step_sync.py --quick    # smoke run
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn as nn

from _common import describe_machine, write_results

import irep_deploy.steps as steps_mod  # noqa: E402
import irep_deploy.train as train_mod  # noqa: E402
from irep_deploy import ArchCode, build_model  # noqa: E402
from irep_deploy.data import load_data, set_epoch, train_loader  # noqa: E402
from irep_deploy.search.des import _Search, make_config  # noqa: E402
from irep_deploy.runtime import Dist  # noqa: E402

VARIANTS = {"every step (old)": 1, "every LOG_EVERY steps (new)": steps_mod.LOG_EVERY}


def train_epoch_runner(limit: int, batch: int, work: Path) -> Callable[[], int]:
    data = load_data("fashion-mnist", limit=limit)
    loader = train_loader(data.train, batch, seed=0)
    torch.manual_seed(0)
    code = ArchCode.random("resnet18_cifar", ratio=2 / 3, seed=0)
    model = build_model("resnet18_cifar", arch=code, num_classes=10, width=0.125, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10 ** 6)
    config = train_mod.TrainConfig(backbone="resnet18_cifar", dataset="fashion-mnist", epochs=1)

    def run() -> int:
        set_epoch(loader, 0, 0)
        train_mod._train_epoch(model, loader, opt, sched, train_mod._loss_fn(model, nn.CrossEntropyLoss()),
                               torch.device("cpu"),
                               Dist(), 0, config, False, work)
        return len(loader)
    return run


def search_epoch_runner(limit: int, batch: int, work: Path) -> Callable[[], int]:
    config = make_config("cpu", limit=limit, batch_size=batch, warmup_epochs=100)
    job = _Search(work, config, torch.device("cpu"), Dist(), None, progress=False)

    def run() -> int:
        job.epoch = 0
        job.train_epoch()
        return len(job.loader)
    return run


def measure(runner: Callable[[], int], rounds: int) -> Dict[str, List[float]]:
    steps_per_s: Dict[str, List[float]] = {k: [] for k in VARIANTS}
    steps_mod.LOG_EVERY = VARIANTS["every LOG_EVERY steps (new)"]
    runner()  # warm-up
    for r in range(rounds):
        order = list(VARIANTS.items()) if r % 2 == 0 else list(reversed(VARIANTS.items()))
        for name, every in order:
            steps_mod.LOG_EVERY = every
            t0 = time.perf_counter()
            steps = runner()
            steps_per_s[name].append(steps / (time.perf_counter() - t0))
    steps_mod.LOG_EVERY = VARIANTS["every LOG_EVERY steps (new)"]
    return steps_per_s


def summarise(samples: Dict[str, List[float]]) -> Dict[str, object]:
    old, new = (samples[k] for k in VARIANTS)
    ratios = [n / o for n, o in zip(new, old)]
    return {"steps_per_s": {k: {"median": statistics.median(v), "samples": v} for k, v in samples.items()},
            "new_over_old": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "step_sync_cpu"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    limit, batch, rounds = (640, 64, 2) if args.quick else (1280, 64, args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        result = {
            "command": "python benchmarks/bench_step_sync.py" + (" --quick" if args.quick else ""),
            "machine": describe_machine(), "rounds": rounds, "train_examples": limit, "batch": batch,
            "log_every": steps_mod.LOG_EVERY,
            "train": summarise(measure(train_epoch_runner(limit, batch, Path(tmp)), rounds)),
            "search": summarise(measure(search_epoch_runner(limit, batch, Path(tmp) / "s"), rounds)),
        }
    lines = ["# Host reads per step: steps/s (CPU)", "",
             "`{}` on {}; {} rounds, variants alternating; resnet18_cifar width 0.125 on {} Fashion-MNIST "
             "images, batch {} (train: a random 2/3 code; search: the `cpu` preset's SuperNet, B = 2).".format(
                 result["command"], result["machine"]["summary"], rounds, limit, batch), "",
             "| loop | host read every step (old) | every {} steps (new) | new / old (median, range) |".format(
                 steps_mod.LOG_EVERY), "|---|---|---|---|"]
    for loop in ("train", "search"):
        s = result[loop]
        old, new = (s["steps_per_s"][k]["median"] for k in VARIANTS)
        r = s["new_over_old"]
        lines.append("| {} | {:.2f} steps/s | {:.2f} steps/s | {:.3f} ({:.3f}-{:.3f}) |".format(
            loop, old, new, r["median"], r["min"], r["max"]))
    lines += ["", "On a CPU a host read does not wait for anything (kernels run synchronously), so no gain is "
              "expected: where the per-round ratios span 1, no difference is measurable at this machine's noise "
              "(other processes share its cores; see the samples in the JSON file). The change is for GPUs, where "
              "it lets the host queue the next steps while the GPU works. Not measured on a GPU (none was "
              "available)."]
    write_results(args.out, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
