"""Faults of the operating system (issue 21, item 6) and the CLI's own promises.

A full disk (a small tmpfs filled up), a file-size limit (RLIMIT_FSIZE), a read-only file system, a
name the kernel refuses; stdout closed by its reader (EPIPE: quiet, exit 141) or full (/dev/full);
flag conflicts (usage, exit 2); file names with a newline or ESC in error lines (escaped, one line).
The old output inside a full or read-only file system must survive byte for byte.
"""
from __future__ import annotations

import errno
import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

AREA = "oserr"
FAST_BENCH = "--backend torch --warmup 0 --duration 0.01 --iterations 1"
TRAIN = "--dataset digits --backbone resnet18_cifar --width 0.125 --epochs 1 --limit 64 --batch-size 32 --quiet"
SEARCH = "--preset cpu --dataset digits --quiet"


def _need_sklearn() -> None:
    if importlib.util.find_spec("sklearn") is None:
        raise _H.Skip("sklearn (the digits data set) is not installed in this lane")


def _need_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise _H.Skip("matplotlib (figures) is not installed in this lane")


def _fill(where: Path, room: int) -> None:
    """Fill the file system at ``where`` until it is full, then free ``room`` bytes."""
    filler = where / "filler"
    fd = os.open(str(filler), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    if room:
        size = filler.stat().st_size
        os.truncate(str(filler), max(0, size - room))


def _put(where: Path, f: dict, old: dict) -> None:
    """The old outputs ``old`` (name -> bytes, or the fixture to copy) under ``where``."""
    for rel, src in old.items():
        target = where / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):
            target.write_bytes(src)
        else:
            shutil.copyfile(str(f[src]), str(target))


