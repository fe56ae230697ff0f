"""The README's "Your own data and your own pretrained model" case, run as written but smaller.

Three substitutions keep it to seconds on a CPU, and nothing else changes: the folder is one the
harness writes (60 real JPEG files), the images are 64 px instead of 224, and one seed takes two
steps. The "pretrained" ResNet-50 weights are written by the test into a temporary torch hub cache
(random weights: the figures are not the point, the path is).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from surgery.models.checkpoints import build_architecture
from surgery.synthetic import write_shapes_folder

from cli_runs import run_case_file

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_case() -> str:
    section = README.read_text(encoding="utf-8").split("<!-- own-data example -->", 1)[1]
    return section.split("```yaml\n", 1)[1].split("```", 1)[0]


def test_the_readme_case_runs_on_a_folder_with_a_pretrained_model(tmp_path: Path, isolated_cache: Path):
    text = readme_case()
    folder = write_shapes_folder(tmp_path / "my-photos", count=60, size=72, seed=1)
    for old, new in (
        ("~/data/my-photos", str(folder)),
        ("image_size: 224", "image_size: 64"),
        ("seed: [0, 1, 2]", "seed: [0]"),
        ("steps: 100", "steps: 2"),
    ):
        assert old in text, f"the README's example no longer says {old!r}"
        text = text.replace(old, new)
    weights = torchvision.models.get_model_weights("resnet50").DEFAULT
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    hub_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_architecture("torchvision:resnet50", num_classes=1000).state_dict(), hub_file)
    case = tmp_path / "my-photos.yaml"
    case.write_text(text)

    run = run_case_file(case, tmp_path / "report")

    assert run.rc in (0, 1), run.err  # figures judged; never bad input
    results = run.results
    preprocess = results["provenance"]["preprocess"]
    assert preprocess["mean"] == pytest.approx([0.485, 0.456, 0.406]) and preprocess["crop"] == 64
    assert preprocess["resize"] == round(64 * 232 / 224) and "IMAGENET1K_V2" in preprocess["origin"]
    names = {e["name"] for e in results["expectations"]}
    assert {"coverage.tensors_min", "activations.drift_max", "accuracy.after_min"} <= names
    assert results["per_seed"][0]["data"]["classes"] == 5
    assert (tmp_path / "report" / "my-photos-resnet50-to-resnet18" / "report.html").is_file()
