"""The records a search writes to its run directory, defined once: a dataclass each, a writer, a reader.

    log.jsonl         an EpochRecord after every epoch, a RoundRecord after every round (a JSON line each)
    alpha_beta.jsonl  an AlphaBetaRecord after every round: the raw architecture parameters
    population.json   a Population after every round (replaced): every code of the round, best first,
                      and the best-scoring code of any round so far (``best_seen``, a BestSeen)

(``arch.bin``, the answer, and ``best_seen_arch.bin`` are :class:`~irep_deploy.arch.ArchCode` files
(search/answer.py says which is which), ``supernet.pt`` a checkpoint, ``state.pt``
the resumable state and ``config.json`` the search settings; each has its own reader.)

The format is the one searches have written from the start, byte for byte (docs/search.md): JSON
objects with sorted keys, one per line in the ``.jsonl`` files, ``population.json`` indented by 2;
there is no version field. ``best_seen`` came later: a file without it reads (None) and is written
back without it. A reader ignores keys and log events it does not know, so that a later
writer may add some, and refuses a malformed record with one :class:`RecordError` line naming the
file, the line or code, and the problem. The last line of a ``.jsonl`` file without its newline (a
search still appending it) is skipped. No torch here: figures and tools read a run without it.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple, Type, Union

from .._io import append_jsonl, quote, read_json, read_json_lines, write_json
from ..errors import RecordError

PathLike = Union[str, "os.PathLike[str]"]

LOG_FILE = "log.jsonl"
ALPHA_BETA_FILE = "alpha_beta.jsonl"
POPULATION_FILE = "population.json"
#: The search's answer (Algorithm 1: the best code of the final round) and the best-scoring code of any round.
ANSWER_FILE = "arch.bin"
BEST_SEEN_FILE = "best_seen_arch.bin"
#: A reader refuses larger files unread (alpha_beta.jsonl of a long ImageNet search stays far below).
MAX_RECORD_FILE_BYTES = 256 << 20


class _Fields:
    """The fields of one JSON object, each checked as it is taken; an error names ``where``."""

    def __init__(self, obj: Dict[str, Any], where: str) -> None:
        self.obj, self.where = obj, where

    @classmethod
    def of(cls, obj: Any, where: str) -> "_Fields":
        if not isinstance(obj, dict):
            raise RecordError("{}: expected an object".format(where))
        return cls(obj, where)

    def error(self, problem: str) -> RecordError:
        return RecordError("{}: {}".format(self.where, problem))

    def get(self, key: str) -> Any:
        if key not in self.obj:
            raise self.error("missing {!r}".format(key))
        return self.obj[key]

    def int_key(self, key: str) -> int:
        return self.integer(self.get(key), repr(key))

    def integer(self, value: Any, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error("{} must be an integer, got {}".format(what, quote(value)))
        return value

    def number(self, value: Any, what: str) -> float:
        """A finite JSON number, returned as read (an int stays an int: rewriting keeps the bytes)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.error("{} must be a finite number, got {}".format(what, quote(value)))
        return value

    def number_key(self, key: str) -> float:
        return self.number(self.get(key), repr(key))

    def str_key(self, key: str) -> str:
        value = self.get(key)
        if not isinstance(value, str):
            raise self.error("{!r} must be a string, got {}".format(key, quote(value)))
        return value

    def names(self, key: str) -> List[str]:
        value = self.get(key)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise self.error("{!r} must be a non-empty list of names".format(key))
        return list(value)

    def list_key(self, key: str, length: int, what: str) -> List[Any]:
        """A list of ``length`` items; ``what`` completes "KEY must ..." when it is not."""
        value = self.get(key)
        if not isinstance(value, list) or len(value) != length:
            raise self.error("{!r} must {}".format(key, what))
        return value


# -- log.jsonl --------------------------------------------------------------------------------------
@dataclass
class EpochRecord:
    """One training epoch (``"event": "epoch"`` in ``log.jsonl``)."""

    epoch: int  # 1-based, counted over the warm-up and the rounds
    phase: str  # "warmup" or "round N"
    train_loss: float  # mean over the epoch's samples
    train_acc: float  # top-1 (%) of the last sampled code on the training batches
    lr: float  # weight learning rate after the epoch
    event: ClassVar[str] = "epoch"

    def to_dict(self) -> Dict[str, Any]:
        return dict(dataclasses.asdict(self), event=self.event)

    @classmethod
    def from_dict(cls, obj: Dict[str, Any], where: str) -> "EpochRecord":
        f = _Fields(obj, where)
        return cls(epoch=f.int_key("epoch"), phase=f.str_key("phase"), train_loss=f.number_key("train_loss"),
                   train_acc=f.number_key("train_acc"), lr=f.number_key("lr"))


