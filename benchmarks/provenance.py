"""Where a results file came from, and what code it depends on (docs/benchmarks.md, "Provenance").

A results file records its commit, whether the tree was dirty, the command, the machine, the date and
``depends``: a digest of every source file its numbers were computed by (the script, the benchmark
modules it loaded, the package modules it imports, and any input files it names). The staleness check
(``check_results.py``) compares those digests with the checkout's, so it needs no git history; a
cached run (``runs.py``) is keyed by the same digests.

Imports nothing heavy (no torch): ``make check-results`` runs it on every CI run.
"""
from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import shlex
import subprocess
import sys
import time
import tokenize
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PACKAGE = "irep_deploy"

# Modules that carry files and messages, not numbers: a change to them leaves a latency or an accuracy as
# it was. A results file about messages and exit codes (bad_input.py, hostile.py) passes ignore=() instead.
PLUMBING = ("irep_deploy/errors.py", "irep_deploy/_io.py", "irep_deploy/cli.py", "irep_deploy/__main__.py",
            "irep_deploy/options.py", "irep_deploy/tensorfile.py", "irep_deploy/resources.py")
SELF = "benchmarks/provenance.py"  # records, never computes

Reader = Callable[[str], Optional[str]]
STARTED = time.time()  # scripts import this module (through _common) before they compute anything


def checkout(root: Path = ROOT) -> Reader:
    """A reader of files (relative to ``root``) in the working tree: their text, None if absent."""
    def read(rel: str) -> Optional[str]:
        path = root / rel
        try:
            return path.read_text(encoding="utf-8") if path.is_file() else None
        except (OSError, UnicodeDecodeError):
            return None
    return read


read_checkout = checkout()


def digest_text(rel: str, text: Optional[str]) -> Optional[str]:
    """sha256 (16 hex digits) of a dependency's content. Python sources are hashed without comments,
    blank lines and trailing spaces, so an edit of a comment is not a change of the code; a results
    JSON file is hashed without its ``provenance`` (acknowledging or backfilling it changes no number).
    None for an absent file."""
    if text is None:
        return None
    if rel.endswith(".py"):
        text = _code_only(text)
    elif rel.startswith("benchmarks/results/") and rel.endswith(".json"):
        try:
            data = json.loads(text)
        except ValueError:
            pass
        else:
            if isinstance(data, dict):
                data.pop("provenance", None)
            text = json.dumps(data, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _code_only(text: str) -> str:
    try:
        comments = [tok for tok in tokenize.generate_tokens(io.StringIO(text).readline)
                    if tok.type == tokenize.COMMENT]
    except (tokenize.TokenError, IndentationError, SyntaxError):
        comments = []
    lines = text.splitlines()
    for tok in reversed(comments):  # one comment per line at most: cut each line at its comment
        row, col = tok.start
        lines[row - 1] = lines[row - 1][:col]
    return "\n".join(line.rstrip() for line in lines if line.strip())


def _module_file(dotted: str, read: Reader) -> Optional[str]:
    base = dotted.replace(".", "/")
    for rel in (base + ".py", base + "/__init__.py"):
        if read(rel) is not None:
            return rel
    return None


def _package_of(rel: str) -> str:
    return ".".join(rel[:-3].split("/")[:-1])


def _lazy_exports(read: Reader) -> Dict[str, str]:
    """irep_deploy/__init__.py's name -> module table (``from irep_deploy import fuse_model`` imports
    irep_deploy.reparam on first use)."""
    text = read(PACKAGE + "/__init__.py")
    if text is None:
        return {}
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets):
            try:
                return dict(ast.literal_eval(node.value))
            except ValueError:
                return {}
    return {}


def _imports_of(rel: str, text: str, read: Reader, exports: Dict[str, str]) -> Set[str]:
    """Files of the repository that ``rel`` imports anywhere (functions included): package modules,
    and sibling modules of a benchmark script (``from runs import ...``)."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return set()
    names: List[str] = []
    here = rel.rsplit("/", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _package_of(rel).split(".")
                package = package[:len(package) - node.level + 1]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.append(base)
            names += [base + "." + alias.name for alias in node.names]
            if base == PACKAGE:
                names += [PACKAGE + "." + exports[a.name] for a in node.names if a.name in exports]
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "_sibling"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.append(node.args[0].value)  # bad_input.py's loader of benchmarks/NAME.py by path
    found: Set[str] = set()
    for name in names:
        parts = name.split(".")
        if parts[0] == PACKAGE:
            for k in range(1, len(parts) + 1):  # a package's __init__ runs before its module
                module = _module_file(".".join(parts[:k]), read)
                if module is not None:
                    found.add(module)
        elif here == "benchmarks" and len(parts) == 1:
            module = _module_file("benchmarks." + name, read)
            if module is not None:
                found.add(module)
    return found


def closure(start: Iterable[str], read: Reader = read_checkout) -> Set[str]:
    """``start`` and every repository file it imports, transitively (static: lazy imports count)."""
    exports = _lazy_exports(read)
    seen: Set[str] = set()
    todo = [s for s in start]
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        text = read(rel)
        if text is not None and rel.endswith(".py"):
            todo += sorted(_imports_of(rel, text, read, exports) - seen)
    return seen


def loaded_files() -> Set[str]:
    """Repository files this process has imported (modules loaded by path, as hostile_cases are, too)."""
    found = set()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if not path:
            continue
        try:
            rel = Path(path).resolve().relative_to(ROOT).as_posix()
        except ValueError:
            continue
        if rel.startswith((PACKAGE + "/", "benchmarks/")) and rel.endswith(".py"):
            found.add(rel)
    return found


def relative(path: Any) -> str:
    """``path`` relative to the repository root (as given if outside it)."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def dependencies(files: Iterable[str], ignore: Sequence[str] = PLUMBING,
                 read: Reader = read_checkout) -> Dict[str, Optional[str]]:
    """{file: digest} of ``files`` less ``ignore`` (and this module), sorted."""
    return {rel: digest_text(rel, read(rel)) for rel in sorted(set(files) - set(ignore) - {SELF})}


