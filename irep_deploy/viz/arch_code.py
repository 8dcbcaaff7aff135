"""Figure 1, the architecture code matrix (paper Fig. A2): ``arch_code.png`` + ``arch_code.json``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from ..arch import ArchCode
from .common import UNAVAILABLE, Outputs, PathLike, figure, json_bytes, layer_label, png, write

ARCH_FILES = ("arch_code.png", "arch_code.json")
KEPT, NOT_KEPT = "#1f4e79", "#ffffff"


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
    fig = figure(2.2 + 0.62 * n_o + 1.6, 2.3 + 1.1 + 0.3 * n_l)
    grid = fig.add_gridspec(2, 2, width_ratios=[0.62 * n_o, 1.6], height_ratios=[1.1, 0.3 * n_l],
                            wspace=0.04, hspace=0.04)
    ax = fig.add_subplot(grid[1, 0])
    top = fig.add_subplot(grid[0, 0], sharex=ax)
    right = fig.add_subplot(grid[1, 1], sharey=ax)
    values = [[c + 1 for c in row] for row in data["cells"]]  # 0 unavailable, 1 not kept, 2 kept
    ax.imshow(values, cmap=ListedColormap([UNAVAILABLE, NOT_KEPT, KEPT]), vmin=-0.5, vmax=2.5,
              aspect="auto", interpolation="nearest")
    for l, row in enumerate(data["cells"]):
        for o, cell in enumerate(row):
            if cell < 0:
                ax.text(o, l, "\u00d7", ha="center", va="center", fontsize=9, color="#555555")
    ax.set_xticks(range(n_o))
    ax.set_xticklabels(code.ops, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n_l))
    ax.set_yticklabels([layer_label(s, n) for s, n in zip(specs, code.layers)], fontsize=8)
    ax.set_xticks([x - 0.5 for x in range(1, n_o)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, n_l)], minor=True)
    ax.grid(which="minor", color="#8c8c8c", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("candidate op")
    ax.set_ylabel("searchable 3x3 conv (forward order{})".format(
        "; s2 = stride 2" if any(s.stride != 1 for s in specs) else ""))

    counts = [data["op_counts"][op] for op in code.ops]
    avail = [sum(1 for row in data["cells"] if row[o] >= 0) for o in range(n_o)]
    top.bar(range(n_o), avail, color=NOT_KEPT, edgecolor="#8c8c8c", width=0.7)
    top.bar(range(n_o), counts, color=KEPT, width=0.7, label="kept")
    for o, c in enumerate(counts):
        top.text(o, c, str(c), ha="center", va="bottom", fontsize=7)
    top.set_ylabel("kept per op\n(box: available)", fontsize=8)
    top.set_ylim(0, max(avail + [1]) * 1.25)
    top.tick_params(axis="x", labelbottom=False)
    top.tick_params(axis="y", labelsize=7)
    top.yaxis.set_major_locator(MaxNLocator(integer=True))

    lcounts = [data["layer_counts"][n] for n in code.layers]
    lavail = [sum(1 for c in row if c >= 0) for row in data["cells"]]
    right.barh(range(n_l), lavail, color=NOT_KEPT, edgecolor="#8c8c8c", height=0.7)
    right.barh(range(n_l), lcounts, color=KEPT, height=0.7)
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
    corner.legend(handles=[Patch(facecolor=KEPT, edgecolor="#8c8c8c", label="kept"),
                           Patch(facecolor=NOT_KEPT, edgecolor="#8c8c8c", label="not kept"),
                           Patch(facecolor=UNAVAILABLE, edgecolor="#8c8c8c", label="\u00d7 unavailable")],
                  loc="center", fontsize=7, frameon=False)
    top.set_title(title or "{}: {} of {} available branches kept (ratio {:.2f})".format(
        code.backbone, data["kept"], data["capacity"], data["ratio"]), fontsize=10)
    return [(ARCH_FILES[0], png(fig)), (ARCH_FILES[1], json_bytes(data))]


def plot_arch(code: ArchCode, out_dir: PathLike, title: Optional[str] = None) -> List[Path]:
    """Write ``arch_code.png`` and ``arch_code.json`` (cells, per-op and per-layer counts)."""
    return write(render_arch(code, title), out_dir)
