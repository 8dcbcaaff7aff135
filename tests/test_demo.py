"""The main job end to end (quick settings on sklearn digits): every step's output and the report;
the report's trust marks rendered from a report.json holding known measurements (cheap)."""
from __future__ import annotations

import json

import pytest

from irep_deploy import load_checkpoint
from irep_deploy.cli import main
from irep_deploy.demo import DemoSettings, run_demo
from irep_deploy.data import load_data
from irep_deploy.engines.onnx import FUSED_OP_TYPES, load_onnx, op_types
from irep_deploy.engines.onnx_eval import evaluate_onnx
from irep_deploy.engines.quantize import META_PREFIX

# the whole demo runs once for the tests that use it (over a minute on 2 cores): they are marked slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    lines = []
    summary = run_demo(out, DemoSettings.quick(), progress=False, say=lines.append)
    return out, summary, "\n".join(lines)


@pytest.mark.slow
def test_every_step_leaves_its_output(demo):
    out, summary, log = demo
    for path in ("search/arch.bin", "search/best_seen_arch.bin", "search/population.json", "train/ckpt.pt", "baseline/ckpt.pt", "deploy.pt",
                 "model.onnx",
                 "model.int8.onnx", "bench.json", "bench_int8.json", "report.md", "report.json"):
        assert (out / path).is_file(), path
    assert [s["name"] for s in summary["steps"]] == ["search", "train", "baseline", "fuse", "export", "quantize",
                                                     "eval-int8", "bench-int8", "build-trt", "bench", "figures"]
    assert "[1/11] search" in log and "[6/11] quantize" in log and "[11/11] figures" in log
    for name in ("arch_code.png", "alpha_beta.png", "asym_minus_dil.png", "fitness.png", "accuracy_latency.png"):
        assert (out / "figures" / name).stat().st_size > 1000, name
    points = json.loads((out / "points.json").read_text())["points"]
    assert {p["group"] for p in points} == {"multi-branch", "fused", "plain"}
    assert load_checkpoint(out / "deploy.pt").kind == "deploy"
    assert set(op_types(out / "model.onnx")) <= FUSED_OP_TYPES


@pytest.mark.slow
def test_report_numbers_agree_with_the_files(demo):
    out, summary, _ = demo
    report = json.loads((out / "report.json").read_text())
    acc = report["accuracy"]
    assert acc["multi_branch_top1"] == acc["fused_top1"] and acc["disagreements"] == 0
    assert report["fuse"]["rel_error"] < 1e-5
    variants = {(r["variant"], r["backend"]) for r in report["latency"]["results"]}
    assert {("multi-branch", "torch"), ("fused", "torch"), ("plain", "torch")} <= variants
    assert any(v[1].startswith("ort") for v in variants)
    trt = [s for s in report["steps"] if s["name"] == "build-trt"][0]
    assert trt["status"] in ("done", "skipped") and (trt["status"] == "done" or trt["note"].startswith("skipped:"))
    md = (out / "report.md").read_text()
    assert "{:.2f}".format(acc["fused_top1"]) in md and "## Latency" in md
    # every figure the demo drew is linked, and every latency carries its marks
    assert report["figures"] and all("]({})".format(f) in md and (out / f).is_file() for f in report["figures"])
    assert all("median_ms_untrusted" in r and "median_ms_spread" in r for r in report["latency"]["results"])
    assert "answer is `search/arch.bin`" in md and report["search"]["explanation"].startswith("answer: search/arch.bin")


@pytest.mark.slow
def test_report_sets_the_searched_code_beside_the_baseline(demo):
    """The plain backbone is trained with the searched code's recipe and seed; the report's numbers
    are those of the two run directories and of the bench step."""
    out, summary, _ = demo
    ours = json.loads((out / "train" / "config.json").read_text())
    base = json.loads((out / "baseline" / "config.json").read_text())
    assert base.pop("arch") is None and ours.pop("arch") is not None and base == ours
    rows = {r["model"]: r for r in summary["baseline"]["rows"]}
    assert rows["plain backbone (baseline)"]["test_top1"] == json.loads(
        (out / "baseline" / "metrics.json").read_text())["fused_test_top1"]
    assert rows["searched code, fused"]["test_top1"] == summary["accuracy"]["fused_top1"]
    bench = {(r["variant"], r["backend"], r["batch"]): r["median_ms"] for r in summary["latency"]["results"]}
    assert rows["plain backbone (baseline)"]["latency_ms"] == bench["plain", "torch", 1]
    assert rows["searched code, fused"]["latency_ms"] == bench["fused", "torch", 1]
    assert rows["plain backbone (baseline)"]["train_seconds"] > 0
    assert rows["plain backbone (baseline)"]["train_cpu_seconds"] > 0
    assert summary["baseline"]["train_cost_comparable"] in (True, False)
    md = (out / "report.md").read_text()
    assert md.index("## What the branches bought") < md.index("## Search")
    assert "| plain backbone (baseline) | {:.2f} |".format(rows["plain backbone (baseline)"]["test_top1"]) in md


