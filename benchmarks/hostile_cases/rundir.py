"""Run directories and the kinds of files (issue 21, items 3 and 4).

One writer per run directory (a second `train`/`search`/`demo`, new or resumed, is refused naming
the holder); a run writes through no link and over no file it did not write; outputs and inputs
must be regular files (a FIFO, a character device, a socket or a directory is refused before any
work, and a FIFO with no writer or /dev/zero never blocks or floods a reader).
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import socket
import stat
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

AREA = "rundir"
TRAIN = "--dataset digits --backbone resnet18_cifar --width 0.125 --batch-size 32 --limit 64 --device cpu --quiet"
LONG_TRAIN = TRAIN + " --epochs 100000"  # a first writer that is still running when the second starts
SEARCH = ("--dataset digits --backbone resnet18_cifar --width 0.125 --population 2 --subnets 1 --warmup-epochs 1 "
          "--round-epochs 1 --batch-size 32 --limit 64 --device cpu --quiet")
LONG_SEARCH = SEARCH + " --rounds 100000"
USER_ARCH = b"<the shared arch.bin with a comment, CRLF>"
BENCH = "--duration 0.01 --iterations 1 --rounds 1"


def cases(H):  # noqa: C901 - one table
    Setup = Callable[[Path, Dict[str, Path]], Tuple[Dict[str, Path], Optional[Callable[[], None]]]]

    def need_sklearn() -> None:
        if importlib.util.find_spec("sklearn") is None:
            raise H.Skip("needs scikit-learn's digits (not installed in this lane)")

    # -- special files, made in the case directory -------------------------------------------------
    def special(kind: str, name: str, key: str = "special") -> Setup:
        def setup(d: Path, f: Dict[str, Path]):
            p = d / name
            if kind == "fifo":
                os.mkfifo(str(p))
            elif kind == "chardev":  # a private /dev/null: the real one is never touched
                try:
                    os.mknod(str(p), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
                except (PermissionError, OSError) as exc:
                    raise H.Skip("cannot make a character device here: {}".format(exc))
            elif kind == "socket":
                if len(str(p)) > 100:
                    raise H.Skip("socket path too long for AF_UNIX")
                s = socket.socket(socket.AF_UNIX)
                s.bind(str(p))
                s.close()  # the socket file stays
            elif kind == "dir":
                p.mkdir()
            elif kind == "link-to-chardev":
                try:
                    os.mknod(str(d / "null"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
                except (PermissionError, OSError) as exc:
                    raise H.Skip("cannot make a character device here: {}".format(exc))
                os.symlink("null", str(p))
            return {key: p}, None
        return setup

    def out(cat: str, argv: str, kind: str, name: str, code: int = 1, text: str = "{special}",
            data: bool = False) -> object:
        """A case with one special file; ``data``: it is read after the data set (digits) is loaded."""
        make = special(kind, name)

        def setup(d: Path, f: Dict[str, Path]):
            if data:
                need_sklearn()
            return make(d, f)
        return H.H(AREA, cat, argv, code, text, setup=setup, label="{} ({} as {})".format(argv.split()[0], kind, name))

    # -- run directories ---------------------------------------------------------------------------
    def run_dir(files: Dict[str, object], sub: str = "run", holder: Optional[bytes] = None) -> Setup:
        """A run directory (dummy state: every refusal here comes before the state is read) with
        ``files``: bytes, ("link", target), ("fifo",), ("dir",); ``holder``: the lock is held (by
        this process, as another writer would) with this text in the lock file."""
        def setup(d: Path, f: Dict[str, Path]):
            run = d / sub
            run.mkdir(parents=True)
            outside = d / "outside.txt"
            outside.write_bytes(b'{"event": "epoch", "epoch": 1}\n')
            for name, content in files.items():
                p = run / name
                if isinstance(content, bytes):
                    p.write_bytes(content)
                elif content[0] == "link":
                    os.symlink(str(content[1]).format(outside=outside, case=d), str(p))
                elif content[0] == "fifo":
                    os.mkfifo(str(p))
                elif content[0] == "dir":
                    p.mkdir()
            if holder is None:
                return {"run": run, "outside": outside}, None
            fd = os.open(str(run / ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, holder)

            def release() -> None:
                os.close(fd)
            return {"run": run, "outside": outside}, release
        return setup

    def holder(command: str = "irep-deploy train", host: str = "otherhost", pid: object = 4242) -> bytes:
        return json.dumps({"pid": pid, "host": host, "command": command, "started": 1.7e9}).encode()

    state = {"state.pt": b"not read before the lock and the checks", "log.jsonl": b"", "arch.bin": b"x"}

    def with_(name: str, content: object) -> Dict[str, object]:
        return dict(state, **{name: content})

    def first_writer(argv: str, wait: str, then: Optional[str] = None) -> Setup:
        """A real first writer in the background (killed at teardown); ``then``: kill it as soon as
        ``wait`` exists and start ``then`` (a resume of the killed run) as the writer that holds it."""
        def setup(d: Path, f: Dict[str, Path]):
            need_sklearn()
            fx = dict(f, case=d)
            stop = H.start_cli(fx, *argv.split(), wait_for=Path(wait.format(case=d)))
            if then is None:
                return {}, stop
            stop()  # killed mid-run: resumable
            (d / "run" / ".lock").unlink()  # its lock died with it; wait for the resumer's own
            return {}, H.start_cli(fx, *then.split(), wait_for=d / "run" / ".lock")
        return setup

    def clean_dir(d: Path, f: Dict[str, Path]):
        need_sklearn()
        (d / "empty").mkdir()
        return {}, None

    def user_dir(files: Dict[str, bytes]) -> Setup:
        def setup(d: Path, f: Dict[str, Path]):
            (d / "mine").mkdir()
            for name, content in files.items():
                if content is USER_ARCH:  # the shared code, as a user edits it: a comment, CRLF
                    content = b"# my code, edited by hand\r\n" + f["arch"].read_bytes().replace(b"\n", b"\r\n")
                (d / "mine" / name).write_bytes(content)
            return {}, None
        return setup

    def figures_fifo(d: Path, f: Dict[str, Path]):
        if importlib.util.find_spec("matplotlib") is None:
            raise H.Skip("plot needs matplotlib (not installed in this lane)")
        (d / "figs").mkdir()
        os.mkfifo(str(d / "figs" / "accuracy_latency.png"))
        return {}, None

    def figures_dir_fifo(d: Path, f: Dict[str, Path]):
        if importlib.util.find_spec("matplotlib") is None:
            raise H.Skip("plot needs matplotlib (not installed in this lane)")
        os.mkfifo(str(d / "figs"))
        return {}, None

    user_arch = USER_ARCH
    cases: List[object] = []
    C = cases.append

    # -- two writers, one run directory (real processes) --------------------------------------------
    held = "{case}/run: in use by irep-deploy"
    C(H.H(AREA, "two writers", "train -o {case}/run " + TRAIN + " --epochs 1", 1, held + " train (pid",
          setup=first_writer("train -o {case}/run " + LONG_TRAIN, "{case}/run/.lock"), process=True,
          own=("{case}/run",), label="train -o run while another train -o run runs"))
    C(H.H(AREA, "two writers", "search -o {case}/run " + SEARCH + " --rounds 1", 1, held + " search (pid",
          setup=first_writer("search -o {case}/run " + LONG_SEARCH, "{case}/run/.lock"), process=True,
          own=("{case}/run",), label="search -o run while another search -o run runs"))
    C(H.H(AREA, "two writers", "train --resume {case}/run --device cpu --quiet", 1, held + " train (pid",
          setup=first_writer("train -o {case}/run " + LONG_TRAIN, "{case}/run/state.pt",
                             then="train --resume {case}/run --device cpu --quiet"),
          process=True, own=("{case}/run",), label="train --resume of a killed run while another resume runs"))
    C(H.H(AREA, "two writers", "search -o {case}/run " + SEARCH + " --rounds 1", 1, held + " train (pid",
          setup=first_writer("train -o {case}/run " + LONG_TRAIN, "{case}/run/.lock"), process=True,
          own=("{case}/run",), label="search -o run while a train -o run runs"))
    # the holder as a lock file names it (another process holds the flock)
    C(H.H(AREA, "lock held", "train --resume {run}", 1, "{run}: in use by irep-deploy train (pid 4242 on otherhost",
          setup=run_dir(state, holder=holder()), label="train --resume of a run another process holds"))
    C(H.H(AREA, "lock held", "search --resume {run}", 1, "{run}: in use by irep-deploy search (pid 4242",
          setup=run_dir(state, holder=holder("irep-deploy search")), label="search --resume of a held run"))
    C(H.H(AREA, "lock held", "train -o {run} " + TRAIN, 1, "{run}: in use by irep-deploy demo",
          setup=run_dir({}, holder=holder("irep-deploy demo")), label="train -o an empty dir a demo holds"))
    C(H.H(AREA, "lock held", "search -o {run} " + SEARCH, 1, "{run}: in use by another irep-deploy process",
          setup=run_dir({}, holder=b""), label="search -o a held dir whose holder wrote no name yet"))
    C(H.H(AREA, "lock held", "demo --quick -o {run} --quiet", 1,
          "{run}: in use by ?[2Jirep-deploy demo (pid 4242 on h?]0;x?,",
          setup=run_dir({}, holder=holder("\x1b[2Jirep-deploy demo", host="h\x1b]0;x\x07")),
          label="demo -o a held dir; the holder's name has terminal escapes"))
    C(H.H(AREA, "lock held", "train --resume {run}", 1, "{run}: in use by another irep-deploy process",
          setup=run_dir(state, holder=json.dumps({"pid": "x" * 5000}).encode()),
          label="train --resume: the lock file holds junk"))

    # -- links in a run directory: the target never changes -----------------------------------------
    link = ("link", "{outside}")
    for name, cmd in (("log.jsonl", "train"), ("state.pt", "train"), ("arch.bin", "train"),
                      ("config.json", "train"), ("log.jsonl", "search"), ("alpha_beta.jsonl", "search"),
                      ("population.json", "search"), ("tensorboard", "search"), ("ckpt.pt", "train")):
        C(H.H(AREA, "link in the run", cmd + " --resume {run}", 1, "{run}/" + name + ": is a symbolic link",
              setup=run_dir(with_(name, link)), label="{} --resume: {} links outside".format(
                  cmd, name)))
    C(H.H(AREA, "link in the run", "train --resume {run}", 1, "{run}/.lock: is a symbolic link",
          setup=run_dir(with_(".lock", link)), label="train --resume: the lock file links outside"))
    C(H.H(AREA, "link in the run", "search --resume {run}", 1, "{run}/.lock: is a symbolic link",
          setup=run_dir(with_(".lock", ("link", "{case}/nowhere"))),
          label="search --resume: the lock file is a dangling link"))
    C(H.H(AREA, "link in the run", "train --resume {run}", 1, "{run}/log.jsonl: is a FIFO",
          setup=run_dir(with_("log.jsonl", ("fifo",))), label="train --resume: log.jsonl is a FIFO"))
    C(H.H(AREA, "link in the run", "train --resume {run}", 1, "{run}/.lock: is a FIFO",
          setup=run_dir(with_(".lock", ("fifo",))), label="train --resume: the lock file is a FIFO"))

    # -- a run writes over nothing it did not write ------------------------------------------------
    C(H.H(AREA, "not its files", "train -o {case}/mine --arch {case}/mine/arch.bin " + TRAIN, 1,
          "{case}/mine: not empty (holds 'arch.bin')", setup=user_dir({"arch.bin": user_arch}),
          label="train -o DIR --arch DIR/arch.bin (CRLF, a comment)"))
    C(H.H(AREA, "not its files", "search -o {case}/mine " + SEARCH + " --rounds 1", 1, "{case}/mine: not empty",
          setup=user_dir({"arch.bin": user_arch, "population.json": b"{\"mine\": 1}\n", "notes.txt": b"n"}),
          label="search -o a directory holding the user's arch.bin and population.json"))
    C(H.H(AREA, "not its files", "train -o {case}/mine " + TRAIN, 1, "{case}/mine: not empty (holds 'notes.txt')",
          setup=user_dir({"notes.txt": b"mine"}), label="train -o a directory holding notes.txt"))
    C(H.H(AREA, "not its files", "demo --quick -o {case}/mine --quiet", 1, "{case}/mine: not empty",
          setup=user_dir({"report.md": b"# my report\n"}), label="demo -o a directory holding report.md"))
    C(H.H(AREA, "not its files", "train -o {run} " + TRAIN, 1, "{run}: not empty (holds 'log.jsonl')",
          setup=run_dir({"log.jsonl": link}), label="train -o a directory holding only a log.jsonl link"))
    C(H.H(AREA, "not its files", "train -o {case}/empty " + TRAIN + " --epochs 1", 0, "", setup=clean_dir,
          own=("{case}/empty",), label="train -o an existing empty directory (allowed)"))

    # -- outputs that are not regular files ---------------------------------------------------------
    fuse = "fuse {multi} {arch} -o {special}"
    for kind in ("fifo", "chardev", "socket", "link-to-chardev"):
        C(out("special output", fuse, kind, "out.pt", text="{special}: cannot write: it is a"))
    C(out("special output", "fuse {multi} {arch} -o {case}/o.pt --torchvision {special}", "fifo", "tv.pt"))
    C(out("special output", "export {deploy} -o {special}", "fifo", "out.onnx"))
    C(out("special output", "export {deploy} -o {special}", "chardev", "out.onnx"))
    C(out("special output", "quantize {onnx28} --calib fashion-mnist --data-root {tiny_fmnist} -o {special}",
          "fifo", "int8.onnx"))
    C(out("special output", "build-trt {onnx} -o {special}", "chardev", "out.engine"))
    C(out("special output", "bench {deploy} --json {special} " + BENCH, "fifo", "b.json"))
    C(out("special output", "bench {deploy} --json {special} " + BENCH, "socket", "b.json"))
    C(out("special output", "bench {deploy} --json {special} " + BENCH, "dir", "b.json"))
    C(H.H(AREA, "special output", "plot --points {points_clash} -o {case}/figs", 1,
          "{case}/figs/accuracy_latency.png: cannot write: it is a FIFO", setup=figures_fifo,
          label="plot -o a directory where one figure is a FIFO"))
    C(H.H(AREA, "special output", "plot --points {points_clash} -o {case}/figs", 1,
          "{case}/figs: cannot write figures: it is a FIFO, not a directory", setup=figures_dir_fifo,
          label="plot -o a FIFO where the figures directory belongs"))
    C(out("special output", "train -o {special} " + TRAIN, "fifo", "run"))
    C(out("special output", "search -o {special} " + SEARCH, "chardev", "run"))

    # -- inputs that are not regular files: refused unopened, no hang -------------------------------
    C(out("special input", "fuse {special} {arch} -o {case}/o.pt", "fifo", "multi.pt", text="{special}: is a FIFO"))
    C(out("special input", "fuse {multi} {special} -o {case}/o.pt", "fifo", "arch.bin", text="{special}: is a FIFO"))
    C(H.H(AREA, "special input", "fuse {multi} /dev/zero -o {case}/o.pt", 1, "/dev/zero: is a character device"))
    C(H.H(AREA, "special input", "export /dev/zero -o {case}/o.onnx", 1, "/dev/zero: is a character device"))
    C(out("special input", "export {special} -o {case}/o.onnx", "fifo", "deploy.pt", text="{special}: is a FIFO"))
    C(out("special input", "bench {special} " + BENCH, "fifo", "deploy.pt", text="{special}: is a FIFO"))
    C(out("special input", "bench {special} " + BENCH, "fifo", "model.onnx", text="{special}: is a FIFO"))
    C(out("special input", "eval {special} --dataset digits", "fifo", "deploy.pt", text="{special}: is a FIFO"))
    C(out("special input", "eval {special} --dataset digits", "chardev", "m.onnx", text="{special}: is a character"))
    C(out("special input", "quantize {special} --calib digits -o {case}/q.onnx", "fifo", "m.onnx",
          text="{special}: is a FIFO"))
    C(out("special input", "show {special}", "fifo", "arch.bin", text="{special}: is a FIFO"))
    C(out("special input", "show {special}", "socket", "arch.bin", text="{special}: is a socket"))
    C(out("special input", "train -o {case}/run --arch {special} " + TRAIN, "fifo", "arch.bin",
          text="{special}: is a FIFO"))
    C(out("special input", "train -o {case}/run --init-from {special} " + TRAIN, "fifo", "tv.pt",
          text="{special}: is a FIFO", data=True))
    C(out("special input", "train -o {case}/run --model torchvision:resnet18 --weights {special} --dataset digits "
          "--limit 64 --epochs 1 --quiet", "fifo", "w.pt", text="{special}: is a FIFO"))
    C(out("special input", "build-trt {special} -o {case}/o.engine", "fifo", "m.onnx", text="{special}: is a FIFO"))
    C(H.H(AREA, "special input", "train --resume {run}", 1, "{run}/state.pt: is a FIFO",
          setup=run_dir(with_("state.pt", ("fifo",))), label="train --resume: state.pt is a FIFO"))
    C(H.H(AREA, "special input", "search --resume {run}", 1, "{run}/state.pt: is a symbolic link",
          setup=run_dir(with_("state.pt", ("link", "/dev/zero"))),
          label="search --resume: state.pt links to /dev/zero"))
    return cases
