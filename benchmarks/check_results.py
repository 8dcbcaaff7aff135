"""Which results files are stale, and do the documents say so (docs/benchmarks.md, "Staleness").

Every file under benchmarks/results (a ``NAME.json`` with its ``provenance``, or a markdown-only
``NAME.md`` with the record in its last line) names the files it depends on with their digests. A file is

* current: every dependency has the digest it had (or a change acknowledged with a reason);
* stale: a dependency changed since: an error until it is regenerated, acknowledged or marked;
* a record of an older version: marked so, with the reason and the commit it records.

README.md and docs/*.md may link to, name (`` `results/NAME.md` ``) or quote (claim markers) any of
them, but a link or name of a file that is not current must be followed by "(record of an older
version)", and a paragraph quoting one must say "record of an older version"; a current file must not be
called one. No git history is needed (digests); ``--backfill`` is the one step that reads it.

    python benchmarks/check_results.py [--verbose]
    python benchmarks/check_results.py --acknowledge NAME --reason "why the numbers cannot change"
    python benchmarks/check_results.py --mark-older NAME --reason "why it is kept" [--commit C]
    python benchmarks/check_results.py --backfill       # records for files made before provenance
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_claims  # noqa: E402
import provenance  # noqa: E402

OLDER = "record of an older version"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
NAMED = re.compile(r"`[^`\n]*?\bresults/([\w.-]+?)\.(?:md|json)`")


class Record(NamedTuple):
    name: str  # the stem under benchmarks/results
    path: Path  # the file holding the record (.json, or .md for a markdown-only file)
    prov: Optional[Dict[str, Any]]


def records(results: Path) -> List[Record]:
    """Every results file of ``results`` (figures aside), one per stem."""
    found = []
    for path in sorted(results.glob("*.json")) + sorted(p for p in results.glob("*.md")
                                                        if not p.with_suffix(".json").is_file()):
        found.append(Record(path.stem, path, read_record(path)))
    return sorted(found)


def read_record(path: Path) -> Optional[Dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            data = json.loads(text)
            return data.get("provenance") if isinstance(data, dict) else None
        return provenance.embedded(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SystemExit("{}: unreadable results file ({})".format(path, str(exc).splitlines()[0]))


def write_record(record: Record, prov: Dict[str, Any]) -> None:
    """Put ``prov`` back into the file, leaving every other byte as the script wrote it."""
    text = record.path.read_text(encoding="utf-8")
    if record.path.suffix == ".json":
        data = json.loads(text)
        data["provenance"] = prov
        text = json.dumps(data, indent=2) + "\n"
    else:
        lines = text.rstrip("\n").splitlines()
        if lines and lines[-1].startswith(provenance.MD_TAG):
            lines = lines[:-1]
        text = provenance.embed("\n".join(lines), prov)
    fd, tmp = tempfile.mkstemp(dir=str(record.path.parent), prefix=".tmp-" + record.path.name)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, str(record.path))


def current_digests(read: provenance.Reader) -> Callable[[str], Optional[str]]:
    """rel -> its digest now, each file read and hashed once (records share most dependencies)."""
    memo: Dict[str, Optional[str]] = {}

    def digest(rel: str) -> Optional[str]:
        if rel not in memo:
            memo[rel] = provenance.digest_text(rel, read(rel))
        return memo[rel]
    return digest


def changed(prov: Dict[str, Any], digest: Callable[[str], Optional[str]]) -> List[str]:
    """The dependencies whose digest differs from the one recorded (absent files included)."""
    return [rel for rel, recorded in sorted(prov.get("depends", {}).items()) if digest(rel) != recorded]


def state(record: Record, digest: Callable[[str], Optional[str]]) -> Tuple[str, List[str]]:
    """("missing" | "older" | "stale" | "current", the changed dependencies)."""
    if record.prov is None:
        return "missing", []
    if record.prov.get("older_version"):
        return "older", []
    moved = changed(record.prov, digest)
    return ("stale" if moved else "current"), moved


class Reference(NamedTuple):
    doc: str
    line: int
    name: str
    kind: str  # "link", "name" or "claim"
    after: str  # the rest of its paragraph after the reference (links and names)
    block: str  # its paragraph, or its table row with the table's caption (claims)


def _blocks(text: str) -> Iterator[Tuple[int, List[str], str]]:
    """(first line number, lines, caption) of each paragraph; a table row is a block of its own, read
    with its table's caption (the paragraph just above the table), which may say "record of an older
    version" once for all its rows; fenced code skipped."""
    block: List[str] = []
    start = 0
    fenced = False
    previous = ""  # the paragraph yielded last: a table that follows it has it as its caption
    caption: Optional[str] = None  # the caption of the table being read, None outside a table
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            if block:
                yield start, block, ""
            block, previous, caption = [], "", None
            continue
        if fenced:
            continue
        if not line.strip() or line.lstrip().startswith("|"):
            if block:
                yield start, block, ""
                previous = "\n".join(block)
            block = []
            if line.strip():
                if caption is None:
                    caption = previous
                yield number, [line], caption
            continue
        if not block:
            start, caption = number, None
        block.append(line)
    if block:
        yield start, block, ""


