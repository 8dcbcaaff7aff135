"""INT8 accuracy of fused IREPS networks (target: docs/performance.md): FP32 vs INT8 (onnxruntime) on real data.

For each backbone (resnet18_cifar, vgg16_cifar at width 0.125 on Fashion-MNIST) and each code

    plain   the backbone with no branch (empty code): conv + BN folded, the reference
    full    every available branch
    des     the DES code of the evidence run (``results/evidence_fmnist*.json``, budget C)
    random  (optional) a uniformly random code with the DES code's budget ratio

the script trains the multi-branch network (``runs.run_training``: resumable, one directory each),
fuses and exports it to FP32 ONNX (``irep_deploy.engines.onnx.export``), quantizes that file with
every calibration method (minmax, entropy, percentile) x per-tensor / per-channel weights
(``irep_deploy.engines.quantize.quantize`` with ``min_cosine=-1``, so a collapse is recorded, not
refused) and evaluates FP32 and INT8 on the test split (``evaluate_onnx`` with the FP32 file as
reference): top-1 of both and how many predictions change.

It also records the per-layer weight ranges of the exported (fused) convolutions (max |w| per
output channel; per layer the largest, the median and their ratio: a few channels with a far wider
range than the rest is what per-tensor INT8 cannot represent, the known cause of RepVGG's collapse),
next to the plain network's, and INT8 vs FP32 onnxruntime CPU latency at batch 1 and 32 for every
model in one interleaved run (``bench_onnx_files``), as ratios with their spread over rounds.

    OMP_NUM_THREADS=1 nohup python benchmarks/int8_accuracy.py > int8.log 2>&1 &   # full run (>= 15 epochs)
    python benchmarks/int8_accuracy.py --quick --work-dir /tmp/i8 --out /tmp/i8/res   # smoke run

Resumable: finished trainings in ``--work-dir`` are not redone. Writes ``results/int8_accuracy.{json,md}``
(rewritten after every model, ``status`` says how far it got). No timed assertions: numbers only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from _common import describe_machine, write_results
from runs import run_training  # noqa: E402

from irep_deploy import ArchCode  # noqa: E402
from irep_deploy.bench.latency import SPREAD_WARN, bench_onnx_files, spread  # noqa: E402
from irep_deploy.engines.quantize import weight_scales
from irep_deploy.errors import IrepError  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
EVIDENCE = {"resnet18_cifar": RESULTS / "evidence_fmnist.json", "vgg16_cifar": RESULTS / "evidence_fmnist_vgg16.json"}
CODES = ("plain", "full", "des", "random")
METHODS = ("minmax", "entropy", "percentile")
DEFAULT = ("minmax", True)  # quantize()'s defaults (minmax, per-channel): the target is stated for these
DATASET = "fashion-mnist"
FULL_EPOCHS = 15  # the target's measurement: at least one run with >= 15 epochs


def settings_name(method: str, per_channel: bool) -> str:
    return "{}, {}".format(method, weight_scales(per_channel))


def evidence_code(backbone: str) -> Dict[str, Any]:
    """The DES code (and its budget ratio) found for ``backbone`` by the evidence run."""
    path = EVIDENCE.get(backbone)
    if path is None or not path.is_file():
        raise SystemExit("no evidence results with a DES code for {} (known: {})".format(backbone, ", ".join(EVIDENCE)))
    info = json.loads(path.read_text())
    if info["recipe"]["backbone"] != backbone or not info.get("search"):
        raise SystemExit("{}: holds no DES search of {}".format(path, backbone))
    return {"code": info["search"]["code"], "budget_ratio": info["budget_ratio"], "source": path.name}


def arch_for(code: str, backbone: str, seed: int, des: Dict[str, Any]) -> Optional[str]:
    if code == "plain":
        return None
    if code == "full":
        return ArchCode.full(backbone).dumps()
    if code == "random":
        return ArchCode.random(backbone, ratio=des["budget_ratio"], seed=10_000 + seed).dumps()
    return des["code"]


def weight_ranges(path: Path) -> List[Dict[str, Any]]:
    """Per Conv node of an ONNX file (graph order): max |w| per output channel and its spread."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        per_channel = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
        median = float(np.median(per_channel))
        out.append({"node": node.name, "shape": list(w.shape), "channel_max_abs": [float(v) for v in per_channel],
                    "max_abs": float(per_channel.max()), "median_channel_range": median,
                    "max_over_median": float(per_channel.max() / median) if median > 0 else float("inf")})
    return out


