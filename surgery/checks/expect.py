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
from surgery.checks.comparisons import arm_item, comparisons, split_item
from surgery.results import ExpectationResult
from surgery.spec import CALIBRATE


def declared_checks(case: Any) -> list[tuple[Check, Any]]:
    """The registered checks the case's ``expect`` declares, with their specs, in registration order."""
    return [(c, getattr(case.expect, key)) for key, c in CHECKS.items() if getattr(case.expect, key, None) is not None]


def expectation_names(case: Any) -> list[str]:
    """The expectation results a run of ``case`` produces, in order: ``evaluate_expectations``'s, or for a
    variant case each arm's (``ARM/name``) and then its comparisons."""
    if case.arms:
        own = [arm_item(arm, name) for arm, arm_case in case.arms.items() for name in expectation_names(arm_case)]
        return own + [comparison.name for comparison in comparisons(case)]
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
    }
    if all("coverage" in s for s in per_seed):  # a variant case's random arm performs no surgery
        metrics["coverage"] = {k: min(s["coverage"][k] for s in per_seed) for k in ("tensors", "elements")}
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
    ``beats_baseline`` section and ``margin``; ``ARM/…`` → the arm's section; a comparison → its spec)."""
    arm, name = split_item(item)
    if arm is not None:
        return threshold_location(case.arms[arm], name)
    found = next((c for c in comparisons(case) if c.name == item), None)
    if found is not None:
        return found.spec, "margin"
    *parents, field = yaml_path(item)
    node: Any = case
    for key in parents:
        node = getattr(node, key)
    return node, field


def threshold_path(case: Any, item: str) -> tuple[str | int, ...]:
    """The case-file keys where an item's calibrated threshold is written: ``yaml_path``'s, under
    ``variants.ARM`` for an arm's item, ``expect.compare.I.margin`` for a comparison."""
    arm, name = split_item(item)
    if arm is not None:
        return ("variants", arm) + threshold_path(case.arms[arm], name)
    found = next((c for c in comparisons(case) if c.name == item), None)
    if found is not None:
        if found.field == "expect.rank":
            return ("expect", "rank")
        return ("expect", "compare", int(found.field.rpartition("[")[2].rstrip("]")), "margin")
    return yaml_path(item)


def threshold_line(case: Any, item: str) -> int:
    """The line of the case file an item's threshold is written at (its nearest written parent's)."""
    arm, name = split_item(item)
    if arm is not None:  # the arm's lines: its own entry's where it sets the field, else the case's
        return threshold_line(case.arms[arm], name)
    keys = threshold_path(case, item)
    field = ""
    for key in keys:
        field += f"[{key}]" if isinstance(key, int) else (f".{key}" if field else key)
    while field and field not in case.lines:
        field = field.rpartition(".")[0] if "." in field else ""
    return case.lines.get(field, 1)


def threshold_fields(case: Any) -> dict[str, Any]:
    """Every threshold the case writes, by item name, as written (number, mapping or placeholder)."""
    return {
        name: getattr(*threshold_location(case, name))
        for name in expectation_names(case)
        if split_item(name)[1] != "finite"
    }


def uncalibrated_fields(case: Any) -> list[str]:
    """Dotted case-file paths of thresholds still written as the ``calibrate`` placeholder."""
    return [
        ".".join(map(str, threshold_path(case, name)))
        for name, value in threshold_fields(case).items()
        if value == CALIBRATE
    ]
