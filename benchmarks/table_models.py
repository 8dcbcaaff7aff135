"""Paper Table 2/3 style rows: parameters, latency (multi-branch vs fused vs plain) and accuracy.

Part 1 (Table 2 style, Fashion-MNIST 28x28, 1 channel): for every accuracy results file of
``evidence_fmnist.py`` given with ``--accuracy`` (one per backbone), the four codes of that run
(plain, all branches, random at C, DES at C) with

- parameters as trained (multi-branch, BN, alpha/beta) and as deployed (fused),
- latency of the multi-branch network, its fused form, the plain backbone (BN folded) and the plain
  backbone again (A/A control), timed by ``irep_deploy.bench``'s jobs and rounds (what ``irep-deploy
  bench --compare`` runs, plus the control) on torch eager and onnxruntime CPU at batch 1 and 32 in
  one run per code, rounds interleaved; every ratio with its per-round spread (UNTRUSTED above 10 %)
  and interval, fused / plain judged against 1.02 (``benchstats.judge``),
- the retrained test top-1 of that results file (mean +- std over its seeds; fused = multi-branch).

Part 2 (Table 3 style, 224x224, 1000 classes): the ImageNet backbones with all branches and with a
random code at 2/3 of the capacity: parameters and torch latency at batch 1. No accuracy: that
needs ImageNet training, which this machine cannot do (the column says so).

Latency does not depend on the weights, so every network is built with fresh weights from its
code. Also writes ``points.json`` and the accuracy-vs-latency figure (paper Fig. 1 style) of part 1.

    python benchmarks/table_models.py            # the recorded run (about 15 min on 2 idle cores)
    python benchmarks/table_models.py --quick --out /tmp/tm/table_models   # smoke run

Writes ``results/table_models.{json,md}`` and ``results/figures/table_models/accuracy_latency.{png,json}``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torchvision

from _common import describe_machine, write_json, write_results
from benchstats import judge, ratio_cell, ratio_stats, verdict_text  # noqa: E402
from runs import fmt  # noqa: E402

from irep_deploy import ArchCode, build_model, fuse_model  # noqa: E402
from irep_deploy.bench.latency import Variant, build_jobs, run_rounds, summarise  # noqa: E402
from irep_deploy.engines import ort as ort_helpers  # noqa: E402
from irep_deploy.viz import plot_points  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
EVIDENCE = ("evidence_fmnist.json", "evidence_fmnist_vgg16.json")
VARIANTS = ("plain", "full", "random", "des")
LABELS = {"plain": "plain backbone", "full": "all branches", "random": "random at C", "des": "DES at C"}
TARGET = 1.02  # fused / plain, docs/performance.md
#: ratio name -> (numerator, denominator) variants
RATIOS = {"fused_over_plain": ("fused", "plain"), "multi_branch_over_fused": ("multi-branch", "fused"),
          "aa_plain_again_over_plain": ("plain-again", "plain")}


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def latency(model: torch.nn.Module, plain: torch.nn.Module, input_size: int, backends: Sequence[str],
            batches: Sequence[int], duration: float, rounds: int, threads: int) -> Dict[str, Any]:
    """The multi-branch ``model``, its fused form, the plain backbone with BN folded and that again
    (A/A), timed in interleaved rounds as ``irep-deploy bench --compare`` times them; medians, CVs and
    per (backend, batch) the ratios of per-round medians (:func:`benchstats.ratio_stats`)."""
    plain = fuse_model(plain.eval(), check=False)
    variants = [Variant("multi-branch", model), Variant("fused", fuse_model(model, check=False)),
                Variant("plain", plain), Variant("plain-again", copy.deepcopy(plain))]
    torch.set_num_threads(threads)
    shape = {"in_channels": model.irep_config["in_channels"], "input_size": input_size}
    jobs, _ = build_jobs(variants, backends, batches, shape, input_size, torch.device("cpu"),
                         ort_helpers.resolve_providers(["cpu"]), threads)
    results = summarise(jobs, run_rounds(jobs, rounds, 200.0, duration, 10))
    key = "{}|{}|{}".format
    by = {key(r.variant, r.backend, r.batch): r for r in results}
    table = []
    for backend, batch in dict.fromkeys((r.backend, r.batch) for r in results):
        q: Dict[str, Any] = {"backend": backend, "batch": batch}
        for name, (top, bottom) in RATIOS.items():
            q[name] = ratio_stats(by[key(top, backend, batch)].round_medians, by[key(bottom, backend, batch)].round_medians)
        q["target"] = judge(q["fused_over_plain"], q["aa_plain_again_over_plain"], TARGET)
        table.append(q)
    return {"median_ms": {k: r.host.median for k, r in by.items()}, "cv": {k: r.host.cv for k, r in by.items()},
            "round_medians_ms": {k: r.round_medians for k, r in by.items()}, "ratios": table}


def codes_of(evidence: Dict[str, Any]) -> Dict[str, Optional[ArchCode]]:
    """The codes that ``evidence_fmnist.py`` retrained (the random one of its first seed)."""
    backbone = evidence["recipe"]["backbone"]
    seed = evidence["seeds"][0]
    return {"plain": None, "full": ArchCode.full(backbone),
            "random": ArchCode.random(backbone, ratio=evidence["budget_ratio"], seed=10_000 + seed),
            "des": ArchCode.loads(evidence["search"]["code"]) if evidence.get("search") else None}


def fmnist_rows(evidence_files: Sequence[Path], args: argparse.Namespace) -> List[Dict[str, Any]]:
    rows = []
    for path in evidence_files:
        evidence = json.loads(path.read_text())
        recipe = evidence["recipe"]
        codes = codes_of(evidence)
        for variant in VARIANTS:
            if variant == "des" and codes["des"] is None:
                continue
            code = codes[variant]
            model = build_model(recipe["backbone"], arch=code, num_classes=10, width=recipe["width"],
                                in_channels=1).eval()
            plain = build_model(recipe["backbone"], num_classes=10, width=recipe["width"], in_channels=1)
            acc = evidence["summary"]["variants"][variant]
            row = {"backbone": recipe["backbone"], "width": recipe["width"], "variant": variant,
                   "branches": code.count() if code is not None else 0, "params_trained": params(model),
                   "params_deployed": params(fuse_model(model)), "top1_mean": acc["mean"], "top1_std": acc["std"],
                   "top1_n": acc["n"], "accuracy_source": os.path.relpath(str(path), str(RESULTS.parent.parent))}
            print("{} {}: timing".format(recipe["backbone"], variant), flush=True)
            row["latency"] = latency(model, plain, 28, args.backends, args.batches, args.duration, args.rounds,
                                     args.threads)
            rows.append(row)
    return rows


def imagenet_rows(backbones: Sequence[str], args: argparse.Namespace) -> List[Dict[str, Any]]:
    rows = []
    for name in backbones:
        tv = params(getattr(torchvision.models, name)(weights=None))
        for variant, code in (("full", ArchCode.full(name)), ("random", ArchCode.random(name, ratio=2 / 3, seed=0))):
            model = build_model(name, arch=code).eval()
            row = {"backbone": name, "variant": variant, "branches": code.count(), "params_trained": params(model),
                   "params_deployed": params(fuse_model(model)), "params_torchvision": tv}
            print("{} {}: timing".format(name, variant), flush=True)
            row["latency"] = latency(model, build_model(name), 224, ["torch"], [1], args.imagenet_duration,
                                     args.rounds, args.threads)
            rows.append(row)
    return rows


def ms(row: Dict[str, Any], variant: str, backend: str, batch: int) -> Optional[float]:
    return row["latency"]["median_ms"].get("{}|{}|{}".format(variant, backend, batch))


def ratio_row(row: Dict[str, Any], backend: str, batch: int) -> Dict[str, Any]:
    return next((q for q in row["latency"]["ratios"] if q["backend"] == backend and q["batch"] == batch), {})


def ratio(row: Dict[str, Any], key: str, backend: str, batch: int, spec: str = "{:.3f}") -> str:
    """A ratio's cell: value [interval] and spread, or the bare value of a file recorded before the
    trust rule reached this script (no per-round values: nothing to judge it by)."""
    q = ratio_row(row, backend, batch).get(key)
    if q is None:
        return "-"
    return ratio_cell(q, spec) if isinstance(q, dict) else spec.format(q) + " (no rounds recorded)"


def verdict(row: Dict[str, Any], backend: str, batch: int) -> str:
    q = ratio_row(row, backend, batch)
    return verdict_text(q["target"]) if "target" in q else "not judged (no per-round ratios recorded)"


def cell(value: Optional[float], spec: str = "{:.3f}") -> str:
    return "-" if value is None else spec.format(value)


def backend_label(row: Dict[str, Any], backend: str) -> str:
    """The bench's backend label (``ort:CPU``) for a requested backend name."""
    for key in row["latency"]["median_ms"]:
        label = key.split("|")[1]
        if label.split(":")[0] == backend:
            return label
    return backend


