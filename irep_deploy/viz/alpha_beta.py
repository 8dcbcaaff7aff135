"""Figure 2, the architecture parameters over the rounds: ``alpha_beta.png`` (last round),
``alpha_rounds.png`` (every round) and their data ``alpha_beta.json``, from ``alpha_beta.jsonl``.
The difference map of figure 2b (asym_minus_dil.py) is made from the same scores, with them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..errors import PlotError
from ..search.records import AlphaBetaRecord, read_alpha_beta
from .asym_minus_dil import difference_data, render_difference
from .common import (UNAVAILABLE, Outputs, PathLike, figure, heatmap, json_bytes, layer_label, masked, png,
                     round_ticks, specs_for, symmetric_limit, write)

#: alpha and beta start at 0 (block.py), so every score sigmoid(alpha)*sigmoid(beta) starts here.
INITIAL_SCORE = 0.25
#: sigmoid(0): the initial value of sigmoid(beta).
INITIAL_SIGMOID = 0.5
ALPHA_FILES = ("alpha_beta.png", "alpha_rounds.png", "alpha_beta.json")


@dataclass
class AlphaBeta:
    """The raw architecture parameters of every round, stacked (from ``alpha_beta.jsonl``)."""

    ops: List[str]
    layers: List[str]
    rounds: List[int]
    alpha: List[List[List[float]]]  # round x layer x op
    beta: List[List[float]]  # round x layer

    @classmethod
    def from_records(cls, records: Sequence[AlphaBetaRecord]) -> "AlphaBeta":
        """``records``: at least one, of one op space and layer list (as :func:`read_alpha_beta` returns)."""
        return cls(list(records[0].ops), list(records[0].layers), [r.round for r in records],
                   [r.alpha for r in records], [r.beta for r in records])


def load_alpha_beta(path: PathLike) -> AlphaBeta:
    """Read and check ``alpha_beta.jsonl`` (one record per round)."""
    records = read_alpha_beta(path)
    if not records:
        raise PlotError("{}: no rounds recorded yet".format(path))
    return AlphaBeta.from_records(records)


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def score_data(ab: AlphaBeta, backbone: Optional[str] = None) -> Dict[str, Any]:
    """score[r][l][o] = sigmoid(alpha[r][l][o]) * sigmoid(beta[r][l]): the factor of branch o in
    layer l (Eq. 6-7), with sigmoid(alpha), sigmoid(beta) and which ops exist at each layer."""
    specs = specs_for(backbone, ab.layers)
    available = [[spec.available(op) for op in ab.ops] for spec in specs] if specs else \
        [[True] * len(ab.ops) for _ in ab.layers]
    sig_a = [[[_sigmoid(a) for a in row] for row in alpha] for alpha in ab.alpha]
    sig_b = [[_sigmoid(b) for b in beta] for beta in ab.beta]
    score = [[[a * sb for a in row] for row, sb in zip(sa, sbs)] for sa, sbs in zip(sig_a, sig_b)]
    return {
        "figure": "alpha/beta scores per layer and op over rounds",
        "definition": "score = sigmoid(alpha) * sigmoid(beta) per layer and op (Eq. 6-7); initial value {} "
                      "(alpha = beta = 0)".format(INITIAL_SCORE),
        "backbone": backbone, "ops": ab.ops, "layers": ab.layers, "rounds": ab.rounds,
        "available": available, "initial_score": INITIAL_SCORE,
        "sigmoid_alpha": sig_a, "sigmoid_beta": sig_b, "score": score,
    }


def alpha_beta_data(ab: AlphaBeta, backbone: Optional[str] = None) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
    """(scores per round, difference map): the data of figures 2 and 2b (:func:`score_data`,
    :func:`~irep_deploy.viz.asym_minus_dil.difference_data`; None when the space lacks an op group)."""
    scores = score_data(ab, backbone)
    return scores, difference_data(scores)


def render_scores(scores: Dict[str, Any], labels: Sequence[str]) -> Outputs:
    """``alpha_beta.png``, ``alpha_rounds.png`` and ``alpha_beta.json``; ``labels``: one per layer."""
    import numpy as np
    ops, rounds, avail = scores["ops"], scores["rounds"], scores["available"]
    n_l, n_o, n_r = len(scores["layers"]), len(ops), len(rounds)

    # alpha_beta.png: the last round's score matrix and sigmoid(beta) per layer over rounds
    fig = figure(2.0 + 0.55 * n_o + 2.2 + 0.35 * max(n_r, 2), 1.6 + 0.27 * n_l)
    grid = fig.add_gridspec(1, 5, width_ratios=[0.55 * n_o, 0.18, 1.25, 0.35 * max(n_r, 2), 0.18], wspace=0.05)
    ax = fig.add_subplot(grid[0, 0])
    heatmap(fig, ax, fig.add_subplot(grid[0, 1]), masked(scores["score"][-1], avail), INITIAL_SCORE,
            "sigmoid(\u03b1)\u00b7sigmoid(\u03b2) \u2212 {} (initial)".format(INITIAL_SCORE))
    ax.set_xticks(range(n_o))
    ax.set_xticklabels(ops, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n_l))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_title("round {}: sigmoid(\u03b1)\u00b7sigmoid(\u03b2) per layer and op".format(rounds[-1]), fontsize=9)
    ax2 = fig.add_subplot(grid[0, 3], sharey=ax)
    heatmap(fig, ax2, fig.add_subplot(grid[0, 4]), masked(scores["sigmoid_beta"]).T, INITIAL_SIGMOID,
            "sigmoid(\u03b2) \u2212 {} (initial)".format(INITIAL_SIGMOID))
    round_ticks(ax2, rounds)
    ax2.tick_params(axis="y", labelleft=False)
    ax2.set_xlabel("round", fontsize=8)
    ax2.set_title("block scale sigmoid(\u03b2)\nper layer over rounds", fontsize=9)
    fig.suptitle("Architecture parameters (red: above the initial value, blue: below; grey: op unavailable)",
                 fontsize=9)
    out: Outputs = [(ALPHA_FILES[0], png(fig))]

    # alpha_rounds.png: small multiples, one panel per op, layers x rounds, one shared colour scale
    cols = min(4, n_o)
    rows = int(math.ceil(n_o / float(cols)))
    fig = figure(1.8 + cols * (1.0 + 0.3 * max(n_r, 2)), 0.9 + rows * (0.6 + 0.2 * n_l))
    lim = symmetric_limit(np.ma.concatenate([masked(s, avail).ravel() for s in scores["score"]]) - INITIAL_SCORE)
    axes = []
    image = None
    for o, op in enumerate(ops):
        axo = fig.add_subplot(rows, cols, o + 1)
        axes.append(axo)
        per_round = np.array([[s[l][o] if avail[l][o] else math.nan for l in range(n_l)] for s in scores["score"]])
        axo.set_facecolor(UNAVAILABLE)
        image = axo.imshow(np.ma.masked_invalid(per_round.T) - INITIAL_SCORE, cmap="RdBu_r", vmin=-lim, vmax=lim,
                           aspect="auto", interpolation="nearest")
        axo.set_title(op, fontsize=8)
        round_ticks(axo, rounds)
        axo.set_yticks(range(n_l))
        if o % cols == 0:
            axo.set_yticklabels(labels, fontsize=6)
        else:
            axo.set_yticklabels([])
        if o >= n_o - cols:
            axo.set_xlabel("round", fontsize=7)
    bar = fig.colorbar(image, ax=axes, fraction=0.03, pad=0.02)
    bar.set_label("sigmoid(\u03b1)\u00b7sigmoid(\u03b2) \u2212 {} (initial)".format(INITIAL_SCORE), fontsize=8)
    bar.ax.tick_params(labelsize=7)
    fig.suptitle("Score of every layer (rows) and op (panels) over the rounds (columns)", fontsize=9,
                 y=1.0 - 0.25 / fig.get_figheight())
    out.append((ALPHA_FILES[1], png(fig)))
    out.append((ALPHA_FILES[2], json_bytes(scores)))
    return out


def render_alpha_beta(ab: AlphaBeta, backbone: Optional[str] = None) -> Outputs:
    """Figure 2 and, when the space has both op groups, figure 2b (``asym_minus_dil.png/.json``)."""
    scores, difference = alpha_beta_data(ab, backbone)
    specs = specs_for(backbone, ab.layers)
    labels = [layer_label(specs[i] if specs else None, n) for i, n in enumerate(ab.layers)]
    out = render_scores(scores, labels)
    if difference is not None:
        out += render_difference(difference, labels)
    return out


def plot_alpha_beta(source: Union[AlphaBeta, PathLike], out_dir: PathLike,
                    backbone: Optional[str] = None) -> List[Path]:
    """Write the alpha/beta figures of ``alpha_beta.jsonl`` (or a loaded :class:`AlphaBeta`).

    ``backbone`` (optional) greys out ops unavailable at a layer and marks stride-2 layers.
    """
    ab = source if isinstance(source, AlphaBeta) else load_alpha_beta(source)
    return write(render_alpha_beta(ab, backbone), out_dir)
