"""Nightly history: every expectation's figure over many report directories, against its calibrated band.

Read the nights (:func:`surgery.nightly.nights.find_nights`), then per case and expectation build a
:class:`Series`: one :class:`Point` per night with the observed figure, the threshold it was held to,
its outcome (passed, failed, undecided) and the *calibrated band*. Three things are flagged:

- **outside the band**: a night whose figure lies outside the band its own run was judged against. The
  band is the two-sided prediction interval of :func:`surgery.stats.bounds.prediction_bound` at the calibration's
  α, for that run's seed count and aggregate (mean or worst): where the figure should land, α on each
  side, if nothing changed since the calibration. A figure can pass its threshold and still be outside.
- **drifting**: a sustained move, as ASV flags a benchmark step: a two-sided Mann–Whitney U test of the
  last ``window`` nights against the ``window`` nights before them, flagged at ``p < p_max``. Defaults:
  ``window = 7``, ``p_max = 0.002`` (ASV's threshold); with 7 against 7 the exact test reaches it only when
  at most one of the 49 pairs is out of order, so noise alone rarely does. The direction says whether the
  median moved towards the threshold (drift before failure) or away from it.
- **provenance changes**: between two consecutive nights of a case, any of :data:`WATCHED` (versions,
  device, CPU capability, threads, the case file) or the SHA-256 of a weight file (zoo or checkpoint).

Reading only: no torch, no matplotlib; :mod:`surgery.report.history` draws the page.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from surgery.stats.bounds import calibrated_band
from surgery.errors import SurgeryInputError
from surgery.nightly.nights import RESULTS, STAMP, find_nights
from surgery.results import CaseResult, load_results

WINDOW = 7  # k: the last k nights against the k before them
P_MAX = 0.002  # ASV's p threshold for its Mann-Whitney U step test
MAX_EXACT = 60  # pooled values up to which the U test's p-value is counted exactly
WATCHED = (
    "torch",
    "torchvision",
    "timm",
    "python",
    "surgery",
    "device",
    "cuda",
    "cudnn",
    "cpu_capability",
    "aten_cpu_capability_env",
    "threads",
    "deterministic_algorithms",
    "machine",
    "case_hash",
)
WEIGHTS = "weights"  # provenance key: weight file path -> SHA-256


@dataclass
class Night:
    """One report directory: its results by case, when it ran and from which commit."""

    path: Path
    created: datetime | None
    commit: str | None
    results: dict[str, CaseResult] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # case -> its results.json
    notes: list[str] = field(default_factory=list)  # results.json files that could not be read

    @property
    def label(self) -> str:
        return self.path.name

    @property
    def date(self) -> str:
        return self.created.strftime("%Y-%m-%d %H:%M") if self.created else self.label

    def counts(self) -> dict[str, int]:
        """Cases that passed, were undecided (no failure, a claim undecided), failed, or stopped with an error."""
        return Counter(r.verdict for r in self.results.values())


@dataclass
class Point:
    """One night's figure of one expectation."""

    night: int  # index into History.nights
    observed: float | None
    threshold: float | None
    status: str  # passed | failed | undecided
    band: tuple[float, float] | None  # the calibrated band the run was judged against
    outside: bool
    message: str = ""


@dataclass
class Drift:
    """The rank test of the last ``window`` nights against the ``window`` before them."""

    window: int
    p_max: float
    p: float | None = None  # None: too few nights to test
    u: float | None = None  # Mann-Whitney U of the recent nights
    shift: float | None = None  # median(recent) - median(earlier)
    towards_threshold: bool | None = None
    runs: int = 0  # nights with a figure

    @property
    def flagged(self) -> bool:
        return self.p is not None and self.p < self.p_max

    def describe(self) -> str:
        """One line: the test, its k, p and the direction of the move."""
        test = f"Mann–Whitney U, last {self.window} runs vs the {self.window} before"
        if self.p is None:
            return f"{test}: needs {2 * self.window} runs with a figure, has {self.runs}"
        way = (
            ""
            if self.towards_threshold is None
            else (" towards its threshold" if self.towards_threshold else " away from its threshold")
        )
        verdict = "drifting" if self.flagged else "steady"
        return (
            f"{verdict}: {test}, U = {self.u:g}, p = {self.p:.2g} (flag at p < {self.p_max:g}); "
            f"median moved {self.shift:+.4g}{way}"
        )


