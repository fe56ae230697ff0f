"""The zoo's recipes: how each source model is trained, as data (no torch).

A recipe names its architecture, data set and training budget; its hash names the cached file
(:mod:`surgery.train.zoo` trains and caches them). Kept apart from the training code so that case files
can be validated against the zoo's names without importing torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Literal

ZOO_FORMAT = 1  # bump when training code changes what a recipe produces


@dataclass(frozen=True)
class Recipe:
    """How one zoo model is trained. Its hash names the cached file."""

    name: str
    arch: str
    dataset: str
    kind: Literal["classifier", "stem"] = "classifier"
    image_size: int = 32
    channels: int = 3
    num_classes: int = 10
    steps: int = 300
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "format": ZOO_FORMAT}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


ZOO: dict[str, Recipe] = {
    r.name: r
    for r in [
        # Budgets chosen for a fast cold start at the accuracy of the earlier, longer recipes (measured side by
        # side, docs/getting-started.md): fewer steps at a higher learning rate, larger batches where a step's
        # throughput gains from them (ResNets at 32 px on a CPU: 1.3x the images per second at batch 128).
        # Accuracy is not the whole measure: the ResNet-50 is the transplant and bridge source, and a recipe of
        # 64 steps at lr 5e-3 reached the same accuracy but a source whose weights transferred far worse (the
        # strategies case's select arm fell from 0.87 to 0.63 after fine-tune); at lr 2e-3 it transfers as before.
        Recipe("mnist-resnet18", "torchvision:resnet18", "mnist5k", steps=150, lr=4e-3),
        Recipe("mnist-resnet50", "torchvision:resnet50", "mnist5k", steps=128, batch_size=128, lr=2e-3),
        Recipe("mnist-mobilenetv3", "timm:mobilenetv3_small_100", "mnist5k", steps=300, lr=8e-3),
        Recipe("shapes-resnet18", "torchvision:resnet18", "shapes", num_classes=5, steps=80, batch_size=128, lr=4e-3),
        # A ResNet stem (3→64, 7×7, stride 2) trained inside a small net on MNIST: the graft donor.
        Recipe("mnist-stem", "surgery.train.zoo:stem_trainer", "mnist5k", kind="stem", steps=200),
    ]
}
