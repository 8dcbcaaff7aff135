"""GPU speed of training and search steps (issue 23): one run, one file, under 8 minutes on an H100/H200.

(a) Step table: full-width resnet18_cifar on 1x28x28, batch 128, SGD momentum; the plain backbone, every
    branch, and a random code at 2/3 of the branches; each eager and whole-step captured (CUDA graph),
    float32 and bf16 + channels_last. ms per step = median of per-round means over interleaved rounds, with
    spreads; every ratio to the plain network of the same setting and to the plain network's fastest
    setting (benchstats: median of per-round ratios, interval, verdict widened by an A/A control: the
    plain network timed twice). Target: every branch at its fastest <= 5x plain at its fastest.
(b) Search step, B = 5 codes at 2/3 (SuperNet.forward + averaged_loss + backward + SGD/Adam steps) as the
    eager search step runs it, and the static search step (irep_deploy.search.static_step), sequential and
    batched, eager and captured, fp32 and bf16 + channels_last. Target: <= 4x five plain steps (the plain
    network at its fastest setting).
(c) One training epoch of the ``paper-cifar`` search on Fashion-MNIST and one epoch of ``train`` with every
    branch, each as a ratio to one epoch of the plain network in the same run. Target: search epoch <= 40 s.
    An epoch that would not fit the time left runs on fewer examples and is extrapolated (said so).
(d) torchvision-layout resnet18 at 224 px, batch 64: plain vs every branch, eager vs captured.
(e) torch.profiler table of 3 every-branch steps (captured where CUDA graphs run), top kernels.

Captured steps are the project's (irep_deploy.graphs.StepGraph, make_capturable, make_train_step; the
search's static step as des.py builds it). Without CUDA it exits with status 2 and one line;
``--device cpu --smoke`` runs every section at tiny size on the CPU (captured settings are skipped there:
CUDA graphs need CUDA). Writes ``results/gpu_speed_<gpu>.{json,md}`` (``--out DIR``: into DIR).

    python benchmarks/gpu_speed.py                               # on a GPU machine: the record
    python benchmarks/gpu_speed.py --device cpu --smoke --out /tmp/s
"""
from __future__ import annotations

import argparse
import gc
import os
import random
import re
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from _common import describe_machine, gpu_device_refusal, write_results
from benchstats import judge, ratio_cell, ratio_stats, verdict_text

from irep_deploy import ArchCode, build_model  # noqa: E402
from irep_deploy.bench.latency import spread  # noqa: E402
from irep_deploy.data import FASHION_MNIST_ROOT  # noqa: E402
from irep_deploy.search.population import initial_population  # noqa: E402
from irep_deploy.graphs import WARMUP as StepGraph_WARMUP, StepGraph, make_capturable, make_train_step  # noqa: E402
from irep_deploy.runtime import autocast  # noqa: E402
from irep_deploy.search.static_step import StaticSearchStep, graphed_step  # noqa: E402
from irep_deploy.search.supernet import SuperNet, averaged_loss  # noqa: E402
from irep_deploy.steps import optimizer_step  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CIFAR = "resnet18_cifar"
Fn = Callable[[], Any]


