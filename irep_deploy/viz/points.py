"""Figure 4, accuracy vs latency (paper Fig. 1 style): ``accuracy_latency.png`` + ``.json``, from a
points file written by whoever measured the models (docs/figures.md gives its format)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

from .._io import quote
from ..errors import PlotError
from .common import Outputs, PathLike, figure, json_bytes, png, read_input, write

POINTS_FILES = ("accuracy_latency.png", "accuracy_latency.json")


def _number(value: Any, where: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PlotError("{}: {} must be a finite number, got {}".format(where, what, quote(value)))
    return float(value)


def load_points(path: PathLike) -> Dict[str, Any]:
    """Read ``points.json``: a list of points, or ``{"title": ..., "points": [...]}``.

    A point is ``{"label": str, "latency_ms": number > 0, "accuracy": percent in [0, 100]}`` with an
    optional ``"group"`` (str; points of a group share colour and marker; default: the label) and the
    latency's trust marks, as its producer judged them: ``"latency_spread"`` (number >= 0 or null),
    ``"untrusted"`` (bool; drawn hollow and named on the plot) and ``"latency_range_ms"`` ([low, high],
    the per-round medians' range; drawn as a bar).
    """
    data = read_input(path)
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
        points.append(dict({"label": label, "group": group, "latency_ms": latency, "accuracy": accuracy},
                           **_trust(point, where)))
    return {"title": title, "points": points}


def _trust(point: Dict[str, Any], where: str) -> Dict[str, Any]:
    """The optional trust marks of a point, checked."""
    out: Dict[str, Any] = {}
    if point.get("latency_spread") is not None:
        out["latency_spread"] = _number(point["latency_spread"], where, "'latency_spread'")
        if out["latency_spread"] < 0:
            raise PlotError("{}: 'latency_spread' must be >= 0, got {}".format(where, out["latency_spread"]))
    if "untrusted" in point:
        if not isinstance(point["untrusted"], bool):
            raise PlotError("{}: 'untrusted' must be true or false, got {}".format(where, quote(point["untrusted"])))
        out["untrusted"] = point["untrusted"]
    if point.get("latency_range_ms") is not None:
        rng = point["latency_range_ms"]
        if not isinstance(rng, list) or len(rng) != 2:
            raise PlotError("{}: 'latency_range_ms' must be [low, high]".format(where))
        lo, hi = (_number(v, where, "'latency_range_ms'") for v in rng)
        if not 0 < lo <= hi:
            raise PlotError("{}: 'latency_range_ms' must be [low, high] with 0 < low <= high, got {}".format(
                where, rng))
        out["latency_range_ms"] = [lo, hi]
    return out


_GROUP_STYLE = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def render_points(points: Dict[str, Any]) -> Outputs:
    fig = figure(6.0, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    groups: List[str] = []
    for p in points["points"]:
        if p["group"] not in groups:
            groups.append(p["group"])
    labelled = []
    legend: List[str] = []
    for g, group in enumerate(groups):
        members = [p for p in points["points"] if p["group"] == group]
        members.sort(key=lambda p: p["latency_ms"])
        color, marker = "C{}".format(g % 10), _GROUP_STYLE[g % len(_GROUP_STYLE)]
        for untrusted in (False, True):  # untrusted latencies hollow
            part = [p for p in members if p.get("untrusted", False) == untrusted]
            if part:
                ax.plot([p["latency_ms"] for p in part], [p["accuracy"] for p in part], linestyle="none",
                        marker=marker, color=color, markersize=8, markerfacecolor="white" if untrusted else color,
                        markeredgewidth=1.5, label=None if group in legend else group)
                legend.append(group)
        for p in members:
            if "latency_range_ms" in p:
                lo, hi = p["latency_range_ms"]
                ax.errorbar([p["latency_ms"]], [p["accuracy"]], xerr=[[max(p["latency_ms"] - lo, 0.0)],
                                                                      [max(hi - p["latency_ms"], 0.0)]],
                            fmt="none", ecolor=color, elinewidth=1, capsize=3)
        labelled += [(p, color) for p in members if p["label"] != group or len(members) > 1 or p.get("untrusted")]
    if any(p.get("untrusted") for p in points["points"]):
        ax.plot([], [], linestyle="none", marker="o", color="black", markerfacecolor="white",
                label="hollow: UNTRUSTED latency (rounds spread too wide)")
    if any("latency_range_ms" in p for p in points["points"]):
        ax.plot([], [], color="black", lw=1, label="bar: range of the per-round medians")
    xs = [p["latency_ms"] for p in points["points"]] + [v for p in points["points"]
                                                        for v in p.get("latency_range_ms", [])]
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
    return [(POINTS_FILES[0], png(fig)), (POINTS_FILES[1], json_bytes(data))]


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
        ax.annotate(_label(p), (x, p["accuracy"]), xytext=(x + x_offset, y), textcoords="data",
                    fontsize=7, color=color, va="center",
                    arrowprops=dict(arrowstyle="-", color=color, lw=0.5) if moved else None)


def _label(p: Dict[str, Any]) -> str:
    if not p.get("untrusted"):
        return p["label"]
    spread = p.get("latency_spread")
    return "{} (UNTRUSTED{})".format(p["label"], "" if spread is None else ", spread {:.0%}".format(spread))


def plot_points(source: Union[Dict[str, Any], PathLike], out_dir: PathLike) -> List[Path]:
    """Write ``accuracy_latency.png/.json`` from a ``points.json`` file (or :func:`load_points` output)."""
    points = source if isinstance(source, dict) else load_points(source)
    return write(render_points(points), out_dir)
