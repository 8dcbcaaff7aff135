"""Check every number README.md and docs/*.md quote from a results file against that file.

A quoted number carries a claim marker right after it (docs/benchmarks.md, "Claim markers"):

    DES beats all branches by 0.62 [0.19, 1.04]<!-- claim evidence_fmnist_5seeds.json#pairs[name=des-all].ci --> points

FILE is relative to benchmarks/results/, KEY a dotted path (dict keys, list indices, ``[field=value,...]``
selectors picking the one list element whose fields equal those values as text), an optional ``*N``
scales the value. The value is a number or a list of numbers; the text between the previous marker on
the line (or the line start) and this one must end with as many numbers, each equal to the value
rounded to the decimals printed (half-even or half-up). Markers inside fenced code blocks are examples. Prints ``DOC:LINE: FILE#KEY: problem`` per
mismatch, missing file or key; exits 1 on any, 0 otherwise.

    python benchmarks/check_claims.py [--root DIR] [DOC ...]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"<!--\s*claim\s+([^#\s]+)#(.*?)\s*-->")
SCALE = re.compile(r"\*(\d+(?:\.\d+)?)$")
# A sign only where it cannot be a range dash ("0.96-1.02"), a number only where it is not part of a
# name ("resnet18", "H200"); a comma between digit groups of three is a thousands separator.
NUMBER = re.compile(r"(?:(?<![\w.])([-+\u2212]))?(?<![\w.])"
                    r"((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?)(?!\d)")


class Claim(NamedTuple):
    doc: str
    line: int
    file: str
    key: str
    scale: Optional[Decimal]
    text: str  # the line up to the marker, earlier markers removed ("1.22<!-- -->-1.29" is a range)
    start: int  # where the text after the previous marker begins in ``text``


def markers(text: str, doc: str = "") -> Iterator[Claim]:
    """Every claim marker of a markdown text, with the text it follows on its line (fenced code, where a
    marker is shown rather than made, aside)."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if fenced:
            continue
        clean, end = "", 0
        for match in MARKER.finditer(line):
            key = match.group(2)
            scale = SCALE.search(key)
            if scale:
                key = key[:scale.start()]
            start = len(clean)
            clean += line[end:match.start()]
            yield Claim(doc, number, match.group(1), key, Decimal(scale.group(1)) if scale else None, clean, start)
            end = match.end()


def numbers(text: str, start: int = 0) -> List[str]:
    """The numbers of ``text`` from ``start`` on, in order, as printed (sign normalised to ``-``,
    separators removed); what precedes ``start`` still tells a sign from a range dash."""
    found = []
    for match in NUMBER.finditer(text):
        if match.start() < start:
            continue
        sign = "-" if match.group(1) in ("-", "\u2212") else ""
        found.append(sign + match.group(2).replace(",", ""))
    return found


def parse_key(key: str) -> List[Any]:
    """``a.b[f=v,g=w].3`` -> ['a', 'b', {'f': 'v', 'g': 'w'}, '3'] (list indices stay text)."""
    steps: List[Any] = []
    name = ""
    i = 0
    while i < len(key):
        char = key[i]
        if char == ".":
            if name:
                steps.append(name)
            name = ""
        elif char == "[":
            if name:
                steps.append(name)
            name = ""
            end = key.find("]", i)
            if end < 0:
                raise ValueError("unclosed [ in the key")
            fields = {}
            for pair in key[i + 1:end].split(","):
                field, eq, value = pair.partition("=")
                if not eq or not field:
                    raise ValueError("selector [{}] is not field=value".format(key[i + 1:end]))
                fields[field.strip()] = value.strip()
            steps.append(fields)
            i = end
        else:
            name += char
        i += 1
    if name:
        steps.append(name)
    if not steps:
        raise ValueError("empty key")
    return steps


def _as_text(value: Any) -> Tuple[str, ...]:
    return (str(value), json.dumps(value))


