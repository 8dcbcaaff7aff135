"""Figure 2b, asymmetric minus dilated (paper Fig. 5): ``asym_minus_dil.png`` + ``asym_minus_dil.json``.

Drawn with figure 2 (alpha_beta.py), from its scores.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from .common import Outputs, figure, heatmap, json_bytes, masked, png, round_ticks, symmetric_limit

#: The op groups of the difference map; only those in the search space are used.
ASYMMETRIC_OPS = ("conv1x3", "conv3x1")
DILATED_OPS = ("dil2x1", "dil1x2", "dil2x2")
DIFF_FILES = ("asym_minus_dil.png", "asym_minus_dil.json")


def _group_mean(row: Sequence[float], ops: Sequence[str], group: Sequence[str],
                available: Sequence[bool]) -> Optional[float]:
    vals = [v for v, op, ok in zip(row, ops, available) if op in group and ok]
    return sum(vals) / len(vals) if vals else None


def difference_data(scores: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Per round and layer, ``mean(score over the asymmetric ops) - mean(score over the dilated ops)``,
    each mean over the ops of the group in the space and available at the layer; None (no map) when
    the space lacks one of the groups. ``scores``: :func:`~irep_deploy.viz.alpha_beta.score_data`."""
    ops, available = scores["ops"], scores["available"]
    asym = [op for op in ASYMMETRIC_OPS if op in ops]
    dil = [op for op in DILATED_OPS if op in ops]
    if not asym or not dil:
        return None
    diff: List[List[Optional[float]]] = []
    diff_alpha: List[List[Optional[float]]] = []
    for score, sig_a in zip(scores["score"], scores["sigmoid_alpha"]):
        d_row, a_row = [], []
        for l in range(len(scores["layers"])):
            ma, md = (_group_mean(score[l], ops, g, available[l]) for g in (asym, dil))
            sa, sd = (_group_mean(sig_a[l], ops, g, available[l]) for g in (asym, dil))
            d_row.append(None if ma is None or md is None else ma - md)
            a_row.append(None if sa is None or sd is None else sa - sd)
        diff.append(d_row)
        diff_alpha.append(a_row)
    return {
        "figure": "asymmetric minus dilated (paper Fig. 5)",
        "definition": "diff[round][layer] = mean(score of {}) - mean(score of {}) with score = sigmoid(alpha) * "
                      "sigmoid(beta), means over the ops of each group available at the layer; positive: the "
                      "asymmetric ops weigh more in that layer. sigmoid_alpha_diff is the same with sigmoid(alpha) "
                      "alone (diff = sigmoid(beta) * sigmoid_alpha_diff)".format(" ".join(asym), " ".join(dil)),
        "asymmetric_ops": asym, "dilated_ops": dil, "layers": scores["layers"], "rounds": scores["rounds"],
        "diff": diff, "sigmoid_alpha_diff": diff_alpha,
    }


def render_difference(difference: Dict[str, Any], labels: Sequence[str]) -> Outputs:
    """A heatmap of layers x rounds and a bar chart of the last round; ``labels``: one per layer."""
    rounds = difference["rounds"]
    n_l, n_r = len(difference["layers"]), len(rounds)
    fig = figure(2.0 + 0.35 * max(n_r, 2) + 4.0, 1.6 + 0.27 * n_l)
    grid = fig.add_gridspec(1, 4, width_ratios=[0.35 * max(n_r, 2), 0.18, 1.25, 2.2], wspace=0.05)
    ax = fig.add_subplot(grid[0, 0])
    diff = masked(difference["diff"]).T
    lim = symmetric_limit(diff)
    heatmap(fig, ax, fig.add_subplot(grid[0, 1]), diff, 0.0, "mean asymmetric \u2212 mean dilated score",
            cmap="PuOr_r", vlim=lim)
    round_ticks(ax, rounds)
    ax.set_xlabel("round", fontsize=8)
    ax.set_yticks(range(n_l))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_title("per layer over rounds", fontsize=9)
    axb = fig.add_subplot(grid[0, 3], sharey=ax)
    last_diff = [0.0 if v is None else v for v in difference["diff"][-1]]
    axb.barh(range(n_l), last_diff, color=["#b35806" if v > 0 else "#542788" for v in last_diff], height=0.7)
    axb.axvline(0.0, color="#555555", linewidth=0.8)
    axb.set_xlim(-lim * 1.1, lim * 1.1)
    axb.tick_params(axis="y", labelleft=False)
    axb.tick_params(axis="x", labelsize=7, rotation=45)
    axb.xaxis.get_offset_text().set_fontsize(7)
    axb.set_title("round {}".format(rounds[-1]), fontsize=9)
    axb.set_xlabel("asymmetric \u2212 dilated", fontsize=8)
    axb.set_ylim(n_l - 0.5, -0.5)
    fig.suptitle("Asymmetric ({}) minus dilated ({}) score per layer\n(orange: asymmetric ops weigh more; "
                 "score = sigmoid(\u03b1)\u00b7sigmoid(\u03b2), group means)".format(
                     ", ".join(difference["asymmetric_ops"]), ", ".join(difference["dilated_ops"])), fontsize=9)
    return [(DIFF_FILES[0], png(fig)), (DIFF_FILES[1], json_bytes(difference))]
