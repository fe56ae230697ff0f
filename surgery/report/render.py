"""HTML reports (placeholder until the report module lands): results files and a plain index."""

from __future__ import annotations

import html
from pathlib import Path

from surgery.results import CaseResult, load_results, safe_name, write_results
from surgery.zoo import write_atomic


def write_case_report(result: CaseResult, report_dir: Path) -> Path:
    """Write ``report_dir/<case>/results.json``, CSVs and ``report.html``; return the HTML path."""
    out = Path(report_dir) / safe_name(result.case)
    write_results(result, out)
    rows = "".join(f"<tr><td>{html.escape(e.name)}</td><td>{'pass' if e.passed else 'FAIL'}</td>"
                   f"<td>{html.escape(e.message)}</td></tr>" for e in result.expectations)
    page = f"<!doctype html><meta charset=utf-8><title>{html.escape(result.case)}</title><table>{rows}</table>"
    path = out / "report.html"
    write_atomic(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return path


def write_index(report_dir: Path) -> Path:
    """An index of every case report under ``report_dir``."""
    report_dir = Path(report_dir)
    items = []
    for res in sorted(report_dir.glob("*/results.json")):
        r = load_results(res)
        items.append(f"<li><a href='{html.escape(res.parent.name)}/report.html'>{html.escape(r.case)}</a> "
                     f"{'pass' if r.passed else 'FAIL'}</li>")
    page = "<!doctype html><meta charset=utf-8><title>surgery</title><ul>" + "".join(items) + "</ul>"
    path = report_dir / "index.html"
    write_atomic(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return path
