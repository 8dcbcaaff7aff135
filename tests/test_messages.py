"""One vocabulary for flags (issue 25, item 7): every ``--flag`` the package's messages, help and
docstrings name, and every one README.md and docs/ name, is a flag the CLI has today under its current
spelling; the older spellings (``--out``, ``--run-dir``, ``--no-progress``, ``--backbone``) still parse
but appear only where they are documented as old. Flags of other tools are listed in THIRD_PARTY.
"""
from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest
import torch

from irep_deploy.cli import COMMANDS, build_parser, main, subcommand

from conftest import ROOT

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")
# Flags of other programs that the package or the docs name, with whose they are.
THIRD_PARTY = {
    "--query-gpu": "nvidia-smi (bench's environment record)",
    "--format": "nvidia-smi",
    "--field-name": "not a flag: how options.setting's docstring writes a settings field's derived flag",
    "--nproc_per_node": "torchrun", "--standalone": "torchrun",
    "--rm": "docker run", "--runtime": "docker run", "--build-arg": "docker build",
    "--durations": "pytest", "--dist": "pytest-xdist",
    "--no-deps": "pip install", "--index-url": "pip install", "--extra-index-url": "pip install",
    "--no-index": "pip install", "--no-build-isolation": "pip install",
}
# A line of the docs may name an old spelling when it says that it is one.
OLD_SPELLING_LINE = re.compile(r"still work|instead of|the same as|older spelling")


def _flags() -> Tuple[Dict[str, Set[str]], Set[str]]:
    """(flags of each command, the old spellings: hidden aliases and "the same as --x" second names)."""
    parser = build_parser()
    per: Dict[str, Set[str]] = {}
    old: Set[str] = set()
    for name, *_ in COMMANDS:
        actions = subcommand(parser, name)._actions
        per[name] = {o for a in actions for o in a.option_strings} | {"--debug"}
        old |= {o for a in actions if a.help == argparse.SUPPRESS or (a.help or "").startswith("the same as")
                for o in a.option_strings}
    return per, old


PER_COMMAND, OLD = _flags()
CURRENT = set().union(*PER_COMMAND.values()) - OLD | {"--version"}


def _package_strings() -> List[Tuple[str, int, str]]:
    """Every string constant of irep_deploy (messages, help, docstrings) that is not itself just a flag
    (the add_argument names), but the CLI module's docstring, which documents the old spellings."""
    out = []
    for path in sorted((ROOT / "irep_deploy").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = ast.get_docstring(tree, clean=False) if path.name == "cli.py" else None
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value != skip \
                    and not FLAG.fullmatch(node.value):
                out.append((str(path.relative_to(ROOT)), node.lineno, node.value))
    return out


def test_the_old_spellings_are_known():
    """What the rest of this module refuses in messages: if one of these stops being an alias, the list moves."""
    assert {"--out", "--run-dir", "--no-progress", "--backbone"} <= OLD
    assert {"--output", "--quiet", "--model"} <= CURRENT


def test_package_messages_name_only_current_flags():
    wrong = ["{}:{}: {}".format(path, line, flag) for path, line, text in _package_strings()
             for flag in FLAG.findall(text) if flag not in CURRENT and flag not in THIRD_PARTY]
    assert wrong == []


def _doc_lines() -> List[Tuple[str, int, str, bool]]:
    """(file, line number, text, inside a code block) of README.md and docs/*.md; a shell line continued
    with a backslash is joined with the next."""
    out = []
    for path in [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md")):
        fence, held, start = False, "", 0
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.startswith("```"):
                fence = not fence
                continue
            if fence and line.rstrip().endswith("\\"):
                held, start = held + line.rstrip()[:-1] + " ", start or number
                continue
            out.append((str(path.relative_to(ROOT)), start or number, held + line, fence))
            held, start = "", 0
    return out


COMMAND = re.compile(r"(?:irep-deploy|-m irep_deploy)\s+(" + "|".join(map(re.escape, PER_COMMAND)) + r")\b"
                     r"([^|;&#`]*)")
SPAN_COMMAND = re.compile(r"^(" + "|".join(map(re.escape, PER_COMMAND)) + r")\s+([^`]*--[^`]*)$")


def _command_uses(text: str, fence: bool) -> List[Tuple[str, str]]:
    """(command, its flags' text) of every irep-deploy command line in ``text``: ``irep-deploy CMD ...``
    anywhere, and in inline code also ``CMD --flag ...`` (the README's `bench --compare`)."""
    uses = [(m.group(1), m.group(2)) for m in COMMAND.finditer(text)]
    if not fence:
        uses += [(m.group(1), m.group(2)) for span in re.findall(r"`([^`]+)`", text)
                 for m in [SPAN_COMMAND.match(span.strip())] if m]
    return uses


def test_docs_give_each_command_only_its_own_flags():
    wrong = ["{}:{}: {} {}".format(path, number, cmd, flag) for path, number, text, fence in _doc_lines()
             for cmd, rest in _command_uses(text, fence) for flag in FLAG.findall(rest)
             if flag not in PER_COMMAND[cmd]]
    assert wrong == []


def _benchmark_flags() -> Set[str]:
    """The flags of the scripts under benchmarks/ and tools/, which the docs also name."""
    flags: Set[str] = set()
    for path in [*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "tools").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
    return flags


def test_docs_name_only_real_flags_and_old_spellings_only_as_old():
    known = CURRENT | _benchmark_flags() | set(THIRD_PARTY)
    unknown, old = [], []
    for path, number, text, _ in _doc_lines():
        for flag in FLAG.findall(text):
            if flag not in known and flag not in OLD:
                unknown.append("{}:{}: {}".format(path, number, flag))
            commands = [cmd for cmd, rest in _command_uses(text, True) if flag in FLAG.findall(rest)]
            if flag in OLD and commands and not OLD_SPELLING_LINE.search(text):
                old.append("{}:{}: {} {}".format(path, number, commands[0], flag))
    assert unknown == [] and old == []


# -- the messages the issue quoted, as the CLI prints them now --------------------------------------
def test_train_without_code_or_network_names_model_and_is_usage(tmp_path, capsys):
    assert main(["train", "-o", str(tmp_path / "run"), "--dataset", "fashion-mnist"]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "--backbone" not in err, err


@pytest.mark.skipif(not (Path("/usr/share/datasets/fashion-mnist") / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed (make data)")
def test_a_plain_network_is_not_called_multi_branch_and_quantize_names_its_limit(tmp_path, capsys):
    torch.set_num_threads(1)
    assert main(["train", "-o", str(tmp_path / "run"), "--model", "resnet18_cifar", "--width", "0.125",
                 "--dataset", "fashion-mnist", "--limit", "64", "--epochs", "1", "--batch-size", "32",
                 "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "multi-branch" not in out and "(as trained); BN folded" in out, out
    assert main(["export", str(tmp_path / "run" / "ckpt.pt"), "-o", str(tmp_path / "m.onnx"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["quantize", str(tmp_path / "m.onnx"), "--calib", "fashion-mnist", "--calib-size", "32",
                 "--min-cosine", "-1", "--quiet"]) == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("INT8 vs FP32")]
    assert len(line) == 1 and "cosine" in line[0] and "(--min-cosine -1.0)" in line[0], line
