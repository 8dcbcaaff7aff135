"""Presets named after the paper follow the paper, and the docs' preset tables are the code's:
``search --preset`` (docs/search.md) and ``train --preset`` (docs/training.md) resolve to the
documented values, and flags given explicitly override them."""
from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import pytest

from irep_deploy import cli
from irep_deploy.errors import UsageError
from irep_deploy.ops import SPACES
from irep_deploy.search.des import PRESETS, SearchConfig, make_config
from irep_deploy.train import TRAIN_PRESETS, TrainConfig, make_train_config

DOCS = Path(__file__).resolve().parents[1] / "docs"
PARSER = cli.build_parser()


def table(path, heading):
    """The first markdown table after ``heading``: {first cell without backticks: {column: cell}}."""
    text = path.read_text(encoding="utf-8")
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    head, body = rows[0], rows[2:]
    return {row[0].strip("`"): dict(zip(head, row)) for row in body}


def section(path, heading):
    text = path.read_text(encoding="utf-8")
    start = text.index(heading)
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


# -- search ---------------------------------------------------------------------------------------------
SEARCH = table(DOCS / "search.md", "## Presets")
# the table's columns and the settings they show (the rest of a preset goes in "other")
SEARCH_COLUMNS = {"backbone": "backbone", "data": "dataset", "op space": "ops", "population": "population",
                  "B": "subnets", "C": "budget", "E_warm": "warmup_epochs", "rounds x E_p": "rounds",
                  "batch": "batch_size"}


def test_the_search_preset_table_lists_every_preset():
    assert set(SEARCH) == set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_the_search_preset_table_is_the_code(name):
    row, config = SEARCH[name], make_config(name)
    assert (row["backbone"], row["data"]) == (config.backbone, config.dataset)
    if config.ops is None:
        assert row["op space"] == "the backbone's"
    else:
        assert tuple(config.ops) == SPACES[row["op space"]]
    assert (int(row["population"]), int(row["B"]), int(row["batch"])) == (
        config.population, config.subnets, config.batch_size)
    assert abs(float(Fraction(row["C"])) - config.budget) < 1e-12
    rounds, per_round = (int(n) for n in row["rounds x E_p"].split(" x "))
    assert (int(row["E_warm"]), rounds, per_round, int(row["epochs"])) == (
        config.warmup_epochs, config.rounds, config.round_epochs, config.total_epochs)
    for key, value in PRESETS[name].items():  # what no column shows is named in "other"
        if key not in SEARCH_COLUMNS.values() and key not in ("round_epochs",):
            assert str(value) in row["other"], (name, key)


def test_the_search_optimizers_paragraph_is_every_presets():
    text = " ".join(section(DOCS / "search.md", "## Presets").split())
    sgd = re.search(r"SGD \(lr ([\d.e-]+), momentum ([\d.]+), weight decay ([\d.e-]+),", text)
    adam = re.search(r"Adam \(lr ([\d.e-]+), betas \(([\d.]+), ([\d.]+)\)\)", text)
    split = re.search(r"validation split of ([\d.]+) of the training set", text)
    assert sgd and adam and split
    for name in PRESETS:
        config = make_config(name)
        assert (config.lr, config.momentum, config.weight_decay) == tuple(float(v) for v in sgd.groups())
        assert (config.arch_lr,) + tuple(config.arch_betas) == tuple(float(v) for v in adam.groups())
        assert config.val_fraction == float(split.group(1))


