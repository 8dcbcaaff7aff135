"""``irep-deploy``: argument parsing and printing only; the work is done by library functions.

Flags are derived, not re-typed: a run's settings (``TrainConfig``, ``SearchConfig``) give one flag
per field from the field's metadata (:mod:`irep_deploy.options`), and every other flag takes its
``dest`` and default from the parameter of the library function it feeds (:func:`_flag`), so a
handler passes the parsed values on by name (:func:`_call`). One naming scheme: ``-o/--output`` is
what a command writes (file or directory), ``--quiet`` silences progress; the older spellings
``--run-dir``, ``--out`` and ``--no-progress`` still parse (hidden from --help). A command's flags
are built when it is parsed or its help is shown, so building the parser imports no torch.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import signal
import sys
import threading
from typing import Any, Callable, Dict, List, NoReturn, Optional

from . import __version__
from . import options as opt
from ._io import escaped_os_error, guarded_stdout, quiet_background_faults, silence_stdout
from .errors import (IrepError, StdoutError, Terminated, UsageError, forget_interrupts, interrupt_noted,
                     note_interrupt, note_terminate, printable, raise_if_interrupted, terminate_noted)

Handler = Callable[[argparse.Namespace], int]
Build = Callable[[argparse.ArgumentParser], None]


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line (no usage block): ``irep-deploy fuse: error: ...``.

    ``build`` adds a subcommand's arguments on first use (parsing it, or its help): the flags come
    from library modules that import torch, which ``irep-deploy --help`` and ``show`` need not."""

    def __init__(self, *args: Any, build: Optional[Build] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._build = build

    def built(self) -> "_Parser":
        if self._build is not None:
            build, self._build = self._build, None
            build(self)
        return self

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        return super(_Parser, self.built()).parse_known_args(args, namespace)

    def format_help(self) -> str:
        return super(_Parser, self.built()).format_help()

    def format_usage(self) -> str:
        return super(_Parser, self.built()).format_usage()

    def error(self, message: str) -> "NoReturn":  # type: ignore[override]
        self.exit(2, "{}: error: {} (see --help)\n".format(self.prog, printable(message.strip())))


# -- flags derived from the library -----------------------------------------------------------------
def _with_default(help: str, default: Any) -> str:
    """Help text followed by the library's default, unless it states its own."""
    if default in (None, ()) or isinstance(default, bool) or "(default" in help:
        return help
    return "{} (default {})".format(help, opt.format_default(default).replace("%", "%%"))


def _flag(p: argparse.ArgumentParser, func: Callable[..., Any], param: str, *flags: str, **kwargs: Any) -> None:
    """A flag feeding parameter ``param`` of the library function ``func``: its dest is the parameter's
    name and its default the parameter's default (a parameter without one takes ``default=``)."""
    default = inspect.signature(func).parameters[param].default
    if default is inspect.Parameter.empty:
        default = kwargs.pop("default", None)
    if kwargs.get("action") == "store_false":
        default = True if default is None else default
    kwargs["help"] = _with_default(kwargs.get("help", ""), default)
    if kwargs.get("action") == "append":
        default = None  # argparse appends to a copy of the default; unset (None) leaves the library's
    if flags:
        p.add_argument(*flags, dest=param, default=default, **kwargs)
    else:  # a positional argument: its name is its dest
        p.add_argument(param, **kwargs)


def _alias(p: argparse.ArgumentParser, dest: str, *flags: str, **kwargs: Any) -> None:
    """An older spelling of a flag: parses to the same dest, hidden from --help (README documents it)."""
    p.add_argument(*flags, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)


def setting_kwargs(field: "dataclasses.Field[Any]") -> Dict[str, Any]:
    """add_argument keywords of a settings field (:func:`irep_deploy.options.setting`)."""
    meta = field.metadata
    kwargs: Dict[str, Any] = {"help": _with_default(meta["help"], field.default), "metavar": meta["metavar"]}
    if isinstance(field.default, bool):
        kwargs = {"help": kwargs["help"], "action": "store_true"}
    else:
        kwargs.update((k, meta[k]) for k in ("type", "choices", "nargs") if meta[k] is not None)
        if meta["repeat"]:
            kwargs["action"] = "append"
    return kwargs


def _settings(p: argparse.ArgumentParser, config: type, title: str) -> None:
    """One flag per field of a settings dataclass; default None (unset: the library's default, or the
    preset's, or on resume the run's own)."""
    group = p.add_argument_group(title)
    for field in dataclasses.fields(config):
        first, *others = opt.flag_names(field)
        kwargs = setting_kwargs(field)
        # a setting with two spellings (--model/--backbone) takes one of them: giving both is a usage error
        either = group.add_mutually_exclusive_group() if others else group
        either.add_argument(first, dest=field.name, default=None, **kwargs)
        for other in others:
            either.add_argument(other, dest=field.name, default=None, **dict(kwargs, help="the same as " + first))


def _given(args: argparse.Namespace, config: type, *also: str) -> Dict[str, Any]:
    """The settings given on the command line; with --resume there may be none (nor the flags ``also``):
    a resumed run continues with its saved settings."""
    fields = [f for f in dataclasses.fields(config) if getattr(args, f.name) is not None]
    # --model may come with --resume: a run whose settings name a model spec needs the user to name it
    named = [opt.flag_names(f)[0] for f in fields if f.name != "backbone"] + list(also)
    if args.resume and named:
        raise UsageError("--resume continues with the run's saved settings; drop {}".format(named[0]))
    return {f.name: getattr(args, f.name) for f in fields}


def _resume_dir(args: argparse.Namespace) -> Optional[str]:
    """The run --resume continues, in place: an output directory beside it is a contradiction."""
    if args.resume and args.run_dir is not None:
        raise UsageError("--resume {} continues that run in place; drop -o {}".format(args.resume, args.run_dir))
    return args.resume


# Where/how options of train, search, eval and demo: not settings of a run, may change on resume.
_RUNTIME: Dict[str, Any] = {
    "data_root": (("--data-root",), dict(metavar="DIR", type=opt.directory, help="dataset directory (default: the Debian package's "
                                                             "for fashion-mnist)")),
    "device": (("--device",), dict(type=opt.device, help="auto, cpu, cuda or cuda:N (under torchrun: the local "
                                                         "rank's GPU)")),
    "workers": (("--workers",), dict(type=opt.int_in(0, 256), metavar="N", help="data loader processes")),
    "progress": (("--quiet",), dict(action="store_false", help="no progress bars or per-epoch lines")),
    "channels_last": (("--channels-last",), dict(action="store_true", help="NHWC memory format (GPU speed)")),
    "cuda_graph": (("--cuda-graph",), dict(choices=opt.CUDA_GRAPH_MODES, help=(
        "capture each training step (forward, backward, optimizer, LR schedule) as one CUDA graph and replay "
        "it per batch: auto where nothing refuses it (CPU, torchrun with several processes, --deterministic "
        "train eagerly), on (a refusal is an error), off (docs/training.md, 'CUDA graphs')"))),
    "search_step": (("--search-step",), dict(choices=opt.SEARCH_STEPS, help=(
        "how a search step trains its B subnets: eager (the active branches only, switched in Python), "
        "sequential or batched (every branch gated on the device: one fixed step that can be captured; batched "
        "runs the B subnets as one batch of B x N), auto (batched where the step is captured, else eager; "
        "docs/search.md, 'The training step on a GPU')"))),
}


def _runtime(p: argparse.ArgumentParser, func: Callable[..., Any], *names: str) -> None:
    group = p.add_argument_group("where and how (not settings of the run)")
    for name in names:
        flags, kwargs = _RUNTIME[name]
        _flag(group, func, name, *flags, **kwargs)  # type: ignore[arg-type]
        if name == "progress":
            _alias(group, "progress", "--no-progress", action="store_false")  # type: ignore[arg-type]


def _quiet(p: argparse.ArgumentParser, func: Callable[..., Any]) -> None:
    """--quiet of a command whose long steps show progress bars (on stderr: stdout keeps the results)."""
    _flag(p, func, "progress", "--quiet", action="store_false", help="no progress bars on stderr")


def _call(func: Callable[..., Any], args: argparse.Namespace, **given: Any) -> Any:
    """Call ``func`` with every parsed value named like one of its parameters; None means the library's
    default. ``given`` adds or replaces values."""
    params = inspect.signature(func).parameters
    values = {k: v for k, v in vars(args).items() if k in params and v is not None}
    values.update(given)
    return func(**values)


def _checkpoint_model(p: argparse.ArgumentParser, func: Callable[..., Any], param: str = "model") -> None:
    """fuse/export/bench/eval: name the network of a checkpoint that is not built in."""
    _flag(p, func, param, "--model", metavar="SPEC",
          help="the network of a checkpoint that is not built in (" + opt.SPEC_HELP + "), as it was trained "
               "with; required for such a checkpoint (a checkpoint never imports code)")


TRUST_PICKLE_HELP = (
    "also read old pickle-format .pt files (checkpoints and run states of earlier irep-deploy versions, "
    "torch.save state dicts such as torchvision's) on torch < 2.10. RISK: their unpickler can run code "
    "or corrupt memory there even with weights_only=True (CVE-2025-32434, CVE-2026-24747); use it only for "
    "files you trust, or better convert them once (irep-deploy convert). torch >= 2.10 reads them without it")


def _trust_pickle(p: argparse.ArgumentParser, func: Callable[..., Any]) -> None:
    _flag(p, func, "trust_pickle", "--trust-pickle", action="store_true", help=TRUST_PICKLE_HELP)


def _batches(text: str) -> List[int]:
    values = [opt.BATCH(t) for t in opt.csv(text)]
    if not values:
        raise argparse.ArgumentTypeError("expected comma-separated batch sizes, got {!r}".format(text))
    return values


# -- commands ---------------------------------------------------------------------------------------
def _cmd_fuse(args: argparse.Namespace) -> int:
    from .pipeline import fuse
    report = _call(fuse, args)
    print("fused {} branches: {:,} -> {:,} parameters".format(
        report.branches, report.params_multi_branch, report.params_fused))
    print("check on a random batch {}: max abs error {:.3g}, relative error {:.3g} (tolerance {:.0e})".format(
        "x".join(map(str, report.batch_shape)), report.max_abs_error, report.rel_error, args.tolerance))
    print("wrote {}".format(report.out))
    if report.torchvision_out:
        print("wrote {} (torchvision state dict)".format(report.torchvision_out))
    return 0


def _args_fuse(p: argparse.ArgumentParser) -> None:
    from .pipeline import fuse
    _flag(p, fuse, "ckpt", help="multi-branch checkpoint (from `irep-deploy train` or save_checkpoint)")
    _flag(p, fuse, "arch", help="architecture code file (arch.bin) the checkpoint was trained with")
    _flag(p, fuse, "out", "-o", "--output", metavar="PATH",
          help="deploy checkpoint to write (default: CKPT with .deploy before the suffix)")
    _flag(p, fuse, "torchvision_out", "--torchvision", metavar="PATH",
          help="also write a torchvision state dict (resnet18/34/50, vgg16 ImageNet layouts)")
    _flag(p, fuse, "batch", "--batch", type=opt.BATCH, help="batch size of the equivalence check")
    _flag(p, fuse, "input_size", "--input-size", type=opt.SIZE, help="spatial size of the check input (default: the model's)")
    _flag(p, fuse, "tolerance", "--tolerance", type=opt.TOLERANCE,
          help="largest relative error accepted, max|a-b|/max|a|")
    _flag(p, fuse, "seed", "--seed", type=opt.SEED, help="seed of the random check batch")
    _checkpoint_model(p, fuse)
    _trust_pickle(p, fuse)
    _quiet(p, fuse)


def _cmd_show(args: argparse.Namespace) -> int:
    from .search.answer import show
    print(_call(show, args))
    return 0


def _args_show(p: argparse.ArgumentParser) -> None:
    from .search.answer import show
    _flag(p, show, "path", metavar="ARCH", help="architecture code file (arch.bin), or a search run directory; "
                                                "for a search's code, also which code of the run it is and "
                                                "which code is the search's answer, and why")


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, run_demo
    _call(run_demo, args, settings=DemoSettings.quick() if args.quick else DemoSettings())
    return 0


def _args_demo(p: argparse.ArgumentParser) -> None:
    from .demo import run_demo
    _flag(p, run_demo, "out", "-o", "--output", default="demo-out", metavar="DIR", help="report directory (default demo-out)")
    _alias(p, "out", "--out")
    p.add_argument("--quick", action="store_true", help="a smoke run on sklearn digits (about a minute)")
    _flag(p, run_demo, "data_root", *_RUNTIME["data_root"][0], **_RUNTIME["data_root"][1])
    _flag(p, run_demo, "device", "--device", type=opt.device, help="cpu or cuda")
    _quiet(p, run_demo)


def _cmd_search(args: argparse.Namespace) -> int:
    from .search.des import SearchConfig, make_config, search
    given = _given(args, SearchConfig, *(["--preset"] if args.preset else []))
    resume = _resume_dir(args)
    config = None if resume else make_config(args.preset, **given)
    report = _call(search, args, run_dir=resume or args.run_dir or "runs/search", config=config, resume=bool(resume),
                   model=given.get("backbone") if resume else None)
    if report.main_process:
        print("best code: {} branches, fitness {:.2f}% (validation top-1, fused)".format(
            report.best.count(), report.best_fitness))
        print("wrote {}/arch.bin, best_seen_arch.bin, population.json, alpha_beta.jsonl, supernet.pt, log.jsonl".format(
            report.run_dir))
        print(report.answer())
    return 0


def _args_search(p: argparse.ArgumentParser) -> None:
    from .search.des import PRESETS, SearchConfig, make_config, search
    _flag(p, search, "run_dir", "-o", "--output", metavar="RUN_DIR", help="run directory to create (default runs/search)")
    _alias(p, "run_dir", "--run-dir")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the search saved in RUN_DIR (its settings are used)")
    p.add_argument("--preset", choices=tuple(PRESETS),
                   help="named settings: paper-cifar and paper-imagenet are the paper's CIFAR-10 ({} epochs) and "
                        "ImageNet ({} epochs) searches, `cpu` a real Fashion-MNIST search that takes minutes on 2 "
                        "cores (without one: the defaults below, the paper's CIFAR-10 settings on --dataset); "
                        "settings flags override it".format(*(make_config(name).total_epochs
                                                              for name in ("paper-cifar", "paper-imagenet"))))
    _settings(p, SearchConfig, "settings of the search (saved in the run; defaults without --preset)")
    _runtime(p, search, "data_root", "device", "workers", "progress", "cuda_graph", "search_step")
    _trust_pickle(p, search)


def _preset_text(values: Dict[str, Any]) -> str:
    """A preset's settings as its flags read: ``epochs 600, batch-size 96, ...`` (help text)."""
    return ", ".join("{} {}".format(k.replace("_", "-"), opt.format_default(v)) for k, v in values.items())


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, make_train_config, train
    given = _given(args, TrainConfig, *(["--preset"] if args.preset else []))
    model = None
    if _resume_dir(args):
        run, config, model = args.resume, None, given.get("backbone")
    else:
        if args.run_dir is None:
            raise UsageError("give a run directory (-o RUN_DIR) or --resume RUN_DIR")
        if "arch" in given:  # the flag names a file; the run stores the code's text
            from .train import arch_setting
            given["arch"], given["backbone"] = arch_setting(given["arch"], given.get("backbone"))
        run, config = args.run_dir, make_train_config(args.preset, **given)
    if args.baseline:
        from .baseline import BASELINE_FILE, train_with_baseline
        comparison = _call(train_with_baseline, args, run_dir=run, config=config, resume=bool(args.resume), model=model)
        print(comparison.table())
        print(comparison.summary())
        print("wrote {}/{}".format(run, BASELINE_FILE))
        return 0
    report = _call(train, args, run_dir=run, config=config, resume=bool(args.resume), model=model)
    if not report.main_process:  # ranks > 0 under torchrun: rank 0 reports
        return 0
    print("test top-1 {:.2f}% top-5 {:.2f}% ({}); {} {:.2f}% / {:.2f}% on {} examples "
          "(relative logit error {:.2g}, {} predictions differ)".format(
              report.multi_branch.top1, report.multi_branch.top5, "multi-branch" if report.branches else "as trained",
              "fused" if report.branches else "BN folded", report.fused.top1, report.fused.top5,
              report.multi_branch.examples, report.fused_rel_error, report.disagreements))
    print("wrote {}".format(report.ckpt))
    return 0


def _args_train(p: argparse.ArgumentParser) -> None:
    from .train import TRAIN_PRESETS, TrainConfig, train
    _flag(p, train, "run_dir", "-o", "--output", metavar="RUN_DIR", help="run directory to create")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with its saved settings")
    p.add_argument("--preset", choices=tuple(TRAIN_PRESETS),
                   help="the paper's retraining recipes ({}); settings flags override it (docs/training.md)".format(
                       "; ".join("{}: {}".format(name, _preset_text(values)) for name, values in TRAIN_PRESETS.items())))
    p.add_argument("--baseline", action="store_true",
                   help="also train the plain backbone (no branches) with the same settings into RUN_DIR/baseline "
                        "and report test top-1, training time and torch latency side by side (RUN_DIR/baseline.json)")
    _settings(p, TrainConfig, "settings of the run (saved in it; a resume uses them as saved)")
    _runtime(p, train, "data_root", "device", "workers", "progress", "channels_last", "cuda_graph")
    _trust_pickle(p, train)


def _cmd_eval(args: argparse.Namespace) -> int:
    if str(args.ckpt).lower().endswith(".onnx"):
        return _eval_onnx(args)
    if args.reference is not None:
        raise IrepError("--reference compares two ONNX files; {} is a checkpoint".format(args.ckpt))
    from .train import evaluate
    res = _call(evaluate, args)
    print("{} {} split: top-1 {:.2f}% top-5 {:.2f}% loss {:.4f} on {} examples".format(
        res.dataset, args.split, res.top1, res.top5, res.loss, res.examples))
    return 0


def _eval_onnx(args: argparse.Namespace) -> int:
    if args.model is not None:
        raise UsageError("{}: an ONNX file carries its network; drop --model {}".format(args.ckpt, args.model))
    if args.device not in ("auto", "cpu"):
        raise UsageError("{}: ONNX files are evaluated with onnxruntime on the CPU; drop --device {}".format(
            args.ckpt, args.device))
    if args.dataset is None:
        raise UsageError("{}: an ONNX file does not record its dataset; pass --dataset".format(args.ckpt))
    from .engines.onnx_eval import evaluate_onnx
    res = _call(evaluate_onnx, args, path=args.ckpt)
    print("{} {} split: top-1 {:.2f}% top-5 {:.2f}% loss {:.4f} on {} examples (onnxruntime CPU)".format(
        res.dataset, args.split, res.top1, res.top5, res.loss, res.examples))
    if res.reference is not None:
        print("reference {}: top-1 {:.2f}% top-5 {:.2f}%; {} of {} predictions differ ({:.2f}%)".format(
            res.reference, res.reference_top1, res.reference_top5, res.differ, res.examples,
            100.0 * res.differ / res.examples))
    return 0


def _args_eval(p: argparse.ArgumentParser) -> None:
    from .data import SPLITS
    from .train import TrainConfig, evaluate
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    _flag(p, evaluate, "ckpt", metavar="MODEL", help="checkpoint (ckpt.pt from train, a deploy checkpoint from "
                                                     "fuse) or an .onnx file (from export or quantize)")
    p.add_argument("--reference", metavar="ONNX",
                   help="another ONNX file (e.g. the FP32 model of an INT8 one): its scores and the number of "
                        "predictions that differ")
    _flag(p, evaluate, "split", "--split", choices=SPLITS, help="split")
    _flag(p, evaluate, "batch_size", "--batch-size", type=opt.GLOBAL_BATCH, help="batch size")
    # the data settings read as train's do (the val split needs train's --val-fraction/--split-seed)
    _flag(p, evaluate, "dataset", "--dataset", **dict(setting_kwargs(fields["dataset"]),
                                                       help="%(choices)s (default: the checkpoint's own)"))
    for name in ("val_fraction", "split_seed", "limit"):
        _flag(p, evaluate, name, *opt.flag_names(fields[name]), **dict(setting_kwargs(fields[name]),
                                                                      help=fields[name].metadata["help"]))
    _runtime(p, evaluate, "data_root", "device", "workers")
    _checkpoint_model(p, evaluate)
    _trust_pickle(p, evaluate)
    _quiet(p, evaluate)


def _cmd_quantize(args: argparse.Namespace) -> int:
    from .engines.quantize import quantize, weight_scales
    report = _call(quantize, args)
    print("quantized to INT8 (QDQ, symmetric, {} weights), {} calibration on {} {} training images".format(
        weight_scales(report.per_channel), report.method, report.calib_size, report.calib_dataset))
    if report.excluded:
        print("kept in float: {} node(s): {}".format(len(report.excluded), ", ".join(report.excluded)))
    print("graph: " + ", ".join("{} {}".format(n, op) for op, n in sorted(report.op_types.items())))
    print("INT8 vs FP32 on a calibration batch of {}: cosine {:.5f} (--min-cosine {}), top-1 agreement "
          "{:.1f}%".format(report.check_batch, report.cosine, args.min_cosine, 100.0 * report.agreement))
    print("wrote {} ({:,} bytes)".format(report.out, report.size_bytes))
    return 0


def _calib_flags(p: argparse.ArgumentParser, func: Callable[..., Any], help: str, **kwargs: Any) -> None:
    """--calib DATASET and --data-root of the commands that read real images (quantize, build-trt, bench)."""
    from .data import DATASETS
    _flag(p, func, "calib", "--calib", choices=DATASETS, metavar="DATASET", help="%(choices)s: " + help, **kwargs)
    _flag(p, func, "data_root", "--data-root", metavar="DIR", type=opt.directory,
          help="dataset directory of --calib (default: the Debian package's Fashion-MNIST)")


def _args_quantize(p: argparse.ArgumentParser) -> None:
    from .engines.quantize import METHODS, MIN_CALIB_IMAGES, quantize
    _flag(p, quantize, "model", metavar="ONNX", help="FP32 ONNX file (from export)")
    _flag(p, quantize, "out", "-o", "--output", metavar="PATH", help="INT8 ONNX file to write (default: ONNX with "
                                                                      ".int8.onnx)")
    _calib_flags(p, quantize, "calibration images come from its training split", required=True)
    _flag(p, quantize, "calib_size", "--calib-size", type=opt.int_in(MIN_CALIB_IMAGES, 10 ** 7),
          help="calibration images (at least {})".format(MIN_CALIB_IMAGES))
    _flag(p, quantize, "method", "--method", choices=METHODS, help="activation range calibration")
    weights = p.add_mutually_exclusive_group()
    _flag(weights, quantize, "per_channel", "--per-channel", action="store_true",
          help="one weight scale per output channel, on the output axis (the default)")
    _flag(weights, quantize, "per_channel", "--per-tensor", action="store_false", help="one weight scale per tensor")
    _flag(p, quantize, "exclude", "--exclude", action="append", metavar="PATTERN",
          help="keep the nodes whose name matches in float (fnmatch, e.g. '/fc/Gemm'; repeatable)")
    _flag(p, quantize, "min_cosine", "--min-cosine", type=opt.float_in(-1.0, 1.0),
          help="least cosine similarity of INT8 and FP32 logits on a calibration batch")
    _quiet(p, quantize)


def _cmd_export(args: argparse.Namespace) -> int:
    from .engines.onnx import export
    report = _call(export, args)
    if report.fused_here:
        print("fused the multi-branch checkpoint before export")
    several = len(report.outputs) > 1
    print("exported opset {}, input {} {} ({} batch), output{} {}, simplifier: {}".format(
        report.opset, report.input_name, "x".join(map(str, report.input_shape[1:])),
        "dynamic" if report.dynamic_batch else "fixed {}".format(report.input_shape[0]), "s" if several else "",
        ", ".join("{} {}".format(o.name, "x".join(map(str, o.shape[1:]))) for o in report.outputs),
        report.simplifier))
    print("graph: " + ", ".join("{} {}".format(n, op) for op, n in sorted(report.op_types.items())))
    for check in report.checks:
        print("onnxruntime vs torch at batch {}{}: max abs error {:.3g}, relative error {:.3g} (tolerance {:.0e})".format(
            check.batch, ", {} outputs, worst {}".format(len(report.outputs), check.worst) if several else "",
            check.max_abs_error, check.rel_error, report.tolerance))
    print("wrote {} ({:,} bytes)".format(report.out, report.size_bytes))
    return 0


def _args_export(p: argparse.ArgumentParser) -> None:
    from .engines.onnx import SIMPLIFIERS, export
    _flag(p, export, "ckpt", help="deploy checkpoint (from fuse) or multi-branch checkpoint")
    _flag(p, export, "arch", "--arch", metavar="ARCH_BIN", help="architecture code for a multi-branch checkpoint "
                                                                "(default: the one it was trained with; required "
                                                                "for a SuperNet)")
    _flag(p, export, "out", "-o", "--output", metavar="PATH", help="ONNX file to write (default: CKPT with suffix .onnx)")
    _flag(p, export, "opset", "--opset", type=opt.int_in(1, 1000), help="ONNX opset (the highest TensorRT 8.5 reads)")
    _flag(p, export, "input_size", "--input-size", type=opt.SIZE, help="spatial input size (default: the model's)")
    _flag(p, export, "batch", "--batch", type=opt.BATCH, help="fix the batch size (default: dynamic batch axis)")
    _flag(p, export, "simplify", "--simplify", choices=SIMPLIFIERS, metavar="NAME",
          help="%(choices)s: graph simplifier (auto: onnxslim, else onnxsim, else none)")
    _flag(p, export, "verify_batch", "--verify-batch", type=opt.int_in(2, opt.MAX_BATCH),
          help="batch >1 of the onnxruntime check")
    _flag(p, export, "tolerance", "--tolerance", type=opt.TOLERANCE,
          help="largest relative error onnxruntime vs torch, max|a-b|/max|a|")
    _flag(p, export, "seed", "--seed", type=opt.SEED, help="seed of the random check batches")
    _flag(p, export, "input_name", "--input-name", type=opt.name, help="name of the graph input")
    _flag(p, export, "output_name", "--output-name", type=opt.name,
          help="name of the graph output (default: logits); a model returning a tuple or list has outputs "
               "NAME0, NAME1, ... (default output0, output1, ...; nested lists flattened in order), a dict "
               "has its keys as names and takes no --output-name")
    _checkpoint_model(p, export)
    _trust_pickle(p, export)
    _quiet(p, export)


def _cmd_build_trt(args: argparse.Namespace) -> int:
    from .engines.tensorrt import build_engine
    report = _call(build_engine, args)
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


def _args_build_trt(p: argparse.ArgumentParser) -> None:
    from .engines.tensorrt import build_engine
    _flag(p, build_engine, "onnx_path", metavar="ONNX", help="ONNX file (from export)")
    _flag(p, build_engine, "out", "-o", "--output", metavar="PATH",
          help="engine to write (default: ONNX with suffix .engine)")
    _flag(p, build_engine, "fp16", "--fp16", action="store_true",
          help="FP16 engine (builder flag; on TensorRT 11 an FP16 graph); with --int8: FP16 fallback for layers "
               "without INT8 kernels")
    _flag(p, build_engine, "int8", "--int8", action="store_true",
          help="INT8 engine: from a QDQ ONNX as quantized (TensorRT 8.5-11), or from a float ONNX calibrated on "
               "--calib images (TensorRT 8.5/10 only)")
    _calib_flags(p, build_engine, "real images for INT8 calibration (training set) and --verify (test set), "
                                  "preprocessed as `eval` does")
    _flag(p, build_engine, "calib_size", "--calib-size", type=opt.int_in(1, 1 << 20),
          help="calibration images (whole batches of min(max batch, 32))")
    _flag(p, build_engine, "calib_cache", "--calib-cache", metavar="PATH",
          help="calibration table: used instead of calibrating when the file exists, written after the build")
    _flag(p, build_engine, "workspace_mb", "--workspace", type=opt.int_in(1, 1 << 24), metavar="MIB",
          help="workspace memory pool limit in MiB")
    _flag(p, build_engine, "min_batch", "--min-batch", type=opt.BATCH, help="smallest batch of the profile (default 1)")
    _flag(p, build_engine, "opt_batch", "--opt-batch", type=opt.BATCH, help="batch TensorRT tunes for (default: min batch)")
    _flag(p, build_engine, "max_batch", "--max-batch", type=opt.BATCH,
          help="largest batch of the profile (default: 32, at least the opt batch)")
    _flag(p, build_engine, "timing_cache", "--timing-cache", metavar="PATH",
          help="timing cache file, read if present and written back")
    _flag(p, build_engine, "dla_core", "--dla-core", type=opt.int_in(0, 15),
          help="run on this DLA core with GPU fallback (Jetson; needs --fp16)")
    _flag(p, build_engine, "verify", "--verify", action="store_true", help="compare the engine with onnxruntime before writing")
    _flag(p, build_engine, "tolerance", "--tolerance", type=opt.TOLERANCE, help="FP32 relative error limit of --verify")
    _flag(p, build_engine, "min_cosine", "--min-cosine", type=opt.float_in(-1.0, 1.0),
          help="cosine-similarity limit of --verify: FP16 (default 0.999), INT8 (default 0.99)")
    _flag(p, build_engine, "min_agreement", "--min-agreement", type=opt.float_in(0.0, 1.0),
          help="INT8 --verify: least share of real test images with onnxruntime's top-1 class")
    _quiet(p, build_engine)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench.latency import bench, format_table
    report = _call(bench, args)
    print("device: {} ({}); torch {}, onnxruntime {}, TensorRT {}".format(
        report.device["name"], report.device["kind"], report.environment["torch"],
        report.environment["onnxruntime"], report.environment["tensorrt"]))
    print(format_table(report))
    print("harness overhead per iteration: {:.4f} ms".format(report.harness_overhead_ms))
    for warning in report.warnings:
        print("warning: " + warning)
    if args.json_out:
        print("wrote {}".format(args.json_out))
    return 0


def _args_bench(p: argparse.ArgumentParser) -> None:
    from .bench.devices import PROFILES
    from .bench.latency import bench
    _flag(p, bench, "model", help="deploy or multi-branch checkpoint, .onnx file, or .engine")
    _flag(p, bench, "device", "--device", choices=PROFILES,
          help="device profile (gpu: any CUDA GPU); refuses when the machine is another one unless --force")
    _flag(p, bench, "force", "--force", action="store_true", help="bench even when the machine is not --device")
    _flag(p, bench, "backends", "--backend", type=opt.csv, metavar="LIST",
          help="comma-separated: torch, cudagraph, ort, trt (default: what fits the model and device)")
    _flag(p, bench, "providers", "--providers", type=opt.csv, metavar="LIST", help="onnxruntime providers: cpu, cuda, tensorrt, or all")
    _flag(p, bench, "batches", "--batch", type=_batches, metavar="LIST", help="comma-separated batch sizes")
    _flag(p, bench, "input_size", "--input-size", type=opt.SIZE, help="spatial input size (default: the model's)")
    _flag(p, bench, "arch", "--arch", metavar="ARCH_BIN", help="architecture code for a multi-branch checkpoint")
    _flag(p, bench, "compare", "--compare", action="store_true",
          help="bench multi-branch, fused and plain backbone of the same shape and print the ratios (a --model "
               "network: plain is that network without branches, BN folded)")
    _flag(p, bench, "int8", "--int8", action="store_true",
          help="also bench fused-int8: the fused model quantized to QDQ INT8 by onnxruntime on --calib images "
               "(ort backend), with the ratio fused-int8/fused")
    _calib_flags(p, bench, "calibration images of --int8 (training set, eval preprocessing)")
    _flag(p, bench, "calib_size", "--calib-size", type=opt.int_in(1, 1 << 20), help="calibration images")
    _flag(p, bench, "warmup_ms", "--warmup", type=opt.float_in(0.0, 3.6e6), metavar="MS", help="warm-up time in ms")
    _flag(p, bench, "duration_s", "--duration", type=opt.float_in(0.0, 86400.0), metavar="S",
          help="timed run in seconds")
    _flag(p, bench, "min_iters", "--iterations", type=opt.int_in(1, 10 ** 7), metavar="N",
          help="minimum timed iterations")
    _flag(p, bench, "rounds", "--rounds", type=opt.int_in(1, 1000),
          help="split the run into rounds that interleave the models (fairer on a busy machine); ratios report "
               "their per-round spread")
    _flag(p, bench, "spread_warn", "--spread-warn", type=opt.float_in(0.0, 1e6),
          help="flag a ratio whose per-round values spread wider than this, as (max - min) / median")
    _flag(p, bench, "threads", "--threads", type=opt.int_in(1, 1024),
          help="CPU threads for torch and onnxruntime (default: theirs)")
    _flag(p, bench, "json_out", "--json", metavar="PATH", help="also write the full report as JSON")
    _checkpoint_model(p, bench, "network")
    _trust_pickle(p, bench)
    _quiet(p, bench)


def _cmd_plot(args: argparse.Namespace) -> int:
    from .viz import plot
    report = _call(plot, args)
    for path in report.written:
        print("wrote {}".format(path))
    for reason in report.skipped:
        print("skipped {}".format(reason))
    return 0


def _args_plot(p: argparse.ArgumentParser) -> None:
    from .viz import plot
    _flag(p, plot, "source", nargs="?", metavar="RUN_DIR",
          help="search run directory, or an architecture code file (arch.bin)")
    _flag(p, plot, "out_dir", "-o", "--output", metavar="OUT_DIR",
          help="directory for the figures (default: RUN_DIR/figures, or figures/ beside the file)")
    _flag(p, plot, "points", "--points", metavar="POINTS_JSON",
          help='accuracy/latency points: [{"label", "latency_ms", "accuracy"}, ...] (docs/figures.md)')


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert
    report = _call(convert, args)
    print("converted the {} {} ({} tensors) to the safetensors format, sha256 {}".format(
        report.kind, report.src, report.tensors, report.sha256))
    print("wrote {}".format(report.out))
    return 0


def _args_convert(p: argparse.ArgumentParser) -> None:
    from .convert import convert
    _flag(p, convert, "src", metavar="OLD", help="old torch.save file: a checkpoint, a run's state.pt, or a state dict")
    _flag(p, convert, "out", "-o", "--output", metavar="NEW", required=True,
          help="safetensors file to write (any name: the format is recognized by content)")
    _trust_pickle(p, convert)


# name, handler, flags, help, description
COMMANDS: List[Any] = [
    ("demo", _cmd_demo, _args_demo, "the whole pipeline on Fashion-MNIST on CPU, with a report (make demo)",
     "search -> train -> fuse -> export -> quantize (INT8) -> eval and bench of the FP32 and INT8 ONNX -> "
     "build-trt (when TensorRT and a GPU are present) -> bench, then report.md, report.json and figures in "
     "--output. Its measured time on 2 CPU cores: README, \"Quick start\"."),
    ("fuse", _cmd_fuse, _args_fuse, "fuse a multi-branch checkpoint into a plain deploy checkpoint",
     "Load a multi-branch checkpoint, apply the architecture code, fuse every block into one 3x3 conv, check "
     "the fused output against the multi-branch output on a random batch, and write the deploy checkpoint."),
    ("show", _cmd_show, _args_show, "print an architecture code as a matrix with counts and budget",
     "Print an architecture code as a matrix with counts and budget. Given a search run directory (or a code in "
     "one), also say which code is the search's answer (arch.bin, the final round's best) and why, and where the "
     "best-scoring code of any round is (best_seen_arch.bin)."),
    ("search", _cmd_search, _args_search, "run the DES search for an architecture code (resumable, torchrun-ready)",
     "Directional evolutionary search (Algorithm 1) over the IREPS space. Writes arch.bin (the answer: the final "
     "round's best code), best_seen_arch.bin (the best-scoring code of any round), population.json, alpha_beta.jsonl, supernet.pt, log.jsonl and TensorBoard scalars into the run directory; "
     "state.pt after every epoch."),
    ("train", _cmd_train, _args_train, "train a multi-branch network from an architecture code (resumable)",
     "Train the multi-branch network of an architecture code (or a plain backbone), write RUN_DIR/ckpt.pt for "
     "`irep-deploy fuse`, and report the test accuracy of the multi-branch and the fused model. Runs under "
     "torchrun with DDP."),
    ("eval", _cmd_eval, _args_eval, "top-1/top-5 accuracy of a checkpoint or ONNX file on a dataset split",
     "Evaluate a multi-branch or deploy checkpoint, or an ONNX file (FP32 or INT8, onnxruntime on the CPU), on a "
     "split of a dataset. With --reference, an ONNX file is compared with another one: how many predicted "
     "classes differ."),
    ("export", _cmd_export, _args_export, "export a deploy checkpoint to ONNX, verified with onnxruntime",
     "Export a fused (deploy) checkpoint, or a multi-branch checkpoint which is fused first, to ONNX with the "
     "legacy exporter; simplify, run onnx.checker, and compare onnxruntime with torch at batch 1 and >1 before "
     "writing."),
    ("quantize", _cmd_quantize, _args_quantize, "INT8 QDQ ONNX for TensorRT, calibrated on real images (onnxruntime)",
     "Post-training INT8 quantization of an FP32 ONNX file with onnxruntime: QuantizeLinear/DequantizeLinear "
     "pairs, symmetric INT8 activations and weights (what TensorRT's explicit quantization builds), calibrated "
     "on training images of --calib through eval's preprocessing; checked against the FP32 model before "
     "writing; the settings go into the file's metadata."),
    ("build-trt", _cmd_build_trt, _args_build_trt, "build a TensorRT engine (+ JSON metadata) from an ONNX file",
     "Build a TensorRT engine (TensorRT 8.5 to 11) with a batch optimisation profile; writes ENGINE and "
     "ENGINE.json. Needs TensorRT and a CUDA GPU."),
    ("bench", _cmd_bench, _args_bench, "latency/throughput of a checkpoint, ONNX file or TensorRT engine",
     "trtexec-like benchmark: warm-up, timed run with a minimum iteration count, min/mean/median/p90/p95/p99 "
     "latency, throughput, GPU compute time apart from host latency on a GPU."),
    ("convert", _cmd_convert, _args_convert, "rewrite an old pickle .pt file (checkpoint, state, state dict) as "
                                             "safetensors",
     "Read an old torch.save file (an irep-deploy checkpoint or run state of an earlier version, or a plain state "
     "dict such as torchvision's) and write the same content in the safetensors format, which is read without "
     "pickle on any torch. Reading the old file needs torch >= 2.10 or --trust-pickle."),
    ("plot", _cmd_plot, _args_plot, "figures (PNG + data) of a search run, an arch.bin, accuracy vs latency",
     "Make every figure the inputs allow, each a PNG plus its data as JSON: from a search run directory the "
     "architecture code matrix, the alpha/beta heatmaps with the asymmetric-minus-dilated map and the fitness "
     "over rounds; from an arch.bin the matrix; with --points accuracy vs latency. Needs matplotlib ([viz] "
     "extra)."),
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="irep-deploy",
        description="Search, train, fuse and deploy re-parameterized CNNs (IREPS + DES).")
    parser.add_argument("--version", action="version", version="irep-deploy " + __version__)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, handler, build, help, description in COMMANDS:
        p = sub.add_parser(name, help=help, description=description, build=build)
        p.set_defaults(handler=handler)
    return parser


def subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of one command with its flags built (for tests and documentation tools)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name].built()  # type: ignore[attr-defined]


