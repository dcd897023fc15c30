"""The one figure style for every PNG wat writes (wat-train, wat-probe, wat-eval, wat-robust).

Figures are sized for a paper: one column of a two-column layout is ~3.3 in wide, and every font
is at least 8 pt at that size (saved at 300 dpi, so a figure dropped into LaTeX at column width
reads as typeset). Labels come from the cache's own metadata (model, policy, dataset, clip count),
never from file or folder names. Score axes follow the data with padding: the differences between
layers or epochs are the point of these figures, and a 0..1 axis flattens them. Reference values
(chance, fusion baselines) are labelled lines; a reference far outside the data range is named at
the edge of the axes instead of stretching the axis to reach it.
"""
from __future__ import annotations

import math
import textwrap

import numpy as np

from .. import files

COLUMN = 3.3      # inches: one column of a two-column paper (ICASSP, Interspeech, IEEE)
PAGE = 6.9        # inches: the full text width of the same layouts
DPI = 300         # PNG resolution: sharp when printed at the sizes above
FONT_PT = 8       # smallest font anywhere in a figure (ticks, legends, captions)

# colour-blind-safe cycle (Okabe & Ito); grey is kept for reference lines
COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
REFERENCE = "#777777"

_RC = {
    "font.size": FONT_PT, "axes.titlesize": FONT_PT + 1, "axes.labelsize": FONT_PT,
    "xtick.labelsize": FONT_PT, "ytick.labelsize": FONT_PT, "legend.fontsize": FONT_PT,
    "figure.titlesize": FONT_PT + 1, "legend.title_fontsize": FONT_PT,
    "axes.linewidth": 0.6, "lines.linewidth": 1.2, "lines.markersize": 3.5,
    "xtick.major.width": 0.6, "ytick.major.width": 0.6, "xtick.major.size": 2.5, "ytick.major.size": 2.5,
    "axes.grid": True, "grid.linewidth": 0.4, "grid.alpha": 0.35,
    "axes.spines.top": False, "axes.spines.right": False,
    "legend.frameon": False, "legend.handlelength": 1.6,
    "savefig.dpi": DPI, "figure.dpi": 100, "savefig.bbox": "tight", "savefig.pad_inches": 0.03,
}


class FigureError(ValueError):
    """A figure asked for with nothing to draw."""


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (files.pyplot), in wat's style."""
    from cycler import cycler
    plt = files.pyplot()
    plt.rcParams.update(_RC)
    plt.rcParams["axes.prop_cycle"] = cycler(color=COLORS)
    return plt


PNG_LINES_KEY = "wat:lines"   # PNG text chunk: JSON list of the labelled lines drawn (plotted_lines)


def save(fig, path) -> dict:
    """Write the PNG (files.save_figure: atomic, at the style's 300 dpi) and return what it shows
    (`text`: every string drawn, `ylim`: the first axes' y-limits, `lines`: plotted_lines), for tests
    and checks. The lines also go into the PNG's metadata (`png_lines` reads them back)."""
    lines = plotted_lines(fig)
    shown = {"text": drawn_text(fig), "ylim": tuple(float(v) for v in fig.axes[0].get_ylim()), "lines": lines}
    import json
    files.save_figure(fig, path, metadata={PNG_LINES_KEY: json.dumps(lines)})
    return shown


def plotted_lines(fig) -> list[dict]:
    """Every labelled line of every axes: {"axes", "label", "x", "y"} (data coordinates; reference lines
    drawn with axhline have two x values in axes units)."""
    out = []
    for i, ax in enumerate(fig.axes):
        for line in ax.get_lines():
            label = line.get_label()
            if label and not label.startswith("_"):
                out.append({"axes": i, "label": label, "x": [float(v) for v in np.asarray(line.get_xdata(), float)],
                            "y": [float(v) for v in np.asarray(line.get_ydata(), float)]})
    return out


def png_lines(path) -> list[dict]:
    """The lines a PNG written by `save` holds, read back from its metadata."""
    import json

    from PIL import Image
    with Image.open(path) as im:
        return json.loads(im.text.get(PNG_LINES_KEY, "[]"))


def figure(rows: int = 1, cols: int = 1, *, width: float = COLUMN, height: float | None = None, **kw):
    """(fig, axes[rows, cols]) at a paper width; height defaults to a 4:3 panel per row."""
    plt = pyplot()
    height = height if height is not None else rows * 0.75 * width / cols
    return plt.subplots(rows, cols, figsize=(width, height), squeeze=False, **kw)


def model_label(meta) -> str:
    """Short legend label of a cache: the Whisper model and the input policy, e.g. `base (pad30)`."""
    return f"{meta.model} ({meta.policy})"


def cache_label(meta, n_clips: int | None = None) -> str:
    """One-line description of a cache for titles: `Whisper base, pad30, esc50: 11 classes, 110 clips`
    (another encoder family: its model name alone, `crepe-tiny, trim, ...`)."""
    whisper = getattr(meta, "encoder", "whisper") == "whisper"
    parts = [f"Whisper {meta.model}" if whisper else meta.model, meta.policy, meta.dataset]
    tail = f"{len(meta.vocab)} classes" + ("" if n_clips is None else f", {n_clips} clips")
    return ", ".join(parts) + ": " + tail