def _stage(where: Path, f: dict, old: dict, room: int, readonly: bool) -> None:
    _put(where, f, old)
    if readonly:
        res = subprocess.run(["mount", "-o", "remount,ro", str(where)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, universal_newlines=True)
        if res.returncode != 0:
            raise _H.Skip("cannot remount the tmpfs read-only: " + res.stdout.strip()[:100])
    else:
        _fill(where, room)


def _mount(case: Path, name: str, old: dict, room: int = 0, readonly: bool = False, size: str = "2m",
           need=None):
    """A setup: a small tmpfs at ``case/name`` holding the old outputs ``old`` (name -> fixture to copy,
    or bytes), then filled up (leaving ``room`` bytes) or remounted read-only.

    Its teardown copies what the file system holds back onto the case directory after unmounting, so
    the runner compares the old outputs (and sees any leftover) after the case."""
    def setup(case_dir: Path, f: dict):
        if need is not None:
            need()
        where = case_dir / name
        unmount = _H.small_tmpfs(where, size)
        try:
            _stage(where, f, old, room, readonly)
        except BaseException:
            unmount()
            raise

        def teardown() -> None:
            keep = Path(tempfile.mkdtemp(prefix="oserr-"))
            try:
                shutil.copytree(str(where), str(keep / "t"), symlinks=True)
                unmount()
                shutil.rmtree(str(where), ignore_errors=True)
                shutil.copytree(str(keep / "t"), str(where), symlinks=True)
            finally:
                shutil.rmtree(str(keep), ignore_errors=True)
        return {}, teardown
    return setup


def _old(case: Path, old: dict, need=None):
    """A setup without a mount: the old outputs ``old`` in the case directory (for RLIMIT_FSIZE)."""
    def setup(case_dir: Path, f: dict):
        if need is not None:
            need()
        _put(case_dir, f, old)
        return {}, None
    return setup


def _odd_files(*names: str):
    """A setup creating files with odd names (newline, ESC, ...) in the case directory, holding junk."""
    def setup(case_dir: Path, f: dict):
        for name in names:
            (case_dir / name).write_bytes(b"not a checkpoint\n")
        return {}, None
    return setup


def _loop(case_dir: Path, f: dict):
    os.symlink("loop", str(case_dir / "loop"))
    return {}, None


_H = None  # the runner module, set by cases()


def cases(H):
    global _H
    _H = H
    C = H.H
    OLD_PT = b"the old deploy checkpoint\n"
    OLD_ONNX = b"the old ONNX file\n"
    OLD_JSON = b'{"old": true}\n'
    case = Path("{case}")
    out = []

    # -- a full disk: one line "PATH: cannot write: disk full", the old output byte-identical ---------
    full = "full disk (ENOSPC)"
    out += [
        C(AREA, full, "fuse {multi} {arch} -o {case}/full/out.pt", 1, "{case}/full/out.pt: cannot write: disk full",
          setup=_mount(case, "full", {"out.pt": OLD_PT})),
        C(AREA, full, "fuse {multi} {arch} -o {case}/full/out.pt", 1, "disk full",
          setup=_mount(case, "full", {"out.pt": OLD_PT}, room=16384), label="fuse, 16 KiB left"),
        C(AREA, full, "quantize {onnx28} --calib fashion-mnist --data-root {tiny_fmnist} --calib-size 32 -o {case}/full/q.onnx",
          1, "disk full", setup=_mount(case, "full", {"q.onnx": OLD_ONNX}, room=32768), label="quantize, 32 KiB left"),
        C(AREA, full, "export {deploy} -o {case}/full/out.onnx --simplify none", 1, "{case}/full/out.onnx: cannot write: disk full",
          setup=_mount(case, "full", {"out.onnx": OLD_ONNX})),
        C(AREA, full, "export {deploy} -o {case}/full/out.onnx --simplify none", 1, "disk full",
          setup=_mount(case, "full", {"out.onnx": OLD_ONNX}, room=8192), label="export, 8 KiB left"),
        C(AREA, full, "quantize {onnx28} --calib fashion-mnist --data-root {tiny_fmnist} --calib-size 32 -o {case}/full/q.onnx",
          1, "{case}/full/q.onnx: cannot write: disk full", setup=_mount(case, "full", {"q.onnx": "onnx28"})),
        C(AREA, full, "bench {deploy} " + FAST_BENCH + " --json {case}/full/b.json", 1,
          "{case}/full/b.json: cannot write: disk full", setup=_mount(case, "full", {"b.json": OLD_JSON})),
        C(AREA, full, "show {arch}", 0, "", setup=_mount(case, "full", {}), label="show on a full disk reads fine"),
        C(AREA, full, "plot {arch} -o {case}/full/fig", 1, "disk full",
          setup=_mount(case, "full", {"fig/arch_matrix.png": b"old figure\n"}, need=_need_matplotlib)),
        C(AREA, full, "train -o {case}/full/run " + TRAIN, 1, "disk full",
          setup=_mount(case, "full", {"keep.txt": b"other file\n"}, need=_need_sklearn)),
        C(AREA, full, "train -o {case}/full/run " + TRAIN, 1, "disk full",
          setup=_mount(case, "full", {"keep.txt": b"other file\n"}, room=6000, need=_need_sklearn),
          label="train, room for the settings only"),
        C(AREA, full, "search -o {case}/full/s " + SEARCH, 1, "disk full",
          setup=_mount(case, "full", {"keep.txt": b"other file\n"}, need=_need_sklearn)),
    ]

    # -- a file-size limit (ulimit -f): EFBIG, not death by SIGXFSZ -------------------------------------
    fsize = "file-size limit (EFBIG)"
    out += [
        C(AREA, fsize, "fuse {multi} {arch} -o {case}/out.pt", 1, "{case}/out.pt: cannot write: file too large",
          setup=_old(case, {"out.pt": OLD_PT}), process=True, fsize=20000),
        C(AREA, fsize, "export {deploy} -o {case}/out.onnx --simplify none", 1, "{case}/out.onnx: cannot write: file too large",
          setup=_old(case, {"out.onnx": OLD_ONNX}), process=True, fsize=20000),
        C(AREA, fsize, "bench {deploy} " + FAST_BENCH + " --json {case}/b.json", 1, "{case}/b.json: cannot write: file too large",
          setup=_old(case, {"b.json": OLD_JSON}), process=True, fsize=100),
        C(AREA, fsize, "train -o {case}/run " + TRAIN, 1, "file too large",
          setup=_old(case, {}, need=_need_sklearn), process=True, fsize=30000),
    ]

    # -- a read-only file system ------------------------------------------------------------------------
    ro = "read-only file system (EROFS)"
    out += [
        C(AREA, ro, "fuse {multi} {arch} -o {case}/ro/out.pt", 1, "{case}/ro is not writable (read-only file system)",
          setup=_mount(case, "ro", {"out.pt": OLD_PT}, readonly=True)),
        C(AREA, ro, "export {deploy} -o {case}/ro/out.onnx", 1, "{case}/ro",
          setup=_mount(case, "ro", {"out.onnx": OLD_ONNX}, readonly=True)),
        C(AREA, ro, "bench {deploy} " + FAST_BENCH + " --json {case}/ro/b.json", 1, "{case}/ro",
          setup=_mount(case, "ro", {"b.json": OLD_JSON}, readonly=True)),
        C(AREA, ro, "train -o {case}/ro/run " + TRAIN, 1, "{case}/ro/run: cannot create the run directory: read-only",
          setup=_mount(case, "ro", {}, readonly=True, need=_need_sklearn)),
    ]

    # -- names the kernel refuses -------------------------------------------------------------------------
    names = "path the kernel refuses"
    out += [
        C(AREA, names, "fuse {multi} {arch} -o {case}/" + "n" * 300 + ".pt", 1, "file name too long",
          label="fuse -o a 300-character name"),
        C(AREA, names, "fuse {case}/loop/multi.pt {arch}", 1, "{case}/loop", setup=_loop),
        C(AREA, names, "fuse {multi} {arch} -o {case}/loop/out.pt", 1, "{case}/loop", setup=_loop),
    ]

    # -- stdout closed by its reader (EPIPE: quiet, 141) or full (/dev/full: one line, 1) ---------------
    pipe = "stdout closed or full"
    out += [
        C(AREA, pipe, "show {arch}", 141, "", process=True, stdout="closed", quiet=True),
        C(AREA, pipe, "show {arch}", 1, "stdout: disk full", process=True, stdout="full"),
        C(AREA, pipe, "--help", 141, "", process=True, stdout="closed", quiet=True),
        C(AREA, pipe, "--help", 1, "stdout: disk full", process=True, stdout="full"),
        C(AREA, pipe, "--version", 141, "", process=True, stdout="closed", quiet=True),
        C(AREA, pipe, "fuse --help", 1, "stdout: disk full", process=True, stdout="full"),
        C(AREA, pipe, "fuse {multi} {arch} -o {case}/o.pt", 141, "", process=True, stdout="closed", quiet=True,
          own=("{case}/o.pt",)),
        C(AREA, pipe, "fuse {multi} {arch} -o {case}/o.pt", 1, "stdout: disk full", process=True, stdout="full",
          own=("{case}/o.pt",)),
        C(AREA, pipe, "export {deploy} -o {case}/o.onnx --simplify none", 141, "", process=True, stdout="closed",
          quiet=True, own=("{case}/o.onnx",)),
        C(AREA, pipe, "bench {deploy} " + FAST_BENCH, 141, "", process=True, stdout="closed", quiet=True),
        C(AREA, pipe, "bench {deploy} " + FAST_BENCH, 1, "stdout: disk full", process=True, stdout="full"),
    ]

    # -- flag conflicts: usage errors (2), refused before TensorRT or any work -------------------------
    usage = "flag conflict (usage, 2)"
    out += [
        C(AREA, usage, "build-trt {onnx} --int8 -o {case}/e.engine", 2, "--calib"),
        C(AREA, usage, "build-trt {onnx} --min-batch 8 --max-batch 2 -o {case}/e.engine", 2, "--min-batch 8"),
        C(AREA, usage, "build-trt {onnx} --opt-batch 16 --max-batch 4 -o {case}/e.engine", 2, "--max-batch 4"),
        C(AREA, usage, "build-trt {onnx} --calib fashion-mnist -o {case}/e.engine", 2, "--calib applies to --int8"),
        C(AREA, usage, "export {deploy} --opset 10 -o {case}/o.onnx", 2, "opset 10"),
        C(AREA, usage, "export {deploy} --opset 999 -o {case}/o.onnx", 2, "opset 999"),
        C(AREA, usage, "export {deploy} --input-name x --output-name x -o {case}/o.onnx", 2, "must differ"),
        C(AREA, usage, "train --resume {case}/run --epochs 5", 2, "--epochs"),
        C(AREA, usage, "search --resume {case}/run --rounds 3", 2, "--rounds"),
        C(AREA, usage, "train --dataset digits --backbone resnet18_cifar", 2, "-o RUN_DIR"),
        C(AREA, usage, "bench {deploy} --backend foo " + FAST_BENCH.replace("--backend torch ", ""), 2, "'foo'"),
        C(AREA, usage, "bench {onnx} --providers foo --warmup 0 --duration 0.01 --iterations 1", 2, "foo"),
        C(AREA, usage, "bench {deploy} --backend cudagraph --device cpu --warmup 0 --duration 0.01 --iterations 1",
          2, "cudagraph"),
        C(AREA, usage, "bench {deploy} --int8 " + FAST_BENCH.replace("--backend torch", "--backend ort"), 2, "--calib"),
        C(AREA, usage, "bench {deploy} --calib fashion-mnist " + FAST_BENCH, 2, "--calib applies to --int8"),
        C(AREA, usage, "train -o {case}/run --amp fp16 --device cpu " + TRAIN, 2, "--amp fp16",
          setup=lambda d, f: (_need_sklearn(), ({}, None))[1]),
        C(AREA, usage, "eval {onnx} --dataset digits --model torchvision:resnet18", 2, "--model"),
    ]

    # -- odd file names in error lines: escaped, one line, nothing raw reaches the terminal ------------
    odd = "control characters in names"
    HC = H.HCase
    out += [
        HC(AREA, odd, ("show", "{case}/a\nb.bin"), 1, "a\\nb.bin", setup=_odd_files("a\nb.bin"),
           label="show a file named a<LF>b.bin"),
        HC(AREA, odd, ("show", "{case}/\x1b[31mred.bin"), 1, "\\x1b[31mred.bin", label="show a missing ESC name"),
        HC(AREA, odd, ("fuse", "{case}/x\ny.pt", "{arch}"), 1, "x\\ny.pt", setup=_odd_files("x\ny.pt"),
           label="fuse a junk checkpoint named x<LF>y.pt"),
        HC(AREA, odd, ("fuse", "{multi}", "{arch}", "-o", "{case}/no\ndir/o.pt"), 1, "no\\ndir",
           setup=_odd_files("no\ndir"), label="fuse -o under a file named with a newline"),
        HC(AREA, odd, ("eval", "{case}/\x1b]0;owned\x07.pt", "--dataset", "digits"), 1, "\\x1b]0;owned\\x07",
           label="eval a missing OSC title-setting name"),
        HC(AREA, odd, ("export", "{case}/tab\there\u202e.pt"), 1, "tab\\there\\u202e.pt",
           setup=_odd_files("tab\there\u202e.pt"), label="export a name with TAB and RTL override"),
        HC(AREA, odd, ("show", "{case}/bad\udcffutf8.bin"), 1, "bad\\udcffutf8.bin",
           label="show a name that is not UTF-8"),
        HC(AREA, odd, ("fuse", "{multi}", "{arch}", "--device\n", "cpu"), 2, "--device\\n",
           label="an unknown flag with a newline"),
        HC(AREA, odd, ("show", "{case}/a\nb.bin"), 1, "a\\nb.bin", setup=_odd_files("a\nb.bin"), process=True,
           label="show a file named a<LF>b.bin (a real process)"),
    ]
    return out