def references(text: str, doc: Path, results: Path, shown: str) -> Iterator[Reference]:
    """Every link to, name of and claim on a results file in a markdown text."""
    for first, lines, caption in _blocks(text):
        block = "\n".join(lines)
        for match in LINK.finditer(block):  # a link or its mark may wrap onto the next line
            target = (doc.parent / match.group(1).split("#")[0]).resolve()
            if target.parent == results.resolve() and target.suffix in (".md", ".json"):
                yield Reference(shown, first + block.count("\n", 0, match.start()), target.stem, "link",
                                block[match.end():], block)
        for match in NAMED.finditer(block):
            yield Reference(shown, first + block.count("\n", 0, match.start()), match.group(1), "name",
                            block[match.end():], block)
        for claim in check_claims.markers(block):
            yield Reference(shown, first + claim.line - 1, Path(claim.file).stem, "claim", "",
                            block + "\n" + caption)


def _says_older(after: str) -> bool:
    return after.lstrip().startswith("(" + OLDER)


def doc_problems(root: Path, status: Dict[str, Tuple[str, List[str]]],
                 prov: Dict[str, Optional[Dict[str, Any]]]) -> List[str]:
    results = root / "benchmarks" / "results"
    problems = []
    for doc in check_claims.documents(root):
        shown = doc.relative_to(root).as_posix()
        for ref in references(doc.read_text(encoding="utf-8"), doc, results, shown):
            if ref.name not in status:
                continue  # a missing file is check_claims' (claims) or the link checker's business
            kind, _ = status[ref.name]
            where = "{}:{}: {} results/{}".format(ref.doc, ref.line, {"link": "links to", "name": "names",
                                                                   "claim": "quotes"}[ref.kind], ref.name)
            if kind in ("older", "stale"):
                why = ("a record of an older version ({})".format(_older_text(prov[ref.name])) if kind == "older"
                       else "which is stale (its line above says what changed)")
                if ref.kind == "claim" and OLDER not in ref.block:
                    problems.append("{}, {}: its paragraph or table row must say '{}'".format(where, why, OLDER))
                elif ref.kind != "claim" and not _says_older(ref.after):
                    problems.append("{}, {}: follow it with '({})'".format(where, why, OLDER))
            elif ref.kind != "claim" and _says_older(ref.after):
                problems.append("{}, which is current: drop '({})'".format(where, OLDER))
    return problems


def _older_text(prov: Optional[Dict[str, Any]]) -> str:
    older = (prov or {}).get("older_version") or {}
    return "commit {}: {}".format(older.get("commit"), older.get("reason"))


