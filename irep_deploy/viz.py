"""Figures of a search run and of a deployment comparison: PNG files plus the data behind them.

Four figures (docs/figures.md describes each, its data file and the ``points.json`` format):

1. :func:`plot_arch` -- the architecture code matrix (paper Fig. A2): ``arch_code.png`` + ``.json``.
2. :func:`plot_alpha_beta` -- alpha/beta scores per layer and op over the rounds (``alpha_beta.png``,
   ``alpha_rounds.png``, data ``alpha_beta.json``) and the asymmetric-minus-dilated difference map
   (paper Fig. 5; ``asym_minus_dil.png`` + ``.json``).
3. :func:`plot_fitness` -- the population's fitness over rounds: ``fitness.png`` + ``.json``.
4. :func:`plot_points` -- accuracy vs latency (paper Fig. 1 style): ``accuracy_latency.png`` + ``.json``.

:func:`plot` makes every figure its inputs allow (``irep-deploy plot``). Every figure is rendered in
memory first and the files are written atomically only once all figures of the call have rendered,
so a failure leaves no partial output. matplotlib (the ``[viz]`` extra) is imported lazily and only
its Agg canvas is used: pyplot's global state and the caller's backend are left alone.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ._io import atomic_write, check_not_input, clip, quote, read_bounded
from .arch import ArchCode, LayerSpec, backbone_info
from .errors import IrepError, PlotError

PathLike = Union[str, Path]

#: alpha and beta start at 0 (block.py), so every score sigmoid(alpha)*sigmoid(beta) starts here.
INITIAL_SCORE = 0.25
#: sigmoid(0): the initial value of sigmoid(beta).
INITIAL_SIGMOID = 0.5
#: The op groups of the difference map (paper Fig. 5); only those in the search space are used.
ASYMMETRIC_OPS = ("conv1x3", "conv3x1")
DILATED_OPS = ("dil2x1", "dil1x2", "dil2x2")

ARCH_FILES = ("arch_code.png", "arch_code.json")
ALPHA_FILES = ("alpha_beta.png", "alpha_rounds.png", "alpha_beta.json", "asym_minus_dil.png",
               "asym_minus_dil.json")
FITNESS_FILES = ("fitness.png", "fitness.json")
POINTS_FILES = ("accuracy_latency.png", "accuracy_latency.json")

_KEPT, _NOT_KEPT, _UNAVAILABLE = "#1f4e79", "#ffffff", "#c8c8c8"


Outputs = List[Tuple[str, bytes]]  # (file name, content), rendered but not yet written


# -- matplotlib -----------------------------------------------------------------------------------
def _mpl():
    """(Figure class, FigureCanvasAgg) or a one-line error naming the extra to install."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise IrepError("figures need matplotlib: pip install 'irep-deploy[viz]' (or pip install matplotlib)") from exc
    return Figure, FigureCanvasAgg


def _figure(width: float, height: float):
    Figure, FigureCanvasAgg = _mpl()
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _png(fig, dpi: int = 130) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": "irep-deploy"})
    return buf.getvalue()


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _write(outputs: Outputs, out_dir: PathLike, inputs: Sequence[Optional[PathLike]] = ()) -> List[Path]:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PlotError("{}: cannot write figures: it is a file, not a directory".format(out))
    for name, _ in outputs:
        check_not_input(out / name, inputs)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PlotError("{}: cannot create the output directory: {}".format(out, exc.strerror or exc)) from exc
    written = []
    for name, data in outputs:
        with atomic_write(out / name, "wb") as handle:
            handle.write(data)
        written.append(out / name)
    return written


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _layer_label(spec: Optional[LayerSpec], name: str) -> str:
    return "{} (s{})".format(name, spec.stride) if spec is not None and spec.stride != 1 else name


def _specs_for(backbone: Optional[str], layers: Sequence[str]) -> Optional[Tuple[LayerSpec, ...]]:
    """The layer geometry when the backbone is known and its layers are these; else None."""
    if not backbone:
        return None
    try:
        specs = backbone_info(backbone).layers()
    except IrepError:
        return None
    return specs if tuple(s.name for s in specs) == tuple(layers) else None


