"""``irep-deploy``: argument parsing and printing only; the work is done by library functions."""
from __future__ import annotations

import argparse
import importlib
import math
import re
import signal
import sys
import threading
from typing import Any, Callable, List, NoReturn, Optional, Sequence

from . import __version__
from ._io import quote, read_arch_bytes
from .errors import IrepError, Terminated

Handler = Callable[[argparse.Namespace], int]


# -- argument types: every value is checked here, before any work, as a usage error (exit 2) ---------
def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError("expected an integer, got {}".format(quote(text))) from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError("must be between {} and {}, got {}".format(lo, hi, value))
        return value
    return parse


def _float_in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError("expected a number, got {}".format(quote(text))) from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError("must be a finite number, got {}".format(text))
        if value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
            if hi == sys.float_info.max:
                raise argparse.ArgumentTypeError("must be a finite number {} {:g}, got {:g}".format(
                    ">" if lo_open else ">=", lo, value))
            raise argparse.ArgumentTypeError("must be in {}{:g}, {:g}{}, got {:g}".format(
                "(" if lo_open else "[", lo, hi, ")" if hi_open else "]", value))
        return value
    return parse


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d{1,3})?", text):
        raise argparse.ArgumentTypeError("expected auto, cpu, cuda or cuda:N, got {}".format(quote(text)))
    return text


def _name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.:/-]{0,127}", text):
        raise argparse.ArgumentTypeError("expected a name of letters, digits and _.:/- (not starting with a digit), "
                                         "got {}".format(quote(text)))
    return text


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError("not valid JSON ({}): {}".format(str(exc).split(":")[0], quote(text))) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object such as '{{\"num_classes\": 10}}', got {}".format(
            quote(text)))
    return value


_SPEC_HELP = ("torchvision:NAME (any torchvision.models.get_model name) or package.module:factory "
              "(the factory returns an nn.Module)")


def _add_model_choice(p: argparse.ArgumentParser) -> None:
    """search/train: the network to build, a built-in backbone or a model spec, and its settings."""
    which = p.add_mutually_exclusive_group()
    which.add_argument("--backbone", help="built-in backbone: resnet18_cifar, vgg16_cifar, resnet18, ... "
                                          "(or a model spec, as --model)")
    which.add_argument("--model", dest="backbone", metavar="SPEC",
                       help="the network: " + _SPEC_HELP + ", or a built-in backbone name. Its 3x3 convs become "
                            "searchable blocks (irepify); a 3-channel network is fed 1-channel data by copying "
                            "the grey channel")
    p.add_argument("--weights", metavar="NAME_OR_FILE",
                   help="initial weights of a --model network: a state-dict file (loaded with weights_only=True) "
                        "or a torchvision weights name such as IMAGENET1K_V1 (downloaded by torchvision)")
    p.add_argument("--model-kwargs", type=_json_object, metavar="JSON",
                   help="a JSON object of the --model factory's keyword arguments (num_classes is added from "
                        "the data where the factory takes it)")
    p.add_argument("--include", action="append", metavar="PATTERN",
                   help="rewrite only the 3x3 convs whose module path matches (fnmatch; repeatable)")
    p.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="leave out the 3x3 convs whose module path matches (fnmatch; repeatable)")


def _add_checkpoint_model(p: argparse.ArgumentParser, dest: str = "model") -> None:
    """fuse/export/bench/eval: name the network of a checkpoint that is not built in."""
    p.add_argument("--model", dest=dest, metavar="SPEC",
                   help="the network of a checkpoint that is not built in (" + _SPEC_HELP + "), as it was "
                        "trained with; required for such a checkpoint (a checkpoint never imports code)")


MAX_BATCH = 4096
MAX_SIZE = 4096
_SEED = _int_in(0, 2 ** 63 - 1)
_BATCH = _int_in(1, MAX_BATCH)
_SIZE = _int_in(1, MAX_SIZE)
_COUNT = _int_in(1, 10 ** 9)
_TOLERANCE = _float_in(0.0, 1e6)
_POSITIVE = _float_in(0.0, sys.float_info.max, lo_open=True)  # any finite value > 0 (a huge lr diverges, by design)


class _LazyChoices(Sequence):
    """``choices`` read from a library module on first use: building the parser imports no torch."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def _values(self) -> Sequence[str]:
        return getattr(importlib.import_module(self.module, __package__), self.name)

    def __getitem__(self, index: Any) -> Any:
        return self._values()[index]

    def __len__(self) -> int:
        return len(self._values())

    def __contains__(self, value: object) -> bool:
        return value in self._values()


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line (no usage block): ``irep-deploy fuse: error: ...``."""

    def error(self, message: str) -> "NoReturn":  # type: ignore[override]
        self.exit(2, "{}: error: {} (see --help)\n".format(self.prog, message.splitlines()[0] if message else ""))