@pytest.mark.slow
def test_demo_refuses_to_overwrite_an_earlier_run(demo, capsys):
    out, _, _ = demo
    assert main(["demo", "--quick", "--out", str(out), "--quiet"]) == 1
    assert "holds an earlier demo" in capsys.readouterr().err


@pytest.mark.slow
def test_int8_step_is_consistent_with_its_files(demo):
    """The INT8 model is a QDQ copy of the exported one; the reported scores and differing predictions
    are recomputed here from the two files on the same test images."""
    out, summary, log = demo
    import numpy as np
    import onnxruntime as ort

    int8 = summary["int8"]
    assert all(s["status"] == "done" for s in summary["steps"] if s["name"] in ("quantize", "eval-int8", "bench-int8"))
    ops = op_types(out / "model.int8.onnx")
    assert ops.get("QuantizeLinear", 0) > 0 and ops.get("DequantizeLinear", 0) > 0
    assert ops == int8["quantize"]["op_types"]
    meta = {p.key[len(META_PREFIX):]: p.value for p in load_onnx(out / "model.int8.onnx").metadata_props
            if p.key.startswith(META_PREFIX)}
    assert meta["calib_dataset"] == "digits" and meta["calib_size"] == "512" and meta["method"] == "minmax"

    settings = DemoSettings.quick()
    ev = int8["eval"]
    alone = evaluate_onnx(out / "model.int8.onnx", "digits", limit=settings.train_limit)
    assert (alone.top1, alone.top5, alone.examples) == (ev["int8_top1"], ev["int8_top5"], ev["examples"])
    fp32 = evaluate_onnx(out / "model.onnx", "digits", limit=settings.train_limit)
    assert fp32.top1 == ev["fp32_top1"]
    # the same test images the fused torch network was scored on: at most a near-tie apart
    assert abs(fp32.top1 - summary["accuracy"]["fused_top1"]) * ev["examples"] / 100 <= 1 + 1e-6

    data = load_data("digits", augment=False, limit=settings.train_limit, parts=("test",), in_channels=1)
    x = np.stack([data.test[i][0].numpy() for i in range(len(data.test))]).astype(np.float32)
    preds = []
    for name in ("model.onnx", "model.int8.onnx"):
        session = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        preds.append(session.run(None, {session.get_inputs()[0].name: x})[0].argmax(1))
    assert int((preds[0] != preds[1]).sum()) == ev["differ"]
    # each differing prediction moves the hit count by at most one
    assert abs(ev["int8_top1"] - ev["fp32_top1"]) * ev["examples"] / 100 <= ev["differ"] + 1e-6

    bench = json.loads((out / "bench_int8.json").read_text())
    rows = {(r["variant"], r["batch"]) for r in bench["results"]}
    assert rows == {(v, b) for v in ("onnx", "onnx-int8") for b in settings.bench_batches}
    assert all(r["backend"] == "ort:CPU" for r in bench["results"])
    assert all(q["onnx_int8_over_onnx"] > 0 for q in bench["ratios"])
    assert len(bench["ratios"]) == len(settings.bench_batches)
    md = (out / "report.md").read_text()
    assert "## INT8 (onnxruntime, CPU)" in md
    assert "| INT8 ONNX | {:.2f} |".format(ev["int8_top1"]) in md and "differ between FP32 and INT8: {}.".format(
        ev["differ"]) in md
    assert "onnx-int8/onnx" in md and "onnx-int8/onnx" in log


