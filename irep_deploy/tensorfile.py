"""One file format for everything irep-deploy writes with tensors in it: a safetensors file.

A *tree* (nested dicts, lists and tuples of JSON scalars and tensors: a checkpoint, a run state with
its optimizer state, a plain state dict) is written as ONE safetensors file: the tensors go into
safetensors' tensor table, named by their key path (``state_dict.stem.conv.weight``), and the
structure goes as JSON into the file's ``__metadata__`` with a sha256 of the contents. Reading it
never touches pickle: safetensors' own parser reads the table, ``json`` the structure.

Metadata keys::

    irep-deploy         "1" (this container's version)
    irep-deploy.tree    the structure: scalars as JSON values; {"D": [[key, value], ...]} a dict (keys
                        keep their type: optimizer states have int keys), {"L": [...]} a list,
                        {"T": [...]} a tuple, {"t": "tensor name"} a tensor
    irep-deploy.sha256  sha256 over the tensors sorted by name (each: name, dtype, shape, then its
                        bytes), then the tree text: one flipped bit anywhere is a one-line error

A safetensors file without these keys (one from elsewhere: a state dict saved by another tool) reads
as the flat dict of its tensors. Files keep the names users know (``ckpt.pt``, ``deploy.pt``,
``supernet.pt``, ``state.pt``): the format is recognized by content, never by name.

Old ``torch.save`` files (a zip archive or a bare pickle) go through torch's unpickler, which can
run code or corrupt memory on torch < 2.10 even with ``weights_only=True`` (CVE-2025-32434,
CVE-2026-24747). They are read only on torch >= 2.10 or when the caller passes ``trust_pickle``, and
then always with ``weights_only=True``; the check is on the file's first bytes, before any
unpickler is reached.

Only real floating, integer and bool tensors, dense, are written or read (no complex, no float8, no
sparse); shapes and byte ranges are checked against the file before safetensors parses it.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import struct
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple, Type, Union

import torch

from ._io import atomic_write, clip, no_typed_storage_warning, quote, read_bounded
from .errors import CheckpointError, IrepError, first_line

PathLike = Union[str, "os.PathLike[str]"]

FORMAT_KEY = "irep-deploy"
TREE_KEY = "irep-deploy.tree"
SHA_KEY = "irep-deploy.sha256"
CONTAINER_VERSION = "1"

MAX_BYTES = 8 << 30  # larger than any SuperNet run state we write; bounds what a reader takes in
MAX_HEADER_BYTES = 64 << 20  # safetensors itself refuses headers over 100 MB
MAX_DEPTH = 64
MAX_DIMS = 16
#: torch >= this reads old pickle files without --trust-pickle (its weights_only unpickler is safe)
SAFE_PICKLE_TORCH = (2, 10)

# the dtypes the format holds: real floating, integer, bool (safetensors' codes, element sizes)
_DTYPES: Dict[str, Tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1), "U8": (torch.uint8, 1), "I8": (torch.int8, 1), "I16": (torch.int16, 2),
    "I32": (torch.int32, 4), "I64": (torch.int64, 8), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "F32": (torch.float32, 4), "F64": (torch.float64, 8)}
_CODES = {dtype: code for code, (dtype, _) in _DTYPES.items()}

_ZIP = (b"PK\x03\x04", b"PK\x05\x06")  # torch.save's archive (and an empty one)
_PICKLE_PROTO = 0x80  # the PROTO opcode every pickle of protocol >= 2 starts with (torch's legacy format)


@dataclass
class Loaded:
    """What a file held: the tree, the checksum it carried (None: a file from elsewhere), and whether
    it was an old pickle file (read because the torch version or the caller allowed it)."""

    tree: Any
    sha256: Optional[str]
    pickled: bool


def torch_reads_pickle_safely() -> bool:
    """Whether this torch's ``weights_only`` unpickler is trusted with hostile files (torch >= 2.10)."""
    parts = torch.__version__.split("+")[0].split(".")
    try:
        version = (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        return False
    return version >= SAFE_PICKLE_TORCH


# -- writing --------------------------------------------------------------------------------------------
def dumps(tree: Any) -> Tuple[bytes, str]:
    """The safetensors bytes of ``tree`` (see the module docstring) and their checksum."""
    from safetensors.torch import save

    tensors: Dict[str, torch.Tensor] = {}
    structure = _encode(tree, [], tensors, set(), 0)
    text = json.dumps(structure, separators=(",", ":"))
    digest = checksum(tensors, text)
    return save(tensors, metadata={FORMAT_KEY: CONTAINER_VERSION, TREE_KEY: text, SHA_KEY: digest}), digest


def save_tree(path: PathLike, tree: Any) -> str:
    """Write ``tree`` as a safetensors file, atomically (all or nothing); returns its checksum."""
    data, digest = dumps(tree)
    with atomic_write(path, "wb") as handle:
        handle.write(data)
    return digest


def _encode(value: Any, where: List[str], tensors: Dict[str, torch.Tensor], storages: Set[int], depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise CheckpointError("{}: nested deeper than {} levels".format(_path(where), MAX_DEPTH))
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value  # json writes NaN/inf as NaN/Infinity and reads them back
    if isinstance(value, torch.Tensor):
        name = _unique(".".join(where) or "tensor", tensors)
        tensors[name] = _storable(value, name, storages)
        return {"t": name}
    if isinstance(value, dict):
        pairs = []
        for key, item in value.items():
            if not (key is None or isinstance(key, (bool, int, float, str))):
                raise CheckpointError("{}: a dict key of type {} cannot be stored".format(
                    _path(where), type(key).__name__))
            pairs.append([key, _encode(item, where + [str(key)], tensors, storages, depth + 1)])
        return {"D": pairs}
    if isinstance(value, (list, tuple)):
        items = [_encode(item, where + [str(i)], tensors, storages, depth + 1) for i, item in enumerate(value)]
        return {"T" if isinstance(value, tuple) else "L": items}
    raise CheckpointError("{}: a {} cannot be stored (only tensors and plain data)".format(
        _path(where), type(value).__name__))


def _path(where: List[str]) -> str:
    return ".".join(where) or "the value"


def _unique(name: str, taken: Dict[str, torch.Tensor]) -> str:
    """``name``, or ``name#N`` when a key path repeats one (keys 1 and "1" of one dict)."""
    if name not in taken and name != "__metadata__":
        return name
    n = 1
    while "{}#{}".format(name, n) in taken:
        n += 1
    return "{}#{}".format(name, n)


def _storable(tensor: torch.Tensor, name: str, storages: Set[int]) -> torch.Tensor:
    """A dense CPU tensor owning its storage: safetensors refuses views and tensors sharing memory
    (tied weights), so those are copied. ``storages``: the storages of the tensors taken so far."""
    check_tensor(tensor, name, "the value to save", CheckpointError)
    t = tensor.detach().cpu().contiguous()
    if not t.numel():
        return t
    storage = t.untyped_storage()
    if storage.nbytes() != t.numel() * t.element_size() or storage.data_ptr() in storages:
        t = t.clone()
    storages.add(t.untyped_storage().data_ptr())
    return t


def checksum(tensors: Dict[str, torch.Tensor], tree_text: str) -> str:
    """sha256 of the tensors in name order (name, dtype, shape, bytes each), then the tree text."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(json.dumps([name, _CODES[t.dtype], list(t.shape)]).encode("utf-8") + b"\n")
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(b"tree\n" + tree_text.encode("utf-8"))
    return h.hexdigest()


# -- checks -------------------------------------------------------------------------------------------
def check_tensor(tensor: torch.Tensor, name: str, source: str, error: Type[IrepError]) -> None:
    """Dense, of a real floating, integer or bool dtype, at most 16 dimensions."""
    if tensor.layout != torch.strided:
        raise error("{}: tensor {} is {} (sparse); only dense tensors are read".format(
            source, quote(name), str(tensor.layout).replace("torch.", "")))
    if tensor.dtype not in _CODES:
        raise error("{}: tensor {} has dtype {}; only real floating, integer and bool tensors are read".format(
            source, quote(name), str(tensor.dtype).replace("torch.", "")))
    if tensor.dim() > MAX_DIMS:
        raise error("{}: tensor {} has {} dimensions (at most {})".format(source, quote(name), tensor.dim(), MAX_DIMS))


def tensors_of(tree: Any) -> Iterator[Tuple[str, torch.Tensor]]:
    """(key path, tensor) of every tensor in ``tree``; each container once (a pickle can hold cycles)."""
    stack: List[Tuple[str, Any]] = [("", tree)]
    visited: Set[int] = set()
    while stack:
        where, value = stack.pop()
        if isinstance(value, torch.Tensor):
            yield where or "tensor", value
            continue
        if id(value) in visited:
            continue
        visited.add(id(value))
        if isinstance(value, dict):
            stack.extend((_join(where, k), v) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((_join(where, i), v) for i, v in enumerate(value))


def _join(where: str, key: Any) -> str:
    return "{}.{}".format(where, key) if where else str(key)


# -- reading ------------------------------------------------------------------------------------------
def load_tree(path: PathLike, what: str, trust_pickle: bool = False,
              error: Type[IrepError] = CheckpointError, limit: int = MAX_BYTES) -> Loaded:
    """Read a safetensors file (ours: its tree, checksum verified; another's: its flat tensor dict) or,
    where allowed, an old pickle file. ``what`` names the kind of file in messages ("checkpoint").
    Every problem is one ``error`` naming the file."""
    name = str(path)
    data = read_bounded(name, limit, "a " + what, error)  # special files refused unopened
    if _is_safetensors(data):
        return _load_safetensors(data, name, what, error)
    if data[:4] in _ZIP or (data[:1] and data[0] == _PICKLE_PROTO):
        return _load_pickle(data, name, what, trust_pickle, error)
    if len(data) >= 9 and data[8:9] == b"{":
        size = struct.unpack("<Q", data[:8])[0]
        raise error("{}: a truncated or damaged safetensors file (its header claims {:,} bytes, the file has {:,})"
                    .format(name, size, len(data) - 8))
    raise error("{}: not a readable {} (neither a safetensors file nor an old torch.save file{})".format(
        name, what, ", it is empty" if not data else ""))


def _is_safetensors(data: bytes) -> bool:
    if len(data) < 10 or data[8:9] != b"{":
        return False
    size = struct.unpack("<Q", data[:8])[0]
    return 2 <= size <= len(data) - 8


def _load_safetensors(data: bytes, name: str, what: str, error: Type[IrepError]) -> Loaded:
    table, metadata = _table(data, name, error)
    try:
        from safetensors.torch import load
        tensors = load(data)
    except Exception as exc:  # safetensors' SafetensorError and torch's errors: a damaged file
        raise error("{}: not a readable safetensors file ({})".format(name, clip(first_line(exc), 160))) from exc
    for key, tensor in tensors.items():
        dtype, shape = table[key]
        if tensor.dtype != dtype or list(tensor.shape) != shape:
            raise error("{}: tensor {} does not read back as its header says".format(name, quote(key)))
    if FORMAT_KEY not in metadata:
        return Loaded(tensors, None, False)  # from elsewhere: a plain state dict
    if metadata[FORMAT_KEY] != CONTAINER_VERSION:
        raise error("{}: irep-deploy container version {} is not one this version reads ({})".format(
            name, quote(metadata[FORMAT_KEY]), CONTAINER_VERSION))
    text, recorded = metadata.get(TREE_KEY), metadata.get(SHA_KEY)
    if not isinstance(text, str) or not isinstance(recorded, str):
        raise error("{}: its irep-deploy metadata lacks {}".format(name, TREE_KEY if not isinstance(text, str)
                                                                    else SHA_KEY))
    actual = checksum(tensors, text)
    if actual != recorded:
        raise error("{}: checksum mismatch: the file is corrupt (sha256 {} recorded, {}... computed)".format(
            name, quote(recorded, 20), actual[:12]))
    try:
        structure = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise error("{}: its structure is not valid JSON ({})".format(name, clip(str(exc), 100))) from exc
    used: Set[str] = set()
    tree = _decode(structure, tensors, used, name, error, 0)
    unused = sorted(set(tensors) - used)
    if unused:
        raise error("{}: holds tensor {} that its structure does not name".format(name, quote(unused[0])))
    return Loaded(tree, actual, False)


def _table(data: bytes, name: str, error: Type[IrepError]) -> Tuple[Dict[str, Tuple[torch.dtype, List[int]]],
                                                                    Dict[str, str]]:
    """The tensor table and metadata of a safetensors header, checked before safetensors parses it:
    known dtypes, sane shapes, byte ranges inside the file that do not overlap."""
    size = struct.unpack("<Q", data[:8])[0]
    if size > MAX_HEADER_BYTES:
        raise error("{}: safetensors header of {:,} bytes (at most {:,})".format(name, size, MAX_HEADER_BYTES))
    try:
        header = json.loads(data[8:8 + size].decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise error("{}: safetensors header is not valid JSON ({})".format(name, clip(str(exc), 100))) from exc
    if not isinstance(header, dict):
        raise error("{}: safetensors header is not a JSON object".format(name))
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise error("{}: safetensors metadata is not a map of strings".format(name))
    body = len(data) - 8 - size
    table, ranges = {}, []
    for key, entry in header.items():
        if not isinstance(entry, dict):
            raise error("{}: tensor {} has no dtype/shape/offsets entry".format(name, quote(key)))
        code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if code not in _DTYPES:
            raise error("{}: tensor {} has dtype {}; only real floating, integer and bool tensors are read".format(
                name, quote(key), quote(code)))
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 1 << 40 for n in shape)):
            raise error("{}: tensor {} has shape {}, not a list of sizes".format(name, quote(key), quote(shape)))
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(n, int) and not isinstance(n, bool) for n in offsets)):
            raise error("{}: tensor {} has data offsets {}".format(name, quote(key), quote(offsets)))
        begin, end = offsets
        need = math.prod(shape) * _DTYPES[code][1]
        if not 0 <= begin <= end <= body:
            raise error("{}: truncated or damaged: tensor {} claims bytes {}-{} of a {:,}-byte data section".format(
                name, quote(key), begin, end, body))
        if end - begin != need:
            raise error("{}: tensor {} of shape {} needs {:,} bytes, its offsets give {:,}".format(
                name, quote(key), shape, need, end - begin))
        table[key] = (_DTYPES[code][0], shape)
        ranges.append((begin, end, key))
    ranges.sort()
    for (_, end, first), (begin, _, second) in zip(ranges, ranges[1:]):
        if begin < end:
            raise error("{}: tensors {} and {} overlap in the file".format(name, quote(first), quote(second)))
    return table, metadata


def _decode(node: Any, tensors: Dict[str, torch.Tensor], used: Set[str], name: str,
            error: Type[IrepError], depth: int) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if depth > MAX_DEPTH or not isinstance(node, dict) or len(node) != 1:
        raise error("{}: malformed structure in its metadata".format(name))
    (tag, body), = node.items()
    if tag == "t" and isinstance(body, str):
        if body not in tensors or body in used:
            raise error("{}: its structure names tensor {} {}".format(
                name, quote(body), "twice" if body in used else "that the file does not hold"))
        used.add(body)
        return tensors[body]
    if tag in ("L", "T") and isinstance(body, list):
        items = [_decode(item, tensors, used, name, error, depth + 1) for item in body]
        return tuple(items) if tag == "T" else items
    if tag == "D" and isinstance(body, list):
        out = {}
        for pair in body:
            if not isinstance(pair, list) or len(pair) != 2 or isinstance(pair[0], (dict, list)):
                raise error("{}: malformed structure in its metadata (a dict entry)".format(name))
            out[pair[0]] = _decode(pair[1], tensors, used, name, error, depth + 1)
        return out
    raise error("{}: malformed structure in its metadata (tag {})".format(name, quote(tag)))


def _load_pickle(data: bytes, name: str, what: str, trust_pickle: bool, error: Type[IrepError]) -> Loaded:
    if not (trust_pickle or torch_reads_pickle_safely()):
        raise error("{}: an old pickle-format {} (torch.save); torch {} can run code while unpickling it, even with "
                    "weights_only: convert it once with `irep-deploy convert {} -o NEW --trust-pickle` if you trust "
                    "it (or pass --trust-pickle)".format(name, what, torch.__version__.split("+")[0], name))
    try:
        with no_typed_storage_warning(), warnings.catch_warnings():
            # torch's note on its own check of a sparse tensor; the tensor is refused just below anyway
            warnings.filterwarnings("ignore", "Validating sparse tensor invariants", UserWarning)
            tree = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise error("{}: refused: it holds objects other than tensors and plain data, which could run code when "
                    "unpickled ({})".format(name, clip(first_line(exc)))) from exc
    except Exception as exc:  # torch raises RuntimeError, EOFError, KeyError... for damaged archives
        raise error("{}: not a readable {} (a damaged torch.save file: {})".format(
            name, what, clip(first_line(exc)))) from exc
    for key, tensor in tensors_of(tree):
        check_tensor(tensor, key, name, error)
    return Loaded(tree, None, True)
