"""Accuracy across seeds: mean, std and worst of each figure, and recovery against the source."""

from __future__ import annotations

import math
from typing import Any, Iterable

ACCURACY_FIGURES = ("source", "before", "after", "baseline", "recovery", "bn_before", "bn_after", "bn_gain")


def aggregate(values: Iterable[float | None]) -> dict[str, float] | None:
    """mean, std (population), worst (minimum) and n of the non-missing values; None if there are none."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
    return {"mean": mean, "std": std, "worst": min(vals), "n": len(vals)}


def recovery(after: float | None, source: float | None) -> float | None:
    """after / source: the fraction of the source's accuracy the patient got back."""
    if after is None or not source:
        return None
    return after / source


def accuracy_metrics(per_seed: list[dict[str, Any]]) -> dict[str, dict[str, float] | None]:
    """Aggregate every accuracy figure the seeds recorded."""
    return {name: aggregate(seed.get("accuracy", {}).get(name) for seed in per_seed) for name in ACCURACY_FIGURES}