def code_digest(start: Sequence[str]) -> str:
    """One digest of the code ``start`` imports (plumbing left out): the key of a cached run."""
    deps = dependencies(closure(start))
    return hashlib.sha256(json.dumps(deps, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def git_state() -> Dict[str, Any]:
    """The checkout's commit and whether its tracked files other than results differ from it (``dirty``):
    a results file made from uncommitted code says so (the digests say exactly what ran). ``commit`` is
    None outside a git checkout."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git"] + list(args), cwd=str(ROOT), stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, universal_newlines=True).stdout.strip()
        except OSError:
            return ""
    commit = git("rev-parse", "--short", "HEAD") or None
    return {"commit": commit, "dirty": bool(commit and git("status", "--porcelain", "--untracked-files=no", "--", ".",
                                                       ":(exclude)benchmarks/results"))}


def command_line(argv: Sequence[str]) -> str:
    """The command as a user types it again: the thread setting, ``python``, the script from the root."""
    threads = os.environ.get("OMP_NUM_THREADS")
    script = relative(argv[0]) if argv else "?"
    return "{}python {}".format("OMP_NUM_THREADS={} ".format(threads) if threads else "",
                                " ".join(shlex.quote(a) for a in [script] + list(argv[1:])))


def record(machine: str, depends: Iterable[Any] = (), ignore: Sequence[str] = PLUMBING,
           argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The ``provenance`` of a results file written now by this process: commit, dirty, command and
    argv, machine, date (UTC), and the digests of the script, of every repository module it imported
    or imports (statically), and of ``depends`` (input files such as another results file)."""
    argv = list(sys.argv if argv is None else argv)
    main = relative(getattr(sys.modules.get("__main__"), "__file__", None) or "/")
    start = loaded_files() | ({main} if main.startswith("benchmarks/") else set())
    read, package = _package_reader()
    files = closure(start, read) | {relative(p) for p in depends}
    state = _START_STATE
    prov = {"commit": state["commit"], "dirty": state["dirty"], "command": command_line(argv), "argv": argv,
            "machine": machine, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load_avg": load_average(), "ignored": [p for p in ignore if p in files],
            "depends": dependencies(files, ignore, read)}
    if package is not None:
        prov["package_from"] = package
    # a file saved while the run went on may not be the code that ran: its digest is not known
    edited = [rel for rel in prov["depends"] if _modified_since(rel, package, STARTED)]
    if edited:
        prov["edited_during_run"] = edited
        prov["depends"].update({rel: None for rel in edited})
    return prov


def _modified_since(rel: str, package: Optional[str], since: float) -> bool:
    path = (Path(package) if package and rel.startswith(PACKAGE + "/") else ROOT) / rel
    try:
        return path.stat().st_mtime > since
    except OSError:
        return False


_START_STATE = git_state()  # the checkout as the run began: a commit made while it ran is not what ran


def _package_reader() -> Tuple[Reader, Optional[str]]:
    """A reader of the code that ran: the package from where it was imported (another tree, e.g. an old
    release on PYTHONPATH, is hashed as it is, and named), everything else from the checkout."""
    module = sys.modules.get(PACKAGE)
    where = Path(module.__file__).resolve().parent.parent if module is not None and module.__file__ else ROOT
    if where == ROOT:
        return read_checkout, None
    other = checkout(where)
    return (lambda rel: other(rel) if rel.startswith(PACKAGE + "/") else read_checkout(rel)), str(where)


def load_average() -> Optional[List[float]]:
    """The machine's 1, 5 and 15 minute load averages when the file was written (None where the OS
    has none): a timing made beside other work says so."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def summary_line(prov: Dict[str, Any]) -> str:
    """One line for a results file's markdown."""
    load = prov.get("load_avg")
    return ("Provenance: commit {}{}, `{}`, {}, {}{}; digests of the {} files it depends on in the provenance "
            "record.".format(prov.get("commit") or "unknown", " (tree dirty)" if prov.get("dirty") else "",
                             prov.get("command"), prov.get("date"), prov.get("machine"),
                             ", load average {} / {} / {} (1 / 5 / 15 min)".format(*load) if load else "",
                             len(prov.get("depends", {}))))


MD_TAG = "<!-- provenance "


def embed(markdown: str, prov: Dict[str, Any]) -> str:
    """A markdown-only results file keeps its provenance record in a last-line HTML comment."""
    return markdown.rstrip("\n") + "\n\n" + MD_TAG + json.dumps(prov, sort_keys=True) + " -->\n"


def embedded(markdown: str) -> Optional[Dict[str, Any]]:
    for line in reversed(markdown.splitlines()):
        if line.startswith(MD_TAG) and line.endswith("-->"):
            return json.loads(line[len(MD_TAG):-3])
    return None