def _cmd_fuse(args: argparse.Namespace) -> int:
    from .pipeline import fuse
    report = fuse(args.ckpt, args.arch, out=args.output, torchvision_out=args.torchvision,
                  batch=args.batch, input_size=args.input_size, tolerance=args.tolerance, seed=args.seed,
                  model=args.model)
    print("fused {} branches: {:,} -> {:,} parameters".format(
        report.branches, report.params_multi_branch, report.params_fused))
    print("check on a random batch {}: max abs error {:.3g}, relative error {:.3g} (tolerance {:.0e})".format(
        "x".join(map(str, report.batch_shape)), report.max_abs_error, report.rel_error, args.tolerance))
    print("wrote {}".format(report.out))
    if report.torchvision_out:
        print("wrote {} (torchvision state dict)".format(report.torchvision_out))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    raw = read_arch_bytes(args.arch)  # bounded, before torch loads: a huge file is refused at once
    from .arch import ArchCode
    print(ArchCode.from_bytes(raw, args.arch).format_table())
    return 0


def _add_fuse(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fuse", help="fuse a multi-branch checkpoint into a plain deploy checkpoint",
                       description="Load a multi-branch checkpoint, apply the architecture code, fuse every "
                                   "block into one 3x3 conv, check the fused output against the multi-branch "
                                   "output on a random batch, and write the deploy checkpoint.")
    p.add_argument("ckpt", help="multi-branch checkpoint (from `irep-deploy train` or save_checkpoint)")
    p.add_argument("arch", help="architecture code file (arch.bin) the checkpoint was trained with")
    p.add_argument("-o", "--output", help="deploy checkpoint to write (default: CKPT with .deploy before the suffix)")
    p.add_argument("--torchvision", metavar="PATH",
                   help="also write a torchvision state dict (resnet18/34/50, vgg16 ImageNet layouts)")
    p.add_argument("--batch", type=_BATCH, default=2, help="batch size of the equivalence check (default 2)")
    p.add_argument("--input-size", type=_SIZE, help="spatial size of the check input (default: the model's)")
    p.add_argument("--tolerance", type=_TOLERANCE, default=1e-5,
                   help="largest relative error accepted, max|a-b|/max|a| (default 1e-5)")
    p.add_argument("--seed", type=_SEED, default=0, help="seed of the random check batch")
    _add_checkpoint_model(p)
    p.set_defaults(handler=_cmd_fuse)


def _add_show(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="print an architecture code as a matrix with counts and budget")
    p.add_argument("arch", help="architecture code file (arch.bin)")
    p.set_defaults(handler=_cmd_show)


