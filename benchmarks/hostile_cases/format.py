"""Hostile files in the tensor file format (issue 21, items 1 and 5): pickle payloads where a
checkpoint, run state or state dict belongs, old pickle files without --trust-pickle, flipped bits,
truncated and forged safetensors headers, header fields and dtypes a checkpoint must not have,
special files, and `convert`'s error paths.

A pickle payload here names the module ``evilmod`` (GLOBAL evilmod.factory): any unpickler that
resolved it would import evilmod, which writes the table's marker file. Cases have the same outcome
in both lanes, except the old-format ones, whose expected code follows the torch version (torch >=
2.10 reads old files without --trust-pickle).
"""
from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

try:
    from importlib.metadata import version as _version
except ImportError:  # pragma: no cover
    _version = None  # type: ignore[assignment]

AREA = "format"
EVIL_PICKLE = b"\x80\x02cevilmod\nfactory\n)R."  # protocol 2: import evilmod, call factory()


def _torch_reads_pickle() -> bool:
    try:
        major, minor = (int(p) for p in _version("torch").split("+")[0].split(".")[:2])  # type: ignore[misc]
    except Exception:
        return False
    return (major, minor) >= (2, 10)


OLD_OK = 0 if _torch_reads_pickle() else 1  # an old pickle file without --trust-pickle


# -- staging ------------------------------------------------------------------------------------------
def _stage(name: str, make: Callable[[Path, Dict[str, Path]], Path]):
    """A setup that makes the file (or directory) ``name`` in the case directory."""
    def setup(case: Path, f: Dict[str, Path]) -> Tuple[Dict[str, Path], Optional[Callable[[], None]]]:
        return {name: make(case, f)}, None
    return setup


def _tree(f: Dict[str, Path], key: str = "multi") -> Any:
    from irep_deploy.tensorfile import load_tree
    return load_tree(f[key], "checkpoint").tree


def _saved(edit: Callable[[Any], None], key: str = "multi"):
    """A checkpoint written by the real writer (valid checksum) after ``edit`` of its tree."""
    def make(case: Path, f: Dict[str, Path]) -> Path:
        from irep_deploy.tensorfile import save_tree
        tree = _tree(f, key)
        edit(tree)
        save_tree(case / "edited.pt", tree)
        return case / "edited.pt"
    return make


def _old(content: Callable[[Dict[str, Path]], Any]):
    """An old-format file: ``content`` written with torch.save (what earlier versions wrote)."""
    def make(case: Path, f: Dict[str, Path]) -> Path:
        import torch
        torch.save(content(f), str(case / "old.pt"))
        return case / "old.pt"
    return make


def _payload_zip(case: Path, f: Dict[str, Path]) -> Path:
    path = case / "evil.pt"
    with zipfile.ZipFile(str(path), "w") as z:  # torch.save's layout, with a hostile data.pkl
        z.writestr("archive/data.pkl", EVIL_PICKLE)
        z.writestr("archive/version", "3\n")
    return path


def _payload_raw(case: Path, f: Dict[str, Path]) -> Path:
    path = case / "evil_raw.pt"
    path.write_bytes(EVIL_PICKLE)  # torch's legacy (non-zip) format starts like this too
    return path


def _run_with(state: Callable[[Path, Dict[str, Path]], Path]):
    """A run directory whose state.pt is the file ``state`` makes."""
    def make(case: Path, f: Dict[str, Path]) -> Path:
        made = state(case, f)
        run = case / "run"
        run.mkdir()
        os.replace(str(made), str(run / "state.pt"))
        return run
    return make


def _flipped(key: str, tensor: str):
    """A copy of fixture ``key`` with one bit flipped inside the bytes of ``tensor``."""
    def make(case: Path, f: Dict[str, Path]) -> Path:
        data = bytearray(f[key].read_bytes())
        size = struct.unpack("<Q", bytes(data[:8]))[0]
        begin = json.loads(bytes(data[8:8 + size]))[tensor]["data_offsets"][0]
        data[8 + size + begin + 2] ^= 0x04
        path = case / "flipped.pt"
        path.write_bytes(bytes(data))
        return path
    return make


def _header_byte_edit(old: bytes, new: bytes):
    """A copy of the multi-branch checkpoint with ``old`` replaced in its header (same length)."""
    def make(case: Path, f: Dict[str, Path]) -> Path:
        data = f["multi"].read_bytes()
        size = struct.unpack("<Q", data[:8])[0]
        assert len(old) == len(new) and old in data[8:8 + size]
        path = case / "edited.pt"
        path.write_bytes(data[:8 + size].replace(old, new, 1) + data[8 + size:])
        return path
    return make


