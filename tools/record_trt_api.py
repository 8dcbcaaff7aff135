"""Record the Python API surface of real TensorRT bindings, without a GPU and without TensorRT's libraries.

    python tools/record_trt_api.py                      # every version in VERSIONS
    python tools/record_trt_api.py 10.16.1.11 11.4.0.106 # some of them
    python tools/record_trt_api.py --wheel PATH.whl     # a wheel already on disk

For each version: ``pip download --no-deps`` of its bindings wheel from PyPI (about 1 MB from 8.6 on;
8.5 only exists as the full ``tensorrt`` wheel, 550 MB, cached under --cache), the extension module
and the package ``__init__.py`` copied to a scratch folder, and the libnvinfer* libraries it links
against replaced by stub shared objects made with gcc (every TensorRT symbol it imports defined as a
function returning 0), so that the extension loads on any x86-64 Linux. It is then imported in a
fresh interpreter of the wheel's Python version and walked (``--walk``): module names, enums with
their members and values, classes with their methods (parameter names and return type), properties
(read-only or settable) and class attributes, deprecation marks (``[DEPRECATED]`` or "Deprecated in
TensorRT X.Y" in the docstring of the member, the enum member or the class's ``:ivar`` entry), and
probes of behaviour that needs no GPU (a calibrator subclass that skips the base ``__init__``).
Nothing of TensorRT runs: no object that needs libnvinfer is created.

The 8.5 wheel is for CPython 3.6-3.10 only; it is read with a Python 3.8 (--python38, default
``python3.8`` on PATH, e.g. the project's floor venv ``.venv38/bin/python``). The others are read
with the Python running this script, which must match their tag (3.11 here; pip downloads the wheel
for the running interpreter).

Output: tests/deploy/trt_api/tensorrt-VERSION.json (sorted keys: diffs between versions stay readable).
Neither the wheels nor TensorRT are requirements of the project: this is a maintainer's tool.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "deploy" / "trt_api"
# version -> pip requirement of the smallest wheel holding that version's bindings
VERSIONS = {
    "8.5.2.2": "tensorrt==8.5.2.2",  # JetPack 5.1 ships 8.5.2.2; the full wheel (CUDA 11, cuDNN 8)
    "8.6.1": "tensorrt_bindings==8.6.1",
    "10.0.1": "tensorrt-cu12-bindings==10.0.1",
    "10.1.0": "tensorrt-cu12-bindings==10.1.0",  # implicit INT8 calibration deprecated here
    "10.3.0": "tensorrt-cu12-bindings==10.3.0",  # JetPack 6.1/6.2
    "10.8.0.43": "tensorrt-cu12-bindings==10.8.0.43",
    "10.12.0.36": "tensorrt-cu12-bindings==10.12.0.36",  # weak typing (FP16/INT8 flags) deprecated here
    "10.16.1.11": "tensorrt-cu12-bindings==10.16.1.11",
    "11.0.0.114": "tensorrt-cu13-bindings==11.0.0.114",
    "11.4.0.106": "tensorrt-cu13-bindings==11.4.0.106",
}
DEPRECATED = re.compile(r"\[DEPRECATED\]|\bDeprecated in TensorRT\b")
SINCE = re.compile(r"Deprecated in TensorRT (\d+\.\d+)")


# -- inside the interpreter that imported the bindings -------------------------------------------------
def _mark(doc: str) -> Optional[str]:
    """'' or the version it names when ``doc`` marks something deprecated; None when it does not.

    A mark inside parentheses is about something else (10.8's MemoryPoolType.WORKSPACE mentions
    "the IAlgorithmSelector interface ([DEPRECATED] ...)"), so bracketed asides are dropped first."""
    prose = doc or ""
    while True:
        shorter = re.sub(r"\([^()]*\)", "", prose)
        if shorter == prose:
            break
        prose = shorter
    if not DEPRECATED.search(prose):
        return None
    since = SINCE.search(prose)
    return since.group(1) if since else ""


def _short_type(text: str) -> str:
    return re.sub(r"\btensorrt(_bindings)?\.(tensorrt\.)?", "", text.strip())


def _split_params(text: str) -> List[str]:
    depth, part, parts = 0, "", []
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(part)
            part = ""
        else:
            part += ch
    if part.strip():
        parts.append(part)
    return [p.split(":")[0].split("=")[0].strip() for p in parts]


def _signatures(name: str, doc: str) -> List[str]:
    """'(a, b) -> R' for each overload pybind11 wrote at the head of ``doc``."""
    out = []
    for line in (doc or "").splitlines():
        found = re.match(r"^\s*(?:\d+\. )?" + re.escape(name) + r"\((.*)\)(?: -> (.*))?$", line)
        if found and found.group(1) != "*args, **kwargs":
            params = [p for p in _split_params(found.group(1)) if p and p != "self"]
            out.append("({}) -> {}".format(", ".join(params), _short_type(found.group(2) or "None")))
    return out


def _enum_docs(doc: str) -> Dict[str, str]:
    """Member name -> its text in a pybind11 enum docstring ('Members:' then '  NAME : text')."""
    out: Dict[str, str] = {}
    current = None
    for line in (doc or "").split("Members:", 1)[-1].splitlines():
        head = re.match(r"^  (\w+) : ?(.*)$", line)
        if head:
            current = head.group(1)
            out[current] = head.group(2)
        elif current is not None:
            out[current] += " " + line.strip()
    return out


def _ivar_docs(doc: str) -> Dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r":ivar (\w+):(.*?)(?=:ivar |\Z)", doc or "", re.S)}


def _is_enum(obj: Any) -> bool:
    return inspect.isclass(obj) and isinstance(getattr(obj, "__members__", None), dict)


def _enum(obj: Any) -> Dict[str, Any]:
    docs = _enum_docs(obj.__doc__ or "")
    members = {k: int(v) for k, v in obj.__members__.items()}
    deprecated = {k: _mark(docs.get(k, "")) for k in members}
    return {"members": members, "deprecated": {k: v for k, v in deprecated.items() if v is not None}}


def _probe_subclass(cls: Any) -> Dict[str, str]:
    """How the binding treats a Python subclass that does, or skips, the base ``__init__``."""
    def outcome(init: Any) -> str:
        try:
            type("Probe", (cls,), {"__init__": init})()
        except Exception as exc:  # noqa: BLE001 - the outcome is what is recorded
            return "{}: {}".format(type(exc).__name__, str(exc).splitlines()[0][:200])
        return "accepted"
    return {"subclass_with_base_init": outcome(lambda self: cls.__init__(self)),
            "subclass_without_base_init": outcome(lambda self: None)}


def _class(obj: Any, enums: Dict[str, Any], qualname: str) -> Dict[str, Any]:
    ivars = _ivar_docs(obj.__doc__ or "")
    members: Dict[str, str] = {}
    deprecated: Dict[str, str] = {}
    for name in dir(obj):
        if name.startswith("_"):
            continue
        raw = None
        for klass in inspect.getmro(obj):
            if name in vars(klass):
                raw = vars(klass)[name]
                break
        doc = ""
        if isinstance(raw, property):
            members[name] = "property" if raw.fset is None else "property rw"
            doc = (raw.__doc__ or "") + " " + ivars.get(name, "")
        elif isinstance(raw, (staticmethod, classmethod)):
            func = raw.__func__
            members[name] = "static " + " | ".join(_signatures(name, func.__doc__ or ""))
            doc = func.__doc__ or ""
        elif _is_enum(raw):
            members[name] = "enum"
            enums["{}.{}".format(qualname, name)] = _enum(raw)
        elif inspect.isclass(raw):
            members[name] = "class"
        elif callable(raw):
            members[name] = "method " + " | ".join(_signatures(name, getattr(raw, "__doc__", "") or ""))
            doc = getattr(raw, "__doc__", "") or ""
        else:
            members[name] = "value " + _short_type(type(raw).__qualname__ if raw is not None else "None")
            doc = ivars.get(name, "")
        members[name] = members[name].strip()
        mark = _mark(doc)
        if mark is not None:
            deprecated[name] = mark
    entry: Dict[str, Any] = {"members": members}
    bases = [_short_type(b.__qualname__) for b in obj.__bases__ if b.__qualname__ != "pybind11_object"]
    if bases:
        entry["bases"] = bases
    if deprecated:
        entry["deprecated"] = deprecated
    own = _mark((obj.__doc__ or "").split(":ivar", 1)[0])
    if own is not None:
        entry["class_deprecated"] = own
    if "get_batch" in members and "read_calibration_cache" in members:
        entry["probes"] = _probe_subclass(obj)
    return entry


def walk() -> Dict[str, Any]:
    import tensorrt  # the staged one: PYTHONPATH points at it

    module: Dict[str, str] = {}
    enums: Dict[str, Any] = {}
    classes: Dict[str, Any] = {}
    deprecated: Dict[str, str] = {}
    for name in sorted(dir(tensorrt)):
        if name.startswith("_") and name != "__version__":
            continue
        obj = getattr(tensorrt, name)
        if inspect.ismodule(obj):
            continue  # imports of the package's __init__ (os, sys, ctypes), not API
        if _is_enum(obj):
            module[name] = "enum"
            enums[name] = _enum(obj)
        elif inspect.isclass(obj):
            module[name] = "class"
            classes[name] = _class(obj, enums, name)
            if "class_deprecated" in classes[name]:
                deprecated[name] = classes[name]["class_deprecated"]
        elif callable(obj):
            module[name] = ("function " + " | ".join(_signatures(name, obj.__doc__ or ""))).strip()
            mark = _mark(obj.__doc__ or "")
            if mark is not None:
                deprecated[name] = mark
        else:
            module[name] = "value " + type(obj).__qualname__
    return {"version": str(tensorrt.__version__), "module": module, "deprecated": deprecated, "enums": enums,
            "classes": classes, "python": "{}.{}".format(*sys.version_info[:2])}


# -- staging: the extension over stub libraries ---------------------------------------------------------
def _run(cmd: List[str], **kw: Any) -> str:
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, universal_newlines=True, **kw).stdout


def stage(wheel: Path, where: Path) -> Path:
    """A folder holding package ``tensorrt`` (the wheel's __init__.py and extension, stub libraries)."""
    pkg = where / "tensorrt"
    pkg.mkdir(parents=True)
    with zipfile.ZipFile(str(wheel)) as archive:
        names = archive.namelist()
        ext = [n for n in names if re.search(r"(^|/)tensorrt(_bindings)?/tensorrt\.[^/]*so$", n)]
        if len(ext) != 1:
            raise SystemExit("{}: expected one tensorrt extension module, found {}".format(wheel, ext))
        init = ext[0].rsplit("/", 1)[0] + "/__init__.py"
        for member, target in ((ext[0], "tensorrt.so"), (init, "__init__.py")):
            with archive.open(member) as src, open(str(pkg / target), "wb") as dst:
                shutil.copyfileobj(src, dst)
    so = str(pkg / "tensorrt.so")
    needed = re.findall(r"Shared library: \[(libnv[^\]]+)\]", _run(["readelf", "-d", so]))
    undefined = [line.split()[-1] for line in _run(["nm", "-D", "--undefined-only", so]).splitlines()
                 if line.split()[0] == "U" and "@" not in line]
    ours = [s for s in undefined if not re.match(r"_?Py|dl(open|sym|close|error)$", s)]
    source = where / "stub.c"
    source.write_text("".join("void *{}(void) {{ return 0; }}\n".format(s) for s in ours))
    empty = where / "empty.c"
    empty.write_text("\n")
    for i, lib in enumerate(needed):  # every symbol in the first; the others only satisfy the loader
        _run(["gcc", "-shared", "-fPIC", "-o", str(pkg / lib), "-Wl,-soname," + lib,
              str(source if i == 0 else empty)])
    return where


def download(requirement: str, cache: Path, python_version: Optional[str]) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    name, version = re.split(r"==", requirement)
    pattern = "{}-{}-*.whl".format(re.sub(r"[-_.]+", "_", name), version)
    found = sorted(cache.glob(pattern))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(cache)]
        if python_version:
            cmd += ["--python-version", python_version, "--platform", "manylinux_2_17_x86_64"]
        subprocess.run(cmd + [requirement], check=True, env=dict(os.environ, PIP_CONSTRAINT=""))
        found = sorted(cache.glob(pattern))
    if len(found) != 1:
        raise SystemExit("{}: expected one wheel in {}, found {}".format(requirement, cache, found))
    return found[0]


