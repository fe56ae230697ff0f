"""What pairing buys: the spread of a difference between two arms of a variant case, three ways.

From a calibration record's ``arm_figures`` (profile -> arm -> seed -> accuracy after the fine-tune, and
each random init's under ``inits``), for ``better - than``:

- *unpaired*: the sd two independent runs' difference would have, ``sqrt(var(better) + var(than))``, with
  ``than`` a single random init (its first);
- *paired*: the sd of the per-seed difference against that same single init;
- *paired, averaged baseline*: the sd of the per-seed difference against the mean of the seed's inits.
"""

from __future__ import annotations

import math
import statistics
from typing import Any


def _sd(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) >= 2 else None


def pairing_spread(arm_figures: dict[str, dict[str, dict[str, Any]]], better: str, than: str) -> dict[str, Any]:
    """The three sds of ``better - than`` over every profile and seed of a record (None where undefined)."""
    a, b, paired, averaged = [], [], [], []
    inits = 1
    for arms in arm_figures.values():
        for seed, fig in arms.get(better, {}).items():
            other = arms.get(than, {}).get(seed)
            if other is None or fig.get("after") is None or other.get("after") is None:
                continue
            single = other["inits"][0] if other.get("inits") else other["after"]
            a.append(fig["after"])
            b.append(single)
            paired.append(fig["after"] - single)
            averaged.append(fig["after"] - other["after"])
            inits = max(inits, len(other.get("inits", [1])))
    sd_a, sd_b = _sd(a), _sd(b)
    return {
        "better": better,
        "than": than,
        "runs": len(paired),
        "inits": inits,
        "mean": statistics.fmean(averaged) if averaged else None,
        "unpaired": math.sqrt(sd_a**2 + sd_b**2) if sd_a is not None and sd_b is not None else None,
        "paired": _sd(paired),
        "paired_averaged": _sd(averaged) if inits > 1 else None,
        "sd_better": sd_a,
        "sd_than_single_init": sd_b,
    }