def _one_line(exc: BaseException, limit: int = 600) -> str:
    """An error message as one line of at most ``limit`` characters: a newline or ESC (from a file
    name) is shown escaped, never cut at nor sent to the terminal."""
    text = printable(str(exc).strip()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


# Exit status when stdout's reader is gone: what a shell reports for a tool killed by SIGPIPE.
BROKEN_PIPE_EXIT = 141


def main(argv: Optional[List[str]] = None) -> int:
    """Exit codes (README "Exit codes"): 0 success, 1 bad input, 2 usage, 3 verification failed,
    4 not available on this machine (a package, a GPU, a device profile), 130 Ctrl-C, 141 stdout closed by its reader, 143 SIGTERM. Parsing is inside the try: Ctrl-C while
    torch imports is one line too."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    command = ["irep-deploy"]

    def on_sigint(signum: int, frame: Any) -> None:
        # remembered, because some libraries turn the KeyboardInterrupt into another error on its way up
        note_interrupt()
        raise KeyboardInterrupt

    def on_sigterm(signum: int, frame: Any) -> None:
        note_terminate()
        raise Terminated("terminated (SIGTERM)")

    handlers = {signal.SIGINT: on_sigint, signal.SIGTERM: on_sigterm}
    if hasattr(signal, "SIGXFSZ"):  # a write beyond the file-size limit (ulimit -f) then fails with
        handlers[signal.SIGXFSZ] = signal.SIG_IGN  # EFBIG, reported, instead of killing the process
    previous = {signum: _set_signal(signum, handler) for signum, handler in handlers.items()}
    try:
        with guarded_stdout(), quiet_background_faults():
            try:
                code = _run(argv, command)
                sys.stdout.flush()  # a closed pipe or a full device shows here, not at exit
                return code
            except BaseException as exc:
                if debug:
                    raise
                return _report(exc, " ".join(command))
    finally:
        for signum, handler in previous.items():
            _set_signal(signum, handler)
        forget_interrupts()


def _run(argv: Optional[List[str]], command: List[str]) -> int:
    try:
        # numpy before torch: torch's C initialisation imports it and swallows any error of that
        # import, a KeyboardInterrupt included (seen on torch 2.0: Ctrl-C ignored, the work ran on)
        import numpy  # noqa: F401
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage errors (2), --help/--version (0): a code, for in-process callers too
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    raise_if_interrupted()  # an interrupt some library swallowed while the parser imported it
    command.append(args.command)
    return args.handler(args)


def _report(exc: BaseException, command: str) -> int:
    """The one line and the exit code of a command that failed; anything else is a bug and raises."""
    # after a SIGTERM or Ctrl-C any error is that signal, however a library dressed it
    if terminate_noted() or isinstance(exc, Terminated):
        print("{}: terminated (SIGTERM)".format(command), file=sys.stderr)
        return Terminated.exit_code
    if interrupt_noted() or isinstance(exc, KeyboardInterrupt):
        return _interrupted(command)
    if isinstance(exc, StdoutError):
        silence_stdout()
        if exc.broken_pipe:  # the reader has all it wanted (`| head`): quiet, as Unix tools are
            return BROKEN_PIPE_EXIT
    elif not isinstance(exc, IrepError):
        translated = escaped_os_error(exc)  # an OS error no reader or writer translated
        if translated is None:
            raise exc
        exc = translated
    print("{}: error: {}".format(command, _one_line(exc)), file=sys.stderr)
    return exc.exit_code  # type: ignore[attr-defined]


def _interrupted(command: str) -> int:
    """One line and 130, under ``python -m irep_deploy`` too.

    When Ctrl-C lands in code run from a string (``exec`` of source text: dataclasses and torch build
    functions that way while torch imports), CPython records an unhandled KeyboardInterrupt even though
    we catch it, and on the ``-m`` path kills the process with SIGINT at exit whatever ``sys.exit`` said
    (CPython 3.8 to 3.13). Every string ``exec`` clears that record first; an empty one clears it."""
    print("{}: interrupted".format(command), file=sys.stderr)
    exec("")
    return 130


def _set_signal(signum: int, handler: Any) -> Any:
    """Install ``handler`` for ``signum`` (main thread only; elsewhere Python's default stays)."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signum, handler)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
