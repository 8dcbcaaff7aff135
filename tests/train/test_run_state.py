"""One run-state reader for train and search: the same version rule, the same refusal of unknown
settings and of changed settings on resume, one line naming the file. Each case runs through the
public entry points (``train``, ``search``, the CLI) on a state written by the shared writer and
then edited the way a newer release or another kind of run would have left it."""
from __future__ import annotations

import dataclasses
import re
import sys

import pytest
import torch

from irep_deploy import ArchCode
from irep_deploy.cli import main
from irep_deploy.errors import CheckpointError, IrepError, TrainingDiverged, UsageError
from irep_deploy.runs import read_run_state, state_path, write_run_state
from irep_deploy.tensorfile import load_tree, save_tree, torch_reads_pickle_safely

SAFE_TORCH = torch_reads_pickle_safely()
from irep_deploy.search.des import SearchConfig, make_config, search
from irep_deploy.steps import EpochTotals
from irep_deploy.train import TrainConfig, train, validate_train_state

TRAIN = TrainConfig(backbone="resnet18_cifar", dataset="digits", width=0.125, epochs=1, batch_size=64)
SEARCH = make_config("cpu", dataset="digits", limit=256)
KINDS = {"train": (TRAIN, lambda run, config: train(run, config, resume=True, progress=False, device="cpu")),
         "search": (SEARCH, lambda run, config: search(run, config, resume=True, progress=False, device="cpu"))}


def _state(tmp_path, kind, **edits):
    """A run directory whose state.pt the shared writer wrote, then ``edits`` applied to its dict
    (``config=`` entries update the saved settings; None deletes a key)."""
    run = tmp_path / kind
    run.mkdir()
    write_run_state(run, kind, KINDS[kind][0], epoch=0)
    state = load_tree(state_path(run), "state").tree
    state["config"].update(edits.pop("config", {}))
    for key, value in edits.items():
        if value is None:
            state.pop(key)
        else:
            state[key] = value
    save_tree(state_path(run), state)
    return run


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_an_unknown_setting_is_refused_by_both(tmp_path, kind):
    """Before, a search resume failed with a TypeError traceback from SearchConfig(**saved)."""
    run = _state(tmp_path, kind, config={"future_knob": 1})
    with pytest.raises(CheckpointError, match=r"state\.pt: unknown setting 'future_knob' \(written by a newer"):
        KINDS[kind][1](run, None)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_changed_setting_on_resume_is_refused_by_both(tmp_path, kind):
    """Before, search resumed with the saved settings and silently dropped the given ones."""
    config, resume = KINDS[kind]
    run = _state(tmp_path, kind)
    with pytest.raises(IrepError, match=r"resume uses the run's own settings; lr differs \(0\.\d+ saved, 0\.5 given\)"):
        resume(run, dataclasses.replace(config, lr=0.5))
    state, saved = read_run_state(run, kind, type(config), config)  # the same settings are accepted
    assert saved == config and state["epoch"] == 0


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("version, message", [(2, "version 2 is newer than this irep-deploy reads"),
                                              (0, "version 0 is not a positive integer"),
                                              ("1", "version '1' is not a positive integer"),
                                              (True, "version True is not a positive integer")])
def test_the_version_rule_is_the_same_for_both(tmp_path, kind, version, message):
    """Train refused only newer versions (>), search every other one (!=), with a message that did
    not say why; now both accept versions up to their own and refuse newer or malformed ones."""
    run = _state(tmp_path, kind, format_version=version)
    with pytest.raises(CheckpointError, match=message) as info:
        KINDS[kind][1](run, None)
    assert str(state_path(run)) in str(info.value) and "\n" not in str(info.value)


def test_a_search_state_of_the_old_writer_still_resumes(tmp_path):
    """Search states written before the readers were merged name their version "version"."""
    run = _state(tmp_path, "search", format_version=None, version=1)
    state, saved = read_run_state(run, "search", SearchConfig)
    assert saved == SEARCH and isinstance(saved.arch_betas, tuple)


