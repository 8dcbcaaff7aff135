"""One run-state reader for train and search: the same version rule, the same refusal of unknown
settings and of changed settings on resume, one line naming the file. Each case runs through the
public entry points (``train``, ``search``, the CLI) on a state written by the shared writer and
then edited the way a newer release or another kind of run would have left it."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from irep_deploy.cli import main
from irep_deploy.errors import CheckpointError, IrepError
from irep_deploy.runs import read_run_state, state_path, write_run_state
from irep_deploy.tensorfile import load_tree, save_tree, torch_reads_pickle_safely

SAFE_TORCH = torch_reads_pickle_safely()
from irep_deploy.search.des import SearchConfig, make_config, search
from irep_deploy.steps import EpochTotals
from irep_deploy.train import TrainConfig, train

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
