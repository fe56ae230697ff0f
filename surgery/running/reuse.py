"""Work a process can reuse between cases: a figure computed from inputs equal to another's is the same.

Several cases train the same random-init baseline: the three ResNet-50 → ResNet-18 transplants
of ``cases/`` each fine-tune a fresh ResNet-18 on the same split for the same budget, the two
bridges a fresh ResNet-18 on the digits. Fine-tuning is deterministic for its inputs in one
process, so a baseline whose every input equals an earlier one's (architecture, initial tensors,
which of them train, the split, the fine-tune spec, seed, device, thread count) is looked up in
:data:`BASELINES` instead of trained again (see :func:`surgery.running.runner.run_baseline`). Likewise a
source model's accuracy: four cases evaluate the zoo's ResNet-50 on the same MNIST test split.

A source's accuracy is also kept on disk (``$SURGERY_CACHE/evaluations``), so that the next process, the
next run of an edited case, does not evaluate an unchanged source on unchanged data again: a ResNet-50
on 400 test images at 224 px takes 26 s on 2 cores. The file's name digests every input of the
evaluation and everything two processes may differ in (:func:`stored_accuracy_path`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import inspect
import json
from collections import OrderedDict
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from surgery.running.builder import digest_tensor
from surgery.data.datasets import Split
from surgery.data.image_cache import CachedImages
from surgery.train.finetune import evaluate
from surgery.files import cache_dir, write_atomic
from surgery.spec import FinetuneSpec
from surgery.train.numerics import numeric_profile


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
    model: nn.Module,
    x: torch.Tensor | CachedImages,
    y: torch.Tensor,
    *,
    device: torch.device,
    progress: bool | None = False,
) -> float:
    """``evaluate(model, x, y)``, or the figure of an earlier evaluation of equal weights on equal data: in this
    process (:data:`SOURCE_ACCURACIES`), else stored on disk by another (:func:`stored_accuracy`)."""
    key = evaluation_key(model, x, y, device=device)
    accuracy = SOURCE_ACCURACIES.get(key)
    if accuracy is None:
        stored = stored_accuracy_path(key, device)
        accuracy = stored_accuracy(stored)
        if accuracy is None:
            accuracy = evaluate(model, x, y, device=device, progress=progress, desc="evaluating the source")
            with contextlib.suppress(OSError):  # an unwritable cache costs the next process this evaluation
                write_atomic(stored, lambda tmp: tmp.write_text(json.dumps({"accuracy": accuracy})))
        SOURCE_ACCURACIES.put(key, accuracy)
    return accuracy


def stored_accuracy_path(key: str, device: torch.device) -> Path:
    """Where a source's accuracy under :func:`evaluation_key` ``key`` is kept between processes, under the cache's
    ``evaluations/``. The file's name adds what one process holds fixed but two may not: the numeric profile
    (CPU capability, threads, versions), the GPU, the libraries that define the models and the code that
    evaluates (an edit to it is a new name, never a stale figure)."""
    digest = hashlib.sha256(key.encode())
    digest.update(json.dumps(numeric_profile(), sort_keys=True).encode())
    digest.update(f"|torchvision {version('torchvision')}|timm {version('timm')}|".encode())
    if device.type == "cuda":
        digest.update(torch.cuda.get_device_name(device).encode())
    digest.update(_evaluation_code_digest())
    return cache_dir() / "evaluations" / f"{digest.hexdigest()[:32]}.json"


def stored_accuracy(path: Path) -> float | None:
    """The accuracy stored at ``path``, or None (absent, or unreadable: then evaluated again and replaced)."""
    try:
        accuracy = json.loads(path.read_text())["accuracy"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(accuracy) if isinstance(accuracy, (int, float)) and 0.0 <= accuracy <= 1.0 else None


@functools.cache
def _evaluation_code_digest() -> bytes:
    """SHA-256 of the modules whose code an evaluation runs: the evaluation loop and the image batches."""
    digest = hashlib.sha256()
    for code in (evaluate, CachedImages):
        digest.update(Path(inspect.getfile(code)).read_bytes())
    return digest.digest()
