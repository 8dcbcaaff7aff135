"""README.md and docs/own-network.md as a new user meets them: every fenced block runs, or is checked as
far as this machine allows, and a change that breaks a documented command breaks this test.

Each block is preceded by an HTML comment ``<!-- test: MODE [COMMAND=EXPECT ...] -->`` (invisible when
rendered) saying how it is treated; a block without one, or with a mode not listed in MODES, fails.
The blocks of one document that run share one fresh temporary directory and run in document order
(search -> train -> fuse -> export ...), all in one child process that calls the CLI's own ``main`` as
the ``irep-deploy`` script does (one torch import for the whole document instead of one per command).

Commands run at smoke scale: the flags of SMOKE are appended to their command line (argparse keeps the
last value), which shrinks data, epochs, rounds and timing windows without changing what the command
does. Run as ``python tests/test_readme.py DOC DIR`` it is that child process: one JSON line per command.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/own-network.md")

# Exit code "not available on this machine" (TensorRT, a GPU, a device profile): exit-code table of the
# README. Added by another change (issue 25, item 7); before it build-trt without TensorRT exits 1 and the
# blocks that expect this fail here.
NOT_AVAILABLE = 4

MODES = {
    "run": "shell block: each `irep-deploy` line runs here (smoke flags appended) and must exit 0, or as "
           "COMMAND=not-available says (exit NOT_AVAILABLE, one line on stderr)",
    "python": "Python block: executed in the document's directory",
    "file": "the block's text is written to the path given (a module the next blocks import)",
    "output": "a command's output shown as an example: its lines, numbers and paths masked, are the lines of "
              "the same command's last run in this document",
    "arch-code": "an arch.bin shown as an example: header and row layout are what ArchCode writes for that "
                 "backbone",
    "parse": "shell block that cannot run here (a Jetson container, make itself): `irep-deploy` arguments go "
             "through the real parser, `docker build -f FILE` names a file of the repository, `make` names "
             "targets and variables of the Makefile",
    "flags": "shell block with `...` placeholders: every flag is one its command has",
    "compile": "Python block that needs what this machine has not (downloads, a data set file, days of "
               "training): compiled only",
    "text": "not a command: a diagram or a table",
}

# Appended to a documented command line: smaller data, fewer epochs, rounds and shorter timing windows.
SMOKE: Dict[str, List[str]] = {
    "search": ["--limit", "128", "--batch-size", "32", "--population", "4", "--rounds", "1", "--subnets", "1",
               "--warmup-epochs", "1", "--round-epochs", "1", "--eval-batch-size", "128"],
    "train": ["--epochs", "1", "--limit", "64", "--batch-size", "32"],
    "quantize": ["--calib-size", "32"],
    "bench": ["--duration", "0.01", "--rounds", "1", "--warmup", "1", "--iterations", "1", "--calib-size", "32"],
    "eval": ["--limit", "128"],
}
EXPECT = {"not-available": NOT_AVAILABLE}

MARKER = re.compile(r"^\s*<!--\s*test:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")


class Block(NamedTuple):
    doc: str
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    mode: Optional[str]
    args: List[str]

    @property
    def where(self) -> str:
        return "{}:{}".format(self.doc, self.line)


def blocks(doc: str) -> List[Block]:
    """The fenced blocks of ``doc`` with the marker on the nearest non-blank line above each."""
    lines = (ROOT / doc).read_text(encoding="utf-8").splitlines()
    found = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = m.group(1), m.group(2), i
        body = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        above = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(above)
        words = marker.group(1).split() if marker else []
        found.append(Block(doc, start + 1, lang, "\n".join(body) + "\n", words[0] if words else None, words[1:]))
        i += 1
    return found


def command_lines(text: str) -> List[List[str]]:
    """Shell lines as argument lists: continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n", " ", text)
    return [argv for argv in (shlex.split(line, comments=True) for line in joined.splitlines()) if argv]


def split_env(argv: List[str]) -> Tuple[Dict[str, str], List[str]]:
    """Leading ``NAME=value`` words of a shell line, and the rest."""
    env = {}
    while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
        name, _, value = argv[0].partition("=")
        env[name] = value
        argv = argv[1:]
    return env, argv


def expectations(block: Block) -> Dict[str, int]:
    """COMMAND=EXPECT words of a ``run`` marker as {command: exit code}."""
    out = {}
    for word in block.args:
        command, _, expect = word.partition("=")
        out[command] = EXPECT[expect]
    return out


# -- checks that need no run (fast) -----------------------------------------------------------------------
def _parser():
    from irep_deploy.cli import build_parser
    return build_parser()


def _makefile() -> str:
    return (ROOT / "Makefile").read_text(encoding="utf-8")