def markdown(result: Dict[str, Any]) -> str:
    lines = ["# Parameters, latency and accuracy per backbone (paper Table 2/3 style), CPU scale", "",
             "Command: `{}`".format(result["command"]), "",
             "Machine: {}; timings with {} torch/onnxruntime thread(s), rounds interleaved, medians.".format(
                 result["machine"]["summary"], result["threads"]), "",
             "Latency columns are medians in ms, timed as `irep-deploy bench --compare` times them: the network "
             "as trained (multi-branch, BN unfused), its fused form (what `fuse` deploys) and the plain backbone "
             "with BN folded, plus that plain network again as an A/A control. Fused / plain near 1 is the "
             "paper's claim: the search costs no inference time. A ratio is the median of per-round ratios "
             "[distribution-free interval for it: min-max below 6 rounds, its coverage in the JSON] and its "
             "spread, (max - min) / median, UNTRUSTED above 10 %; fused / plain <= {} is met only when its "
             "interval, widened by the A/A's largest deviation from 1, lies below {} and neither spread is "
             "UNTRUSTED (`benchstats.judge`).".format(TARGET, TARGET), ""]
    fm = result["fmnist"]
    if fm:
        lines += ["## Table 2 style: Fashion-MNIST (28x28, 1 channel, 10 classes)", ""]
        for backend in result["backends"]:
            for batch in result["batches"]:
                label = backend_label(fm[0], backend)
                lines += ["### {} batch {}".format(label, batch), "",
                          "| backbone | code | branches | params trained | params deployed | multi-branch ms | "
                          "fused ms | plain ms | fused / plain | A/A plain / plain | fused / plain <= {} | "
                          "multi / fused | test top-1 % (n seeds) |".format(TARGET),
                          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
                for r in fm:
                    lines.append("| {} w{} | {} | {} | {:,} | {:,} | {} | {} | {} | {} | {} | {} | {} | {} ({}) |".format(
                        r["backbone"], r["width"], LABELS[r["variant"]], r["branches"], r["params_trained"],
                        r["params_deployed"], cell(ms(r, "multi-branch", label, batch)),
                        cell(ms(r, "fused", label, batch)), cell(ms(r, "plain", label, batch)),
                        ratio(r, "fused_over_plain", label, batch), ratio(r, "aa_plain_again_over_plain", label, batch),
                        verdict(r, label, batch), ratio(r, "multi_branch_over_fused", label, batch, "{:.2f}"),
                        fmt(r["top1_mean"], r["top1_std"]), r["top1_n"]))
                lines.append("")
        sources = sorted({r["accuracy_source"] for r in fm})
        lines += ["Accuracy: retrained test top-1 from {} (same recipe for every code of a backbone; the fused "
                  "network gives the same predictions). Random code: the one of the first seed.".format(
                      ", ".join("`{}`".format(s) for s in sources)), "",
                  "![accuracy vs latency]({})".format(result["figure"]), ""]
    im = result["imagenet"]
    if im:
        lines += ["## Table 3 style: ImageNet-size backbones (224x224, 1000 classes), torch batch 1", "",
                  "| backbone | code | branches | params trained | params deployed | torchvision params | "
                  "multi-branch ms | fused ms | plain ms | fused / plain | A/A plain / plain | fused / plain <= {} | "
                  "multi / fused | top-1 |".format(TARGET), "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in im:
            label = backend_label(r, "torch")
            lines.append("| {} | {} | {} | {:,} | {:,} | {:,} | {} | {} | {} | {} | {} | {} | {} | not measured: needs "
                         "ImageNet |".format(
                             r["backbone"], LABELS[r["variant"]], r["branches"], r["params_trained"],
                             r["params_deployed"], r["params_torchvision"], cell(ms(r, "multi-branch", label, 1), "{:.1f}"),
                             cell(ms(r, "fused", label, 1), "{:.1f}"), cell(ms(r, "plain", label, 1), "{:.1f}"),
                             ratio(r, "fused_over_plain", label, 1), ratio(r, "aa_plain_again_over_plain", label, 1),
                             verdict(r, label, 1), ratio(r, "multi_branch_over_fused", label, 1, "{:.2f}")))
        lines += ["", "Deployed parameters are torchvision's minus one per BN channel for the ResNets (BN weight "
                  "and bias fold into one conv bias); torchvision's VGG16 has no BN, so they are equal.", ""]
    cvs = [v for r in fm + im for v in r["latency"]["cv"].values()]
    noisy = [v for v in cvs if v > 0.10]
    if noisy:
        lines += ["Variation: {} of {} measurements had a coefficient of variation above 10% (largest {:.0%}); "
                  "per-measurement CVs are in the JSON. Ratios come from one interleaved run per code, so "
                  "drift hits all variants alike.".format(len(noisy), len(cvs), max(noisy)), ""]
    judged = [q["target"]["verdict"] for r in fm + im for q in r["latency"]["ratios"] if "target" in q]
    if judged:
        lines += ["fused / plain <= {}: {} of {} comparisons met, {} undecided, {} missed, {} untrusted.".format(
            TARGET, judged.count("met"), len(judged), judged.count("undecided"), judged.count("missed"),
            judged.count("untrusted")), ""]
    return "\n".join(lines) + "\n"


def points(rows: List[Dict[str, Any]], backend: str, batch: int) -> Dict[str, Any]:
    """Fig. 1 style points: each code deployed (fused), plus the all-branch network as trained."""
    pts = []
    for r in rows:
        label = backend_label(r, backend)
        name = "{} w{}".format(r["backbone"], r["width"])
        deployed = ms(r, "plain" if r["variant"] == "plain" else "fused", label, batch)
        pts.append({"label": LABELS[r["variant"]], "group": name + " deployed", "latency_ms": deployed,
                    "accuracy": r["top1_mean"]})
        if r["variant"] == "full":
            pts.append({"label": "all branches, unfused", "group": name + " as trained",
                        "latency_ms": ms(r, "multi-branch", label, batch), "accuracy": r["top1_mean"]})
    return {"title": "Fashion-MNIST: test top-1 vs {} batch-{} latency".format(backend, batch),
            "points": [p for p in pts if p["latency_ms"] is not None and p["accuracy"] is not None]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accuracy", nargs="*", default=[str(RESULTS / f) for f in EVIDENCE],
                        help="evidence_fmnist.py results files (missing ones are skipped with a note)")
    parser.add_argument("--imagenet-backbones", nargs="*", default=["resnet18", "resnet34", "resnet50", "vgg16"])
    parser.add_argument("--backends", nargs="+", default=["torch", "ort"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per model/backend/batch (part 1)")
    parser.add_argument("--imagenet-duration", type=float, default=10.0, help="seconds per model (part 2)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (the duration is split over them)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="short timings, ResNet-18 only in part 2")
    parser.add_argument("--out", default=str(RESULTS / "table_models"))
    args = parser.parse_args()
    if args.quick:
        args.duration, args.imagenet_duration, args.rounds, args.imagenet_backbones = 0.3, 0.5, 1, ["resnet18"]
    files = []
    for f in args.accuracy:
        if Path(f).is_file():
            files.append(Path(f).resolve())
        else:
            print("note: {} not found; run benchmarks/evidence_fmnist.py for it first (skipped)".format(f))
    out = Path(args.out)
    fig_dir = out.parent / "figures" / out.name
    result: Dict[str, Any] = {"command": "python " + " ".join(sys.argv), "machine": describe_machine(),
                              "threads": args.threads, "backends": args.backends, "batches": args.batches,
                              "duration_s": args.duration, "rounds": args.rounds}
    result["fmnist"] = fmnist_rows(files, args)
    result["imagenet"] = imagenet_rows(args.imagenet_backbones, args)
    result["figure"] = None
    if result["fmnist"]:
        pts = points(result["fmnist"], args.backends[-1], args.batches[0])
        fig_dir.mkdir(parents=True, exist_ok=True)
        write_json(fig_dir / "points.json", pts)
        plot_points(pts, fig_dir)
        result["figure"] = "figures/{}/accuracy_latency.png".format(out.name)
    write_results(str(out), result, markdown(result), depends=files)  # the evidence runs' codes and accuracies


if __name__ == "__main__":
    main()
