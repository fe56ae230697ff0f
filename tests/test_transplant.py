"""surgery.ops.transplant on real torchvision/timm models (random init, fixed seeds, 32×32 inputs)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import timm
import torch
from timm.models._manipulate import adapt_input_conv
from torch import nn
from torchvision.models import resnet18, resnet50

from surgery.errors import SurgeryInputError
from surgery.ops.record import SurgeryRecord, recordable_state
from surgery.ops.transplant import (
    assert_outputs_match,
    clean_prefixes,
    find_head_keys,
    outputs_match,
    select_indices,
    select_weights,
    transplant,
)

NUM_CLASSES = 10


def _seeded(factory, seed: int, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return factory(**kwargs)


def _warm_bn(model: nn.Module, seed: int, in_chans: int = 3) -> nn.Module:
    """Give BatchNorm running statistics non-default values (so buffer copying is tested)."""
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, in_chans, 32, 32))
    return model.eval()


def _coverage(record: SurgeryRecord) -> tuple[float, float]:
    """(tensor coverage, element coverage): the share of target tensors / elements set from the source."""
    covered = [t for t in record.tensors if t.method != "fresh"]
    total_elements = sum(t.numel for t in record.tensors)
    return len(covered) / len(record.tensors), sum(t.numel for t in covered) / total_elements


def _by_key(record: SurgeryRecord) -> dict:
    return {t.target_key: t for t in record.tensors}


@pytest.fixture(scope="module")
def x32() -> torch.Tensor:
    torch.manual_seed(123)
    return torch.randn(2, 3, 32, 32)


@pytest.fixture(scope="module")
def tpl18() -> nn.Module:
    """A randomly initialised target; tests take deep copies (cheaper than re-initialising)."""
    return _seeded(resnet18, 1, num_classes=NUM_CLASSES)


@pytest.fixture(scope="module")
def src18() -> nn.Module:
    return _warm_bn(_seeded(resnet18, 0, num_classes=NUM_CLASSES), seed=10)


@pytest.fixture(scope="module")
def src50() -> nn.Module:
    return _warm_bn(_seeded(resnet50, 0, num_classes=NUM_CLASSES), seed=11)


# --------------------------------------------------------------------------------------------
# Prefixes and exact transplant into the same architecture (function preservation)
# --------------------------------------------------------------------------------------------


def test_clean_prefixes_strips_wrappers_repeatedly():
    t = torch.zeros(1)
    state = {"module._orig_mod.module.fc.weight": t, "_orig_mod.conv1.weight": t, "layer1.module.x": t}
    assert list(clean_prefixes(state)) == ["fc.weight", "conv1.weight", "layer1.module.x"]


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
def test_exact_same_architecture_is_identity(src18, tpl18, x32, prefix):
    state = {prefix + k: v for k, v in src18.state_dict().items()}
    target = copy.deepcopy(tpl18)
    if not prefix:
        assert outputs_match(src18, target, x32) > 1e-3  # different init before the transplant

    model, record = transplant(state, target, "exact")

    assert model is target
    assert record.op == "transplant"
    assert [t.target_key for t in record.tensors] == list(recordable_state(target))
    assert {t.method for t in record.tensors} == {"exact"}
    assert all(t.source_key == t.target_key for t in record.tensors)
    assert record.notes["strategy"] == "exact"
    assert record.notes["unused_source_keys"] == 0
    assert outputs_match(src18, model, x32) <= 1e-6
    # buffers came along: running statistics and the integer counter
    assert torch.equal(model.bn1.running_mean, src18.bn1.running_mean)
    assert torch.equal(model.bn1.num_batches_tracked, src18.bn1.num_batches_tracked)


def test_exact_from_module_into_wrapped_target(src18, tpl18, x32):
    wrapped = nn.DataParallel(copy.deepcopy(tpl18))
    _, record = transplant(src18, wrapped, "exact")
    assert [t.target_key for t in record.tensors] == list(recordable_state(wrapped))
    assert record.tensors[0].target_key.startswith("module.")
    assert {t.method for t in record.tensors} == {"exact"}
    assert outputs_match(src18, wrapped.module, x32) <= 1e-6


def test_record_is_json_serialisable(src18, tpl18):
    _, record = transplant(src18, copy.deepcopy(tpl18), "select")
    again = SurgeryRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again == record


# --------------------------------------------------------------------------------------------
# ResNet-50 → ResNet-18 under each strategy
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def r50_to_r18(src50, tpl18) -> dict[str, tuple[nn.Module, SurgeryRecord]]:
    return {strategy: transplant(src50, copy.deepcopy(tpl18), strategy) for strategy in ("exact", "order", "select")}


def test_resnet50_to_resnet18_coverage(r50_to_r18, x32):
    cov = {s: _coverage(rec) for s, (_, rec) in r50_to_r18.items()}
    print("\nresnet50 -> resnet18 coverage (tensors %, elements %)")
    for strategy, (tensors, elements) in cov.items():
        print(f"  {strategy:<7} {100 * tensors:6.1f} {100 * elements:6.1f}")

    for strategy, (model, record) in r50_to_r18.items():
        assert [t.target_key for t in record.tensors] == list(recordable_state(model))
        assert record.notes["strategy"] == strategy
        assert record.notes["unused_source_keys"] > 0  # the deeper, wider source cannot all fit
        with torch.no_grad():
            assert torch.isfinite(model.eval()(x32)).all()
    # order covers many tensors, but by position: most of them come from a differently named tensor
    assert r50_to_r18["order"][1].notes["renamed"] > 0
    assert r50_to_r18["select"][1].notes["renamed"] == r50_to_r18["exact"][1].notes["renamed"] == 0
    assert cov["select"][0] > cov["exact"][0]
    assert cov["select"][1] > cov["exact"][1]
    assert cov["select"][0] > cov["order"][0]


def test_resnet50_to_resnet18_exact_records_mismatches(r50_to_r18, src50):
    _, record = r50_to_r18["exact"]
    rec = _by_key(record)
    src_state = src50.state_dict()
    # bottleneck conv1 is 1×1, basic-block conv1 is 3×3: same name, different shape
    conv = rec["layer1.0.conv1.weight"]
    assert (conv.method, conv.reason) == ("fresh", "shape mismatch")
    assert conv.source_shape == [64, 64, 1, 1] and conv.shape == [64, 64, 3, 3]
    assert (rec["fc.weight"].reason, rec["fc.weight"].source_shape) == ("shape mismatch", [NUM_CLASSES, 2048])
    assert rec["layer1.0.conv2.weight"].method == "exact"
    mismatched = [t for t in record.tensors if t.reason == "shape mismatch"]
    assert mismatched and all(t.source_shape == list(src_state[t.target_key].shape) for t in mismatched)
    assert all(t.source_shape is None for t in record.tensors if t.reason == "no counterpart")


def test_resnet50_to_resnet18_select_values(r50_to_r18, src50):
    model, record = r50_to_r18["select"]
    rec = _by_key(record)
    src_state, tgt_state = src50.state_dict(), model.state_dict()
    assert rec["layer2.0.downsample.0.weight"].method == "sliced"
    assert rec["layer2.0.downsample.0.weight"].source_shape == [512, 256, 1, 1]
    assert rec["fc.weight"].method == "sliced"  # same class count: the head is selected like any layer
    # bottleneck 1×1 conv1 → basic-block 3×3 conv1: channels selected, kernel centred, zeros around
    conv1 = rec["layer1.0.conv1.weight"]
    assert (conv1.method, conv1.source_shape) == ("adapted", [64, 64, 1, 1])
    assert torch.equal(tgt_state["layer1.0.conv1.weight"][:, :, 1, 1], src_state["layer1.0.conv1.weight"][:, :, 0, 0])
    assert tgt_state["layer1.0.conv1.weight"][:, :, 0].abs().sum() == 0
    # first-N layer selection: target block B of a stage ← source block B of that stage
    assert rec["layer3.1.conv2.weight"].source_key == "layer3.1.conv2.weight"
    for t in record.tensors:
        if t.method == "exact":
            assert torch.equal(tgt_state[t.target_key], src_state[t.source_key])
        elif t.method == "sliced":
            assert torch.equal(tgt_state[t.target_key], select_weights(src_state[t.source_key], t.shape))


def test_embedded_kernel_computes_the_same_function():
    from surgery.ops.transplant import embed_kernel

    torch.manual_seed(0)
    small, large = nn.Conv2d(8, 6, 1, bias=False), nn.Conv2d(4, 3, 3, padding=1, bias=False)
    with torch.no_grad():
        large.weight.copy_(embed_kernel(small.weight, large.weight.shape))
    reference = nn.Conv2d(4, 3, 1, bias=False)
    with torch.no_grad():
        reference.weight.copy_(select_weights(small.weight, (3, 4, 1, 1)))
    x = torch.randn(2, 4, 5, 5)
    assert torch.allclose(large(x), reference(x), atol=1e-6)
    with pytest.raises(ValueError):
        embed_kernel(torch.zeros(3, 4, 2, 2), (3, 4, 3, 3))  # an even difference only: no centre


def test_order_strategy_walks_in_registration_order():
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    target = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    _, record = transplant(source, target, "order")
    assert [(t.target_key, t.source_key) for t in record.tensors] == [
        ("0.weight", "0.weight"),
        ("0.bias", "0.bias"),
        ("1.weight", "2.weight"),
        ("1.bias", "2.bias"),
    ]
    assert torch.equal(target[1].weight, source[2].weight)
    assert record.notes["unused_source_keys"] == 2
    # the cursor never goes back: once the [2, 8] weight is taken, the earlier [8, 4] one is gone
    reversed_target = nn.Sequential(nn.Linear(8, 2), nn.Linear(4, 8))
    _, record = transplant(source, reversed_target, "order")
    assert [t.method for t in record.tensors] == ["exact", "exact", "fresh", "fresh"]
    assert {t.reason for t in record.tensors if t.method == "fresh"} == {"no counterpart"}


# --------------------------------------------------------------------------------------------
# Selection indices, checked against independent computations
# --------------------------------------------------------------------------------------------


def test_select_indices_known_values():
    assert select_indices(7, 3).tolist() == [0, 3, 6]
    assert select_indices(10, 4).tolist() == [0, 3, 6, 9]
    assert select_indices(8, 3).tolist() == [0, 4, 7]  # 3.5 rounds half to even
    assert select_indices(5, 1).tolist() == [0]
    assert select_indices(6, 6).tolist() == list(range(6))
    with pytest.raises(ValueError):
        select_indices(3, 4)


def test_select_weights_on_a_known_tensor():
    source = torch.arange(7 * 5 * 3, dtype=torch.float32).reshape(7, 5, 3)
    expected = source[[0, 3, 6]][:, [0, 4]][:, :, [0, 1, 2]]
    assert torch.equal(select_weights(source, (3, 2, 3)), expected)


def test_select_slice_matches_numpy_on_model_tensor(r50_to_r18, src50):
    model, _ = r50_to_r18["select"]
    src = src50.state_dict()["layer4.0.downsample.0.weight"].numpy()  # [2048, 1024, 1, 1]
    tgt = model.state_dict()["layer4.0.downsample.0.weight"].numpy()  # [512, 256, 1, 1]
    idx = [np.round(np.linspace(0, s - 1, t)).astype(np.int64) for s, t in zip(src.shape, tgt.shape)]
    np.testing.assert_array_equal(tgt, src[np.ix_(*idx)])
    fc_src, fc_tgt = src50.fc.weight.detach().numpy(), model.fc.weight.detach().numpy()
    np.testing.assert_array_equal(fc_tgt, fc_src[:, np.round(np.linspace(0, 2047, 512)).astype(np.int64)])


def test_select_matches_linear_and_1x1_conv():
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(16, 32), nn.Conv2d(32, 16, 1))  # e.g. ConvNeXt-T Linear MLP
    target = nn.Sequential(nn.Conv2d(8, 16, 1), nn.Linear(16, 8))  # e.g. ConvNeXt-atto 1×1 conv MLP
    _, record = transplant(source, target, "select", head_keys=[], adapt_input=False)  # no stem, no head
    rec = _by_key(record)
    assert (rec["0.weight"].method, rec["0.weight"].source_shape) == ("sliced", [32, 16])
    assert torch.equal(target[0].weight[:, :, 0, 0], select_weights(source[0].weight, (16, 8)))
    assert torch.equal(target[1].weight, select_weights(source[1].weight[:, :, 0, 0], (8, 16)))


# --------------------------------------------------------------------------------------------
# Classifier head
# --------------------------------------------------------------------------------------------


def test_head_with_other_class_count_is_fresh_under_select(tpl18):
    source = _seeded(resnet18, 0, num_classes=100)
    target = copy.deepcopy(tpl18)
    fresh_fc = target.fc.weight.detach().clone()
    _, record = transplant(source, target, "select")
    rec = _by_key(record)
    for key in ("fc.weight", "fc.bias"):
        assert (rec[key].method, rec[key].reason) == ("fresh", "head")
    assert rec["fc.weight"].source_shape == [100, 512]
    assert torch.equal(target.fc.weight, fresh_fc)  # untouched
    assert all(t.method == "exact" for t in record.tensors if not t.target_key.startswith("fc."))
    assert record.notes["head_keys"] == ["fc.bias", "fc.weight"]


def test_head_keys_globs(src18, tpl18):
    model = copy.deepcopy(tpl18)
    assert find_head_keys(model) == {"fc.weight", "fc.bias"}
    assert find_head_keys(model, ["fc"]) == {"fc.weight", "fc.bias"}
    assert find_head_keys(model, ["layer4.1.bn2.*"]) >= {"layer4.1.bn2.weight", "layer4.1.bn2.running_var"}
    with pytest.raises(SurgeryInputError):
        transplant(src18, model, "select", head_keys=["classifier.*"])


# --------------------------------------------------------------------------------------------
# Input-channel adaptation (timm's adapt_input_conv)
# --------------------------------------------------------------------------------------------


def _with_stem(model: nn.Module, in_chans: int) -> nn.Module:
    model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


@pytest.mark.parametrize("strategy", ["exact", "order", "select"])
def test_adapt_rgb_to_grey(src18, tpl18, strategy):
    target = _with_stem(copy.deepcopy(tpl18), 1)
    _, record = transplant(src18, target, strategy)
    stem = _by_key(record)["conv1.weight"]
    assert (stem.method, stem.source_key, stem.source_shape) == ("adapted", "conv1.weight", [64, 3, 7, 7])
    assert record.notes["adapted"] == ["conv1.weight"]
    assert torch.equal(target.conv1.weight, adapt_input_conv(1, src18.conv1.weight.detach()))
    # a grey image through the grey target == the same image replicated on RGB through the source
    torch.manual_seed(7)
    grey = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert (target.eval()(grey) - src18(grey.repeat(1, 3, 1, 1))).abs().max() <= 1e-4


@pytest.fixture(scope="module")
def src18_grey(src18) -> nn.Module:
    return _warm_bn(_with_stem(copy.deepcopy(src18), 1), seed=3, in_chans=1)


@pytest.mark.parametrize("strategy", ["exact", "order", "select"])
def test_adapt_grey_to_rgb(src18_grey, tpl18, strategy):
    source = src18_grey
    target = copy.deepcopy(tpl18)
    _, record = transplant(source, target, strategy)
    stem = _by_key(record)["conv1.weight"]
    assert (stem.method, stem.source_shape) == ("adapted", [64, 1, 7, 7])
    assert torch.equal(target.conv1.weight, adapt_input_conv(3, source.conv1.weight.detach(), base_chans=1))
    torch.manual_seed(8)
    grey = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert (target.eval()(grey.repeat(1, 3, 1, 1)) - source(grey)).abs().max() <= 1e-4


def test_adapt_input_off_is_a_shape_mismatch(src18, tpl18):
    target = _with_stem(copy.deepcopy(tpl18), 1)
    _, record = transplant(src18, target, "exact", adapt_input=False)
    stem = _by_key(record)["conv1.weight"]
    assert (stem.method, stem.reason) == ("fresh", "shape mismatch")
    assert record.notes["adapted"] == []


def test_adapt_in_low_precision_casts_back(src18, tpl18):
    target = _with_stem(copy.deepcopy(tpl18), 1).to(torch.bfloat16)
    source = {k: v.to(torch.bfloat16) for k, v in src18.state_dict().items()}
    _, record = transplant(source, target, "select")
    assert _by_key(record)["conv1.weight"].method == "adapted"
    assert target.conv1.weight.dtype == torch.bfloat16
    expected = adapt_input_conv(1, source["conv1.weight"].float()).to(torch.bfloat16)
    assert torch.equal(target.conv1.weight, expected)


# --------------------------------------------------------------------------------------------
# timm models, bad input, the function-preservation check itself
# --------------------------------------------------------------------------------------------


def test_timm_resnet34_to_resnet18_select(x32):
    torch.manual_seed(0)
    source = timm.create_model("resnet34", pretrained=False, num_classes=NUM_CLASSES)
    torch.manual_seed(1)
    target = timm.create_model("resnet18", pretrained=False, num_classes=NUM_CLASSES)
    _, record = transplant(source, target, "select")
    # same widths, fewer blocks per stage: every target tensor has a same-shape, same-name source
    assert _coverage(record) == (1.0, 1.0)
    assert {t.method for t in record.tensors} == {"exact"}
    assert record.notes["unused_source_keys"] > 0  # the source's deeper blocks
    assert torch.equal(target.layer3[1].conv1.weight, source.layer3[1].conv1.weight)
    with torch.no_grad():
        assert torch.isfinite(target.eval()(x32)).all()


def test_bad_input_is_a_surgery_input_error(src18, tpl18):
    target = copy.deepcopy(tpl18)
    with pytest.raises(SurgeryInputError, match="strategy"):
        transplant(src18, target, "nearest")  # type: ignore[arg-type]
    with pytest.raises(SurgeryInputError, match="state_dict"):
        transplant({"epoch": 3, "state_dict": src18.state_dict()}, target, "exact")


def test_outputs_match_restores_modes_and_flags_shape_changes(src18, tpl18, x32):
    other = copy.deepcopy(tpl18).train()
    assert outputs_match(src18, other, x32) > 1e-3
    assert other.training and other.layer1[0].bn1.training
    with pytest.raises(AssertionError, match="outputs differ"):
        assert_outputs_match(src18, other, x32)
    assert assert_outputs_match(src18, src18, x32) == 0.0
    assert outputs_match(src18, nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3)), x32) == float("inf")
