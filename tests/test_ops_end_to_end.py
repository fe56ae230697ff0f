"""Ops through the runner and the CLI: graft shape errors exit 2 on one line; a bridge's backbone stays
bit-identical."""

from __future__ import annotations

import copy

import pytest
import torch

from surgery.case import parse_case
from surgery.cli import main
from surgery.data.datasets import load_split
from surgery.train.finetune import finetune, resolve_device
from surgery.running.builder import build_model
from surgery.running.prepare import perform_surgery

GRAFT = """\
name: graft-mismatch
data: {{train: {{name: digits, limit: 200}}, image_size: 32}}
source: {{model: "torchvision:resnet18", num_classes: 10}}
surgery:
  op: graft
  donor: {{model: "{donor}"}}
  path: conv1
finetune: {{steps: 2, batch_size: 16}}
expect: {{accuracy: {{after_min: 0.0}}}}
"""


def test_shape_incompatible_graft_exits_2_with_path_and_shapes(tmp_path, capsys):
    case = tmp_path / "graft.yaml"
    # an identity as conv1: passes (N, 3, 32, 32) on where the host's conv1 gives (N, 64, 16, 16)
    case.write_text(GRAFT.format(donor="torch.nn:Identity"))
    assert main(["run", str(case), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "'conv1'" in err[0] and "3, 32, 32)" in err[0] and "64, 16, 16)" in err[0]


def test_bridge_backbone_bit_identical_after_finetune():
    case = parse_case("""\
name: bridge
data: {train: {name: digits, limit: 300}, image_size: 32}
source: {model: "torchvision:resnet18", num_classes: 10}
surgery: {op: bridge, nodes: [layer3, layer4], head: transformer, hidden: 32, num_heads: 2}
finetune: {steps: 4, batch_size: 16, eval_every: 2}
expect: {accuracy: {after_min: 0.0}}
""")
    split = load_split(case.data.train, image_size=32, channels=3, seed=0)
    source = build_model(case.source, num_classes=10)
    patient, record = perform_surgery(case, source, split)
    backbone_before = copy.deepcopy(patient.backbone.state_dict())
    head_before = copy.deepcopy(patient.head.state_dict())
    finetune(
        patient,
        split.train_x,
        split.train_y,
        split.test_x,
        split.test_y,
        case.finetune,
        seed=0,
        device=resolve_device("cpu"),
        progress=False,
    )
    for key, value in patient.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key
    assert any(not torch.equal(v, head_before[k]) for k, v in patient.head.state_dict().items())
    assert {t.method for t in record.tensors} == {"exact", "fresh"}


def test_image_size_too_small_for_the_architecture_exits_2(tmp_path, capsys):
    """A ViT built for 224 px fed 32 px images: bad input naming the size, not a traceback."""
    case = tmp_path / "small.yaml"
    case.write_text("""\
name: too-small
data: {train: {name: digits, limit: 100}, image_size: 32}
source: {model: "timm:vit_tiny_patch16_224", num_classes: 10}
surgery: {op: activation_swap, from: [GELU], to: ReLU}
finetune: {steps: 1, batch_size: 8}
expect: {accuracy: {after_min: 0.0}}
""")
    assert main(["run", str(case), "--quiet", "--report", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "(3, 32, 32)" in err[0] and "image_size" in err[0]
    assert not (tmp_path / "r").exists()


@pytest.mark.gpu
def test_tiny_case_runs_on_cuda(tmp_path):
    """The GPU path (data on the device, bf16 autocast, channels_last) end to end; skipped without CUDA."""
    from surgery.running.cases import run_case
    from surgery.running.runner import RunOptions

    case = parse_case("""\
name: tiny-cuda
data: {train: {name: digits, limit: 300}, image_size: 32}
source: {model: "torchvision:resnet18", num_classes: 10}
surgery: {op: transplant, target: {model: "torchvision:resnet18", num_classes: 10}, strategy: exact}
finetune: {steps: 5, batch_size: 16, eval_every: 5}
expect: {coverage: {tensors_min: 1.0}, activations: {layers: ["layer?"], drift_max: 0.1}}
""")
    result = run_case(case, RunOptions(device="cuda", progress=False))
    assert result.provenance["device"].startswith("cuda")
    assert result.passed, [e.message for e in result.expectations if not e.passed]