def check_parse(block: Block) -> List[str]:
    faults = []
    for argv in command_lines(block.text):
        env, argv = split_env(argv)
        tool = argv[0]
        if tool == "make":
            for word in argv[1:]:
                name, eq, _ = word.partition("=")
                pattern = r"^{} \?=".format(re.escape(name)) if eq else r"^{}:".format(re.escape(word))
                if not re.search(pattern, _makefile(), re.M):
                    faults.append("make {}: no such {} in the Makefile".format(word, "variable" if eq else "target"))
            continue
        if tool == "docker" and argv[1] == "build":
            dockerfile = argv[argv.index("-f") + 1]
            if not (ROOT / dockerfile).is_file():
                faults.append("docker build: {} is not a file of the repository".format(dockerfile))
            continue
        if tool == "docker" and argv[1] == "run":  # the image's entry point is irep-deploy
            image = next(i for i, a in enumerate(argv) if a.startswith("irep-deploy:"))
            argv = ["irep-deploy"] + argv[image + 1:]
        if argv[0] != "irep-deploy":
            faults.append("{}: not a command this test knows".format(" ".join(argv)))
            continue
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                _parser().parse_args(argv[1:])
            except SystemExit as exc:
                faults.append("{}: the parser refuses it (exit {}): {}".format(" ".join(argv), exc.code,
                                                                                err.getvalue().strip()))
    return faults


def check_flags(block: Block) -> List[str]:
    from irep_deploy.cli import subcommand
    faults = []
    for argv in command_lines(block.text):
        _, argv = split_env(argv)
        if argv[0] != "irep-deploy":
            faults.append("{}: not a command this test knows".format(" ".join(argv)))
            continue
        known = set(subcommand(_parser(), argv[1])._option_string_actions)
        for word in argv[2:]:
            flag = word.split("=", 1)[0]
            if flag.startswith("-") and flag not in known:
                faults.append("irep-deploy {}: no flag {}".format(argv[1], flag))
    return faults


def check_arch_code(block: Block) -> List[str]:
    """The example's header lines are the tool's, and each row the tool's row of that layer (bits aside)."""
    from irep_deploy import ArchCode, build_model
    from irep_deploy.models.external import is_spec
    fields = dict(re.findall(r"^(\w+): (.*)$", block.text, re.M))
    backbone = fields["backbone"]
    if is_spec(backbone):
        build_model(backbone, num_classes=10)  # a spec's label is known once its model is built
    written = ArchCode.random(backbone, seed=0).dumps().splitlines()
    faults = []
    tool_rows = {line.split()[0]: line for line in written if line and not line.startswith("#") and ":" not in
                 line.split()[0]}
    for line in block.text.splitlines():
        if not line.strip() or line.strip() == "...":
            continue
        if re.match(r"^(#|\w+: )", line):
            if line not in written:
                faults.append("header line {!r} is not what ArchCode writes for {}".format(line, backbone))
            continue
        name = line.split()[0]
        mine = tool_rows.get(name)
        if mine is None:
            faults.append("row {!r}: {} has no layer {}".format(line, backbone, name))
        elif re.sub(r"[01]+$", "", mine) != re.sub(r"[01]+$", "", line) or len(mine.split()[-1]) != len(
                line.split()[-1]):
            faults.append("row {!r} is laid out unlike the tool's {!r}".format(line, mine))
    return faults


def check_compiles(block: Block) -> List[str]:
    try:
        compile(block.text, block.where, "exec")
    except SyntaxError as exc:
        return ["not Python: {}".format(exc)]
    return []


def check_text(block: Block) -> List[str]:
    if block.lang:
        return ["a text block has a language ({}): run or check it".format(block.lang)]
    commands = [line for line in block.text.splitlines() if re.match(r"^(\$ |irep-deploy |make |python )", line)]
    return ["a text block holds a command line ({!r}): run or check it".format(commands[0])] if commands else []


CHECKS = {"parse": check_parse, "flags": check_flags, "arch-code": check_arch_code, "compile": check_compiles,
          "text": check_text}


def test_every_block_has_a_mode_this_test_knows():
    unknown = ["{} ({} block): {}".format(b.where, b.lang or "plain",
                                          "no <!-- test: MODE --> above it" if b.mode is None else
                                          "unknown mode {!r}".format(b.mode))
               for doc in DOCS for b in blocks(doc) if b.mode not in MODES]
    assert not unknown, "modes: {}\n".format(", ".join(MODES)) + "\n".join(unknown)
    runs = [b for doc in DOCS for b in blocks(doc) if b.mode == "run"]
    commands = set(next(a for a in _parser()._actions if a.dest == "command").choices)
    assert runs and all(set(expectations(b)) <= commands for b in runs)


def test_blocks_that_cannot_run_here_are_checked_as_far_as_they_can_be():
    faults = ["{}: {}".format(b.where, fault) for doc in DOCS for b in blocks(doc) if b.mode in CHECKS
              for fault in CHECKS[b.mode](b)]
    assert not faults, "\n".join(faults)


