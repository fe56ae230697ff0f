"""surgery.checks.activations: streamed statistics equal the stored-activation ones, drift equals scipy."""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.models import resnet18

from surgery.checks.activations import (
    DRIFT_COLUMNS,
    LayerStats,
    _Histogram,
    drift,
    drift_table,
    ks_statistic,
    probe_activations,
    psi,
    resolve_layers,
    shared_edges,
    wasserstein_1d,
)
from surgery.errors import SurgeryInputError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """NOTE: on shared, busy cores torch's 2 OpenMP threads spin against each other (~40x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return resnet18(num_classes=10).eval()


def _inputs(n: int, seed: int = 1, shape=(3, 32, 32)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g)


def _identity_model() -> nn.Module:
    return nn.Sequential(OrderedDict(act=nn.Identity()))


def _stored(model: nn.Module, inputs: torch.Tensor, names: list[str], batch_size: int) -> dict[str, list[list[torch.Tensor]]]:
    """Every output of every call of each layer, cloned (in-place ReLUs later overwrite BN outputs)."""
    modules = dict(model.named_modules())
    out: dict[str, list[list[torch.Tensor]]] = {n: [] for n in names}   # [batch][call]
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: out[n][-1].append(o.detach().clone()))
               for n in names]
    try:
        with torch.inference_mode():
            for s in range(0, inputs.shape[0], batch_size):
                for n in names:
                    out[n].append([])
                model(inputs[s:s + batch_size])
    finally:
        for h in handles:
            h.remove()
    return out


# ----------------------------------------------------------------------------- streamed statistics

def test_streamed_stats_equal_stored_activations():
    model, x = _resnet(), _inputs(70)  # batches of 32, 32, 6
    names = ["relu", "layer1.0.relu", "layer2.0.bn1", "layer3", "fc"]
    stats = probe_activations(model, x, names, batch_size=32, reservoir_size=512)
    stored = _stored(model, x, names, batch_size=32)
    assert list(stats) == ["relu", "layer1.0.relu", "layer2.0.bn1", "layer3", "fc"]
    for name in names:
        s = stats[name]
        calls = len(stored[name][0])
        full = torch.cat([t.reshape(-1) for batch in stored[name] for t in batch]).double()
        assert s.count == full.numel()
        assert s.calls == calls
        assert s.mean == pytest.approx(full.mean().item(), rel=1e-4, abs=1e-6)
        assert s.std == pytest.approx(full.std(unbiased=False).item(), rel=1e-4)
        assert s.min == full.min().item() and s.max == full.max().item()
        assert s.near_zero_frac == (full.abs() <= s.near_zero_eps).double().mean().item()
        # dead channels, per call ordinal, concatenated
        alive = torch.cat([torch.stack([batch[c].amax(dim=[d for d in range(batch[c].dim()) if d != 1]) > 0
                                        for batch in stored[name]]).any(0) for c in range(calls)])
        assert s.channels == alive.numel()
        assert s.dead_channels == (~alive).nonzero().flatten().tolist()
        assert s.dead_channel_frac == pytest.approx((~alive).double().mean().item())
        assert s.shape == list(stored[name][0][0].shape[1:])
        # histogram: exact counts on bins that cover [min, max]
        assert s.hist_counts.numel() == 40 and s.hist_edges.numel() == 41
        assert int(s.hist_counts.sum()) == s.count
        assert s.hist_edges[0] <= s.min and s.hist_edges[-1] >= s.max
        np.testing.assert_array_equal(s.hist_counts.numpy(), np.histogram(full.numpy(), s.hist_edges.numpy())[0])
        # reservoir: real values of the layer
        assert s.reservoir.numel() == 512
        assert np.isin(s.reservoir.numpy(), full.float().numpy()).all()
    assert stats["relu"].near_zero_frac > 0.3 and stats["relu"].min == 0.0
    assert stats["layer2.0.bn1"].min < 0  # seen before the in-place ReLU that follows it
    assert stats["layer1.0.relu"].calls == 2 and stats["layer1.0.relu"].channels == 128


def test_given_edges_count_everything_and_clamp_to_end_bins():
    ref_model, pat_model, x = _resnet(0), _resnet(1), _inputs(40)
    ref = probe_activations(ref_model, x, ["layer1", "layer2"], batch_size=16)
    pat = probe_activations(pat_model, x, ["layer1", "layer2"], batch_size=16, edges=shared_edges(ref))
    same = probe_activations(pat_model, x, ["layer1", "layer2"], batch_size=16, edges=ref)  # LayerStats work too
    stored = _stored(pat_model, x, ["layer1", "layer2"], batch_size=16)
    for name in ["layer1", "layer2"]:
        p = pat[name]
        assert torch.equal(p.hist_edges, ref[name].hist_edges)
        assert torch.equal(p.hist_counts, same[name].hist_counts)
        assert int(p.hist_counts.sum()) == p.count
        full = torch.cat([t.reshape(-1) for b in stored[name] for t in b]).double().numpy()
        e = p.hist_edges.numpy()
        expected = np.histogram(np.clip(full, e[0], e[-1]), e)[0]
        np.testing.assert_array_equal(p.hist_counts.numpy(), expected)
    with pytest.raises(ValueError, match="no histogram edges given for layer 'layer3'"):
        probe_activations(pat_model, x, ["layer3"], edges=ref)


def test_adaptive_histogram_follows_a_growing_range():
    x = torch.cat([torch.rand(64, 4), torch.rand(64, 4) * 150 - 50, torch.full((64, 4), 1e3)])
    s = probe_activations(_identity_model(), x, ["act"], batch_size=64, bins=30)["act"]
    assert s.hist_counts.numel() == 30 and int(s.hist_counts.sum()) == s.count == x.numel()
    e = s.hist_edges.numpy()
    assert e[0] <= x.min() and e[-1] >= x.max()
    assert e[-1] - e[0] <= (s.max - s.min) * (1 + 3 / 30)
    np.testing.assert_array_equal(s.hist_counts.numpy(), np.histogram(x.double().numpy(), e)[0])


def test_chunked_batches_give_the_same_statistics(monkeypatch):
    import surgery.checks.activations as act

    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(5)) * 3 + 1
    whole = probe_activations(_identity_model(), x, ["act"], batch_size=128)["act"]
    monkeypatch.setattr(act, "_CHUNK", 97)  # a batch of 1024 values is handled in 11 chunks
    chunked = probe_activations(_identity_model(), x, ["act"], batch_size=128)["act"]
    assert (chunked.count, chunked.min, chunked.max) == (whole.count, whole.min, whole.max)
    assert chunked.mean == pytest.approx(whole.mean, rel=1e-12) and chunked.std == pytest.approx(whole.std, rel=1e-12)
    # the edges may differ (the first chunk seeds the grid), the counts are exact on either
    for s in (whole, chunked):
        np.testing.assert_array_equal(s.hist_counts.numpy(), np.histogram(x.double().numpy(), s.hist_edges.numpy())[0])
    assert chunked.reservoir.numel() == whole.reservoir.numel() == 2400


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(-1e4, 1e4), st.floats(0, 1e3), st.integers(1, 50)), min_size=1, max_size=6),
       st.integers(1, 50))
def test_histogram_counts_are_exact_for_any_batch_sequence(batches, bins):
    g = torch.Generator().manual_seed(0)
    hist, seen = _Histogram(bins, None, torch.device("cpu")), []
    for shift, scale, n in batches:
        x = (torch.rand(n, generator=g, dtype=torch.float64) * scale + shift).float().double()
        hist.add(x, float(x.min()), float(x.max()))
        seen.append(x)
    counts, edges = hist.finish()
    full = torch.cat(seen).numpy()
    assert counts.numel() == bins and edges.numel() == bins + 1
    assert edges[0] <= full.min() and edges[-1] >= full.max()
    np.testing.assert_array_equal(counts.numpy(), np.histogram(full, edges.numpy())[0])


def test_reservoir_size_determinism_and_small_probes():
    model, x = _resnet(), _inputs(24)
    a = probe_activations(model, x, ["layer2", "fc"], batch_size=10, reservoir_size=300, seed=3)
    b = probe_activations(model, x, ["layer2", "fc"], batch_size=10, reservoir_size=300, seed=3)
    c = probe_activations(model, x, ["layer2", "fc"], batch_size=10, reservoir_size=300, seed=4)
    assert a["layer2"].count >= 300 and a["layer2"].reservoir.numel() == 300
    assert torch.equal(a["layer2"].reservoir, b["layer2"].reservoir)
    assert not torch.equal(a["layer2"].reservoir, c["layer2"].reservoir)
    # fc gives 24 * 10 = 240 < 300 values: all of them are kept
    fc = a["fc"]
    assert fc.count == 240 and fc.reservoir.numel() == 240
    with torch.inference_mode():
        logits = torch.cat([model(x[:10]), model(x[10:20]), model(x[20:])]).reshape(-1)  # same batches
    assert torch.equal(fc.reservoir.sort().values, logits.sort().values)


def test_reservoir_is_uniform_over_the_stream():
    # Values 0..N-1 streamed in order: a uniform sample has no bias towards early or late batches.
    n, k = 60_000, 2_000
    x = torch.arange(n, dtype=torch.float32).reshape(-1, 1)
    s = probe_activations(_identity_model(), x, ["act"], batch_size=7_000, reservoir_size=k)["act"]
    r = s.reservoir.numpy()
    assert r.size == k and np.unique(r).size == k  # without replacement
    assert scipy.stats.kstest(r / n, "uniform").pvalue > 1e-3
    assert abs((r < n / 2).mean() - 0.5) < 0.05


def test_memory_bounded_stored_sizes_do_not_grow_with_probe_size():
    model, names = _resnet(), ["layer1", "layer1.0.relu", "fc"]
    small = probe_activations(model, _inputs(8), names, batch_size=8, reservoir_size=64)
    large = probe_activations(model, _inputs(64), names, batch_size=8, reservoir_size=64)
    for name in names:
        assert large[name].count == 8 * small[name].count
        for field in ("reservoir", "hist_counts", "hist_edges"):
            assert getattr(large[name], field).shape == getattr(small[name], field).shape, (name, field)
        assert len(large[name].dead_channels) <= large[name].channels == small[name].channels


# ----------------------------------------------------------------------------- dead channels, outputs, hooks

def test_dead_channel_forced_by_bn_bias():
    model, x, names = _resnet(), _inputs(16), ["relu", "layer1.0.relu"]
    before = probe_activations(model, x, names, batch_size=8)
    with torch.no_grad():
        model.bn1.bias[3] = -1e4
        model.layer1[0].bn1.bias[5] = -1e4  # layer1.0.relu: call 0 follows bn1, call 1 follows the residual add
    after = probe_activations(model, x, names, batch_size=8)
    assert 3 not in before["relu"].dead_channels and after["relu"].dead_channels == [3]
    assert after["relu"].dead_channel_frac == pytest.approx(1 / 64)
    # some channels of a random-init network never fire anyway: the forced one is added to them
    assert 5 not in before["layer1.0.relu"].dead_channels
    assert after["layer1.0.relu"].dead_channels == sorted({5, *before["layer1.0.relu"].dead_channels})
    assert after["layer1.0.relu"].channels == 128 and after["layer1.0.relu"].calls == 2


class _TupleOut(nn.Module):
    def forward(self, x):
        return (x * 2.0, "meta")


class _Bf16(nn.Module):
    def forward(self, x):
        return x.to(torch.bfloat16)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.pair, self.bf16, self.unused = _TupleOut(), _Bf16(), nn.Linear(2, 2)

    def forward(self, x):
        return self.bf16(self.pair(x)[0])


def test_tuple_and_bf16_outputs_and_unused_layers():
    x = _inputs(10, shape=(4,))
    net = _Net()
    s = probe_activations(net, x, ["pair", "bf16"], batch_size=4)
    assert s["pair"].mean == pytest.approx((2 * x).double().mean().item(), rel=1e-5)
    assert s["bf16"].count == 40 and s["bf16"].reservoir.dtype == torch.float32
    with pytest.raises(SurgeryInputError, match="'unused' was not called"):
        probe_activations(net, x, ["unused"])


def test_nonfinite_values_are_counted_apart():
    x = torch.tensor([[1.0, float("nan")], [float("inf"), -2.0]])
    s = probe_activations(_identity_model(), x, ["act"])["act"]
    assert s.nonfinite == 2 and s.count == 2 and s.mean == -0.5 and int(s.hist_counts.sum()) == 2
    nan = probe_activations(_identity_model(), torch.full((3, 2), float("nan")), ["act"])["act"]
    assert nan.nonfinite == 6 and nan.count == 0 and math.isnan(nan.mean) and nan.dead_channel_frac == 1.0
    assert int(nan.hist_counts.sum()) == 0 and nan.reservoir.numel() == 0


def test_hooks_removed_and_modes_restored_even_on_error():
    model = _resnet().train()
    model.layer1.eval()  # a frozen stage stays frozen

    class Boom(Exception):
        pass

    def explode(*args):
        raise Boom

    h = model.layer3.register_forward_hook(explode)
    with pytest.raises(Boom):
        probe_activations(model, _inputs(4), ["layer1", "layer2"])
    h.remove()
    assert all(not m._forward_hooks for m in model.modules())
    assert model.training and not model.layer1.training and model.layer2.training


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
    model = _identity_model()
    ref = probe_activations(model, base, ["act"], batch_size=4096)
    same = probe_activations(model, base, ["act"], batch_size=4096, edges=ref)
    shifted = probe_activations(model, base + 2.0, ["act"], batch_size=4096, edges=ref)  # + 1 std
    d0 = drift(ref["act"], same["act"])
    assert d0["wasserstein_norm"] == 0 and d0["ks"] == 0 and d0["psi"] == pytest.approx(0, abs=1e-12)
    assert d0["psi_basis"] == "histogram"
    d1 = drift(ref["act"], shifted["act"])
    assert d1["wasserstein_norm"] == pytest.approx(1.0, abs=0.08)
    assert 0.33 < d1["ks"] < 0.43          # 2 * Phi(0.5) - 1 = 0.383
    assert d1["psi"] > 0.5                 # ~ shift^2 / var = 1 for two normals
    # other random draws of the same distribution: small drift
    other = probe_activations(model, torch.randn(20_000, 1, generator=g) * 2.0 + 3.0, ["act"], edges=ref)
    assert drift(ref["act"], other["act"])["wasserstein_norm"] < 0.1


def test_psi_and_degenerate_reference():
    assert psi(torch.tensor([10, 0, 5]), torch.tensor([10, 0, 5])) == 0
    assert psi([10, 0, 0], [0, 0, 10]) > 5
    with pytest.raises(ValueError, match="same bins"):
        psi([1, 2], [1, 2, 3])
    model = _identity_model()
    zeros = probe_activations(model, torch.zeros(100, 2), ["act"])
    ones = probe_activations(model, torch.ones(100, 2), ["act"], edges=zeros)
    d = drift(zeros["act"], ones["act"])
    assert zeros["act"].std == 0 and d["wasserstein_norm"] == pytest.approx(1 / 1e-3)  # Evidently's 0.001 floor
    assert int(ones["act"].hist_counts[-1]) == 200  # clamped into the last bin
    # histograms on different edges: PSI falls back to the reservoirs, and says so
    own = probe_activations(model, torch.ones(100, 2), ["act"])
    assert drift(zeros["act"], own["act"])["psi_basis"] == "reservoir"


def test_drift_table_rows_and_columns():
    ref_model, pat_model, x = _resnet(0), _resnet(0), _inputs(16)
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


def test_to_dict_is_json_and_round_trips():
    s = probe_activations(_resnet(), _inputs(4), ["layer4"], reservoir_size=32)["layer4"]
    assert not any(t.is_inference() for t in (s.reservoir, s.hist_counts, s.hist_edges))  # usable anywhere
    d = json.loads(json.dumps(s.to_dict()))
    back = LayerStats.from_dict(d)
    assert back.count == s.count and back.mean == s.mean and back.dead_channels == s.dead_channels
    assert torch.equal(back.hist_counts, s.hist_counts) and torch.equal(back.hist_edges, s.hist_edges)
    assert torch.equal(back.reservoir, s.reservoir)
    assert "reservoir" not in s.to_dict(reservoir=False)


# ----------------------------------------------------------------------------- layer names

def test_resolve_layers_globs_and_unknown_names():
    model = _resnet()
    stages = resolve_layers(model, ["layer?"])
    assert stages == ["layer1", "layer2", "layer3", "layer4"]
    deep = resolve_layers(model, ["layer*"])
    assert deep[:3] == ["layer1", "layer1.0", "layer1.0.conv1"] and "layer4.1.bn2" in deep and "conv1" not in deep
    assert resolve_layers(model, ["fc", "conv1", "fc"]) == ["conv1", "fc"]  # model order, no duplicates
    assert resolve_layers(model, "fc") == ["fc"]
    with pytest.raises(SurgeryInputError) as err:
        resolve_layers(model, ["layer1", "layer5"])
    msg = str(err.value)
    assert "'layer5'" in msg and "layer1" in msg and "\n" not in msg
    with pytest.raises(SurgeryInputError, match="top-level modules: conv1"):
        resolve_layers(model, ["zzzzzz*"])
