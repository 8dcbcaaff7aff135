"""What the figures share: matplotlib's Agg canvas, PNG and JSON bytes, writing, heatmaps, labels."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

from .._io import atomic_write, check_not_input, check_output_kind, file_kind, read_json
from ..arch import LayerSpec, backbone_info
from ..errors import IrepError, NotAvailableError, PlotError

PathLike = Union[str, Path]
Outputs = List[Tuple[str, bytes]]  # (file name, content), rendered but not yet written

#: Grey of a cell whose op does not exist at that layer (figures 1 and 2).
UNAVAILABLE = "#c8c8c8"
MAX_INPUT_BYTES = 256 << 20  # a points or config file is far smaller


def mpl():
    """(Figure class, FigureCanvasAgg) or a one-line error naming the extra to install."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise NotAvailableError("figures need matplotlib: pip install 'irep-deploy[viz]' (or pip install matplotlib)") from exc
    return Figure, FigureCanvasAgg


def figure(width: float, height: float):
    """A figure on its own Agg canvas: pyplot's global state and the caller's backend stay untouched."""
    Figure, FigureCanvasAgg = mpl()
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def png(fig, dpi: int = 130) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": "irep-deploy"})
    return buf.getvalue()


def json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


def read_input(path: PathLike) -> Any:
    """The JSON of a figure input that is not a search record (points, config), bounded."""
    return read_json(path, MAX_INPUT_BYTES, "a figure input", PlotError)


def check_figure_dir(out: Path) -> None:
    """Refuse a figures directory that exists as something else (a file, a FIFO), naming what it is."""
    if out.exists() and not out.is_dir():
        raise PlotError("{}: cannot write figures: it is {}, not a directory".format(out, file_kind(out.stat().st_mode)))


def write(outputs: Outputs, out_dir: PathLike, inputs: Sequence[Optional[PathLike]] = ()) -> List[Path]:
    """Write rendered figures, each atomically, after checking that none would replace an input."""
    out = Path(out_dir)
    check_figure_dir(out)
    for name, _ in outputs:
        check_not_input(out / name, inputs)
        check_output_kind(out / name)  # a FIFO among the figures: refused before the first is written
    written = []
    for name, data in outputs:
        with atomic_write(out / name, "wb") as handle:
            handle.write(data)
        written.append(out / name)
    return written


def layer_label(spec: Optional[LayerSpec], name: str) -> str:
    return "{} (s{})".format(name, spec.stride) if spec is not None and spec.stride != 1 else name


def specs_for(backbone: Optional[str], layers: Sequence[str]) -> Optional[Tuple[LayerSpec, ...]]:
    """The layer geometry when the backbone is known and its layers are these; else None."""
    if not backbone:
        return None
    try:
        specs = backbone_info(backbone).layers()
    except IrepError:
        return None
    return specs if tuple(s.name for s in specs) == tuple(layers) else None


# -- heatmaps over rounds (figures 2 and 2b) ------------------------------------------------------
def masked(rows: Sequence[Sequence[Optional[float]]], mask: Optional[Sequence[Sequence[bool]]] = None):
    """A masked array of ``rows``; None and the cells where ``mask`` is False are masked."""
    import numpy as np
    values = np.array([[math.nan if v is None else v for v in row] for row in rows], dtype=float)
    if mask is not None:
        values[~np.array(mask, dtype=bool)] = math.nan
    return np.ma.masked_invalid(values)


def symmetric_limit(values) -> float:
    import numpy as np
    finite = np.abs(values.compressed()) if hasattr(values, "compressed") else np.abs(values)
    m = float(finite.max()) if finite.size else 0.0
    return m if m > 0 else 1e-6


def heatmap(fig, ax, cax, values, center: float, cbar_label: str, cmap: str = "RdBu_r",
            vlim: Optional[float] = None):
    """``values - center`` on a diverging colour scale symmetric around 0; colour bar in ``cax``."""
    lim = vlim if vlim is not None else symmetric_limit(values - center)
    ax.set_facecolor(UNAVAILABLE)  # masked cells (op unavailable) show the axes background
    image = ax.imshow(values - center, cmap=cmap, vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    bar = fig.colorbar(image, cax=cax)
    bar.set_label(cbar_label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    bar.ax.yaxis.get_offset_text().set_fontsize(7)
    return image


def round_ticks(ax, rounds: Sequence[int]) -> None:
    step = max(1, int(math.ceil(len(rounds) / 12.0)))
    idx = list(range(0, len(rounds), step))
    ax.set_xticks(idx)
    ax.set_xticklabels([str(rounds[i]) for i in idx], fontsize=7)
