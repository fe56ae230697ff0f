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
        Recipe("mnist-resnet18", "torchvision:resnet18", "mnist5k", steps=300),
        Recipe("mnist-resnet50", "torchvision:resnet50", "mnist5k", steps=250),
        Recipe("mnist-mobilenetv3", "timm:mobilenetv3_small_100", "mnist5k", steps=500, lr=5e-3),
        Recipe("shapes-resnet18", "torchvision:resnet18", "shapes", num_classes=5, steps=200),
        # A ResNet stem (3→64, 7×7, stride 2) trained inside a small net on MNIST: the graft donor.
        Recipe("mnist-stem", "surgery.train.zoo:stem_trainer", "mnist5k", kind="stem", steps=200),
    ]
}
