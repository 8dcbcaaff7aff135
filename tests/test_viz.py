"""Figures: real matplotlib (Agg), a real small DES search run on digits, the CLI and its error paths."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")  # the digits dataset of the search fixture

import matplotlib.image  # noqa: E402

from irep_deploy import viz  # noqa: E402
from irep_deploy.arch import ArchCode  # noqa: E402
from irep_deploy.cli import main  # noqa: E402
from irep_deploy.errors import IrepError  # noqa: E402

RUN_FIGURES = {"arch_code.png", "arch_code.json", "alpha_beta.png", "alpha_rounds.png", "alpha_beta.json",
               "asym_minus_dil.png", "asym_minus_dil.json", "fitness.png", "fitness.json"}
POINTS = {"title": "test points", "points": [
    {"label": "plain", "latency_ms": 1.0, "accuracy": 90.0},
    {"label": "all-branch", "latency_ms": 3.5, "accuracy": 92.0},
    {"label": "random 0", "group": "random", "latency_ms": 1.1, "accuracy": 90.5},
    {"label": "random 1", "group": "random", "latency_ms": 1.2, "accuracy": 91.0},
    {"label": "DES", "latency_ms": 1.05, "accuracy": 92.5}]}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real (tiny) DES search on digits: 2 rounds, population 4."""
    from irep_deploy.search.des import make_config, search
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("search") / "run"
    config = make_config(None, backbone="resnet18_cifar", dataset="digits", width=0.125, population=4, subnets=1,
                         warmup_epochs=1, rounds=2, round_epochs=1, batch_size=64, limit=320, seed=0)
    search(run, config, device="cpu", progress=False)
    return run


@pytest.fixture(scope="module")
def plotted(run_dir, tmp_path_factory):
    points = tmp_path_factory.mktemp("points") / "points.json"
    points.write_text(json.dumps(POINTS))
    out = tmp_path_factory.mktemp("figs") / "out"
    report = viz.plot(run_dir, out, points=points)
    return out, report


