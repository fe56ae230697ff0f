"""The probe (surgery.stats.activation_probe):
streamed statistics against every value stored, the sample, hooks, CUDA."""

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

from surgery.errors import SurgeryInputError
from surgery.stats.activation_probe import (
    LayerStats,
    ProbePass,
    ProbeStats,
    histogram,
    probe_activations,
    resolve_layers,
    shared_edges,
)
from probe_helpers import identity_model, one_thread, resnet, seeded_inputs, stored_outputs  # noqa: F401 (one_thread: autouse)


# ----------------------------------------------------------------------------- streamed statistics


def test_streamed_stats_equal_stored_activations():
    model, x = resnet(), seeded_inputs(70)  # batches of 32, 32, 6
    names = ["relu", "layer1.0.relu", "layer2.0.bn1", "layer3", "fc"]
    stats = probe_activations(model, x, names, batch_size=32, sample_size=512)
    stored = stored_outputs(model, x, names, batch_size=32)
    assert list(stats) == ["relu", "layer1.0.relu", "layer2.0.bn1", "layer3", "fc"]
    for name in names:
        s = stats[name]
        calls = len(stored[name][0])
        full = torch.cat([t.reshape(-1) for batch in stored[name] for t in batch]).double()
        assert s.count == full.numel()
        assert s.calls == calls
        # float32 per call, float64 across calls: within 1e-6 of float64 numpy on the same values
        assert s.mean == pytest.approx(full.numpy().mean(), rel=1e-6, abs=1e-7)
        assert s.std == pytest.approx(full.numpy().std(), rel=1e-6)
        assert s.min == full.min().item() and s.max == full.max().item()
        assert s.near_zero_frac == (full.abs() <= s.near_zero_eps).double().mean().item()
        # dead channels, per call ordinal, concatenated
        alive = torch.cat(
            [
                torch.stack(
                    [batch[c].amax(dim=[d for d in range(batch[c].dim()) if d != 1]) > 0 for batch in stored[name]]
                ).any(0)
                for c in range(calls)
            ]
        )
        assert s.channels == alive.numel()
        assert s.dead_channels == (~alive).nonzero().flatten().tolist()
        assert s.dead_channel_frac == pytest.approx((~alive).double().mean().item())
        assert s.shape == list(stored[name][0][0].shape[1:])
        # sample: real values of the layer, without replacement
        assert s.sample.numel() == min(512, s.count)
        assert np.isin(s.sample.numpy(), full.float().numpy()).all()
        # histogram: the sample counted on equal-width bins over the exact [min, max]
        assert s.hist_counts.numel() == 40 and s.hist_edges.numel() == 41
        np.testing.assert_allclose(s.hist_edges.numpy(), np.linspace(s.min, s.max, 41))
        np.testing.assert_array_equal(
            s.hist_counts.numpy(), np.histogram(s.sample.double().numpy(), s.hist_edges.numpy())[0]
        )
    assert stats["relu"].near_zero_frac > 0.3 and stats["relu"].min == 0.0
    assert stats["layer2.0.bn1"].min < 0  # seen before the in-place ReLU that follows it
    assert stats["layer1.0.relu"].calls == 2 and stats["layer1.0.relu"].channels == 128


def test_given_edges_count_the_sample_and_clamp_to_end_bins():
    ref_model, pat_model, x = resnet(0), resnet(1), seeded_inputs(40)
    ref = probe_activations(ref_model, x, ["layer1", "layer2"], batch_size=16)
    pat = probe_activations(pat_model, x, ["layer1", "layer2"], batch_size=16, edges=shared_edges(ref))
    same = probe_activations(pat_model, x, ["layer1", "layer2"], batch_size=16, edges=ref)  # LayerStats work too
    for name in ["layer1", "layer2"]:
        p = pat[name]
        assert torch.equal(p.hist_edges, ref[name].hist_edges)
        assert torch.equal(p.hist_counts, same[name].hist_counts)
        assert int(p.hist_counts.sum()) == p.sample.numel()
        e = p.hist_edges.numpy()
        expected = np.histogram(np.clip(p.sample.double().numpy(), e[0], e[-1]), e)[0]
        np.testing.assert_array_equal(p.hist_counts.numpy(), expected)
    with pytest.raises(ValueError, match="no histogram edges given for layer 'layer3'"):
        probe_activations(pat_model, x, ["layer3"], edges=ref)


