"""``irep-deploy``: argument parsing and printing only; the work is done by library functions."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Optional

from . import __version__
from .errors import IrepError

Handler = Callable[[argparse.Namespace], int]


def _cmd_fuse(args: argparse.Namespace) -> int:
    from .pipeline import fuse
    report = fuse(args.ckpt, args.arch, out=args.output, torchvision_out=args.torchvision,
                  batch=args.batch, input_size=args.input_size, tolerance=args.tolerance, seed=args.seed)
    print("fused {} branches: {:,} -> {:,} parameters".format(
        report.branches, report.params_multi_branch, report.params_fused))
    print("check on a random batch {}: max abs error {:.3g}, relative error {:.3g} (tolerance {:.0e})".format(
        "x".join(map(str, report.batch_shape)), report.max_abs_error, report.rel_error, args.tolerance))
    print("wrote {}".format(report.out))
    if report.torchvision_out:
        print("wrote {} (torchvision state dict)".format(report.torchvision_out))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from .arch import ArchCode
    print(ArchCode.load(args.arch).format_table())
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
    p.add_argument("--batch", type=int, default=2, help="batch size of the equivalence check (default 2)")
    p.add_argument("--input-size", type=int, help="spatial size of the check input (default: the model's)")
    p.add_argument("--tolerance", type=float, default=1e-5,
                   help="largest relative error accepted, max|a-b|/max|a| (default 1e-5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random check batch")
    p.set_defaults(handler=_cmd_fuse)


def _add_show(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="print an architecture code as a matrix with counts and budget")
    p.add_argument("arch", help="architecture code file (arch.bin)")
    p.set_defaults(handler=_cmd_show)


# One entry per subcommand; later subcommands (search, train, export, build-trt, bench) add theirs here.
COMMANDS: List[Callable[[argparse._SubParsersAction], None]] = [_add_fuse, _add_show]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irep-deploy",
        description="Search, train, fuse and deploy re-parameterized CNNs (IREPS + DES).")
    parser.add_argument("--version", action="version", version="irep-deploy " + __version__)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except IrepError as exc:
        if args.debug:
            raise
        print("irep-deploy {}: error: {}".format(args.command, exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("irep-deploy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
