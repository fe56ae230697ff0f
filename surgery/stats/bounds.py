"""Calibrated thresholds: one-sided normal prediction bounds for a k-seed run, and whether a claim is decided.

The method. Calibration runs a case with ``n`` seeds under several numeric profiles (threads, CPU
instruction set, a rebuilt zoo) and collects each expectation's figure per run. A later run on
another machine aggregates ``k`` seeds (their mean, or their worst). Modelling one run's figure as
normal with the calibration's mean ``m`` and standard deviation ``s``, the lower bound that the
aggregate of ``k`` seeds meets with probability at least ``1 - alpha`` is

- mean of k seeds:  ``m - t(1 - alpha; n - 1) * s * sqrt(1/k + 1/n)``
- worst of k seeds: ``m - t(1 - alpha_1; n - 1) * s * sqrt(1 + 1/n)`` with ``alpha_1 = 1 - (1 - alpha)**(1/k)``
  (all k seeds must clear it, so each one may miss with probability ``alpha_1`` only),

and the upper bound mirrors it (``+``). This is the classical prediction interval for a future
mean of k draws (Hahn & Meeker, *Statistical Intervals*, ch. 4), with the t quantile paying for
``m`` and ``s`` being estimates.

Assumptions, stated because they are choices:

- NOTE: the figure is roughly normal over seeds and profiles. Accuracies near 1 or figures with
  a hard floor are skewed; the bound is then approximate. A distribution-free bound (the minimum
  of n runs is undercut with probability 1/(n+1)) would need n >= 999 runs at alpha = 0.001.
- NOTE: ``n`` is the number of *seeds*, not of runs: the runs of one seed under several profiles
  are correlated, so counting them all would overstate what we know. ``s`` is the spread over all
  runs (seed and numeric variation together). This is conservative for a run of one fixed seed.
- The profiles stand in for "another machine": a CPU or torch build outside them can still move
  a figure further (the report flags a run whose provenance differs from the calibration's).

A *claim* (a fixed threshold the case asserts, e.g. ``beats_baseline: {margin: 0.03}``) is
*decided* for k seeds when the whole prediction interval lies on one side of it: above (it will
hold, with false-alarm rate alpha) or below (it will fail). Otherwise it is *undecided*: a run of
k seeds could land either side, so its outcome says nothing, and it is reported as such.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal


Direction = Literal["lower", "upper"]  # the figure must be >= threshold (lower) or <= threshold (upper)
Aggregate = Literal["mean", "worst"]
Decision = Literal["holds", "fails", "undecided"]

MAX_SEEDS_TO_DECIDE = 1000


@dataclass(frozen=True)
class Calibrated:
    """A figure's calibration: its mean and spread over ``runs`` runs of ``seeds`` seeds."""

    mean: float
    std: float
    seeds: int
    runs: int

    def __post_init__(self) -> None:
        if self.seeds < 2:
            raise ValueError(f"a calibration needs at least 2 seeds, got {self.seeds}")


def _quantile(calibrated: Calibrated, alpha: float, k: int, aggregate: Aggregate) -> tuple[float, float]:
    """(t quantile, scale) such that the bound is mean -/+ t * scale."""
    from scipy import stats  # here: scipy.stats takes about a second to import, and parsing a case needs none

    n = calibrated.seeds
    if aggregate == "worst":
        per_seed_alpha = 1.0 - (1.0 - alpha) ** (1.0 / k)
        return float(stats.t.ppf(1.0 - per_seed_alpha, n - 1)), calibrated.std * math.sqrt(1.0 + 1.0 / n)
    return float(stats.t.ppf(1.0 - alpha, n - 1)), calibrated.std * math.sqrt(1.0 / k + 1.0 / n)