_MODEL_SETTINGS = ("model_kwargs", "weights", "include", "exclude")
_TRAIN_SETTINGS = ("backbone", "dataset", "width", "epochs", "batch_size", "lr", "momentum", "weight_decay",
                   "nesterov", "label_smoothing", "val_fraction", "split_seed", "limit", "seed", "init_from", "arch", "amp",
                   "deterministic") + _MODEL_SETTINGS


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, run_demo
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    run_demo(args.out, settings, device=args.device, data_root=args.data_root, progress=not args.quiet)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on Fashion-MNIST on CPU, with a report (make demo)",
                       description="search -> train -> fuse -> export -> quantize (INT8) -> eval and bench of the FP32 "
                                   "and INT8 ONNX -> build-trt (when TensorRT and a GPU are present) -> bench, then report.md, report.json and figures in --out. "
                                   "About 15 minutes on 2 CPU cores.")
    p.add_argument("--out", default="demo-out", help="report directory (default demo-out)")
    p.add_argument("--quick", action="store_true", help="a smoke run on sklearn digits (about a minute)")
    p.add_argument("--data-root", help="dataset directory (default: the Debian package's Fashion-MNIST)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu (default) or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_cmd_demo)


def _cmd_search(args: argparse.Namespace) -> int:
    from .search.des import make_config, search
    config = None
    if not args.resume:
        config = make_config(args.preset, backbone=args.backbone, dataset=args.dataset, width=args.width,
                             population=args.population, subnets=args.subnets, budget=args.budget,
                             warmup_epochs=args.warmup_epochs, rounds=args.rounds, round_epochs=args.round_epochs,
                             batch_size=args.batch_size, lr=args.lr, limit=args.limit, seed=args.seed,
                             amp=args.amp, channels_last=args.channels_last or None,
                             deterministic=args.deterministic or None,
                             **{k: getattr(args, k) for k in _MODEL_SETTINGS})
    run_dir = args.resume or args.run_dir
    report = search(run_dir, config, resume=bool(args.resume), data_root=args.data_root, device=args.device,
                    progress=not args.quiet, workers=args.workers)
    if report.main_process:
        print("best code: {} branches, fitness {:.2f}% (validation top-1, fused)".format(
            report.best.count(), report.best_fitness))
        print("wrote {}/arch.bin, population.json, alpha_beta.jsonl, supernet.pt, log.jsonl".format(report.run_dir))
    return 0


def _add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="run the DES search for an architecture code (resumable, torchrun-ready)",
                       description="Directional evolutionary search (Algorithm 1) over the IREPS space. Writes "
                                   "arch.bin (best code), population.json, alpha_beta.jsonl, supernet.pt, log.jsonl "
                                   "and TensorBoard scalars into the run directory; state.pt after every epoch.")
    p.add_argument("--run-dir", default="runs/search", help="output directory (default runs/search)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the search saved in RUN_DIR (its settings are used)")
    p.add_argument("--preset", choices=["paper-cifar", "paper-imagenet", "cpu"],
                   help="named settings; `cpu` is a real Fashion-MNIST search that takes minutes on 2 cores "
                        "(default: paper-cifar); options below override it")
    _add_model_choice(p)
    p.add_argument("--dataset", help="fashion-mnist, cifar10, imagenet, digits")
    p.add_argument("--data-root", help="dataset directory (Fashion-MNIST defaults to the Debian package's)")
    p.add_argument("--width", type=_float_in(0.0, 16.0, lo_open=True),
                   help="channel width multiplier (built-in backbones; a --model network keeps its own)")
    p.add_argument("--population", type=_int_in(1, 100000), help="population size (paper: 128)")
    p.add_argument("--subnets", type=_int_in(1, 10000), help="B, codes trained per mini-batch (paper: 5 CIFAR, 1 ImageNet)")
    p.add_argument("--budget", type=_float_in(0.0, 1.0, lo_open=True), help="C as a ratio of all available branches (paper: 2/3 or 1/2)")
    p.add_argument("--warmup-epochs", type=_int_in(0, 100000))
    p.add_argument("--rounds", type=_int_in(1, 100000), help="evolution rounds")
    p.add_argument("--round-epochs", type=_int_in(1, 100000), help="E_p, epochs per round")
    p.add_argument("--batch-size", type=_int_in(1, 1 << 20), help="global batch size")
    p.add_argument("--lr", type=_POSITIVE, help="SGD learning rate of the weights (paper: 0.1)")
    p.add_argument("--limit", type=_COUNT, help="use at most this many examples per split (CPU-scale runs)")
    p.add_argument("--seed", type=_SEED)
    p.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda, cuda:1 (under torchrun: the local rank's GPU)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], help="autocast the SuperNet forward (fp16: CUDA only)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format (GPU)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic cuDNN/cuBLAS kernels (slower on GPUs): a resumed CUDA search ends bit-identical")
    p.add_argument("--workers", type=int, default=0, help="data loader processes (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.set_defaults(handler=_cmd_search)


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train
    given = {k: getattr(args, k) for k in _TRAIN_SETTINGS if getattr(args, k) is not None}
    if args.resume:
        if given:
            raise IrepError("--resume continues with the run's saved settings; drop --{}".format(
                next(iter(given)).replace("_", "-")))
        run, config = args.resume, None
    else:
        if args.output is None:
            raise IrepError("give a run directory (-o RUN_DIR) or --resume RUN_DIR")
        if "arch" in given:
            from .arch import ArchCode
            given["arch"] = ArchCode.load(given["arch"]).dumps()
        run, config = args.output, TrainConfig(**given)
    report = train(run, config, resume=bool(args.resume), data_root=args.data_root, device=args.device,
                   workers=args.workers, progress=not args.no_progress, channels_last=args.channels_last)
    if not report.main_process:  # ranks > 0 under torchrun: rank 0 reports
        return 0
    print("test top-1 {:.2f}% top-5 {:.2f}% (multi-branch); fused {:.2f}% / {:.2f}% on {} examples "
          "(relative logit error {:.2g}, {} predictions differ)".format(
              report.multi_branch.top1, report.multi_branch.top5, report.fused.top1, report.fused.top5,
              report.multi_branch.examples, report.fused_rel_error, report.disagreements))
    print("wrote {}".format(report.ckpt))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    if str(args.ckpt).lower().endswith(".onnx"):
        return _eval_onnx(args)
    if args.reference is not None:
        raise IrepError("--reference compares two ONNX files; {} is a checkpoint".format(args.ckpt))
    from .train import evaluate
    res = evaluate(args.ckpt, dataset=args.dataset, split=args.split, data_root=args.data_root,
                   batch_size=args.batch_size, val_fraction=args.val_fraction, split_seed=args.split_seed,
                   limit=args.limit, device=args.device, workers=args.workers, model=args.model)
    print("{} {} split: top-1 {:.2f}% top-5 {:.2f}% loss {:.4f} on {} examples".format(
        res.dataset, args.split, res.top1, res.top5, res.loss, res.examples))
    return 0


def _eval_onnx(args: argparse.Namespace) -> int:
    if args.model is not None:
        raise IrepError("{}: an ONNX file carries its network; drop --model {}".format(args.ckpt, args.model))
    if args.device not in ("auto", "cpu"):
        raise IrepError("{}: ONNX files are evaluated with onnxruntime on the CPU; drop --device {}".format(
            args.ckpt, args.device))
    if args.dataset is None:
        raise IrepError("{}: an ONNX file does not record its dataset; pass --dataset".format(args.ckpt))
    from .engines.onnx_eval import evaluate_onnx
    res = evaluate_onnx(args.ckpt, args.dataset, split=args.split, data_root=args.data_root,
                        batch_size=args.batch_size, val_fraction=args.val_fraction, split_seed=args.split_seed,
                        limit=args.limit, reference=args.reference)
    print("{} {} split: top-1 {:.2f}% top-5 {:.2f}% loss {:.4f} on {} examples (onnxruntime CPU)".format(
        res.dataset, args.split, res.top1, res.top5, res.loss, res.examples))
    if res.reference is not None:
        print("reference {}: top-1 {:.2f}% top-5 {:.2f}%; {} of {} predictions differ ({:.2f}%)".format(
            res.reference, res.reference_top1, res.reference_top5, res.differ, res.examples,
            100.0 * res.differ / res.examples))
    return 0


def _add_data_args(p: argparse.ArgumentParser, settings: bool) -> None:
    p.add_argument("--dataset", choices=_LazyChoices(".data", "DATASETS"), metavar="NAME",
                   help="%(choices)s (default: fashion-mnist for train, the checkpoint's own for eval)")
    p.add_argument("--data-root", help="dataset directory (default: the Debian package's for fashion-mnist)")
    p.add_argument("--val-fraction", type=_float_in(0.0, 1.0, hi_open=True), default=None if settings else 0.0,
                   help="fraction of the training set held out as the val split (default 0)")
    p.add_argument("--split-seed", type=_SEED, default=None if settings else 0,
                   help="seed of the train/val split (default 0)")
    p.add_argument("--limit", type=_COUNT,
                   help="use at most N examples of each split (CPU-scale runs)")
    p.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--workers", type=_int_in(0, 256), default=0, help="data loader processes (default 0)")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a multi-branch network from an architecture code (resumable)",
                       description="Train the multi-branch network of an architecture code (or a plain backbone), "
                                   "write RUN_DIR/ckpt.pt for `irep-deploy fuse`, and report the test accuracy of "
                                   "the multi-branch and the fused model. Runs under torchrun with DDP.")
    p.add_argument("-o", "--output", metavar="RUN_DIR", help="run directory to create")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with its saved settings")
    p.add_argument("--arch", help="architecture code file (arch.bin)")
    _add_model_choice(p)
    _add_data_args(p, settings=True)
    p.add_argument("--width", type=_float_in(0.0, 16.0, lo_open=True),
                   help="channel width multiplier of a built-in backbone (default 1.0)")
    p.add_argument("--epochs", type=_int_in(1, 100000), help="epochs (default 10)")
    p.add_argument("--batch-size", type=_int_in(1, 1 << 20), help="global batch size (default 128)")
    p.add_argument("--lr", type=_POSITIVE, help="SGD learning rate, cosine-annealed per step (default 0.1)")
    p.add_argument("--momentum", type=_float_in(0.0, 1.0, hi_open=True), help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=_float_in(0.0, sys.float_info.max), help="weight decay (default 5e-4)")
    p.add_argument("--nesterov", action="store_true", default=None, help="Nesterov momentum")
    p.add_argument("--label-smoothing", type=_float_in(0.0, 1.0, hi_open=True), help="label smoothing (default 0)")
    p.add_argument("--seed", type=_SEED, help="seed of initialisation, order and augmentation (default 0)")
    p.add_argument("--init-from", metavar="PATH",
                   help="torchvision-layout state dict for the fixed convs of a built-in backbone (ImageNet "
                        "layouts; for a --model network use --weights)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"),
                   help="mixed precision of the training forward (default none; fp16 needs CUDA)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory layout (GPU speed)")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="deterministic cuDNN/cuBLAS kernels (slower on GPUs): a resumed CUDA run ends bit-identical; "
                        "a setting of the run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-epoch lines")
    p.set_defaults(handler=_cmd_train)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="top-1/top-5 accuracy of a checkpoint or ONNX file on a dataset split",
                       description="Evaluate a multi-branch or deploy checkpoint, or an ONNX file (FP32 or INT8, "
                                   "onnxruntime on the CPU), on a split of a dataset. With --reference, an ONNX "
                                   "file is compared with another one: how many predicted classes differ.")
    p.add_argument("ckpt", metavar="MODEL", help="checkpoint (ckpt.pt from train, a deploy checkpoint from fuse) "
                                                 "or an .onnx file (from export or quantize)")
    p.add_argument("--reference", metavar="ONNX",
                   help="another ONNX file (e.g. the FP32 model of an INT8 one): its scores and the number of "
                        "predictions that differ")
    p.add_argument("--split", choices=("train", "val", "test"), default="test", help="split (default test)")
    p.add_argument("--batch-size", type=_int_in(1, 1 << 20), default=256, help="batch size (default 256)")
    _add_data_args(p, settings=False)
    _add_checkpoint_model(p)
    p.set_defaults(handler=_cmd_eval)


