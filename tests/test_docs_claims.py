"""Claims of docs/own-network.md and README.md that a user reads, held to the code.

Which commands take which model flags (each command's real --help), the label ArchCode.random needs
and its one-line refusal, the exact parameter count of a fused network (densenet121: bias-free 3x3
convs without BN gain a bias), and the start of an irepified network (0.0 difference, rounding where a
conv bias moved into a BN).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision

from irep_deploy import ArchCode, fuse_model, irepify
from irep_deploy.cli import build_parser, subcommand
from irep_deploy.compare import compare
from irep_deploy.errors import ArchMismatchError

from conftest import randomize_bn

DOC = Path(__file__).resolve().parents[1] / "docs" / "own-network.md"
MODEL_FLAGS = ("--model", "--weights", "--model-kwargs", "--include", "--exclude")
# what docs/own-network.md says, command by command ("`search` and `train` do the same with ...";
# "`fuse`, `export`, `bench` and `eval` take `--model SPEC` only")
DOCUMENTED = {"search": MODEL_FLAGS, "train": MODEL_FLAGS, "fuse": ("--model",), "export": ("--model",),
              "bench": ("--model",), "eval": ("--model",)}


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_doc_says_which_commands_take_which_model_flags():
    text = " ".join(DOC.read_text().split())
    assert ("`search` and `train` do the same with `--model SPEC`, `--weights NAME_OR_FILE`, `--model-kwargs "
            "JSON` and `--include`/`--exclude PATTERN` (repeatable). `fuse`, `export`, `bench` and `eval` take "
            "`--model SPEC` only") in text


@pytest.mark.parametrize("command", sorted(DOCUMENTED))
def test_each_command_takes_exactly_the_model_flags_the_doc_gives_it(command):
    shown = subcommand(build_parser(), command).format_help()  # what `irep-deploy COMMAND --help` prints
    assert {f for f in MODEL_FLAGS if re.search(r"(?<![\w-]){}(?![\w-])".format(f), shown)} == set(DOCUMENTED[command])


def test_a_code_of_a_model_not_yet_built_is_refused_in_one_line_with_the_way_out():
    with pytest.raises(ArchMismatchError) as info:
        ArchCode.random("torchvision:squeezenet1_1", seed=0)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("unknown backbone 'torchvision:squeezenet1_1' (known: ")
    assert message.endswith("build or irepify the model first; its label is model.irep_config['backbone']")
    net = irepify(torchvision.models.squeezenet1_1(weights=None), name="torchvision:squeezenet1_1")
    assert ArchCode.random(net.irep_config["backbone"], seed=0).backbone == "torchvision:squeezenet1_1"


def test_fused_parameters_follow_the_documented_rule_on_densenet121():
    """fused = original - 2C per folded BN + C per bias-free conv that is rewritten or gets a BN folded in.

    In torchvision's DenseNet the BNs right after a conv are norm0 (after the 7x7 stem) and each dense
    layer's norm2 (after its 1x1 conv), both convs bias-free: -C each. Each dense layer's 3x3 conv2
    (32 channels, bias-free) feeds a concatenation, no BN: it is rewritten and gains a bias, +32."""
    original = torchvision.models.densenet121(weights=None).eval()
    folded = sum(m.num_features for name, m in original.named_modules() if name.rsplit(".", 1)[-1] in ("norm0", "norm2"))
    no_bn_3x3 = [m for name, m in original.named_modules() if name.endswith("conv2")]
    assert len(no_bn_3x3) == 58 and all(m.bias is None and m.kernel_size == (3, 3) for m in no_bn_3x3)
    net = irepify(original, name="torchvision:densenet121")
    assert len(net.irep_report.rewritten) == 58
    fused = fuse_model(net.eval())
    gained = sum(m.out_channels for m in no_bn_3x3)
    assert gained == 1856
    assert params(fused) == params(original) - folded + gained


def test_the_start_is_exact_without_a_moved_conv_bias_and_rounding_with_one():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    resnet = randomize_bn(torchvision.models.resnet18(weights=None)).eval()
    with torch.no_grad():
        assert torch.equal(resnet(x), irepify(resnet, name="r18").eval()(x))
    biased = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                           nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.AdaptiveAvgPool2d(1),
                           nn.Flatten(), nn.Linear(16, 10))
    for conv in (biased[0], biased[3]):
        nn.init.uniform_(conv.bias, -1, 1)
    biased = randomize_bn(biased).eval()
    with torch.no_grad():
        check = compare(biased(x), irepify(biased, name="biased").eval()(x), 1e-6)
    assert check.passed, check.summary