def test_batching_does_not_change_the_statistics():
    # The sample's positions are drawn among all values up front, so any batching keeps the same values.
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(5)) * 3 + 1
    whole = probe_activations(identity_model(), x, ["act"], batch_size=300, sample_size=500)["act"]
    small = probe_activations(identity_model(), x, ["act"], batch_size=7, sample_size=500)["act"]
    assert (small.count, small.min, small.max, small.near_zero_frac) == (
        whole.count,
        whole.min,
        whole.max,
        whole.near_zero_frac,
    )
    assert small.mean == pytest.approx(whole.mean, rel=1e-6) and small.std == pytest.approx(whole.std, rel=1e-6)
    assert torch.equal(small.sample, whole.sample) and torch.equal(small.hist_counts, whole.hist_counts)


def test_a_channels_last_output_gives_the_statistics_of_its_contiguous_copy():
    # The harness's models run channels_last; the probe reads such outputs in memory order, and must
    # sample the same values and find the same dead channels as on the logical (N, C, H, W) order.
    x = torch.randn(300, 6, 5, 7, generator=torch.Generator().manual_seed(3)).relu()
    x[:, 2] = 0.0  # a dead channel
    x[:, 4, 1:] = -1.0
    layouts = {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last)}
    assert not layouts["channels_last"].is_contiguous()
    stats = {
        name: probe_activations(identity_model(), inputs, ["act"], batch_size=128, sample_size=900)["act"]
        for name, inputs in layouts.items()
    }
    logical, memory = stats["contiguous"], stats["channels_last"]
    assert torch.equal(memory.sample, logical.sample) and torch.equal(memory.hist_counts, logical.hist_counts)
    assert (memory.count, memory.min, memory.max, memory.near_zero_frac, memory.dead_channels) == (
        logical.count,
        logical.min,
        logical.max,
        logical.near_zero_frac,
        logical.dead_channels,
    ) and logical.dead_channels == [2]
    assert memory.mean == pytest.approx(logical.mean, rel=1e-6) and memory.std == pytest.approx(logical.std, rel=1e-6)


@pytest.mark.parametrize("offset", [0.0, 1e3, -1e5])
def test_moments_are_float64_accurate_far_from_zero(offset):
    # Two-pass float32 moments per call, merged in float64: no cancellation when |mean| >> std.
    x = (torch.randn(64, 4096, generator=torch.Generator().manual_seed(1)) + offset).float()
    s = probe_activations(identity_model(), x, ["act"], batch_size=5)["act"]
    values = x.double().numpy()
    assert s.mean == pytest.approx(values.mean(), rel=1e-9, abs=1e-6)
    assert s.std == pytest.approx(values.std(), rel=1e-6)
    # the masked path (taken when a batch holds NaN or inf, and always on CUDA) is as accurate
    x[3, 7] = float("nan")
    masked = probe_activations(identity_model(), x, ["act"], batch_size=5)["act"]
    finite = values[np.isfinite(x.numpy())]
    assert masked.nonfinite == 1 and masked.count == finite.size
    assert masked.mean == pytest.approx(finite.mean(), rel=1e-9, abs=1e-6)
    assert masked.std == pytest.approx(finite.std(), rel=1e-6)


@pytest.mark.parametrize("offset", [0.0, 3.8])
def test_one_read_moments_are_float64_accurate_over_millions_of_values(offset):
    # The CPU's one-read moments (sum and sum of squares) serve while |mean| <= 3.9 std: at the edge,
    # over calls of 4M values plus a tail that fills no row of squares, still within 1e-6 of float64.
    x = torch.randn(3, 4_194_304 + 77, generator=torch.Generator().manual_seed(2)) * 0.5 + offset * 0.5
    s = probe_activations(identity_model(), x, ["act"], batch_size=2)["act"]
    values = x.double().numpy()
    assert s.mean == pytest.approx(values.mean(), rel=1e-6, abs=1e-7)
    assert s.std == pytest.approx(values.std(), rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=200),
    st.integers(1, 50),
    st.floats(-100, 100),
    st.floats(0.01, 100),
)
def test_histogram_matches_numpy_with_end_bins(values, bins, start, width):
    edges = torch.tensor(start + width * np.arange(bins + 1), dtype=torch.float64)
    x = torch.tensor(values, dtype=torch.float32)
    e = edges.numpy()
    expected = np.histogram(np.clip(x.double().numpy(), e[0], e[-1]), e)[0]
    np.testing.assert_array_equal(histogram(x, edges).numpy(), expected)