def _cmd_quantize(args: argparse.Namespace) -> int:
    from .engines.quantize import quantize
    report = quantize(args.onnx, args.calib, out=args.output, data_root=args.data_root, calib_size=args.calib_size,
                      method=args.method, per_channel=args.per_channel, exclude=args.exclude or (),
                      min_cosine=args.min_cosine)
    print("quantized to INT8 (QDQ, symmetric, {} weights), {} calibration on {} {} training images".format(
        "per-channel" if report.per_channel else "per-tensor", report.method, report.calib_size, report.calib_dataset))
    if report.excluded:
        print("kept in float: {} node(s): {}".format(len(report.excluded), ", ".join(report.excluded)))
    print("graph: " + ", ".join("{} {}".format(n, op) for op, n in sorted(report.op_types.items())))
    print("INT8 vs FP32 on a calibration batch of {}: cosine {:.5f}, top-1 agreement {:.1f}% (limit {})".format(
        report.check_batch, report.cosine, 100.0 * report.agreement, args.min_cosine))
    print("wrote {} ({:,} bytes)".format(report.out, report.size_bytes))
    return 0


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    from .engines import quantize as q  # no torch: the module's constants only
    p = sub.add_parser("quantize", help="INT8 QDQ ONNX for TensorRT, calibrated on real images (onnxruntime)",
                       description="Post-training INT8 quantization of an FP32 ONNX file with onnxruntime: "
                                   "QuantizeLinear/DequantizeLinear pairs, symmetric INT8 activations and weights "
                                   "(what TensorRT's explicit quantization builds), calibrated on training images "
                                   "of --calib through eval's preprocessing; checked against the FP32 model "
                                   "before writing; the settings go into the file's metadata.")
    p.add_argument("onnx", help="FP32 ONNX file (from export)")
    p.add_argument("-o", "--output", help="INT8 ONNX file to write (default: ONNX with .int8.onnx)")
    p.add_argument("--calib", required=True, choices=_LazyChoices(".data", "DATASETS"), metavar="DATASET",
                   help="%(choices)s: calibration images come from its training split")
    p.add_argument("--data-root", help="dataset directory (default: the Debian package's for fashion-mnist)")
    p.add_argument("--calib-size", type=_int_in(q.MIN_CALIB_IMAGES, 10 ** 7), default=512,
                   help="calibration images (default 512, at least {})".format(q.MIN_CALIB_IMAGES))
    p.add_argument("--method", choices=q.METHODS, default="minmax",
                   help="activation range calibration (default minmax)")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--per-channel", dest="per_channel", action="store_true", default=True,
                         help="one weight scale per output channel, on the output axis (the default)")
    weights.add_argument("--per-tensor", dest="per_channel", action="store_false",
                         help="one weight scale per weight tensor")
    p.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="keep the nodes whose name matches in float (fnmatch, e.g. '/fc/Gemm'; repeatable)")
    p.add_argument("--min-cosine", type=_float_in(-1.0, 1.0), default=q.DEFAULT_MIN_COSINE,
                   help="least cosine similarity of INT8 and FP32 logits on a calibration batch "
                        "(default {})".format(q.DEFAULT_MIN_COSINE))
    p.set_defaults(handler=_cmd_quantize)


