"""The history page: every case's expectations over the nights, flags first (no files read, no torch).

:func:`history_html` turns a :class:`surgery.nightly.history.History` into one self-contained page, with the
same Content-Security-Policy and escaping as the reports (:mod:`surgery.report.html`): per case one
figure with a panel per expectation (figure per night, calibrated band, threshold, failed and undecided
markers, provenance changes, the drift test's window), each point a link to that night's report.
:func:`write_history` writes it; links are relative to the page's folder.

The figures are inline SVG written here (:func:`history_svg`), not drawn by matplotlib: a case is a few
hundred lines, points and links on a shared x axis, and a suite of 12 cases over 30 nights took matplotlib
about 4 s to lay out and serialise; written directly it takes a few milliseconds. Text is escaped like the
rest of the page; the SVG has no ids, so any number of them share a page.

Usage::

    from surgery.nightly.history import read_history
    from surgery.report.history import write_history
    write_history(read_history(["reports/nightly"]), Path("reports/nightly/history.html"))
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

from markupsafe import Markup

from surgery.files import write_atomic
from surgery.nightly.history import Change, History, Night, Series, finite
from surgery.report import plots
from surgery.report.html import fmt, render_page
from surgery.results import safe_name

MAX_TICKS = 12
FLAG_ORDER = {"failed": 0, "outside band": 1, "drifting": 2, "undecided": 3}
COLORS = {
    "band": "#c6dbef",
    "threshold": "#b2182b",
    "line": "#8c959f",
    "outside": "#bf8700",
    "change": "#8250df",
    "drift": "#fff1b8",
}


def _link(target: Path, base: Path) -> str:
    """``target`` relative to the page's folder (``base``, resolved), percent-encoded (a path, never a scheme)."""
    return quote(Path(os.path.relpath(target.resolve(), base)).as_posix())


def _report_links(nights: list[Night], case: str, base: Path) -> dict[int, str]:
    """Night index -> the link to that night's report of ``case`` (its results.json where no page was written)."""
    links = {}
    for i, night in enumerate(nights):
        if case in night.files:
            page = night.files[case].with_name("report.html")
            links[i] = _link(page if page.is_file() else night.files[case], base)
    return links


def _ticks(nights: list[Night]) -> list[tuple[int, str]]:
    step = max(1, math.ceil(len(nights) / MAX_TICKS))
    return [
        (i, f"{n.created:%m-%d}\n{(n.commit or '')[:7]}" if n.created else n.label)
        for i, n in enumerate(nights)
        if i % step == 0 or i == len(nights) - 1
    ]


def _tip(series: Series, point: Any, night: Night) -> str:
    band = f" · band [{fmt(point.band[0])}, {fmt(point.band[1])}]" if point.band else ""
    outside = " · OUTSIDE BAND" if point.outside else ""
    return (
        f"{series.name} = {fmt(point.observed)} ({point.status}; threshold {fmt(point.threshold)}{band}{outside})"
        f" · {night.date} · {(night.commit or 'no commit')[:10]} · {night.label}"
    )


def _note(series: Series) -> str:
    parts = [
        f"{len(series.failed)} failed" if series.failed else "",
        f"{len(series.undecided)} undecided" if series.undecided else "",
        f"{len(series.outside)} outside band" if series.outside else "",
        f"drifting, p = {series.drift.p:.2g}" if series.drift.flagged else "",
    ]
    return " · ".join(p for p in parts if p)


def _panel(series: Series, nights: list[Night], links: dict[int, str]) -> dict[str, Any]:
    points = []
    for p in series.points:
        night = nights[p.night]
        url = f"{links[p.night]}#e-{quote(series.name, safe='')}"  # the expectation's row on the night's page
        points.append(
            {
                "x": p.night,
                "y": p.observed,
                "status": p.status,
                "outside": p.outside,
                "lo": p.band[0] if p.band else None,
                "hi": p.band[1] if p.band else None,
                "threshold": p.threshold,
                "url": url,
                "tip": _tip(series, p, night),
            }
        )
    with_figure = [p.night for p in series.points if p.observed is not None]
    drift = None
    if series.drift.flagged:
        recent = with_figure[-series.drift.window :]
        drift = (recent[0], recent[-1])
    return {"title": series.name, "note": _note(series), "points": points, "drift": drift}


def _change_marks(changes: list[Change]) -> list[tuple[int, str]]:
    nights = sorted({c.night for c in changes})
    return [(night, f"P{i}") for i, night in enumerate(nights, start=1)]


# ---------------------------------------------------------------------------------------------
# the figure: one case's panels as inline SVG (px; the page's CSS scales it to the column)

