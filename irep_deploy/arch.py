"""Architecture codes: the L x O binary matrix of kept branches, its file format and budgets.

The file format (README "File formats"; docs/foundation.md) is UTF-8 text, one row per searchable
3x3 conv in forward order. Backbones register their searchable layers here (:func:`register_backbone`),
so this module uses no model code; the built-ins are loaded on first lookup (:func:`known_backbones`).

Version 1 (built-in backbones) rows are ``<layer> <bits>``. Version 2 (any network made searchable
with :func:`irep_deploy.irepify`) rows carry each layer's geometry,
``<layer> <in>:<out>:<stride>:<groups> <bits>``, and the header a ``fingerprint`` of that table, so
the code can be read, checked and refused on the wrong network without importing the network.
"""
from __future__ import annotations

import hashlib
import importlib
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from ._io import atomic_write, clip, quote, read_arch_bytes
from .errors import ArchFormatError, ArchMismatchError, UsageError
from .ops import REGISTRY, SPACES, check_ops

FORMAT_VERSION = 1  # built-in backbones
FORMAT_VERSION_ANY = 2  # any network: rows carry their geometry
HEADER = "# irep-deploy architecture code"


@dataclass(frozen=True)
class LayerSpec:
    """Geometry of one searchable 3x3 conv: what decides which ops are available there."""

    name: str
    in_channels: int
    out_channels: int
    stride: int
    groups: int = 1

    def available(self, op: str) -> bool:
        return REGISTRY[op].available(self.in_channels, self.out_channels, self.stride)

    def geometry(self) -> str:
        """``in:out:stride:groups``, the geometry column of a version-2 code."""
        return "{}:{}:{}:{}".format(self.in_channels, self.out_channels, self.stride, self.groups)

    def describe(self) -> str:
        return "{}->{} channels, stride {}, groups {}".format(
            self.in_channels, self.out_channels, self.stride, self.groups)


def fingerprint(specs: Sequence[LayerSpec]) -> str:
    """A structural fingerprint of a network's searchable layers (paths, channels, strides, groups)."""
    table = "\n".join("{} {}".format(s.name, s.geometry()) for s in specs)
    return hashlib.sha256(table.encode("utf-8")).hexdigest()[:16]


