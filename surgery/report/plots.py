"""Report plots: matplotlib figures rendered to small inline SVG strings.

Each function takes plain result data (the dicts in ``results.json``) and returns the ``<svg>``
markup of one figure, or ``None`` when there is nothing to draw (the page then says so in
words). The figures are made with :class:`matplotlib.figure.Figure` directly, never through
pyplot: no GUI backend, no global figure registry, nothing to close on the caller's side.

Size is a feature: a ResNet-50 report must stay under 2 MB. Text stays text
(``svg.fonttype: none``), there is no metadata or XML prologue, path coordinates keep two
decimals, element ids are prefixed per figure (several SVGs share one HTML document) and
curves are thinned to at most ``MAX_POINTS`` points.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import io
import itertools
import math
import re
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

# Colours shared by the plots and the page's CSS legend (render.py passes them to the templates).
STAGE_COLORS = {"reference": "#4d4d4d", "surgery": "#e66100", "finetune": "#5d3a9b", "gate": "#1a7f37"}
STAGE_LABELS = {
    "reference": "reference",
    "surgery": "after surgery",
    "finetune": "after fine-tune",
    "gate": "checkpoint (gate)",
}
PATIENT_STAGES = ("surgery", "finetune", "gate")
METHOD_COLORS = {"exact": "#1a9850", "sliced": "#4575b4", "adapted": "#fdae61", "fresh": "#d73027"}
METHODS = tuple(METHOD_COLORS)
RUN_STYLES = {"A": "-", "B": "--"}
MAX_POINTS = 300

_RC: dict[RcKeyType, Any] = {
    "svg.fonttype": "none",  # text as <text>, not glyph paths
    "svg.hashsalt": "surgery",  # deterministic ids: the same result renders the same page
    "svg.image_inline": True,
    "text.parse_math": False,  # layer names are data, never mathtext ("$" stays "$")
    "text.usetex": False,
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "legend.frameon": False,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "grid.linewidth": 0.5,
    "lines.linewidth": 1.3,
    "path.simplify": True,
    "figure.dpi": 72,
}

# Figure numbers for id prefixes; one sequence per page (see id_scope), so a page renders the same twice.
_figure_numbers: contextvars.ContextVar[Iterator[int]] = contextvars.ContextVar("figure_numbers")
_unscoped_figure_numbers = itertools.count()  # outside any id_scope: one process-wide sequence
_DECIMALS = re.compile(r"(-?\d+\.\d\d)\d+")
_ID = re.compile(r'\bid="([^"]+)"')


def to_svg(fig: Figure, *, tight: bool = True) -> str:
    """Serialise ``fig`` to a compact ``<svg>`` element for inline use in HTML.

    ``tight=False`` skips the extra layout pass of ``bbox_inches="tight"`` (for figures whose
    margins are set by hand: text extents are the expensive part of drawing).
    """
    buf = io.StringIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(
            buf,
            format="svg",
            bbox_inches="tight" if tight else None,
            pad_inches=0.04,
            metadata={"Creator": None, "Date": None, "Format": None, "Type": None},
        )
    text = buf.getvalue()
    text = text[text.index("<svg") :]  # XML prologue and DOCTYPE
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)
    # Inline SVG in HTML5 gets its namespace from the parser; the declarations are only
    # namespace names (never fetched), but leaving them out keeps the page free of URLs.
    text = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", text)
    text = text.replace("xlink:href=", "href=")
    text = re.sub(r'\s+d="([^"]*)"', lambda m: ' d="' + _DECIMALS.sub(r"\1", m.group(1)) + '"', text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    # Fonts come from the page's CSS (one rule), not a fallback list repeated on every <text>.
    text = re.sub(r"font-family: [^;\"]*(; )?", "", text)
    text = re.sub(r' transform="rotate\(-0 [^"]*\)"', "", text)
    text = re.sub(r'\b(x|y|width|height)="(-?\d+\.\d\d)\d+"', r'\1="\2"', text)
    # Unique ids per figure: clip paths and markers are referenced by id within one document.
    prefix = f"f{next(_figure_numbers.get(_unscoped_figure_numbers))}-"
    ids = set(_ID.findall(text))
    if ids:
        pattern = re.compile(
            r'(\bid="|url\(#|href="#)(' + "|".join(map(re.escape, sorted(ids, key=len, reverse=True))) + r')(?=["\)])'
        )
        text = pattern.sub(lambda m: m.group(1) + prefix + m.group(2), text)
    return text.strip()


@contextlib.contextmanager
def id_scope() -> Iterator[None]:
    """Number the figures made inside from 0: ids are unique within one page and stable across renders."""
    token = _figure_numbers.set(itertools.count())
    try:
        yield
    finally:
        _figure_numbers.reset(token)


def _styled(plot):
    """Run a plot function under the report's rcParams (artists read them when created)."""

    @functools.wraps(plot)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(_RC):
            return plot(*args, **kwargs)

    return wrapper