@dataclass
class Series:
    """One expectation of one case over the nights."""

    case: str
    name: str
    direction: str | None  # lower: the figure must stay above its threshold; upper: below
    points: list[Point]
    drift: Drift

    @property
    def failed(self) -> list[Point]:
        return [p for p in self.points if p.status == "failed"]

    @property
    def undecided(self) -> list[Point]:
        return [p for p in self.points if p.status == "undecided"]

    @property
    def outside(self) -> list[Point]:
        return [p for p in self.points if p.outside]

    @property
    def steady(self) -> bool:
        """The same figure and threshold in every run, nothing flagged (coverage, finiteness): nothing to draw."""
        return not self.flags and len({(p.observed, p.threshold, p.band) for p in self.points}) == 1

    @property
    def flags(self) -> list[str]:
        """What needs attention: failed, undecided, outside band, drifting (in that order)."""
        return [
            name
            for name, on in (
                ("failed", self.failed),
                ("undecided", self.undecided),
                ("outside band", self.outside),
                ("drifting", self.drift.flagged),
            )
            if on
        ]


@dataclass
class Change:
    """A provenance field that differs between a case's night and its previous night."""

    night: int
    case: str
    key: str
    before: str
    after: str


@dataclass
class History:
    """Everything the history page shows."""

    nights: list[Night]
    series: list[Series]
    changes: list[Change]
    window: int = WINDOW
    p_max: float = P_MAX

    def cases(self) -> list[str]:
        return list(dict.fromkeys(s.case for s in self.series))


# ---------------------------------------------------------------------------------------------
# reading


def _parse_time(text: Any) -> datetime | None:
    try:
        moment = datetime.fromisoformat(str(text))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def read_night(path: Path) -> Night:
    """Every readable ``<case>/results.json`` of one report directory (unreadable ones become notes)."""
    results, files, notes = {}, {}, []
    for file in sorted(path.glob(f"*/{RESULTS}")):
        try:
            result = load_results(file)
        except SurgeryInputError as exc:
            notes.append(str(exc))
            continue
        results[result.case], files[result.case] = result, file
    times = [t for t in (_parse_time(r.provenance.get("created")) for r in results.values()) if t]
    if not times:  # no provenance time: the directory's own name (a dated directory), else its mtime
        try:
            times = [datetime.strptime(path.name[: len("2026-01-01T000000Z")], STAMP).replace(tzinfo=timezone.utc)]
        except ValueError:
            times = [datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)]
    commits = Counter(r.provenance.get("git_commit") for r in results.values() if r.provenance.get("git_commit"))
    return Night(
        path=path,
        created=min(times),
        commit=commits.most_common(1)[0][0] if commits else None,
        results=results,
        files=files,
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------
# statistics


def finite(value: Any) -> float | None:
    """``value`` as a float, or ``None`` where it is not a finite number (missing, a string, NaN, inf)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _direction(name: str, exp: Any) -> str | None:
    rule = exp.details.get("rule") if isinstance(exp.details, dict) else None
    if isinstance(rule, dict) and rule.get("direction") in ("lower", "upper"):
        return rule["direction"]
    if isinstance(exp.calibration, dict) and exp.calibration.get("direction") in ("lower", "upper"):
        return exp.calibration["direction"]
    return "lower" if name.endswith("_min") else "upper" if name.endswith("_max") else None


def _doubled_midranks(values: list[float]) -> list[int]:
    """Twice the midrank of each value (integers, ties share their mean rank)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = i + j + 2  # 2 * mean of the 1-based ranks i+1 … j+1
        i = j + 1
    return ranks


def mann_whitney_u(x: list[float], y: list[float]) -> tuple[float, float]:
    """Mann–Whitney U of ``x`` against ``y`` and its two-sided p-value, exact under the permutation null.

    The null distribution of the rank sum is counted over all ways to choose ``len(x)`` of the pooled
    values (ties keep their midranks), so the p-value is exact with or without ties; ``2 * min(P(S <= s),
    P(S >= s))``, capped at 1 (scipy's ``method="exact"`` convention). Pools of more than
    :data:`MAX_EXACT` values use the normal approximation with tie and continuity corrections.
    """
    n, m = len(x), len(y)
    pooled = list(x) + list(y)
    ranks = _doubled_midranks(pooled)
    observed = sum(ranks[:n])
    u = observed / 2 - n * (n + 1) / 2
    if n + m > MAX_EXACT:
        counts = Counter(pooled).values()
        total = n + m
        var = n * m / 12 * ((total + 1) - sum(t**3 - t for t in counts) / (total * (total - 1)))
        if var <= 0:
            return u, 1.0
        z = (abs(u - n * m / 2) - 0.5) / math.sqrt(var)
        return u, min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2)))
    ways: list[Counter[int]] = [Counter({0: 1})] + [Counter() for _ in range(n)]
    for i, rank in enumerate(ranks):  # ways[c][s]: subsets of c of the values so far whose ranks sum to s
        for c in range(min(i, n - 1), -1, -1):
            for total_rank, count in ways[c].items():
                ways[c + 1][total_rank + rank] += count
    below = sum(w for s, w in ways[n].items() if s <= observed)
    above = sum(w for s, w in ways[n].items() if s >= observed)
    return u, min(1.0, 2 * min(below, above) / math.comb(n + m, n))


