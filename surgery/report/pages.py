"""The report page of any result: a variant case's page or a single case's (one entry point for every caller)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from surgery.report.html import case_html
from surgery.report.variants import variant_html


def page_html(result: Any, *, arm_pages: Mapping[str, str] | None = None) -> str:
    """The self-contained page of ``result``: :func:`~surgery.report.variants.variant_html` for a variant case
    (``arm_pages``: arm -> relative link to its own page), else :func:`~surgery.report.html.case_html`."""
    if getattr(result, "arms", None):
        return variant_html(result, arm_pages)
    return case_html(result)