def test_a_state_of_the_other_kind_is_named(tmp_path):
    run = _state(tmp_path, "search")
    with pytest.raises(CheckpointError, match=r"state\.pt: holds a search state, not an irep-deploy training state"):
        KINDS["train"][1](run, None)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_cli_resume_errors_are_one_line_naming_the_file(tmp_path, kind, capsys):
    run = _state(tmp_path, kind, config={"future_knob": 1})
    assert main([kind, "--resume", str(run)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(state_path(run)) in err and "Traceback" not in err
    state_path(run).write_bytes(b"PK\x03\x04 cut short")
    assert main([kind, "--resume", str(run)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(state_path(run)) in err
    assert ("not a readable {} state" if SAFE_TORCH else "old pickle-format {} state").format(
        "training" if kind == "train" else kind) in err


def test_the_divergence_message_says_whether_a_state_was_kept(tmp_path):
    totals = EpochTotals(64, float("nan"), 0.0, 0.1, diverged=(11, float("nan")))
    assert totals.divergence(0, tmp_path / "state.pt") == (
        "loss became nan at epoch 1 step 12; stopped, no state was saved yet (try a lower --lr)")
    (tmp_path / "state.pt").write_bytes(b"")
    assert "the last good state (after epoch 2) is kept in {}".format(tmp_path / "state.pt") in totals.divergence(
        2, tmp_path / "state.pt")


# -- a real run's state, damaged or edited: one line naming the file (issue 21) -------------------------
class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A training run stopped after the first of its two epochs (resumable) and a finished one-round
    search, both real, on sklearn's digits."""
    pytest.importorskip("sklearn")
    d = tmp_path_factory.mktemp("runs")

    def stop(epoch, record):
        raise _Stop()
    with pytest.raises(_Stop):
        code = ArchCode.random("resnet18_cifar", seed=3).dumps()
        train(d / "train", dataclasses.replace(TRAIN, arch=code, epochs=2, batch_size=32, limit=64), progress=False,
              device="cpu", on_epoch_end=stop)
    search(d / "search", make_config(backbone="resnet18_cifar", dataset="digits", width=0.125, limit=64,
                                     batch_size=32, population=2, subnets=1, warmup_epochs=0, rounds=1, round_epochs=1,
                                     eval_batch_size=64), progress=False, device="cpu")
    return d


def _copy(runs, tmp_path, kind, config=None, **parts):
    """A copy of the real run with its state rewritten by the one writer: ``config`` changes the saved
    settings, ``parts`` the other entries (``_DROP`` removes one; a callable maps the old value)."""
    import shutil

    run = tmp_path / kind
    shutil.copytree(str(runs / kind), str(run))
    state, saved = read_run_state(run, kind, TrainConfig if kind == "train" else SearchConfig)
    kept = {k: v for k, v in state.items() if k not in ("format", "format_version", "config")}
    for key, value in parts.items():
        if value is _DROP:
            del kept[key]
        else:
            kept[key] = value(kept[key]) if callable(value) else value
    write_run_state(run, kind, dataclasses.replace(saved, **(config or {})), **kept)
    return run


_DROP = object()


def _resume(kind, run, **kwargs):
    if kind == "train":
        return train(run, resume=True, progress=False, device="cpu", **kwargs)
    return search(run, resume=True, progress=False, device="cpu", **kwargs)


@pytest.mark.parametrize("kind, config, parts, message", [
    ("train", None, {"rng": _DROP}, "has no 'rng' entry"),
    ("train", None, {"rng": {"torch": 5}}, "random-number states are unusable"),
    ("train", None, {"epoch": "abc"}, "epoch' entry is 'abc', not a int"),
    ("train", None, {"epoch": 3}, "epoch is 3, outside 0 to 2"),
    ("train", None, {"model": _DROP}, "has no 'model' entry"),
    ("train", None, {"model": lambda m: dict(m, extra=1)}, "'model' entry 'extra' is not a tensor"),
    ("train", None, {"optimizer": [1]}, "'optimizer' entry is [1], not a dict"),
    ("train", None, {"history": lambda h: h + h}, "one record per finished epoch"),
    ("train", {"width": "abc"}, {}, "saved setting width is 'abc': expected a finite number"),
    ("train", {"lr": -1.0}, {}, "saved setting lr is -1.0: must be a finite number > 0"),
    ("train", {"dataset": "mnist"}, {}, "saved setting dataset is 'mnist': not one of"),
    ("train", {"backbone": "vgg16_cifar"}, {}, "names the network 'resnet18_cifar', not 'vgg16_cifar'"),
    ("train", {"backbone": "vgg16_cifar", "arch": None}, {}, "the saved model does not fit the run's network"),
    ("search", None, {"population": lambda p: [p[0][:-1]] + p[1:]}, "not 2 codes of one shape"),
    ("search", None, {"population": lambda p: [rows + rows[-1:] for rows in p]}, "population does not fit"),
    ("search", None, {"fitness": ["x", 1]}, "fitness is not one number per code"),
    ("search", None, {"epoch": 2.5}, "epoch' entry is 2.5, not a int"),
    ("search", None, {"w_opt": _DROP}, "has no 'w_opt' entry"),
    ("search", {"backbone": "vgg16_cifar"}, {}, "the saved SuperNet does not fit the run's network"),
    ("search", {"population": 3}, {}, "not 3 codes of one shape"),
])
def test_a_damaged_or_edited_state_is_one_line_naming_it(runs, tmp_path, kind, config, parts, message):
    run = _copy(runs, tmp_path, kind, config, **parts)
    with pytest.raises(CheckpointError) as info:
        _resume(kind, run)
    text = str(info.value)
    assert text.startswith(str(state_path(run)) + ": ") and message in text and "\n" not in text


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_run_whose_settings_name_a_module_resumes_only_when_the_user_names_it(runs, tmp_path, kind, monkeypatch):
    pkg = tmp_path / "statepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("open(__file__ + '.imported', 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run = _copy(runs, tmp_path, kind, {"backbone": "statepkg:make"})
    with pytest.raises(CheckpointError, match=r"names the network 'statepkg:make'; name it with --model statepkg:make"):
        _resume(kind, run)
    with pytest.raises(CheckpointError, match=r"names the network 'statepkg:make', not 'resnet18_cifar' \(--model\)"):
        _resume(kind, run, model="resnet18_cifar")
    assert main([kind, "--resume", str(run), "--model", "torchvision:resnet18"]) == 1
    assert not (pkg / "__init__.py.imported").exists() and "statepkg" not in sys.modules


def test_resume_takes_the_runs_own_model_named_again_and_refuses_an_output(runs, tmp_path, capsys):
    run = _copy(runs, tmp_path, "train")
    assert main(["train", "--resume", str(run), "-o", str(tmp_path / "other")]) == 2
    assert "drop -o" in capsys.readouterr().err and not (tmp_path / "other").exists()
    assert main(["train", "--resume", str(run), "--model", "resnet18_cifar", "--quiet", "--device", "cpu"]) == 0
    assert (run / "ckpt.pt").is_file()


@pytest.mark.parametrize("kind, name, content", [
    ("train", "log.jsonl", b"\xff\xfe not text\n"), ("train", "log.jsonl", None),
    ("search", "alpha_beta.jsonl", b'{"round": 1}\n\x80\n'), ("search", "log.jsonl", None)])
def test_a_log_that_is_not_the_runs_text_is_refused_naming_it(runs, tmp_path, kind, name, content):
    run = _copy(runs, tmp_path, kind)
    (run / name).unlink()
    if content is None:
        (run / name).mkdir()
    else:
        (run / name).write_bytes(content)
    # a directory is refused as a run file of the wrong kind, bytes that are not text as not the run's log
    with pytest.raises(IrepError, match=r"^{}: .*(move it away to resume|a run writes only its own regular files)"
                       .format(re.escape(str(run / name)))):
        _resume(kind, run)
    assert (run / name).is_dir() if content is None else (run / name).read_bytes() == content


def test_an_overflowing_update_is_a_divergence_and_the_run_stays_resumable(tmp_path):
    pytest.importorskip("sklearn")
    config = dataclasses.replace(TRAIN, lr=1e300, batch_size=32, limit=64)
    with pytest.raises(TrainingDiverged, match=r"the weight update overflowed float32 at epoch 1 step 1; stopped, "
                                               r"the last good state \(after epoch 0\) is kept"):
        train(tmp_path / "run", config, progress=False, device="cpu")
    state, saved = read_run_state(tmp_path / "run", "train", TrainConfig)
    validate_train_state(state, saved, state_path(tmp_path / "run"))  # resumable: the state is whole
    assert state["epoch"] == 0 and saved == config


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_batch_of_one_is_a_usage_error(kind, tmp_path):
    with pytest.raises(UsageError, match="BatchNorm needs at least 2 examples per batch"):
        if kind == "train":
            train(tmp_path / "r", dataclasses.replace(TRAIN, batch_size=1), progress=False, device="cpu")
        else:
            make_config(backbone="resnet18_cifar", dataset="digits", batch_size=1)
    assert not (tmp_path / "r").exists()