# -- the report's trust marks, from known measurements ----------------------------------------------
def _result(variant, round_medians, backend="torch", batch=1):
    from irep_deploy.bench.latency import Result, Stats
    samples = [m for m in round_medians for _ in range(3)]
    stats = Stats.of(samples)
    return Result(variant, backend, batch, stats, None, batch * 1000.0 / stats.mean, round_medians=list(round_medians))


def _train_report(top1, seconds, cpu_seconds):
    from irep_deploy.evaluation import EvalResult
    from irep_deploy.train import TrainReport
    score = EvalResult(top1, 100.0, 0.5, 400)
    return TrainReport("run", "run/ckpt.pt", len(seconds), 0, score, score, 0.0, 0,
                       [{"seconds": w, "cpu_seconds": c} for w, c in zip(seconds, cpu_seconds)])


def _summary(multi_branch_rounds, searched_times, baseline_times, tmp_path):
    """A report.json as the demo builds it, from bench results and training histories given here."""
    import dataclasses
    from irep_deploy.baseline import compare, latencies
    from irep_deploy.bench.latency import BenchReport, ratios
    from irep_deploy.demo import latency_record
    results = [_result("multi-branch", multi_branch_rounds), _result("fused", [0.70, 0.71, 0.70, 0.72, 0.71]),
               _result("plain", [0.70, 0.70, 0.71, 0.71, 0.70])]
    bench = BenchReport("m", {"name": "cpu"}, {}, {}, results, ratios(results), 0.0, [])
    versus = compare(_train_report(91.0, *searched_times), _train_report(89.55, *baseline_times), latencies(bench))
    code_table = "layer  conv1x3\nlayer1.0.conv1  1"
    summary = {
        "settings": {"dataset": "digits", "seed": 0},
        "search": {"config": {"backbone": "resnet18_cifar", "width": 0.125}, "best_fitness": 77.25, "branches": 9,
                   "capacity": 12, "rounds": [{"round": 1, "best_fitness": 78.17, "mean_fitness": 70.0},
                                              {"round": 2, "best_fitness": 77.25, "mean_fitness": 74.0}],
                   "answer_file": "search/arch.bin", "code_table": code_table, "explanation": "answer: ...",
                   "best_seen": {"file": "search/best_seen_arch.bin", "round": 1, "fitness": 78.17, "branches": 8,
                                 "differs": True, "code_table": code_table.replace("1", "0")}},
        "accuracy": {"multi_branch_top1": 91.0, "fused_top1": 91.0, "test_examples": 400, "fused_rel_error": 1e-7,
                     "disagreements": 0},
        "baseline": dataclasses.asdict(versus), "latency": latency_record(bench), "int8": {"error": "not run"},
        "figures": ["figures/fitness.png", "figures/accuracy_latency.png"], "steps": []}
    # report.md is rendered from report.json's content alone: through a file and back
    (tmp_path / "report.json").write_text(json.dumps(summary))
    return json.loads((tmp_path / "report.json").read_text())


def _section(md, title):
    return md.split("## " + title, 1)[1].split("\n## ", 1)[0]


def test_report_marks_an_untrusted_latency_wherever_it_is_quoted(tmp_path):
    """A multi-branch latency whose per-round medians spread 600 % (a machine loaded in some rounds)
    is UNTRUSTED in the first table, the latency table, its ratio, report.json and the figure."""
    from irep_deploy.bench.latency import spread
    from irep_deploy.demo import render_report
    rounds = [7.0, 57.0, 52.0, 8.0, 50.0]
    s = _summary(rounds, ([30.0] * 3, [29.0] * 3), ([1.0] * 3, [0.97] * 3), tmp_path)
    md = render_report(s)
    first = _section(md, "What the branches bought")
    multi = [line for line in first.splitlines() if line.startswith("| searched code, multi-branch")][0]
    assert "(spread {:.1%}, UNTRUSTED)".format(spread(rounds)) in multi
    fused = [line for line in first.splitlines() if line.startswith("| searched code, fused")][0]
    assert "spread" in fused and "UNTRUSTED" not in fused
    assert "A latency above is UNTRUSTED" in first
    latency = _section(md, "Latency")
    assert [line for line in latency.splitlines() if line.startswith("| multi-branch | torch")][0].endswith(
        "| 50.000 (spread {:.1%}, UNTRUSTED) |".format(spread(rounds)))
    ratio = [line for line in latency.splitlines() if "| multi-branch/fused |" in line][0]
    assert "UNTRUSTED" in ratio and "UNTRUSTED" not in [line for line in latency.splitlines()
                                                         if "| fused/plain |" in line][0]
    # report.json carries the same marks as report.md
    row = {r["model"]: r for r in s["baseline"]["rows"]}["searched code, multi-branch"]
    assert row["latency_ms_untrusted"] is True and row["latency_ms_spread"] == pytest.approx(spread(rounds))
    assert s["latency"]["results"][0]["median_ms_untrusted"] is True
    assert s["latency"]["ratios"][0]["multi_branch_over_fused_untrusted"] is True
    assert s["latency"]["ratios"][0]["fused_over_plain_untrusted"] is False
    # figures are linked from the report
    assert "[![figures/accuracy_latency.png](figures/accuracy_latency.png)](figures/accuracy_latency.png)" in md
    # the best-seen code differs from the answer: both are shown
    search = _section(md, "Search")
    assert "belongs to another code: `search/best_seen_arch.bin`" in search and search.count("```") == 4