def _raw(header: Any, body: bytes = b"", size: Optional[int] = None):
    """A safetensors-shaped file with this header (JSON of a dict, or raw bytes) and body."""
    def make(case: Path, f: Dict[str, Path]) -> Path:
        text = header if isinstance(header, bytes) else json.dumps(header).encode()
        path = case / "forged.pt"
        path.write_bytes(struct.pack("<Q", len(text) if size is None else size) + text + body)
        return path
    return make


def _ours(tree_text: str):
    """A file with our metadata keys, a structure ``tree_text`` and its correct checksum."""
    def make(case: Path, f: Dict[str, Path]) -> Path:
        from irep_deploy.tensorfile import checksum
        meta = {"irep-deploy": "1", "irep-deploy.tree": tree_text, "irep-deploy.sha256": checksum({}, tree_text)}
        return _raw({"__metadata__": meta})(case, f)
    return make


def _fifo(case: Path, f: Dict[str, Path]) -> Path:
    path = case / "fifo.pt"
    os.mkfifo(str(path))  # no writer: a blocking open would wait forever
    return path


def _state_file(case: Path, f: Dict[str, Path]) -> Path:
    from irep_deploy.runs import write_run_state
    from irep_deploy.train import TrainConfig
    write_run_state(case, "train", TrainConfig(), epoch=1, model={"w": _tree(f)["state_dict"]["fc.weight"]})
    return case / "state.pt"


def _sdict(f: Dict[str, Path], key: str, value: Any) -> Dict[str, Any]:
    tree = _tree(f)
    tree["state_dict"] = dict(tree["state_dict"], **{key: value})
    return tree


def _bn_var(tree: Any, value: float) -> None:
    key = next(k for k in tree["state_dict"] if k.endswith("running_var"))
    tree["state_dict"][key].fill_(value)


def _set(field: str, value: Any, header: bool = True) -> Callable[[Any], None]:
    def edit(tree: Any) -> None:
        (tree["header"] if header else tree)[field] = value
    return edit


def _sparse(f: Dict[str, Path]) -> Any:
    return _sdict(f, "fc.weight", _tree(f)["state_dict"]["fc.weight"].to_sparse())


def _complex(f: Dict[str, Path]) -> Any:
    import torch
    return _sdict(f, "fc.bias", torch.zeros(10, dtype=torch.complex64))


def _cyclic(f: Dict[str, Path]) -> Any:
    """A run state whose history holds itself (a pickle's memo can build cycles)."""
    history: list = []
    history.append(history)
    return {"format": "irep-deploy-train-state", "format_version": 1, "config": {}, "history": history}