def _cmd_export(args: argparse.Namespace) -> int:
    from .engines.onnx import export
    opset = {"opset": args.opset} if args.opset is not None else {}  # else the library's default
    report = export(args.ckpt, out=args.output, arch=args.arch, input_size=args.input_size, **opset,
                    batch=args.batch, simplify=args.simplify, verify_batch=args.verify_batch,
                    tolerance=args.tolerance, seed=args.seed, input_name=args.input_name,
                    output_name=args.output_name, model=args.model)
    if report.fused_here:
        print("fused the multi-branch checkpoint before export")
    print("exported opset {}, input {} {} ({} batch), output {}, simplifier: {}".format(
        report.opset, report.input_name, "x".join(map(str, report.input_shape[1:])),
        "dynamic" if report.dynamic_batch else "fixed {}".format(report.input_shape[0]), report.output_name,
        report.simplifier))
    print("graph: " + ", ".join("{} {}".format(n, op) for op, n in sorted(report.op_types.items())))
    for check in report.checks:
        print("onnxruntime vs torch at batch {}: max abs error {:.3g}, relative error {:.3g} (tolerance {:.0e})".format(
            check.batch, check.max_abs_error, check.rel_error, report.tolerance))
    print("wrote {} ({:,} bytes)".format(report.out, report.size_bytes))
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a deploy checkpoint to ONNX, verified with onnxruntime",
                       description="Export a fused (deploy) checkpoint, or a multi-branch checkpoint which is fused "
                                   "first, to ONNX with the legacy exporter; simplify, run onnx.checker, and compare "
                                   "onnxruntime with torch at batch 1 and >1 before writing.")
    p.add_argument("ckpt", help="deploy checkpoint (from fuse) or multi-branch checkpoint")
    p.add_argument("--arch", help="architecture code for a multi-branch checkpoint (default: the one it was "
                                  "trained with; required for a SuperNet)")
    p.add_argument("-o", "--output", help="ONNX file to write (default: CKPT with suffix .onnx)")
    p.add_argument("--opset", type=_int_in(1, 1000),
                   help="ONNX opset (default: the highest TensorRT 8.5 reads, irep_deploy.engines.onnx.DEFAULT_OPSET)")
    p.add_argument("--input-size", type=_SIZE, help="spatial input size (default: the model's)")
    p.add_argument("--batch", type=_BATCH, help="fix the batch size (default: dynamic batch axis)")
    p.add_argument("--simplify", choices=_LazyChoices(".engines.onnx", "SIMPLIFIERS"), default="auto", metavar="NAME",
                   help="%(choices)s: graph simplifier (auto: onnxslim, else onnxsim, else none)")
    p.add_argument("--verify-batch", type=_int_in(2, MAX_BATCH), default=4, help="batch >1 of the onnxruntime check (default 4)")
    p.add_argument("--tolerance", type=_TOLERANCE, default=1e-4,
                   help="largest relative error onnxruntime vs torch, max|a-b|/max|a| (default 1e-4)")
    p.add_argument("--seed", type=_SEED, default=0, help="seed of the random check batches")
    p.add_argument("--input-name", type=_name, default="input", help="name of the graph input (default input)")
    p.add_argument("--output-name", type=_name, default="logits", help="name of the graph output (default logits)")
    _add_checkpoint_model(p)
    p.set_defaults(handler=_cmd_export)