def report(root: Path, verbose: bool = False) -> int:
    results = root / "benchmarks" / "results"
    found = records(results)
    digest = current_digests(provenance.checkout(root))
    status = {r.name: state(r, digest) for r in found}
    problems = []
    for record in found:
        kind, moved = status[record.name]
        rel = record.path.relative_to(root).as_posix()
        if kind == "missing":
            problems.append("{}: no provenance record (write it with _common.write_results, or --backfill)".format(rel))
        elif kind == "stale":
            problems.append("{}: stale, made on commit {}; changed since: {}. Regenerate it (`{}`), or "
                            "--acknowledge {} --reason ..., or --mark-older {} --reason ...".format(
                                rel, record.prov.get("commit"), ", ".join(moved), record.prov.get("command"),
                                record.name, record.name))
        elif verbose:
            print("{}: {}{}".format(rel, kind, " ({})".format(_older_text(record.prov)) if kind == "older" else ""))
    problems += doc_problems(root, status, {r.name: r.prov for r in found})
    for line in problems:
        print(line)
    counts = {k: sum(1 for s, _ in status.values() if s == k) for k in ("current", "older", "stale", "missing")}
    print("{} results files: {} current, {} records of an older version, {} stale, {} without provenance; "
          "{} problem{}".format(len(found), counts["current"], counts["older"], counts["stale"], counts["missing"],
                                len(problems), "s" * (len(problems) != 1)))
    return 1 if problems else 0


def _find(root: Path, name: str) -> Record:
    name = Path(name).stem
    for record in records(root / "benchmarks" / "results"):
        if record.name == name:
            if record.prov is None:
                raise SystemExit("results/{}: no provenance record to update (--backfill first)".format(name))
            return record
    raise SystemExit("no results file named {} under benchmarks/results".format(name))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def acknowledge(root: Path, name: str, reason: str) -> None:
    """Record that the changed dependencies leave the numbers as they are (why, when, on which commit)."""
    record = _find(root, name)
    prov = dict(record.prov or {})
    digest = current_digests(provenance.checkout(root))
    moved = changed(prov, digest)
    if not moved:
        raise SystemExit("results/{}: nothing to acknowledge (no dependency changed)".format(name))
    files = {rel: {"was": prov["depends"][rel], "now": digest(rel)} for rel in moved}
    prov["depends"] = dict(prov["depends"], **{rel: d["now"] for rel, d in files.items()})
    prov["acknowledged"] = prov.get("acknowledged", []) + [
        {"date": _now(), "commit": provenance.git_state()["commit"], "reason": reason, "files": files}]
    write_record(record, prov)
    print("results/{}: acknowledged {} changed file(s): {}".format(name, len(files), ", ".join(files)))


def mark_older(root: Path, name: str, reason: str, commit: Optional[str]) -> None:
    """Mark a file as the record of an older version: kept, no longer current, and docs must say so."""
    record = _find(root, name)
    prov = dict(record.prov or {})
    prov["older_version"] = {"reason": reason, "commit": commit or prov.get("commit"), "marked": _now(),
                             "changed": changed(prov, current_digests(provenance.checkout(root)))}
    write_record(record, prov)
    print("results/{}: marked as a {} (commit {})".format(name, OLDER, prov["older_version"]["commit"]))


# -- backfill: records for files written before write_results kept one (reads git history) --------------

