"""Drift metrics (surgery.stats.drift): W1, KS and PSI against scipy and numpy, on probe samples too."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from surgery.stats.drift import DRIFT_COLUMNS, drift, drift_table, ks_statistic, psi, wasserstein_1d
from surgery.stats.activation_probe import probe_activations
from probe_helpers import identity_model, one_thread, resnet, seeded_inputs  # noqa: F401 (one_thread: autouse)


# ----------------------------------------------------------------------------- drift metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_w1_and_ks_equal_scipy(seed):
    rng = np.random.default_rng(seed)
    u = rng.normal(0, 1, 1500)
    v = rng.standard_t(3, 1100) * 1.3 + 0.2
    if seed == 2:  # ties inside and across samples
        u, v = np.round(u, 1), np.round(v, 1)
    assert wasserstein_1d(u, v) == pytest.approx(scipy.stats.wasserstein_distance(u, v), rel=1e-6)
    assert ks_statistic(u, v) == pytest.approx(scipy.stats.ks_2samp(u, v).statistic, rel=1e-6)
    tu, tv = torch.from_numpy(u).float(), torch.from_numpy(v).float()
    uf, vf = tu.double().numpy(), tv.double().numpy()
    assert wasserstein_1d(tu, tv) == pytest.approx(scipy.stats.wasserstein_distance(uf, vf), rel=1e-6)
    assert ks_statistic(tu, tv) == pytest.approx(scipy.stats.ks_2samp(uf, vf).statistic, rel=1e-6)


def test_drift_identical_is_zero_and_shift_by_one_std_is_one():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(20_000, 1, generator=g) * 2.0 + 3.0
    model = identity_model()
    ref = probe_activations(model, base, ["act"], batch_size=4096)
    same = probe_activations(model, base, ["act"], batch_size=4096, edges=ref)
    shifted = probe_activations(model, base + 2.0, ["act"], batch_size=4096, edges=ref)  # + 1 std
    d0 = drift(ref["act"], same["act"])
    assert d0["wasserstein_norm"] == 0 and d0["ks"] == 0 and d0["psi"] == pytest.approx(0, abs=1e-12)
    assert d0["psi_basis"] == "histogram"
    d1 = drift(ref["act"], shifted["act"])
    assert d1["wasserstein_norm"] == pytest.approx(1.0, abs=0.08)
    assert 0.33 < d1["ks"] < 0.43  # 2 * Phi(0.5) - 1 = 0.383
    assert d1["psi"] > 0.5  # ~ shift^2 / var = 1 for two normals
    # other random draws of the same distribution: small drift
    other = probe_activations(model, torch.randn(20_000, 1, generator=g) * 2.0 + 3.0, ["act"], edges=ref)
    assert drift(ref["act"], other["act"])["wasserstein_norm"] < 0.1


def test_psi_and_degenerate_reference():
    assert psi(torch.tensor([10, 0, 5]), torch.tensor([10, 0, 5])) == 0
    assert psi([10, 0, 0], [0, 0, 10]) > 5
    with pytest.raises(ValueError, match="same bins"):
        psi([1, 2], [1, 2, 3])
    model = identity_model()
    zeros = probe_activations(model, torch.zeros(100, 2), ["act"])
    ones = probe_activations(model, torch.ones(100, 2), ["act"], edges=zeros)
    d = drift(zeros["act"], ones["act"])
    assert zeros["act"].std == 0 and d["wasserstein_norm"] == pytest.approx(1 / 1e-3)  # Evidently's 0.001 floor
    assert int(ones["act"].hist_counts[-1]) == 200  # clamped into the last bin
    # histograms on different edges: PSI falls back to the samples, and says so
    own = probe_activations(model, torch.ones(100, 2), ["act"])
    assert drift(zeros["act"], own["act"])["psi_basis"] == "sample"


def test_drift_table_rows_and_columns():
    ref_model, pat_model, x = resnet(0), resnet(0), seeded_inputs(16)
    with torch.no_grad():
        pat_model.layer1[1].bn2.bias.fill_(-1e4)  # layer1 output = relu(bn2 + identity): becomes mostly dead
    names = ["layer1", "layer2"]
    ref = probe_activations(ref_model, x, names, batch_size=8)
    pat = probe_activations(pat_model, x, names, batch_size=8, edges=ref)
    table = drift_table(ref, pat)
    assert list(table.columns) == DRIFT_COLUMNS and list(table["layer"]) == names
    row = table.set_index("layer").loc["layer1"]
    assert row["w1_norm"] > 0.1 and row["ref_mean"] == ref["layer1"].mean and row["pat_std"] == pat["layer1"].std
    assert row["dead_channel_frac"] == pat["layer1"].dead_channel_frac
    with pytest.raises(ValueError, match="missing in patient"):
        drift_table(ref, {"layer1": pat["layer1"]})


def test_streamed_drift_agrees_with_scipy_on_the_probe_samples():
    # Item 3 of the probe issue: W1, KS and PSI from the streamed summaries against scipy/numpy on the
    # same samples. Tolerance: 1e-9 relative (both sides compute in float64 on identical values).
    x = torch.randn(96, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ref = probe_activations(resnet(0), x, ["layer1", "layer3"], batch_size=40)
    pat = probe_activations(resnet(1), x, ["layer1", "layer3"], batch_size=40, edges=ref)
    for name in ["layer1", "layer3"]:
        r, p = ref[name], pat[name]
        u, v = r.sample.double().numpy(), p.sample.double().numpy()
        d = drift(r, p)
        assert d["wasserstein"] == pytest.approx(scipy.stats.wasserstein_distance(u, v), rel=1e-9)
        assert d["wasserstein_norm"] == pytest.approx(d["wasserstein"] / r.std, rel=1e-12)
        assert d["ks"] == pytest.approx(scipy.stats.ks_2samp(u, v).statistic, rel=1e-9)
        e = r.hist_edges.numpy()
        share_r = np.histogram(u, e)[0] / u.size
        share_p = np.histogram(np.clip(v, e[0], e[-1]), e)[0] / v.size
        share_r, share_p = np.where(share_r == 0, 1e-4, share_r), np.where(share_p == 0, 1e-4, share_p)
        assert d["psi"] == pytest.approx(np.sum((share_r - share_p) * np.log(share_r / share_p)), rel=1e-9)