def sizes(smoke: bool) -> Dict[str, Any]:
    if smoke:
        return dict(width=0.125, batch=8, rounds=2, iters=1, warmup=1, subnets=5, population=8, tv_width=0.125,
                    tv_size=32, tv_batch=4, tv_rounds=2, tv_iters=1, epoch_width=0.125, epoch_limit=160,
                    epoch_batch=32, workers=0, budget_s=120.0)
    return dict(width=1.0, batch=128, rounds=7, iters=6, warmup=3, subnets=5, population=16, tv_width=1.0,
                tv_size=224, tv_batch=64, tv_rounds=5, tv_iters=3, epoch_width=1.0, epoch_limit=None,
                epoch_batch=128, workers=4, budget_s=450.0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- steps ------------------------------------------------------------------------------------------
def _cosine(opt: torch.optim.Optimizer) -> Any:
    """The per-batch cosine schedule train and the search step every iteration."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10 ** 6)


def classifier_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool, captured: bool,
                    warmup: int) -> Fn:
    """A training step of ``model`` (SGD momentum 0.9, weight decay, cosine per batch) on the fixed
    batch (x, y) as ``train`` takes it: eager (steps.optimizer_step, the unfused optimizer) or captured
    (graphs.make_capturable + make_train_step in a StepGraph, what ``train --cuda-graph`` runs)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sched = _cosine(opt)
    amp = "bf16" if bf16 else "none"
    criterion = nn.CrossEntropyLoss()

    def loss_of(xb: torch.Tensor, yb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out = model(xb)
        return criterion(out.float(), yb), out

    if captured:
        schedule = make_capturable([opt], sched, x.device)
        graph = StepGraph(make_train_step(loss_of, [opt], schedule, x.device, amp=amp), x.device)
        step: Fn = lambda: graph(x, y)  # noqa: E731
    else:
        def step() -> Any:
            opt.zero_grad(set_to_none=True)
            with autocast(amp, x.device):
                loss, _ = loss_of(x, y)
            optimizer_step(loss, [opt], sched)
            return loss
    for _ in range(warmup + (StepGraph_WARMUP if captured else 0)):  # a StepGraph captures after its warm-up
        step()
    return step


SETTINGS = (("eager fp32", False, False), ("eager bf16+cl", False, True),
            ("captured fp32", True, False), ("captured bf16+cl", True, True))


def settings_for(device: torch.device) -> List[Tuple[str, bool, bool]]:
    return [s for s in SETTINGS if device.type == "cuda" or not s[1]]


def net_step(backbone: str, code: Optional[ArchCode], width: float, in_channels: int, classes: int,
             batch: int, size: int, setting: Tuple[str, bool, bool], warmup: int, device: torch.device) -> Fn:
    _, captured, bf16 = setting
    layout = torch.channels_last if bf16 else torch.contiguous_format  # bf16 settings run NHWC
    torch.manual_seed(0)
    model = build_model(backbone, arch=code, width=width, num_classes=classes, in_channels=in_channels)
    model = model.to(device).train().to(memory_format=layout)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, in_channels, size, size, generator=gen).to(device).contiguous(memory_format=layout)
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    return classifier_step(model, x, y, bf16, captured, warmup)


# -- timing -----------------------------------------------------------------------------------------
def interleaved(fns: Dict[str, Fn], rounds: int, iters: int, device: torch.device) -> Dict[str, List[float]]:
    """ms per call of each function, one mean per round; the order rotates (and reverses every other
    round) so drift and warm caches fall on every function alike."""
    names = list(fns)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in (order if r % 2 == 0 else order[::-1]):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                fns[name]()
            sync(device)
            times[name].append((time.perf_counter() - t0) / iters * 1000.0)
    return times


def summary(ms: Sequence[float]) -> Dict[str, Any]:
    return {"median_ms": statistics.median(ms), "spread": spread(ms), "rounds_ms": list(ms)}


def fastest(times: Dict[str, List[float]], keys: Sequence[str]) -> str:
    return min(keys, key=lambda k: statistics.median(times[k]))


# -- (a) the step table -----------------------------------------------------------------------------
def random_code(backbone: str, ratio: float, seed: int) -> ArchCode:
    """A code at ``ratio`` of the branches, drawn as the search draws its initial population."""
    template = ArchCode.full(backbone)
    return initial_population(template, 1, template.budget(ratio), random.Random(seed))[0]


def step_table(device: torch.device, size: Dict[str, Any]) -> Dict[str, Any]:
    nets = [("plain", None), ("every branch", ArchCode.full(CIFAR)), ("random 2/3", random_code(CIFAR, 2 / 3, 0))]
    settings = settings_for(device)
    fns: Dict[str, Fn] = {}
    for s in settings:
        for name, code in nets + [("plain A/A", None)]:
            fns["{} @ {}".format(name, s[0])] = net_step(CIFAR, code, size["width"], 1, 10, size["batch"], 28, s,
                                                         size["warmup"], device)
    times = interleaved(fns, size["rounds"], size["iters"], device)
    plain_keys = ["plain @ " + s[0] for s in settings]
    plain_best = fastest(times, plain_keys)
    aa = {s[0]: ratio_stats(times["plain A/A @ " + s[0]], times["plain @ " + s[0]]) for s in settings}
    rows = []
    for name, code in nets:
        for s in settings:
            key = "{} @ {}".format(name, s[0])
            rows.append(dict(network=name, setting=s[0], branches=code.count() if code else 0, **summary(times[key]),
                             vs_plain_same=ratio_stats(times[key], times["plain @ " + s[0]]),
                             vs_plain_fastest=ratio_stats(times[key], times[plain_best])))
    full_best = fastest(times, ["every branch @ " + s[0] for s in settings])
    target = ratio_stats(times[full_best], times[plain_best])
    return {"model": CIFAR, "width": size["width"], "batch": size["batch"], "input": "1x28x28",
            "settings": [s[0] for s in settings], "rows": rows, "aa": aa, "plain_fastest": plain_best.split(" @ ")[1],
            "skipped_settings": [] if device.type == "cuda" else ["captured: CUDA graphs need CUDA"],
            "targets": [{"what": "every branch at its fastest ({}) / plain at its fastest ({})".format(
                full_best.split(" @ ")[1], plain_best.split(" @ ")[1]), "ratio": target,
                "judged": judge(target, aa[plain_best.split(" @ ")[1]], 5.0)}]}


# -- (b) the search step ----------------------------------------------------------------------------
def _supernet(size: Dict[str, Any], device: torch.device) -> Tuple[SuperNet, Any, Any]:
    torch.manual_seed(0)
    supernet = SuperNet(build_model(CIFAR, width=size["width"], num_classes=10, in_channels=1, supernet=True))
    supernet = supernet.to(device).train()
    w_opt = torch.optim.SGD(supernet.weight_parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    a_opt = torch.optim.Adam(supernet.arch_parameters(), lr=1e-4, betas=(0.5, 0.999))  # des.py's settings
    return supernet, w_opt, a_opt


SEARCH_VARIANTS = [(layout, captured, bf16) for captured in (False, True) for bf16 in (False, True)
                   for layout in ("sequential", "batched")]


def search_steps(device: torch.device, size: Dict[str, Any]) -> Dict[str, Any]:
    template = ArchCode.full(CIFAR)
    population = initial_population(template, size["population"], template.budget(2 / 3), random.Random(0))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(size["batch"], 1, 28, 28, generator=gen).to(device)
    y = torch.randint(0, 10, (size["batch"],), generator=gen).to(device)
    criterion = nn.CrossEntropyLoss()

    def picker() -> Callable[[], List[ArchCode]]:  # B codes of the population per step, as des.py draws them
        rng = random.Random(2)
        return lambda: [population[rng.randrange(len(population))] for _ in range(size["subnets"])]

    supernet, w_opt, a_opt = _supernet(size, device)
    sched = _cosine(w_opt)
    pick = picker()

    def eager_search() -> None:  # des.py's eager step: loss_of + steps.optimizer_step, no scaler
        outputs = supernet(x, pick())
        loss = averaged_loss([o.float() for o in outputs], y, criterion)
        w_opt.zero_grad(set_to_none=True)
        a_opt.zero_grad(set_to_none=True)
        optimizer_step(loss, [w_opt, a_opt], sched)
    fns: Dict[str, Fn] = {"search eager (today)": eager_search}
    notes: List[str] = []
    plain = settings_for(device)
    for s in plain:
        fns["plain @ " + s[0]] = net_step(CIFAR, None, size["width"], 1, 10, size["batch"], 28, s, size["warmup"], device)
    fns["plain A/A @ eager fp32"] = net_step(CIFAR, None, size["width"], 1, 10, size["batch"], 28, SETTINGS[0],
                                             size["warmup"], device)
    for layout, captured, bf16 in SEARCH_VARIANTS:
        name = "search static {}{}{}".format(layout, " captured" if captured else " eager", " bf16+cl" if bf16 else " fp32")
        if captured and device.type != "cuda":
            notes.append("{}: skipped (CUDA graphs need CUDA)".format(name))
            continue
        try:  # a static step that refuses or breaks is a note; today's step is still timed
            net, w, a = _supernet(size, device)
            nhwc = torch.channels_last if bf16 else torch.contiguous_format
            net = net.to(memory_format=nhwc)
            xs = x.contiguous(memory_format=nhwc)
            # the search's own construction of the step (des._Search._static_step)
            graph, _, static = graphed_step(net, w, a, _cosine(w), criterion, device, batched=layout == "batched",
                                            capture=captured, amp="bf16" if bf16 else "none")
            codes = picker()

            def step(graph: Callable[..., Any] = graph, static: StaticSearchStep = static,
                     codes: Callable[[], Any] = codes, xs: torch.Tensor = xs) -> None:
                graph(xs, y, static.gates(codes()))
            for _ in range(size["warmup"] + (StepGraph_WARMUP if captured else 0)):
                step()
            fns[name] = step
        except Exception as exc:
            notes.append("{}: failed ({}: {})".format(name, type(exc).__name__, str(exc).split("\n")[0][:200]))
    for _ in range(size["warmup"]):
        eager_search()
    times = interleaved(fns, size["rounds"], size["iters"], device)
    plain_keys = ["plain @ " + s[0] for s in plain]
    plain_best = fastest(times, plain_keys)
    five = [5 * t for t in times[plain_best]]
    aa = ratio_stats(times["plain A/A @ eager fp32"], times["plain @ eager fp32"])
    rows = []
    for key in fns:
        row = dict(step=key, **summary(times[key]))
        if key.startswith("search"):
            row["vs_five_plain"] = ratio_stats(times[key], five)
            row["vs_today"] = ratio_stats(times[key], times["search eager (today)"])
            row["judged"] = judge(row["vs_five_plain"], aa, 4.0)
        rows.append(row)
    return {"model": CIFAR, "width": size["width"], "batch": size["batch"], "subnets": size["subnets"],
            "budget": "2/3", "branches_per_code": population[0].count(), "rows": rows, "aa": aa,
            "plain_fastest": plain_best.split(" @ ")[1], "notes": notes}


# -- (c) epochs -------------------------------------------------------------------------------------
def epochs(device: torch.device, size: Dict[str, Any], dataset: str, data_root: Optional[str], seconds_left: float,
           step_ms: Dict[str, Optional[float]]) -> Dict[str, Any]:
    """One training epoch each: the plain network, the search (paper-cifar settings on Fashion-MNIST),
    every branch. The search and every-branch epochs are given what time is left (their step times
    from (a)/(b) project how long a whole epoch takes); one that would not fit runs on fewer examples
    and its time is scaled to the whole epoch (``extrapolated``)."""
    from irep_deploy.data import load_data
    from irep_deploy.runtime import Dist
    from irep_deploy.search.des import _Search, make_config
    from irep_deploy.train import make_train_config, train

    root = data_root or FASHION_MNIST_ROOT
    if dataset == "fashion-mnist" and not os.path.isdir(root):
        return {"skipped": "Fashion-MNIST is not at {} (the Debian package dataset-fashion-mnist, or --data-root)"
                .format(root)}
    examples = len(load_data(dataset, data_root, parts=("train",)).train)
    if size["epoch_limit"] is not None:
        examples = min(examples, size["epoch_limit"])
    batch, started = size["epoch_batch"], time.perf_counter()
    out: Dict[str, Any] = {"dataset": dataset, "batch": batch, "width": size["epoch_width"],
                           "workers": size["workers"], "rows": []}

    def limit_for(name: str, train_examples: int, share: float) -> Optional[int]:
        """None (the whole epoch) when its projected time fits ``share`` of the time left, else a
        limit of examples that does (the search carves its validation split out of those)."""
        left = (seconds_left - (time.perf_counter() - started)) * share
        ms = step_ms.get(name)
        if ms is None or size["epoch_limit"] is not None:
            return size["epoch_limit"]
        steps_fit = int(left * 1000.0 / ms)
        if steps_fit >= train_examples // batch:
            return None
        return max(steps_fit, 2) * batch

    def row(name: str, seconds: float, measured: int, whole: int, limited: bool) -> None:
        scale = whole / measured if limited and size["epoch_limit"] is None else 1.0  # a smoke run is not scaled
        out["rows"].append({"run": name, "seconds_measured": seconds, "examples": measured, "seconds": seconds * scale,
                            "extrapolated": scale != 1.0})

    def train_epoch(name: str, code: Optional[ArchCode], limit: Optional[int]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            config = make_train_config(backbone=CIFAR, arch=code.dumps() if code else None, dataset=dataset,
                                       width=size["epoch_width"], epochs=1, batch_size=batch, limit=limit)
            report = train(Path(tmp) / "run", config, data_root=data_root, device=device.type,
                           workers=size["workers"], progress=False)
        record = report.history[0]
        row(name, record["seconds"], record["examples"], examples, limit is not None)

    def search_epoch(limit: Optional[int], today: bool) -> None:
        config = make_config("paper-cifar", dataset=dataset, width=size["epoch_width"], batch_size=batch,
                             limit=limit, device_data="off" if today else "auto")
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            run.mkdir()
            how = dict(search_step="eager", cuda_graph="off") if today else dict(search_step="auto", cuda_graph="auto")
            search = _Search(run, config, device, Dist(), data_root, progress=False, workers=size["workers"], **how)
            try:  # the search's training epoch (B codes per batch); the population scoring is not in it
                sync(device)
                t0 = time.perf_counter()
                search.train_epoch()
                sync(device)
                seconds = time.perf_counter() - t0
            finally:
                if search.writer is not None:
                    search.writer.close()
        what = "eager step, DataLoader" if today else "step {}{}, --device-data auto".format(
            search.static or "eager", " captured" if search.capture else "")
        row("search (paper-cifar, B={}, 2/3; {})".format(config.subnets, what), seconds, len(search.data.train),
            search_examples, limit is not None)

    train_epoch("plain", None, size["epoch_limit"])
    search_examples = int(examples * (1 - 0.1))  # the search holds out its 10 % validation split
    search_epoch(limit_for("search", search_examples, 0.4), today=False)
    search_epoch(limit_for("search today", search_examples, 0.5), today=True)
    train_epoch("every branch", ArchCode.full(CIFAR), limit_for("every branch", examples, 0.9))
    plain = out["rows"][0]["seconds"]
    for record in out["rows"]:
        record["vs_plain"] = record["seconds"] / plain
    search = out["rows"][1]["seconds"]
    verdict = "met" if search <= 40.0 else "missed"
    if size["epoch_limit"] is not None:  # a smoke run's few examples say nothing about a whole epoch
        verdict = "not judged (a limited smoke run)"
    elif out["rows"][1]["extrapolated"]:
        verdict += " (extrapolated)"
    out["target"] = {"what": "one search epoch <= 40 s", "seconds": search, "verdict": verdict}
    return out


# -- (d) torchvision-layout resnet18 ----------------------------------------------------------------
def torchvision_layout(device: torch.device, size: Dict[str, Any]) -> Dict[str, Any]:
    # bf16 + channels_last only: the setting a 224-pixel run would use, and two graphs of every-branch
    # activations at batch 64 (fp32 and bf16) would crowd an 80 GB card
    settings = [s for s in settings_for(device) if s[0] in ("eager bf16+cl", "captured bf16+cl")]
    fns: Dict[str, Fn] = {}
    for s in settings:
        for name, code in (("plain", None), ("every branch", ArchCode.full("resnet18")), ("plain A/A", None)):
            fns["{} @ {}".format(name, s[0])] = net_step("resnet18", code, size["tv_width"], 3, 1000,
                                                         size["tv_batch"], size["tv_size"], s, size["warmup"], device)
    times = interleaved(fns, size["tv_rounds"], size["tv_iters"], device)
    rows = []
    for s in settings:
        same = "plain @ " + s[0]
        for name in ("plain", "every branch"):
            key = "{} @ {}".format(name, s[0])
            rows.append(dict(network=name, setting=s[0], **summary(times[key]),
                             vs_plain_same=ratio_stats(times[key], times[same])))
    aa = {s[0]: ratio_stats(times["plain A/A @ " + s[0]], times["plain @ " + s[0]]) for s in settings}
    return {"model": "resnet18", "width": size["tv_width"], "input": "3x{0}x{0}".format(size["tv_size"]),
            "batch": size["tv_batch"], "rows": rows, "aa": aa}


# -- (e) profile ------------------------------------------------------------------------------------
def profile(device: torch.device, size: Dict[str, Any]) -> Dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    captured = device.type == "cuda"
    step = net_step(CIFAR, ArchCode.full(CIFAR), size["width"], 1, 10, size["batch"], 28,
                    SETTINGS[2] if captured else SETTINGS[0], size["warmup"], device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return {"steps": 3, "mode": "captured fp32" if captured else "eager fp32", "sort_by": key,
            "table": prof.key_averages().table(sort_by=key, row_limit=30)}


# -- the record -------------------------------------------------------------------------------------
def _ms_cell(row: Dict[str, Any]) -> str:
    return "{:.2f} (spread {:.0%})".format(row["median_ms"], row["spread"])


def markdown(result: Dict[str, Any]) -> str:
    lines = ["# GPU speed of training and search steps", "", "Command: `{}`".format(result["command"]), "",
             "Machine: " + result["machine"]["summary"], ""]
    if result.get("smoke"):
        lines += ["**A smoke run**: tiny sizes on the {}, to show the script and the steps run; its times say "
                  "nothing about a GPU, and nothing here was captured (CUDA graphs need CUDA).".format(
                      result["machine"]["summary"].split(" (")[0]), ""]
    lines += ["## Sections", "", "| section | status |", "|---|---|"]
    lines += ["| {} | {} |".format(k, v) for k, v in result["status"].items()]
    lines += ["", "Captured steps are the project's own (graphs.StepGraph with make_capturable: fused optimizers, "
              "cosine schedule on the device); eager steps are steps.optimizer_step with the unfused optimizers, "
              "as train and the search take them without --cuda-graph.", ""]
    a = result.get("step_table")
    if a:
        lines += ["## (a) Step table: {} width {}, {}, batch {} (ms per step)".format(a["model"], a["width"],
                                                                                    a["input"], a["batch"]), "",
                  "Plain network's fastest setting: {}.".format(a["plain_fastest"]), "",
                  "| network | setting | ms (spread) | / plain, same setting | / plain, its fastest |",
                  "|---|---|---|---|---|"]
        lines += ["| {} | {} | {} | {} | {} |".format(r["network"], r["setting"], _ms_cell(r),
                                                      ratio_cell(r["vs_plain_same"]), ratio_cell(r["vs_plain_fastest"]))
                  for r in a["rows"]]
        lines += ["", "A/A (plain timed twice): " + "; ".join("{}: {}".format(k, ratio_cell(v))
                                                               for k, v in a["aa"].items()), ""]
        lines += ["- skipped: " + s for s in a["skipped_settings"]]
        lines += ["- target: {}: {} -> {}".format(t["what"], ratio_cell(t["ratio"]), verdict_text(t["judged"]))
                  for t in a["targets"]] + [""]
    b = result.get("search_step")
    if b:
        lines += ["## (b) Search step: B={} codes at {} ({} branches each), batch {} (ms per step)".format(
            b["subnets"], b["budget"], b["branches_per_code"], b["batch"]), "",
            "Five plain steps: the plain network's fastest setting here ({}).".format(b["plain_fastest"]), "",
            "| step | ms (spread) | / today's eager step | / five plain steps | target <= 4x |", "|---|---|---|---|---|"]
        for r in b["rows"]:
            judged = r.get("judged")
            lines.append("| {} | {} | {} | {} | {} |".format(
                r["step"], _ms_cell(r), ratio_cell(r["vs_today"]) if judged else "-",
                ratio_cell(r["vs_five_plain"]) if judged else "-", verdict_text(judged) if judged else "-"))
        lines += ["", "A/A (plain eager fp32 timed twice): " + ratio_cell(b["aa"]), ""]
        lines += ["- " + n for n in b["notes"]] + [""]
    c = result.get("epochs")
    if c:
        lines += ["## (c) One training epoch on {}".format(c.get("dataset", "Fashion-MNIST")), ""]
        if "skipped" in c:
            lines += ["Skipped: " + c["skipped"], ""]
        else:
            lines += ["width {}, batch {}, {} loader workers.".format(c["width"], c["batch"], c["workers"]), "",
                      "| run | examples | s measured | s per epoch | / plain |", "|---|---|---|---|---|"]
            lines += ["| {} | {} | {:.1f} | {:.1f}{} | {:.2f}x |".format(
                r["run"], r["examples"], r["seconds_measured"], r["seconds"], " (extrapolated)" if r["extrapolated"]
                else "", r["vs_plain"]) for r in c["rows"]]
            lines += ["", "- target: {}: {:.1f} s -> {}".format(c["target"]["what"], c["target"]["seconds"],
                                                                c["target"]["verdict"].upper()), ""]
    d = result.get("torchvision")
    if d:
        lines += ["## (d) {} width {}, {}, batch {} (ms per step)".format(d["model"], d["width"], d["input"],
                                                                          d["batch"]), "",
                  "| network | setting | ms (spread) | / plain, same setting |", "|---|---|---|---|"]
        lines += ["| {} | {} | {} | {} |".format(r["network"], r["setting"], _ms_cell(r), ratio_cell(r["vs_plain_same"]))
                  for r in d["rows"]]
        lines += ["", "A/A: " + "; ".join("{}: {}".format(k, ratio_cell(v)) for k, v in d["aa"].items()), ""]
    e = result.get("profile")
    if e:
        lines += ["## (e) Profile of {} every-branch steps ({}), sorted by {}".format(e["steps"], e["mode"],
                                                                                     e["sort_by"]), "", "```",
                  e["table"], "```", ""]
    return "\n".join(lines) + "\n"


SECTIONS = (("step_table", "(a) step table"), ("search_step", "(b) search step"), ("torchvision", "(d) resnet18 224"),
            ("profile", "(e) profile"), ("epochs", "(c) epochs"))


def main(argv: Sequence[str] = ()) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --smoke only)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script's code paths in seconds")
    p.add_argument("--out", help="directory of the results files (default benchmarks/results)")
    p.add_argument("--budget-s", type=float, help="seconds the whole run may take: section (c), last, gets "
                   "what is left (default 450; smoke 120)")
    p.add_argument("--epoch-dataset", default="fashion-mnist", choices=("fashion-mnist", "digits"),
                   help="data of section (c) (digits: sklearn's 8x8 digits, for a smoke run without Fashion-MNIST)")
    p.add_argument("--data-root", help="directory of the Fashion-MNIST files (default {})".format(FASHION_MNIST_ROOT))
    args = p.parse_args(list(argv) or None)
    refusal = gpu_device_refusal("gpu_speed", args.device, args.smoke)
    if refusal is None and args.budget_s is not None and not args.budget_s > 0:
        refusal = "gpu_speed: --budget-s must be a positive number of seconds, got {}".format(args.budget_s)
    if refusal is not None:
        print(refusal, file=sys.stderr)
        return 2
    started = time.perf_counter()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    size = sizes(args.smoke)
    if args.budget_s is not None:
        size["budget_s"] = args.budget_s
    machine = describe_machine()
    gpu = re.sub(r"[^a-z0-9]+", "_", (machine["cuda"] or "cpu").lower()).strip("_")
    stem = Path(args.out or RESULTS) / "gpu_speed_{}".format(gpu)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/gpu_speed.py"] + list(argv or sys.argv[1:]))
    result: Dict[str, Any] = {"command": command, "machine": machine, "smoke": args.smoke, "sizes": size,
                              "status": {title: "not run yet" for _, title in SECTIONS}}
    for key, title in SECTIONS:
        t0 = time.perf_counter()
        try:
            if key == "step_table":
                result[key] = step_table(device, size)
            elif key == "search_step":
                result[key] = search_steps(device, size)
            elif key == "torchvision":
                result[key] = torchvision_layout(device, size)
            elif key == "profile":
                result[key] = profile(device, size)
            else:
                step_ms: Dict[str, Optional[float]] = {}
                a, b = result.get("step_table"), result.get("search_step")
                # the epochs take the paths train and search take by default here: captured on CUDA
                setting = "captured fp32" if device.type == "cuda" else "eager fp32"
                for row in (a or {}).get("rows", []):
                    if row["setting"] == setting:
                        step_ms[row["network"]] = row["median_ms"]
                new = "search static batched {} fp32".format("captured" if device.type == "cuda" else "eager")
                for row in (b or {}).get("rows", []):
                    if row["step"] == "search eager (today)":
                        step_ms["search today"] = row["median_ms"]
                    elif row["step"] == new:
                        step_ms["search"] = row["median_ms"]
                left = size["budget_s"] - (time.perf_counter() - started)
                result[key] = epochs(device, size, args.epoch_dataset, args.data_root, left, step_ms)
            skipped = result[key].get("skipped")
            result["status"][title] = ("skipped: " + skipped) if skipped else "ran ({:.0f} s)".format(
                time.perf_counter() - t0)
        except Exception as exc:  # a section that fails is recorded as such; the others still run
            result["status"][title] = "failed: {}: {}".format(type(exc).__name__, str(exc).splitlines()[0][:200]
                                                              if str(exc) else "")
            print("gpu_speed: section {} failed:\n{}".format(title, traceback.format_exc()), file=sys.stderr)
        result["seconds"] = time.perf_counter() - started
        gc.collect()  # the section's models and graphs go before the next section's are built
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write_results(stem, result, markdown(result))  # each section is kept as soon as it is measured
    return 0 if not any(s.startswith("failed") for s in result["status"].values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
