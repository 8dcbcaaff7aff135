"""The CLI's flags are derived from the library: one per settings field, defaults and choices the
library's, one naming scheme with the older spellings still parsing to the same values."""
import argparse
import dataclasses
import inspect

import pytest

from irep_deploy import cli, options
from irep_deploy.search.answer import show
from irep_deploy.bench.devices import PROFILES
from irep_deploy.baseline import train_with_baseline
from irep_deploy.bench.latency import bench
from irep_deploy.data import DATASETS, SPLITS
from irep_deploy.devicedata import MODES as DEVICE_DATA_MODES
from irep_deploy.demo import run_demo
from irep_deploy.engines.onnx import SIMPLIFIERS, export
from irep_deploy.engines.onnx_eval import evaluate_onnx
from irep_deploy.engines.quantize import METHODS, quantize
from irep_deploy.engines.tensorrt import build_engine
from irep_deploy.ops import REGISTRY
from irep_deploy.convert import convert
from irep_deploy.pipeline import fuse
from irep_deploy.search.des import PRESETS, SearchConfig, make_config, search
from irep_deploy.search.population import SAMPLERS, STRATEGIES
from irep_deploy.train import AMP_MODES, TrainConfig, evaluate, train
from irep_deploy.viz import plot

PARSER = cli.build_parser()
CONFIGS = {"train": TrainConfig, "search": SearchConfig}
# the library functions each command calls: every flag feeds one of their parameters or a settings field
LIBRARY = {"fuse": [fuse], "export": [export], "quantize": [quantize], "build-trt": [build_engine],
           "bench": [bench], "eval": [evaluate, evaluate_onnx], "train": [train, train_with_baseline], "search": [search],
           "demo": [run_demo], "plot": [plot], "show": [show], "convert": [convert]}
# flags the command reads itself (--resume RUN_DIR becomes run_dir and resume=True; --baseline picks
# train_with_baseline)
COMMAND_ONLY = {"resume", "preset", "quick", "baseline"}
# a library constant for every flag with choices
CHOICES = {("search", "preset"): tuple(PRESETS), ("search", "amp"): AMP_MODES, ("train", "amp"): AMP_MODES,
           ("search", "dataset"): DATASETS, ("train", "dataset"): DATASETS, ("eval", "dataset"): DATASETS,
           ("search", "ops"): tuple(REGISTRY), ("bench", "device"): PROFILES, ("eval", "split"): SPLITS,
           ("quantize", "method"): METHODS, ("export", "simplify"): SIMPLIFIERS, ("quantize", "calib"): DATASETS,
           ("build-trt", "calib"): DATASETS, ("bench", "calib"): DATASETS, ("search", "sampler"): SAMPLERS,
           ("search", "strategy"): STRATEGIES, ("search", "device_data"): DEVICE_DATA_MODES,
           ("train", "device_data"): DEVICE_DATA_MODES}


def actions(command):
    return [a for a in cli.subcommand(PARSER, command)._actions if a.dest != "help"]


def test_every_command_is_covered():
    assert set(LIBRARY) == {name for name, *_ in cli.COMMANDS}


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_every_setting_has_a_flag_with_the_library_default(command):
    config = CONFIGS[command]
    by_dest = {}
    for action in actions(command):
        by_dest.setdefault(action.dest, []).append(action)
    for field in dataclasses.fields(config):
        assert field.name in by_dest, "{}.{} has no flag".format(config.__name__, field.name)
        for action in by_dest[field.name]:
            assert action.default is None  # unset: the library's (or the preset's, or the saved run's) value
            assert tuple(action.option_strings) == (options.flag_names(field)[0],) or action.help.startswith("the same")
            assert (tuple(action.choices) if action.choices else None) == field.metadata["choices"]
        shown = field.default
        if shown is not None and not isinstance(shown, bool):
            assert "(default {})".format(options.format_default(shown)) in by_dest[field.name][0].help