def test_make_demo_refuses_an_existing_output_in_one_line(tmp_path):
    """Before anything is installed or run: PYTHON=false would fail the venv step with another message."""
    earlier = tmp_path / "demo-out"
    earlier.mkdir()
    (earlier / "report.md").write_text("an earlier run\n")
    proc = subprocess.run(["make", "-s", "-C", str(ROOT), "demo", "DEMO_OUT={}".format(earlier),
                           "VENV={}".format(tmp_path / "venv"), "PYTHON=false"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, lines
    assert str(earlier) in lines[0] and "rm -rf" in lines[0] and "DEMO_OUT=" in lines[0]
    assert (earlier / "report.md").read_text() == "an earlier run\n" and not (tmp_path / "venv").exists()


# -- the blocks that run (one child process per document) -------------------------------------------------
def _masked(text: str) -> List[str]:
    """Output lines with numbers and file names replaced, to compare an example with a real run."""
    text = re.sub(r"\S+\.(pt|onnx|bin|engine|json)\b", "FILE", text)
    text = re.sub(r"\d[\d,.]*(e[-+]?\d+)?", "N", text)
    return [line.strip() for line in text.splitlines() if line.strip()]


def _run_command(argv: List[str], env: Dict[str, str]) -> Tuple[int, str, str]:
    from irep_deploy.cli import main
    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_path = dict(os.environ), list(sys.path)
    os.environ.update(env)
    if "PYTHONPATH" in env:  # what the variable does for a new process
        sys.path[:0] = [os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.path[:] = saved_path
    return rc, out.getvalue(), err.getvalue()


def run_document(doc: str, emit) -> None:
    """Run the blocks of ``doc`` that run, in order, in the current directory; ``emit`` gets one dict per
    command or block: where, what, ok, why, seconds."""
    last_stdout: Dict[str, str] = {}
    for block in blocks(doc):
        t = time.perf_counter()
        if block.mode == "file":
            target = Path(block.args[0])
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.text, encoding="utf-8")
            emit(dict(where=block.where, what="file " + block.args[0], ok=True, why="", seconds=0.0))
        elif block.mode == "python":
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    exec(compile(block.text, block.where, "exec"), {"__name__": "__readme__"})
                ok, why = True, ""
            except BaseException:  # noqa: B902 - a documented example that raises is the fault reported
                ok, why = False, traceback.format_exc(limit=-3)
            emit(dict(where=block.where, what="python", ok=ok, why=why, seconds=time.perf_counter() - t))
        elif block.mode == "output":
            shown = [line for line in block.text.splitlines() if not line.startswith("$ ")]
            command = shlex.split(next(line for line in block.text.splitlines() if line.startswith("$ "))[2:])[1]
            real = last_stdout.get(command)
            ok = real is not None and _masked("\n".join(shown)) == _masked(real)
            why = "" if ok else "shown:\n{}\nlast run of {}:\n{}".format("\n".join(shown), command, real)
            emit(dict(where=block.where, what="output of " + command, ok=ok, why=why, seconds=0.0))
        elif block.mode == "run":
            expected = expectations(block)
            for argv in command_lines(block.text):
                t = time.perf_counter()
                env, argv = split_env(argv)
                if argv[0] != "irep-deploy":
                    emit(dict(where=block.where, what=" ".join(argv), ok=False, why="not an irep-deploy command",
                              seconds=0.0))
                    continue
                want = expected.get(argv[1], 0)
                smoke = SMOKE.get(argv[1], []) if want == 0 else []
                try:
                    rc, out, err = _run_command(argv[1:] + smoke, env)
                except BaseException:  # noqa: B902 - main() raised: a bug, reported with its traceback
                    rc, out, err = -1, "", traceback.format_exc(limit=-3)
                last_stdout[argv[1]] = out
                lines = [line for line in err.splitlines() if line.strip() and "\r" not in line]
                ok = rc == want and (want == 0 or len(lines) == 1)
                why = "" if ok else "exit {} (documented: {}); stderr:\n{}".format(rc, want, err[-1500:])
                emit(dict(where=block.where, what=" ".join(argv), ok=ok, why=why,
                          seconds=time.perf_counter() - t))


def _document_results(doc: str, tmp_path: Path) -> List[dict]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))  # the checkout, not the document's directory
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), doc, str(tmp_path)], cwd=str(tmp_path),
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=900)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and results, proc.stderr[-3000:]
    return results


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS)
def test_the_document_runs_as_written(doc, tmp_path):
    results = _document_results(doc, tmp_path)
    summary = "\n".join("{:7.1f} s  {}  {}".format(r["seconds"], r["where"], r["what"]) for r in results)
    print(summary)
    failed = ["{} {}: {}".format(r["where"], r["what"], r["why"]) for r in results if not r["ok"]]
    assert not failed, "\n\n".join(failed)


if __name__ == "__main__":
    os.chdir(sys.argv[2])
    run_document(sys.argv[1], lambda record: print(json.dumps(record), flush=True))
