"""Bad-input table: every subcommand fed deliberately bad files and flags, in-process.

Each case must end with the promised outcome: the documented exit code, one line on stderr naming
the file or flag, no traceback, every input byte-for-byte unchanged (sha256) and no new file in the
work directory. Writes ``results/bad_input.md`` with the outcome counts per category.

    python benchmarks/bad_input.py                       # the recorded run
    PYTHONPATH=/path/to/old/checkout python benchmarks/bad_input.py --out /tmp/before.md

The same table drives tests/test_bad_input.py (one test per case).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
CASE_SECONDS = 60  # a case still running after this is a hang (old code: `bench --warmup inf`)
MAX_LINE = 400  # an error line longer than this quotes too much of the bad input
# (counted without the fixture directory's path: it is the test machine's, not quoted input, and
# pytest-xdist's worker directories lengthen it)


class _Hang(BaseException):
    pass


@dataclass(frozen=True)
class Case:
    category: str
    argv: Tuple[str, ...]  # "{name}" is replaced by the path of fixture ``name``
    code: int  # expected exit code (README "Exit codes")
    names: str  # text the error line must contain (a flag or a fixture, formatted like argv)

    @property
    def id(self) -> str:
        return " ".join(self.argv)[:90]


def C(category: str, argv: str, code: int, names: str) -> Case:
    return Case(category, tuple(argv.split()), code, names)


CASES: List[Case] = [
    # output path is an input: must be refused before any work (exit 2, usage)
    C("output is an input", "fuse {multi} {arch} -o {multi}", 2, "{multi}"),
    C("output is an input", "fuse {multi} {arch} -o {arch}", 2, "{arch}"),
    C("output is an input", "fuse {multi} {arch} --torchvision {multi}", 2, "{multi}"),
    C("output is an input", "fuse {multi} {arch} -o {out_pt} --torchvision {out_pt}", 2, "--torchvision"),
    C("output is an input", "fuse {multi} {arch} -o {multi_link}", 2, "{multi_link}"),
    C("output is an input", "fuse {multi} {arch} -o {multi_hard}", 2, "{multi_hard}"),
    C("output is an input", "fuse {multi} {arch} -o {multi_dotdot}", 2, "{multi_dotdot}"),
    C("output is an input", "export {deploy} -o {deploy}", 2, "{deploy}"),
    C("output is an input", "export {multi} --arch {arch} -o {arch}", 2, "{arch}"),
    C("output is an input", "bench {onnx} --json {onnx} --duration 0.01 --iterations 1", 2, "{onnx}"),
    C("output is an input", "bench {deploy} --json {deploy} --duration 0.01 --iterations 1", 2, "{deploy}"),
    C("output is an input", "build-trt {onnx} -o {onnx}", 2, "{onnx}"),
    C("output is an input", "plot {arch} -o {dir} --points {points_clash}", 2, "{points_clash}"),
    # unbounded / binary / huge readers
    C("unbounded reader", "show {zeros}", 1, "{zeros}"),
    C("unbounded reader", "show /dev/zero", 1, "/dev/zero"),
    C("unbounded reader", "show {longline}", 1, "{longline}"),
    C("unbounded reader", "show {binary}", 1, "{binary}"),
    C("unbounded reader", "show {dir}", 1, "{dir}"),
    C("unbounded reader", "show {missing}", 1, "{missing}"),
    C("unbounded reader", "fuse {multi} {zeros}", 1, "{zeros}"),
    C("unbounded reader", "plot --points {zeros} -o {newdir}", 1, "{zeros}"),
    C("unbounded reader", "plot --points {deepjson} -o {newdir}", 1, "{deepjson}"),
    C("unbounded reader", "plot --points {badpoints} -o {newdir}", 1, "{badpoints}"),
    # edited checkpoint headers
    C("checkpoint header", "fuse {h_width0} {arch} -o {out_pt}", 1, "{h_width0}"),
    C("checkpoint header", "fuse {h_widthabc} {arch} -o {out_pt}", 1, "{h_widthabc}"),
    C("checkpoint header", "fuse {h_size0} {arch} -o {out_pt}", 1, "{h_size0}"),
    C("checkpoint header", "fuse {h_sizebig} {arch} -o {out_pt}", 1, "{h_sizebig}"),
    C("checkpoint header", "fuse {h_classes} {arch} -o {out_pt}", 1, "{h_classes}"),
    C("checkpoint header", "fuse {h_inch} {arch} -o {out_pt}", 1, "{h_inch}"),
    C("checkpoint header", "fuse {h_backbone} {arch} -o {out_pt}", 1, "{h_backbone}"),
    C("checkpoint header", "fuse {h_ops} {arch} -o {out_pt}", 1, "{h_ops}"),
    C("checkpoint header", "export {h_dwidth0} -o {out_onnx}", 1, "{h_dwidth0}"),
    C("checkpoint header", "eval {h_dclasses} --dataset digits", 1, "{h_dclasses}"),
    C("checkpoint header", "bench {h_dsize} --duration 0.01 --iterations 1", 1, "{h_dsize}"),
    C("checkpoint header", "eval {h_dbool} --dataset digits", 1, "{h_dbool}"),
    # NaN / inf weights
    C("nan weights", "eval {nan_deploy} --dataset digits", 1, "{nan_deploy}"),
    C("nan weights", "fuse {nan_multi} {arch} -o {out_pt}", 1, "{nan_multi}"),
    C("nan weights", "export {nan_deploy} -o {out_onnx}", 1, "{nan_deploy}"),
    C("nan weights", "bench {nan_deploy} --duration 0.01 --iterations 1", 1, "{nan_deploy}"),
    C("nan weights", "bench {inf_deploy} --duration 0.01 --iterations 1", 1, "{inf_deploy}"),
    # numeric flags
    C("numeric flag", "fuse {multi} {arch} -o {out_pt} --batch 0", 2, "--batch"),
    C("numeric flag", "fuse {multi} {arch} -o {out_pt} --batch -1", 2, "--batch"),
    C("numeric flag", "fuse {multi} {arch} -o {out_pt} --batch 1000000000", 2, "--batch"),
    C("numeric flag", "fuse {multi} {arch} -o {out_pt} --input-size -5", 2, "--input-size"),
    C("numeric flag", "fuse {multi} {arch} -o {out_pt} --input-size 0", 2, "--input-size"),
    C("numeric flag", "fuse {multi} {arch} -o {out_pt} --input-size 10000000", 2, "--input-size"),
    C("numeric flag", "fuse {multi} {arch} -o {out_pt} --tolerance nan", 2, "--tolerance"),
    C("numeric flag", "fuse {multi} {arch} -o {out_pt} --tolerance inf", 2, "--tolerance"),
    C("numeric flag", "fuse {multi} {arch} -o {out_pt} --tolerance -1", 2, "--tolerance"),
    C("numeric flag", "fuse {multi} {arch} -o {out_pt} --seed -3", 2, "--seed"),
    C("numeric flag", "export {deploy} -o {out_onnx} --batch 0", 2, "--batch"),
    C("numeric flag", "export {deploy} -o {out_onnx} --input-size 0", 2, "--input-size"),
    C("numeric flag", "export {deploy} -o {out_onnx} --tolerance nan", 2, "--tolerance"),
    C("numeric flag", "export {deploy} -o {out_onnx} --verify-batch 1", 2, "--verify-batch"),
    C("numeric flag", "export {deploy} -o {out_onnx} --opset -1", 2, "--opset"),
    C("numeric flag", "export {deploy} -o {out_onnx} --input-name=", 2, "--input-name"),
    C("numeric flag", "export {deploy} -o {out_onnx} --output-name=", 2, "--output-name"),
    C("numeric flag", "eval {deploy} --dataset digits --batch-size 0", 2, "--batch-size"),
    C("numeric flag", "eval {deploy} --dataset digits --workers -1", 2, "--workers"),
    C("numeric flag", "eval {deploy} --dataset digits --val-fraction 1.5", 2, "--val-fraction"),
    C("numeric flag", "eval {deploy} --dataset digits --limit 0", 2, "--limit"),
    C("numeric flag", "bench {deploy} --threads -1", 2, "--threads"),
    C("numeric flag", "bench {deploy} --threads 0", 2, "--threads"),
    C("numeric flag", "bench {deploy} --input-size -4", 2, "--input-size"),
    C("numeric flag", "bench {deploy} --input-size 0", 2, "--input-size"),
    C("numeric flag", "bench {deploy} --batch 1000000000", 2, "--batch"),
    C("numeric flag", "bench {deploy} --batch 1,x", 2, "--batch"),
    C("numeric flag", "bench {onnx} --batch 0", 2, "--batch"),
    C("numeric flag", "bench {deploy} --duration nan", 2, "--duration"),
    C("numeric flag", "bench {deploy} --duration -1", 2, "--duration"),
    C("numeric flag", "bench {deploy} --warmup inf", 2, "--warmup"),
    C("numeric flag", "bench {deploy} --iterations 0", 2, "--iterations"),
    C("numeric flag", "bench {deploy} --rounds 0", 2, "--rounds"),
    C("numeric flag", "build-trt {onnx} -o {out_engine} --max-batch 0", 2, "--max-batch"),
    C("numeric flag", "build-trt {onnx} -o {out_engine} --workspace -1", 2, "--workspace"),
    C("numeric flag", "build-trt {onnx} -o {out_engine} --min-cosine nan", 2, "--min-cosine"),
    C("numeric flag", "train -o {newdir} --epochs 0 --dataset digits", 2, "--epochs"),
    C("numeric flag", "train -o {newdir} --lr nan --dataset digits", 2, "--lr"),
    C("numeric flag", "train -o {newdir} --width 0 --dataset digits", 2, "--width"),
    C("numeric flag", "train -o {newdir} --batch-size -8 --dataset digits", 2, "--batch-size"),
    C("numeric flag", "train -o {newdir} --momentum inf --dataset digits", 2, "--momentum"),
    C("numeric flag", "search --run-dir {newdir} --rounds 0", 2, "--rounds"),
    C("numeric flag", "search --run-dir {newdir} --budget 1.5", 2, "--budget"),
    C("numeric flag", "search --run-dir {newdir} --population -2", 2, "--population"),
    C("numeric flag", "search --run-dir {newdir} --width nan", 2, "--width"),
    # device strings
    C("device string", "eval {deploy} --dataset digits --device foo", 2, "--device"),
    C("device string", "train -o {newdir} --dataset digits --device foo", 2, "--device"),
    C("device string", "search --run-dir {newdir} --device foo", 2, "--device"),
    C("device string", "demo --out {newdir} --device foo", 2, "--device"),
    C("device string", "eval {deploy} --dataset digits --device cuda:x", 2, "--device"),
    # engines: sidecars and ONNX files
    C("engine / onnx file", "bench {empty_onnx} --duration 0.01 --iterations 1", 1, "{empty_onnx}"),
    C("engine / onnx file", "build-trt {empty_onnx} -o {out_engine}", 1, "{empty_onnx}"),
    C("engine / onnx file", "bench {int64_onnx} --duration 0.01 --iterations 1", 1, "{int64_onnx}"),
    C("engine / onnx file", "bench {nan_onnx} --duration 0.01 --iterations 1", 1, "{nan_onnx}"),
    C("engine / onnx file", "bench {engine_badshape}", 1, "{engine_badshape}"),
    C("engine / onnx file", "bench {engine_nosidecar}", 1, "{engine_nosidecar}"),
    # run directories
    C("run directory", "search --run-dir {afile} --preset cpu --dataset digits", 1, "{afile}"),
    C("run directory", "search --run-dir {rodir}/run --preset cpu --dataset digits", 1, "{rodir}"),
    C("run directory", "train -o {afile} --dataset digits --backbone resnet18_cifar --width 0.125 --epochs 1 --limit 64 --batch-size 32", 1, "{afile}"),
    C("run directory", "train -o {rodir}/run --dataset digits --backbone resnet18_cifar --width 0.125 --epochs 1 --limit 64 --batch-size 32", 1, "{rodir}"),
    C("run directory", "demo --out {afile} --quick", 1, "{afile}"),
    C("run directory", "demo --out {rodir}/out --quick", 1, "{rodir}"),
    C("run directory", "search --run-dir {newdir} --preset cpu --dataset fashion-mnist --data-root {missing}", 1,
      "{missing}"),
    C("run directory", "train -o {newdir} --dataset fashion-mnist --data-root {missing} --backbone resnet18_cifar --width 0.125 --epochs 1 --limit 64 --batch-size 32", 1, "{missing}"),
    # eval of a checkpoint: the dataset it was trained on
    C("eval dataset", "eval {deploy}", 1, "--dataset"),
    # quantize: calibration data that does not fit, too few images, a model that is not an FP32
    # image classifier, an output that is the input; eval of ONNX files
    C("quantize", "quantize {onnx} --calib fashion-mnist -o {out_onnx}", 1, "{onnx}"),
    C("quantize", "quantize {onnx} --calib cifar10 --data-root {dir} -o {out_onnx}", 1, "{onnx}"),
    C("quantize", "quantize {onnx28} --calib fashion-mnist --data-root {tiny_fmnist} --calib-size 64 -o {out_onnx}",
      1, "--calib-size"),
    C("quantize", "quantize {onnx28} --calib fashion-mnist --data-root {tiny_fmnist} --calib-size 0 -o {out_onnx}", 2,
      "--calib-size"),
    C("quantize", "quantize {onnx28} --calib fashion-mnist --data-root {tiny_fmnist} --calib-size 16 -o {out_onnx}", 2,
      "--calib-size"),
    C("quantize", "quantize {qdq_onnx} --calib fashion-mnist --data-root {tiny_fmnist} -o {out_onnx}", 1, "{qdq_onnx}"),
    C("quantize", "quantize {int64_onnx} --calib fashion-mnist --data-root {tiny_fmnist} -o {out_onnx}", 1,
      "{int64_onnx}"),
    C("quantize", "quantize {flat_onnx} --calib fashion-mnist --data-root {tiny_fmnist} -o {out_onnx}", 1,
      "{flat_onnx}"),
    C("quantize", "quantize {empty_onnx} --calib fashion-mnist --data-root {tiny_fmnist} -o {out_onnx}", 1,
      "{empty_onnx}"),
    C("quantize", "quantize {onnx28} --calib fashion-mnist --data-root {tiny_fmnist} -o {onnx28}", 2, "{onnx28}"),
    C("quantize", "quantize {onnx28} --calib fashion-mnist --data-root {tiny_fmnist} --calib-size 32 "
                  "--exclude nosuch* -o {out_onnx}", 1, "nosuch*"),
    C("quantize", "quantize {onnx28} --calib fashion-mnist --data-root {missing} --calib-size 32 -o {out_onnx}", 1,
      "{missing}"),
    C("eval onnx", "eval {onnx} --dataset fashion-mnist --data-root {tiny_fmnist}", 1, "{onnx}"),
    C("eval onnx", "eval {onnx28} --data-root {tiny_fmnist}", 2, "--dataset"),
    C("eval onnx", "eval {onnx28} --dataset fashion-mnist --data-root {tiny_fmnist} --reference {int64_onnx}", 1,
      "{int64_onnx}"),
    C("eval onnx", "eval {onnx28} --dataset fashion-mnist --data-root {tiny_fmnist} --reference {onnx}", 1, "{onnx}"),
    C("eval onnx", "eval {deploy} --dataset digits --reference {onnx}", 1, "--reference"),
    C("eval onnx", "eval {onnx28} --dataset fashion-mnist --data-root {tiny_fmnist} --model torchvision:resnet18", 2,
      "--model"),
    C("eval onnx", "eval {qdq_onnx} --dataset cifar10 --data-root {dir}", 1, "{qdq_onnx}"),
    # --model: a checkpoint of a network that is not built in needs its name, and only its own
    C("model spec", "fuse {s_multi} {s_arch} -o {out_pt}", 1, "--model"),
    C("model spec", "export {s_deploy} -o {out_onnx}", 1, "--model"),
    C("model spec", "bench {s_deploy} --duration 0.01 --iterations 1", 1, "--model"),
    C("model spec", "eval {s_deploy} --dataset digits", 1, "--model"),
    C("model spec", "fuse {s_multi} {s_arch} -o {out_pt} --model torchvision:resnet18", 1, "torchvision:resnet18"),
    C("model spec", "export {s_deploy} -o {out_onnx} --model torchvision:resnet18", 1, "torchvision:resnet18"),
    C("model spec", "bench {s_deploy} --duration 0.01 --iterations 1 --model torchvision:resnet18", 1,
      "torchvision:resnet18"),
    C("model spec", "eval {s_deploy} --dataset digits --model torchvision:resnet18", 1, "torchvision:resnet18"),
    C("model spec", "fuse {multi} {arch} -o {out_pt} --model torchvision:resnet18", 1, "torchvision:resnet18"),
    C("model spec", "export {s_deploy} -o {out_onnx} --model nosuchmodule:f", 1, "nosuchmodule:f"),
    C("model spec", "fuse {s_multi} {s_arch} -o {out_pt} --model torchvision:mobilenet_v2 --torchvision {out_tv}", 1,
      "--torchvision"),
    C("model spec", "fuse {s_multi} {s_arch} -o {out_pt} --torchvision {out_tv}", 1, "--torchvision"),
    C("model spec", "bench {onnx} --model torchvision:resnet18 --duration 0.01 --iterations 1", 1, "--model"),
    C("model spec", "train -o {newdir} --dataset digits --model nosuchmodule:f", 2, "nosuchmodule"),
    C("model spec", "search --run-dir {newdir} --dataset digits --model nosuchmodule:f", 2, "nosuchmodule"),
    C("model spec", "train -o {newdir} --dataset digits --model torchvision:nosuch", 2, "nosuch"),
    C("model spec", "search --run-dir {newdir} --dataset digits --model torchvision:nosuch", 2, "nosuch"),
    C("model spec", "train -o {newdir} --dataset digits --model torchvision:resnet18 --model-kwargs [1]", 2,
      "--model-kwargs"),
    C("model spec", "train -o {newdir} --dataset digits --model torchvision:resnet18 --model-kwargs {{bad", 2,
      "--model-kwargs"),
    C("model spec", "search --run-dir {newdir} --dataset digits --model torchvision:resnet18 --model-kwargs 1", 2,
      "--model-kwargs"),
    C("model spec", "train -o {newdir} --dataset digits --model torchvision:resnet18 --weights {missing}.pt", 2,
      "--weights"),
    C("model spec", "train -o {newdir} --dataset digits --model torch.nn:Identity --weights IMAGENET1K_V1", 2, "--weights"),
    C("model spec", "train -o {newdir} --dataset digits --model torchvision:resnet18 --width 0.5", 2, "--width"),
    C("model spec", "search --run-dir {newdir} --dataset digits --model torchvision:resnet18 --width 0.5", 2,
      "--width"),
    C("model spec", "train -o {newdir} --dataset digits --model torchvision:resnet18 --init-from {multi}", 2,
      "--init-from"),
    C("model spec", "train -o {newdir} --dataset digits --backbone resnet18_cifar --weights {multi}", 2, "--weights"),
    C("model spec", "train -o {newdir} --dataset digits --backbone resnet18_cifar --model torchvision:resnet18", 2,
      "--model"),
]


# -- fixtures: real files made by the real code ----------------------------------------------------
def make_fixtures(d: Path) -> Dict[str, Path]:
    import torch

    from irep_deploy import ArchCode, build_model, fuse_model, save_checkpoint
    from irep_deploy.cli import main

    f: Dict[str, Path] = {}

    def put(name: str, path: Path) -> Path:
        f[name] = path
        return path

    torch.manual_seed(0)
    code = ArchCode.random("resnet18_cifar", ratio=2 / 3, seed=3)
    code.save(put("arch", d / "arch.bin"))
    multi = build_model("resnet18_cifar", arch=code, width=0.125, num_classes=10, in_channels=1).eval()
    save_checkpoint(put("multi", d / "multi.pt"), multi)
    deploy = fuse_model(multi)
    save_checkpoint(put("deploy", d / "deploy.pt"), deploy)
    os.symlink("multi.pt", str(put("multi_link", d / "link.pt")))
    os.link(str(f["multi"]), str(put("multi_hard", d / "hard.pt")))
    (d / "sub").mkdir()
    f["multi_dotdot"] = d / "sub" / ".." / "multi.pt"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", str(f["deploy"]), "-o", str(put("onnx", d / "deploy.onnx")), "--simplify", "none"]) == 0
        # at Fashion-MNIST's 28x28, for quantize and eval of ONNX files
        assert main(["export", str(f["deploy"]), "-o", str(put("onnx28", d / "deploy28.onnx")), "--simplify", "none",
                     "--input-size", "28"]) == 0
    # a network named by a model spec (small: a quarter-width MobileNetV2)
    spec = build_model("torchvision:mobilenet_v2", num_classes=10, model_kwargs={"width_mult": 0.25},
                       input_size=32).eval()
    spec_code = ArchCode.random("torchvision:mobilenet_v2", ratio=1 / 3, seed=3)
    spec_code.save(put("s_arch", d / "spec_arch.bin"))
    from irep_deploy.models import apply_arch
    apply_arch(spec, spec_code, create=True)
    save_checkpoint(put("s_multi", d / "spec_multi.pt"), spec, extra={"dataset": "digits"})
    save_checkpoint(put("s_deploy", d / "spec_deploy.pt"), fuse_model(spec), extra={"dataset": "digits"})
    f["out_tv"] = d / "out_tv.pt"
    f["dir"] = d
    f["newdir"] = d / "new-run"
    f["missing"] = d / "missing"
    f["out_pt"] = d / "out.pt"
    f["out_onnx"] = d / "out.onnx"
    f["out_engine"] = d / "out.engine"
    put("zeros", d / "zeros.bin").write_bytes(b"\0" * (10 << 20))
    put("longline", d / "long.bin").write_text("version: 1\nbackbone: " + "x" * 5_000_000 + "\n")
    put("binary", d / "binary.bin").write_bytes(bytes(range(256)) * 4)
    put("deepjson", d / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    put("badpoints", d / "points.json").write_text(json.dumps([{"label": "a" * 10000, "latency_ms": "x" * 10000,
                                                                "accuracy": 1}]))
    (d / "figs").mkdir()
    put("points_clash", d / "accuracy_latency.json").write_text(json.dumps(
        [{"label": "a", "latency_ms": 1.0, "accuracy": 50.0}, {"label": "b", "latency_ms": 2.0, "accuracy": 60.0}]))
    put("afile", d / "a-file").write_text("not a directory\n")
    f["rodir"] = Path("/proc")  # not writable even for root (tests run as root in containers)
    # edited headers: the file stays a valid checkpoint, only one header field is wrong
    from irep_deploy.tensorfile import load_tree, save_tree
    payload_multi = load_tree(f["multi"], "checkpoint").tree
    payload_deploy = load_tree(f["deploy"], "checkpoint").tree

    def edited(name: str, payload: dict, **changes: object) -> None:
        new = dict(payload, header=dict(payload["header"], **changes))
        save_tree(put(name, d / (name + ".pt")), new)

    edited("h_width0", payload_multi, width=0)
    edited("h_widthabc", payload_multi, width="abc")
    edited("h_size0", payload_multi, input_size=0)
    edited("h_sizebig", payload_multi, input_size="big")
    edited("h_classes", payload_multi, num_classes="ten")
    edited("h_inch", payload_multi, in_channels=-1)
    edited("h_backbone", payload_multi, backbone="x" * 500)
    edited("h_ops", payload_multi, ops="conv3x3")
    edited("h_dwidth0", payload_deploy, width=0.0)
    edited("h_dclasses", payload_deploy, num_classes=0)
    edited("h_dsize", payload_deploy, input_size=-4)
    edited("h_dbool", payload_deploy, num_classes=True)
    for name, payload, value in (("nan_deploy", payload_deploy, float("nan")), ("inf_deploy", payload_deploy,
                                 float("inf")), ("nan_multi", payload_multi, float("nan"))):
        state = {k: (v.fill_(value) if v.is_floating_point() else v) for k, v in
                 ((k, v.clone()) for k, v in payload["state_dict"].items())}
        save_tree(put(name, d / (name + ".pt")), dict(payload, state_dict=state))
    put("empty_onnx", d / "empty.onnx").write_bytes(b"")
    _onnx_fixtures(d, f)
    engine = put("engine_badshape", d / "bad.engine")
    engine.write_bytes(b"not really an engine")
    sidecar = {"format": "irep-deploy-engine", "format_version": 1, "tensorrt_version": "10.0", "gpu_name": "x",
               "compute_capability": "8.0", "precision": "fp32", "input_name": "input", "output_name": "logits",
               "min_shape": [1, 1, 32, 32], "opt_shape": "abcd", "max_shape": [1, 1, 32, 32], "onnx_sha256": "0"}
    Path(str(engine) + ".json").write_text(json.dumps(sidecar))
    put("engine_nosidecar", d / "lonely.engine").write_bytes(b"no sidecar")
    return f


def _onnx_fixtures(d: Path, f: Dict[str, Path]) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("input", TensorProto.INT64, [1, 1, 32, 32])
    y = helper.make_tensor_value_info("logits", TensorProto.INT64, [1, 1, 32, 32])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    f["int64_onnx"] = d / "int64.onnx"
    onnx.save(model, str(f["int64_onnx"]))
    model = onnx.load(str(f["onnx"]))
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind == "f":
            init.CopyFrom(numpy_helper.from_array(np.full_like(arr, np.nan), init.name))
    f["nan_onnx"] = d / "nan.onnx"
    onnx.save(model, str(f["nan_onnx"]))
    # already quantized: a QuantizeLinear/DequantizeLinear pair on the input of the 28x28 model
    model = onnx.load(str(f["onnx28"]))
    graph = model.graph
    name = graph.input[0].name
    graph.initializer.extend([numpy_helper.from_array(np.array(0.05, np.float32), "q_scale"),
                              numpy_helper.from_array(np.array(0, np.int8), "q_zero")])
    for node in graph.node:
        node.input[:] = ["input_dq" if i == name else i for i in node.input]
    graph.node.insert(0, helper.make_node("DequantizeLinear", ["input_q", "q_scale", "q_zero"], ["input_dq"]))
    graph.node.insert(0, helper.make_node("QuantizeLinear", [name, "q_scale", "q_zero"], ["input_q"]))
    f["qdq_onnx"] = d / "qdq.onnx"
    onnx.save(model, str(f["qdq_onnx"]))
    # a float input that is not an image batch
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 784])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 784])
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["logits"])], "g", [x], [y])
    f["flat_onnx"] = d / "flat.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(f["flat_onnx"]))
    # Fashion-MNIST's four files holding 40 images each: fewer than a calibration needs
    import gzip
    tiny = d / "tiny-fmnist"
    tiny.mkdir()
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
        labels = (np.arange(40) % 10).astype(np.uint8)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
            with gzip.open(str(tiny / "{}-{}-ubyte.gz".format(prefix, kind)), "wb") as handle:
                handle.write(header + arr.tobytes())
    f["tiny_fmnist"] = tiny


# -- running one case --------------------------------------------------------------------------------
def snapshot(d: Path) -> Dict[str, str]:
    """sha256 of every regular file under ``d``, keyed by relative path; links by their target text,
    special files (FIFOs, devices: never read) by their kind."""
    import stat
    out = {}
    for root, dirs, files in os.walk(str(d)):
        for name in dirs + files:
            p = Path(root) / name
            rel = str(p.relative_to(d))
            mode = os.lstat(str(p)).st_mode
            if stat.S_ISLNK(mode):
                out[rel] = "link:" + os.readlink(str(p))
            elif stat.S_ISREG(mode):
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISDIR(mode):
                out[rel] = "dir"
            else:
                out[rel] = "special:{:o}".format(stat.S_IFMT(mode))
    return out


def expand(text: str, f: Dict[str, Path]) -> str:
    return text.format(**{k: str(v) for k, v in f.items()})


@dataclass
class Outcome:
    case: Case
    rc: Optional[int]
    stderr: str
    traceback: bool
    changed: List[str]
    new: List[str]
    problems: List[str]

    @property
    def verdict(self) -> str:
        """The worst problem: hang > input destroyed > traceback > wrong success > leftover > not one line > code."""
        for kind in ("hang", "input destroyed", "traceback", "wrong success", "leftover", "not one line",
                     "does not name it", "wrong exit code"):
            if kind in self.problems:
                return kind
        return "one-line error"


def run_main(argv: Sequence[str]) -> Tuple[Optional[int], str, bool, bool]:
    """``irep_deploy.cli.main(argv)`` in this process with stdout and stderr captured: (exit code or
    None, stderr, hung past CASE_SECONDS, an exception escaped). Shared by both tables."""
    from irep_deploy.cli import main

    err, out = io.StringIO(), io.StringIO()
    rc: Optional[int] = None
    tb = False
    hung = False

    def alarm(signum: int, frame: object) -> None:
        raise _Hang()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(CASE_SECONDS)
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main(list(argv))
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        except _Hang:
            hung = True
        except BaseException:  # noqa: B902 - a traceback is exactly what this table looks for
            tb = True
            traceback.print_exc()
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    return rc, err.getvalue(), hung, tb


def run_case(case: Case, f: Dict[str, Path], base: Dict[str, str]) -> Outcome:
    rc, text, hung, tb = run_main([expand(a, f) for a in case.argv])
    after = snapshot(f["dir"])
    changed = sorted(k for k, v in base.items() if after.get(k) != v)
    new = sorted(k for k in after if k not in base)
    problems = []
    if hung:
        problems.append("hang")
    elif tb or "Traceback" in text:
        problems.append("traceback")
    elif rc == 0:
        problems.append("wrong success")
    if changed:
        problems.append("input destroyed")
    if new:
        problems.append("leftover")
    lines = [line for line in text.splitlines() if line.strip()]
    if not tb and not hung and rc != 0:
        if len(lines) != 1 or len(lines[0].replace(str(f["dir"]), "")) > MAX_LINE:
            problems.append("not one line")
        elif expand(case.names, f) not in lines[0]:
            problems.append("does not name it")
        if rc != case.code:
            problems.append("wrong exit code")
    return Outcome(case, rc, text, tb, changed, new, problems)


def restore(f: Dict[str, Path], d: Path, pristine: Path) -> None:
    """Put the work directory back exactly as it was (after a case that changed it): links included."""
    import shutil
    for p in list(d.iterdir()):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(str(p))
        else:
            p.unlink()
    for p in pristine.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.copytree(str(p), str(d / p.name), symlinks=True)
        else:
            shutil.copy2(str(p), str(d / p.name), follow_symlinks=False)
    f["multi_hard"].unlink()
    os.link(str(f["multi"]), str(f["multi_hard"]))


def run_all(cases: Sequence[Case], work: Path, progress: bool = False) -> List[Outcome]:
    import shutil
    d = work / "w"
    d.mkdir(parents=True)
    f = make_fixtures(d)
    pristine = work / "pristine"
    shutil.copytree(str(d), str(pristine), symlinks=True)
    base = snapshot(d)
    outcomes = []
    for case in cases:
        t0 = time.perf_counter()
        o = run_case(case, f, base)
        outcomes.append(o)
        if o.changed or o.new:
            restore(f, d, pristine)
        if progress:
            print("{:6.2f} s  {:16s} {}".format(time.perf_counter() - t0, o.verdict, case.id), file=sys.__stderr__)
    return outcomes


KINDS = ["one-line error", "hang", "input destroyed", "traceback", "wrong success", "leftover", "not one line",
         "does not name it", "wrong exit code"]


def table(outcomes: Sequence[Any], kinds: Sequence[str] = KINDS) -> str:
    """Counts of each verdict per category, then the total (outcomes of either table)."""
    cats: List[str] = []
    for o in outcomes:
        if o.case.category not in cats:
            cats.append(o.case.category)
    rows = ["| category | cases | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 2) + "|"]
    for cat in cats + ["total"]:
        sel = [o for o in outcomes if cat in ("total", o.case.category)]
        counts = [sum(1 for o in sel if o.verdict == k) for k in kinds]
        rows.append("| {} | {} | {} |".format(cat, len(sel), " | ".join(map(str, counts))))
    return "\n".join(rows)


TOTALS = ("cases", "one-line errors", "clean successes", "skipped", "tracebacks", "wrong successes",
          "changed inputs", "hangs", "imports", "other problems")


def totals(verdicts: Sequence[str], changed: Sequence[bool]) -> Dict[str, int]:
    """The counts the issue asks for, from each case's verdict (its worst problem) and whether it
    changed a file that existed before (counted even when a worse problem is its verdict)."""
    count = {k: 0 for k in TOTALS}
    count["cases"] = len(verdicts)
    names = {"one-line error": "one-line errors", "clean": "clean successes", "skipped": "skipped",
             "traceback": "tracebacks", "wrong success": "wrong successes", "hang": "hangs", "import": "imports"}
    for verdict in verdicts:
        key = names.get(verdict)
        if key is not None:
            count[key] += 1
        elif verdict != "input destroyed":
            count["other problems"] += 1
    count["changed inputs"] = sum(1 for c in changed if c)
    return count


def provenance(argv: Sequence[str], script: str = "bad_input.py") -> List[str]:
    """The commit (and whether the tree was dirty), command, date and machine of a results file."""
    import platform
    import torch
    state = _sibling("_common").git_state()  # the one reader of the checkout's state
    commit = state["commit"] or "unknown"
    dirty = " (tree dirty)" if state["dirty"] else ""
    return ["Commit {}{}, command `python benchmarks/{}{}`, {} UTC, Python {}, torch {}, {}.".format(
        commit, dirty, script, "".join(" " + a for a in argv), time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        platform.python_version(), torch.__version__, platform.platform())]


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results" / "bad_input.md"))
    ap.add_argument("--skip", action="append", default=[],
                    help="skip cases whose command contains this text (old code: `show /dev/zero` is OOM-killed)")
    ap.add_argument("--first-only", action="store_true",
                    help="only the first table (the second, benchmarks/hostile.py, writes its own file too)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    made = provenance(args_list(argv))  # before any results file is rewritten: the tree as it was run
    with tempfile.TemporaryDirectory() as tmp:
        cases = [c for c in CASES if not any(s in " ".join(c.argv) for s in args.skip)]
        outcomes = run_all(cases, Path(tmp), progress=True)
    second = []
    if not args.first_only:
        hostile = _hostile()
        with tempfile.TemporaryDirectory() as tmp:
            hcases = [c for c in hostile.all_cases() if not any(s in " ".join(c.argv) for s in args.skip)]
            second = hostile.run_all(hcases, Path(tmp), progress=True)
        hostile.write_results(second, str(Path(args.out).parent / "hostile.md"), made)
    import irep_deploy
    pkg, root = Path(irep_deploy.__file__).resolve().parent, Path(__file__).resolve().parent.parent
    shown = pkg.relative_to(root) if root in pkg.parents else pkg  # another tree (e.g. the old code) in full
    rows = [("first: bad files and flags", totals([o.verdict for o in outcomes], [bool(o.changed) for o in outcomes]))]
    if second:
        rows.append(("second: environment faults, hostile files, two writers",
                     totals([o.verdict for o in second], ["input destroyed" in o.problems for o in second])))
    if len(rows) > 1:
        rows.append(("both", {k: rows[0][1][k] + rows[1][1][k] for k in TOTALS}))
    summary = ["| table | " + " | ".join(TOTALS) + " |", "|---" * (len(TOTALS) + 1) + "|"]
    summary += ["| {} | {} |".format(name, " | ".join(str(t[k]) for k in TOTALS)) for name, t in rows]
    bad = [o for o in outcomes if o.verdict != "one-line error"]
    lines = ["# Bad-input tables", ""] + made + ["", "## Totals", "", "\n".join(summary), "",
             "Tracebacks, wrong successes, changed inputs, hangs and imports must all be 0; a skipped case is one "
             "this machine cannot stage (its reason is in results/hostile.md).", "",
             "## First table", "",
             "`python benchmarks/bad_input.py` ({} cases, in-process through `irep_deploy.cli.main`; package at "
             "`{}`). Verdict per case: the worst of hang (> {} s) > input destroyed > traceback > wrong success > leftover > "
             "not one line of at most {} characters > does not name the file/flag > wrong exit code.".format(
                 len(outcomes), shown, CASE_SECONDS, MAX_LINE), "", table(outcomes), ""]
    if bad:
        lines += ["### Cases without the promised outcome", ""]
        lines += ["- `{}`: {} (exit {}): {}".format(o.case.id, ", ".join(o.problems), o.rc,
                                                   (o.stderr.strip().splitlines() or [""])[-1][:160]) for o in bad]
    if second:
        lines += ["", "## Second table (benchmarks/hostile.py; per-case detail in results/hostile.md)", "",
                  hostile.table(second), ""]
        hbad = [o for o in second if o.problems]
        if hbad:
            lines += ["### Cases without the promised outcome", ""]
            lines += ["- `{}`: {} (exit {}): {}".format(o.case.id, ", ".join(o.problems), o.rc,
                                                       (o.stderr.strip().splitlines() or [""])[-1][:160]) for o in hbad]
    # the one writer (with the provenance record); every module counts: messages and exit codes are the result
    _sibling("_common").write_results(Path(args.out).with_suffix(""), None, "\n".join(lines) + "\n", ignore=())
    print("\n".join(summary))
    print("wrote {}".format(args.out))
    return 0


def args_list(argv: Optional[List[str]]) -> List[str]:
    return list(sys.argv[1:] if argv is None else argv)


def _sibling(name: str):
    """benchmarks/NAME.py, loaded by path (tests load this file on its own, without sys.path)."""
    import importlib.util
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, str(HERE / (name + ".py")))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _hostile():
    return _sibling("hostile")

if __name__ == "__main__":
    sys.exit(main())
