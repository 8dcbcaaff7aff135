"""Figures of a search run and of a deployment comparison: PNG files plus the data behind them.

One module per figure, each turning its data into the figure (docs/figures.md describes each, its
data file and the ``points.json`` format); the search's files are read through
:mod:`irep_deploy.search.records`:

1. arch_code: :func:`plot_arch`, the architecture code matrix (paper Fig. A2): ``arch_code.png`` + ``.json``.
2. alpha_beta: :func:`plot_alpha_beta`, alpha/beta scores per layer and op over the rounds
   (``alpha_beta.png``, ``alpha_rounds.png``, data ``alpha_beta.json``), drawn with
   2b. asym_minus_dil: the asymmetric-minus-dilated difference map (paper Fig. 5; ``asym_minus_dil.png`` + ``.json``).
3. fitness: :func:`plot_fitness`, the population's fitness over rounds: ``fitness.png`` + ``.json``.
4. points: :func:`plot_points`, accuracy vs latency (paper Fig. 1 style): ``accuracy_latency.png`` + ``.json``.

report: :func:`plot` makes every figure its inputs allow (``irep-deploy plot``). Every figure is
rendered in memory first and the files are written atomically only once all figures of the call have
rendered, so a failure leaves no partial output. common: matplotlib (the ``[viz]`` extra) is imported
lazily and only its Agg canvas is used: pyplot's global state and the caller's backend are left alone.
"""
from __future__ import annotations

from ..errors import PlotError
from .alpha_beta import (INITIAL_SCORE, INITIAL_SIGMOID, AlphaBeta, alpha_beta_data, load_alpha_beta, plot_alpha_beta,
                         render_alpha_beta, score_data)
from .arch_code import arch_data, plot_arch, render_arch
from .asym_minus_dil import ASYMMETRIC_OPS, DILATED_OPS, difference_data
from .fitness import fitness_data, plot_fitness, render_fitness
from .points import load_points, plot_points, render_points
from .report import SEARCH_FILES, PlotReport, plot

__all__ = ["ASYMMETRIC_OPS", "DILATED_OPS", "INITIAL_SCORE", "INITIAL_SIGMOID", "SEARCH_FILES", "AlphaBeta",
           "PlotError", "PlotReport", "alpha_beta_data", "arch_data", "difference_data", "fitness_data",
           "load_alpha_beta", "load_points", "plot", "plot_alpha_beta", "plot_arch", "plot_fitness", "plot_points",
           "render_alpha_beta", "render_arch", "render_fitness", "render_points", "score_data"]
