"""Drift between two probes of the same layers: W1, KS and PSI per layer.

Drift between a reference model and a patient (the model after surgery, or after fine-tune)
is measured per layer on the probe's summaries (``surgery.stats.activation_probe.LayerStats``):

- ``wasserstein_norm``: W1 between the two uniform samples divided by the reference's exact
  std (Evidently's default drift test for numerical data, threshold 0.1);
- ``ks``: the two-sample Kolmogorov–Smirnov statistic on the samples;
- ``psi``: population stability index on histogram bins shared by both models.

W1 and KS agree with ``scipy.stats.wasserstein_distance`` and ``ks_2samp`` on the same samples
(tested); the samples are uniform draws of ``surgery.stats.activation_probe.SAMPLE_SIZE`` values per layer, so
the figures are estimates of the full-population distances with that sampling error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from surgery.stats.activation_probe import LayerStats, histogram

__all__ = ["PSI_EPS", "W1_NORM_FLOOR", "wasserstein_1d", "ks_statistic", "psi", "drift", "drift_table", "DRIFT_COLUMNS"]

# Evidently's conventions: the W1 normaliser is max(std(reference), 0.001), and empty histogram
# bins get a share of 0.0001 in the PSI so the logarithm stays finite.
W1_NORM_FLOOR = 1e-3
PSI_EPS = 1e-4


def _sorted(x: Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    return np.sort(np.asarray(x, dtype=np.float64).ravel())


def wasserstein_1d(u: Tensor | np.ndarray, v: Tensor | np.ndarray) -> float:
    """W1 between two empirical samples: the integral of |F_u - F_v| (``scipy.stats.wasserstein_distance``)."""
    u, v = _sorted(u), _sorted(v)
    if u.size == 0 or v.size == 0:
        return math.nan
    values = np.sort(np.concatenate([u, v]))
    deltas = np.diff(values)
    cdf_u = np.searchsorted(u, values[:-1], side="right") / u.size
    cdf_v = np.searchsorted(v, values[:-1], side="right") / v.size
    return float(np.sum(np.abs(cdf_u - cdf_v) * deltas))


def ks_statistic(u: Tensor | np.ndarray, v: Tensor | np.ndarray) -> float:
    """Two-sample KS statistic sup |F_u - F_v| (``scipy.stats.ks_2samp(u, v).statistic``)."""
    u, v = _sorted(u), _sorted(v)
    if u.size == 0 or v.size == 0:
        return math.nan
    values = np.concatenate([u, v])
    cdf_u = np.searchsorted(u, values, side="right") / u.size
    cdf_v = np.searchsorted(v, values, side="right") / v.size
    return float(np.max(np.abs(cdf_u - cdf_v)))


def psi(reference_counts: Tensor | np.ndarray, patient_counts: Tensor | np.ndarray, *, eps: float = PSI_EPS) -> float:
    """Population stability index sum((p - q) * ln(p / q)) over bins shared by both counts.

    Shares of 0 are replaced by ``eps`` (Evidently's 0.0001) so empty bins stay finite.
    """
    p = np.asarray(torch.as_tensor(reference_counts).cpu().double().numpy(), dtype=np.float64)
    q = np.asarray(torch.as_tensor(patient_counts).cpu().double().numpy(), dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"PSI needs counts on the same bins, got {p.size} and {q.size} bins")
    if p.sum() <= 0 or q.sum() <= 0:
        return math.nan
    p, q = p / p.sum(), q / q.sum()
    p, q = np.where(p == 0, eps, p), np.where(q == 0, eps, q)
    return float(np.sum((p - q) * np.log(p / q)))


def drift(reference: LayerStats, patient: LayerStats) -> dict[str, Any]:
    """Drift of one layer from ``reference`` to ``patient``.

    Returns ``layer``, ``wasserstein`` (raw W1 on the samples), ``wasserstein_norm`` (W1 /
    max(reference std, 0.001), the std being the reference's exact streamed std), ``ks``,
    ``psi`` and ``psi_basis``: ``"histogram"`` when both were counted on the same edges (the
    convention), else ``"sample"``: both samples binned afresh on the reference's edges.
    """
    w1 = wasserstein_1d(reference.sample, patient.sample)
    norm = max(reference.std, W1_NORM_FLOOR) if math.isfinite(reference.std) else math.nan
    if reference.hist_edges.shape == patient.hist_edges.shape and torch.equal(reference.hist_edges, patient.hist_edges):
        value, basis = psi(reference.hist_counts, patient.hist_counts), "histogram"
    else:
        counts = [histogram(s.sample, reference.hist_edges) for s in (reference, patient)]
        value, basis = psi(*counts), "sample"
    return {
        "layer": reference.name,
        "wasserstein": w1,
        "wasserstein_norm": w1 / norm,
        "ks": ks_statistic(reference.sample, patient.sample),
        "psi": value,
        "psi_basis": basis,
    }


DRIFT_COLUMNS = ["layer", "w1_norm", "ks", "psi", "ref_mean", "ref_std", "pat_mean", "pat_std", "dead_channel_frac"]


def drift_table(reference: Mapping[str, LayerStats], patient: Mapping[str, LayerStats]) -> pd.DataFrame:
    """One row per layer of ``reference`` (in its order): drift metrics and both models' moments.

    ``dead_channel_frac`` is the patient's. Both mappings must hold the same layers.
    """
    missing = [n for n in reference if n not in patient]
    extra = [n for n in patient if n not in reference]
    if missing or extra:
        raise ValueError(
            f"reference and patient probe different layers: missing in patient {missing}, only in patient {extra}"
        )
    rows = []
    for name, ref in reference.items():
        pat = patient[name]
        d = drift(ref, pat)
        rows.append(
            {
                "layer": name,
                "w1_norm": d["wasserstein_norm"],
                "ks": d["ks"],
                "psi": d["psi"],
                "ref_mean": ref.mean,
                "ref_std": ref.std,
                "pat_mean": pat.mean,
                "pat_std": pat.std,
                "dead_channel_frac": pat.dead_channel_frac,
            }
        )
    return pd.DataFrame(rows, columns=DRIFT_COLUMNS)