def wheel_python(wheel: Path) -> Tuple[int, int]:
    tag = re.search(r"-cp(\d)(\d+)-", wheel.name)
    return (int(tag.group(1)), int(tag.group(2))) if tag else sys.version_info[:2]


def record(wheel: Path, python: str) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="trt-api-") as tmp:
        stage(wheel, Path(tmp))
        env = dict(os.environ, PYTHONPATH=tmp, PYTHONWARNINGS="ignore")
        raw = _run([python, str(Path(__file__).resolve()), "--walk"], env=env, cwd=tmp)
    surface = json.loads(raw)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    surface["recorded_from"] = {"wheel": wheel.name, "sha256": digest,
                                "how": "extension loaded over stub libnvinfer* (tools/record_trt_api.py)"}
    return surface


def dumps(surface: Dict[str, Any]) -> str:
    """JSON with one line per module name, enum and class: small, and a diff names what changed."""
    lines = []
    for key in sorted(surface):
        value = surface[key]
        if isinstance(value, dict) and value:
            inner = ",\n".join("  {}: {}".format(json.dumps(k), json.dumps(value[k], sort_keys=True))
                               for k in sorted(value))
            lines.append(" {}: {{\n{}\n }}".format(json.dumps(key), inner))
        else:
            lines.append(" {}: {}".format(json.dumps(key), json.dumps(value, sort_keys=True)))
    return "{\n" + ",\n".join(lines) + "\n}\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", nargs="*", help="versions from VERSIONS (default: all)")
    parser.add_argument("--wheel", type=Path, action="append", default=[], help="record this wheel instead")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "trt-wheels")
    parser.add_argument("--python38", default="python3.8", help="interpreter for cp38 wheels (8.5)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--walk", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.walk:
        json.dump(walk(), sys.stdout, sort_keys=True)
        return 0
    unknown = [v for v in args.versions if v not in VERSIONS]
    if unknown:
        parser.error("unknown version {}; known: {}".format(unknown[0], ", ".join(VERSIONS)))
    wheels = list(args.wheel)
    for version in args.versions or ([] if wheels else list(VERSIONS)):
        legacy = VERSIONS[version].startswith("tensorrt==8.5")
        wheels.append(download(VERSIONS[version], args.cache, "3.8" if legacy else None))
    args.out.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        here = wheel_python(wheel)
        python = sys.executable if here == sys.version_info[:2] else \
            args.python38 if here == (3, 8) else "python{}.{}".format(*here)
        surface = record(wheel, python)
        path = args.out / "tensorrt-{}.json".format(surface["version"])
        path.write_text(dumps(surface))
        print("{}: {} classes, {} enums, {} deprecation marks, {} KB".format(
            path.relative_to(ROOT) if ROOT in path.resolve().parents else path, len(surface["classes"]),
            len(surface["enums"]), len(surface["deprecated"]) + sum(
                len(c.get("deprecated", {})) for c in list(surface["classes"].values()) + list(surface["enums"].values())),
            path.stat().st_size // 1024))
    return 0


if __name__ == "__main__":
    sys.exit(main())
