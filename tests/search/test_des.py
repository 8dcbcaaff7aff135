"""Algorithm 1 end to end on real data (sklearn digits): outputs, resume after SIGKILL, torchrun, NaN."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from irep_deploy import ArchCode, load_checkpoint
from irep_deploy.cli import main
from irep_deploy.tensorfile import load_tree

TINY = ["--dataset", "digits", "--backbone", "resnet18_cifar", "--width", "0.125", "--population", "6",
        "--subnets", "2", "--warmup-epochs", "1", "--rounds", "2", "--round-epochs", "2", "--batch-size", "64",
        "--limit", "640", "--device", "cpu", "--quiet", "--seed", "3", "--deterministic"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def search_cmd(*args: str):
    return [sys.executable, "-m", "irep_deploy", "search", *args]


def read_log(run: Path):
    path = run / "log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):  # a whole search: its users are marked slow
    run = tmp_path_factory.mktemp("search") / "ref"
    proc = subprocess.run(search_cmd("--run-dir", str(run), *TINY), env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return run, proc.stdout


@pytest.mark.slow
def test_search_writes_every_output(reference):
    run, stdout = reference
    assert "best code:" in stdout
    for name in ("arch.bin", "best_seen_arch.bin", "population.json", "alpha_beta.jsonl", "supernet.pt", "log.jsonl",
                 "state.pt", "config.json"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    assert load_checkpoint(run / "supernet.pt").header["input_size"] == 8  # digits' resolution
    pop = json.loads((run / "population.json").read_text())
    best = ArchCode.load(run / "arch.bin")
    budget = best.budget(2 / 3)
    assert pop["round"] == 2 and pop["budget"] == budget and len(pop["codes"]) == 6
    assert json.loads((run / "config.json").read_text())["deterministic"] is True
    assert all(c["branches"] <= budget for c in pop["codes"])
    fitness = [c["fitness"] for c in pop["codes"]]
    assert fitness == sorted(fitness, reverse=True) and 0 < fitness[0] <= 100
    top = best.with_bits([[int(ch) for ch in row] for row in pop["codes"][0]["bits"]])
    assert top == best and pop["codes"][0]["history"][-1] == [2, fitness[0]]
    rounds = [json.loads(line) for line in (run / "alpha_beta.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert torch.tensor(rounds[1]["alpha"]).shape == (len(best.layers), len(best.ops))
    assert rounds[0]["alpha"] != rounds[1]["alpha"]  # Adam moved the architecture parameters
    log = read_log(run)
    assert [r["epoch"] for r in log if r["event"] == "epoch"] == [1, 2, 3, 4, 5]
    assert [r["round"] for r in log if r["event"] == "round"] == [1, 2]
    ck = load_checkpoint(run / "supernet.pt")
    assert ck.supernet and ck.header["in_channels"] == 1 and ck.header["num_classes"] == 10
    # the SuperNet checkpoint fuses under the found code through the ordinary CLI
    assert main(["fuse", str(run / "supernet.pt"), str(run / "arch.bin"), "-o", str(run / "d.pt")]) == 0


@pytest.mark.slow
def test_resume_after_sigkill_mid_round_ends_identical(reference, tmp_path):
    ref, _ = reference
    run = tmp_path / "killed"
    proc = subprocess.Popen(search_cmd("--run-dir", str(run), *TINY), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    # epoch 4 is the first epoch of round 2: kill while epoch 5 (the rest of round 2) runs
    while time.time() < deadline and proc.poll() is None:
        if any(r.get("epoch") == 4 for r in read_log(run)):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the search finished before it could be killed"
    state = load_tree(run / "state.pt", "state").tree
    # killed during epoch 4 or 5: either way round 1 is scored and round 2 is under way
    assert state["epoch"] in (3, 4) and len(state["rounds"]) == 1
    # same thread count as the reference: float reductions differ between thread counts
    resumed = subprocess.run(search_cmd("--resume", str(run), "--quiet", "--device", "cpu"), env=ENV,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert (run / "arch.bin").read_text() == (ref / "arch.bin").read_text()
    assert (run / "population.json").read_text() == (ref / "population.json").read_text()  # best_seen included
    assert (run / "best_seen_arch.bin").read_text() == (ref / "best_seen_arch.bin").read_text()
    assert (run / "alpha_beta.jsonl").read_text() == (ref / "alpha_beta.jsonl").read_text()
    a = load_tree(run / "state.pt", "state").tree["model"]
    b = load_tree(ref / "state.pt", "state").tree["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in read_log(run) if r["event"] == "epoch"] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_two_gloo_processes_under_torchrun(tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "irep_deploy", "search", "--run-dir", str(run), *TINY]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("best code:") == 1  # only rank 0 reports
    pop = json.loads((run / "population.json").read_text())
    best = ArchCode.load(run / "arch.bin")
    assert len(pop["codes"]) == 6 and all(c["branches"] <= best.budget(2 / 3) for c in pop["codes"])
    assert all(0 < c["fitness"] <= 100 for c in pop["codes"])  # every rank's share was gathered
    # Every rank scored its codes with rank 0's BatchNorm statistics: the SuperNet rank 0 saved gives
    # each code the fitness recorded, whichever rank scored it.
    from irep_deploy.data import eval_loader, load_data
    from irep_deploy.reparam import fuse_model
    from irep_deploy.evaluation import evaluate_models
    supernet = load_checkpoint(run / "supernet.pt").build()
    val = load_data("digits", val_fraction=0.1, limit=640, parts=("val",)).val
    for c in pop["codes"]:
        code = best.with_bits([[int(ch) for ch in row] for row in c["bits"]])
        (res,), _, _ = evaluate_models([fuse_model(supernet, arch=code)], eval_loader(val, 256), torch.device("cpu"))
        assert res.top1 == c["fitness"], c["bits"]
    log = read_log(run)
    assert [r["epoch"] for r in log if r["event"] == "epoch"] == [1, 2, 3, 4, 5]  # written once
    assert len((run / "alpha_beta.jsonl").read_text().splitlines()) == 2


def test_nan_loss_stops_with_a_message(tmp_path, capsys):
    run = tmp_path / "nan"
    args = ["search", "--run-dir", str(run)] + [a for a in TINY] + ["--lr", "1e12"]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc != 0 and "loss became" in err and len(err.strip().splitlines()) == 1
    assert not (run / "arch.bin").exists()


@pytest.mark.slow
def test_resume_and_reuse_errors(reference, tmp_path, capsys):
    ref, _ = reference
    assert main(["search", "--resume", str(tmp_path / "none")]) == 1
    assert "no search state to resume" in capsys.readouterr().err
    assert main(["search", "--run-dir", str(ref)] + TINY) == 1
    assert "holds a search already" in capsys.readouterr().err


def test_bf16_autocast_and_channels_last_search_runs(tmp_path, capsys):
    run = tmp_path / "bf16"
    args = ["search", "--run-dir", str(run)] + TINY + ["--amp", "bf16", "--channels-last", "--rounds", "1",
                                                      "--round-epochs", "1", "--warmup-epochs", "0"]
    assert main(args) == 0, capsys.readouterr().err
    config = json.loads((run / "config.json").read_text())
    assert config["amp"] == "bf16" and config["channels_last"] is True
    pop = json.loads((run / "population.json").read_text())
    assert all(0 < c["fitness"] <= 100 for c in pop["codes"])


@pytest.mark.parametrize("field, value, label", [("round_epochs", 0, "round epochs"), ("batch_size", 0, "batch size"),
                                                 ("val_fraction", 1.5, "validation fraction"),
                                                 ("sampler", "eq8", "sampler"), ("strategy", "grid", "strategy")])
def test_invalid_settings_name_the_setting_and_its_value(field, value, label):
    from irep_deploy.errors import IrepError
    from irep_deploy.search.des import make_config
    with pytest.raises(IrepError, match="invalid {}: {}$".format(label, value)):
        make_config("cpu", **{field: value})


def test_ablation_search_runs_records_its_settings_and_refuses_a_changed_resume(tmp_path, capsys):
    from irep_deploy.errors import IrepError
    from irep_deploy.search.des import search
    run = tmp_path / "ablation"
    short = TINY + ["--rounds", "2", "--round-epochs", "1", "--warmup-epochs", "0"]
    assert main(["search", "-o", str(run), "--sampler", "uniform", "--strategy", "random"] + short) == 0
    config = json.loads((run / "config.json").read_text())
    assert (config["sampler"], config["strategy"]) == ("uniform", "random")
    pop = json.loads((run / "population.json").read_text())
    assert pop["round"] == 2 and len(pop["codes"]) == 6  # the same outputs as DES
    assert all(len(c["history"]) == 1 for c in pop["codes"])  # fresh codes, scored once
    _check_best_seen(run, capsys.readouterr().out)
    assert main(["search", "--resume", str(run), "--strategy", "des"]) == 2  # usage: a setting given with --resume
    assert "drop --strategy" in capsys.readouterr().err
    from irep_deploy.runs import read_run_state
    from irep_deploy.search.des import SearchConfig
    _, saved = read_run_state(run, "search", SearchConfig)
    with pytest.raises(IrepError, match="strategy differs"):
        search(run, dataclasses.replace(saved, strategy="des"), resume=True, device="cpu", progress=False)


def _check_best_seen(run: Path, stdout: str) -> None:
    """best_seen_arch.bin is the best code of the round with the highest best fitness (the earliest of
    equals), beside the answer; the search's last line says which is which; a resume keeps it, also
    from a state written before it was saved (rebuilt from the codes' histories)."""
    from irep_deploy.search.des import search
    from irep_deploy.tensorfile import load_tree, save_tree
    rounds = [r for r in read_log(run) if r["event"] == "round"]
    top = max(r["best_fitness"] for r in rounds)
    first = next(r for r in rounds if r["best_fitness"] == top)
    pop = json.loads((run / "population.json").read_text())
    seen = pop["best_seen"]
    assert (seen["round"], seen["fitness"]) == (first["round"], top)
    code = ArchCode.load(run / "best_seen_arch.bin")
    assert ["".join(map(str, row)) for row in code.bits] == seen["bits"] and code.count() == seen["branches"]
    same = seen["bits"] == pop["codes"][0]["bits"]
    assert same is (code == ArchCode.load(run / "arch.bin"))
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("answer: {}/arch.bin, the best code of the final round {}".format(run, pop["round"]))
    assert ("is the same code's" if same else "belongs to another code") in last
    report = search(run, resume=True, device="cpu", progress=False)  # finished: restores and returns
    assert (report.best_seen_round, report.best_seen_fitness, report.best_seen) == (seen["round"], top, code)
    state = load_tree(run / "state.pt", "state").tree
    del state["best_seen"]
    save_tree(run / "state.pt", state)
    report = search(run, resume=True, device="cpu", progress=False)
    assert (report.best_seen_round, report.best_seen_fitness, report.best_seen) == (seen["round"], top, code)