def range_summary(layers: List[Dict[str, Any]], plain: Optional[List[Dict[str, Any]]]) -> Dict[str, Any]:
    ratios = [x["max_over_median"] for x in layers]
    out: Dict[str, Any] = {"layers": len(layers), "median_max_over_median": statistics.median(ratios),
                           "worst_max_over_median": max(ratios),
                           "worst_layer": layers[ratios.index(max(ratios))]["node"],
                           "max_abs": max(x["max_abs"] for x in layers)}
    if plain is not None and len(plain) == len(layers):
        vs = [a["max_abs"] / b["max_abs"] for a, b in zip(layers, plain)]
        out["max_abs_vs_plain"] = {"median": statistics.median(vs), "max": max(vs), "per_layer": vs}
    return out


def qdq_scales(path: Path) -> List[np.ndarray]:
    """The scale initializers of every QuantizeLinear node of a QDQ file, in graph order."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    return [numpy_helper.to_array(inits[n.input[1]]) for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[1] in inits]


def mark_same_scales(d: Path, rows: List[Dict[str, Any]]) -> None:
    """Entropy rows whose every scale equals minmax's (onnxruntime's quantize_static runs its entropy
    calibrator with 128 histogram bins and 128 quantized bins: a single candidate threshold, the full
    range, so it returns minmax's ranges) say so, so the table does not read as two measurements."""
    by = {(q["method"], q["per_channel"]): q for q in rows if "error" not in q}
    for (method, per_channel), q in by.items():
        ref = by.get(("minmax", per_channel))
        if method != "minmax" and ref is not None:
            a, b = qdq_scales(d / q["file"]), qdq_scales(d / ref["file"])
            q["same_scales_as_minmax"] = len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def quantize_and_eval(fp32: Path, method: str, per_channel: bool, calib_size: int, test_limit: Optional[int],
                      data_root: Optional[str]) -> Dict[str, Any]:
    from irep_deploy.engines.onnx_eval import evaluate_onnx
    from irep_deploy.engines.quantize import quantize

    int8 = fp32.with_name("{}.{}.{}.int8.onnx".format(fp32.stem, method, "pc" if per_channel else "pt"))
    row: Dict[str, Any] = {"method": method, "per_channel": per_channel, "file": int8.name}
    t = time.time()
    try:
        q = quantize(fp32, DATASET, out=int8, data_root=data_root, calib_size=calib_size, method=method,
                     per_channel=per_channel, min_cosine=-1.0)  # a collapse is a result, not an error
    except IrepError as exc:
        row.update(error=str(exc), quantize_s=round(time.time() - t, 2))
        return row
    row.update(calib_size=q.calib_size, cosine=q.cosine, calib_batch_agreement=q.agreement,
               quantize_linear=q.op_types.get("QuantizeLinear", 0), size_bytes=q.size_bytes,
               quantize_s=round(time.time() - t, 2))
    t = time.time()
    r = evaluate_onnx(int8, DATASET, data_root=data_root, limit=test_limit, reference=fp32)
    row.update(examples=r.examples, fp32_top1=r.reference_top1, int8_top1=r.top1, drop=r.reference_top1 - r.top1,
               fp32_top5=r.reference_top5, int8_top5=r.top5, changed=r.differ, eval_s=round(time.time() - t, 2))
    return row


def latency(models: List[Dict[str, Any]], batches: Sequence[int], duration_s: float, rounds: int,
            min_iters: int) -> Dict[str, Any]:
    """FP32 and default-settings INT8 of every model in one interleaved onnxruntime CPU run."""
    files = []
    for m in models:
        default = next((q for q in m["quantized"] if (q["method"], q["per_channel"]) == DEFAULT and "error" not in q),
                       None)
        if default is not None:
            key = "{}/{}".format(m["backbone"], m["code"])
            files += [(key + ":fp32", Path(m["dir"]) / "model.onnx"), (key + ":int8", Path(m["dir"]) / default["file"])]
    if not files:
        return {"rows": [], "note": "no model with a default-settings INT8 file"}
    report = bench_onnx_files(files, batches=batches, duration_s=duration_s, rounds=rounds, min_iters=min_iters)
    by = {(r.variant, r.batch): r for r in report.results}
    rows = []
    for name, _ in files[::2]:
        key = name[:-len(":fp32")]
        for b in batches:
            a, q = by[(key + ":fp32", b)], by[(key + ":int8", b)]
            per_round = [y / x for x, y in zip(a.round_medians, q.round_medians)]
            rows.append({"model": key, "batch": b, "fp32_median_ms": a.host.median, "int8_median_ms": q.host.median,
                         "int8_over_fp32": q.host.median / a.host.median, "rounds": per_round,
                         "spread": spread(per_round) if len(per_round) > 1 else None,
                         "untrusted": len(per_round) > 1 and spread(per_round) > SPREAD_WARN,
                         "fp32_cv": a.host.cv, "int8_cv": q.host.cv})
    return {"rows": rows, "device": report.device, "settings": report.config, "warnings": report.warnings}