def _cmd_build_trt(args: argparse.Namespace) -> int:
    from .engines.tensorrt import build_engine
    report = build_engine(args.onnx, out=args.output, fp16=args.fp16, workspace_mb=args.workspace,
                          min_batch=args.min_batch, opt_batch=args.opt_batch, max_batch=args.max_batch,
                          timing_cache=args.timing_cache, dla_core=args.dla_core, verify=args.verify,
                          tolerance=args.tolerance, min_cosine=args.min_cosine, int8=args.int8, calib=args.calib,
                          data_root=args.data_root, calib_size=args.calib_size, calib_cache=args.calib_cache,
                          min_agreement=args.min_agreement)
    meta = report.meta
    print("built {} engine with TensorRT {} on {} (compute {}); batch {}-{} (opt {}){}".format(
        meta.precision.upper(), meta.tensorrt_version, meta.gpu_name, meta.compute_capability,
        meta.min_shape[0], meta.max_shape[0], meta.opt_shape[0], "; strongly typed ({})".format(
            "QDQ graph" if meta.precision == "int8" else "FP16 ONNX graph") if meta.strongly_typed else ""))
    calib = meta.calibration or {}
    if calib.get("method") == "qdq":
        print("INT8 from the ONNX's quantize/dequantize nodes (explicit quantization)")
    elif calib:
        print("INT8 calibration: entropy (IInt8EntropyCalibrator2), {}".format(
            "table read from {}".format(calib["cache_path"]) if calib["from_cache"] else
            "{} {} images in batches of {}".format(calib["images"], calib["dataset"], calib["batch"])))
    if report.verify and "top1_agreement" in report.verify:
        print("engine vs onnxruntime on {:.0f} real images: cosine {:.5f}, top-1 agreement {:.2%} ({:.0f} differ)".format(
            report.verify["examples"], report.verify["cosine"], report.verify["top1_agreement"],
            report.verify["top1_differ"]))
    elif report.verify:
        print("engine vs onnxruntime: max abs error {:.3g}, relative error {:.3g}, cosine {:.6f}".format(
            report.verify["max_abs_error"], report.verify["rel_error"], report.verify["cosine"]))
    print("wrote {} and {}".format(report.out, report.meta_out))
    if report.timing_cache:
        print("wrote {} (timing cache)".format(report.timing_cache))
    if calib.get("cache_path") and not calib.get("from_cache"):
        print("wrote {} (calibration cache)".format(calib["cache_path"]))
    return 0