class _ReportFigure(Figure):
    """A figure that records how it is laid out: ``_surgery_tight`` (constrained layout) or fixed margins."""

    _surgery_tight: bool = True


def _figure(
    width: float, height: float, ncols: int = 1, margins: tuple[float, float, float, float] | None = None
) -> tuple[Figure, list[Any]]:
    """A figure laid out by constrained layout, or by fixed ``margins`` (left, right, bottom, top; inches)."""
    if margins is None:
        fig = _ReportFigure(figsize=(width, height), layout="constrained")
    else:
        left, right, bottom, top = margins
        fig = _ReportFigure(figsize=(width, height))
        fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height)
    fig._surgery_tight = margins is None
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def _render(fig: Figure) -> str:
    return to_svg(fig, tight=getattr(fig, "_surgery_tight", True))


def _finite(values: Iterable[Any]) -> np.ndarray:
    out = []
    for v in values:
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            out.append(math.nan)
    return np.asarray(out, dtype=float)


def _thin(xs: np.ndarray, ys: np.ndarray, limit: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    if len(xs) <= limit:
        return xs, ys
    idx = np.unique(np.linspace(0, len(xs) - 1, limit).round().astype(int))
    return xs[idx], ys[idx]


def _layer_order(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(str(r.get("layer")) for r in rows))


def _worst_by(rows: Sequence[dict[str, Any]], key: str) -> dict[tuple[str, str], float]:
    """Worst (largest) value of ``key`` per (layer, stage) over seeds; NaN wins, it is the worst."""
    out: dict[tuple[str, str], float] = {}
    for r in rows:
        k = (str(r.get("layer")), str(r.get("stage")))
        v = _finite([r.get(key)])[0]
        prev = out.get(k)
        if prev is None or math.isnan(v) or (not math.isnan(prev) and v > prev):
            out[k] = v
    return out


def _layer_figure(layers: Sequence[str], *, per_layer: float = 0.3, height: float = 2.0) -> tuple[Figure, Any]:
    """A bar chart figure with one slot per layer; margins fit the (rotated) layer labels."""
    width = min(11.0, 4.2 + per_layer * len(layers))
    longest = max(map(len, layers), default=1) * 7 * 0.6 / 72  # 7 pt labels, ~0.6 em per character
    bottom = 0.2 + (longest * 0.72 if len(layers) > 4 else 0.12)  # rotated 45 degrees: sin 45 of the length
    fig, (ax,) = _figure(width, height + bottom + 0.55, margins=(0.55, 0.1, bottom, 0.55))
    return fig, ax


def _legend_on_top(fig: Figure, ncols: int, handles: Any = None, labels: Any = None) -> None:
    args = () if handles is None else (handles, labels)
    fig.legend(*args, loc="upper right", bbox_to_anchor=(1, 1), ncols=ncols, borderaxespad=0.2)


def _layer_axis(ax: Any, layers: Sequence[str]) -> None:
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=45 if len(layers) > 4 else 0, ha="right" if len(layers) > 4 else "center")
    ax.grid(axis="x", visible=False)
    ax.set_xlim(-0.6, len(layers) - 0.4)