def test_a_module_called_twice_is_sampled_in_proportion():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.Identity()

        def forward(self, x):
            return self.act(x), self.act(x[:, :1] + 1000.0)  # call 1: 4 values per sample, call 2: 1

    x = torch.rand(2000, 4, generator=torch.Generator().manual_seed(0))
    s = probe_activations(Twice(), x, ["act"], batch_size=300, sample_size=1000)["act"]
    assert s.calls == 2 and s.count == 10_000 and s.sample.numel() == 1000
    share_second = (s.sample >= 1000).double().mean().item()
    assert abs(share_second - 0.2) < 0.05  # hypergeometric: sd 0.011
    assert s.max >= 1000 and s.min < 1


def test_outputs_that_do_not_scale_with_the_batch_are_refused():
    class Constant(nn.Module):
        def forward(self, x):
            return torch.ones(3, 5)

    net = nn.Sequential(OrderedDict(const=Constant()))
    with pytest.raises(SurgeryInputError, match="does not scale with the batch"):
        probe_activations(net, torch.randn(8, 2), ["const"], batch_size=4)


def test_probe_pass_feeds_batches_and_is_public():
    model, x = resnet(), seeded_inputs(24)
    with ProbePass(model, ["layer3", "layer4"], total_samples=24) as probe:
        for batch in x.split(10):
            probe.feed(batch)
    stats = probe.finish()
    assert isinstance(stats, ProbeStats) and list(stats) == ["layer3", "layer4"]
    direct = probe_activations(model, x, ["layer3", "layer4"], batch_size=10)
    assert stats["layer4"].mean == direct["layer4"].mean and torch.equal(
        stats["layer4"].sample, direct["layer4"].sample
    )
    assert all(not m._forward_hooks for m in model.modules())
    assert set(stats.edges()) == {"layer3", "layer4"} and "sample" not in stats.to_dict()["layer3"]


def test_sample_size_determinism_and_small_probes():
    model, x = resnet(), seeded_inputs(24)
    a = probe_activations(model, x, ["layer2", "fc"], batch_size=10, sample_size=300, seed=3)
    b = probe_activations(model, x, ["layer2", "fc"], batch_size=10, sample_size=300, seed=3)
    c = probe_activations(model, x, ["layer2", "fc"], batch_size=10, sample_size=300, seed=4)
    assert a["layer2"].count >= 300 and a["layer2"].sample.numel() == 300
    assert torch.equal(a["layer2"].sample, b["layer2"].sample)
    assert not torch.equal(a["layer2"].sample, c["layer2"].sample)
    # fc gives 24 * 10 = 240 < 300 values: all of them are kept
    fc = a["fc"]
    assert fc.count == 240 and fc.sample.numel() == 240
    with torch.inference_mode():
        logits = torch.cat([model(x[:10]), model(x[10:20]), model(x[20:])]).reshape(-1)  # same batches
    assert torch.equal(fc.sample.sort().values, logits.sort().values)


def test_sample_is_uniform_over_the_stream():
    # Values 0..N-1 streamed in order: a uniform sample has no bias towards early or late batches.
    n, k = 60_000, 2_000
    x = torch.arange(n, dtype=torch.float32).reshape(-1, 1)
    s = probe_activations(identity_model(), x, ["act"], batch_size=7_000, sample_size=k)["act"]
    r = s.sample.numpy()
    assert r.size == k and np.unique(r).size == k  # without replacement
    assert scipy.stats.kstest(r / n, "uniform").pvalue > 1e-3
    assert abs((r < n / 2).mean() - 0.5) < 0.05