@pytest.mark.parametrize("command", sorted(LIBRARY))
def test_flags_feed_library_parameters_with_their_defaults(command):
    params = {}
    for func in LIBRARY[command]:
        for name, param in inspect.signature(func).parameters.items():
            params.setdefault(name, param.default)
    fields = {f.name for f in dataclasses.fields(CONFIGS[command])} if command in CONFIGS else set()
    for action in actions(command):
        if action.dest in fields or action.dest in COMMAND_ONLY:
            continue
        assert action.dest in params, "{} {}: feeds no parameter of {}".format(
            command, action.option_strings, [f.__name__ for f in LIBRARY[command]])
        library = params[action.dest]
        if action.default is argparse.SUPPRESS or library is inspect.Parameter.empty:
            continue  # an alias, or a value the command chooses (a run directory, a report directory)
        if isinstance(action, argparse._AppendAction) or (action.dest == "progress" and action.default is True):
            continue  # unset: the library's; --quiet sets progress=False
        assert action.default == library, "{} {}: default {!r}, library {!r}".format(
            command, action.option_strings, action.default, library)
        if library not in (None, ()) and not isinstance(library, bool):
            assert "(default" in action.help, (command, action.option_strings)


@pytest.mark.parametrize("command,dest", sorted(CHOICES))
def test_choices_are_the_library_constants(command, dest):
    found = [a for a in actions(command) if a.dest == dest and a.choices is not None]
    assert found and tuple(found[0].choices) == tuple(CHOICES[command, dest])


@pytest.mark.parametrize("new,old", [
    (["search", "-o", "R", "--quiet"], ["search", "--run-dir", "R", "--no-progress"]),
    (["search", "--output", "R"], ["search", "--run-dir", "R"]),
    (["train", "-o", "R", "--quiet"], ["train", "-o", "R", "--no-progress"]),
    (["train", "-o", "R", "--model", "resnet18_cifar"], ["train", "-o", "R", "--backbone", "resnet18_cifar"]),
    (["demo", "-o", "D", "--quiet"], ["demo", "--out", "D", "--quiet"]),
])
def test_older_spellings_parse_to_the_same_values(new, old):
    assert vars(PARSER.parse_args(new)) == vars(PARSER.parse_args(old))
    assert vars(PARSER.parse_args(new)) != vars(PARSER.parse_args(new[:1]))  # the flags did something


def test_older_spellings_are_hidden_from_help():
    for command, hidden in (("search", "--run-dir"), ("train", "--no-progress"), ("demo", "--out ")):
        text = cli.subcommand(PARSER, command).format_help()
        assert hidden not in text and "-o" in text and "--quiet" in text


def test_every_search_setting_reaches_the_config():
    argv = ["search", "--preset", "cpu", "--ops", "conv1x3", "conv3x1", "conv1x1", "--momentum", "0.8",
            "--weight-decay", "1e-4", "--arch-lr", "3e-4", "--arch-betas", "0.6,0.99", "--p-cross", "0.3",
            "--p-mut", "0.7", "--keep", "0.5", "--sampled", "0.125", "--val-fraction", "0.2", "--split-seed", "4",
            "--eval-batch-size", "64", "--channels-last", "--device-data", "off"]
    args = PARSER.parse_args(argv)
    config = make_config(args.preset, **cli._given(args, SearchConfig))
    assert (config.ops, config.momentum, config.weight_decay, config.arch_lr, config.arch_betas) == (
        ["conv1x3", "conv3x1", "conv1x1"], 0.8, 1e-4, 3e-4, (0.6, 0.99))
    assert (config.p_cross, config.p_mut, config.keep, config.sampled, config.val_fraction, config.split_seed,
            config.eval_batch_size, config.channels_last, config.device_data) == (0.3, 0.7, 0.5, 0.125, 0.2, 4, 64, True,
                                                                          "off")
    assert config.population == PRESETS["cpu"]["population"]  # the preset still fills what was not given


@pytest.mark.parametrize("argv,flag", [
    (["search", "--resume", "RUN", "--rounds", "3"], "--rounds"),
    (["search", "--resume", "RUN", "--preset", "cpu"], "--preset"),
    (["train", "--resume", "RUN", "--epochs", "3"], "--epochs"),
])
def test_resume_refuses_settings(argv, flag, tmp_path, capsys):
    argv = [str(tmp_path / "run") if a == "RUN" else a for a in argv]
    assert cli.main(argv) == 2  # usage: a setting given with --resume
    assert "drop {}".format(flag) in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv", [["search", "--arch-betas", "0.5"], ["search", "--ops", "conv9x9"],
                                  ["search", "--p-mut", "1.5"], ["search", "--eval-batch-size", "0"],
                                  ["search", "--sampler", "eq8"], ["search", "--strategy", "grid"]])
def test_bad_setting_values_are_usage_errors(argv, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and argv[1] in err