def _threshold_line(ax: Any, value: float | None, label: str) -> None:
    if value is not None and math.isfinite(value):
        ax.axhline(value, color="#b2182b", linestyle="--", linewidth=1.0, label=label)


@_styled
def histogram(hist: dict[str, Any], title: str) -> str | None:
    """One layer's activation histograms, overlaid as densities on the shared edges."""
    edges = _finite(hist.get("edges") or [])
    if len(edges) < 2 or not np.all(np.isfinite(edges)) or not np.all(np.diff(edges) > 0):
        return None
    widths = np.diff(edges)
    fig, (ax,) = _figure(2.9, 1.75, margins=(0.08, 0.06, 0.22, 0.2))
    drawn = 0
    for stage in ("reference", *PATIENT_STAGES):
        counts = _finite(hist.get(stage) or [])
        if len(counts) != len(widths) or not np.isfinite(counts).all() or counts.sum() <= 0:
            continue
        density = counts / counts.sum() / widths
        ax.stairs(
            density,
            edges,
            color=STAGE_COLORS[stage],
            linewidth=1.2 if stage != "reference" else 1.6,
            fill=stage == "reference",
            alpha=0.25 if stage == "reference" else 1.0,
            label=STAGE_LABELS[stage],
        )
        if stage == "reference":
            ax.stairs(density, edges, color=STAGE_COLORS[stage], linewidth=1.0)
        drawn += 1
    if not drawn:
        return None
    ax.set_title(title, loc="left")
    ax.locator_params(axis="x", nbins=4)
    ax.locator_params(axis="y", nbins=3)
    ax.set_yticklabels([])
    ax.tick_params(axis="y", length=0)
    return _render(fig)


@_styled
def drift(rows: Sequence[dict[str, Any]], threshold: float | None, *, seeds: int = 1) -> str | None:
    """Normalised W1 per layer, one bar per stage, with the ``drift_max`` threshold line."""
    if not rows:
        return None
    layers = _layer_order(rows)
    stages = [s for s in PATIENT_STAGES if any(r.get("stage") == s for r in rows)]
    worst = _worst_by(rows, "w1_norm")
    fig, ax = _layer_figure(layers)
    width = 0.8 / max(1, len(stages))
    top = 0.0
    for i, stage in enumerate(stages):
        ys = np.array([worst.get((layer, stage), math.nan) for layer in layers])
        xs = np.arange(len(layers)) + (i - (len(stages) - 1) / 2) * width
        finite = np.isfinite(ys)
        ax.bar(xs[finite], ys[finite], width, color=STAGE_COLORS[stage], label=STAGE_LABELS[stage])
        for x in xs[~finite]:
            ax.text(x, 0, "NaN", color="#b2182b", ha="center", va="bottom", fontsize=6, rotation=90)
        if finite.any():
            top = max(top, float(ys[finite].max()))
    _threshold_line(ax, threshold, f"drift_max {threshold:.3g}" if threshold is not None else "")
    if top == 0 and threshold is None:
        ax.set_ylim(0, 1)
    _layer_axis(ax, layers)
    ax.locator_params(axis="y", nbins=4)
    ax.set_ylabel("W1 / std(ref)")
    ax.set_title("Drift per layer (normalised W1" + (f", worst of {seeds} seeds)" if seeds > 1 else ")"), loc="left")
    _legend_on_top(fig, 3)
    return _render(fig)