def _add_build_trt(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-trt", help="build a TensorRT engine (+ JSON metadata) from an ONNX file",
                       description="Build a TensorRT engine (TensorRT 8.5 to 11) with a batch optimisation "
                                   "profile; writes ENGINE and ENGINE.json. Needs TensorRT and a CUDA GPU.")
    p.add_argument("onnx", help="ONNX file (from export)")
    p.add_argument("-o", "--output", help="engine to write (default: ONNX with suffix .engine)")
    p.add_argument("--fp16", action="store_true", help="FP16 engine (builder flag; on TensorRT 11 an FP16 graph); "
                                                       "with --int8: FP16 fallback for layers without INT8 kernels")
    p.add_argument("--int8", action="store_true",
                   help="INT8 engine: from a QDQ ONNX as quantized (TensorRT 8.5-11), or from a float ONNX calibrated "
                        "on --calib images (TensorRT 8.5/10 only)")
    p.add_argument("--calib", choices=_LazyChoices(".data", "DATASETS"), metavar="DATASET",
                   help="%(choices)s: real images for INT8 calibration (training set) and --verify (test set), "
                        "preprocessed as `eval` does")
    p.add_argument("--data-root", help="dataset directory of --calib (default: the Debian package's Fashion-MNIST)")
    p.add_argument("--calib-size", type=_int_in(1, 1 << 20), default=512,
                   help="calibration images (default 512; whole batches of min(max batch, 32))")
    p.add_argument("--calib-cache", metavar="PATH",
                   help="calibration table: used instead of calibrating when the file exists, written after the build")
    p.add_argument("--workspace", type=_int_in(1, 1 << 24), default=1024, help="workspace memory pool limit in MiB (default 1024)")
    p.add_argument("--min-batch", type=_BATCH, help="smallest batch of the profile (default 1)")
    p.add_argument("--opt-batch", type=_BATCH, help="batch TensorRT tunes for (default: min batch)")
    p.add_argument("--max-batch", type=_BATCH, help="largest batch of the profile (default 32)")
    p.add_argument("--timing-cache", metavar="PATH", help="timing cache file, read if present and written back")
    p.add_argument("--dla-core", type=_int_in(0, 15), help="run on this DLA core with GPU fallback (Jetson; needs --fp16)")
    p.add_argument("--verify", action="store_true", help="compare the engine with onnxruntime before writing")
    p.add_argument("--tolerance", type=_TOLERANCE, default=1e-3, help="FP32 relative error limit of --verify (1e-3)")
    p.add_argument("--min-cosine", type=_float_in(-1.0, 1.0),
                   help="cosine-similarity limit of --verify: FP16 (default 0.999), INT8 (default 0.99)")
    p.add_argument("--min-agreement", type=_float_in(0.0, 1.0), default=0.95,
                   help="INT8 --verify: least share of real test images with onnxruntime's top-1 class (default 0.95)")
    p.set_defaults(handler=_cmd_build_trt)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench.latency import bench, format_table
    report = bench(args.model, device=args.device, backends=args.backend, batches=args.batch,
                   warmup_ms=args.warmup, duration_s=args.duration, min_iters=args.iterations,
                   input_size=args.input_size, arch=args.arch, compare=args.compare, force=args.force,
                   providers=args.providers, threads=args.threads, rounds=args.rounds,
                   spread_warn=args.spread_warn, json_out=args.json, network=args.network, int8=args.int8,
                   calib=args.calib, data_root=args.data_root, calib_size=args.calib_size)
    print("device: {} ({}); torch {}, onnxruntime {}, TensorRT {}".format(
        report.device["name"], report.device["kind"], report.environment["torch"],
        report.environment["onnxruntime"], report.environment["tensorrt"]))
    print(format_table(report))
    print("harness overhead per iteration: {:.4f} ms".format(report.harness_overhead_ms))
    for warning in report.warnings:
        print("warning: " + warning)
    if args.json:
        print("wrote {}".format(args.json))
    return 0


def _csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _batches(text: str) -> List[int]:
    values = [_BATCH(t) for t in _csv(text)]
    if not values:
        raise argparse.ArgumentTypeError("expected comma-separated batch sizes, got {}".format(quote(text)))
    return values


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="latency/throughput of a checkpoint, ONNX file or TensorRT engine",
                       description="trtexec-like benchmark: warm-up, timed run with a minimum iteration count, "
                                   "min/mean/median/p90/p95/p99 latency, throughput, GPU compute time apart "
                                   "from host latency on a GPU.")
    p.add_argument("model", help="deploy or multi-branch checkpoint, .onnx file, or .engine")
    p.add_argument("--device", choices=("auto", "cpu", "gpu", "xavier", "orin", "a100", "h100"), default="auto",
                   help="device profile (gpu: any CUDA GPU); refuses when the machine is another one unless "
                        "--force (default auto)")
    p.add_argument("--force", action="store_true", help="bench even when the machine is not --device")
    p.add_argument("--backend", type=_csv, help="comma-separated: torch, cudagraph, ort, trt "
                                               "(default: what fits the model and device)")
    p.add_argument("--providers", type=_csv, help="onnxruntime providers: cpu, cuda, tensorrt, or all")
    p.add_argument("--batch", type=_batches, default=[1], help="comma-separated batch sizes (default 1)")
    p.add_argument("--input-size", type=_SIZE, help="spatial input size (default: the model's)")
    p.add_argument("--arch", help="architecture code for a multi-branch checkpoint")
    p.add_argument("--compare", action="store_true",
                   help="bench multi-branch, fused and plain backbone of the same shape and print the ratios "
                        "(a --model network: plain is that network without branches, BN folded)")
    p.add_argument("--int8", action="store_true",
                   help="also bench fused-int8: the fused model quantized to QDQ INT8 by onnxruntime on --calib "
                        "images (ort backend), with the ratio fused-int8/fused")
    p.add_argument("--calib", choices=_LazyChoices(".data", "DATASETS"), metavar="DATASET",
                   help="%(choices)s: calibration images of --int8 (training set, eval preprocessing)")
    p.add_argument("--data-root", help="dataset directory of --calib (default: the Debian package's Fashion-MNIST)")
    p.add_argument("--calib-size", type=_int_in(1, 1 << 20), default=512, help="calibration images (default 512)")
    p.add_argument("--warmup", type=_float_in(0.0, 3.6e6), default=200.0, help="warm-up time in ms (default 200)")
    p.add_argument("--duration", type=_float_in(0.0, 86400.0), default=3.0, help="timed run in seconds (default 3)")
    p.add_argument("--iterations", type=_int_in(1, 10 ** 7), default=10, help="minimum timed iterations (default 10)")
    p.add_argument("--rounds", type=_int_in(1, 1000), default=5,
                   help="split the run into rounds that interleave the models (fairer on a busy machine); "
                        "ratios report their per-round spread (default 5)")
    p.add_argument("--spread-warn", type=_float_in(0.0, 1e6), default=0.10,
                   help="flag a ratio whose per-round values spread wider than this, as (max - min) / median "
                        "(default 0.10)")
    p.add_argument("--threads", type=_int_in(1, 1024), help="CPU threads for torch and onnxruntime (default: theirs)")
    p.add_argument("--json", metavar="PATH", help="also write the full report as JSON")
    _add_checkpoint_model(p, dest="network")
    p.set_defaults(handler=_cmd_bench)


