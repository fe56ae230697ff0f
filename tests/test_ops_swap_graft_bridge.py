"""activation_swap, graft and bridge on real torchvision / timm models (random init, 32×32, CPU)."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from surgery.errors import SurgeryInputError
from surgery.ops.activation import activation_swap
from surgery.ops.bridge import BridgeModel, bridge, list_feature_nodes
from surgery.ops.graft import donor_from_state_dict, graft
from surgery.ops.record import recordable_state


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval()


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None, num_classes=10).eval()


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _all_exact_from_same_key(record, model) -> None:
    state = recordable_state(model)
    assert [t.target_key for t in record.tensors] == list(state)
    assert all(t.method == "exact" and t.source_key == t.target_key for t in record.tensors)


# --- activation_swap -------------------------------------------------------------------------------


def test_resnet18_relu_to_silu(resnet18, x):
    new, rec = activation_swap(resnet18, ["ReLU"], "silu", example_input=x)

    assert not any(isinstance(m, nn.ReLU) for m in new.modules())
    assert all(isinstance(new.get_submodule(p), nn.SiLU) for p in rec.notes["paths"])
    assert new.relu.inplace is True  # kept where both classes have it
    # BasicBlock calls self.relu twice: 9 instances at 9 paths, 17 call sites (fx) and 17 calls (run).
    assert rec.notes["replaced"] == {"ReLU": 9}
    assert rec.notes["instances"] == {"ReLU": 9}
    assert rec.notes["call_sites"] == {"ReLU": 17}
    assert rec.notes["calls"] == {"ReLU": 17}
    assert rec.notes["traced"] is True and rec.notes["functional_not_swapped"] == []
    assert rec.notes["from"] == ["ReLU"] and rec.notes["to"] == "SiLU"

    assert _same_state(new, resnet18)
    _all_exact_from_same_key(rec, new)
    assert any(isinstance(m, nn.ReLU) for m in resnet18.modules())  # the input model is untouched
    with torch.no_grad():
        assert not torch.allclose(new.eval()(x), resnet18(x))


def test_timm_mobilenetv3_hardswish_and_hardsigmoid_to_relu(x):
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10).eval()
    before = {
        kind: sum(type(m) is cls for m in model.modules())
        for kind, cls in [("Hardswish", nn.Hardswish), ("Hardsigmoid", nn.Hardsigmoid), ("ReLU", nn.ReLU)]
    }
    assert before["Hardswish"] > 0 and before["Hardsigmoid"] > 0

    new, rec = activation_swap(model, ["hard_swish", "Hardsigmoid"], "ReLU", example_input=x)

    assert rec.notes["replaced"] == {"Hardswish": before["Hardswish"], "Hardsigmoid": before["Hardsigmoid"]}
    assert rec.notes["call_sites"] == rec.notes["replaced"] == rec.notes["calls"]
    assert not any(isinstance(m, (nn.Hardswish, nn.Hardsigmoid)) for m in new.modules())
    assert sum(type(m) is nn.ReLU for m in new.modules()) == sum(before.values())
    assert _same_state(new, model)
    _all_exact_from_same_key(rec, new)
    with torch.no_grad():
        assert not torch.allclose(new.eval()(x), model(x))


def test_timm_own_activation_classes_are_matched():
    from timm.layers.activations import GELU as TimmGELU
    from timm.layers.activations import Swish

    model = nn.Sequential(nn.Linear(4, 4), TimmGELU(), nn.Linear(4, 4), Swish())
    new, rec = activation_swap(model, ["gelu", "swish"], "relu")
    assert rec.notes["replaced"] == {"GELU": 1, "SiLU": 1}
    assert isinstance(new[1], nn.ReLU) and isinstance(new[3], nn.ReLU)
    # timm's classes are fx leaves here: their internal F.gelu is not reported as a functional call
    assert rec.notes["functional_not_swapped"] == []


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.act = nn.ReLU()
        self.inner = _Inner()

    def forward(self, x):
        return self.inner(F.relu(self.act(self.fc1(x))))


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(x).relu()


def test_functional_relu_is_reported_not_swapped():
    model = _Functional()
    new, rec = activation_swap(model, ["relu"], "gelu", example_input=torch.randn(3, 8))
    assert isinstance(new.act, nn.GELU) and rec.notes["replaced"] == {"ReLU": 1}
    assert rec.notes["traced"] is True
    assert rec.notes["functional"] == "inspected"
    assert rec.notes["functional_not_swapped"] == ["relu", "relu_1"]
    calls = {c["node"]: c for c in rec.notes["functional_calls"]}
    assert calls["relu"]["call"] == "torch.nn.functional.relu" and calls["relu"]["module"] == ""
    assert calls["relu_1"]["call"] == "Tensor.relu" and calls["relu_1"]["module"] == "inner"


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable by torch.fx
            x = x * 2
        return self.act(self.fc(x))


def test_untraceable_model_is_recorded_as_not_inspected():
    new, rec = activation_swap(_DataDependent(), ["ReLU"], "Tanh")
    assert isinstance(new.act, nn.Tanh)
    assert rec.notes["traced"] is False and rec.notes["call_sites"] is None
    assert rec.notes["functional"] == "not inspected, model not traceable"
    assert rec.notes["trace_error"]


def test_shared_instance_replaced_at_every_path():
    act = nn.ReLU()
    a, b = nn.Sequential(nn.Linear(4, 4), act), nn.Sequential(nn.Linear(4, 4), act)
    model = nn.Sequential(a, b)
    new, rec = activation_swap(model, ["relu"], "SiLU", example_input=torch.randn(2, 4))
    assert isinstance(new[0][1], nn.SiLU) and isinstance(new[1][1], nn.SiLU)
    assert new[0][1] is new[1][1]  # one new instance: the sharing is kept
    assert rec.notes["paths"] == ["0.1", "1.1"]
    assert rec.notes["replaced"] == {"ReLU": 2} and rec.notes["instances"] == {"ReLU": 1}
    assert rec.notes["call_sites"] == {"ReLU": 2} and rec.notes["calls"] == {"ReLU": 2}


def test_unknown_kind_or_target_names_it_and_lists_known(resnet18):
    with pytest.raises(SurgeryInputError, match=r"unknown activation kind 'Relu7'.*known: ReLU, ReLU6, SiLU"):
        activation_swap(resnet18, ["Relu7"], "SiLU")
    with pytest.raises(SurgeryInputError, match=r"unknown target activation 'swishy'.*known: .*GELU"):
        activation_swap(resnet18, ["ReLU"], "swishy")
    with pytest.raises(
        SurgeryInputError, match=r"no activation of kind GELU in ResNet \(activation modules found: ReLU\)"
    ):
        activation_swap(resnet18, ["GELU"], "ReLU")


# --- graft ---------------------------------------------------------------------------------------


def test_graft_stem_conv_into_resnet18(resnet18, x):
    donor = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    new, rec = graft(resnet18, donor, "conv1", example_input=x)

    assert torch.equal(new.conv1.weight, donor.weight) and new.conv1 is not donor
    assert not torch.equal(resnet18.conv1.weight, donor.weight)  # the host is untouched
    by_key = {t.target_key: t for t in rec.tensors}
    assert by_key["conv1.weight"].method == "exact" and by_key["conv1.weight"].source_key == "donor:weight"
    assert by_key["bn1.running_mean"].source_key == "bn1.running_mean"
    assert len(rec.tensors) == len(recordable_state(new)) and all(t.method == "exact" for t in rec.tensors)
    assert rec.notes["path"] == "conv1" and rec.notes["donor_params"] == 64 * 3 * 7 * 7
    assert rec.notes["param_glob"] == "conv1.*"
    assert rec.notes["output_shape"] == (2, 64, 16, 16)
    assert new.training is resnet18.training  # the probe restores the training flags...
    assert torch.equal(new.bn1.running_mean, resnet18.bn1.running_mean)  # ...and runs in eval mode
    with torch.no_grad():
        assert new(x).shape == (2, 10)


def test_graft_shape_mismatch_is_one_line_naming_path_and_shapes(resnet18, x):
    with pytest.raises(SurgeryInputError) as err:
        graft(resnet18, nn.Conv2d(3, 32, 7, stride=2, padding=3, bias=False), "conv1", example_input=x)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == "graft at 'conv1': donor output (2, 32, 16, 16) != host module output (2, 64, 16, 16)"


def test_graft_bad_path_names_it_and_close_matches(resnet18, x):
    with pytest.raises(SurgeryInputError, match=r"no module at path 'conv_1'.*close matches: conv1"):
        graft(resnet18, nn.Identity(), "conv_1", example_input=x)


def test_graft_donor_that_fails_on_the_input(resnet18, x):
    with pytest.raises(
        SurgeryInputError, match=r"graft at 'conv1': donor fails on the host module's input \(2, 3, 32, 32\)"
    ):
        graft(resnet18, nn.Conv2d(1, 64, 7, stride=2, padding=3), "conv1", example_input=x)


def test_donor_from_state_dict_adapts_grey_stem(resnet18, x):
    w = torch.randn(64, 1, 7, 7)
    donor = donor_from_state_dict({"conv1.weight": w}, in_channels=3, stride=2, padding=3)
    assert isinstance(donor, nn.Conv2d) and donor.weight.shape == (64, 3, 7, 7) and donor.bias is None
    grey = torch.randn(1, 1, 16, 16)
    torch.testing.assert_close(
        donor(grey.expand(1, 3, 16, 16)), F.conv2d(grey, w, stride=2, padding=3), atol=1e-4, rtol=1e-4
    )
    _, rec = graft(resnet18, donor, "conv1", example_input=x)
    first = rec.tensors[0]
    assert (first.target_key, first.method, first.source_shape) == ("conv1.weight", "adapted", [64, 1, 7, 7])


# --- bridge --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head,arch", [("linear", "resnet18"), ("mlp", "resnet18"), ("transformer", "resnet18"), ("transformer", "resnet50")]
)
def test_bridge_heads_train_only_the_head(head, arch, request, x):
    source = request.getfixturevalue(arch)
    model, rec = bridge(source, ["layer3", "layer4"], head, 10, example_input=x, hidden=64, depth=1, num_heads=4)
    assert isinstance(model, BridgeModel)

    model.train()
    assert model.head.training and not model.backbone.training
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in source.parameters())  # the source is untouched

    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    out = model(x)
    assert out.shape == (2, 10)
    F.cross_entropy(out, torch.tensor([1, 2])).backward()
    opt.step()

    after = model.backbone.state_dict()
    assert after.keys() == backbone_before.keys()
    assert all(torch.equal(after[k], backbone_before[k]) for k in after)  # BN running stats included
    assert any(not torch.equal(v, head_before[k]) for k, v in model.head.state_dict().items())

    big = arch == "resnet50"
    assert rec.notes["nodes"] == ["layer3", "layer4"] and rec.notes["head"] == head
    assert rec.notes["feature_shapes"] == {
        "layer3": [1024 if big else 256, 2, 2],
        "layer4": [2048 if big else 512, 1, 1],
    }
    assert rec.notes["extractor"] == "torchvision.fx"
    source_state = recordable_state(source)
    for t in rec.tensors:
        if t.target_key.startswith("backbone."):
            assert t.method == "exact" and t.target_key == "backbone." + t.source_key and t.source_key in source_state
        else:
            assert t.target_key.startswith("head.") and t.method == "fresh" and t.reason == "head"
    assert len(rec.tensors) == len(recordable_state(model))


def test_list_feature_nodes_and_unknown_node(resnet18, x):
    nodes = list_feature_nodes(resnet18)
    assert "layer4" in nodes and "layer4.1.relu_1" in nodes and "fc" in nodes
    with pytest.raises(SurgeryInputError, match=r"unknown node 'layer5'.*valid nodes include .*layer4"):
        bridge(resnet18, ["layer3", "layer5"], "linear", 10, example_input=x)


def test_bridge_hook_fallback_for_untraceable_model():
    source = _DataDependent()
    assert "act" in list_feature_nodes(source)
    model, rec = bridge(source, ["fc", "act"], "mlp", 3, example_input=torch.randn(5, 4), hidden=8)
    assert rec.notes["extractor"] == "hooks"
    assert rec.notes["feature_shapes"] == {"fc": [4], "act": [4]}
    assert model(torch.randn(5, 4)).shape == (5, 3)
    assert {t.source_key for t in rec.tensors if t.method == "exact"} == {"fc.weight", "fc.bias"}


def test_bridge_rejects_bad_head_settings(resnet18, x):
    with pytest.raises(SurgeryInputError, match="unknown head 'cnn'"):
        bridge(resnet18, ["layer4"], "cnn", 10, example_input=x)  # type: ignore[arg-type]
    with pytest.raises(SurgeryInputError, match="hidden=30 is not divisible by num_heads=4"):
        bridge(resnet18, ["layer4"], "transformer", 10, example_input=x, hidden=30)