@_styled
def layer_map(layer_map: dict[str, Any], title: str) -> str | None:
    """A reference-blocks × patient-blocks CKA heatmap (0 to 1), each patient block's best match outlined."""
    rows, cols = (
        [str(r) for r in layer_map.get("reference_layers") or []],
        [str(c) for c in layer_map.get("layers") or []],
    )
    values = np.array(
        [[math.nan if v is None else float(v) for v in row] for row in layer_map.get("cka") or []], dtype=float
    )
    if not rows or not cols or values.shape != (len(rows), len(cols)) or not np.isfinite(values).any():
        return None
    fig, (ax,) = _figure(2.2 + 0.32 * len(cols), 1.3 + 0.2 * len(rows))
    image = ax.imshow(
        np.clip(values, 0.0, 1.0), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest"
    )
    for j in range(len(cols)):
        column = values[:, j]
        if np.isfinite(column).any():
            i = int(np.nanargmax(column))
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#e7298a", linewidth=1.4))
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows)
    ax.grid(visible=False)
    ax.set_xlabel("patient block")
    ax.set_ylabel("source block")
    ax.set_title(title, loc="left")
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02, label="linear CKA")
    return _render(fig)


@_styled
def dead_channels(rows: Sequence[dict[str, Any]], threshold: float | None) -> str | None:
    """Dead-channel fraction per layer: reference, after surgery, after fine-tune. ``None`` if all zero."""
    if not rows:
        return None
    layers = _layer_order(rows)
    worst = _worst_by(rows, "dead_channel_frac")
    ref = _worst_by(
        [dict(r, stage="reference") for r in rows if r.get("stage") == rows[0].get("stage")], "ref_dead_channel_frac"
    )
    series = {"reference": [ref.get((layer, "reference"), math.nan) for layer in layers]}
    for stage in PATIENT_STAGES:
        if any(r.get("stage") == stage for r in rows):
            series[stage] = [worst.get((layer, stage), math.nan) for layer in layers]
    values = np.array([v for ys in series.values() for v in ys], dtype=float)
    if not np.nanmax(np.where(np.isnan(values), 1.0, values), initial=0.0) > 0:
        return None
    fig, ax = _layer_figure(layers, height=1.7)
    width = 0.8 / len(series)
    for i, (stage, stage_values) in enumerate(series.items()):
        ys = np.asarray(stage_values, dtype=float)
        xs = np.arange(len(layers)) + (i - (len(series) - 1) / 2) * width
        finite = np.isfinite(ys)
        ax.bar(xs[finite], ys[finite], width, color=STAGE_COLORS[stage], label=STAGE_LABELS[stage])
    _threshold_line(ax, threshold, f"dead_max {threshold:.3g}" if threshold is not None else "")
    _layer_axis(ax, layers)
    ax.set_ylim(0, max(0.05, min(1.0, float(np.nanmax(values)) * 1.15), threshold or 0.0))
    ax.locator_params(axis="y", nbins=4)
    ax.set_ylabel("dead channels")
    ax.set_title("Dead-channel fraction per layer", loc="left")
    _legend_on_top(fig, 4)
    return _render(fig)


