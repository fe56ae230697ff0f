"""The zoo: source models the harness trains itself on the embedded data, cached by recipe hash.

Each model is trained once from a seeded recipe and stored as ``.safetensors`` under
``$SURGERY_CACHE/zoo`` (default ``~/.cache/surgery``), its file name keyed by a hash of the
recipe. Writes are atomic (temporary file, then rename) and guarded by a file lock, so parallel
pytest-xdist workers build a model once.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from surgery.files import cache_dir, write_atomic
from surgery.spec import DatasetSpec, FinetuneSpec, OptimizerSpec, ScheduleSpec
from surgery.data.datasets import load_split
from surgery.train.finetune import evaluate, finetune, to_device
from surgery.models.model_refs import validate_model_ref
from surgery.models.checkpoints import build_architecture, load_state_dict_file, load_weights
from surgery.train.numerics import torch_threads, zoo_threads
from surgery.models.recipes import ZOO, Recipe
from surgery.errors import SurgeryInputError

log = logging.getLogger(__name__)  # one line per model trained; the pytest plugin shows them in the terminal


class StemTrainer(nn.Module):
    """A ResNet-style stem conv with a small body and head, to train the stem alone."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        self.conv1 = make_stem(in_chans)
        self.body = nn.Sequential(
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
            nn.Conv2d(64, 128, 3, 2, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.conv1(x))


def stem_trainer(num_classes: int = 10, in_chans: int = 3) -> StemTrainer:
    return StemTrainer(num_classes, in_chans)


def make_stem(in_chans: int = 3) -> nn.Conv2d:
    """The torchvision ResNet stem conv: in_chans→64, 7×7, stride 2, padding 3, no bias."""
    return nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)


def zoo_path(recipe: Recipe) -> Path:
    return cache_dir() / "zoo" / f"{recipe.name}-{recipe.key()}.safetensors"


def _recipe(name: str) -> Recipe:
    if name not in ZOO:
        try:
            validate_model_ref(f"zoo:{name}")
        except ValueError as exc:  # the same message as in a case file, with a suggestion
            raise SurgeryInputError(str(exc)) from None
    return ZOO[name]


def _architecture(recipe: Recipe) -> nn.Module:
    return build_architecture(recipe.arch, num_classes=recipe.num_classes)


def train_recipe(recipe: Recipe, *, device: torch.device, progress: bool | None = None) -> tuple[nn.Module, float]:
    """Train a recipe from scratch; return the trained model (a Conv2d for stems) and its test accuracy."""
    split = load_split(
        DatasetSpec(name=recipe.dataset), image_size=recipe.image_size, channels=recipe.channels, seed=recipe.seed
    )
    torch.manual_seed(recipe.seed)
    model = to_device(_architecture(recipe), device)
    spec = FinetuneSpec(
        steps=recipe.steps,
        batch_size=recipe.batch_size,
        eval_every=recipe.steps,
        optimizer=OptimizerSpec(name="adamw", lr=recipe.lr, weight_decay=0.05),
        schedule=ScheduleSpec(name="cosine", warmup_steps=recipe.steps // 10),
    )
    finetune(
        model,
        split.train_x,
        split.train_y,
        split.test_x,
        split.test_y,
        spec,
        seed=recipe.seed,
        device=device,
        progress=progress,
        desc=f"zoo {recipe.name}",
    )
    accuracy = evaluate(model, split.test_x, split.test_y, device=device)
    model = model.cpu().to(memory_format=torch.contiguous_format)
    return (model.get_submodule("conv1") if recipe.kind == "stem" else model), accuracy


def build(name: str, *, device: torch.device | str = "cpu", progress: bool | None = None) -> Path:
    """Train and cache a zoo model unless it is cached already; return its file."""
    from filelock import FileLock
    from safetensors.torch import save_file

    recipe = _recipe(name)
    path = zoo_path(recipe)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.is_file():  # another worker built it while we waited
            return path
        log.info(
            "zoo: training %s (%s on %s, %d steps; cached for later runs)",
            name,
            recipe.arch,
            recipe.dataset,
            recipe.steps,
        )
        start = time.perf_counter()
        with torch_threads(zoo_threads()) as threads:  # the zoo's own count, not the caller's (see zoo_threads)
            model, accuracy = train_recipe(recipe, device=torch.device(device), progress=progress)
        log.info("zoo: %s trained in %.0f s, test accuracy %.4f", name, time.perf_counter() - start, accuracy)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        meta = {
            "recipe": json.dumps(asdict(recipe)),
            "test_accuracy": f"{accuracy:.6f}",
            "torch": torch.__version__,
            "threads": str(threads),
        }
        write_atomic(path, lambda tmp: save_file(state, str(tmp), metadata=meta))
    return path


def metadata(name: str) -> dict[str, Any] | None:
    """The cached model's metadata (recipe, test accuracy), or None when not built."""
    from safetensors import safe_open

    path = zoo_path(_recipe(name))
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as fh:
            meta = dict(fh.metadata() or {})
    except Exception as exc:  # safetensors' own error types for a damaged file
        raise SurgeryInputError(f"zoo:{name}: cached file {path} is unreadable ({exc}); delete it to rebuild") from None
    meta["test_accuracy"] = float(meta.get("test_accuracy", "nan"))
    meta["path"] = str(path)
    return meta


def load_zoo_model(name: str, *, device: torch.device | str = "cpu", progress: bool | None = None) -> nn.Module:
    """The trained zoo model (built on first use), in eval mode."""
    recipe = _recipe(name)
    path = build(name, device=device, progress=progress)
    model = make_stem(recipe.channels) if recipe.kind == "stem" else _architecture(recipe)
    load_weights(model, load_state_dict_file(path), origin=f"zoo:{name} ({path})")
    return model.to(device).eval()


def status() -> list[dict[str, Any]]:
    """One row per zoo model: name, architecture, dataset, test accuracy, cached or not."""
    rows = []
    for recipe in ZOO.values():
        meta = metadata(recipe.name)
        rows.append(
            {
                "name": recipe.name,
                "arch": recipe.arch if recipe.kind == "classifier" else "conv 3→64 7×7 s2",
                "dataset": recipe.dataset,
                "test_accuracy": meta["test_accuracy"] if meta else None,
                "cached": meta is not None,
                "path": str(zoo_path(recipe)),
            }
        )
    return rows
