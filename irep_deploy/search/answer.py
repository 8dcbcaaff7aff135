"""Which code a search answers with, and why: the line ``search`` ends with, what ``show`` prints
beside a run's code and what the demo report quotes, from the run's records alone.

Algorithm 1 outputs the final population: its best code, ``arch.bin``, is scored by the SuperNet
after all of its training. A code's fitness in an earlier round came from a SuperNet trained fewer
epochs, so fitness values of different rounds do not rank codes against each other, and the highest
fitness of a run can belong to an earlier round and another code. That code is kept beside the
answer as ``best_seen_arch.bin`` (its round and fitness: ``best_seen`` in ``population.json``).
No torch is imported before an architecture file is read (bounded), as for ``show`` before.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Union

from .._io import read_arch_bytes
from ..errors import ArchFormatError, RecordError
from .records import ANSWER_FILE, BEST_SEEN_FILE, POPULATION_FILE, BestSeen, Population, read_population

PathLike = Union[str, "os.PathLike[str]"]

WHY = ("Algorithm 1 outputs the final population, scored by the SuperNet after all its training; an earlier "
       "round's fitness comes from a SuperNet trained less, so fitness values of different rounds do not rank "
       "codes against each other")


def explain(final_round: int, fitness: float, bits: Sequence[str], best: Optional[BestSeen], where: str = "") -> str:
    """One line: the answer (``where`` + arch.bin, the best code of ``final_round`` with ``fitness``
    and ``bits``), why, and where the best-scoring code of any round is and whether it differs."""
    line = "answer: {}{}, the best code of the final round {} (fitness {:.2f}%). {}".format(
        where, ANSWER_FILE, final_round, fitness, WHY)
    if best is None:
        return line + ". This run records no best-seen code (written by an earlier version)."
    seen = "{}{}".format(where, BEST_SEEN_FILE)
    if list(best.bits) == list(bits):
        return line + ". The best fitness of any round, {:.2f}% in round {}, is the same code's ({} equals it).".format(
            best.fitness, best.round, seen)
    return line + ". The best fitness of any round, {:.2f}% in round {}, belongs to another code: {}.".format(
        best.fitness, best.round, seen)


def explain_population(population: Population, where: str = "") -> str:
    """:func:`explain` of a run's ``population.json``."""
    top = population.codes[0] if population.codes else None
    if top is None:
        raise RecordError("{}population.json: holds no code".format(where))
    return explain(population.round, top.fitness, top.bits, population.best_seen, where)


def differs(population: Population) -> bool:
    """Whether the best-seen code is another code than the answer (False when none is recorded)."""
    best = population.best_seen
    return best is not None and list(best.bits) != list(population.codes[0].bits)


def show(path: PathLike) -> str:
    """``irep-deploy show``: the code as a matrix with counts and budget. ``path`` is an architecture
    file or a search run directory (its ``arch.bin``); when the file lies in a search run (a
    ``population.json`` beside it), two more lines say which code of the run it is and why the answer
    is the answer."""
    path = Path(path)
    if path.is_dir() and not (path / POPULATION_FILE).is_file():
        raise ArchFormatError("{}: is a directory, not an architecture code nor a search run directory (no {})".format(
            path, POPULATION_FILE))
    arch = path / ANSWER_FILE if path.is_dir() else path
    raw = read_arch_bytes(arch)  # bounded, before torch loads: a huge file is refused at once
    from ..arch import ArchCode
    code = ArchCode.from_bytes(raw, str(arch))
    run = arch.parent
    if not (run / POPULATION_FILE).is_file():
        return code.format_table()
    population = read_population(run / POPULATION_FILE)
    rows = ["".join(map(str, row)) for row in code.bits]
    return "\n".join([code.format_table(), "", _role(rows, population),
                      explain_population(population, "{}{}".format(run, os.sep))])


def _role(rows: List[str], population: Population) -> str:
    answer = rows == list(population.codes[0].bits) if population.codes else False
    best = population.best_seen
    seen = best is not None and rows == list(best.bits)
    if answer and seen:
        return "this code: the search's answer, and the best-scoring code of any round"
    if answer:
        return "this code: the search's answer"
    if seen:
        assert best is not None
        return "this code: the best-scoring code of any round (round {}, {:.2f}%), not the search's answer".format(
            best.round, best.fitness)
    return "this code: neither the answer nor the best-seen code of the run's {}".format(POPULATION_FILE)
