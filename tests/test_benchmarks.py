"""The accuracy benchmark scripts at smoke size, on real Fashion-MNIST: they run, and their tables
agree with the runs behind them (the recorded results come from the same code at full size)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from irep_deploy import ArchCode

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

pytestmark = pytest.mark.slow  # every test runs a benchmark script end to end (minutes in all)


def run(script: str, *args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(BENCH / script)] + list(args), cwd=str(ROOT), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def evidence(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evidence")
    run("evidence_fmnist.py", "--quick", "--seeds", "0", "--work-dir", str(tmp / "work"), "--out", str(tmp / "ev"))
    return tmp


def test_budget_sweep_rows_follow_their_runs(tmp_path):
    out = tmp_path / "res" / "budget_sweep"
    run("budget_sweep.py", "--quick", "--ratios", "0", "1/2", "1", "--jobs", "2", "--work-dir",
        str(tmp_path / "work"), "--out", str(out))
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["status"] == "complete"
    rows = {r["ratio"]: r for r in result["rows"]}
    assert set(rows) == {"0", "1/2", "1"}
    capacity = ArchCode.full("resnet18_cifar").capacity()
    assert rows["0"]["search"] is None and rows["0"]["des"][0]["branches"] == 0
    for ratio, value in (("1/2", 0.5), ("1", 1.0)):
        search = rows[ratio]["search"]
        code = ArchCode.loads(search["code"])
        assert search["budget"] == int(value * capacity) and code.count() <= search["budget"]
        assert rows[ratio]["des"][0]["branches"] == code.count()
        # the retrained code is the searched one: its checkpoint says so
        saved = ArchCode.load(Path(rows[ratio]["des"][0]["run_dir"]) / "arch.bin")
        assert saved == code
    # one deployed size for every budget; more branches cost more parameters in training only
    assert len({r["deploy_params"] for r in rows.values()}) == 1
    assert rows["0"]["train_params"] < rows["1/2"]["train_params"] < rows["1"]["train_params"]
    md = out.with_suffix(".md").read_text()
    for r in rows.values():
        assert "| {} | ".format(r["ratio"]) in md
    assert (out.parent / "figures" / "budget_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_budget_sweep_refuses_a_work_dir_with_other_settings(tmp_path):
    args = ["--quick", "--ratios", "1/2", "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "r")]
    run("budget_sweep.py", *args)
    proc = subprocess.run([sys.executable, str(BENCH / "budget_sweep.py")] + args + ["--search-seed", "7"],
                          cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    assert proc.returncode != 0 and "holds a search with other settings" in proc.stdout


def test_table_models_combines_params_latency_and_accuracy(evidence, tmp_path):
    out = tmp_path / "table_models"
    run("table_models.py", "--quick", "--accuracy", str(evidence / "ev.json"), "--imagenet-backbones",
        "--backends", "ort", "--batches", "1", "--out", str(out))
    result = json.loads(out.with_suffix(".json").read_text())
    ev = json.loads((evidence / "ev.json").read_text())
    rows = {r["variant"]: r for r in result["fmnist"]}
    assert set(rows) == {"plain", "full", "random", "des"}
    for variant, row in rows.items():
        assert row["top1_mean"] == ev["summary"]["variants"][variant]["mean"]
        assert {k.split("|")[0] for k in row["latency"]["median_ms"]} == {"multi-branch", "fused", "plain", "plain-again"}
    assert len({r["params_deployed"] for r in rows.values()}) == 1
    assert rows["full"]["params_trained"] > rows["des"]["params_trained"] > rows["plain"]["params_trained"]
    assert rows["des"]["branches"] == ArchCode.loads(ev["search"]["code"]).count()
    points = json.loads((out.parent / "figures" / "table_models" / "points.json").read_text())["points"]
    assert {p["label"] for p in points} == {"plain backbone", "all branches", "random at C", "DES at C",
                                            "all branches, unfused"}
    assert (out.parent / "figures" / "table_models" / "accuracy_latency.png").stat().st_size > 1000


def test_population_eval_benchmark_scores_both_paths_identically(tmp_path):
    out = tmp_path / "population_eval"
    run("bench_population_eval.py", "--quick", "--out", str(out))
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["fitness_identical"] is True
    assert result["population"] == 4 and result["rounds"] == 1
    assert all(len(v) == 1 and v[0] > 0 for v in result["seconds"].values())
    assert set(result["speedup_over_per_code"]) == {"decoded once, first round (new)", "decoded once, later rounds (new)"}
    assert "identical between the paths: True" in out.with_suffix(".md").read_text()
    # the provenance every results file gets from _common.write_results, from this very run
    prov = result["provenance"]
    assert prov["command"].endswith("python benchmarks/bench_population_eval.py --quick --out " + str(out))
    assert prov["argv"][1:] == ["--quick", "--out", str(out)] and prov["commit"] and prov["date"]
    assert {"benchmarks/bench_population_eval.py", "benchmarks/_common.py", "irep_deploy/search/des.py",
            "irep_deploy/data.py"} <= set(prov["depends"])
    assert "irep_deploy/errors.py" in prov["ignored"] and "irep_deploy/errors.py" not in prov["depends"]
    assert out.with_suffix(".md").read_text().splitlines()[-1].startswith("Provenance: commit " + prov["commit"])


def test_step_sync_benchmark_alternates_both_variants_in_both_loops(tmp_path):
    out = tmp_path / "step_sync"
    run("bench_step_sync.py", "--quick", "--out", str(out))
    result = json.loads(out.with_suffix(".json").read_text())
    for loop in ("train", "search"):
        samples = {k: v["samples"] for k, v in result[loop]["steps_per_s"].items()}
        assert len(samples) == 2 and all(len(s) == result["rounds"] == 2 for s in samples.values())
        ratio = result[loop]["new_over_old"]
        assert ratio["min"] <= ratio["median"] <= ratio["max"]
    assert result["log_every"] > 1  # the library's interval, restored after the variant with 1


def test_irepify_benchmark_fused_equals_folded_original(tmp_path):
    out = tmp_path / "irepify"
    run("bench_irepify.py", "--quick", "--out", str(out))
    result = json.loads(out.with_suffix(".json").read_text())
    assert list(result["models"]) == ["resnet18"] and result["settings"]["batches"] == [1, 2]
    info = result["models"]["resnet18"]
    p = info["params"]
    assert p["fused"] == p["original folded"] < p["original"] < p["multi-branch"]
    assert 0 < info["branches"] < info["capacity"] and 0 < info["max_rel_error"] <= 1e-5
    assert {(r["variant"], r["batch"]) for r in info["latency"]} == {
        (v, b) for v in ("fused", "original folded", "original") for b in (1, 2)}
    assert all(len(r["round_medians_ms"]) == result["settings"]["rounds"] == 2 for r in info["latency"])
    assert {(q["ratio"], q["batch"]) for q in info["ratios"]} == {
        (q, b) for q in ("fused / original", "fused / original folded", "original / original folded")
        for b in (1, 2)}
    ms = {(r["variant"], r["batch"]): r["median_ms"] for r in info["latency"]}
    for q in info["ratios"]:
        top, bottom = q["ratio"].split(" / ")
        assert q["value"] == pytest.approx(ms[(top, q["batch"])] / ms[(bottom, q["batch"])])
        assert len(q["rounds"]) == 2 and q["untrusted"] == (q["spread"] > 0.10)
    timing = result["irepify_fuse"]
    assert len(timing["runs_s"]["irepify + fuse_model"]) == timing["repeats"] == 2
    md = out.with_suffix(".md").read_text()
    assert result["command"] in md and "| resnet18 | 11,689,512 | 11,684,712 |" in md


def _logits(path: Path, x):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_int8_accuracy_numbers_follow_the_written_onnx_files(tmp_path):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from irep_deploy.data import load_data

    out = tmp_path / "res" / "int8_accuracy"
    run("int8_accuracy.py", "--quick", "--work-dir", str(tmp_path / "work"), "--out", str(out))
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["status"] == "complete" and result["recipe"]["epochs"] == 1
    models = {m["code"]: m for m in result["models"]}
    assert set(models) == {"plain", "des"} and {m["backbone"] for m in result["models"]} == {"resnet18_cifar"}
    evidence = json.loads((BENCH / "results" / "evidence_fmnist.json").read_text())
    assert models["des"]["branches"] == ArchCode.loads(evidence["search"]["code"]).count() > 0
    assert models["plain"]["branches"] == 0

    first = Path(models["plain"]["dir"]) / "model.onnx"
    channels = onnx.load(str(first)).graph.input[0].type.tensor_type.shape.dim[1].dim_value
    data = load_data("fashion-mnist", limit=result["test_limit"], parts=("test",), augment=False,
                     in_channels=channels).split("test")
    x = np.stack([data[i][0].numpy() for i in range(len(data))]).astype(np.float32)
    y = np.array([int(data[i][1]) for i in range(len(data))])
    md = out.with_suffix(".md").read_text()
    assert result["command"] in md and "**Reduced run**: 1 training epochs" in md
    for code, m in models.items():
        fp32 = Path(m["dir"]) / "model.onnx"
        want = _logits(fp32, x).argmax(1)
        assert {(q["method"], q["per_channel"]) for q in m["quantized"]} == {
            (a, b) for a in ("minmax", "percentile") for b in (False, True)}
        for q in m["quantized"]:
            assert "error" not in q, q
            int8 = Path(m["dir"]) / q["file"]
            qproto = onnx.load(str(int8))
            assert sum(n.op_type == "QuantizeLinear" for n in qproto.graph.node) == q["quantize_linear"] > 0
            # per-channel files carry one weight scale per output channel, per-tensor ones a single scale
            inits = {i.name: numpy_helper.to_array(i) for i in qproto.graph.initializer}
            scales = [inits[n.input[1]].size for n in qproto.graph.node
                      if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim == 4]
            assert scales and (max(scales) > 1) == q["per_channel"]
            got = _logits(int8, x).argmax(1)
            assert q["examples"] == len(y)
            assert q["changed"] == int((got != want).sum())
            assert q["fp32_top1"] == pytest.approx(100.0 * (want == y).mean())
            assert q["int8_top1"] == pytest.approx(100.0 * (got == y).mean())
            assert q["drop"] == pytest.approx(q["fp32_top1"] - q["int8_top1"])
            assert "| {} | {} | {} | {} |".format(code, m["branches"], q["method"],
                                                  "per-channel" if q["per_channel"] else "per-tensor") in md
        # weight ranges: every Conv of the fused FP32 file, from its initializers
        proto = onnx.load(str(fp32))
        weights = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
        convs = [n for n in proto.graph.node if n.op_type == "Conv"]
        layers = m["weight_ranges"]["layers"]
        assert [c.name for c in convs] == [layer["node"] for layer in layers]
        for c, layer in zip(convs, layers):
            w = np.abs(weights[c.input[1]]).reshape(weights[c.input[1]].shape[0], -1).max(1)
            assert np.allclose(layer["channel_max_abs"], w)
            assert layer["max_over_median"] == pytest.approx(w.max() / np.median(w))
    # fusion gives the DES network the plain network's layers; only the kernels' values differ
    plain, des = models["plain"]["weight_ranges"], models["des"]["weight_ranges"]
    assert [x["shape"] for x in plain["layers"]] == [x["shape"] for x in des["layers"]]
    vs = des["summary"]["max_abs_vs_plain"]["per_layer"]
    assert vs == pytest.approx([a["max_abs"] / b["max_abs"] for a, b in zip(des["layers"], plain["layers"])])
    rows = result["latency"]["rows"]
    assert {(r["model"], r["batch"]) for r in rows} == {("resnet18_cifar/" + c, b) for c in models for b in (1, 32)}
    for r in rows:
        assert r["int8_over_fp32"] == pytest.approx(r["int8_median_ms"] / r["fp32_median_ms"])
        assert len(r["rounds"]) == 2 and r["untrusted"] == (r["spread"] > 0.10)


def test_search_phase_compares_the_three_searches_as_their_runs_recorded(tmp_path):
    out = tmp_path / "res" / "search_phase"
    run("search_phase.py", "--quick", "--work-dir", str(tmp_path / "work"), "--out", str(out))
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["status"] == "complete" and len(result["searches"]) == 6  # 3 arms x 2 seeds
    settings = {"des": ("des", "directional"), "undirected": ("des", "uniform"), "random": ("random", "directional")}
    first = {}
    for s in result["searches"]:
        run_dir = Path(s["run_dir"])
        config = json.loads((run_dir / "config.json").read_text())
        assert (config["strategy"], config["sampler"]) == settings[s["arm"]]
        log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
        assert s["best"] == [r["best_fitness"] for r in log if r["event"] == "round"]
        first.setdefault(s["seed"], set()).add(s["best"][0])
        history = [len(c["history"]) for c in json.loads((run_dir / "population.json").read_text())["codes"]]
        assert (max(history) == 1) == (s["arm"] == "random")  # random search carries no code over
    # round 1 is shared by the arms of a seed (same SuperNet training, same initial population)
    assert all(len(v) == 1 for v in first.values())
    a = result["analysis"]
    by = {(s["arm"], s["seed"]): s for s in result["searches"]}
    for arm, curve in a["curves"].items():
        assert curve["evaluations"] == [4, 8]
        for i in range(2):
            assert curve["best_so_far"][i]["mean"] == pytest.approx(
                sum(max(by[arm, seed]["best"][:i + 1]) for seed in a["seeds"]) / len(a["seeds"]))
    assert list(a["paired"]) == ["des_vs_undirected", "des_vs_random"]
    for other in ("undirected", "random"):
        pair = a["paired"]["des_vs_" + other]
        cost = pair["evaluations"]
        assert pair["evaluations_to_level"]["values"] == [cost["des"][str(s)] - cost[other][str(s)] for s in a["seeds"]]
        for seed in a["seeds"]:  # the level is the lower final best so far of the two; each reaches it there
            finals = [max(by[arm, seed]["best"]) for arm in ("des", other)]
            assert pair["levels"][str(seed)] == min(finals)
            assert all(4 <= cost[arm][str(seed)] <= 8 for arm in ("des", other))
    md = out.with_suffix(".md").read_text()
    assert "## Does DES converge faster?" in md and "des vs random" in md
    assert (out.parent / "figures" / "search_phase.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ranking_correlates_supernet_fitness_with_its_retrained_runs(tmp_path):
    from scipy import stats
    out = tmp_path / "res" / "ranking"
    run("ranking.py", "--quick", "--work-dir", str(tmp_path / "work"), "--out", str(out))
    result = json.loads(out.with_suffix(".json").read_text())
    codes = result["codes"]
    assert result["status"] == "complete" and len(result["runs"]) == 2 * len(codes) == 14
    assert [c["group"] for c in codes] == ["best", "best", "worst", "worst", "population", "random", "random"]
    population = json.loads((tmp_path / "work" / "search" / "population.json").read_text())
    in_population = {"".join(c["bits"]) for c in population["codes"]}
    for c in codes:
        bits = "".join("".join(map(str, row)) for row in ArchCode.loads(c["code"]).bits)
        assert (bits in in_population) == (c["group"] != "random")
        if c["recorded_fitness"] is not None:  # rescored with supernet.pt exactly as the search scored it
            assert c["fitness"] == c["recorded_fitness"]
    for r in result["runs"]:
        assert ArchCode.load(Path(r["run_dir"]) / "arch.bin") == ArchCode.loads(codes[r["index"]]["code"])
    acc = {}
    for r in result["runs"]:
        acc.setdefault(r["index"], []).append(r["test_top1"])
    fitness = [c["fitness"] for c in codes]
    mean = [sum(acc[i]) / 2 for i in range(len(codes))]
    a = result["analysis"]
    assert a["kendall_tau"] == pytest.approx(stats.kendalltau(fitness, mean)[0])
    assert a["spearman_rho"] == pytest.approx(stats.spearmanr(fitness, mean)[0])
    lo, hi = a["kendall_tau_ci"]
    assert -1 <= lo <= hi <= 1
    assert a["top_k"] == 1 and a["top_k_overlap"] == int(max(range(7), key=fitness.__getitem__) ==
                                                        max(range(7), key=mean.__getitem__))
    recal = [c["fitness_recalibrated"] for c in codes]  # the second proxy, ranked the same way
    assert result["recalibrate"] == 8 and all(0 <= v <= 100 for v in recal) and recal != fitness
    assert result["analysis_recalibrated"]["kendall_tau"] == pytest.approx(stats.kendalltau(recal, mean)[0])
    assert (out.parent / "figures" / "ranking.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