def lookup(data: Any, key: str) -> Any:
    """The value at ``key`` (``parse_key``); ValueError naming the step that fails."""
    node = data
    done: List[str] = []
    for step in parse_key(key):
        if isinstance(step, dict):
            shown = "[" + ",".join("{}={}".format(k, v) for k, v in step.items()) + "]"
            if not isinstance(node, list):
                raise ValueError("{} is not a list (selector {})".format(".".join(done) or "the file", shown))
            hits = [e for e in node if isinstance(e, dict)
                    and all(f in e and v in _as_text(e[f]) for f, v in step.items())]
            if len(hits) != 1:
                raise ValueError("selector {} matches {} elements of {}".format(shown, len(hits), ".".join(done) or "the file"))
            node = hits[0]
            done.append(shown)
            continue
        if isinstance(node, dict):
            if step not in node:
                raise ValueError("no key '{}' in {}".format(step, ".".join(done) or "the file"))
            node = node[step]
        elif isinstance(node, list):
            if not re.fullmatch(r"-?\d+", step) or not -len(node) <= int(step) < len(node):
                raise ValueError("no index '{}' in {} (a list of {})".format(step, ".".join(done) or "the file", len(node)))
            node = node[int(step)]
        else:
            raise ValueError("{} is a value, not a dict or list (step '{}')".format(".".join(done) or "the file", step))
        done.append(step)
    return node


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def matches(printed: str, value: Any, scale: Optional[Decimal] = None) -> bool:
    """Whether ``printed`` is ``value`` (times ``scale``) rounded to the decimals printed."""
    exact = Decimal(repr(value)) * (scale if scale is not None else 1)
    shown = Decimal(printed)
    if not exact.is_finite():
        return False
    places = Decimal(1).scaleb(shown.as_tuple().exponent)  # type: ignore[arg-type]
    return any(exact.quantize(places, rounding=mode) == shown for mode in (ROUND_HALF_EVEN, ROUND_HALF_UP))


def check(claim: Claim, results: Path, cache: Dict[str, Any]) -> Optional[str]:
    """None if the claim holds, else the problem (one line, without the DOC:LINE prefix)."""
    if claim.file not in cache:
        path = results / claim.file
        try:
            cache[claim.file] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            cache[claim.file] = "no such results file"
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            cache[claim.file] = "unreadable results file ({})".format(exc)
    data = cache[claim.file]
    if isinstance(data, str):
        return data
    try:
        value = lookup(data, claim.key)
    except ValueError as exc:
        return str(exc)
    values = value if isinstance(value, list) else [value]
    if not values or not all(_is_number(v) for v in values):
        return "file says {}, not a number or a list of numbers".format(json.dumps(value))
    printed = numbers(claim.text, claim.start)
    if len(printed) < len(values):
        return "text says {} (needs {} number{} before the marker), file says {}".format(
            ", ".join(printed) or "no number", len(values), "s" * (len(values) > 1), _show(values, claim.scale))
    printed = printed[len(printed) - len(values):]
    if all(matches(p, v, claim.scale) for p, v in zip(printed, values)):
        return None
    return "text says {}, file says {}".format(", ".join(printed), _show(values, claim.scale))


def _show(values: Sequence[Any], scale: Optional[Decimal]) -> str:
    shown = ", ".join(repr(v) for v in values)
    return shown + (" (times {})".format(scale) if scale is not None else "")


def documents(root: Path) -> List[Path]:
    return [p for p in [root / "README.md"] + sorted((root / "docs").glob("*.md")) if p.is_file()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("docs", nargs="*", help="markdown files (default: README.md and docs/*.md under --root)")
    parser.add_argument("--root", default=str(ROOT), help="the repository (results under benchmarks/results)")
    args = parser.parse_args(argv)
    root = Path(args.root)
    docs = [Path(d) for d in args.docs] or documents(root)
    results = root / "benchmarks" / "results"
    cache: Dict[str, Any] = {}
    problems = checked = 0
    for doc in docs:
        try:
            text = doc.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            print("{}: cannot read ({})".format(doc, exc))
            problems += 1
            continue
        shown = doc.relative_to(root).as_posix() if root in doc.resolve().parents else str(doc)
        for claim in markers(text, shown):
            checked += 1
            problem = check(claim, results, cache)
            if problem:
                problems += 1
                print("{}:{}: {}#{}: {}".format(claim.doc, claim.line, claim.file,
                                                claim.key + ("*{}".format(claim.scale) if claim.scale else ""), problem))
    print("{} claim{} checked in {} document{}: {}".format(checked, "s" * (checked != 1), len(docs),
                                                          "s" * (len(docs) != 1),
                                                          "{} wrong".format(problems) if problems else "all hold"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