def prediction_bound(
    calibrated: Calibrated, *, alpha: float, k: int = 1, direction: Direction = "lower", aggregate: Aggregate = "mean"
) -> float:
    """The bound that the aggregate of ``k`` seeds stays on the right side of with probability >= 1 - alpha.

    >>> c = Calibrated(mean=0.9, std=0.01, seeds=10, runs=30)
    >>> round(prediction_bound(c, alpha=0.001, k=1), 4)
    0.8549
    >>> prediction_bound(c, alpha=0.001, k=3) > prediction_bound(c, alpha=0.001, k=1)
    True
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    t, scale = _quantile(calibrated, alpha, k, aggregate)
    return calibrated.mean - t * scale if direction == "lower" else calibrated.mean + t * scale


def rounded_bound(value: float, direction: Direction, digits: int = 3) -> float:
    """Round a bound outward (down for a lower bound, up for an upper one), so rounding never tightens it."""
    scale = 10**digits
    return (math.floor(value * scale + 1e-9) if direction == "lower" else math.ceil(value * scale - 1e-9)) / scale


def decide(
    calibrated: Calibrated,
    threshold: float,
    *,
    alpha: float,
    k: int,
    direction: Direction = "lower",
    aggregate: Aggregate = "mean",
) -> Decision:
    """Whether a k-seed run will meet a fixed ``threshold`` ("holds"), miss it ("fails"), or could do either."""
    good = prediction_bound(calibrated, alpha=alpha, k=k, direction=direction, aggregate=aggregate)
    bad = prediction_bound(
        calibrated, alpha=alpha, k=k, direction="upper" if direction == "lower" else "lower", aggregate=aggregate
    )
    if direction == "lower":
        return "holds" if good >= threshold else "fails" if bad < threshold else "undecided"
    return "holds" if good <= threshold else "fails" if bad > threshold else "undecided"


def seeds_to_decide(
    calibrated: Calibrated,
    threshold: float,
    *,
    alpha: float,
    direction: Direction = "lower",
    aggregate: Aggregate = "mean",
) -> int | None:
    """The fewest seeds whose mean decides the claim, or None when more seeds alone cannot.

    Only a mean tightens with more seeds; the worst of more seeds only spreads further, so a claim on
    the worst seed that is undecided for one seed stays undecided (a quieter experiment is needed:
    more fine-tune steps, a larger evaluation set). For a mean, the interval narrows towards
    ``m -/+ t * s / sqrt(n)``; a threshold inside that is undecidable without more calibration too.
    """
    if aggregate == "worst":
        return (
            1
            if decide(calibrated, threshold, alpha=alpha, k=1, direction=direction, aggregate=aggregate) != "undecided"
            else None
        )
    return _fewest(
        lambda k: decide(calibrated, threshold, alpha=alpha, k=k, direction=direction) != "undecided", start=1
    )


def _fewest(decided: Callable[[int], bool], *, start: int) -> int | None:
    """The smallest count from ``start`` up to :data:`MAX_SEEDS_TO_DECIDE` for which ``decided`` holds, or None.

    ``decided`` must be monotone: more seeds only narrow a prediction interval."""
    lo, hi = start, MAX_SEEDS_TO_DECIDE
    if not decided(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if decided(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _with_seeds(calibrated: Calibrated, seeds: int) -> Calibrated:
    """The same mean and spread, as a calibration of ``seeds`` seeds would measure them."""
    return Calibrated(calibrated.mean, calibrated.std, seeds=seeds, runs=max(seeds, calibrated.runs))


def calibration_seeds_to_decide(
    calibrated: Calibrated,
    threshold: float,
    *,
    alpha: float,
    k: int,
    direction: Direction = "lower",
    aggregate: Aggregate = "mean",
) -> int | None:
    """The fewest calibration seeds that would decide the claim for a k-seed run, were the figure's mean and
    spread what this calibration measured; None when no number of them would (the threshold lies too close).

    A small calibration pays twice: a wide t quantile (``n - 1`` degrees of freedom) and the ``1/n`` term.

    >>> c = Calibrated(mean=0.81, std=0.42, seeds=3, runs=3)
    >>> decide(c, 3.0, alpha=0.001, k=1, direction="upper", aggregate="worst")
    'undecided'
    >>> calibration_seeds_to_decide(c, 3.0, alpha=0.001, k=1, direction="upper", aggregate="worst")
    8
    """

    def decided(n: int) -> bool:
        wider = _with_seeds(calibrated, n)
        return decide(wider, threshold, alpha=alpha, k=k, direction=direction, aggregate=aggregate) != "undecided"

    return _fewest(decided, start=calibrated.seeds)


def seeds_to_decide_together(
    calibrated: Calibrated,
    threshold: float,
    *,
    alpha: float,
    direction: Direction = "lower",
    aggregate: Aggregate = "mean",
) -> int | None:
    """The fewest seeds N such that a run of N seeds, judged against a calibration of N seeds, decides the
    claim (were the figure's mean and spread what this calibration measured); None when no N would.

    The remedy when neither more run seeds (:func:`seeds_to_decide`) nor a larger calibration for the run's
    seeds (:func:`calibration_seeds_to_decide`) is enough alone. Only a mean narrows this way.
    """
    if aggregate == "worst":
        return None

    def decided(n: int) -> bool:
        return decide(_with_seeds(calibrated, n), threshold, alpha=alpha, k=n, direction=direction) != "undecided"

    return _fewest(decided, start=max(2, calibrated.seeds))


def calibrated_band(calibration: dict[str, Any] | None) -> tuple[float, float] | None:
    """The two-sided band (α each side) that an expectation's run was judged against, from the calibration
    its ``results.json`` carries; ``None`` without one. The judged side is the run's own prediction bound
    (``bound``); the other mirrors it about the mean, as :func:`prediction_bound` does."""
    if not isinstance(calibration, dict):
        return None
    try:
        mean = float(calibration["mean"])
        if calibration.get("bound") is not None:
            half = abs(mean - float(calibration["bound"]))
        else:  # an older result without its bound: compute it (scipy.stats, a second to import)
            cal = Calibrated(
                mean=mean, std=float(calibration["std"]), seeds=int(calibration["seeds"]), runs=int(calibration["runs"])
            )
            half = mean - prediction_bound(
                cal,
                alpha=float(calibration["alpha"]),
                k=int(calibration.get("k") or 1),
                aggregate="worst" if calibration.get("aggregate") == "worst" else "mean",
            )
    except (KeyError, TypeError, ValueError):
        return None
    return (mean - half, mean + half) if math.isfinite(half) else None