def distinct_labels(metas) -> list[str]:
    """Legend labels for several caches: model (policy), then the dataset, then the position when
    that still leaves two caches with the same label."""
    for label in (model_label, lambda m: f"{model_label(m)}, {m.dataset}"):
        labels = [label(m) for m in metas]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{model_label(m)} #{i + 1}" for i, m in enumerate(metas)]


def data_limits(values, *, bounds=(None, None), pad: float = 0.15, min_span: float = 0.02) -> tuple[float, float]:
    """Axis limits that hold every finite value (of nested lists or arrays) with `pad` of the span
    either side (at least `min_span` wide), clipped to `bounds` (e.g. (0, 1) for accuracies)."""
    v = np.asarray([x for x in _flat(values) if x is not None and math.isfinite(x)], float)
    if not v.size:
        raise FigureError("no finite value to scale the axis to")
    lo, hi = float(v.min()), float(v.max())
    span = max(hi - lo, min_span)
    mid = (lo + hi) / 2
    lo, hi = min(lo, mid - span / 2) - pad * span, max(hi, mid + span / 2) + pad * span
    if bounds[0] is not None:
        lo = max(lo, bounds[0])
    if bounds[1] is not None:
        hi = min(hi, bounds[1])
    return lo, hi


def _flat(values) -> list:
    """Numbers of a scalar, an array or nested lists of different lengths (one per line drawn)."""
    if values is None or np.isscalar(values):
        return [values]
    return [x for v in values for x in _flat(v)] if not isinstance(values, np.ndarray) else values.ravel().tolist()


def reference_line(ax, y: float, label: str, *, color: str = REFERENCE, ls: str = ":", fmt: str = "{:.3g}") -> None:
    """A labelled horizontal reference at y. Inside the current y-limits it is a legend entry;
    outside, its value is written at the top or bottom edge (the axis keeps following the data)."""
    if y is None or not math.isfinite(y):
        return
    lo, hi = ax.get_ylim()
    text = f"{label} {fmt.format(y)}"
    if lo <= y <= hi:
        ax.axhline(y, color=color, ls=ls, lw=1.0, label=text, zorder=1)
        return
    above = y > hi
    # stack several off-axis notes at the same edge instead of overprinting them
    n = sum(1 for t in ax.texts if getattr(t, "_wat_edge", None) == above)
    t = ax.text(0.99, (0.97 if above else 0.03) + (-0.09 if above else 0.09) * n,
                f"{text} {'↑' if above else '↓'}", transform=ax.transAxes, ha="right",
                va="top" if above else "bottom", color=color, fontsize=FONT_PT)
    t._wat_edge = above


def legend_below(ax, ncol: int = 2) -> None:
    """The legend under the axes, below its tick labels and x label: at column width a legend
    inside the axes covers the data."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        box = ax.get_tightbbox(ax.figure.canvas.get_renderer())        # display units
        y = ax.transAxes.inverted().transform((0, box.y0))[1]
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, y - 0.02), ncol=ncol,
                  borderaxespad=0.0, columnspacing=1.0)


def caption(fig, text: str, width_chars: int | None = None) -> None:
    """A caption under everything already drawn (axes, tick labels, a legend below the axes); the
    tight bounding box of `save_figure` keeps it inside the PNG."""
    w = width_chars or max(30, int(fig.get_figwidth() * 14))   # ~14 characters of 8 pt per inch
    box = fig.get_tightbbox(fig.canvas.get_renderer())           # inches
    fig.text(0.5, (box.y0 - 0.08) / fig.get_figheight(), textwrap.fill(text, w), ha="center", va="top",
             fontsize=FONT_PT)


def drawn_text(fig) -> list[str]:
    """Every piece of text in a figure (titles, labels, ticks, legend, notes, caption): what a
    reader sees, for tests and checks."""
    from matplotlib.text import Text
    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def title(ax, *lines: str, width_chars: int | None = None) -> None:
    """A title of one or more lines (e.g. what, then on which data), each wrapped to the axes' width."""
    w = width_chars or max(24, int(ax.figure.get_figwidth() * 12 / max(1, _n_cols(ax))))
    ax.set_title("\n".join(_wrap(line, w) for line in lines if line))


def _wrap(line: str, width: int) -> str:
    """Wrap a line, breaking first after a colon (`Whisper base, pad30, esc50:` / `11 classes, ...`)."""
    head, sep, tail = line.partition(": ")
    if len(line) <= width or not sep:
        return textwrap.fill(line, width)
    return textwrap.fill(head + ":", width) + "\n" + textwrap.fill(tail, width)


def _n_cols(ax) -> int:
    spec = ax.get_subplotspec()
    return spec.get_gridspec().ncols if spec is not None else 1