def _curve_xy(curve: Any, key: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(curve, list):
        return np.array([]), np.array([])
    points = [p for p in curve if isinstance(p, dict)]
    return _thin(_finite(p.get("step") for p in points), _finite(p.get(key) for p in points))


@_styled
def finetune_curve(
    runs: Sequence[dict[str, Any]], *, source: float | None = None, baseline: float | None = None
) -> str | None:
    """Loss and accuracy against step for each run.

    ``runs``: dicts with ``label``, ``curve`` (list of ``{step, loss, accuracy}``), optional
    ``baseline_curve``, ``nonfinite_step``, ``style`` ("-" or "--"), ``color`` (else one of a
    palette by position) and ``thin`` (a faint line without markers; a label starting with ``_``
    keeps a line out of the legend). ``source`` and ``baseline`` draw horizontal reference lines
    on the accuracy panel.
    """
    has_points = any(
        np.isfinite(_curve_xy(r.get(c), k)[1]).any()
        for r in runs
        for c in ("curve", "baseline_curve")
        for k in ("loss", "accuracy")
    )
    if not has_points:
        return None
    fig, (ax_loss, ax_acc) = _figure(8.6, 2.6, ncols=2, margins=(0.45, 1.75, 0.42, 0.25))
    fig.subplots_adjust(wspace=0.22)
    palette = ["#5d3a9b", "#1b7837", "#2166ac", "#b35806", "#762a83", "#01665e"]
    for i, run in enumerate(runs):
        color, style = run.get("color") or palette[i % len(palette)], run.get("style", "-")
        thin = bool(run.get("thin"))
        for ax, key in ((ax_loss, "loss"), (ax_acc, "accuracy")):
            xs, ys = _curve_xy(run.get("curve"), key)
            if len(xs):
                ax.plot(
                    xs,
                    ys,
                    style,
                    color=color,
                    label=run.get("label", "patient"),
                    marker="o" if len(xs) <= 12 and not thin else None,
                    markersize=2.5,
                    linewidth=0.7 if thin else None,
                    alpha=0.35 if thin else None,
                )
            bx, by = _curve_xy(run.get("baseline_curve"), key)
            if len(bx):
                label = f"baseline {run['label']}" if len(runs) > 1 and run.get("label") else "baseline (random init)"
                ax.plot(
                    bx,
                    by,
                    style,
                    color="#8c8c8c",
                    linewidth=1.0,
                    label=label,
                    marker="o" if len(bx) <= 12 else None,
                    markersize=2,
                )
            step = run.get("nonfinite_step")
            if step is not None:
                ax.axvline(
                    float(step), color="#b2182b", linewidth=1.0, linestyle=":", label=f"non-finite at step {step}"
                )
    if source is not None and math.isfinite(source):
        ax_acc.axhline(source, color="#4d4d4d", linestyle=":", linewidth=1.0, label=f"source {source:.3f}")
    if baseline is not None and math.isfinite(baseline):
        ax_acc.axhline(baseline, color="#8c8c8c", linestyle="--", linewidth=0.8, label=f"baseline final {baseline:.3f}")
    ax_loss.set_title("Fine-tune loss", loc="left")
    ax_acc.set_title("Test accuracy", loc="left")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("step")
        ax.locator_params(nbins=4)
    ax_acc.set_ylim(-0.02, 1.02)
    unique: dict[str, Any] = {}
    for ax in (ax_loss, ax_acc):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            unique.setdefault(label, handle)
    if unique:
        fig.legend(unique.values(), unique.keys(), loc="center right", bbox_to_anchor=(1, 0.5), fontsize=6.5)
    return _render(fig)


@_styled
def coverage_map(rows: Sequence[dict[str, Any]]) -> str | None:
    """Each target layer a row: a stacked bar of its tensors by method, element coverage at the end."""
    rows = [r for r in rows if isinstance(r, dict)]
    if not rows:
        return None
    n = len(rows)
    labels = [str(r.get("layer", "")) or "(root)" for r in rows]
    size = 5.5 if n > 30 else 7
    label_width = 0.15 + max(map(len, labels)) * size * 0.62 / 72  # DejaVu Sans averages ~0.6 em per character
    fig, (ax,) = _figure(max(4.6, label_width + 3.0), 0.6 + 0.13 * n, margins=(label_width, 0.1, 0.08, 0.5))
    ys = np.arange(n)
    left = np.zeros(n)
    for method in METHODS:
        counts = _finite(r.get(method, 0) for r in rows)
        counts = np.nan_to_num(counts)
        shown = counts > 0
        if shown.any():
            ax.barh(
                ys[shown],
                counts[shown],
                left=left[shown],
                height=0.78,
                color=METHOD_COLORS[method],
                label=method,
                linewidth=0,
            )
        left += counts
    for y, total, r in zip(ys, left, rows):
        cov = _finite([r.get("elements_covered")])[0]
        if not math.isfinite(cov) or cov < 1:  # only the rows that are not fully covered
            ax.text(
                total + 0.1,
                y,
                "n/a" if not math.isfinite(cov) else f"{cov:.0%}",
                va="center",
                fontsize=5.5,
                color="#b2182b",
            )
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=size)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(0, max(1.0, float(left.max())) * 1.25)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(nbins=4, integer=True))
    ax.xaxis.tick_top()
    ax.grid(axis="y", visible=False)
    ax.set_xlabel("tensors by method (red: share of elements from the source, when < 100%)", fontsize=6)
    ax.xaxis.set_label_position("top")
    ax.tick_params(axis="y", length=0)
    return _render(fig)


