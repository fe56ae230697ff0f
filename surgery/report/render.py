"""Reports as files: ``results.json``, CSVs and ``report.html`` per case (for a variant case also each arm's
own page under ``arms/``), an ``index.html`` per report directory, a comparison page, and a Markdown
summary table.

The pages themselves (what they show, how they stay self-contained and escaped) are made by
:mod:`surgery.report.html` and, for a variant case, :mod:`surgery.report.variants`; this module writes
them, atomically, beside the results they show.

Usage::

    from surgery.report.render import write_case_report, write_index, render_report
    html = write_case_report(result, Path("reports"))      # reports/<case>/report.html (+ results.json, CSVs)
                                                            # a variant case: + reports/<case>/arms/<arm>/report.html
    write_index(Path("reports"))                            # reports/index.html
    render_report(load_results("a/results.json"), Path("compare.html"),
                  compare=load_results("b/results.json"))  # A and B side by side, changes marked
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

from surgery.files import write_atomic
from surgery.report.html import case_html, compare_html, figures, render_page
from surgery.report.pages import page_html
from surgery.report.variants import order_text, winner_text
from surgery.results import CaseResult, load_results, safe_name, write_results


def _write_page(path: Path, page: str) -> Path:
    path = Path(path)
    write_atomic(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return path


# ---------------------------------------------------------------------------------------------
# public API


def render_report(result: CaseResult, out: Path, *, compare: CaseResult | None = None) -> Path:
    """Render one result to ``out`` (HTML; a variant case's variant page, without its arms' pages), or
    ``result`` (A) and ``compare`` (B) side by side."""
    page = page_html(result) if compare is None else compare_html(result, compare)
    return _write_page(Path(out), page)


ARMS_DIR = "arms"  # a variant case's arm pages: <case>/arms/<arm>/report.html


def write_arm_reports(result: CaseResult, case_dir: Path) -> dict[str, str]:
    """Write each arm's own case page of a variant result under ``case_dir/arms/<arm>/report.html`` (removing
    the pages of arms this result does not have); return arm -> its link relative to ``case_dir``."""
    arms_dir = Path(case_dir) / ARMS_DIR
    links = {}
    for arm in result.arms:
        folder = safe_name(arm)
        _write_page(arms_dir / folder / "report.html", case_html(result.arm(arm)))
        links[arm] = f"{ARMS_DIR}/{quote(folder)}/report.html"
    kept = {safe_name(arm) for arm in result.arms}
    for stale in arms_dir.glob("*/report.html") if arms_dir.is_dir() else []:
        if stale.parent.name not in kept:  # an arm of an earlier run that this run left out
            stale.unlink()
            if not any(stale.parent.iterdir()):
                stale.parent.rmdir()
    return links


def write_case_report(result: CaseResult, report_dir: Path) -> Path:
    """Write ``report_dir/<case>/results.json``, CSVs and ``report.html``; return the HTML path. A variant
    case's ``report.html`` is its variant page, linking to each arm's page (:func:`write_arm_reports`)."""
    out = Path(report_dir) / safe_name(result.case)
    write_results(result, out)
    if result.arms:
        return _write_page(out / "report.html", page_html(result, arm_pages=write_arm_reports(result, out)))
    return render_report(result, out / "report.html")


def _index_row(result: CaseResult, folder: Path) -> dict[str, Any]:
    figs = figures(result)
    drifts = [v for v in (figs["drift.surgery"], figs["drift.finetune"]) if v is not None]
    has_report = (folder / "report.html").is_file()
    return {
        "case": result.case,
        "description": result.description,
        "verdict": result.verdict,
        "href": f"{quote(folder.name)}/report.html" if has_report else f"{quote(folder.name)}/results.json",
        "has_report": has_report,
        "held": sum(1 for e in result.expectations if e.passed),
        "total": len(result.expectations),
        "failed": [e.name for e in result.failures],
        "undecided": [e.name for e in result.undecided],
        "error": result.error,
        "figures": figs,
        "worst_drift": (math.nan if any(math.isnan(v) for v in drifts) else max(drifts)) if drifts else None,
        "variant": {"winner": winner_text(result), "order": order_text(result)}
        if result.arms or result.variants
        else None,
    }


INDEX_ORDER = {"error": 0, "fail": 0, "undecided": 1, "pass": 2}  # what needs attention first


def natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sort key reading digit runs as numbers: ``case-2`` before ``case-10``."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part]


def write_index(report_dir: Path) -> Path:
    """Write ``report_dir/index.html``: one line per ``*/results.json``, failed (and errors) first, then undecided,
    then passed (unreadable files listed as notes)."""
    report_dir = Path(report_dir)
    rows, notes = [], []
    for path in sorted(report_dir.glob("*/results.json")):
        try:
            result = load_results(path)
            rows.append(_index_row(result, path.parent))
        except Exception as exc:  # noqa: BLE001 - one bad file must not hide the others
            where = f"{path.parent.name}/results.json"
            notes.append(f"{where} skipped: {exc.__class__.__name__}: {str(exc).replace(str(path) + ': ', '')}")
    rows.sort(key=lambda r: (INDEX_ORDER[r["verdict"]], natural_key(r["case"])))
    counts = {v: sum(1 for r in rows if r["verdict"] == v) for v in ("pass", "undecided", "fail", "error")}
    page = render_page(
        "index.html.j2", rows=rows, notes=notes, counts=counts, title="surgery reports", report_dir=str(report_dir)
    )
    return _write_page(report_dir / "index.html", page)


SUMMARY_COLUMNS = {
    "coverage.tensors": "coverage (tensors)",
    "coverage.elements": "coverage (elements)",
    "accuracy.source": "source",
    "accuracy.before": "before",
    "accuracy.after": "after",
    "accuracy.baseline": "baseline",
    "accuracy.recovery": "recovery",
    "accuracy.bn_gain": "AdaBN gain",
    "drift.surgery": "worst W1 (surgery)",
    "drift.finetune": "worst W1 (fine-tune)",
}


def summary_table(report_dir: Path) -> str:
    """A Markdown table of every case under ``report_dir``: the key figures (means over seeds)."""
    header = ["case", "seeds", *SUMMARY_COLUMNS.values(), "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for path in sorted(Path(report_dir).glob("*/results.json")):
        result = load_results(path)
        figs = figures(result)
        cells = [result.case, str(len(result.seeds))]
        for key in SUMMARY_COLUMNS:
            value = figs.get(key)
            cells.append("–" if value is None else f"{value:.3f}")
        cells.append("pass" if result.passed else "FAIL")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
