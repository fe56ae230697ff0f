"""Linear CKA (surgery.stats.cka): the streamed minibatch estimator against direct computations, and its invariances."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from surgery.case import parse_case
from surgery.stats.cka import CKAAccumulator, gram, hsic_unbiased, linear_cka
from surgery.stats.drift import drift
from surgery.running.prepare import Probes, build_source, load_data, perform_surgery
from surgery.stats.activation_probe import probe_activations


def _features(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _hsic_unbiased_numpy(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012), eq. 5, written out independently of the module (loops over the formula's terms)."""
    n = k.shape[0]
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    one = np.ones(n)
    return float(
        (
            np.trace(kt @ lt)
            + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ kt @ lt @ one)
        )
        / (n * (n - 3))
    )


def _minibatch_cka_numpy(x: np.ndarray, y: np.ndarray, batch: int) -> float:
    xy = xx = yy = 0.0
    for s in range(0, len(x), batch):
        k, l = x[s : s + batch] @ x[s : s + batch].T, y[s : s + batch] @ y[s : s + batch].T
        xy += _hsic_unbiased_numpy(k, l)
        xx += _hsic_unbiased_numpy(k, k)
        yy += _hsic_unbiased_numpy(l, l)
    return xy / np.sqrt(xx * yy)


def test_hsic_matches_the_written_out_formula():
    x, y = _features(12, 5, 0), _features(12, 7, 1)
    k, l = gram(x), gram(y)
    assert hsic_unbiased(k, l) == pytest.approx(_hsic_unbiased_numpy(k.numpy(), l.numpy()), rel=1e-12)
    with pytest.raises(ValueError, match="at least 4"):
        hsic_unbiased(k[:3, :3], l[:3, :3])


def test_streamed_estimate_matches_a_direct_computation():
    # Related representations: y is a noisy linear map of x.
    x = _features(240, 20, 2)
    y = x @ _features(20, 30, 3) + 0.5 * _features(240, 30, 4)
    for batch in (16, 50, 240):  # 240: one batch, the full-batch unbiased CKA
        streamed = linear_cka(x, y, batch_size=batch)
        assert streamed == pytest.approx(_minibatch_cka_numpy(x.numpy(), y.numpy(), batch), abs=1e-3)
    # minibatches are an estimate of the same quantity as the full batch: close on this data
    assert linear_cka(x, y, batch_size=40) == pytest.approx(linear_cka(x, y), abs=0.03)


def test_invariant_to_rotation_and_isotropic_scaling_and_one_with_itself():
    x = _features(128, 16, 5)
    q, _ = torch.linalg.qr(_features(16, 16, 6))
    assert linear_cka(x, x @ q, batch_size=32) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, 7.5 * x, batch_size=32) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, x, batch_size=32) == pytest.approx(1.0, abs=1e-12)
    y = _features(128, 9, 7)
    assert linear_cka(x, 3.0 * y, batch_size=32) == pytest.approx(linear_cka(x, y, batch_size=32), rel=1e-9)


def test_independent_features_give_cka_near_zero():
    x, y = _features(1024, 32, 8), _features(1024, 32, 9)
    assert abs(linear_cka(x, y, batch_size=64)) < 0.02
    assert linear_cka(x, x[:, :16] + 0.1 * y[:, :16], batch_size=64) > 0.5  # a related pair is far from it


def test_accumulator_pairs_every_row_with_every_column_and_skips_tiny_batches():
    x, y = _features(96, 8, 10), _features(96, 8, 11)
    acc = CKAAccumulator(["x", "y"], ["x", "y", "x2"])
    for s in range(0, 96, 32):
        gx, gy = gram(x[s : s + 32]), gram(y[s : s + 32])
        acc.update([gx, gy], [gx, gy, gram(2 * x[s : s + 32])])
    acc.update([gram(x[:3]), gram(y[:3])], [gram(x[:3])] * 3)  # 3 examples: no unbiased estimate, skipped
    m = acc.matrix()
    assert acc.batches == 3 and m.shape == (2, 3)
    assert m[0, 0] == pytest.approx(1.0) and m[0, 2] == pytest.approx(1.0) and m[1, 1] == pytest.approx(1.0)
    assert m[0, 1] == pytest.approx(m[1, 0]) == pytest.approx(linear_cka(x, y, batch_size=32), rel=1e-9)
    assert acc.value("y", "x2") == pytest.approx(float(m[1, 2]))