def markdown(result: Dict[str, Any]) -> str:
    r = result["recipe"]
    lines = ["# INT8 accuracy of fused IREPS networks: Fashion-MNIST, onnxruntime CPU", "",
             "Command: `{}`".format(result["command"]), "", "Machine: {}".format(result["machine"]["summary"]), "",
             "Status: {}".format(result["status"]), ""]
    if r["epochs"] < FULL_EPOCHS:
        lines += ["**Reduced run**: {} training epochs, fewer than the {} the target asks for (the collapse grows "
                  "with training); not the target's measurement.".format(r["epochs"], FULL_EPOCHS), ""]
    lines += ["Training: width {}, {} epochs, {} training images (`limit`), batch {}, lr {}, seed {}. Test: {} "
              "images of the test split. Calibration: {} training images (quantize's loader). DES codes from {}."
              .format(r["width"], r["epochs"], r["limit"], r["batch_size"], r["lr"], result["seed"],
                     result["test_limit"] or "all", result["calib_size"],
                     ", ".join(sorted({m["des_source"] for m in result["models"]})) or "-"), "",
              "## Test top-1 (%), FP32 vs INT8", "",
              "Drop = FP32 - INT8 in points; changed = test images whose predicted class differs. The target "
              "is a drop <= 0.5 under the defaults ({}).".format(settings_name(*DEFAULT)), "",
              "| backbone | code | branches | method | weights | FP32 | INT8 | drop | changed | cosine (calib batch) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for m in result["models"]:
        for q in m["quantized"]:
            head = "| {} | {} | {} | {} | {} |".format(m["backbone"], m["code"], m["branches"], q["method"],
                                                       weight_scales(q["per_channel"]))
            if "error" in q:
                lines.append(head + " - | - | - | - | {} |".format(q["error"][:120]))
            else:
                lines.append(head + " {:.2f} | {:.2f} | {:+.2f} | {} / {} | {:.4f}{} |".format(
                    q["fp32_top1"], q["int8_top1"], q["drop"], q["changed"], q["examples"], q["cosine"],
                    " (scales = minmax's)" if q.get("same_scales_as_minmax") else ""))
    same = [q for m in result["models"] for q in m["quantized"] if q.get("same_scales_as_minmax")]
    if same:
        lines += ["", "{} row(s) marked \"scales = minmax's\" have every quantization scale equal to the minmax file's: "
                  "the calibration kept every tensor's full range, so those rows are minmax, not a separate "
                  "measurement.".format(len(same))]
    lines += ["", "## Weight ranges of the exported (fused) convolutions", "",
              "Per layer: r = max over output channels of max|w| / median over channels of max|w|. A large r "
              "means per-tensor INT8 spends its 255 levels on a few channels. 'vs plain' is max|w| of the layer "
              "over the plain network's same layer (median / max over layers).", "",
              "| backbone | code | layers | median r | worst r (layer) | max abs w | max abs vs plain (median / max) |",
              "|---|---|---|---|---|---|---|"]
    for m in result["models"]:
        s = m["weight_ranges"]["summary"]
        vs = s.get("max_abs_vs_plain")
        lines.append("| {} | {} | {} | {:.2f} | {:.2f} ({}) | {:.3f} | {} |".format(
            m["backbone"], m["code"], s["layers"], s["median_max_over_median"], s["worst_max_over_median"],
            s["worst_layer"], s["max_abs"], "{:.2f} / {:.2f}".format(vs["median"], vs["max"]) if vs else "-"))
    lat = result.get("latency") or {}
    lines += ["", "## Latency, INT8 ({}) / FP32, onnxruntime CPU, one interleaved run".format(settings_name(*DEFAULT)), ""]
    if lat.get("rows"):
        lines += ["| model | batch | FP32 median ms | INT8 median ms | INT8/FP32 | per-round range | spread |",
                  "|---|---|---|---|---|---|---|"]
        for x in lat["rows"]:
            lines.append("| {} | {} | {:.3f} | {:.3f} | {:.2f} | {:.2f}-{:.2f} | {} |".format(
                x["model"], x["batch"], x["fp32_median_ms"], x["int8_median_ms"], x["int8_over_fp32"],
                min(x["rounds"]), max(x["rounds"]), "{:.1%}{}".format(x["spread"], " UNTRUSTED" if x["untrusted"] else "") if x["spread"] is not None else "-"))
        lines += ["", "Spread = (max - min) / median of the per-round ratios (UNTRUSTED above {:.0%}). Settings: `{}`.".format(
            SPREAD_WARN, json.dumps({k: lat["settings"][k] for k in ("batches", "duration_s", "rounds", "threads")}))]
        lines += ["- warning: " + w for w in lat.get("warnings", [])]
    else:
        lines.append(lat.get("note", "not measured yet"))
    lines += ["", "Wall time of this invocation: {:.0f} s.".format(result["wall_s"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=list(EVIDENCE), choices=list(EVIDENCE))
    parser.add_argument("--codes", nargs="+", default=["plain", "full", "des"], choices=CODES)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--epochs", type=int, default=FULL_EPOCHS,
                        help="training epochs (default {}, the target's minimum)".format(FULL_EPOCHS))
    parser.add_argument("--limit", type=int, default=3000, help="training examples (as in the evidence run)")
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib-size", type=int, default=512)
    parser.add_argument("--test-limit", type=int, help="test images (default: the whole test split)")
    parser.add_argument("--data-root")
    parser.add_argument("--bench-batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--bench-duration", type=float, default=1.0, help="seconds per measurement and round")
    parser.add_argument("--bench-rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--work-dir", default="runs/int8_accuracy")
    parser.add_argument("--out", default=str(RESULTS / "int8_accuracy"))
    args = parser.parse_args()
    min_iters = 10
    if args.quick:
        args.backbones, args.codes, args.methods = args.backbones[:1], ["plain", "des"], ["minmax", "percentile"]
        args.epochs, args.limit, args.calib_size, args.test_limit = 1, 256, 64, 256
        args.bench_duration, args.bench_rounds, min_iters = 0.05, 2, 3

    from irep_deploy.engines.onnx import export

    work = Path(args.work_dir)
    t0 = time.time()
    result: Dict[str, Any] = {
        "command": "OMP_NUM_THREADS={} python {}".format(torch.get_num_threads(), " ".join(sys.argv)),
        "machine": describe_machine(), "dataset": DATASET, "seed": args.seed, "calib_size": args.calib_size,
        "test_limit": args.test_limit, "default_settings": {"method": DEFAULT[0], "per_channel": DEFAULT[1]},
        "recipe": {"dataset": DATASET, "width": args.width, "epochs": args.epochs, "batch_size": args.batch_size,
                   "lr": args.lr, "limit": args.limit},
        "models": [], "latency": None, "status": "started"}

    def flush(status: str) -> None:
        result["status"] = status
        result["wall_s"] = time.time() - t0
        write_results(args.out, result, markdown(result),  # the DES codes come from the evidence runs
                      depends=[EVIDENCE[b] for b in args.backbones if b in EVIDENCE])

    total = len(args.backbones) * len(args.codes)
    for backbone in args.backbones:
        des = evidence_code(backbone)
        recipe = dict(result["recipe"], backbone=backbone)
        plain_layers = None
        for code in args.codes:
            d = work / backbone / code
            info = run_training(d / "train", code, args.seed, arch_for(code, backbone, args.seed, des), recipe)
            fp32 = d / "model.onnx"
            exported = export(Path(info["run_dir"]) / "ckpt.pt", fp32)
            layers = weight_ranges(fp32)
            if code == "plain":
                plain_layers = layers
            model: Dict[str, Any] = {
                "backbone": backbone, "code": code, "branches": info["branches"], "dir": str(d),
                "des_source": des["source"], "train": {k: info[k] for k in ("test_top1", "fused_test_top1",
                                                                           "test_examples", "wall_s")},
                "fp32_size_bytes": exported.size_bytes,
                "weight_ranges": {"summary": range_summary(layers, plain_layers if code != "plain" else None),
                                  "layers": layers},
                "quantized": []}
            for method in args.methods:
                for per_channel in (False, True):
                    row = quantize_and_eval(fp32, method, per_channel, args.calib_size, args.test_limit, args.data_root)
                    model["quantized"].append(row)
                    print("{} {} {} {}: {}".format(backbone, code, method, "pc" if per_channel else "pt",
                                                   row.get("error") or "FP32 {:.2f} INT8 {:.2f}, {} changed".format(
                                                       row["fp32_top1"], row["int8_top1"], row["changed"])), flush=True)
            mark_same_scales(d, model["quantized"])
            result["models"].append(model)
            flush("partial: {} of {} models quantized; latency not measured yet".format(len(result["models"]), total))
    result["latency"] = latency(result["models"], args.bench_batches, args.bench_duration, args.bench_rounds, min_iters)
    flush("complete")


if __name__ == "__main__":
    main()
