"""Files never cause imports, and a spec is checked before it is called (issue 21, item 2).

A user package on a temporary sys.path writes a marker line when imported and another when one of its
callables is called: every refusal below is checked against those markers, so a test fails when the
rule is broken, not only when the message changes.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from irep_deploy import ArchCode, build_model
from irep_deploy.errors import ArchMismatchError, CheckpointError, UsageError
from irep_deploy.models.external import factory_problem, named_spec, resolve_factory
from irep_deploy.train import TrainConfig, arch_setting

_MODULE = '''
import pathlib
import torch.nn as nn

MARK = pathlib.Path(__file__).with_suffix(".log")
with open(MARK, "a") as handle:
    handle.write("imported\\n")


def _called(name):
    with open(MARK, "a") as handle:
        handle.write("called " + name + "\\n")


def make(num_classes=10) -> nn.Module:
    _called("make")
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))


def unannotated(**kwargs):
    _called("unannotated")
    return make()


def wrong_annotation(**kwargs) -> int:
    _called("wrong_annotation")
    return 1


def _private(**kwargs) -> nn.Module:
    _called("_private")
    return make()


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        _called("Net")
        self.body = make(num_classes)

    def forward(self, x):
        return self.body(x)


class NoForward(nn.Module):
    pass


class NotAModule:
    def __init__(self, **kwargs):
        _called("NotAModule")


instance = Net.__new__(Net)
'''


@pytest.fixture
def userpkg(tmp_path, monkeypatch):
    """``specpkg.nets``, importable from tmp_path; returns its log (imports and calls, one per line)."""
    (tmp_path / "specpkg").mkdir()
    (tmp_path / "specpkg" / "__init__.py").write_text("")
    (tmp_path / "specpkg" / "nets.py").write_text(_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path / "specpkg" / "nets.log"
    for name in [n for n in sys.modules if n.split(".")[0] == "specpkg"]:
        del sys.modules[name]


def _log(path: Path) -> list:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("target, problem", [
    ("unannotated", "a function without a return annotation naming an nn.Module"),
    ("wrong_annotation", "annotated to return 'int', not an nn.Module"),
    ("NoForward", "an nn.Module without a forward"),
    ("NotAModule", "a class that is not an nn.Module"),
    ("instance", "is a Net, not a Python function or class"),
])
def test_what_a_spec_names_is_checked_before_any_call(userpkg, target, problem):
    with pytest.raises(UsageError, match=problem):
        build_model("specpkg.nets:" + target, num_classes=3)
    assert _log(userpkg) == ["imported"]  # the user named the module: imported, but nothing called


def test_a_private_path_is_refused_before_the_import(userpkg):
    for target in ("_private", "make.__globals__", "Net.__init__"):
        with pytest.raises(UsageError, match="not a public name"):
            resolve_factory("specpkg.nets:" + target)
    assert _log(userpkg) == []


def test_a_function_annotated_to_return_a_module_and_a_module_class_are_factories(userpkg):
    assert build_model("specpkg.nets:make", num_classes=3).irep_config["num_classes"] == 3
    assert build_model("specpkg.nets:Net", num_classes=3).irep_config["backbone"] == "specpkg.nets:Net"
    assert _log(userpkg) == ["imported", "called make", "called Net", "called make"]


@pytest.mark.parametrize("spec", ["os:system", "builtins:eval", "os:popen", "shutil:rmtree", "subprocess:run",
                                  "torch.nn:Module", "json:JSONDecoder", "torch.nn:functional"])
def test_the_standard_librarys_callables_are_no_factories(spec, tmp_path):
    with pytest.raises(UsageError, match="a spec names an nn.Module subclass or a function annotated"):
        build_model(spec, model_kwargs={"command": "touch {}".format(tmp_path / "ran")})
    assert not (tmp_path / "ran").exists()


def test_factory_problem_accepts_torchvisions_own_builders():
    import torchvision

    assert factory_problem(torchvision.models.resnet18) == "" and factory_problem(torchvision.models.ResNet) == ""
    assert "builtin" in factory_problem(len)


def test_named_spec_is_the_one_rule_for_files():
    assert named_spec("resnet18_cifar", None, "f") == "resnet18_cifar"  # built-in: nothing is imported
    assert named_spec("pkg.mod:f", "pkg.mod:f", "f") == "pkg.mod:f"
    with pytest.raises(CheckpointError, match=r"^f: names the network 'pkg.mod:f'; name it with --model pkg.mod:f"):
        named_spec("pkg.mod:f", None, "f", CheckpointError)
    with pytest.raises(CheckpointError, match=r"names the network 'torchvision:resnet18'; name it"):
        named_spec("torchvision:resnet18", None, "f", CheckpointError)  # torchvision's too: one rule for all
    with pytest.raises(CheckpointError, match=r"names the network 'resnet18_cifar', not 'vgg16_cifar' \(--model\)"):
        named_spec("resnet18_cifar", "vgg16_cifar", "f", CheckpointError)
    with pytest.raises(CheckpointError, match=r"name it with --model 'a\\nb:c'"):
        named_spec("a\nb:c", None, "f", CheckpointError)  # quoted: one line


def test_a_code_naming_a_module_needs_the_user_to_name_it(userpkg, tmp_path):
    net = build_model("specpkg.nets:make", num_classes=3)
    code_path = tmp_path / "arch.bin"
    ArchCode.full("specpkg.nets:make").save(code_path)
    for name in [n for n in sys.modules if n.startswith("specpkg")]:
        del sys.modules[name]
    evil = tmp_path / "evil.bin"
    evil.write_text(code_path.read_text().replace("backbone: specpkg.nets:make", "backbone: specpkg.nets:Net"))
    before = _log(userpkg)
    with pytest.raises(ArchMismatchError, match=r"evil\.bin: names the network 'specpkg.nets:Net'; name it with "
                                                r"--model specpkg.nets:Net to use it: a file never imports code"):
        arch_setting(evil)
    with pytest.raises(ArchMismatchError, match=r"names the network 'specpkg.nets:Net', not 'specpkg.nets:make'"):
        arch_setting(evil, "specpkg.nets:make")
    with pytest.raises(ArchMismatchError, match="name it with --model"):  # a Python caller's settings alike
        TrainConfig(arch=evil.read_text(), dataset="digits").check()
    assert _log(userpkg) == before and "specpkg.nets" not in sys.modules
    text, backbone = arch_setting(code_path, "specpkg.nets:make")  # named: used
    assert backbone == "specpkg.nets:make" and ArchCode.loads(text).geometry == ArchCode.load(code_path).geometry
    assert net is not None