@dataclass
class RoundRecord:
    """One evolution round (``"event": "round"`` in ``log.jsonl``): the population's fitness."""

    round: int  # 1-based
    epoch: int  # the epoch that ended the round
    best_fitness: float  # validation top-1 (%) of the best code, fused
    mean_fitness: float  # mean over the population
    best_branches: int  # branches kept by the best code
    population_op_counts: Dict[str, int]  # op -> branches of that op summed over the population
    event: ClassVar[str] = "round"

    def to_dict(self) -> Dict[str, Any]:
        return dict(dataclasses.asdict(self), event=self.event)

    @classmethod
    def from_dict(cls, obj: Dict[str, Any], where: str) -> "RoundRecord":
        f = _Fields(obj, where)
        counts = f.get("population_op_counts")
        if not isinstance(counts, dict):
            raise f.error("'population_op_counts' must be an object of op: count")
        return cls(round=f.int_key("round"), epoch=f.int_key("epoch"), best_fitness=f.number_key("best_fitness"),
                   mean_fitness=f.number_key("mean_fitness"), best_branches=f.int_key("best_branches"),
                   population_op_counts={op: f.integer(n, "count of {}".format(quote(op))) for op, n in counts.items()})


LogRecord = Union[EpochRecord, RoundRecord]
LOG_KINDS: Tuple[Type[LogRecord], ...] = (EpochRecord, RoundRecord)


def read_log(path: PathLike, kinds: Sequence[Type[LogRecord]] = LOG_KINDS) -> List[LogRecord]:
    """The records of ``kinds`` in ``log.jsonl``, in order; lines of other events are skipped unread."""
    wanted = {kind.event: kind for kind in kinds}
    out: List[LogRecord] = []
    for lineno, obj in read_json_lines(path, MAX_RECORD_FILE_BYTES, "a search log", RecordError):
        event = obj.get("event")
        kind = wanted.get(event) if isinstance(event, str) else None
        if kind is not None:
            out.append(kind.from_dict(obj, "{}:{}".format(path, lineno)))
    return out


# -- alpha_beta.jsonl -------------------------------------------------------------------------------
@dataclass
class AlphaBetaRecord:
    """The raw architecture parameters after one round (a line of ``alpha_beta.jsonl``)."""

    round: int
    ops: List[str]
    layers: List[str]  # the searchable convs in forward order
    alpha: List[List[float]]  # layer x op
    beta: List[float]  # per layer

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, obj: Dict[str, Any], where: str) -> "AlphaBetaRecord":
        f = _Fields(obj, where)
        rnd, ops, layers = f.int_key("round"), f.names("ops"), f.names("layers")
        shape = "{} layers x {} ops".format(len(layers), len(ops))
        alpha = f.list_key("alpha", len(layers), "be " + shape)
        if not all(isinstance(row, list) and len(row) == len(ops) for row in alpha):
            raise f.error("'alpha' must be {}".format(shape))
        beta = f.list_key("beta", len(layers), "hold {} values (one per layer)".format(len(layers)))
        return cls(round=rnd, ops=ops, layers=layers,
                   alpha=[[f.number(v, "alpha") for v in row] for row in alpha],
                   beta=[f.number(v, "beta") for v in beta])


def read_alpha_beta(path: PathLike) -> List[AlphaBetaRecord]:
    """Every record of ``alpha_beta.jsonl``: one op space and layer list, rounds increasing."""
    records: List[AlphaBetaRecord] = []
    for lineno, obj in read_json_lines(path, MAX_RECORD_FILE_BYTES, "an alpha/beta record file", RecordError):
        where = "{}:{}".format(path, lineno)
        rec = AlphaBetaRecord.from_dict(obj, where)
        if records and (rec.ops, rec.layers) != (records[0].ops, records[0].layers):
            raise RecordError("{}: ops or layers differ from the first record".format(where))
        if records and rec.round <= records[-1].round:
            raise RecordError("{}: 'round' must be an integer larger than the previous one, got {}".format(
                where, rec.round))
        records.append(rec)
    return records


