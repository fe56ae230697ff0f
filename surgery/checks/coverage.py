"""Coverage: how much of the target a surgery really set from the source, from its SurgeryRecord."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from surgery.checks.base import Check, register_check
from surgery.spec import Strict, UnitThreshold

if TYPE_CHECKING:  # parsing a case imports this module: it must import neither torch nor pandas (issue 30)
    import pandas as pd

    from surgery.ops.record import SurgeryRecord

METHODS = ("exact", "sliced", "adapted", "fresh")


def coverage_summary(record: "SurgeryRecord") -> dict[str, Any]:
    """Fractions of target tensors and elements set from the source, and the fresh ones counted by reason."""
    tensors = record.tensors
    total_n = len(tensors) or 1
    total_el = sum(t.numel for t in tensors) or 1
    covered = [t for t in tensors if t.method != "fresh"]
    reasons: dict[str, int] = {}
    for t in tensors:
        if t.method == "fresh":
            key = (t.reason or "unknown").split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
    return {
        "tensors": len(covered) / total_n,
        "elements": sum(t.numel for t in covered) / total_el,
        "n_tensors": len(tensors),
        "by_method": {m: sum(1 for t in tensors if t.method == m) for m in METHODS},
        "fresh_reasons": reasons,
    }


def coverage_table(record: "SurgeryRecord") -> "pd.DataFrame":
    """One row per target layer (module path): tensor counts per method, element coverage, fresh reasons."""
    import pandas as pd  # here, not at the top: parsing a case imports this module and needs no pandas

    rows = []
    for t in record.tensors:
        rows.append(
            {
                "layer": t.layer,
                "tensor": t.target_key,
                "method": t.method,
                "numel": t.numel,
                "covered_numel": 0 if t.method == "fresh" else t.numel,
                "reason": t.reason or "",
            }
        )
    frame = pd.DataFrame(rows, columns=["layer", "tensor", "method", "numel", "covered_numel", "reason"])
    if frame.empty:
        return frame
    counts = pd.crosstab(frame["layer"], frame["method"]).reindex(columns=list(METHODS), fill_value=0)
    sums = frame.groupby("layer", sort=False)[["numel", "covered_numel"]].sum()
    reasons = frame[frame["reason"] != ""].groupby("layer")["reason"].agg(lambda r: "; ".join(sorted(set(r))))
    table = sums.join(counts).join(reasons).fillna({"reason": ""})
    table["elements_covered"] = table["covered_numel"] / table["numel"]
    order = list(dict.fromkeys(frame["layer"]))
    return table.loc[order].reset_index().drop(columns=["covered_numel"])


class CoverageExpect(Strict):
    """``expect.coverage``: the fraction of target tensors (and elements) the surgery set from the source."""

    tensors_min: UnitThreshold | None = Field(
        None,
        description="lowest fraction of the patient's floating-point tensors the surgery must set from the source "
        "(exact, sliced or adapted), worst seed",
    )
    elements_min: UnitThreshold | None = Field(
        None,
        description="lowest fraction of the patient's floating-point tensor elements the surgery must set from the "
        "source, worst seed",
    )
    tensors_max: UnitThreshold | None = Field(None, description="for baselines expected to cover little")


@register_check
class CoverageCheck(Check):
    """Coverage of the target by the source, the worst seed's (a structural figure: seeds rarely differ)."""

    key = "coverage"
    spec = CoverageExpect
    FIELDS = (
        ("tensors_min", "tensors", "lower"),
        ("elements_min", "elements", "lower"),
        ("tensors_max", "tensors", "upper"),
    )

    def items(self, spec: CoverageExpect) -> list[str]:
        return [f"coverage.{f}" for f, _, _ in self.FIELDS if getattr(spec, f) is not None]

    def evaluate(self, spec, per_seed, judge, metrics):
        cov = metrics["coverage"]
        details = {
            "by_method": per_seed[0]["coverage"]["by_method"],
            "fresh_reasons": per_seed[0]["coverage"]["fresh_reasons"],
        }
        return [
            judge(f"coverage.{f}", cov[figure], getattr(spec, f), direction, "worst", f"coverage, {figure}", details)
            for f, figure, direction in self.FIELDS
            if getattr(spec, f) is not None
        ]
