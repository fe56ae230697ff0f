"""A real image folder the harness writes itself: procedural shapes saved as JPEG files, one folder per class.

For the 224 px cases and benchmarks (``cases/scale/``, ``benchmarks/``): real files that go through the
same path as a user's folder (listing, JPEG decoding, resize and crop, the image cache), at any count
and size, with nothing downloaded. ``surgery data synth DIR --count N --size S`` writes one; a case
reads one with ``data.train: {dataset: "surgery.synthetic:ShapesFolder", count: N, size: S}``.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from torchvision.datasets import ImageFolder

from surgery.files import cache_dir, write_atomic
from surgery.data.datasets import SHAPE_CLASSES, make_shapes

CHUNK = 256  # images generated at once (a 224 px float chunk is 154 MB)


def write_shapes_folder(
    root: str | Path, *, count: int, size: int, seed: int = 0, quality: int = 90, noise: float = 0.04
) -> Path:
    """Write ``count`` shape images of ``size`` px as JPEG files under ``root/CLASS/NNNNNN.jpg``; return ``root``.

    The class folders are ``0-circle`` … ``4-ring``: sorted, they give the labels of the embedded
    ``shapes`` set, so a shapes model's predictions are scored against the right labels (the zoo's,
    trained at 32 px, is at chance on 224 px files: 0.185 for 5 classes). Deterministic for a seed.
    Written once: a folder that already holds this count, size and seed (its ``surgery-synth.json``)
    is left as it is.
    """
    root = Path(root)
    classes = class_folders()
    stamp = {"count": count, "size": size, "seed": seed, "quality": quality, "noise": noise, "classes": classes}
    marker = root / "surgery-synth.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return root
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)

    def save_jpeg(rgb: np.ndarray, tmp: Path) -> None:
        Image.fromarray(np.ascontiguousarray(rgb)).save(tmp, format="JPEG", quality=quality)

    for start in range(0, count, CHUNK):
        n = min(CHUNK, count - start)
        images, labels = make_shapes(n, size, seed=seed * 1_000_003 + start, noise=noise)
        pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for i in range(n):
            path = root / classes[int(labels[i])] / f"{start + i:06d}.jpg"
            write_atomic(path, functools.partial(save_jpeg, pixels[i]))
    write_atomic(marker, lambda tmp: tmp.write_text(json.dumps(stamp)))
    return root


def class_folders() -> list[str]:
    """The class folder names, in label order: ``0-circle``, ``1-square``, …"""
    return [f"{i}-{name}" for i, name in enumerate(SHAPE_CLASSES)]


def synthetic_folder(count: int, size: int, seed: int = 0) -> Path:
    """The shapes folder of ``count`` images at ``size`` px under ``$SURGERY_CACHE/synth``, written if missing."""
    root = cache_dir() / "synth" / f"shapes-{count}-{size}px-seed{seed}"
    return write_shapes_folder(root, count=count, size=size, seed=seed)


def folder_bytes(root: str | Path) -> int:
    """The total size of the files under ``root``."""
    return sum(entry.stat().st_size for entry in os.scandir(root) if entry.is_file()) + sum(
        folder_bytes(entry.path) for entry in os.scandir(root) if entry.is_dir()
    )


class ShapesFolder(ImageFolder):
    """torchvision's ``ImageFolder`` over :func:`synthetic_folder` (written into the cache on first use).

    Items are ``(PIL image, label)`` decoded from the JPEG files, as a user's folder gives them.
    """

    def __init__(self, count: int = 1000, size: int = 224, seed: int = 0):
        super().__init__(str(synthetic_folder(count, size, seed)))
