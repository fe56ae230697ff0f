"""The expectations of a case: ask each registered check for its items and results, add ``finite``.

Thresholds come in three forms (see :data:`surgery.spec.Threshold`): a claim (a number), a
calibrated threshold per seed count (``{1: 0.884, 3: 0.902}``) or the placeholder ``calibrate``.
With a fresh calibration record, a claim the seeds of this run cannot decide at the record's alpha
is *undecided*, and every message shows the calibrated distribution behind its threshold (see
:class:`surgery.checks.base.Judge`).
"""

from __future__ import annotations

from typing import Any

from surgery.stats.calibration import CalibrationRecord, yaml_path
from surgery.checks.accuracy import accuracy_metrics
from surgery.checks.base import CHECKS, Check, Judge, check, seeds_label
from surgery.results import ExpectationResult
from surgery.spec import CALIBRATE


def declared_checks(case: Any) -> list[tuple[Check, Any]]:
    """The registered checks the case's ``expect`` declares, with their specs, in registration order."""
    return [(c, getattr(case.expect, key)) for key, c in CHECKS.items() if getattr(case.expect, key, None) is not None]


def expectation_names(case: Any) -> list[str]:
    """The expectation results ``evaluate_expectations`` will produce for ``case``, in order."""
    names = [name for c, spec in declared_checks(case) for name in c.items(spec)]
    return names + (["finite"] if case.expect.finite else [])


def evaluate_expectations(
    case: Any, per_seed: list[dict[str, Any]], *, record: CalibrationRecord | None = None
) -> tuple[list[ExpectationResult], dict[str, Any]]:
    """Check every expectation the case declares against the seeds' figures; return results and metrics.

    ``record``: the case's calibration record, when it is fresh (see :func:`surgery.case.case_calibration`).
    """
    judge = Judge(seeds=len(per_seed), record=record)
    metrics: dict[str, Any] = {
        "accuracy": accuracy_metrics(per_seed),
        "coverage": {k: min(s["coverage"][k] for s in per_seed) for k in ("tensors", "elements")},
    }
    out: list[ExpectationResult] = []
    for c, spec in declared_checks(case):
        out += c.evaluate(spec, per_seed, judge, metrics)
    if case.expect.finite:
        bad = [s["seed"] for s in per_seed if not s["finite"]]
        steps = {s["seed"]: s["finetune"]["nonfinite_step"] for s in per_seed if not s["finite"]}
        where = (
            f"non-finite loss or weights in seed(s) {bad}, at step {steps}"
            if bad
            else f"finite, {seeds_label(per_seed)}"
        )
        out.append(
            check(
                "finite",
                0.0 if bad else 1.0,
                1.0,
                lambda o, t: o == t,
                "==",
                where,
                {"nonfinite_seeds": bad, "nonfinite_step": steps},
            )
        )
    return out, metrics


def threshold_location(case: Any, item: str) -> tuple[Any, str]:
    """The spec section holding an item's threshold, and the field's name (``accuracy.beats_baseline`` → its
    ``beats_baseline`` section and ``margin``)."""
    *parents, field = yaml_path(item)
    node: Any = case
    for key in parents:
        node = getattr(node, key)
    return node, field


def threshold_fields(case: Any) -> dict[str, Any]:
    """Every threshold the case writes, by item name, as written (number, mapping or placeholder)."""
    return {name: getattr(*threshold_location(case, name)) for name in expectation_names(case) if name != "finite"}


def uncalibrated_fields(case: Any) -> list[str]:
    """Dotted case-file paths of thresholds still written as the ``calibrate`` placeholder."""
    return [".".join(yaml_path(name)) for name, value in threshold_fields(case).items() if value == CALIBRATE]