CASE = """\
name: joint-probe
data: {train: {name: digits, limit: 160}, image_size: 16, split_seed: 0}
source: {model: "torchvision:resnet18", num_classes: 10}
surgery: {op: transplant, target: {model: "torchvision:resnet18", num_classes: 10}, strategy: exact}
finetune: {steps: 0, batch_size: 16}
expect:
  activations: {layers: [layer2, layer4]}
"""


def test_joint_probe_pass_matches_separate_probes_and_its_layer_map():
    # The run's probe (surgery.running.prepare.Probes) runs the reference and every stage side by side on each
    # batch. Its figures must be those of separate probes, and its pair CKA the layer map's entry for
    # the same outputs (a ResNet stage's output is its last block's).
    torch.manual_seed(0)
    case = parse_case(CASE)
    split = load_data(case, 0)
    source, _ = build_source(case, split)
    patient, _ = perform_surgery(case, source, split)
    with torch.no_grad():
        patient.layer4[1].bn2.weight.mul_(0.5)  # a patient that differs from its source in layer4 only
    x = split.test_x[:40]
    probes = Probes(case, source, patient, x, torch.device("cpu"), 0)
    probes.probe("surgery", patient)
    rows = {r["layer"]: r for r in probes.rows()}
    ref = probe_activations(source, x, ["layer2", "layer4"], seed=0)
    pat = probe_activations(patient, x, ["layer2", "layer4"], seed=0, edges=ref)
    for layer in ("layer2", "layer4"):
        d = drift(ref[layer], pat[layer])
        assert rows[layer]["w1_norm"] == d["wasserstein_norm"] and rows[layer]["psi"] == d["psi"]
        assert rows[layer]["mean"] == pat[layer].mean and rows[layer]["std"] == pat[layer].std
    assert rows["layer2"]["cka"] == pytest.approx(1.0, abs=1e-9) and rows["layer4"]["cka"] < 0.9999
    layer_map = probes.layer_maps()["surgery"]
    assert (
        layer_map["reference_layers"] == layer_map["layers"] == [f"layer{s}.{b}" for s in range(1, 5) for b in (0, 1)]
    )
    cka = np.array(layer_map["cka"])
    assert cka[7, 7] == pytest.approx(rows["layer4"]["cka"], rel=1e-9)  # layer4 is layer4.1's output
    assert np.allclose(np.diag(cka)[:7], 1.0) and cka[0, 7] < 0.9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_accumulator_on_cuda_matches_the_cpu():
    x, y = _features(128, 24, 12), _features(128, 24, 13) + _features(128, 24, 12)
    gpu = CKAAccumulator(["x"], ["y"], device="cuda")
    for s in range(0, 128, 32):
        gpu.update([gram(x[s : s + 32].cuda())], [gram(y[s : s + 32].cuda())])
    assert gpu.value("x", "y") == pytest.approx(linear_cka(x, y, batch_size=32), rel=1e-9)


def test_probe_grams_are_each_layers_own_output_even_where_memory_is_reused():
    # ResNet-50's blocks of one stage have outputs of one shape, and a freed block output's memory is reused for
    # the block after next: the Grams must be those of each layer's own output, and a stage's those of its last
    # block (the very same tensor), never another block's that lay at the same address.
    import torchvision

    from surgery.stats.activation_probe import ProbePass

    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10).eval()
    x = torch.randn(24, 3, 32, 32)
    names = ["layer2.0", "layer2.1", "layer2.2", "layer2.3", "layer2"]
    outputs: dict[str, torch.Tensor] = {}  # each layer's output, kept: from a forward of its own
    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: outputs.setdefault(n, o.clone()))
        for n in names
    ]
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    with ProbePass(model, ["layer2"], total_samples=len(x), gram_layers=names) as probe:  # keeps only Grams
        probe.feed(x)
        [grams] = probe.batch_grams()
        probe.finish()
    for name, got in zip(probe.gram_names, grams):
        assert torch.allclose(got, gram(outputs[name]), rtol=1e-5, atol=1e-4), name
    assert probe.gram_names == ["layer2", *names[:4]]  # model order: the container first
    by_name = dict(zip(probe.gram_names, grams))
    assert not torch.allclose(by_name["layer2.0"], by_name["layer2.2"], rtol=1e-3)