def drift_test(
    values: list[float], *, window: int = WINDOW, p_max: float = P_MAX, direction: str | None = None
) -> Drift:
    """Mann–Whitney U (two-sided) of the last ``window`` values against the ``window`` before them."""
    drift = Drift(window=window, p_max=p_max, runs=len(values))
    if len(values) < 2 * window:
        return drift
    earlier, recent = values[-2 * window : -window], values[-window:]
    drift.shift = statistics.median(recent) - statistics.median(earlier)
    if drift.shift != 0 and direction in ("lower", "upper"):
        drift.towards_threshold = (drift.shift < 0) == (direction == "lower")
    drift.u, drift.p = mann_whitney_u(recent, earlier)
    return drift


def _outside(value: float | None, band: tuple[float, float] | None) -> bool:
    if value is None or band is None:
        return False
    lo, hi = band
    tol = 1e-9 * max(1.0, abs(lo), abs(hi))
    return value < lo - tol or value > hi + tol


def build_series(nights: list[Night], *, window: int = WINDOW, p_max: float = P_MAX) -> list[Series]:
    """One series per case and expectation, in the order they first appear."""
    points: dict[tuple[str, str], list[Point]] = {}
    directions: dict[tuple[str, str], str | None] = {}
    for i, night in enumerate(nights):
        for case, result in night.results.items():
            for exp in result.expectations:
                key = (case, exp.name)
                observed = finite(exp.observed)
                band = calibrated_band(exp.calibration)
                points.setdefault(key, []).append(
                    Point(
                        night=i,
                        observed=observed,
                        threshold=finite(exp.threshold),
                        status=exp.status,
                        band=band,
                        outside=_outside(observed, band),
                        message=exp.message,
                    )
                )
                directions[key] = directions.get(key) or _direction(exp.name, exp)
    out = []
    for (case, name), pts in points.items():
        values = [p.observed for p in pts if p.observed is not None]
        out.append(
            Series(
                case=case,
                name=name,
                direction=directions[(case, name)],
                points=pts,
                drift=drift_test(values, window=window, p_max=p_max, direction=directions[(case, name)]),
            )
        )
    return out


def _watched(result: CaseResult) -> dict[str, str]:
    prov = result.provenance if isinstance(result.provenance, dict) else {}
    out = {k: str(prov[k]) for k in WATCHED if k in prov}
    weights = prov.get(WEIGHTS)
    if isinstance(weights, dict):
        out.update({f"weights {Path(str(p)).name}": str(d) for p, d in weights.items()})
    return out


def provenance_changes(nights: list[Night]) -> list[Change]:
    """Per case, the watched provenance fields that differ from the case's previous night."""
    changes: list[Change] = []
    previous: dict[str, dict[str, str]] = {}
    for i, night in enumerate(nights):
        for case, result in night.results.items():
            now = _watched(result)
            before = previous.get(case)
            if before is not None:
                for key in sorted(before.keys() | now.keys()):
                    if before.get(key) != now.get(key):
                        changes.append(
                            Change(night=i, case=case, key=key, before=before.get(key, "—"), after=now.get(key, "—"))
                        )
            previous[case] = now
    return changes


def read_history(dirs: list[str | Path], *, window: int = WINDOW, p_max: float = P_MAX) -> History:
    """The history of the report directories named by ``dirs`` (nights, or parents holding one per night)."""
    if window < 2:
        raise SurgeryInputError(f"--window: got {window}; the rank test needs at least 2 runs a side")
    if not 0 < p_max < 1:
        raise SurgeryInputError(f"--p: got {p_max}; expected a p-value threshold in (0, 1), e.g. {P_MAX}")
    nights = sorted(
        (read_night(p) for p in find_nights(dirs)),
        key=lambda n: (n.created or datetime.min.replace(tzinfo=timezone.utc), n.label),
    )
    return History(
        nights=nights,
        series=build_series(nights, window=window, p_max=p_max),
        changes=provenance_changes(nights),
        window=window,
        p_max=p_max,
    )
