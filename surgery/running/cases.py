"""Run any case: a single case (:mod:`surgery.running.runner`) or a variant case, arm by arm
(:mod:`surgery.running.variants`). The CLI, the pytest plugin, the API and calibration call this."""

from __future__ import annotations

from surgery.case import Case
from surgery.results import CaseResult
from surgery.running.runner import RunOptions, run_single_case
from surgery.running.variants import run_variant_case


def run_case(case: Case, options: RunOptions | None = None) -> CaseResult:
    """Run every seed of ``case`` here (every arm of a variant case) and check its expectations.

    Bad input raises SurgeryInputError; a failed expectation is data in the result, never an exception.
    """
    options = options or RunOptions()
    return run_variant_case(case, options) if case.arms else run_single_case(case, options)