@_styled
def compare_drift(
    runs: dict[str, Sequence[dict[str, Any]]],
    threshold: float | None,
    *,
    colors: dict[str, str] | None = None,
    title: str = "Drift per layer, A against B",
) -> str | None:
    """Drift per layer for several runs: bars per run and stage. Without ``colors``, coloured by stage (the
    first run solid, the others light); with ``colors`` (run -> colour), coloured by run (after surgery light,
    after fine-tune solid)."""
    if not any(runs.values()):
        return None
    layers = _layer_order([r for rows in runs.values() for r in rows])
    series = []
    for run, rows in runs.items():
        worst = _worst_by(rows, "w1_norm")
        for stage in PATIENT_STAGES:
            if any(r.get("stage") == stage for r in rows):
                series.append((run, stage, np.array([worst.get((layer, stage), math.nan) for layer in layers])))
    fig, ax = _layer_figure(layers, per_layer=0.6)
    width = 0.84 / max(1, len(series))
    for i, (run, stage, ys) in enumerate(series):
        xs = np.arange(len(layers)) + (i - (len(series) - 1) / 2) * width
        finite = np.isfinite(ys)
        if colors is None:
            color, alpha = STAGE_COLORS[stage], 1.0 if run == "A" else 0.45
        else:
            color, alpha = colors.get(run, "#4d4d4d"), 0.45 if stage == "surgery" else 1.0
        ax.bar(
            xs[finite],
            ys[finite],
            width,
            color=color,
            alpha=alpha,
            linewidth=0,
            label=f"{run}: {STAGE_LABELS[stage]}",
        )
    _threshold_line(ax, threshold, f"drift_max {threshold:.3g}" if threshold is not None else "")
    _layer_axis(ax, layers)
    ax.locator_params(axis="y", nbins=4)
    ax.set_ylabel("W1 / std(ref)")
    ax.set_title(title, loc="left")
    _legend_on_top(fig, 4)
    return _render(fig)


STATUS_COLORS = {"passed": "#1a7f37", "failed": "#cf222e", "undecided": "#8c959f"}


@_styled
def calibration_bands(rows: Sequence[dict[str, Any]]) -> str | None:
    """Each calibrated expectation on its own strip: the calibration runs (dots), mean ± sd (band), the
    threshold this run was held to (dashed) and this run's observed figure (diamond, coloured by outcome)."""
    rows = [r for r in rows if r.get("mean") is not None and r.get("std") is not None]
    if not rows:
        return None
    fig = Figure(figsize=(6.4, 0.55 * len(rows) + 0.5), layout="constrained")
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    for ax, row in zip(axes, rows):
        mean, std = float(row["mean"]), float(row["std"])
        samples = _finite(row.get("samples") or [])
        ax.axvspan(mean - std, mean + std, color="#c6dbef", alpha=0.8, linewidth=0)
        ax.axvline(mean, color="#4575b4", linewidth=0.8)
        if samples.size:
            jitter = np.linspace(-0.25, 0.25, samples.size)
            ax.scatter(samples, jitter, s=6, color="#636363", alpha=0.7, linewidths=0)
        threshold = _finite([row.get("threshold")])[0]
        if math.isfinite(threshold):
            ax.axvline(threshold, color="#b2182b", linestyle="--", linewidth=1.0)
        observed = _finite([row.get("observed")])[0]
        if math.isfinite(observed):
            ax.scatter(
                [observed], [0], marker="D", s=28, zorder=3, color=STATUS_COLORS.get(row.get("status", ""), "#000000")
            )
        ax.set_ylim(-0.6, 0.6)
        ax.set_yticks([])
        ax.grid(False)
        ax.set_title(str(row["name"]), loc="left", fontsize=7, pad=2)
    return _render(fig)