def test_memory_bounded_stored_sizes_do_not_grow_with_probe_size():
    model, names = resnet(), ["layer1", "layer1.0.relu", "fc"]
    small = probe_activations(model, seeded_inputs(8), names, batch_size=8, sample_size=64)
    large = probe_activations(model, seeded_inputs(64), names, batch_size=8, sample_size=64)
    for name in names:
        assert large[name].count == 8 * small[name].count
        for field in ("sample", "hist_counts", "hist_edges"):
            assert getattr(large[name], field).shape == getattr(small[name], field).shape, (name, field)
        assert len(large[name].dead_channels) <= large[name].channels == small[name].channels


# ----------------------------------------------------------------------------- dead channels, outputs, hooks


def test_dead_channel_forced_by_bn_bias():
    model, x, names = resnet(), seeded_inputs(16), ["relu", "layer1.0.relu"]
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
    x = seeded_inputs(10, shape=(4,))
    net = _Net()
    s = probe_activations(net, x, ["pair", "bf16"], batch_size=4)
    assert s["pair"].mean == pytest.approx((2 * x).double().mean().item(), rel=1e-5)
    assert s["bf16"].count == 40 and s["bf16"].sample.dtype == torch.float32
    with pytest.raises(SurgeryInputError, match="'unused' was not called"):
        probe_activations(net, x, ["unused"])


def test_nonfinite_values_are_counted_apart():
    x = torch.tensor([[1.0, float("nan")], [float("inf"), -2.0]])
    s = probe_activations(identity_model(), x, ["act"])["act"]
    assert s.nonfinite == 2 and s.count == 2 and s.mean == -0.5 and int(s.hist_counts.sum()) == 2
    nan = probe_activations(identity_model(), torch.full((3, 2), float("nan")), ["act"])["act"]
    assert nan.nonfinite == 6 and nan.count == 0 and math.isnan(nan.mean) and nan.dead_channel_frac == 1.0
    assert int(nan.hist_counts.sum()) == 0 and nan.sample.numel() == 0


def test_hooks_removed_and_modes_restored_even_on_error():
    model = resnet().train()
    model.layer1.eval()  # a frozen stage stays frozen

    class Boom(Exception):
        pass

    def explode(*args):
        raise Boom

    h = model.layer3.register_forward_hook(explode)
    with pytest.raises(Boom):
        probe_activations(model, seeded_inputs(4), ["layer1", "layer2"])
    h.remove()
    assert all(not m._forward_hooks for m in model.modules())
    assert model.training and not model.layer1.training and model.layer2.training


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_probe_never_synchronises_and_matches_the_cpu():
    model, x = resnet(), seeded_inputs(48)
    cpu = probe_activations(model, x, ["layer1", "layer4"], batch_size=16)
    with ProbePass(model, ["layer1", "layer4"], total_samples=48, device="cuda") as probe:
        first, *rest = x.split(16)
        probe.feed(first.pin_memory())  # draws the sample's positions and copies them over, once
        torch.cuda.set_sync_debug_mode("error")  # from then on, any host synchronisation while feeding raises
        try:
            for batch in rest:
                probe.feed(batch.pin_memory())
        finally:
            torch.cuda.set_sync_debug_mode("default")
    gpu = probe.finish()
    for name in ["layer1", "layer4"]:
        assert gpu[name].count == cpu[name].count and gpu[name].dead_channels == cpu[name].dead_channels
        assert gpu[name].mean == pytest.approx(cpu[name].mean, rel=1e-4, abs=1e-5)
        assert gpu[name].std == pytest.approx(cpu[name].std, rel=1e-4)
        assert gpu[name].sample.numel() == cpu[name].sample.numel()


# ----------------------------------------------------------------------------- layer names


def test_resolve_layers_globs_and_unknown_names():
    model = resnet()
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


def test_to_dict_is_json_and_round_trips():
    s = probe_activations(resnet(), seeded_inputs(4), ["layer4"], sample_size=32)["layer4"]
    assert not any(t.is_inference() for t in (s.sample, s.hist_counts, s.hist_edges))  # usable anywhere
    d = json.loads(json.dumps(s.to_dict()))
    back = LayerStats.from_dict(d)
    assert back.count == s.count and back.mean == s.mean and back.dead_channels == s.dead_channels
    assert torch.equal(back.hist_counts, s.hist_counts) and torch.equal(back.hist_edges, s.hist_edges)
    assert torch.equal(back.sample, s.sample)
    assert "sample" not in s.to_dict(sample=False)