def _jsonl(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_png(path: Path, min_side: int = 300) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(str(path))
    assert image.shape[0] >= min_side and image.shape[1] >= min_side, image.shape
    assert float(image[..., :3].std()) > 0.05  # not a blank canvas
    assert path.stat().st_size > 10_000


# -- the run-directory figures ----------------------------------------------------------------------
def test_plot_run_writes_every_figure(plotted):
    out, report = plotted
    names = {p.name for p in report.written}
    assert names == RUN_FIGURES | {"accuracy_latency.png", "accuracy_latency.json"}
    assert report.skipped == []
    assert {p.name for p in out.iterdir()} == names  # no temporary files left
    for name in names:
        if name.endswith(".png"):
            check_png(out / name)


def test_arch_data_matches_the_code(plotted, run_dir):
    out, _ = plotted
    code = ArchCode.load(run_dir / "arch.bin")
    data = json.loads((out / "arch_code.json").read_text())
    assert data["layers"] == list(code.layers) and data["ops"] == list(code.ops)
    assert data["cells"] == [list(row) for row in code.bits]  # resnet18_cifar: every op available
    assert data["op_counts"] == code.op_counts() and data["layer_counts"] == code.layer_counts()
    assert data["kept"] == code.count() and data["capacity"] == 17 * 8
    assert data["strides"].count(2) == 3


def test_difference_map_matches_alpha_beta_jsonl(plotted, run_dir):
    out, _ = plotted
    records = _jsonl(run_dir / "alpha_beta.jsonl")
    diff = json.loads((out / "asym_minus_dil.json").read_text())
    scores = json.loads((out / "alpha_beta.json").read_text())
    assert diff["rounds"] == [r["round"] for r in records] == [1, 2]
    assert diff["asymmetric_ops"] == ["conv1x3", "conv3x1"]
    assert sorted(diff["dilated_ops"]) == ["dil1x2", "dil2x1", "dil2x2"]
    for r, rec in enumerate(records):
        ops = rec["ops"]
        score = torch.sigmoid(torch.tensor(rec["alpha"], dtype=torch.float64)) * \
            torch.sigmoid(torch.tensor(rec["beta"], dtype=torch.float64))[:, None]
        asym = score[:, [ops.index("conv1x3"), ops.index("conv3x1")]].mean(1)
        dil = score[:, [ops.index("dil2x1"), ops.index("dil1x2"), ops.index("dil2x2")]].mean(1)
        assert torch.allclose(torch.tensor(diff["diff"][r], dtype=torch.float64), asym - dil, rtol=0, atol=1e-12)
        assert torch.allclose(torch.tensor(scores["score"][r], dtype=torch.float64), score, rtol=0, atol=1e-12)
    # the search trained alpha/beta, so the map is not all zeros
    assert max(abs(v) for row in diff["diff"] for v in row) > 0


def test_fitness_data_matches_the_logs(plotted, run_dir):
    out, _ = plotted
    data = json.loads((out / "fitness.json").read_text())
    rounds = [r for r in _jsonl(run_dir / "log.jsonl") if r.get("event") == "round"]
    assert [(r["round"], r["best_fitness"], r["mean_fitness"]) for r in data["rounds"]] == \
        [(r["round"], r["best_fitness"], r["mean_fitness"]) for r in rounds]
    population = json.loads((run_dir / "population.json").read_text())
    assert [c["history"] for c in data["codes"]] == [c["history"] for c in population["codes"]]
    assert len(data["codes"]) == 4


def test_points_data(plotted):
    out, _ = plotted
    data = json.loads((out / "accuracy_latency.json").read_text())
    assert data["title"] == "test points"
    assert [(p["label"], p["latency_ms"], p["accuracy"]) for p in data["points"]] == \
        [(p["label"], p["latency_ms"], p["accuracy"]) for p in POINTS["points"]]
    assert [p["group"] for p in data["points"]] == ["plain", "all-branch", "random", "random", "DES"]


# -- other inputs -----------------------------------------------------------------------------------
def test_arch_file_alone_marks_unavailable_ops(tmp_path):
    code = ArchCode.random("vgg16_cifar", seed=1)
    code.save(tmp_path / "arch.bin")
    assert main(["plot", str(tmp_path / "arch.bin")]) == 0
    out = tmp_path / "figures"
    assert {p.name for p in out.iterdir()} == {"arch_code.png", "arch_code.json"}
    check_png(out / "arch_code.png")
    data = json.loads((out / "arch_code.json").read_text())
    identity = code.ops.index("identity")
    specs = code.layer_specs()
    for spec, row, bits in zip(specs, data["cells"], code.bits):
        assert row[identity] == (bits[identity] if spec.available("identity") else -1)
    assert sum(1 for row in data["cells"] if row[identity] == -1) == 4  # the channel-changing convs


def test_alpha_beta_data_on_a_space_with_unavailable_ops():
    code = ArchCode.full("vgg16_cifar")
    ops, layers = list(code.ops), list(code.layers)
    alpha = [[0.1 * (o - l) for o in range(len(ops))] for l in range(len(layers))]
    beta = [0.2 * l - 1.0 for l in range(len(layers))]
    ab = viz.AlphaBeta(ops, layers, [1], [alpha], [beta])
    scores, diff = viz.alpha_beta_data(ab, "vgg16_cifar")
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    l = layers.index("features.0")  # identity unavailable there; it is in neither group anyway
    assert not scores["available"][l][ops.index("identity")]
    s = [sig(a) * sig(beta[l]) for a in alpha[l]]
    expected = (s[ops.index("conv1x3")] + s[ops.index("conv3x1")]) / 2 - \
        (s[ops.index("dil2x1")] + s[ops.index("dil1x2")] + s[ops.index("dil2x2")]) / 3
    assert diff["diff"][0][l] == pytest.approx(expected, abs=1e-15)
    assert diff["sigmoid_alpha_diff"][0][l] * sig(beta[l]) == pytest.approx(expected, abs=1e-15)
    # ImageNet space: no dil2x2, so the dilated group is dil2x1 and dil1x2
    im = ArchCode.full("resnet18")
    ab = viz.AlphaBeta(list(im.ops), list(im.layers), [3], [[[0.0] * len(im.ops)] * len(im.layers)],
                       [[0.0] * len(im.layers)])
    _, diff = viz.alpha_beta_data(ab, "resnet18")
    assert diff["dilated_ops"] == ["dil2x1", "dil1x2"] and diff["diff"] == [[0.0] * len(im.layers)]


def test_partial_run_dir_skips_and_says_so(run_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(run_dir / "population.json", run / "population.json")
    with open(run_dir / "log.jsonl") as src, open(run / "log.jsonl", "w") as dst:
        dst.write(src.read() + '{"event": "round", "round": 9, "best')  # a writer mid-append
    report = viz.plot(run)
    assert {p.name for p in report.written} == {"fitness.png", "fitness.json"}
    assert report.out_dir == run / "figures"
    assert any("arch.bin" in s for s in report.skipped) and any("alpha_beta.jsonl" in s for s in report.skipped)
    data = json.loads((run / "figures" / "fitness.json").read_text())
    assert [r["round"] for r in data["rounds"]] == [1, 2]


# -- errors: one line, non-zero exit, nothing written ---------------------------------------------
def _fails(capsys, argv, *needles):
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("irep-deploy plot: error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err


def test_cli_errors(capsys, tmp_path, run_dir):
    out = tmp_path / "out"
    _fails(capsys, ["plot", str(tmp_path / "missing"), "-o", str(out)], "no such file or directory")
    _fails(capsys, ["plot", str(tmp_path), "-o", str(out)], "not a search run directory")
    _fails(capsys, ["plot", "-o", str(out)], "nothing to plot")
    (tmp_path / "notarch.bin").write_text("hello\n")
    _fails(capsys, ["plot", str(tmp_path / "notarch.bin"), "-o", str(out)], "notarch.bin:1")
    bad = tmp_path / "bad.json"
    for content, needle in [("[", "not valid JSON"), ("[]", "non-empty list"),
                            ('[{"label": "a", "accuracy": 90}]', "point 1: missing 'latency_ms'"),
                            ('[{"label": "a", "latency_ms": 0, "accuracy": 90}]', "must be positive"),
                            ('[{"label": "a", "latency_ms": 1, "accuracy": 0.9e3}]', "percentage"),
                            ('[{"label": "a", "latency_ms": "1", "accuracy": 90}]', "finite number")]:
        bad.write_text(content)
        # a valid run directory with bad points: no figure at all is written
        _fails(capsys, ["plot", str(run_dir), "--points", str(bad), "-o", str(out)], str(bad), needle)
    _fails(capsys, ["plot", "--points", str(tmp_path / "nope.json"), "-o", str(out)], "no such file")
    assert not out.exists()
    afile = tmp_path / "afile"
    afile.write_text("x")
    _fails(capsys, ["plot", str(run_dir / "arch.bin"), "-o", str(afile)], "not a directory")


def test_malformed_alpha_beta_is_reported_with_its_line(tmp_path, run_dir):
    records = _jsonl(run_dir / "alpha_beta.jsonl")
    records[1]["alpha"] = records[1]["alpha"][:-1]
    path = tmp_path / "alpha_beta.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(IrepError, match=r"alpha_beta.jsonl:2: 'alpha' must be 17 layers x 8 ops"):
        viz.load_alpha_beta(path)
    path.write_text(json.dumps(records[0]) + "\n" + json.dumps(records[0]) + "\n")
    with pytest.raises(IrepError, match=r":2: 'round' must be an integer larger"):
        viz.load_alpha_beta(path)
    path.write_text("")
    with pytest.raises(IrepError, match="no rounds recorded"):
        viz.load_alpha_beta(path)