INTERVAL_COLORS = {"points": "#636363", "band": "#c6dbef", "calibrated": "#4575b4", "margin": "#b2182b"}


@_styled
def paired_intervals(rows: Sequence[dict[str, Any]]) -> str | None:
    """The comparisons of a variant case, one row each, in percentage points of accuracy after the fine-tune.

    ``rows``: dicts with ``label``, this run's per-seed paired differences ``points`` and their ``mean`` and
    ``std``, ``status`` (colours the mean), the claim's ``margin``, and when calibrated the prediction
    interval ``band`` (lo, hi), its ``calibrated_mean`` and the ``bound`` the run was judged against.
    """
    rows = [r for r in rows if _has_interval(r)]
    if not rows:
        return None
    labels = [str(r.get("label", "")) for r in rows]
    label_width = 0.2 + max(map(len, labels)) * 7 * 0.62 / 72
    n = len(rows)
    fig, (ax,) = _figure(max(6.4, label_width + 5.6), 0.75 + 0.42 * n, margins=(label_width, 0.15, 0.42, 0.45))
    seen: set[str] = set()

    def label(name: str) -> str:
        if name in seen:
            return "_nolegend_"
        seen.add(name)
        return name

    for y, row in enumerate(rows):
        band = _finite(row.get("band") or [])
        if band.size == 2 and np.isfinite(band).all():
            lo, hi = sorted(100 * band)
            ax.barh(
                y,
                hi - lo,
                left=lo,
                height=0.56,
                color=INTERVAL_COLORS["band"],
                linewidth=0,
                label=label("calibrated prediction interval"),
            )
        for key, width, name in (("calibrated_mean", 0.8, "calibrated mean"), ("bound", 2.0, "bound judged against")):
            value = _finite([row.get(key)])[0]
            if math.isfinite(value):
                ax.plot(
                    [100 * value] * 2,
                    [y - 0.28, y + 0.28],
                    color=INTERVAL_COLORS["calibrated"],
                    linewidth=width,
                    label=label(name),
                )
        margin = _finite([row.get("margin")])[0]
        if math.isfinite(margin):
            ax.plot(
                [100 * margin] * 2,
                [y - 0.4, y + 0.4],
                "--",
                color=INTERVAL_COLORS["margin"],
                linewidth=1.1,
                label=label("margin (the claim)"),
            )
        points = _finite(row.get("points") or [])
        points = points[np.isfinite(points)]
        if points.size:
            jitter = np.linspace(-0.14, 0.14, points.size) if points.size > 1 else np.zeros(1)
            ax.scatter(
                100 * points,
                y + jitter,
                s=9,
                color=INTERVAL_COLORS["points"],
                alpha=0.75,
                linewidths=0,
                label=label("per-seed difference"),
                zorder=3,
            )
        mean, std = _finite([row.get("mean"), row.get("std")])
        if math.isfinite(mean):
            ax.errorbar(
                [100 * mean],
                [y],
                xerr=[100 * std] if math.isfinite(std) and std > 0 else None,
                fmt="D",
                color=STATUS_COLORS.get(str(row.get("status")), "#000000"),
                markersize=5,
                capsize=2.5,
                elinewidth=1.2,
                label=label("this run: mean ± sd"),
                zorder=4,
            )
    ax.axvline(0, color="#8c8c8c", linewidth=0.6)
    ax.set_yticks(range(n))
    ax.set_yticklabels(labels)
    ax.set_ylim(n - 0.5, -0.5)
    ax.grid(axis="y", visible=False)
    ax.tick_params(axis="y", length=0)
    ax.locator_params(axis="x", nbins=6)
    ax.set_xlabel("paired difference of accuracy after fine-tune (percentage points)")
    _legend_on_top(fig, 3)
    return _render(fig)


def _has_interval(row: dict[str, Any]) -> bool:
    """A comparison row with something to draw: a mean, a per-seed point or a calibrated band."""
    values = _finite([row.get("mean"), *(row.get("points") or []), *(row.get("band") or [])])
    return bool(np.isfinite(values).any())