def _cmd_plot(args: argparse.Namespace) -> int:
    from .viz import plot
    report = plot(args.source, out_dir=args.output, points=args.points)
    for path in report.written:
        print("wrote {}".format(path))
    for reason in report.skipped:
        print("skipped {}".format(reason))
    return 0


def _add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="figures (PNG + data) of a search run, an arch.bin, accuracy vs latency",
                       description="Make every figure the inputs allow, each a PNG plus its data as JSON: from a "
                                   "search run directory the architecture code matrix, the alpha/beta heatmaps with "
                                   "the asymmetric-minus-dilated map and the fitness over rounds; from an arch.bin "
                                   "the matrix; with --points accuracy vs latency. Needs matplotlib ([viz] extra).")
    p.add_argument("source", nargs="?", metavar="RUN_DIR",
                   help="search run directory, or an architecture code file (arch.bin)")
    p.add_argument("-o", "--output", metavar="OUT_DIR", help="directory for the figures (default: RUN_DIR/figures, "
                                                               "or figures/ beside the file)")
    p.add_argument("--points", metavar="POINTS_JSON",
                   help='accuracy/latency points: [{"label", "latency_ms", "accuracy"}, ...] (docs/figures.md)')
    p.set_defaults(handler=_cmd_plot)


# One entry per subcommand; later subcommands (search, train, export, build-trt, bench) add theirs here.
COMMANDS: List[Callable[[argparse._SubParsersAction], None]] = [_add_demo, _add_fuse, _add_show, _add_search, _add_train, _add_eval]
COMMANDS += [_add_export, _add_quantize, _add_build_trt, _add_bench]
COMMANDS += [_add_plot]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="irep-deploy",
        description="Search, train, fuse and deploy re-parameterized CNNs (IREPS + DES).")
    parser.add_argument("--version", action="version", version="irep-deploy " + __version__)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in COMMANDS:
        add(sub)
    return parser


def _one_line(exc: BaseException, limit: int = 600) -> str:
    """The first line of an error message, cut to ``limit`` characters: errors are always one line."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def main(argv: Optional[List[str]] = None) -> int:
    """Exit codes (README "Exit codes"): 0 success, 1 bad input, 2 usage, 3 verification failed,
    130 Ctrl-C, 143 SIGTERM. Parsing is inside the try: Ctrl-C while torch imports is one line too."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    command = "irep-deploy"
    interrupted: List[bool] = []

    def on_sigint(signum: int, frame: Any) -> None:
        # remembered, because some libraries turn the KeyboardInterrupt into another error on its way up
        interrupted.append(True)
        raise KeyboardInterrupt

    previous = _set_sigint(on_sigint)
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # usage errors (2), --help/--version (0): a code, for in-process callers too
            return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
        command += " " + args.command
        return args.handler(args)
    except IrepError as exc:
        if debug:
            raise
        print("{}: error: {}".format(command, _one_line(exc)), file=sys.stderr)
        return exc.exit_code
    except Terminated:
        if debug:
            raise
        print("{}: terminated (SIGTERM); nothing half-written was left".format(command), file=sys.stderr)
        return Terminated.exit_code
    except BaseException:
        if not (interrupted or sys.exc_info()[0] is KeyboardInterrupt) or debug:
            raise
        print("{}: interrupted".format(command), file=sys.stderr)
        return 130
    finally:
        _set_sigint(previous)


def _set_sigint(handler: Any) -> Any:
    """Install ``handler`` for SIGINT (main thread only; elsewhere Python's default stays)."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, handler)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
