"""The second bad-input table: faults of the environment, hostile files, two writers at once (issue 21).

Where ``bad_input.py`` feeds each subcommand bad files and flags, this table tries what a faulty
machine or a hostile file does: a full disk, a file-size limit, a closed pipe, a FIFO or a device
where a file belongs, a symlink out of a run directory, a pickle payload, a file that names a Python
module, a corrupt data set, a second writer in the same run directory.

Every case must end with the promised outcome: the documented exit code, one line on stderr naming
the file or flag (or nothing at all, where a case says so), no traceback, the sha256 of every file
that existed before unchanged (special files by their kind), no leftover file, and no module named
by a file imported (the module ``evilmod`` on the import path writes a marker file when imported).

The cases live in ``hostile_cases/*.py``, one file per area; each defines ``cases(H)`` returning a
list of :class:`HCase` (``H`` is this module). A case runs in-process through
``irep_deploy.cli.main`` unless it needs a real process (``process=True``: signals, pipes,
concurrency, resource limits that must not touch the test runner).

    python benchmarks/hostile.py                 # writes results/hostile.md
    python benchmarks/hostile.py --only data     # the cases of one area file

tests/test_hostile.py runs the same table, one test per case.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
CASE_SECONDS = 60  # a case still running after this is a hang
MAX_LINE = 400
# (counted without the fixture directory's path: it is the test machine's, not quoted input, and
# pytest-xdist's worker directories lengthen it)
EVIL_MODULE = "evilmod"  # a module a hostile file names; importing it writes MARKER
MARKER = "IMPORTED-BY-A-FILE"

Fixtures = Dict[str, Path]
# setup(case_dir, fixtures) -> extra fixture names (formatted into argv like the shared ones) and an
# optional teardown (a background writer to stop, a mount to remove)
Setup = Callable[[Path, Fixtures], Tuple[Fixtures, Optional[Callable[[], None]]]]


class Skip(Exception):
    """Raised by a setup when this machine cannot stage the case (no root for a tmpfs, ...)."""


@dataclass(frozen=True)
class HCase:
    area: str  # the hostile_cases file it comes from
    category: str  # one kind of fault ("full disk", "symlink out of the run", ...)
    argv: Tuple[str, ...]  # "{name}" is replaced by the path of fixture ``name``
    code: int  # expected exit code (README "Exit codes")
    names: str  # text the one stderr line must contain; "" with ``quiet``: stderr must be empty
    setup: Optional[Setup] = None
    process: bool = False  # run as a real `python -m irep_deploy` process
    quiet: bool = False  # stderr must be empty (EPIPE on stdout)
    fsize: Optional[int] = None  # RLIMIT_FSIZE in bytes (process cases)
    stdout: str = "pipe"  # process cases: "pipe", "closed" (reader gone: EPIPE) or "full" (/dev/full)
    own: Tuple[str, ...] = ()  # paths (argv-formatted) the case's own processes may create or change
    label: str = ""  # shown instead of argv in ids (for argv too long or too alike)

    @property
    def id(self) -> str:
        return "{}: {}".format(self.area, self.label or " ".join(self.argv))[:110]


def H(area: str, category: str, argv: str, code: int, names: str, **kwargs: object) -> HCase:
    return HCase(area, category, tuple(argv.split()), code, names, **kwargs)  # type: ignore[arg-type]


def all_cases(only: Sequence[str] = ()) -> List[HCase]:
    cases: List[HCase] = []
    module = sys.modules.get("hostile") or sys.modules[__name__]
    for path in sorted((HERE / "hostile_cases").glob("*.py")):
        if path.stem.startswith("_") or (only and path.stem not in only):
            continue
        spec = importlib.util.spec_from_file_location("hostile_cases_" + path.stem, str(path))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        cases.extend(mod.cases(module))  # type: ignore[attr-defined]
    return cases


# -- fixtures: the first table's (real checkpoints, codes, ONNX, a tiny Fashion-MNIST) plus evilmod ---
def make_fixtures(d: Path) -> Fixtures:
    bad_input = _bad_input()
    f = bad_input.make_fixtures(d)
    evil = d / "evil"
    evil.mkdir()
    (evil / (EVIL_MODULE + ".py")).write_text(
        "import os\nopen(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', {!r}), 'w').close()\n"
        "def factory(*a, **k):\n    raise SystemExit('evilmod.factory ran')\n".format(MARKER))
    f["evil"] = evil
    return f


def _bad_input():
    if "bad_input" in sys.modules:
        return sys.modules["bad_input"]
    spec = importlib.util.spec_from_file_location("bad_input", str(HERE / "bad_input.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bad_input"] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def snapshot(d: Path) -> Dict[str, str]:
    return _bad_input().snapshot(d)


@dataclass
class Outcome:
    case: HCase
    rc: Optional[int]
    stderr: str
    problems: List[str] = field(default_factory=list)
    skipped: str = ""

    @property
    def verdict(self) -> str:
        if self.skipped:
            return "skipped"
        for kind in ("hang", "import", "input destroyed", "traceback", "wrong success", "leftover",
                     "not one line", "does not name it", "wrong exit code"):
            if kind in self.problems:
                return kind
        return "one-line error" if self.case.code else "clean"


KINDS = ["one-line error", "clean", "skipped", "hang", "import", "input destroyed", "traceback", "wrong success",
         "leftover", "not one line", "does not name it", "wrong exit code"]


def _expand(text: str, f: Fixtures) -> str:
    return text.format(**{k: str(v) for k, v in f.items()})


def run_case(case: HCase, f: Fixtures, work: Path) -> Outcome:
    """Stage the case in its own directory under ``work`` (beside the shared fixtures), run it, judge it."""
    case_dir = work / "case"
    if case_dir.exists():
        shutil.rmtree(str(case_dir), ignore_errors=True)
    case_dir.mkdir()
    teardown = None
    try:
        try:
            extra, teardown = case.setup(case_dir, f) if case.setup else ({}, None)
        except Skip as exc:
            return Outcome(case, None, "", skipped=str(exc) or "cannot be staged here")
        fx = dict(f, case=case_dir, **extra)
        base = snapshot(f["dir"])
        argv = [_expand(a, fx) for a in case.argv]
        if case.process:
            rc, text, hung = _run_process(case, argv, fx)
            tb = "Traceback" in text
        else:
            rc, text, hung, tb = _run_inprocess(argv, fx)
    finally:
        if teardown is not None:
            teardown()
    after = snapshot(f["dir"])
    owned = [_expand(a, fx) for a in case.own]

    def mine(rel: str) -> bool:
        path = str(f["dir"] / rel)
        return any(path == a or path.startswith(a + os.sep) for a in owned)
    changed = sorted(k for k, v in base.items() if after.get(k) != v and not mine(k))
    new = sorted(k for k in after if k not in base and not mine(k))
    problems = []
    if hung:
        problems.append("hang")
    if (f["dir"] / MARKER).exists() or (not case.process and EVIL_MODULE in sys.modules):
        problems.append("import")
    if tb:
        problems.append("traceback")
    elif not hung and rc == 0 and case.code != 0:
        problems.append("wrong success")
    if changed:
        problems.append("input destroyed")
    if new:
        problems.append("leftover")
    lines = [line for line in text.splitlines() if line.strip()]
    if not tb and not hung:
        if case.quiet:
            if lines:
                problems.append("not one line")
        elif case.code != 0 and rc != 0:
            if len(lines) != 1 or len(lines[0].replace(str(f["dir"]), "")) > MAX_LINE:
                problems.append("not one line")
            elif _expand(case.names, fx) not in lines[0]:
                problems.append("does not name it")
        if rc != case.code:
            problems.append("wrong exit code")
    out = Outcome(case, rc, text, problems)
    return out


def _run_inprocess(argv: List[str], f: Fixtures) -> Tuple[Optional[int], str, bool, bool]:
    sys.path.insert(0, str(f["evil"]))  # evilmod importable, as a file naming it would need
    try:
        rc, text, hung, tb = _bad_input().run_main(argv)
    finally:
        sys.path.remove(str(f["evil"]))
    return rc, text, hung, tb or "Traceback" in text


def process_env(f: Fixtures) -> Dict[str, str]:
    """A CLI process's environment: one thread, no progress bars (errors are judged line by line),
    this checkout and evilmod importable."""
    root = HERE.parent
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(OMP_NUM_THREADS="1", IREP_DEPLOY_QUIET="1", PYTHONPATH=os.pathsep.join(
        p for p in (str(root), str(f["evil"]), env.get("PYTHONPATH")) if p))
    return env


def _run_process(case: HCase, argv: List[str], f: Fixtures) -> Tuple[Optional[int], str, bool]:
    def limits() -> None:
        if case.fsize is not None:
            import resource
            resource.setrlimit(resource.RLIMIT_FSIZE, (case.fsize, case.fsize))

    stdout: object = subprocess.PIPE
    opened = None
    if case.stdout == "full":
        opened = stdout = open("/dev/full", "w")
    elif case.stdout == "closed":
        r, w = os.pipe()
        os.close(r)  # the reader is gone before anything is written: every write is EPIPE
        stdout = w
    try:
        proc = subprocess.Popen([sys.executable, "-m", "irep_deploy"] + argv, stdout=stdout,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=process_env(f),
                                cwd=str(f["dir"]), preexec_fn=limits, universal_newlines=True)
        if case.stdout == "closed":
            os.close(stdout)  # type: ignore[arg-type]
        try:
            _, err = proc.communicate(timeout=CASE_SECONDS)
            return proc.returncode, err, False
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            return None, err, True
    finally:
        if opened is not None:
            opened.close()


# -- staging helpers the case files share -------------------------------------------------------------
def start_cli(f: Fixtures, *argv: str, wait_for: Optional[Path] = None, seconds: float = 60.0) -> Callable[[], None]:
    """Start ``irep-deploy ARGV`` in the background (the first writer of a concurrency case); wait until
    ``wait_for`` exists. Returns the teardown that stops it and waits for it."""
    proc = subprocess.Popen([sys.executable, "-m", "irep_deploy"] + [_expand(a, f) for a in argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            env=process_env(f), cwd=str(f["dir"]))
    deadline = time.time() + seconds
    while wait_for is not None and not wait_for.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            proc.wait()
            raise Skip("the first writer ended before {} appeared (exit {})".format(wait_for, proc.returncode))
        time.sleep(0.05)

    def stop() -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return stop


def small_tmpfs(where: Path, size: str = "256k") -> Callable[[], None]:
    """Mount a tmpfs of ``size`` at ``where`` (root only); a full disk for the case. Skip where not allowed."""
    where.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=" + size, "tmpfs", str(where)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    if res.returncode != 0:
        raise Skip("cannot mount a tmpfs here (needs root): " + res.stdout.strip()[:100])

    def unmount() -> None:
        subprocess.run(["umount", "-l", str(where)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return unmount


# -- the table ----------------------------------------------------------------------------------------
def run_all(cases: Sequence[HCase], work: Path, progress: bool = False) -> List[Outcome]:
    d = work / "w"
    d.mkdir(parents=True)
    f = make_fixtures(d)
    pristine = work / "pristine"
    shutil.copytree(str(d), str(pristine), symlinks=True)
    outcomes = []
    for case in cases:
        t0 = time.perf_counter()
        o = run_case(case, f, d)
        outcomes.append(o)
        shutil.rmtree(str(d / "case"), ignore_errors=True)
        if o.problems:
            restore(f, d, pristine)
        if progress:
            print("{:6.2f} s  {:16s} {}".format(time.perf_counter() - t0, o.verdict, case.id), file=sys.__stderr__)
    return outcomes


def restore(f: Fixtures, d: Path, pristine: Path) -> None:
    _bad_input().restore(f, d, pristine)
    with contextlib.suppress(FileNotFoundError):
        (d / MARKER).unlink()
    sys.modules.pop(EVIL_MODULE, None)


def table(outcomes: Sequence[Outcome]) -> str:
    return _bad_input().table(outcomes, KINDS)


def write_results(outcomes: Sequence[Outcome], out: str, header: Sequence[str] = ()) -> None:
    """results/hostile.md: where it was made (``header``), the table by category, every skipped case
    with its reason, every failure."""
    bad = [o for o in outcomes if o.problems]
    lines = ["# Hostile-input table (faults of the environment, hostile files, two writers)", ""]
    lines += list(header) + [""] if header else []
    lines += [
             "`python benchmarks/hostile.py` ({} cases; in-process through `irep_deploy.cli.main`, real processes "
             "where a case needs one). Verdict per case: the worst of hang (> {} s) > a module named by a file "
             "imported > input destroyed > traceback > wrong success > leftover > not one line > does not name "
             "the file/flag > wrong exit code.".format(len(outcomes), CASE_SECONDS), "", table(outcomes), ""]
    skipped = [o for o in outcomes if o.skipped]
    if skipped:
        lines += ["## Skipped here", ""] + ["- `{}`: {}".format(o.case.id, o.skipped) for o in skipped] + [""]
    if bad:
        lines += ["## Cases without the promised outcome", ""]
        lines += ["- `{}`: {} (exit {}): {}".format(o.case.id, ", ".join(o.problems), o.rc,
                                                   (o.stderr.strip().splitlines() or [""])[-1][:160]) for o in bad]
    # the one writer (with the provenance record); every module counts: messages and exit codes are the result
    _bad_input()._sibling("_common").write_results(Path(out).with_suffix(""), None, "\n".join(lines) + "\n",
                                                   ignore=())


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results" / "hostile.md"))
    ap.add_argument("--only", action="append", default=[], help="only the cases of this hostile_cases file")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cases = all_cases(args.only)
    with tempfile.TemporaryDirectory() as tmp:
        outcomes = run_all(cases, Path(tmp), progress=True)
    write_results(outcomes, args.out, _bad_input().provenance(sys.argv[1:] if argv is None else argv, "hostile.py"))
    print(table(outcomes))
    print("wrote {}".format(args.out))
    return 1 if any(o.problems for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