def first_layer_difference(ours: Sequence[LayerSpec], theirs: Sequence[LayerSpec],
                           what: str = "the code", other: str = "the model") -> Optional[str]:
    """A sentence naming the first searchable layer where two layer tables differ, or None."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a.name != b.name:
            return "row {} of {} is layer {}, {}'s is {}".format(i + 1, what, a.name, other, b.name)
        if a != b:
            return "layer {} is {} in {} but {} in {}".format(a.name, a.describe(), what, b.describe(), other)
    if len(ours) != len(theirs):
        return "{} has {} searchable layers, {} {}".format(what, len(ours), other, len(theirs))
    return None


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    space: str
    _layers: Callable[[], Tuple[LayerSpec, ...]]
    builtin: bool = True

    def layers(self) -> Tuple[LayerSpec, ...]:
        return self._layers()


BACKBONES: Dict[str, BackboneInfo] = {}


def register_backbone(name: str, layers: Callable[[], Tuple[LayerSpec, ...]], space: str,
                      builtin: bool = True) -> None:
    """Make a backbone known to architecture codes: its searchable layers and default op space.

    ``builtin=False`` registers a network built from a model spec in this process (its codes are
    written in version 2, with their geometry, since another process may not know it)."""
    if space not in SPACES:
        raise ValueError("unknown op space {!r}".format(space))
    BACKBONES[name] = BackboneInfo(name, space, layers, builtin)


def known_backbones() -> Dict[str, BackboneInfo]:
    """The registry, with the built-in backbones in it.

    They register themselves when ``irep_deploy.models`` is imported. The package imports nothing
    eagerly (so the CLI can catch Ctrl-C while torch loads), so a lookup loads them on first use:
    a registration hook, not a use of the model code by this module.
    """
    if not _BUILTINS_LOADED:
        importlib.import_module(__package__ + ".models")
        _BUILTINS_LOADED.append(True)
    return BACKBONES


_BUILTINS_LOADED: List[bool] = []


def backbone_info(name: str) -> BackboneInfo:
    try:
        return known_backbones()[name]
    except KeyError as exc:
        # Any other network's layer table is registered when it is built or irepified in this process,
        # so a code of it (ArchCode.random/full/empty) cannot come before the model.
        raise ArchMismatchError("unknown backbone {} (known: {}); for a network that is not built in, build or "
                                "irepify the model first; its label is model.irep_config['backbone']".format(
                                    quote(name), ", ".join(sorted(BACKBONES)))) from exc


def budget_count(capacity: int, ratio: float) -> int:
    """The budget C: at most ``floor(ratio * capacity)`` branches (capacity = available slots)."""
    if not 0.0 <= ratio <= 1.0:
        raise UsageError("budget ratio must lie in [0, 1], got {}".format(ratio))
    return int(math.floor(ratio * capacity + 1e-9))


Bits = Tuple[Tuple[int, ...], ...]


class ArchCode:
    """Which branches each searchable layer keeps.

    ``bits[l][o] == 1`` keeps op ``ops[o]`` beside layer ``layers[l]``. Codes are immutable and
    hashable (the search deduplicates populations with them). Every constructor checks that no bit
    is set where the backbone makes the op unavailable.

    ``geometry`` (one :class:`LayerSpec` per row) makes the code self-describing: it is set for
    networks that are not built in, and written as format version 2.
    """

    __slots__ = ("backbone", "ops", "layers", "bits", "geometry")

    def __init__(self, backbone: str, ops: Sequence[str], layers: Sequence[str],
                 bits: Iterable[Iterable[int]], geometry: Optional[Sequence[LayerSpec]] = None) -> None:
        self.backbone = backbone
        self.ops = check_ops(ops)
        self.layers = tuple(layers)
        self.bits: Bits = tuple(tuple(1 if b else 0 for b in row) for row in bits)
        self.geometry: Optional[Tuple[LayerSpec, ...]] = tuple(geometry) if geometry is not None else None
        if self.geometry is not None and tuple(s.name for s in self.geometry) != self.layers:
            raise ValueError("the geometry names other layers than the rows")
        if len(self.bits) != len(self.layers):
            raise ValueError("{} rows of bits for {} layers".format(len(self.bits), len(self.layers)))
        for name, row in zip(self.layers, self.bits):
            if len(row) != len(self.ops):
                raise ValueError("layer {}: {} bits for {} ops".format(name, len(row), len(self.ops)))

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def _from_mask(cls, backbone: str, ops: Optional[Sequence[str]],
                   keep: Callable[[LayerSpec, str], bool]) -> "ArchCode":
        info = backbone_info(backbone)
        ops = check_ops(ops if ops is not None else SPACES[info.space])
        specs = info.layers()
        bits = [[1 if spec.available(op) and keep(spec, op) else 0 for op in ops] for spec in specs]
        return cls(backbone, ops, [s.name for s in specs], bits, None if info.builtin else specs)

    @classmethod
    def full(cls, backbone: str, ops: Optional[Sequence[str]] = None) -> "ArchCode":
        """Every available branch on (the "all branches" model)."""
        return cls._from_mask(backbone, ops, lambda spec, op: True)

    @classmethod
    def empty(cls, backbone: str, ops: Optional[Sequence[str]] = None) -> "ArchCode":
        """No branch: the plain backbone."""
        return cls._from_mask(backbone, ops, lambda spec, op: False)

    @classmethod
    def random(cls, backbone: str, ratio: float = 2 / 3, seed: Optional[int] = 0,
               ops: Optional[Sequence[str]] = None, count: Optional[int] = None) -> "ArchCode":
        """A code with exactly C = floor(ratio * capacity) branches (or ``count``), uniform over slots."""
        full = cls.full(backbone, ops)
        slots = full.available_slots()
        n = budget_count(len(slots), ratio) if count is None else count
        if not 0 <= n <= len(slots):
            raise ValueError("cannot place {} branches in {} available slots".format(n, len(slots)))
        chosen = set(random.Random(seed).sample(slots, n))
        return full.with_bits([[1 if (l, o) in chosen else 0 for o in range(len(full.ops))]
                               for l in range(len(full.layers))])

    def with_bits(self, bits: Iterable[Iterable[int]]) -> "ArchCode":
        """Same backbone, ops and layers, other bits (checked for availability)."""
        code = ArchCode(self.backbone, self.ops, self.layers, bits, self.geometry)
        code.check_available()
        return code

    # -- queries ----------------------------------------------------------------------------------
    def layer_specs(self) -> Tuple[LayerSpec, ...]:
        if self.geometry is not None:
            return self.geometry
        specs = backbone_info(self.backbone).layers()
        if tuple(s.name for s in specs) != self.layers:
            raise ArchMismatchError("code rows do not match the layers of {}".format(self.backbone))
        return specs

    def available_slots(self) -> List[Tuple[int, int]]:
        """(layer index, op index) of every slot where the op exists."""
        return [(l, o) for l, spec in enumerate(self.layer_specs())
                for o, op in enumerate(self.ops) if spec.available(op)]

    def check_available(self) -> None:
        for spec, row in zip(self.layer_specs(), self.bits):
            for op, bit in zip(self.ops, row):
                if bit and not spec.available(op):
                    raise ArchMismatchError("op {} is unavailable at {} ({}->{} channels, stride {})".format(
                        op, spec.name, spec.in_channels, spec.out_channels, spec.stride))

    def active(self, layer: Union[int, str]) -> Tuple[str, ...]:
        """Names of the kept ops of one layer (by index or name)."""
        index = self.layers.index(layer) if isinstance(layer, str) else layer
        return tuple(op for op, bit in zip(self.ops, self.bits[index]) if bit)

    def count(self) -> int:
        return sum(map(sum, self.bits))

    def capacity(self) -> int:
        return len(self.available_slots())

    def ratio(self) -> float:
        cap = self.capacity()
        return self.count() / cap if cap else 0.0

    def budget(self, ratio: float) -> int:
        """The budget C for ``ratio`` of this code's backbone and ops."""
        return budget_count(self.capacity(), ratio)

    def op_counts(self) -> Dict[str, int]:
        return {op: sum(row[o] for row in self.bits) for o, op in enumerate(self.ops)}

    def layer_counts(self) -> Dict[str, int]:
        return {name: sum(row) for name, row in zip(self.layers, self.bits)}

    def first_difference(self, other: "ArchCode") -> Optional[str]:
        """A sentence naming the first place where two codes differ, or None if they are equal."""
        if self.backbone != other.backbone:
            return "backbone {} vs {}".format(self.backbone, other.backbone)
        if self.ops != other.ops:
            for i, (a, b) in enumerate(zip(self.ops, other.ops)):
                if a != b:
                    return "op #{} is {} vs {}".format(i + 1, a, b)
            return "{} ops vs {} ops".format(len(self.ops), len(other.ops))
        for i, (a, b) in enumerate(zip(self.layers, other.layers)):
            if a != b:
                return "row {} is layer {} vs {}".format(i + 1, a, b)
        if len(self.layers) != len(other.layers):
            return "{} layers vs {} layers".format(len(self.layers), len(other.layers))
        if self.geometry is not None and other.geometry is not None:
            diff = first_layer_difference(self.geometry, other.geometry, "this code", "the other")
            if diff is not None:
                return diff
        for name, ra, rb in zip(self.layers, self.bits, other.bits):
            for op, a, b in zip(self.ops, ra, rb):
                if a != b:
                    return "{} {} is {} vs {}".format(name, op, a, b)
        return None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ArchCode) and (self.backbone, self.ops, self.layers, self.bits) == (
            other.backbone, other.ops, other.layers, other.bits)

    def __hash__(self) -> int:
        return hash((self.backbone, self.ops, self.layers, self.bits))

    def __repr__(self) -> str:
        return "ArchCode({}, {} layers x {} ops, {} branches)".format(
            self.backbone, len(self.layers), len(self.ops), self.count())

    # -- text format ------------------------------------------------------------------------------
    def dumps(self) -> str:
        width = max((len(n) for n in self.layers), default=0)
        if self.geometry is None:
            lines = [HEADER, "version: {}".format(FORMAT_VERSION), "backbone: {}".format(self.backbone),
                     "ops: {}".format(" ".join(self.ops))]
            lines += ["{} {}".format(n.ljust(width), "".join(map(str, row))) for n, row in zip(self.layers, self.bits)]
            return "\n".join(lines) + "\n"
        lines = [HEADER, "# rows: <layer> <in>:<out>:<stride>:<groups> <bits>",
                 "version: {}".format(FORMAT_VERSION_ANY), "backbone: {}".format(self.backbone),
                 "fingerprint: {}".format(fingerprint(self.geometry)), "ops: {}".format(" ".join(self.ops))]
        geo_width = max((len(s.geometry()) for s in self.geometry), default=0)
        lines += ["{} {} {}".format(s.name.ljust(width), s.geometry().ljust(geo_width), "".join(map(str, row)))
                  for s, row in zip(self.geometry, self.bits)]
        return "\n".join(lines) + "\n"

    def save(self, path: Union[str, Path]) -> None:
        """Write the code atomically (a reader never sees half a file)."""
        with atomic_write(path, "w") as handle:
            handle.write(self.dumps())

    @classmethod
    def load(cls, path: Union[str, Path]) -> "ArchCode":
        return cls.from_bytes(read_arch_bytes(path), str(path))

    @classmethod
    def from_bytes(cls, raw: bytes, source: str) -> "ArchCode":
        """Parse the file contents ``raw`` (read with :func:`read_arch_bytes`); errors name ``source``."""
        path = source
        try:
            text = raw.decode("utf-8")
            if "\x00" in text:
                raise UnicodeDecodeError("utf-8", raw, 0, 1, "NUL byte")
        except UnicodeDecodeError as exc:
            raise ArchFormatError("{}: not an architecture code (not UTF-8 text; is it a checkpoint?)".format(
                path)) from exc
        return cls.loads(text, source=str(path))

    @classmethod
    def loads(cls, text: str, source: str = "<string>") -> "ArchCode":
        """Parse the text format; every problem is reported as ``source:line: sentence``."""
        return _Parser(source).parse(text)

    def format_table(self) -> str:
        """The matrix with per-op and per-layer counts and the budget (``irep-deploy show``)."""
        specs = self.layer_specs()
        name_w = max([len("layer"), len("total")] + [len(n) for n in self.layers])
        col_w = [max(len(op), 3) for op in self.ops]
        head = "layer".ljust(name_w) + "  " + "  ".join(op.rjust(w) for op, w in zip(self.ops, col_w)) + "  kept"
        out = [head]
        for spec, row in zip(specs, self.bits):
            cells = [("1" if bit else ("." if spec.available(op) else "-")).rjust(w)
                     for op, bit, w in zip(self.ops, row, col_w)]
            out.append(spec.name.ljust(name_w) + "  " + "  ".join(cells) + "  " + str(sum(row)).rjust(4))
        counts = self.op_counts()
        out.append("total".ljust(name_w) + "  " + "  ".join(str(counts[op]).rjust(w)
                                                            for op, w in zip(self.ops, col_w))
                   + "  " + str(self.count()).rjust(4))
        cap = self.capacity()
        out.append("")
        out.append("{}: {} layers x {} ops; {} of {} available branches kept (ratio {:.3f}); "
                   "budget C at 2/3 = {}, at 1/2 = {}".format(
                       self.backbone, len(self.layers), len(self.ops), self.count(), cap, self.ratio(),
                       budget_count(cap, 2 / 3), budget_count(cap, 1 / 2)))
        out.append("('1' kept, '.' not kept, '-' op unavailable at that layer)")
        return "\n".join(out)