def _git(root: Path, *args: str) -> str:
    proc = subprocess.run(["git"] + list(args), cwd=str(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True)
    if proc.returncode:
        raise SystemExit("git {}: {}".format(" ".join(args), proc.stderr.strip().splitlines()[-1:]))
    return proc.stdout


def _reader_at(root: Path, commit: str) -> provenance.Reader:
    listed = set(_git(root, "ls-tree", "-r", "--name-only", commit).splitlines())
    cache: Dict[str, Optional[str]] = {}

    def read(rel: str) -> Optional[str]:
        if rel not in cache:
            cache[rel] = _git(root, "show", "{}:{}".format(commit, rel)) if rel in listed else None
        return cache[rel]
    return read


def _command_of(root: Path, name: str, data: Any, markdown: str) -> Tuple[str, str]:
    """The command that made a file, and where it was read: the file itself, its markdown, or the
    code span of docs/benchmarks.md that writes it."""
    if isinstance(data, dict) and data.get("command"):
        return data["command"], "the file's command field"
    match = re.search(r"[Cc]ommand:? `([^`]+)`", markdown)
    if match:
        return match.group(1), "the file's markdown"
    docs = re.sub(r"```.*?```", "", (root / "docs" / "benchmarks.md").read_text(encoding="utf-8"), flags=re.S)
    for span in re.findall(r"`([^`]+)`", docs):
        if "python benchmarks/" in span and "results/{}.".format(name) in span:
            return " ".join(span.split()), "docs/benchmarks.md"
    return "not recorded", "nowhere"


def _machine_of(data: Any, markdown: str) -> str:
    if isinstance(data, dict):
        if isinstance(data.get("machine"), dict) and data["machine"].get("summary"):
            return data["machine"]["summary"]
        env = data.get("environment")
        if isinstance(env, dict):
            return "{} ({} logical CPUs), {}, Python {}, torch {}".format(
                env.get("cpu"), env.get("cpu_count"), env.get("platform"), env.get("python"), env.get("torch"))
    match = re.search(r"UTC, (Python [^\n]+)\.", markdown)
    return match.group(1) if match else "not recorded"


def backfill(root: Path) -> None:
    """A record, marked backfilled, for each results file without one: what git and the file tell."""
    if _git(root, "rev-parse", "--is-shallow-repository").strip() == "true":
        raise SystemExit("--backfill reads the commits that wrote the results files: this clone is shallow "
                         "(git fetch --unshallow first)")
    for record in records(root / "benchmarks" / "results"):
        if record.prov is not None:
            continue
        rel = record.path.relative_to(root).as_posix()
        text = record.path.read_text(encoding="utf-8")
        data = json.loads(text) if record.path.suffix == ".json" else None
        markdown = record.path.with_suffix(".md").read_text(encoding="utf-8") \
            if record.path.with_suffix(".md").is_file() else ""
        code = data.get("code") if isinstance(data, dict) and isinstance(data.get("code"), dict) else {}
        stated = code.get("commit") or next(iter(re.findall(r"^Commit ([0-9a-f]{7,40})", markdown, re.M)), None)
        wrote = _git(root, "log", "-1", "--format=%h %cI", "--", rel).split()
        if not wrote:
            print("{}: not in git history; left without a record".format(rel))
            continue
        commit, source = (stated, "the commit the file states") if stated else \
            (wrote[0], "the commit that last wrote the file (git log); the code that ran may be older")
        date, date_is = ((data["date"], "the file's date") if isinstance(data, dict) and data.get("date")
                         else (wrote[1], "the date of the commit that last wrote the file"))
        command, command_source = _command_of(root, record.name, data, markdown)
        script = re.search(r"benchmarks/[\w]+\.py", command)
        read = _reader_at(root, commit)
        files = provenance.closure([script.group(0)], read) if script else set()
        # the markdown-only files are the bad-input tables: messages and exit codes are their result
        ignore = () if record.path.suffix == ".md" else provenance.PLUMBING
        prov = {"commit": commit, "dirty": code.get("dirty"), "command": command, "argv": None,
                "machine": _machine_of(data, markdown), "date": date, "ignored": [p for p in ignore if p in files],
                "depends": provenance.dependencies(files, ignore, read),
                "backfilled": {"date": _now(), "commit_from": source, "command_from": command_source,
                               "date_is": date_is, "depends_from": "the script's imports at commit {}".format(commit)}}
        write_record(record, prov)
        print("{}: backfilled (commit {}, {} dependencies)".format(rel, commit, len(prov["depends"])))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(provenance.ROOT), help="the repository")
    parser.add_argument("--verbose", action="store_true", help="list every results file with its state")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--acknowledge", metavar="NAME", help="record a change that leaves NAME's numbers as they are")
    action.add_argument("--mark-older", metavar="NAME", help="mark NAME as the record of an older version")
    action.add_argument("--backfill", action="store_true", help="records for files without one (reads git history)")
    parser.add_argument("--reason", help="why (required with --acknowledge and --mark-older)")
    parser.add_argument("--commit", help="with --mark-older: the commit the file records (default: its own)")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    if (args.acknowledge or args.mark_older) and not (args.reason or "").strip():
        parser.error("--acknowledge and --mark-older need --reason (it is kept in the file)")
    if args.acknowledge:
        acknowledge(root, args.acknowledge, args.reason.strip())
    elif args.mark_older:
        mark_older(root, args.mark_older, args.reason.strip(), args.commit)
    elif args.backfill:
        backfill(root)
    else:
        return report(root, args.verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