def cases(H) -> list:
    def C(category: str, argv: str, code: int, names: str, **kwargs: Any):
        kwargs.setdefault("label", "{} [{}]".format(argv, names or "ok"))  # many argv alike: the text tells them apart
        return H.H(AREA, category, argv, code, names, **kwargs)

    evil_zip, evil_raw = _stage("p_zip", _payload_zip), _stage("p_raw", _payload_raw)
    old_multi = _stage("old", _old(lambda f: _tree(f)))
    data = "--dataset fashion-mnist --data-root {tiny_fmnist}"
    own = ("{case}",)
    return [
        # a pickle payload where a checkpoint, run state or state dict belongs: never unpickled
        C("pickle payload", "fuse {p_zip} {arch} -o {case}/d.pt", 1, "{p_zip}", setup=evil_zip),
        C("pickle payload", "fuse {p_raw} {arch} -o {case}/d.pt", 1, "{p_raw}", setup=evil_raw),
        C("pickle payload", "fuse {p_zip} {arch} -o {case}/d.pt --trust-pickle", 1, "{p_zip}", setup=evil_zip),
        C("pickle payload", "export {p_zip} -o {case}/m.onnx", 1, "{p_zip}", setup=evil_zip),
        C("pickle payload", "bench {p_raw} --backend torch --duration 0.01", 1, "{p_raw}", setup=evil_raw),
        C("pickle payload", "eval {p_zip} " + data, 1, "{p_zip}", setup=evil_zip),
        C("pickle payload", "train --resume {run}", 1, "state.pt", setup=_stage("run", _run_with(_payload_zip)),
          own=own),
        C("pickle payload", "search --resume {run}", 1, "state.pt", setup=_stage("run", _run_with(_payload_raw)),
          own=own),
        C("pickle payload", "train -o {case}/run --model torch.nn:Identity --weights {p_zip} --epochs 1 --batch-size 8 " + data,
          1, "{p_zip}", setup=evil_zip, own=own),
        C("pickle payload", "train -o {case}/run --backbone resnet18 --width 0.125 --init-from {p_raw} --epochs 1 --batch-size 8 "
          + data, 1, "{p_raw}", setup=evil_raw, own=own),
        C("pickle payload", "convert {p_zip} -o {case}/new.pt", 1, "{p_zip}", setup=evil_zip),
        C("pickle payload", "convert {p_raw} -o {case}/new.pt --trust-pickle", 1, "{p_raw}", setup=evil_raw),
        # old pickle files with plain content: read with --trust-pickle (or on torch >= 2.10)
        C("old pickle file", "fuse {old} {arch} -o {case}/d.pt --trust-pickle", 0, "", setup=old_multi, own=own),
        C("old pickle file", "fuse {old} {arch} -o {case}/d.pt", OLD_OK, "{old}", setup=old_multi, own=own),
        C("old pickle file", "convert {old} -o {case}/new.pt --trust-pickle", 0, "", setup=old_multi, own=own),
        C("old pickle file", "convert {old} -o {old} --trust-pickle", 2, "{old}", setup=old_multi),
        C("old pickle file", "fuse {old} {arch} -o {case}/d.pt --trust-pickle", 1, "sparse",
          setup=_stage("old", _old(_sparse)), process=True,  # a real process: torch's warnings reach stderr
          label="fuse old.pt with a sparse tensor --trust-pickle"),
        C("old pickle file", "fuse {old} {arch} -o {case}/d.pt --trust-pickle", 1, "complex64",
          setup=_stage("old", _old(_complex)), label="fuse old.pt with a complex64 tensor --trust-pickle"),
        # silent corruption: one bit, anywhere
        C("flipped bit", "fuse {bad} {arch} -o {case}/d.pt", 1, "checksum mismatch",
          setup=_stage("bad", _flipped("multi", "state_dict.fc.weight"))),
        C("flipped bit", "export {bad} -o {case}/m.onnx", 1, "{bad}",
          setup=_stage("bad", _flipped("deploy", "state_dict.conv1.weight"))),
        C("flipped bit", "eval {bad} " + data, 1, "checksum mismatch",
          setup=_stage("bad", _flipped("deploy", "state_dict.fc.bias"))),
        C("flipped bit", "bench {bad} --backend torch --duration 0.01", 1, "{bad}",
          setup=_stage("bad", _flipped("deploy", "state_dict.fc.bias"))),
        C("flipped bit", "fuse {bad} {arch} -o {case}/d.pt", 1, "checksum mismatch",
          setup=_stage("bad", _header_byte_edit(b'\\"width\\",0.125', b'\\"width\\",0.126')),
          label="fuse a checkpoint whose header width was edited in place"),
        C("flipped bit", "train --resume {run}", 1, "checksum mismatch", own=own,
          setup=_stage("run", _run_with(lambda c, f: _flipped("state", "model.w")(c, dict(f, state=_state_file(c, f)))))),
        # truncated and forged safetensors files: refused before safetensors parses them
        C("forged safetensors", "fuse {bad} {arch}", 1, "truncated", setup=_stage(
            "bad", lambda c, f: (c / "half.pt").write_bytes(f["multi"].read_bytes()[:200000]) and c / "half.pt")),
        C("forged safetensors", "fuse {bad} {arch}", 1, "{bad}", setup=_stage("bad", _raw(b"{}", size=1 << 60))),
        C("forged safetensors", "fuse {bad} {arch}", 1, "claims bytes", setup=_stage("bad", _raw(
            {"a": {"dtype": "F32", "shape": [1 << 39, 1 << 39], "data_offsets": [0, 1 << 80]}}, bytes(16)))),
        C("forged safetensors", "fuse {bad} {arch}", 1, "overlap", setup=_stage("bad", _raw(
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
             "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)))),
        C("forged safetensors", "fuse {bad} {arch}", 1, "needs 12 bytes", setup=_stage("bad", _raw(
            {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]}}, bytes(4)))),
        C("forged safetensors", "fuse {bad} {arch}", 1, "not valid JSON", setup=_stage("bad", _raw(b"{\xff\xfe}"))),
        C("forged safetensors", "fuse {bad} {arch}", 1, "map of strings", setup=_stage("bad", _raw(
            {"__metadata__": {"irep-deploy": 1}}))),
        C("forged safetensors", "fuse {bad} {arch}", 1, "structure is not valid JSON", setup=_stage("bad", _ours("{no"))),
        C("forged safetensors", "fuse {bad} {arch}", 1, "malformed structure", setup=_stage(
            "bad", _ours('{"X": 1}'))),
        C("forged safetensors", "fuse {bad} {arch}", 1, "does not hold", setup=_stage(
            "bad", _ours('{"D": [["w", {"t": "nowhere"}]]}'))),
        C("forged safetensors", "fuse {bad} {arch}", 1, "dtype 'C64'", setup=_stage("bad", _raw(
            {"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8)))),
        C("forged safetensors", "fuse {bad} {arch}", 1, "dtype 'F8_E4M3'", setup=_stage("bad", _raw(
            {"a": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, bytes(2)))),
        # header fields a checkpoint must not have (written by the real writer: the checksum is right)
        C("header field", "fuse {bad} {arch}", 1, "format version -5 is not a positive integer",
          setup=_stage("bad", _saved(_set("format_version", -5, header=False)))),
        C("header field", "fuse {bad} {arch}", 1, "format version '1' is not a positive integer",
          setup=_stage("bad", _saved(_set("format_version", "1", header=False)))),
        C("header field", "fuse {bad} {arch}", 1, "format version True is not a positive integer",
          setup=_stage("bad", _saved(_set("format_version", True, header=False)))),
        C("header field", "fuse {bad} {arch}", 1, "newer than this irep-deploy reads",
          setup=_stage("bad", _saved(_set("format_version", 99, header=False)))),
        C("header field", "fuse {bad} {arch}", 1, "header names the network 'vgg16_cifar'",
          setup=_stage("bad", _saved(_set("backbone", "vgg16_cifar")))),
        C("header field", "export {bad} -o {case}/m.onnx", 1, "unknown op 'evil_op'",
          setup=_stage("bad", _saved(_set("ops", ["conv3x3", "evil_op"])))),
        C("header field", "fuse {bad} {arch}", 1, "lists an op twice",
          setup=_stage("bad", _saved(_set("ops", ["conv3x3", "conv3x3"])))),
        C("header field", "fuse {bad} {arch}", 1, "BatchNorm running variance) holds negative",
          setup=_stage("bad", _saved(lambda t: _bn_var(t, -1.0)))),
        C("header field", "eval {bad} " + data, 1, "BatchNorm running variance) holds negative",
          setup=_stage("bad", _saved(lambda t: _bn_var(t, -1.0)))),
        C("header field", "fuse {state} {arch}", 1, "resume state", setup=_stage("state", _state_file)),
        # special files and files that are not checkpoints: refused unread, without waiting
        C("special file", "fuse /dev/zero {arch}", 1, "/dev/zero: is a character device"),
        C("special file", "fuse {fifo} {arch}", 1, "is a FIFO", setup=_stage("fifo", _fifo)),
        C("special file", "convert {fifo} -o {case}/new.pt", 1, "{fifo}", setup=_stage("fifo", _fifo)),
        C("special file", "fuse {zeros} {arch}", 1, "not a readable checkpoint"),
        C("special file", "fuse {case} {arch}", 1, "is a directory"),
        # convert's error paths
        C("convert", "convert {multi} -o {case}/new.pt", 1, "already in the safetensors format"),
        C("convert", "convert {missing} -o {case}/new.pt", 1, "no such file"),
        C("convert", "convert {arch} -o {case}/new.pt", 1, "not a readable"),
        C("convert", "convert {old} -o {case}/new.pt --trust-pickle", 1, "not an irep-deploy checkpoint",
          setup=_stage("old", _old(lambda f: [1, 2, 3]))),
        C("convert", "convert {old} -o {case}/new.pt --trust-pickle", 1, "nested deeper",
          setup=_stage("old", _old(_cyclic)), label="convert a cyclic old run state --trust-pickle"),
        C("convert", "convert {old} -o {old}/sub/new.pt --trust-pickle", 1, "not a directory", setup=old_multi),
        C("convert", "convert {old}", 2, "-o", setup=old_multi),
    ]
