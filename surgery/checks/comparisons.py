"""The expectations of a variant case that span arms: ``expect.compare`` and ``expect.rank``.

Each claim is judged on paired differences: per seed, the accuracy after the fine-tune of one arm minus
another's, both run on that seed (same split, batch order, probe samples and fresh-tensor initial
values). The judge, the calibration record and the undecided rule are a single arm's
(:class:`surgery.checks.base.Judge`); the record calibrates each comparison from its per-seed differences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from surgery.checks.accuracy import aggregate
from surgery.checks.base import Judge
from surgery.results import ExpectationResult
from surgery.spec import SignedUnitThreshold, Strict

ARM_SEPARATOR = "/"


class CompareSpec(Strict):
    """One entry of ``expect.compare``: arm ``better`` beats arm ``than`` by ``margin`` in accuracy after the
    fine-tune, judged on the per-seed paired differences (mean or worst over the seeds)."""

    better: str = Field(description="the arm that should be better")
    than: str = Field(description="the arm it is compared with")
    margin: SignedUnitThreshold = Field(0.0, description="the smallest accepted difference better - than")
    aggregate: Literal["mean", "worst"] = Field(
        "mean", description="what the margin compares: the mean or the worst (lowest) paired difference"
    )


@dataclass(frozen=True)
class Comparison:
    """One comparative claim: its item name, its spec, and the case field it is written at."""

    name: str  # compare.select>random, or rank.select>exact for a consecutive pair of expect.rank
    spec: CompareSpec
    field: str  # expect.compare[0] or expect.rank

    @property
    def arms(self) -> tuple[str, str]:
        return self.spec.better, self.spec.than


def comparisons(case: Any) -> list[Comparison]:
    """The case's comparative claims in file order: each ``expect.compare`` entry, then each consecutive pair
    of ``expect.rank`` (the better beats the next by margin 0)."""
    out = [
        Comparison(f"compare.{spec.better}>{spec.than}", spec, f"expect.compare[{i}]")
        for i, spec in enumerate(case.expect.compare)
    ]
    rank = case.expect.rank or []
    out += [
        Comparison(f"rank.{better}>{than}", CompareSpec(better=better, than=than, margin=0.0), "expect.rank")
        for better, than in zip(rank, rank[1:])
    ]
    return out


def arm_item(arm: str, name: str) -> str:
    """The item name of an arm's own expectation: ``select/accuracy.after_min``."""
    return f"{arm}{ARM_SEPARATOR}{name}"


def split_item(item: str) -> tuple[str | None, str]:
    """``select/accuracy.after_min`` → (select, accuracy.after_min); a case's own item → (None, item)."""
    arm, sep, name = item.partition(ARM_SEPARATOR)
    return (arm, name) if sep else (None, item)


def paired_differences(figures: dict[str, dict[int, float | None]], better: str, than: str) -> dict[int, float]:
    """Per seed, ``figures[better] - figures[than]``, over the seeds where both arms have a figure."""
    a, b = figures.get(better, {}), figures.get(than, {})
    return {seed: a[seed] - b[seed] for seed in a if a[seed] is not None and b.get(seed) is not None}  # type: ignore[operator]


def evaluate_comparisons(
    case: Any, figures: dict[str, dict[int, float | None]], judge: Judge, not_run: dict[str, str] | None = None
) -> list[ExpectationResult]:
    """Judge every comparative claim of ``case`` on ``figures`` (arm -> seed -> accuracy after the fine-tune).

    ``not_run``: arms left out of this run, with why; a claim on one of them has no figure (undecided when
    the record says these seeds cannot decide it, else failed as missing).
    """
    not_run = not_run or {}
    out = []
    for comparison in comparisons(case):
        better, than = comparison.arms
        diffs = paired_differences(figures, better, than)
        agg = aggregate(diffs.values())
        how = comparison.spec.aggregate
        seeds = sorted(diffs)
        where = f"{better} - {than}, paired, {how} of seed{'s' if len(seeds) != 1 else ''} {', '.join(map(str, seeds))}"
        missing = [arm for arm in (better, than) if arm in not_run]
        if missing:
            where = f"{better} - {than}; arm {missing[0]} was not run: {not_run[missing[0]]}"
        result = judge(
            comparison.name,
            agg[how] if agg else None,
            comparison.spec.margin,
            "lower",
            how,
            where,
            {
                "better": better,
                "than": than,
                "differences": {str(seed): diff for seed, diff in diffs.items()},
                "figures": agg,
                "field": comparison.field,
            },
        )
        out.append(result)
    return out


def decided_order(case: Any, results: list[ExpectationResult], arms_run: list[str] | None = None) -> list[list[str]]:
    """The arms in tiers, best first, from the comparisons that held with a margin of 0 or more: an arm is
    placed below every arm shown to beat it; arms no such claim separates share a tier. A claim with a
    negative margin (``lr-scale`` within 0.02 of ``freeze``) says that one arm is not much worse, not that
    it is better, so it orders nothing. ``arms_run``: the arms the order is over (default: every arm)."""
    arms = list(case.variants or {}) if arms_run is None else list(arms_run)
    beaten_by: dict[str, set[str]] = {arm: set() for arm in arms}
    for result in results:
        better, than = result.details.get("better"), result.details.get("than")
        if (
            result.status == "passed"
            and result.threshold is not None
            and result.threshold >= 0
            and better in beaten_by
            and than in beaten_by
        ):
            beaten_by[than].add(better)
    tiers: list[list[str]] = []
    placed: set[str] = set()
    while len(placed) < len(arms):
        tier = [arm for arm in arms if arm not in placed and beaten_by[arm] <= placed]
        if not tier:  # a cycle of held claims (cannot happen with margins >= 0): put the rest together
            tier = [arm for arm in arms if arm not in placed]
        tiers.append(tier)
        placed.update(tier)
    return tiers


def describe_order(tiers: list[list[str]]) -> str:
    """``select > exact = order > random``."""
    return " > ".join(" = ".join(tier) for tier in tiers)


__all__ = [
    "ARM_SEPARATOR",
    "CompareSpec",
    "Comparison",
    "arm_item",
    "comparisons",
    "decided_order",
    "describe_order",
    "evaluate_comparisons",
    "paired_differences",
    "split_item",
]
