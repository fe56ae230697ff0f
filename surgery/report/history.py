"""The history page: every case's expectations over the nights, flags first (no files read, no torch).

:func:`history_html` turns a :class:`surgery.history.History` into one self-contained page, with the
same Content-Security-Policy and escaping as the reports (:mod:`surgery.report.html`): per case one
figure with a panel per expectation (figure per night, calibrated band, threshold, failed and undecided
markers, provenance changes, the drift test's window), each point a link to that night's report.
:func:`write_history` writes it; links are relative to the page's folder.

Usage::

    from surgery.history import read_history
    from surgery.report.history import write_history
    write_history(read_history(["reports/nightly"]), Path("reports/nightly/history.html"))
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from markupsafe import Markup

from surgery.files import write_atomic
from surgery.history import Change, History, Night, Series
from surgery.report import plots
from surgery.report.html import fmt, render_page
from surgery.results import safe_name

MAX_TICKS = 12
FLAG_ORDER = {"failed": 0, "outside band": 1, "drifting": 2, "undecided": 3}


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
    return [(i, f"{n.created:%m-%d}\n{(n.commit or '')[:7]}" if n.created else n.label)
            for i, n in enumerate(nights) if i % step == 0 or i == len(nights) - 1]


def _tip(series: Series, point: Any, night: Night) -> str:
    band = f" · band [{fmt(point.band[0])}, {fmt(point.band[1])}]" if point.band else ""
    outside = " · OUTSIDE BAND" if point.outside else ""
    return (f"{series.name} = {fmt(point.observed)} ({point.status}; threshold {fmt(point.threshold)}{band}{outside})"
            f" · {night.date} · {(night.commit or 'no commit')[:10]} · {night.label}")


def _note(series: Series) -> str:
    parts = [f"{len(series.failed)} failed" if series.failed else "",
             f"{len(series.undecided)} undecided" if series.undecided else "",
             f"{len(series.outside)} outside band" if series.outside else "",
             f"drifting, p = {series.drift.p:.2g}" if series.drift.flagged else ""]
    return " · ".join(p for p in parts if p)


def _panel(series: Series, nights: list[Night], links: dict[int, str]) -> dict[str, Any]:
    points = []
    for p in series.points:
        night = nights[p.night]
        url = f"{links[p.night]}#e-{quote(series.name, safe='')}"  # the expectation's row on the night's page
        points.append({"x": p.night, "y": p.observed, "status": p.status, "outside": p.outside,
                       "lo": p.band[0] if p.band else None, "hi": p.band[1] if p.band else None,
                       "threshold": p.threshold, "url": url, "tip": _tip(series, p, night)})
    with_figure = [p.night for p in series.points if p.observed is not None]
    drift = None
    if series.drift.flagged:
        recent = with_figure[-series.drift.window:]
        drift = (recent[0], recent[-1])
    return {"title": series.name, "note": _note(series), "points": points, "drift": drift}


def _change_marks(changes: list[Change]) -> list[tuple[int, str]]:
    nights = sorted({c.night for c in changes})
    return [(night, f"P{i}") for i, night in enumerate(nights, start=1)]


def _series_row(series: Series) -> dict[str, Any]:
    last = series.points[-1]
    return {"name": series.name, "anchor": _anchor(series.case), "case": series.case, "flags": series.flags,
            "observed": last.observed, "threshold": last.threshold, "status": last.status, "band": last.band,
            "drift": series.drift.describe(), "drifting": series.drift.flagged, "steady": series.steady,
            "towards": series.drift.towards_threshold, "direction": series.direction}


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
    svg = plots.history_panels(drawn, _ticks(nights), len(nights), marks)
    by_night: dict[int, list[Change]] = {}
    for c in changes:
        by_night.setdefault(c.night, []).append(c)
    return {"case": case, "anchor": _anchor(case), "svg": Markup(svg) if svg else None,
            "verdict": latest and latest.results[case].verdict, "latest": latest and latest.label,
            "latest_href": latest and links[nights.index(latest)],
            "description": latest.results[case].description if latest else "",
            "rows": [_series_row(s) for s in series],
            "changes": [{"label": label[n], "night": nights[n].label, "date": nights[n].date,
                         "commit": (nights[n].commit or "")[:10],
                         "fields": [f"{c.key}: {c.before[:16]} → {c.after[:16]}" for c in cs]}
                        for n, cs in sorted(by_night.items())],
            "runs": sum(1 for n in nights if case in n.results),
            "rank": min([FLAG_ORDER[f] for s in series for f in s.flags], default=len(FLAG_ORDER))}


def history_view(history: History, base: Path) -> dict[str, Any]:
    """Everything the history template shows; links relative to ``base`` (the page's folder)."""
    base = Path(base).resolve()
    cases = sorted((_case_view(c, history, base) for c in history.cases()), key=lambda v: (v["rank"], v["case"]))
    nights = []
    for night in history.nights:
        index = night.path / "index.html"
        counts = night.counts()
        nights.append({"label": night.label, "date": night.date, "commit": (night.commit or "")[:10],
                       "href": _link(index, base) if index.is_file() else None, "cases": len(night.results),
                       **{k: counts.get(k, 0) for k in ("pass", "undecided", "fail", "error")}})
    flagged = sorted((_series_row(s) for s in history.series if s.flags),
                     key=lambda r: (min(FLAG_ORDER[f] for f in r["flags"]), r["case"], r["name"]))
    latest = nights[-1] if nights else None
    return {"cases": cases, "nights": nights, "flagged": flagged, "latest": latest,
            "window": history.window, "p_max": history.p_max,
            "first": history.nights[0].date if history.nights else "", "last": latest["date"] if latest else "",
            "notes": [n for night in history.nights for n in night.notes],
            "counts": {flag: sum(1 for r in flagged if flag in r["flags"]) for flag in FLAG_ORDER},
            "colors": {**plots.HISTORY_COLORS, **plots.STATUS_COLORS}}


def history_html(history: History, base: Path) -> str:
    """The self-contained history page (links relative to ``base``)."""
    with plots.id_scope():
        return render_page("history.html.j2", v=history_view(history, Path(base)), title="surgery history")


def write_history(history: History, out: Path) -> Path:
    """Write the history page to ``out`` (atomically); return its path."""
    out = Path(out)
    page = history_html(history, out.parent)
    write_atomic(out, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return out