def test_untrusted_points_are_drawn_apart_and_kept_in_the_figure_data(tmp_path):
    from irep_deploy.viz import load_points, render_points
    point = {"label": "DES, multi-branch", "group": "multi-branch", "latency_ms": 50.0, "accuracy": 91.0,
             "latency_spread": 6.44, "untrusted": True, "latency_range_ms": [7.0, 57.0]}
    other = {"label": "plain", "latency_ms": 0.7, "accuracy": 89.5, "latency_spread": 0.02, "untrusted": False}
    (tmp_path / "p.json").write_text(json.dumps([point, other]))
    points = load_points(tmp_path / "p.json")
    files = dict(render_points(points))
    png, data = files["accuracy_latency.png"], json.loads(files["accuracy_latency.json"])
    assert data["points"][0]["untrusted"] is True and data["points"][0]["latency_range_ms"] == [7.0, 57.0]
    trusted = dict(points, points=[dict(points["points"][0], untrusted=False), points["points"][1]])
    assert dict(render_points(trusted))["accuracy_latency.png"] != png  # the mark changes the drawing
    (tmp_path / "bad.json").write_text(json.dumps([dict(point, untrusted="yes")]))
    from irep_deploy.errors import PlotError
    with pytest.raises(PlotError, match="'untrusted' must be true or false"):
        load_points(tmp_path / "bad.json")


@pytest.mark.parametrize("baseline_cpu, comparable", [([0.97] * 3, False), ([0.31] * 3, True)])
def test_training_time_ratio_says_when_the_runs_do_not_compare(tmp_path, baseline_cpu, comparable):
    """The searched run kept 0.3 cores busy (a loaded machine): against a baseline that kept 0.97
    busy its wall-time ratio is not comparable and the CPU-time ratio is given; against one as
    loaded, it is."""
    from irep_deploy.demo import render_report
    s = _summary([0.9, 0.91, 0.9, 0.92, 0.9], ([30.0] * 3, [9.3] * 3), ([1.0] * 3, baseline_cpu), tmp_path)
    first = _section(render_report(s), "What the branches bought")
    sentence = [line for line in first.splitlines() if line.startswith("Test top-1")][0]
    assert sentence.startswith("Test top-1 +1.45 points for 30.00x the training")
    assert s["baseline"]["train_cost_comparable"] is comparable
    assert ("not comparable" in sentence) is (not comparable)
    assert "CPU time" in sentence and "{:.2f}x".format(27.9 / sum(baseline_cpu)) in sentence
    assert "| plain backbone (baseline) | 89.55 | 3.0 / {:.1f} |".format(sum(baseline_cpu)) in first


def test_training_time_of_runs_without_cpu_time_says_comparability_is_unknown(tmp_path):
    """Runs of an earlier version recorded wall time only: the ratio is given, its comparability not claimed."""
    from irep_deploy.demo import render_report
    s = _summary([0.9, 0.91, 0.9, 0.92, 0.9], ([30.0] * 3, [9.3] * 3), ([1.0] * 3, [None] * 3), tmp_path)
    assert s["baseline"]["train_cost_comparable"] is None and s["baseline"]["train_cpu_cost"] is None
    assert "Test top-1 +1.45 points for 30.00x the training wall time (comparability unknown: a run recorded no CPU " \
           "time)." in render_report(s)