WIDTH, LEFT, RIGHT = 1196, 48, 12  # the plot area spans LEFT … WIDTH - RIGHT
HEAD, PLOT, GAP, AXIS = 18, 84, 14, 32  # per panel: title line, plot height, space below; x labels at the bottom


def _nice_ticks(low: float, high: float, most: int = 5) -> list[float]:
    """The round values in [low, high] (a step of 1, 2, 2.5 or 5 × 10^k), as many as fit in ``most``."""
    if not high > low:
        return [low]
    magnitude = 10.0 ** math.floor(math.log10((high - low) / most))
    for step in (m * magnitude * 10**e for e in range(3) for m in (1, 2, 2.5, 5)):
        first, last = math.ceil(low / step - 1e-9), math.floor(high / step + 1e-9)
        if last - first < most:
            break
    return [float(f"{k * step:.10g}") if k else 0.0 for k in range(first, last + 1)]  # no "-0", no 0.30000000000000004


def _y_range(values: Sequence[float], thresholds: Sequence[float]) -> tuple[float, float, bool]:
    """Limits that show the figures and bands; a threshold far from them is left off scale (True)."""
    if not values:
        return 0.0, 1.0, False
    lo, hi = min(values), max(values)
    span = max(hi - lo, 1e-6 * max(1.0, abs(hi)), 1e-9)
    near = [t for t in thresholds if lo - 1.5 * span < t < hi + 1.5 * span]
    if near:
        lo, hi = min(lo, *near), max(hi, *near)
        span = max(hi - lo, span)
    off = any(t < lo or t > hi for t in thresholds)
    return lo - 0.08 * span, hi + 0.08 * span, off


def _steps(cells: Sequence[tuple[float, float]]) -> list[list[tuple[float, float]]]:
    """A step line through ``(x, y)`` (x in nights) with its risers halfway between nights, as runs of
    vertices; a night without a value breaks the line; each run reaches half a night past its ends."""
    runs: list[list[tuple[float, float]]] = []
    previous: tuple[float, float] | None = None
    for x, y in cells:
        if previous is None or x - previous[0] > 1:
            if previous is not None:  # a run is open
                runs[-1].append((previous[0] + 0.5, previous[1]))
            runs.append([(x - 0.5, y)])
        else:
            mid = (previous[0] + x) / 2
            runs[-1] += [(mid, previous[1]), (mid, y)]
        previous = (x, y)
    if previous is not None:
        runs[-1].append((previous[0] + 0.5, previous[1]))
    return runs


def _path(points: Sequence[tuple[float, float]]) -> str:
    return "M" + "L".join(f"{x:.1f},{y:.1f}" for x, y in points)


