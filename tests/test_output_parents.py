"""Every command that writes a file creates the missing directories above it, the same way: files
through ``_io.atomic_write`` (``make_parents``), run directories through ``_io.run_directory``. A
failed write leaves none of the directories it created."""
from __future__ import annotations

import pytest
import torch

from irep_deploy import ArchCode, build_model, fuse_model, save_checkpoint
from irep_deploy._io import atomic_write
from irep_deploy.cli import build_parser, main, subcommand
from irep_deploy.errors import IrepError

# (command, flag) of every output a command writes; `demo` makes its run directory as train and search do
OUTPUT_FLAGS = {("train", "-o"), ("search", "-o"), ("demo", "-o"), ("fuse", "-o"), ("fuse", "--torchvision"),
                ("export", "-o"), ("quantize", "-o"), ("build-trt", "-o"), ("build-trt", "--calib-cache"),
                ("build-trt", "--timing-cache"), ("bench", "--json"), ("convert", "-o"), ("plot", "-o")}
OUTPUT_SPELLINGS = {"-o", "--json", "--torchvision", "--calib-cache", "--timing-cache"}


def test_the_table_names_every_output_flag_of_every_command():
    parser = build_parser()
    names = next(a for a in parser._actions if a.dest == "command").choices
    found = {(name, flag) for name in names for flag in subcommand(parser, name)._option_string_actions
             if flag in OUTPUT_SPELLINGS}
    assert found == OUTPUT_FLAGS


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    code = ArchCode.random("resnet18", ratio=2 / 3, seed=0)
    code.save(d / "arch.bin")
    multi = build_model("resnet18", arch=code, width=0.125, num_classes=10, in_channels=1, input_size=28)
    save_checkpoint(d / "multi.pt", multi)
    save_checkpoint(d / "deploy.pt", fuse_model(multi.eval()))
    assert main(["export", str(d / "deploy.pt"), "-o", str(d / "model.onnx")]) == 0
    from irep_deploy.tensorfile import load_tree
    torch.save(load_tree(d / "deploy.pt", "checkpoint").tree, str(d / "old.pt"))  # an earlier version's file
    return d


# command line (output last), the file or directory it must create
RUNS = {
    "fuse -o": (["fuse", "{multi}", "{arch}", "-o"], "x.pt"),
    "fuse --torchvision": (["fuse", "{multi}", "{arch}", "-o", "{tmp}/f.pt", "--torchvision"], "tv.pt"),
    "export -o": (["export", "{deploy}", "-o"], "x.onnx"),
    "quantize -o": (["quantize", "{onnx}", "--calib", "fashion-mnist", "--calib-size", "32", "-o"], "x.onnx"),
    "bench --json": (["bench", "{deploy}", "--duration", "0.02", "--rounds", "1", "--warmup", "1", "--json"],
                     "b.json"),
    "convert -o": (["convert", "{old}", "--trust-pickle", "-o"], "new.pt"),
    "plot -o": (["plot", "{arch}", "-o"], "figures"),
    "train -o": (["train", "--model", "resnet18_cifar", "--dataset", "fashion-mnist", "--width", "0.125", "--epochs",
                  "1", "--limit", "64", "--batch-size", "32", "--quiet", "-o"], "run"),
    "search -o": (["search", "--preset", "cpu", "--dataset", "fashion-mnist", "--limit", "64", "--population", "2",
                   "--rounds", "1", "--subnets", "1", "--batch-size", "32", "--eval-batch-size", "64", "--quiet",
                   "-o"], "run"),
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_command_creates_the_directories_above_its_output(name, files, tmp_path, capsys):
    if name == "plot -o":
        pytest.importorskip("matplotlib")  # the [viz] extra, not on the deploy floor (.venv38)
    argv, leaf = RUNS[name]
    names = dict(multi=files / "multi.pt", arch=files / "arch.bin", deploy=files / "deploy.pt",
                 onnx=files / "model.onnx", old=files / "old.pt", tmp=tmp_path)
    target = tmp_path / "new" / "dirs" / leaf
    rc = main([a.format(**{k: str(v) for k, v in names.items()}) for a in argv] + [str(target)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert target.exists()


@pytest.mark.parametrize("flag", ["-o", "--calib-cache", "--timing-cache"])
def test_build_trt_that_cannot_run_here_leaves_no_directory(flag, files, tmp_path, capsys):
    argv = ["build-trt", str(files / "model.onnx"), flag, str(tmp_path / "new" / "dirs" / "f")]
    if flag == "--calib-cache":
        argv += ["--int8", "--calib", "fashion-mnist"]
    rc = main(argv)
    assert rc != 0 and "TensorRT" in capsys.readouterr().err  # refused for TensorRT, not for the directory
    assert not (tmp_path / "new").exists()


def test_a_failed_write_removes_the_directories_it_created(tmp_path):
    with pytest.raises(IrepError, match="boom"):
        with atomic_write(tmp_path / "a" / "b" / "f.txt", "w") as handle:
            handle.write("half")
            raise IrepError("boom")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "keep").write_text("")
    with pytest.raises(IrepError):
        with atomic_write(tmp_path / "a" / "b" / "f.txt", "w"):
            raise IrepError("boom")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["keep"]


def test_a_file_in_the_way_is_one_line_naming_it(tmp_path, files, capsys):
    (tmp_path / "afile").write_text("")
    assert main(["export", str(files / "deploy.pt"), "-o", str(tmp_path / "afile" / "sub" / "x.onnx")]) == 1
    assert "afile is a regular file, not a directory" in capsys.readouterr().err
    with pytest.raises(IrepError, match="afile"):
        ArchCode.random("resnet18", seed=0).save(tmp_path / "afile" / "sub" / "arch.bin")
