"""Every figure the inputs allow (``irep-deploy plot``): read and check all inputs, render every
figure in memory, then write the files, so that a failure leaves no partial output."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from ..arch import ArchCode
from ..errors import PlotError
from ..search.records import ALPHA_BETA_FILE, LOG_FILE, POPULATION_FILE, Population, RoundRecord, read_population
from .alpha_beta import AlphaBeta, load_alpha_beta, render_alpha_beta
from .arch_code import render_arch
from .common import Outputs, PathLike, check_figure_dir, mpl, read_input, write
from .fitness import read_rounds, render_fitness
from .points import load_points, render_points

SEARCH_FILES = ("arch.bin", ALPHA_BETA_FILE, LOG_FILE, POPULATION_FILE)


@dataclass
class PlotReport:
    out_dir: Path
    written: List[Path] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)  # one sentence per figure that was not made


def plot(source: Optional[PathLike] = None, out_dir: Optional[PathLike] = None,
         points: Optional[PathLike] = None) -> PlotReport:
    """Make every figure the inputs allow.

    ``source`` is a search run directory (figures 1-3 from its ``arch.bin``, ``alpha_beta.jsonl``,
    ``log.jsonl`` and ``population.json``; a figure whose file is absent is skipped and said so) or
    an ``arch.bin`` file (figure 1). ``points`` adds figure 4. ``out_dir`` defaults to
    ``figures/`` in the run directory (beside the file for a file). All inputs are read and every
    figure rendered before the first file is written.
    """
    if source is None and points is None:
        raise PlotError("nothing to plot: give a search run directory, an arch.bin file or --points")
    mpl()
    if source is not None:
        base = Path(source) if Path(source).is_dir() else Path(source).parent
    else:
        base = Path(str(points)).parent
    out = Path(out_dir) if out_dir is not None else base / "figures"
    check_figure_dir(out)
    # read and check every input first: a bad file fails before any rendering or writing
    skipped: List[str] = []
    code: Optional[ArchCode] = None
    ab: Optional[AlphaBeta] = None
    rounds: Optional[List[RoundRecord]] = None
    population: Optional[Population] = None
    backbone: Optional[str] = None
    if source is not None:
        src = Path(source)
        if not src.exists():
            raise PlotError("{}: no such file or directory".format(src))
        if src.is_dir():
            present = [name for name in SEARCH_FILES if (src / name).is_file()]
            if not present:
                raise PlotError("{}: not a search run directory (none of {} in it)".format(src, ", ".join(SEARCH_FILES)))
            code = ArchCode.load(src / "arch.bin") if "arch.bin" in present else None
            backbone = code.backbone if code is not None else _config_backbone(src)
            ab = load_alpha_beta(src / ALPHA_BETA_FILE) if ALPHA_BETA_FILE in present else None
            rounds = read_rounds(src / LOG_FILE) if LOG_FILE in present else None
            population = read_population(src / POPULATION_FILE) if POPULATION_FILE in present else None
            if code is None:
                skipped.append("architecture code: no arch.bin")
            if ab is None:
                skipped.append("alpha/beta and difference map: no alpha_beta.jsonl")
            if not rounds and not population:
                skipped.append("fitness: no round in log.jsonl and no population.json")
        else:
            code = ArchCode.load(src)
    pts = load_points(points) if points is not None else None
    if pts is None:
        skipped.append("accuracy vs latency: no --points file")
    # then render everything in memory, then write
    outputs: Outputs = []
    if code is not None:
        outputs += render_arch(code)
    if ab is not None:
        outputs += render_alpha_beta(ab, backbone)
    if rounds or population:
        outputs += render_fitness(rounds, population)
    if pts is not None:
        outputs += render_points(pts)
    inputs = [points] + ([Path(source) / n for n in SEARCH_FILES] if source is not None and Path(source).is_dir()
                         else [source])
    return PlotReport(out, write(outputs, out, inputs), skipped)


def _config_backbone(run: Path) -> Optional[str]:
    """The backbone in the run's ``config.json``, or None (missing or unreadable: figures do without)."""
    try:
        config = read_input(run / "config.json")
    except PlotError:
        return None
    value = config.get("backbone") if isinstance(config, dict) else None
    return value if isinstance(value, str) else None