def _attr(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _marker(status: str, x: float, y: float) -> str:
    if status == "failed":
        return (
            f'<path d="M{x - 4:.1f},{y - 4:.1f}l8,8m0,-8l-8,8" stroke="{plots.STATUS_COLORS["failed"]}" '
            f'stroke-width="2.6" stroke-linecap="round"/>'
        )
    if status == "undecided":
        return (
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.6" fill="#fff" stroke="{plots.STATUS_COLORS["undecided"]}"'
            f' stroke-width="1.6"/>'
        )
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{plots.STATUS_COLORS.get(status, "#1f2328")}"/>'


def _svg_panel(
    panel: dict[str, Any], top: float, sx: Any, changes: Sequence[tuple[int, str]], first: bool
) -> list[str]:
    """One expectation's panel, its plot area ``top`` … ``top + PLOT``: back to front, as matplotlib drew it."""
    pts = sorted(panel["points"], key=lambda p: p["x"])
    ys = [(p["x"], finite(p["y"])) for p in pts]
    found = [(p["x"], finite(p["lo"]), finite(p["hi"])) for p in pts]
    bands = [(x, lo, hi) for x, lo, hi in found if lo is not None and hi is not None]
    thresholds = [(p["x"], t) for p in pts if (t := finite(p["threshold"])) is not None]
    low, high, off = _y_range(
        [y for _, y in ys if y is not None] + [v for _, lo, hi in bands for v in (lo, hi)], [t for _, t in thresholds]
    )

    def sy(value: float) -> float:
        return top + (high - value) / (high - low) * PLOT

    right, bottom = WIDTH - RIGHT, top + PLOT
    out = [f'<text x="{LEFT}" y="{top - 5:.1f}" class="title">{_attr(panel["title"])}</text>']
    note = str(panel.get("note") or "") + ("  (threshold off scale)" if off else "")
    if note:
        out.append(f'<text x="{right}" y="{top - 5:.1f}" class="note" text-anchor="end">{_attr(note)}</text>')
    if panel.get("drift"):
        start, end = (sx(v) for v in (panel["drift"][0] - 0.5, panel["drift"][1] + 0.5))
        out.append(
            f'<rect x="{start:.1f}" y="{top}" width="{end - start:.1f}" height="{PLOT}" fill="{COLORS["drift"]}"/>'
        )
    for tick in _nice_ticks(low, high):
        out.append(
            f'<path d="M{LEFT},{sy(tick):.1f}H{right}" class="grid"/>'
            f'<text x="{LEFT - 5}" y="{sy(tick) + 4:.1f}" text-anchor="end">{tick:.10g}</text>'
        )
    for lower, upper in zip(_steps([(x, lo) for x, lo, _ in bands]), _steps([(x, hi) for x, _, hi in bands])):
        out.append(f'<path d="{_path([(sx(x), sy(v)) for x, v in upper + lower[::-1]])}Z" fill="{COLORS["band"]}"/>')
    for run in _steps(thresholds):
        out.append(
            f'<path d="{_path([(sx(x), sy(v)) for x, v in run])}" fill="none" stroke="{COLORS["threshold"]}" '
            f'stroke-width="1.3" stroke-dasharray="5,3"/>'
        )
    for night, label in changes:
        x = sx(night - 0.5)
        out.append(
            f'<path d="M{x:.1f},{top}V{bottom}" stroke="{COLORS["change"]}" stroke-width="1.2" stroke-dasharray="2,2"/>'
        )
        if first:
            out.append(f'<text x="{x + 3:.1f}" y="{top + 10}" class="change">{_attr(label)}</text>')
    for run in (r for r in _split(ys) if len(r) > 1):
        out.append(
            f'<path d="{_path([(sx(x), sy(y)) for x, y in run])}" fill="none" stroke="{COLORS["line"]}" '
            f'stroke-width="1.1"/>'
        )
    for p in pts:
        if p.get("outside") and finite(p["y"]) is not None:
            out.append(
                f'<circle cx="{sx(p["x"]):.1f}" cy="{sy(p["y"]):.1f}" r="7.5" fill="none" '
                f'stroke="{COLORS["outside"]}" stroke-width="1.8"/>'
            )
    for p in pts:  # each point links to its night's report; its <title> is the tooltip
        if finite(p["y"]) is not None:
            shape = _marker(p["status"], sx(p["x"]), sy(p["y"]))
            out.append(
                f'<a href="{_attr(p["url"])}"><title>{_attr(p.get("tip", ""))}</title>{shape}</a>'
                if p.get("url")
                else shape
            )
    out.append(f'<path d="M{LEFT},{top}V{bottom}H{right}" class="axis"/>')
    return out


def _split(values: Sequence[tuple[float, float | None]]) -> list[list[tuple[float, float]]]:
    """Runs of consecutive values that are numbers (a missing figure breaks the line)."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in values:
        if y is None:
            runs.append([])
        else:
            runs[-1].append((x, y))
    return [r for r in runs if r]


def history_svg(
    panels: Sequence[dict[str, Any]],
    ticks: Sequence[tuple[int, str]],
    nights: int,
    changes: Sequence[tuple[int, str]] = (),
) -> str | None:
    """One case's expectations over the nights, one panel each, on one x axis (night index).

    ``panels``: dicts with ``title``, ``note`` (right-hand text), ``drift`` (``(first, last)`` night of a
    flagged window, or None) and ``points``: dicts with ``x`` (night), ``y``, ``status``, ``outside``,
    ``lo``/``hi`` (band, or None), ``threshold``, ``url`` and ``tip`` (a link and its tooltip per point).
    ``ticks``: ``(night, "date\\ncommit")`` labels under the last panel. ``changes``: ``(night, label)`` where
    provenance changed (a dotted line before that night, labelled on the first panel).
    """
    panels = [p for p in panels if p.get("points")]
    if not panels:
        return None
    x0, x1 = -0.6, max(nights - 1, 1) + 0.6

    def sx(night: float) -> float:
        return LEFT + (night - x0) / (x1 - x0) * (WIDTH - LEFT - RIGHT)

    out = []
    top = HEAD
    for n, panel in enumerate(panels):
        out += _svg_panel(panel, top, sx, changes, first=n == 0)
        top += PLOT + GAP + HEAD
    bottom = top - GAP - HEAD
    for night, label in ticks:
        x = sx(night)
        lines = "".join(
            f'<tspan x="{x:.1f}" dy="{0 if i == 0 else 12}">{_attr(part)}</tspan>'
            for i, part in enumerate(str(label).split("\n"))
        )
        out.append(
            f'<path d="M{x:.1f},{bottom}v4" class="axis"/><text y="{bottom + 15}" text-anchor="middle">{lines}</text>'
        )
    height = bottom + AXIS
    return (
        f'<svg class="hist" width="{WIDTH}" height="{height:.0f}" viewBox="0 0 {WIDTH} {height:.0f}" '
        f'role="img">' + "".join(out) + "</svg>"
    )


def _series_row(series: Series) -> dict[str, Any]:
    last = series.points[-1]
    return {
        "name": series.name,
        "anchor": _anchor(series.case),
        "case": series.case,
        "flags": series.flags,
        "observed": last.observed,
        "threshold": last.threshold,
        "status": last.status,
        "band": last.band,
        "drift": series.drift.describe(),
        "drifting": series.drift.flagged,
        "steady": series.steady,
        "towards": series.drift.towards_threshold,
        "direction": series.direction,
    }


def _anchor(case: str) -> str:
    return "case-" + safe_name(case)


def _case_view(case: str, history: History, base: Path) -> dict[str, Any]:
    series = [s for s in history.series if s.case == case]
    changes = [c for c in history.changes if c.case == case]
    marks = _change_marks(changes)
    label = dict(marks)
    nights = history.nights
    latest = next((n for n in reversed(nights) if case in n.results), None)
    links = _report_links(nights, case, base)
    drawn = [_panel(s, nights, links) for s in series if not s.steady]  # a flat line says nothing: a table row does
    svg = history_svg(drawn, _ticks(nights), len(nights), marks)
    by_night: dict[int, list[Change]] = {}
    for c in changes:
        by_night.setdefault(c.night, []).append(c)
    return {
        "case": case,
        "anchor": _anchor(case),
        "svg": Markup(svg) if svg else None,
        "verdict": latest and latest.results[case].verdict,
        "latest": latest and latest.label,
        "latest_href": latest and links[nights.index(latest)],
        "description": latest.results[case].description if latest else "",
        "rows": [_series_row(s) for s in series],
        "changes": [
            {
                "label": label[n],
                "night": nights[n].label,
                "date": nights[n].date,
                "commit": (nights[n].commit or "")[:10],
                "fields": [f"{c.key}: {c.before[:16]} → {c.after[:16]}" for c in cs],
            }
            for n, cs in sorted(by_night.items())
        ],
        "runs": sum(1 for n in nights if case in n.results),
        "rank": min([FLAG_ORDER[f] for s in series for f in s.flags], default=len(FLAG_ORDER)),
    }


def history_view(history: History, base: Path) -> dict[str, Any]:
    """Everything the history template shows; links relative to ``base`` (the page's folder)."""
    base = Path(base).resolve()
    cases = sorted((_case_view(c, history, base) for c in history.cases()), key=lambda v: (v["rank"], v["case"]))
    nights = []
    for night in history.nights:
        index = night.path / "index.html"
        counts = night.counts()
        nights.append(
            {
                "label": night.label,
                "date": night.date,
                "commit": (night.commit or "")[:10],
                "href": _link(index, base) if index.is_file() else None,
                "cases": len(night.results),
                **{k: counts.get(k, 0) for k in ("pass", "undecided", "fail", "error")},
            }
        )
    flagged = sorted(
        (_series_row(s) for s in history.series if s.flags),
        key=lambda r: (min(FLAG_ORDER[f] for f in r["flags"]), r["case"], r["name"]),
    )
    latest = nights[-1] if nights else None
    return {
        "cases": cases,
        "nights": nights,
        "flagged": flagged,
        "latest": latest,
        "window": history.window,
        "p_max": history.p_max,
        "first": history.nights[0].date if history.nights else "",
        "last": latest["date"] if latest else "",
        "notes": [n for night in history.nights for n in night.notes],
        "counts": {flag: sum(1 for r in flagged if flag in r["flags"]) for flag in FLAG_ORDER},
        "colors": {**COLORS, **plots.STATUS_COLORS},
    }


def history_html(history: History, base: Path) -> str:
    """The self-contained history page (links relative to ``base``)."""
    return render_page("history.html.j2", v=history_view(history, Path(base)), title="surgery history")


def write_history(history: History, out: Path) -> Path:
    """Write the history page to ``out`` (atomically); return its path."""
    out = Path(out)
    page = history_html(history, out.parent)
    write_atomic(out, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return out
