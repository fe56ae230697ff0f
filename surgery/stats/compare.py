"""Two classifiers on the same examples: the paired statistics a release gate decides on.

``compare_predictions(labels, candidate, champion, confidence=0.95)`` takes the predicted classes
of a candidate and of the champion on the same held-out examples and returns:

- the accuracy difference (candidate − champion) with a **paired bootstrap** interval: the
  examples are resampled with replacement, the same indices for both models, so the interval
  reflects the noise of *this* evaluation set and the correlation of the two models' errors;
- **McNemar's exact test** on the discordant pairs (one model right, the other wrong): a two-sided
  binomial test of b against b + c at p = 1/2 (scipy's ``binomtest``);
- the **flip rate**: the fraction of examples on which the two predict different classes (a
  candidate can match the champion's accuracy while changing half of its answers);
- the **non-inferiority** decision: the one-sided lower confidence bound of the difference, at
  ``confidence``, must be at least ``−margin``.

NOTE: the interval reported is the two-sided ``2·confidence − 1`` percentile interval, whose lower
end is the one-sided bound at ``confidence`` (a 90% interval for a 95% one-sided rule), the
usual convention for non-inferiority.

Example::

    >>> import numpy as np
    >>> y = np.array([0, 1, 2, 3] * 50)
    >>> same = compare_predictions(y, y, y, margin=0.0)
    >>> same.difference, same.flip_rate, same.non_inferior
    (0.0, 0.0, True)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import binomtest

DEFAULT_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # a fixed stream: the same predictions always give the same interval


@dataclass(frozen=True)
class PairedComparison:
    """What :func:`compare_predictions` measured; every figure of ``gate.json``'s ``comparison``."""

    examples: int
    candidate_accuracy: float
    champion_accuracy: float
    candidate_interval: tuple[float, float]  # the same bootstrap's interval of each model's own accuracy
    champion_interval: tuple[float, float]
    difference: float  # candidate − champion
    interval: tuple[float, float]  # two-sided (2·confidence − 1) paired-bootstrap interval of the difference
    lower_bound: float  # one-sided lower bound of the difference at ``confidence``
    confidence: float
    margin: float  # the candidate may be worse by at most this much
    non_inferior: bool  # lower_bound >= −margin
    candidate_only: int  # discordant: candidate right, champion wrong
    champion_only: int  # discordant: champion right, candidate wrong
    mcnemar_p: float  # exact two-sided McNemar test on the discordant pairs
    flip_rate: float  # fraction of examples with different predicted classes
    resamples: int

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("interval", "candidate_interval", "champion_interval"):
            out[key] = list(getattr(self, key))
        return out

    def summary(self) -> str:
        """One line: the difference with its interval, McNemar's p and the flip rate."""
        lo, hi = self.interval
        pct = round(100 * (2 * self.confidence - 1))
        return (
            f"accuracy {self.candidate_accuracy:.4f} vs champion {self.champion_accuracy:.4f}: difference "
            f"{self.difference:+.4f}, {pct}% paired-bootstrap interval [{lo:+.4f}, {hi:+.4f}] "
            f"(one-sided {self.confidence:g} bound {self.lower_bound:+.4f} vs -{self.margin:g}); "
            f"McNemar exact p = {self.mcnemar_p:.3g} ({self.candidate_only} vs {self.champion_only} "
            f"discordant); flip rate {self.flip_rate:.4f} of {self.examples}"
        )


def _as_classes(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected one predicted class per example, got shape {array.shape}")
    return array


def bootstrap_means(
    columns: np.ndarray, *, resamples: int = DEFAULT_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> np.ndarray:
    """Means of each column of ``columns`` (examples × figures) on ``resamples`` paired resamples of the rows.

    Every column sees the same resampled examples, so differences of columns are paired. Returns
    ``resamples × figures``.
    """
    n = columns.shape[0]
    rng = np.random.default_rng(seed)
    # Counts per example from a multinomial draw: the same resample as n indices with replacement, in O(n).
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples)
    return counts @ columns.astype(np.float64) / n


def accuracy_interval(
    correct: Any, *, confidence: float = 0.95, resamples: int = DEFAULT_RESAMPLES
) -> tuple[float, float]:
    """The two-sided ``2·confidence − 1`` bootstrap interval of an accuracy from per-example correctness."""
    means = bootstrap_means(np.asarray(correct, dtype=np.float64)[:, None], resamples=resamples)[:, 0]
    return float(np.quantile(means, 1 - confidence)), float(np.quantile(means, confidence))


def compare_predictions(
    labels: Any,
    candidate: Any,
    champion: Any,
    *,
    confidence: float = 0.95,
    margin: float = 0.0,
    resamples: int = DEFAULT_RESAMPLES,
) -> PairedComparison:
    """Compare two models' predicted classes on the same labelled examples (see the module docstring)."""
    y = _as_classes(labels, "labels")
    cand, champ = _as_classes(candidate, "candidate"), _as_classes(champion, "champion")
    if not len(y) == len(cand) == len(champ) or len(y) == 0:
        raise ValueError(
            f"expected the same non-zero number of labels and predictions, got {len(y)}, {len(cand)}, {len(champ)}"
        )
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence: got {confidence}; expected a number in [0.5, 1)")
    cand_ok, champ_ok = cand == y, champ == y
    means = bootstrap_means(
        np.stack([cand_ok, champ_ok, cand_ok.astype(np.int8) - champ_ok], axis=1), resamples=resamples
    )
    lo, hi = np.quantile(means, 1 - confidence, axis=0), np.quantile(means, confidence, axis=0)
    lower, upper = float(lo[2]), float(hi[2])
    b, c = int(np.sum(cand_ok & ~champ_ok)), int(np.sum(~cand_ok & champ_ok))
    p = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    difference = float(cand_ok.mean() - champ_ok.mean())
    return PairedComparison(
        examples=len(y),
        candidate_accuracy=float(cand_ok.mean()),
        champion_accuracy=float(champ_ok.mean()),
        candidate_interval=(float(lo[0]), float(hi[0])),
        champion_interval=(float(lo[1]), float(hi[1])),
        difference=difference,
        interval=(lower, upper),
        lower_bound=lower,
        confidence=confidence,
        margin=margin,
        non_inferior=lower >= -margin,
        candidate_only=b,
        champion_only=c,
        mcnemar_p=float(p),
        flip_rate=float(np.mean(cand != champ)),
        resamples=resamples,
    )
