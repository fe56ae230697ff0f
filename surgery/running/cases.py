"""Run any case: a single case (:mod:`surgery.running.runner`) or a variant case, arm by arm
(:mod:`surgery.running.variants`). The CLI, the pytest plugin, the API and calibration call this; ``surgery run``
and ``surgery calibrate`` check the models of their cases before they run them (:func:`check_case`)."""

from __future__ import annotations

from surgery.case import Case
from surgery.results import CaseResult
from surgery.running.prepare import device_for
from surgery.running.runner import RunOptions, case_seeds, prepare_seed, run_single_case
from surgery.running.variants import run_variant_case


def run_case(case: Case, options: RunOptions | None = None) -> CaseResult:
    """Run every seed of ``case`` here (every arm of a variant case) and check its expectations.

    Bad input raises SurgeryInputError; a failed expectation is data in the result, never an exception.
    """
    options = options or RunOptions()
    return run_variant_case(case, options) if case.arms else run_single_case(case, options)


def check_case(case: Case, options: RunOptions | None = None) -> None:
    """Raise the first input error that a run of ``case`` finds before its work, without evaluating or training
    anything: the device, and the models of its first seed (each surgery arm's, for a variant case).

    ``surgery run`` checks every case after the first this way before it runs the first (the first finds its
    own errors first thing), and ``surgery calibrate`` every case: a mistyped layer in the last of ten cases
    costs seconds, not the nine runs before it. About half a second per case at 32 px."""
    options = options or RunOptions()
    device_for(case, options.device)
    seed = case_seeds(case, options)[0]
    for arm, arm_case in case.arms.items() if case.arms else [(None, case)]:
        if arm is None or (case.variants or {})[arm].init != "random":  # a random arm builds no surgery
            prepare_seed(arm_case, seed)