# -- 1. architecture code matrix ------------------------------------------------------------------
def arch_data(code: ArchCode) -> Dict[str, Any]:
    """The numbers of the architecture figure: cells 1 kept, 0 not kept, -1 op unavailable."""
    specs = code.layer_specs()
    cells = [[bit if spec.available(op) else -1 for op, bit in zip(code.ops, row)]
             for spec, row in zip(specs, code.bits)]
    return {
        "figure": "architecture code matrix (paper Fig. A2)",
        "backbone": code.backbone, "ops": list(code.ops), "layers": list(code.layers),
        "strides": [s.stride for s in specs],
        "cells": cells, "cell_values": {"1": "kept", "0": "not kept", "-1": "op unavailable at that layer"},
        "op_counts": code.op_counts(), "layer_counts": code.layer_counts(),
        "kept": code.count(), "capacity": code.capacity(), "ratio": code.ratio(),
    }


def render_arch(code: ArchCode, title: Optional[str] = None) -> Outputs:
    data = arch_data(code)
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator
    specs = code.layer_specs()
    n_l, n_o = len(code.layers), len(code.ops)
    fig = _figure(2.2 + 0.62 * n_o + 1.6, 2.3 + 1.1 + 0.3 * n_l)
    grid = fig.add_gridspec(2, 2, width_ratios=[0.62 * n_o, 1.6], height_ratios=[1.1, 0.3 * n_l],
                            wspace=0.04, hspace=0.04)
    ax = fig.add_subplot(grid[1, 0])
    top = fig.add_subplot(grid[0, 0], sharex=ax)
    right = fig.add_subplot(grid[1, 1], sharey=ax)
    values = [[c + 1 for c in row] for row in data["cells"]]  # 0 unavailable, 1 not kept, 2 kept
    ax.imshow(values, cmap=ListedColormap([_UNAVAILABLE, _NOT_KEPT, _KEPT]), vmin=-0.5, vmax=2.5,
              aspect="auto", interpolation="nearest")
    for l, row in enumerate(data["cells"]):
        for o, cell in enumerate(row):
            if cell < 0:
                ax.text(o, l, "\u00d7", ha="center", va="center", fontsize=9, color="#555555")
    ax.set_xticks(range(n_o))
    ax.set_xticklabels(code.ops, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n_l))
    ax.set_yticklabels([_layer_label(s, n) for s, n in zip(specs, code.layers)], fontsize=8)
    ax.set_xticks([x - 0.5 for x in range(1, n_o)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, n_l)], minor=True)
    ax.grid(which="minor", color="#8c8c8c", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("candidate op")
    ax.set_ylabel("searchable 3x3 conv (forward order{})".format(
        "; s2 = stride 2" if any(s.stride != 1 for s in specs) else ""))

    counts = [data["op_counts"][op] for op in code.ops]
    avail = [sum(1 for row in data["cells"] if row[o] >= 0) for o in range(n_o)]
    top.bar(range(n_o), avail, color=_NOT_KEPT, edgecolor="#8c8c8c", width=0.7)
    top.bar(range(n_o), counts, color=_KEPT, width=0.7, label="kept")
    for o, c in enumerate(counts):
        top.text(o, c, str(c), ha="center", va="bottom", fontsize=7)
    top.set_ylabel("kept per op\n(box: available)", fontsize=8)
    top.set_ylim(0, max(avail + [1]) * 1.25)
    top.tick_params(axis="x", labelbottom=False)
    top.tick_params(axis="y", labelsize=7)
    top.yaxis.set_major_locator(MaxNLocator(integer=True))

    lcounts = [data["layer_counts"][n] for n in code.layers]
    lavail = [sum(1 for c in row if c >= 0) for row in data["cells"]]
    right.barh(range(n_l), lavail, color=_NOT_KEPT, edgecolor="#8c8c8c", height=0.7)
    right.barh(range(n_l), lcounts, color=_KEPT, height=0.7)
    for l, c in enumerate(lcounts):
        right.text(c + 0.1, l, str(c), ha="left", va="center", fontsize=7)
    right.set_xlim(0, max(lavail + [1]) * 1.3)
    right.set_xlabel("kept per layer\n(box: available)", fontsize=8)
    right.tick_params(axis="y", labelleft=False)
    right.tick_params(axis="x", labelsize=7)
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(n_l - 0.5, -0.5)

    corner = fig.add_subplot(grid[0, 1])
    corner.axis("off")
    corner.legend(handles=[Patch(facecolor=_KEPT, edgecolor="#8c8c8c", label="kept"),
                           Patch(facecolor=_NOT_KEPT, edgecolor="#8c8c8c", label="not kept"),
                           Patch(facecolor=_UNAVAILABLE, edgecolor="#8c8c8c", label="\u00d7 unavailable")],
                  loc="center", fontsize=7, frameon=False)
    top.set_title(title or "{}: {} of {} available branches kept (ratio {:.2f})".format(
        code.backbone, data["kept"], data["capacity"], data["ratio"]), fontsize=10)
    return [(ARCH_FILES[0], _png(fig)), (ARCH_FILES[1], _json_bytes(data))]


def plot_arch(code: ArchCode, out_dir: PathLike, title: Optional[str] = None) -> List[Path]:
    """Write ``arch_code.png`` and ``arch_code.json`` (cells, per-op and per-layer counts)."""
    return _write(render_arch(code, title), out_dir)


# -- JSON / JSON-lines input ----------------------------------------------------------------------
def _read_text(path: PathLike) -> str:
    path = Path(path)
    try:
        return read_bounded(path, MAX_INPUT_BYTES, "a figure input", PlotError).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PlotError("{}: not UTF-8 text".format(path)) from exc


MAX_INPUT_BYTES = 256 << 20  # alpha_beta.jsonl of a long ImageNet search stays far below this


def _read_json(path: PathLike) -> Any:
    try:
        return json.loads(_read_text(path))
    except (ValueError, RecursionError) as exc:
        raise PlotError("{}: not valid JSON: {}".format(path, clip(str(exc), 100))) from exc


def _read_jsonl(path: PathLike) -> List[Tuple[int, Dict[str, Any]]]:
    """(line number, record) of every line; an unterminated last line (a writer mid-append) is skipped."""
    text = _read_text(path)
    lines = text.split("\n")
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as exc:
            if lineno == len(lines):  # no newline after it: still being written
                continue
            raise PlotError("{}:{}: not valid JSON: {}".format(path, lineno, clip(str(exc), 100))) from exc
        if not isinstance(record, dict):
            raise PlotError("{}:{}: expected a JSON object".format(path, lineno))
        records.append((lineno, record))
    return records


def _number(value: Any, where: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PlotError("{}: {} must be a finite number, got {}".format(where, what, quote(value)))
    return float(value)


def _str_list(value: Any, where: str, what: str) -> List[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise PlotError("{}: {} must be a non-empty list of names".format(where, what))
    return list(value)


# -- 2. alpha / beta ------------------------------------------------------------------------------
@dataclass
class AlphaBeta:
    """Raw architecture parameters per round, as in ``alpha_beta.jsonl``."""

    ops: List[str]
    layers: List[str]
    rounds: List[int]
    alpha: List[List[List[float]]]  # round x layer x op
    beta: List[List[float]]  # round x layer


def load_alpha_beta(path: PathLike) -> AlphaBeta:
    """Read and check ``alpha_beta.jsonl`` (one record per round)."""
    records = _read_jsonl(path)
    if not records:
        raise PlotError("{}: no rounds recorded yet".format(path))
    ops: Optional[List[str]] = None
    layers: Optional[List[str]] = None
    rounds: List[int] = []
    alphas, betas = [], []
    for lineno, rec in records:
        where = "{}:{}".format(path, lineno)
        for key in ("round", "ops", "layers", "alpha", "beta"):
            if key not in rec:
                raise PlotError("{}: missing {!r}".format(where, key))
        r_ops, r_layers = _str_list(rec["ops"], where, "'ops'"), _str_list(rec["layers"], where, "'layers'")
        if ops is None:
            ops, layers = r_ops, r_layers
        elif (r_ops, r_layers) != (ops, layers):
            raise PlotError("{}: ops or layers differ from the first record".format(where))
        rnd = rec["round"]
        if isinstance(rnd, bool) or not isinstance(rnd, int) or (rounds and rnd <= rounds[-1]):
            raise PlotError("{}: 'round' must be an integer larger than the previous one, got {}".format(where, quote(rnd)))
        alpha, beta = rec["alpha"], rec["beta"]
        if not isinstance(alpha, list) or len(alpha) != len(r_layers) or not all(
                isinstance(row, list) and len(row) == len(r_ops) for row in alpha):
            raise PlotError("{}: 'alpha' must be {} layers x {} ops".format(where, len(r_layers), len(r_ops)))
        if not isinstance(beta, list) or len(beta) != len(r_layers):
            raise PlotError("{}: 'beta' must hold {} values (one per layer)".format(where, len(r_layers)))
        rounds.append(rnd)
        alphas.append([[_number(v, where, "alpha") for v in row] for row in alpha])
        betas.append([_number(v, where, "beta") for v in beta])
    assert ops is not None and layers is not None
    return AlphaBeta(ops, layers, rounds, alphas, betas)


def _group_mean(row: Sequence[float], ops: Sequence[str], group: Sequence[str],
                available: Sequence[bool]) -> Optional[float]:
    vals = [v for v, op, ok in zip(row, ops, available) if op in group and ok]
    return sum(vals) / len(vals) if vals else None


def alpha_beta_data(ab: AlphaBeta, backbone: Optional[str] = None) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
    """(scores per round, difference map) -- the data of the alpha/beta figures.

    score[r][l][o] = sigmoid(alpha[r][l][o]) * sigmoid(beta[r][l]) (the factor of branch o in layer
    l, Eq. 6-7). The difference map (paper Fig. 5) is, per round and layer,
    ``mean(score over the asymmetric ops) - mean(score over the dilated ops)``, each mean over the
    ops of that group that are in the search space and available at the layer; None (no map) when
    the space lacks one of the groups.
    """
    specs = _specs_for(backbone, ab.layers)
    available = [[spec.available(op) for op in ab.ops] for spec in specs] if specs else \
        [[True] * len(ab.ops) for _ in ab.layers]
    sig_a = [[[_sigmoid(a) for a in row] for row in alpha] for alpha in ab.alpha]
    sig_b = [[_sigmoid(b) for b in beta] for beta in ab.beta]
    score = [[[a * sb for a in row] for row, sb in zip(sa, sbs)] for sa, sbs in zip(sig_a, sig_b)]
    scores = {
        "figure": "alpha/beta scores per layer and op over rounds",
        "definition": "score = sigmoid(alpha) * sigmoid(beta) per layer and op (Eq. 6-7); initial value {} "
                      "(alpha = beta = 0)".format(INITIAL_SCORE),
        "backbone": backbone, "ops": ab.ops, "layers": ab.layers, "rounds": ab.rounds,
        "available": available, "initial_score": INITIAL_SCORE,
        "sigmoid_alpha": sig_a, "sigmoid_beta": sig_b, "score": score,
    }
    asym = [op for op in ASYMMETRIC_OPS if op in ab.ops]
    dil = [op for op in DILATED_OPS if op in ab.ops]
    if not asym or not dil:
        return scores, None
    diff: List[List[Optional[float]]] = []
    diff_alpha: List[List[Optional[float]]] = []
    for r in range(len(ab.rounds)):
        d_row, a_row = [], []
        for l in range(len(ab.layers)):
            ma, md = (_group_mean(score[r][l], ab.ops, g, available[l]) for g in (asym, dil))
            sa, sd = (_group_mean(sig_a[r][l], ab.ops, g, available[l]) for g in (asym, dil))
            d_row.append(None if ma is None or md is None else ma - md)
            a_row.append(None if sa is None or sd is None else sa - sd)
        diff.append(d_row)
        diff_alpha.append(a_row)
    difference = {
        "figure": "asymmetric minus dilated (paper Fig. 5)",
        "definition": "diff[round][layer] = mean(score of {}) - mean(score of {}) with score = sigmoid(alpha) * "
                      "sigmoid(beta), means over the ops of each group available at the layer; positive: the "
                      "asymmetric ops weigh more in that layer. sigmoid_alpha_diff is the same with sigmoid(alpha) "
                      "alone (diff = sigmoid(beta) * sigmoid_alpha_diff)".format(" ".join(asym), " ".join(dil)),
        "asymmetric_ops": asym, "dilated_ops": dil, "layers": ab.layers, "rounds": ab.rounds,
        "diff": diff, "sigmoid_alpha_diff": diff_alpha,
    }
    return scores, difference


def _masked(rows: Sequence[Sequence[Optional[float]]], mask: Optional[Sequence[Sequence[bool]]] = None):
    import numpy as np
    values = np.array([[math.nan if v is None else v for v in row] for row in rows], dtype=float)
    if mask is not None:
        values[~np.array(mask, dtype=bool)] = math.nan
    return np.ma.masked_invalid(values)


def _symmetric_limit(values) -> float:
    import numpy as np
    finite = np.abs(values.compressed()) if hasattr(values, "compressed") else np.abs(values)
    m = float(finite.max()) if finite.size else 0.0
    return m if m > 0 else 1e-6


def _heatmap(fig, ax, cax, values, center: float, cbar_label: str, cmap: str = "RdBu_r",
             vlim: Optional[float] = None):
    """``values - center`` on a diverging colour scale symmetric around 0; colour bar in ``cax``."""
    lim = vlim if vlim is not None else _symmetric_limit(values - center)
    ax.set_facecolor(_UNAVAILABLE)  # masked cells (op unavailable) show the axes background
    image = ax.imshow(values - center, cmap=cmap, vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    bar = fig.colorbar(image, cax=cax)
    bar.set_label(cbar_label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    bar.ax.yaxis.get_offset_text().set_fontsize(7)
    return image


def _round_ticks(ax, rounds: Sequence[int]) -> None:
    step = max(1, int(math.ceil(len(rounds) / 12.0)))
    idx = list(range(0, len(rounds), step))
    ax.set_xticks(idx)
    ax.set_xticklabels([str(rounds[i]) for i in idx], fontsize=7)


def render_alpha_beta(ab: AlphaBeta, backbone: Optional[str] = None) -> Outputs:
    """``alpha_beta.png`` (last round), ``alpha_rounds.png`` (every round), ``alpha_beta.json`` and,
    when the space has both op groups, ``asym_minus_dil.png/.json``."""
    import numpy as np
    scores, difference = alpha_beta_data(ab, backbone)
    specs = _specs_for(backbone, ab.layers)
    labels = [_layer_label(specs[i] if specs else None, n) for i, n in enumerate(ab.layers)]
    n_l, n_o, n_r = len(ab.layers), len(ab.ops), len(ab.rounds)
    avail = scores["available"]
    height = 1.6 + 0.27 * n_l
    last = ab.rounds[-1]

    # alpha_beta.png: the last round's score matrix and sigmoid(beta) per layer over rounds
    fig = _figure(2.0 + 0.55 * n_o + 2.2 + 0.35 * max(n_r, 2), height)
    grid = fig.add_gridspec(1, 5, width_ratios=[0.55 * n_o, 0.18, 1.25, 0.35 * max(n_r, 2), 0.18], wspace=0.05)
    ax = fig.add_subplot(grid[0, 0])
    values = _masked(scores["score"][-1], avail)
    _heatmap(fig, ax, fig.add_subplot(grid[0, 1]), values, INITIAL_SCORE,
             "sigmoid(\u03b1)\u00b7sigmoid(\u03b2) \u2212 {} (initial)".format(INITIAL_SCORE))
    ax.set_xticks(range(n_o))
    ax.set_xticklabels(ab.ops, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n_l))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_title("round {}: sigmoid(\u03b1)\u00b7sigmoid(\u03b2) per layer and op".format(last), fontsize=9)
    ax2 = fig.add_subplot(grid[0, 3], sharey=ax)
    _heatmap(fig, ax2, fig.add_subplot(grid[0, 4]), _masked(scores["sigmoid_beta"]).T, INITIAL_SIGMOID,
             "sigmoid(\u03b2) \u2212 {} (initial)".format(INITIAL_SIGMOID))
    _round_ticks(ax2, ab.rounds)
    ax2.tick_params(axis="y", labelleft=False)
    ax2.set_xlabel("round", fontsize=8)
    ax2.set_title("block scale sigmoid(\u03b2)\nper layer over rounds", fontsize=9)
    fig.suptitle("Architecture parameters (red: above the initial value, blue: below; grey: op unavailable)",
                 fontsize=9)
    out: Outputs = [("alpha_beta.png", _png(fig))]

    # alpha_rounds.png: small multiples, one panel per op, layers x rounds, one shared colour scale
    cols = min(4, n_o)
    rows = int(math.ceil(n_o / float(cols)))
    fig = _figure(1.8 + cols * (1.0 + 0.3 * max(n_r, 2)), 0.9 + rows * (0.6 + 0.2 * n_l))
    lim = _symmetric_limit(np.ma.concatenate([_masked(s, avail).ravel() for s in scores["score"]]) - INITIAL_SCORE)
    axes = []
    image = None
    for o, op in enumerate(ab.ops):
        axo = fig.add_subplot(rows, cols, o + 1)
        axes.append(axo)
        per_round = np.array([[s[l][o] if avail[l][o] else math.nan for l in range(n_l)] for s in scores["score"]])
        axo.set_facecolor(_UNAVAILABLE)
        image = axo.imshow(np.ma.masked_invalid(per_round.T) - INITIAL_SCORE, cmap="RdBu_r", vmin=-lim, vmax=lim,
                           aspect="auto", interpolation="nearest")
        axo.set_title(op, fontsize=8)
        _round_ticks(axo, ab.rounds)
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
    out.append(("alpha_rounds.png", _png(fig)))
    out.append(("alpha_beta.json", _json_bytes(scores)))

    if difference is not None:
        fig = _figure(2.0 + 0.35 * max(n_r, 2) + 4.0, height)
        grid = fig.add_gridspec(1, 4, width_ratios=[0.35 * max(n_r, 2), 0.18, 1.25, 2.2], wspace=0.05)
        ax = fig.add_subplot(grid[0, 0])
        diff = _masked(difference["diff"]).T
        lim = _symmetric_limit(diff)
        _heatmap(fig, ax, fig.add_subplot(grid[0, 1]), diff, 0.0, "mean asymmetric \u2212 mean dilated score",
                 cmap="PuOr_r", vlim=lim)
        _round_ticks(ax, ab.rounds)
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
        axb.set_title("round {}".format(last), fontsize=9)
        axb.set_xlabel("asymmetric \u2212 dilated", fontsize=8)
        axb.set_ylim(n_l - 0.5, -0.5)
        fig.suptitle("Asymmetric ({}) minus dilated ({}) score per layer\n(orange: asymmetric ops weigh more; "
                     "score = sigmoid(\u03b1)\u00b7sigmoid(\u03b2), group means)".format(
                         ", ".join(difference["asymmetric_ops"]), ", ".join(difference["dilated_ops"])), fontsize=9)
        out.append(("asym_minus_dil.png", _png(fig)))
        out.append(("asym_minus_dil.json", _json_bytes(difference)))
    return out


def plot_alpha_beta(source: Union[AlphaBeta, PathLike], out_dir: PathLike,
                    backbone: Optional[str] = None) -> List[Path]:
    """Write the alpha/beta figures of ``alpha_beta.jsonl`` (or a loaded :class:`AlphaBeta`).

    ``backbone`` (optional) greys out ops unavailable at a layer and marks stride-2 layers.
    """
    ab = source if isinstance(source, AlphaBeta) else load_alpha_beta(source)
    return _write(render_alpha_beta(ab, backbone), out_dir)


# -- 3. fitness -----------------------------------------------------------------------------------
def load_rounds(path: PathLike) -> List[Dict[str, float]]:
    """``{"round", "best_fitness", "mean_fitness"}`` of every round event of ``log.jsonl``."""
    out: List[Dict[str, float]] = []
    for lineno, rec in _read_jsonl(path):
        if rec.get("event") != "round":
            continue
        where = "{}:{}".format(path, lineno)
        for key in ("round", "best_fitness", "mean_fitness"):
            if key not in rec:
                raise PlotError("{}: round record without {!r}".format(where, key))
        out.append({"round": int(_number(rec["round"], where, "'round'")),
                    "best_fitness": _number(rec["best_fitness"], where, "'best_fitness'"),
                    "mean_fitness": _number(rec["mean_fitness"], where, "'mean_fitness'")})
    return out


def load_population(path: PathLike) -> Dict[str, Any]:
    """``population.json``, checked: every code has rank, fitness, branches and a history."""
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("codes"), list):
        raise PlotError("{}: expected an object with a 'codes' list (population.json of a search run)".format(path))
    codes = []
    for i, code in enumerate(data["codes"], 1):
        where = "{}: code {}".format(path, i)
        if not isinstance(code, dict):
            raise PlotError("{}: expected an object".format(where))
        for key in ("rank", "fitness", "branches", "history"):
            if key not in code:
                raise PlotError("{}: missing {!r}".format(where, key))
        history = code["history"]
        if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 for h in history):
            raise PlotError("{}: 'history' must be a list of [round, fitness] pairs".format(where))
        codes.append({"rank": int(_number(code["rank"], where, "'rank'")),
                      "fitness": _number(code["fitness"], where, "'fitness'"),
                      "branches": int(_number(code["branches"], where, "'branches'")),
                      "history": [[int(_number(r, where, "history round")), _number(f, where, "history fitness")]
                                  for r, f in history]})
    return {"round": data.get("round"), "budget": data.get("budget"), "codes": codes}


def render_fitness(rounds: Optional[List[Dict[str, float]]], population: Optional[Dict[str, Any]]) -> Outputs:
    if not rounds and not population:
        raise PlotError("no fitness to plot: no round in log.jsonl and no population.json")
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    xs: List[int] = []
    if population:
        for code in sorted(population["codes"], key=lambda c: -c["rank"]):
            hx = [h[0] for h in code["history"]]
            hy = [h[1] for h in code["history"]]
            xs += hx
            best = code["rank"] == 1
            ax.plot(hx, hy, "-", color="#d62728" if best else "#9e9e9e", linewidth=1.2 if best else 0.6,
                    alpha=1.0 if best else 0.6, zorder=3 if best else 1)
            ax.scatter(hx, hy, s=22 if best else 12, color="#d62728" if best else "#7f7f7f", alpha=1.0 if best else 0.6,
                       zorder=4 if best else 2, edgecolors="none",
                       label=("final best code (rank 1)" if best else None))
        ax.scatter([], [], s=12, color="#7f7f7f", alpha=0.6,
                   label="other codes of the final population ({} codes)".format(len(population["codes"])))
    if rounds:
        rx = [r["round"] for r in rounds]
        xs += rx
        ax.plot(rx, [r["best_fitness"] for r in rounds], "o-", color="#1f77b4", linewidth=2, label="best of round")
        ax.plot(rx, [r["mean_fitness"] for r in rounds], "s--", color="#2ca02c", linewidth=1.5,
                label="population mean of round")
    if xs:
        lo, hi = min(xs), max(xs)
        step = max(1, int(math.ceil((hi - lo + 1) / 12.0)))
        ax.set_xticks(list(range(lo, hi + 1, step)))
        ax.set_xlim(lo - 0.5, hi + 0.5)
    ax.set_xlabel("evolution round")
    ax.set_ylabel("fitness: validation top-1 of the fused code (%)")
    ax.grid(True, color="#e0e0e0")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Population fitness over the DES rounds", fontsize=10)
    data = {"figure": "population fitness over rounds",
            "rounds": rounds or [],
            "codes": population["codes"] if population else [],
            "note": "rounds: best and mean fitness of each round (log.jsonl); codes: every code of the final "
                    "population with its fitness in each round it was evaluated (population.json)"}
    return [(FITNESS_FILES[0], _png(fig)), (FITNESS_FILES[1], _json_bytes(data))]


def plot_fitness(run_dir: PathLike, out_dir: PathLike) -> List[Path]:
    """Write ``fitness.png/.json`` from ``log.jsonl`` and/or ``population.json`` of a search run."""
    run = Path(run_dir)
    rounds = load_rounds(run / "log.jsonl") if (run / "log.jsonl").exists() else None
    population = load_population(run / "population.json") if (run / "population.json").exists() else None
    return _write(render_fitness(rounds, population), out_dir)


# -- 4. accuracy vs latency -----------------------------------------------------------------------
def load_points(path: PathLike) -> Dict[str, Any]:
    """Read ``points.json``: a list of points, or ``{"title": ..., "points": [...]}``.

    A point is ``{"label": str, "latency_ms": number > 0, "accuracy": percent in [0, 100]}`` with an
    optional ``"group"`` (str; points of a group share colour and marker; default: the label).
    """
    data = _read_json(path)
    title = None
    if isinstance(data, dict):
        title = data.get("title")
        if title is not None and not isinstance(title, str):
            raise PlotError("{}: 'title' must be a string".format(path))
        data = data.get("points")
    if not isinstance(data, list) or not data:
        raise PlotError("{}: expected a non-empty list of points [{{\"label\", \"latency_ms\", \"accuracy\"}}, ...] "
                        "(or an object with a 'points' list)".format(path))
    points = []
    for i, point in enumerate(data, 1):
        where = "{}: point {}".format(path, i)
        if not isinstance(point, dict):
            raise PlotError("{}: expected an object".format(where))
        for key in ("label", "latency_ms", "accuracy"):
            if key not in point:
                raise PlotError("{}: missing {!r}".format(where, key))
        label = point["label"]
        if not isinstance(label, str) or not label:
            raise PlotError("{}: 'label' must be a non-empty string".format(where))
        group = point.get("group", label)
        if not isinstance(group, str) or not group:
            raise PlotError("{}: 'group' must be a non-empty string".format(where))
        latency = _number(point["latency_ms"], where, "'latency_ms'")
        accuracy = _number(point["accuracy"], where, "'accuracy'")
        if latency <= 0:
            raise PlotError("{}: 'latency_ms' must be positive, got {}".format(where, latency))
        if not 0.0 <= accuracy <= 100.0:
            raise PlotError("{}: 'accuracy' is a percentage in [0, 100], got {}".format(where, accuracy))
        points.append({"label": label, "group": group, "latency_ms": latency, "accuracy": accuracy})
    return {"title": title, "points": points}


_GROUP_STYLE = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def render_points(points: Dict[str, Any]) -> Outputs:
    fig = _figure(6.0, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    groups: List[str] = []
    for p in points["points"]:
        if p["group"] not in groups:
            groups.append(p["group"])
    labelled = []
    for g, group in enumerate(groups):
        members = [p for p in points["points"] if p["group"] == group]
        members.sort(key=lambda p: p["latency_ms"])
        xs, ys = [p["latency_ms"] for p in members], [p["accuracy"] for p in members]
        color = "C{}".format(g % 10)
        ax.plot(xs, ys, linestyle="none", marker=_GROUP_STYLE[g % len(_GROUP_STYLE)], color=color, markersize=8,
                label=group)
        labelled += [(p, color) for p in members if p["label"] != group or len(members) > 1]
    xs = [p["latency_ms"] for p in points["points"]]
    ys = [p["accuracy"] for p in points["points"]]
    dx = (max(xs) - min(xs)) or max(xs) * 0.1
    dy = (max(ys) - min(ys)) or 1.0
    ax.set_xlim(min(xs) - 0.15 * dx, max(xs) + 0.3 * dx)
    ax.set_ylim(min(ys) - 0.15 * dy, max(ys) + 0.2 * dy)
    # a 7-pt label is about 5 % of the axes high and spans about a quarter of the x range
    _place_labels(ax, labelled, x_near=0.25 * dx, gap=0.05 * 1.35 * dy, x_offset=0.03 * dx)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, color="#e0e0e0")
    ax.legend(fontsize=8, loc="best")
    ax.set_title(points["title"] or "Accuracy vs latency (upper left is better)", fontsize=10)
    data = {"figure": "accuracy vs latency", "title": points["title"], "points": points["points"]}
    return [(POINTS_FILES[0], _png(fig)), (POINTS_FILES[1], _json_bytes(data))]


def _place_labels(ax, labelled: List[Tuple[Dict[str, Any], str]], x_near: float, gap: float,
                  x_offset: float) -> None:
    """Label points top-down; a label that would overlap one placed nearby moves below it, with a
    leader line (points of equal latency, e.g. codes that fuse to the same network, pile up)."""
    placed: List[Tuple[float, float]] = []
    for p, color in sorted(labelled, key=lambda item: -item[0]["accuracy"]):
        x, y = p["latency_ms"], p["accuracy"]
        for px, py in sorted(placed, key=lambda q: -q[1]):
            if abs(px - x) < x_near and abs(py - y) < gap:
                y = py - gap
        placed.append((x, y))
        moved = y != p["accuracy"]
        ax.annotate(p["label"], (x, p["accuracy"]), xytext=(x + x_offset, y), textcoords="data",
                    fontsize=7, color=color, va="center",
                    arrowprops=dict(arrowstyle="-", color=color, lw=0.5) if moved else None)


def plot_points(source: Union[Dict[str, Any], PathLike], out_dir: PathLike) -> List[Path]:
    """Write ``accuracy_latency.png/.json`` from a ``points.json`` file (or :func:`load_points` output)."""
    points = source if isinstance(source, dict) else load_points(source)
    return _write(render_points(points), out_dir)


# -- everything the inputs allow -------------------------------------------------------------------
@dataclass
class PlotReport:
    out_dir: Path
    written: List[Path] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)  # one sentence per figure that was not made


SEARCH_FILES = ("arch.bin", "alpha_beta.jsonl", "log.jsonl", "population.json")


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
    _mpl()
    if source is not None:
        base = Path(source) if Path(source).is_dir() else Path(source).parent
    else:
        base = Path(str(points)).parent
    out = Path(out_dir) if out_dir is not None else base / "figures"
    if out.exists() and not out.is_dir():
        raise PlotError("{}: cannot write figures: it is a file, not a directory".format(out))
    # read and check every input first: a bad file fails before any rendering or writing
    skipped: List[str] = []
    code: Optional[ArchCode] = None
    ab: Optional[AlphaBeta] = None
    rounds: Optional[List[Dict[str, float]]] = None
    population: Optional[Dict[str, Any]] = None
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
            ab = load_alpha_beta(src / "alpha_beta.jsonl") if "alpha_beta.jsonl" in present else None
            rounds = load_rounds(src / "log.jsonl") if "log.jsonl" in present else None
            population = load_population(src / "population.json") if "population.json" in present else None
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
    return PlotReport(out, _write(outputs, out, inputs), skipped)


def _config_backbone(run: Path) -> Optional[str]:
    try:
        config = json.loads(_read_text(run / "config.json"))
    except (PlotError, ValueError, RecursionError):
        return None
    value = config.get("backbone") if isinstance(config, dict) else None
    return value if isinstance(value, str) else None