def test_the_paper_presets_carry_the_papers_stated_settings():
    cifar = make_config("paper-cifar")  # section 4.1
    assert (cifar.dataset, cifar.total_epochs, cifar.population, cifar.subnets) == ("cifar10", 500, 128, 5)
    assert abs(cifar.budget - 2 / 3) < 1e-12 and cifar.ops is None  # the backbone's space: the eight ops
    imagenet = make_config("paper-imagenet")  # section 4.2
    assert (imagenet.dataset, imagenet.total_epochs, imagenet.warmup_epochs, imagenet.subnets, imagenet.budget,
            imagenet.batch_size) == ("imagenet", 100, 5, 1, 0.5, 256)
    assert "dil2x2" not in imagenet.ops and set(imagenet.ops) < set(SPACES["resnet_cifar"])
    for config in (cifar, imagenet):
        assert (config.arch_lr, tuple(config.arch_betas)) == (1e-4, (0.5, 0.999))
    # without --preset: paper-cifar's settings on the --dataset default
    assert {k: v for k, v in vars(make_config()).items() if k != "dataset"} == \
        {k: v for k, v in vars(cifar).items() if k != "dataset"}


def test_search_flags_override_the_preset():
    args = PARSER.parse_args(["search", "--preset", "paper-imagenet", "--rounds", "3", "--budget", "0.25",
                              "--ops", "conv1x3", "conv1x1"])
    config = make_config(args.preset, **cli._given(args, SearchConfig))
    assert (config.rounds, config.budget, config.ops) == (3, 0.25, ["conv1x3", "conv1x1"])
    assert (config.warmup_epochs, config.round_epochs, config.batch_size) == (5, 5, 256)  # the rest: the preset's


# -- train ----------------------------------------------------------------------------------------------
TRAIN = table(DOCS / "training.md", "## Presets")
TRAIN_COLUMNS = {"dataset": "dataset", "epochs": "epochs", "batch": "batch_size", "lr": "lr", "momentum": "momentum",
                 "weight decay": "weight_decay", "drop-path": "drop_path", "cutout": "cutout",
                 "grad clip": "grad_clip"}


def test_the_train_preset_table_is_the_code():
    assert set(TRAIN) == set(TRAIN_PRESETS)
    for name, row in TRAIN.items():
        config = make_train_config(name)
        assert set(TRAIN_PRESETS[name]) <= set(TRAIN_COLUMNS.values())  # nothing a preset sets goes unshown
        for column, field in TRAIN_COLUMNS.items():
            value = getattr(config, field)
            assert (row[column] == value) if isinstance(value, str) else float(row[column]) == value, (name, column)
        # "Both: SGD without Nesterov momentum, ... without label smoothing, the whole training set"
        assert (config.nesterov, config.label_smoothing, config.val_fraction) == (False, 0.0, 0.0)


def test_the_train_presets_are_the_papers_recipes():
    cifar = make_train_config("paper-cifar")  # DARTS's recipe with the paper's lr and drop-path (section 4.1)
    assert (cifar.lr, cifar.drop_path, cifar.cutout, cifar.epochs, cifar.batch_size) == (0.05, 0.08, 16, 600, 96)
    assert (cifar.momentum, cifar.weight_decay, cifar.grad_clip) == (0.9, 3e-4, 5.0)
    imagenet = make_train_config("paper-imagenet")  # section 4.2
    assert (imagenet.epochs, imagenet.dataset) == (120, "imagenet")
    assert make_train_config() == TrainConfig()


def test_train_flags_override_the_preset_and_resume_refuses_it(tmp_path, capsys):
    args = PARSER.parse_args(["train", "-o", "R", "--preset", "paper-cifar", "--lr", "0.01", "--cutout", "0",
                              "--drop-path", "0.2"])
    config = make_train_config(args.preset, **cli._given(args, TrainConfig))
    assert (config.lr, config.cutout, config.drop_path) == (0.01, 0, 0.2)  # 0 is a value, not "unset"
    assert (config.epochs, config.batch_size, config.weight_decay) == (600, 96, 3e-4)
    assert cli.main(["train", "--resume", str(tmp_path / "run"), "--preset", "paper-cifar"]) == 2
    assert "drop --preset" in capsys.readouterr().err
    with pytest.raises(UsageError):
        make_train_config("paper-cifar10")