# -- population.json --------------------------------------------------------------------------------
def _code_bits(f: _Fields, ops: Sequence[str], layers: Sequence[str]) -> Tuple[List[str], int]:
    """A code's ``bits`` (layers x ops) and its ``branches``, which must count the bits kept."""
    shape = "hold {} strings of {} bits (layers x ops)".format(len(layers), len(ops))
    bits = f.list_key("bits", len(layers), shape)
    if not all(isinstance(row, str) and len(row) == len(ops) and set(row) <= {"0", "1"} for row in bits):
        raise f.error("'bits' must " + shape)
    branches = f.int_key("branches")
    if branches != sum(row.count("1") for row in bits):
        raise f.error("'branches' is {} but 'bits' keeps {}".format(branches, sum(r.count("1") for r in bits)))
    return list(bits), branches


@dataclass
class PopulationCode:
    """One code of a population."""

    rank: int  # 1 = best fitness
    fitness: float  # validation top-1 (%), fused
    branches: int  # branches kept
    bits: List[str]  # per layer a string of 0/1, one per op (Population.ops, Population.layers)
    history: List[Tuple[int, float]]  # (round, fitness) of every round the code was in

    def to_dict(self) -> Dict[str, Any]:
        return dict(dataclasses.asdict(self), history=[list(h) for h in self.history])

    @classmethod
    def from_dict(cls, obj: Any, where: str, ops: Sequence[str], layers: Sequence[str]) -> "PopulationCode":
        f = _Fields.of(obj, where)
        bits, branches = _code_bits(f, ops, layers)
        history = f.get("history")
        if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 for h in history):
            raise f.error("'history' must be a list of [round, fitness] pairs")
        return cls(rank=f.int_key("rank"), fitness=f.number_key("fitness"), branches=branches, bits=bits,
                   history=[(f.integer(r, "history round"), f.number(v, "history fitness")) for r, v in history])


@dataclass
class BestSeen:
    """The code with the highest fitness of any round so far (``best_seen`` in ``population.json``;
    the code itself is ``best_seen_arch.bin``). Ties keep the earlier round."""

    round: int  # the round in which it scored ``fitness``
    fitness: float  # validation top-1 (%), fused, scored by the SuperNet of that round
    branches: int
    bits: List[str]  # as PopulationCode.bits

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, obj: Any, where: str, ops: Sequence[str], layers: Sequence[str]) -> "BestSeen":
        f = _Fields.of(obj, where)
        bits, branches = _code_bits(f, ops, layers)
        return cls(round=f.int_key("round"), fitness=f.number_key("fitness"), branches=branches, bits=bits)


@dataclass
class Population:
    """``population.json``: every code of the latest round, best first; ``best_seen`` is absent from
    files of searches written before it was recorded."""

    round: int
    budget: int  # the most branches a code may keep
    ops: List[str]
    layers: List[str]
    codes: List[PopulationCode]
    best_seen: Optional[BestSeen] = None

    def to_dict(self) -> Dict[str, Any]:
        out = dict(dataclasses.asdict(self), codes=[c.to_dict() for c in self.codes])
        if self.best_seen is None:  # an older run read and written back keeps its bytes
            del out["best_seen"]
        return out

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> "Population":
        if not isinstance(obj, dict) or not isinstance(obj.get("codes"), list):
            raise RecordError("{}: expected an object with a 'codes' list (population.json of a search run)".format(where))
        f = _Fields(obj, where)
        ops, layers = f.names("ops"), f.names("layers")
        codes = [PopulationCode.from_dict(c, "{}: code {}".format(where, i), ops, layers)
                 for i, c in enumerate(obj["codes"], 1)]
        if [c.rank for c in codes] != list(range(1, len(codes) + 1)):
            raise f.error("the codes' ranks must be 1, 2, ... in order")
        best = obj.get("best_seen")
        return cls(round=f.int_key("round"), budget=f.int_key("budget"), ops=ops, layers=layers, codes=codes,
                   best_seen=None if best is None else BestSeen.from_dict(best, "{}: best_seen".format(where), ops,
                                                                          layers))


def read_population(path: PathLike) -> Population:
    return Population.from_dict(read_json(path, MAX_RECORD_FILE_BYTES, "a population file", RecordError), str(path))


# -- writers ----------------------------------------------------------------------------------------
def append_record(path: PathLike, record: Union[LogRecord, AlphaBetaRecord]) -> None:
    """Append ``record`` as one line to ``log.jsonl`` or ``alpha_beta.jsonl``."""
    append_jsonl(path, record.to_dict())


def write_population(path: PathLike, population: Population) -> None:
    """Replace ``population.json`` atomically."""
    write_json(path, population.to_dict())
