"""Work a process can reuse between cases: a figure computed from inputs equal to another's is the same.

Several cases train the same random-init baseline: the three ResNet-50 → ResNet-18 transplants
of ``cases/`` each fine-tune a fresh ResNet-18 on the same split for the same budget, the two
bridges a fresh ResNet-18 on the digits. Fine-tuning is deterministic for its inputs in one
process, so a baseline whose every input equals an earlier one's (architecture, initial tensors,
which of them train, the split, the fine-tune spec, seed, device, thread count) is looked up in
:data:`BASELINES` instead of trained again (see :func:`surgery.running.runner.run_baseline`). Likewise a
source model's accuracy: four cases evaluate the zoo's ResNet-50 on the same MNIST test split.
"""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn

from surgery.running.builder import digest_tensor
from surgery.data.datasets import Split
from surgery.data.image_cache import CachedImages
from surgery.train.finetune import evaluate
from surgery.spec import FinetuneSpec


def _digest_model(digest: Any, model: nn.Module) -> None:
    digest.update(repr(model).encode())
    for name, tensor in model.state_dict().items():
        digest_tensor(digest, name, tensor)
    digest.update(",".join(n for n, p in model.named_parameters() if p.requires_grad).encode())
    digest.update(
        ",".join(
            n
            for n, p in model.named_parameters()
            if p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
        ).encode()
    )


def _digest_numerics(digest: Any, device: torch.device) -> None:
    digest.update(
        f"|device {device}|threads {torch.get_num_threads()}|"
        f"deterministic {torch.are_deterministic_algorithms_enabled()}|".encode()
    )


def baseline_key(
    model: nn.Module, split: Split, spec: FinetuneSpec, *, seed: int, device: torch.device, curve: bool = True
) -> str:
    """SHA-256 of everything a baseline's fine-tune reads, and whether it draws a curve: equal keys mean equal
    results in this process."""
    digest = hashlib.sha256()
    _digest_model(digest, model)
    _digest_numerics(digest, device)
    digest.update(f"{spec.model_dump_json()}|seed {seed}|curve {curve}|".encode())
    for name in ("train_x", "train_y", "test_x", "test_y"):
        _digest_images(digest, name, getattr(split, name))
    return digest.hexdigest()


def _digest_images(digest: Any, name: str, images: torch.Tensor | CachedImages) -> None:
    if isinstance(images, CachedImages):
        digest.update(f"{name}|cached|".encode() + images.fingerprint())
    else:
        digest_tensor(digest, name, images)


def evaluation_key(model: nn.Module, x: torch.Tensor | CachedImages, y: torch.Tensor, *, device: torch.device) -> str:
    """SHA-256 of everything an evaluation of ``model`` on ``(x, y)`` reads."""
    digest = hashlib.sha256()
    _digest_model(digest, model)
    _digest_numerics(digest, device)
    _digest_images(digest, "x", x)
    digest_tensor(digest, "y", y)
    return digest.hexdigest()


class ResultMemo:
    """A bounded, least-recently-used map from a key to a result; returns copies, so callers own them."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self.results: OrderedDict[str, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Any | None:
        """A copy of the result stored under ``key``, or None (counted as a miss)."""
        if key not in self.results:
            self.misses += 1
            return None
        self.hits += 1
        self.results.move_to_end(key)
        return copy.deepcopy(self.results[key])

    def put(self, key: str, result: Any) -> None:
        self.results[key] = copy.deepcopy(result)
        self.results.move_to_end(key)
        while len(self.results) > self.capacity:
            self.results.popitem(last=False)

    def clear(self) -> None:
        self.results.clear()
        self.hits = self.misses = 0


BASELINES = ResultMemo()  # this process's baselines, by :func:`baseline_key`
SOURCE_ACCURACIES = ResultMemo()  # this process's source-model accuracies, by :func:`evaluation_key`


def source_accuracy(
    model: nn.Module, x: torch.Tensor | CachedImages, y: torch.Tensor, *, device: torch.device
) -> float:
    """``evaluate(model, x, y)``, or the figure of an earlier evaluation of equal weights on equal data."""
    key = evaluation_key(model, x, y, device=device)
    accuracy = SOURCE_ACCURACIES.get(key)
    if accuracy is None:
        accuracy = evaluate(model, x, y, device=device)
        SOURCE_ACCURACIES.put(key, accuracy)
    return accuracy