MAX_LINE = 400


class _Parser:
    KEYS = ("version", "backbone", "fingerprint", "ops")
    REQUIRED = {1: ("version", "backbone", "ops"), 2: ("version", "backbone", "fingerprint", "ops")}

    def __init__(self, source: str) -> None:
        self.source = source
        self.version = FORMAT_VERSION

    def fail(self, line: int, message: str) -> ArchFormatError:
        return ArchFormatError("{}:{}: {}".format(self.source, line, message))

    def parse(self, text: str) -> ArchCode:
        header: Dict[str, str] = {}
        header_line: Dict[str, int] = {}
        rows: List[Tuple[int, List[str]]] = []
        lines = text.splitlines()
        for lineno, raw in enumerate(lines, 1):
            if len(raw) > MAX_LINE:
                raise self.fail(lineno, "line of {:,} characters (at most {}): {}".format(len(raw), MAX_LINE, quote(raw)))
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if ":" in line and not (self.version == FORMAT_VERSION_ANY and len(parts) == 3):
                key, _, value = line.partition(":")
                key = key.strip()
                if key not in self.KEYS:
                    raise self.fail(lineno, "unknown key {} (expected one of: {})".format(quote(key), ", ".join(self.KEYS)))
                if key in header:
                    raise self.fail(lineno, "key {!r} given twice".format(key))
                if rows:
                    raise self.fail(lineno, "key {!r} after the first layer row; keys come first".format(key))
                header[key] = value.strip()
                header_line[key] = lineno
                self._check_key(lineno, key, header[key])
                continue
            want = 3 if self.version == FORMAT_VERSION_ANY else 2
            if len(parts) != want:
                raise self.fail(lineno, "expected '{}' or 'key: value', got {}".format(
                    "<layer> <in>:<out>:<stride>:<groups> <bits>" if want == 3 else "<layer> <bits>", quote(line)))
            rows.append((lineno, parts))
        end = len(lines) + 1
        for key in self.REQUIRED[self.version]:
            if key not in header:
                raise self.fail(end if not rows else rows[0][0], "missing {!r} line before the layer rows".format(key + ":"))
        if self.version == FORMAT_VERSION:
            return self._rows_v1(header, rows, end)
        return self._rows_v2(header, header_line, rows)

    def _check_bits(self, lineno: int, spec: LayerSpec, row: str, ops: Tuple[str, ...]) -> Tuple[int, ...]:
        bad = sorted(set(row) - {"0", "1"})
        if bad:
            raise self.fail(lineno, "bits may only be 0 or 1, found {}".format(quote("".join(bad))))
        if len(row) != len(ops):
            raise self.fail(lineno, "{} bits for {} ops (ops: {})".format(len(row), len(ops), " ".join(ops)))
        for op, bit in zip(ops, row):
            if bit == "1" and not spec.available(op):
                raise self.fail(lineno, "op {} is unavailable at {} ({}->{} channels, stride {})".format(
                    op, spec.name, spec.in_channels, spec.out_channels, spec.stride))
        return tuple(int(b) for b in row)

    def _rows_v1(self, header: Dict[str, str], rows: List[Tuple[int, List[str]]], end: int) -> ArchCode:
        backbone, ops = header["backbone"], tuple(header["ops"].split())
        specs = known_backbones()[backbone].layers()
        bits: List[Tuple[int, ...]] = []
        seen: Dict[str, int] = {}
        for index, (lineno, (name, row)) in enumerate(rows):
            if name in seen:
                raise self.fail(lineno, "layer {} given twice (first on line {})".format(clip(name, 80), seen[name]))
            seen[name] = lineno
            if index >= len(specs):
                raise self.fail(lineno, "extra row {}: {} has only {} searchable layers".format(
                    quote(name), backbone, len(specs)))
            spec = specs[index]
            if name != spec.name:
                known = {s.name for s in specs}
                what = "out of order" if name in known else "not a searchable layer of {}".format(backbone)
                raise self.fail(lineno, "layer {} is {}; row {} must be {}".format(clip(name, 80), what, index + 1, spec.name))
            bits.append(self._check_bits(lineno, spec, row, ops))
        if len(rows) < len(specs):
            raise self.fail(end, "missing rows: {} has {} searchable layers, the file gives {} (first missing: {})".format(
                backbone, len(specs), len(rows), specs[len(rows)].name))
        return ArchCode(backbone, ops, [s.name for s in specs], bits)

    def _rows_v2(self, header: Dict[str, str], header_line: Dict[str, int],
                 rows: List[Tuple[int, List[str]]]) -> ArchCode:
        """Rows describe their own layers; nothing is looked up (or imported) to read the code."""
        ops = tuple(header["ops"].split())
        specs: List[LayerSpec] = []
        bits: List[Tuple[int, ...]] = []
        seen: Dict[str, int] = {}
        for lineno, (name, geometry, row) in rows:
            if name in seen:
                raise self.fail(lineno, "layer {} given twice (first on line {})".format(clip(name, 80), seen[name]))
            seen[name] = lineno
            numbers = geometry.split(":")
            if len(numbers) != 4 or not all(n.isdigit() and 0 < int(n) <= 1_000_000 for n in numbers):
                raise self.fail(lineno, "geometry {} is not <in>:<out>:<stride>:<groups> (positive integers)".format(
                    quote(geometry)))
            cin, cout, stride, groups = (int(n) for n in numbers)
            if cin % groups or cout % groups:
                raise self.fail(lineno, "geometry {}: {} groups do not divide the channels".format(quote(geometry), groups))
            spec = LayerSpec(name, cin, cout, stride, groups)
            bits.append(self._check_bits(lineno, spec, row, ops))
            specs.append(spec)
        if not specs:
            raise self.fail(len(header_line) + 1, "no layer rows")
        got = fingerprint(specs)
        if header["fingerprint"] != got:
            raise self.fail(header_line["fingerprint"], "fingerprint {} does not match the rows (they give {}); "
                            "was the file edited?".format(quote(header["fingerprint"]), got))
        return ArchCode(header["backbone"], ops, [s.name for s in specs], bits, specs)

    def _check_key(self, lineno: int, key: str, value: str) -> None:
        if key == "version":
            if value not in (str(FORMAT_VERSION), str(FORMAT_VERSION_ANY)):
                raise self.fail(lineno, "unsupported version {} (this irep-deploy reads versions {} and {})".format(
                    quote(value), FORMAT_VERSION, FORMAT_VERSION_ANY))
            self.version = int(value)
        elif key == "backbone":
            if self.version == FORMAT_VERSION and value not in known_backbones():
                # the built-in names only: networks registered from model specs in this process are
                # not names a file can rely on, and listing them all made the line unbounded
                builtin = sorted(name for name, info in BACKBONES.items() if info.builtin)
                raise self.fail(lineno, "unknown backbone {} (built in: {}; a code for any other network is a "
                                "version {} file, with its layers' geometry)".format(
                                    quote(value), ", ".join(builtin), FORMAT_VERSION_ANY))
            if not value or len(value.split()) != 1:
                raise self.fail(lineno, "backbone {} is not one word".format(quote(value)))
        elif key == "fingerprint":
            if self.version != FORMAT_VERSION_ANY:
                raise self.fail(lineno, "'fingerprint:' belongs to version {} codes".format(FORMAT_VERSION_ANY))
        elif key == "ops":
            if not value:
                raise self.fail(lineno, "empty op list")
            try:
                check_ops(value.split())
            except ValueError as exc:
                raise self.fail(lineno, str(exc)) from exc
