"""A user's own data: image folders, tars and Dataset references, decoded once into the uint8 cache and fed
the way the source model expects (its mean, std, resize and crop).

Every folder here is real files on disk (JPEG and PNG written by PIL); every cache is a temporary
``$SURGERY_CACHE``. Sizes are small (48-64 px, tens of images) so each test runs in seconds; the
224 px, 10,000-image figures are in ``benchmarks/test_real_data.py``.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, PILToTensor, Resize

from surgery.case import load_case
from surgery.data.datasets import load_split
from surgery.train.finetune import finetune
from surgery.data.image_cache import CachedImages
from surgery.running.prepare import load_data
from surgery.data.preprocess import IMAGENET_PREPROCESS, ZOO_PREPROCESS, torchvision_preprocess
from surgery.stats.activation_probe import probe_activations
from surgery.spec import AugmentSpec, DatasetSpec, FinetuneSpec
from surgery.train.augment import augment_batch, augment_generator
from surgery.synthetic import write_shapes_folder

from cli_runs import run_case_file


@pytest.fixture
def folder(tmp_path: Path, isolated_cache: Path) -> Path:
    """40 real JPEG shapes of 72 px in five class folders (larger than the 48 px crop, so resize and crop act)."""
    return write_shapes_folder(tmp_path / "photos", count=40, size=72, seed=3)


def _split(spec: DatasetSpec, size: int = 48, **kw):
    return load_split(spec, image_size=size, channels=3, seed=0, **kw)


def test_folder_is_decoded_once_into_a_uint8_cache_and_read_from_it(folder: Path, isolated_cache: Path):
    spec = DatasetSpec(name="imagefolder", root=str(folder))
    first = _split(spec)
    assert isinstance(first.train_x, CachedImages) and first.num_classes == 5
    records = list((isolated_cache / "images").glob("*.u8"))
    assert len(records) == 1 and records[0].stat().st_size == 40 * 3 * 48 * 48  # uint8, one record per image
    stamp = records[0].stat().st_mtime_ns, records[0].stat().st_ino
    second = _split(spec)  # another seed, case or process reading the same folder at the same size
    assert (records[0].stat().st_mtime_ns, records[0].stat().st_ino) == stamp
    assert torch.equal(first.test_x[:], second.test_x[:]) and torch.equal(first.train_y, second.train_y)
    # a different size is a different cache; the first one stays
    _split(spec, size=40)
    assert len(list((isolated_cache / "images").glob("*.u8"))) == 2


def test_cached_pixels_are_torchvisions_resize_and_centre_crop(folder: Path):
    split = _split(DatasetSpec(name="imagefolder", root=str(folder)))
    cached: CachedImages = split.test_x
    reference = Compose([Resize(48), CenterCrop(48), PILToTensor()])  # crop_pct 1: the zoo's preprocessing
    paths = sorted(folder.glob("*/*.jpg"))
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    by_row = {row: p for row, p in enumerate(sorted(paths, key=lambda p: (p.parent.name, p.name)))}
    for position in range(3):
        row = int(cached.rows[position])
        path = by_row[row]
        expected = reference(Image.open(path).convert("RGB"))
        assert torch.equal(cached.read(position)[0], expected)
        assert int(split.test_y[position]) == classes.index(path.parent.name)
        # the float batch is the zoo's (x / 255 - 0.5) / 0.5, computed where the batch is
        assert torch.allclose(cached[position], (expected.float() / 255 - 0.5) / 0.5)


def test_a_changed_file_makes_a_new_cache(folder: Path, isolated_cache: Path):
    spec = DatasetSpec(name="imagefolder", root=str(folder))
    before = _split(spec).test_x.entry.key
    victim = next(folder.glob("*-ring/*.jpg"))
    Image.new("RGB", (72, 72), (255, 0, 0)).save(victim)
    assert _split(spec).test_x.entry.key != before


def test_a_tar_of_the_folder_reads_the_same_images(folder: Path, tmp_path: Path):
    archive = tmp_path / "photos.tar"
    with tarfile.open(archive, "w") as tar:
        for path in sorted(folder.glob("*/*.jpg")):
            tar.add(path, arcname=f"{path.parent.name}/{path.name}")
    from_folder = _split(DatasetSpec(name="imagefolder", root=str(folder)))
    from_tar = _split(DatasetSpec(name="imagefolder", root=str(archive)))
    assert torch.equal(from_folder.train_y, from_tar.train_y)
    assert torch.equal(from_folder.train_x[:], from_tar.train_x[:])
    assert not list(tmp_path.glob("_*.pickle"))  # timm's tar-info cache is never written beside the user's tar


def test_a_dataset_by_reference_with_keyword_arguments(isolated_cache: Path):
    spec = DatasetSpec.model_validate(
        {
            "dataset": "torchvision.datasets:FakeData",
            "size": 30,
            "image_size": [3, 40, 40],
            "num_classes": 3,
            "random_offset": 5,
        }
    )
    assert spec.kwargs == {"size": 30, "image_size": [3, 40, 40], "num_classes": 3, "random_offset": 5}
    split = _split(spec, size=32)
    fake = torchvision.datasets.FakeData(size=30, image_size=(3, 40, 40), num_classes=3, random_offset=5)
    labels = torch.tensor([int(fake[i][1]) for i in range(30)])
    assert torch.equal(torch.cat([split.train_y, split.test_y]).sort().values, labels.sort().values)
    assert split.train_x.shape[1:] == (3, 32, 32)


def test_mixed_image_modes_are_converted_not_refused(tmp_path: Path, isolated_cache: Path):
    root = tmp_path / "mixed"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
    Image.new("L", (40, 40), 200).save(root / "a" / "gray.png")
    Image.new("RGBA", (40, 40), (10, 20, 30, 0)).save(root / "a" / "alpha.png")
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(root / "b" / "cmyk.jpg")
    Image.new("P", (40, 40), 3).save(root / "b" / "palette.png")
    images = _split(DatasetSpec(name="imagefolder", root=str(root)), size=32, test_fraction=0.5)
    everything = torch.cat([images.train_x.read(slice(None)), images.test_x.read(slice(None))])
    assert everything.shape == (4, 3, 32, 32)
    gray = [img for img in everything if (img == 200).all()]
    assert len(gray) == 1  # a grayscale image becomes three equal channels


# --------------------------------------------------------------------------- bad input, found at run time

CASE = """\
name: own-data
device: cpu
data:
  train: {train}
  image_size: 48
source: {{model: "torchvision:resnet18", num_classes: 5}}
surgery: {{op: activation_swap, from: relu, to: silu}}
finetune: {{steps: 1, batch_size: 4}}
expect:
  activations: {{layers: [layer1], drift_max: 10.0}}
"""


def _bad_run(tmp_path: Path, train: str) -> tuple[int, str, Path]:
    case = tmp_path / "own.yaml"
    case.write_text(CASE.format(train=train))
    report = tmp_path / "report"
    run = run_case_file(case, report)
    return run.rc, run.err.strip(), report


def test_a_truncated_image_is_bad_input_naming_the_image(folder: Path, tmp_path: Path):
    victim = next(folder.glob("*-cross/*.jpg"))
    victim.write_bytes(victim.read_bytes()[:200])
    rc, err, report = _bad_run(tmp_path, f"{{name: imagefolder, root: {folder}}}")
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"surgery: error: {tmp_path / 'own.yaml'}:4: data.train.root:") and str(victim) in err
    assert not (report / "own-data").exists()


@pytest.mark.parametrize(
    "layout,fragment",
    [
        ({"cats": 3, "dogs": 0}, "class folder 'dogs' holds no images"),
        ({"cats": 3}, "1 class folder(s)"),
    ],
)
def test_empty_and_single_class_folders_are_bad_input(tmp_path: Path, isolated_cache: Path, layout, fragment):
    root = tmp_path / "data"
    for name, count in layout.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (50, 50), (i * 40, 0, 0)).save(root / name / f"{i}.png")
    rc, err, _ = _bad_run(tmp_path, f"{{name: imagefolder, root: {root}}}")
    assert rc == 2 and "own.yaml:4: data.train.root:" in err and fragment in err, err


def test_a_reference_that_is_not_a_dataset_is_bad_input(tmp_path: Path, isolated_cache: Path):
    rc, err, _ = _bad_run(tmp_path, '{dataset: "torchvision.models:resnet18"}')
    assert rc == 2 and "own.yaml:4: data.train.dataset:" in err and "not a map-style" in err, err


def test_a_standard_library_reference_is_refused_before_anything_is_imported(tmp_path: Path):
    rc, err, _ = _bad_run(tmp_path, '{dataset: "pickle:loads"}')
    assert rc == 2 and "own.yaml:4" in err and "standard library" in err, err


# --------------------------------------------------------------------------- preprocessing from the model


def _pretrained_file(kind: str, name: str) -> Path:
    """Where the builder looks for the cached pretrained weights of ``kind:name`` (under $TORCH_HOME)."""
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    if kind == "torchvision":
        return hub / Path(torchvision.models.get_model_weights(name).DEFAULT.url).name
    import timm

    url = timm.models.get_pretrained_cfg(name).url or ""
    return hub / (Path(url).name if url else f"{name}.safetensors")


@pytest.mark.parametrize(
    "ref,mean,crop_pct",
    [
        ("torchvision:resnet18", (0.485, 0.456, 0.406), 224 / 256),
        ("timm:resnet18", (0.485, 0.456, 0.406), 0.95),
    ],
)
def test_a_pretrained_source_is_fed_its_own_preprocessing(folder: Path, tmp_path: Path, ref, mean, crop_pct):
    kind, _, name = ref.partition(":")
    path = _pretrained_file(kind, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    from surgery.models.checkpoints import build_architecture

    model = build_architecture(ref, num_classes=1000, in_chans=3)  # "pretrained": weights the test writes
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(path))
    else:
        torch.save(model.state_dict(), path)
    case_path = tmp_path / "pretrained.yaml"
    case_path.write_text(
        CASE.format(train=f"{{name: imagefolder, root: {folder}}}").replace(
            '{model: "torchvision:resnet18", num_classes: 5}', f'{{model: "{ref}", pretrained: true}}'
        )
    )
    case = load_case(case_path)
    split = load_data(case, seed=0)
    assert split.preprocess.mean == mean and split.preprocess.crop_pct == pytest.approx(crop_pct)
    # the images fed are the model's: resized to round(48 / crop_pct), centre-cropped to 48, its mean and std
    assert split.test_x.entry.geometry["resize"] == round(48 / crop_pct)
    pixels = split.test_x.read(slice(0, 2)).float() / 255
    std = torch.tensor(split.preprocess.std).view(1, 3, 1, 1)
    assert torch.allclose(split.test_x[0:2], (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / std, atol=1e-6)
    run = run_case_file(case_path, tmp_path / "report")
    assert run.rc == 0, run.err
    recorded = run.results["provenance"]["preprocess"]
    assert recorded["mean"] == list(mean) and recorded["crop"] == 48 and recorded["resize"] == round(48 / crop_pct)
    assert kind in recorded["origin"]


def test_preprocess_overrides_and_defaults():
    assert torchvision_preprocess("resnet50").resize_for(224) == 232  # IMAGENET1K_V2: resize 232, crop 224
    assert ZOO_PREPROCESS.normalize(torch.ones(1, 3, 2, 2)).eq(1).all()
    gray = IMAGENET_PREPROCESS.for_channels(1)
    assert gray.mean == pytest.approx((sum(IMAGENET_PREPROCESS.mean) / 3,))


def test_data_preprocess_in_a_case_overrides_the_model(folder: Path, tmp_path: Path):
    case_path = tmp_path / "over.yaml"
    case_path.write_text(
        CASE.format(train=f"{{name: imagefolder, root: {folder}}}").replace(
            "  image_size: 48\n", "  image_size: 48\n  preprocess: {preset: imagenet, crop_pct: 0.5}\n"
        )
    )
    split = load_data(load_case(case_path), seed=0)
    assert split.preprocess.mean == IMAGENET_PREPROCESS.mean and split.preprocess.crop_pct == 0.5
    assert split.test_x.entry.geometry["resize"] == 96
    assert "data.preprocess" in split.preprocess.origin


# --------------------------------------------------------------------------- augmentation, DataLoader probes


def test_augmentation_is_seeded_and_a_flip_alone_is_exact():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    flip = AugmentSpec(hflip=True)
    a = augment_batch(x, flip, augment_generator(0))
    b = augment_batch(x, flip, augment_generator(0))
    assert torch.equal(a, b)
    for image, out in zip(x, a):
        assert torch.equal(out, image) or torch.equal(out, image.flip(-1))
    crop = AugmentSpec(hflip=True, random_resized_crop={"scale": (0.3, 0.6)})
    c = augment_batch(x.repeat(8, 1, 1, 1), crop, augment_generator(1))
    assert c.shape == (16, 3, 4, 4) and not torch.equal(c, x.repeat(8, 1, 1, 1))
    assert torch.equal(c, augment_batch(x.repeat(8, 1, 1, 1), crop, augment_generator(1)))


def test_finetune_streams_cached_images_with_augmentation(folder: Path, make_tiny):
    split = _split(DatasetSpec(name="imagefolder", root=str(folder)), size=16)
    spec = FinetuneSpec(
        steps=6, batch_size=8, eval_every=3, augment=AugmentSpec(hflip=True, random_resized_crop={"scale": (0.5, 1.0)})
    )
    models = [make_tiny(num_classes=5, in_chans=3) for _ in range(2)]
    runs = [
        finetune(m, split.train_x, split.train_y, split.test_x, split.test_y, spec, seed=4, device=torch.device("cpu"))
        for m in models
    ]
    assert runs[0].steps_done == 6 and runs[0].finite
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        assert torch.equal(a, b)  # deterministic for a seed, read-ahead thread and all


def test_probe_takes_a_dataloader_as_it_takes_a_tensor(make_tiny):
    model = make_tiny(num_classes=10, in_chans=1)
    x, y = torch.randn(48, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.zeros(48, dtype=torch.long)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    from_tensor = probe_activations(model, x, ["*"], batch_size=16)
    from_loader = probe_activations(model, loader, ["*"])
    from_list = probe_activations(model, [x[:16], x[16:]], ["*"])
    for name, stats in from_tensor.items():
        assert from_loader[name].count == stats.count == from_list[name].count
        assert from_loader[name].mean == pytest.approx(stats.mean, rel=1e-6)
        assert np.allclose(from_loader[name].sample, stats.sample)


def test_the_folder_case_records_what_it_read(folder: Path, tmp_path: Path):
    case_path = tmp_path / "own.yaml"
    case_path.write_text(CASE.format(train=f"{{name: imagefolder, root: {folder}}}"))
    run = run_case_file(case_path, tmp_path / "report")
    assert run.rc == 0, run.err
    results = run.results
    assert results["provenance"]["preprocess"]["origin"].startswith("zoo")
    seed = results["per_seed"][0]
    assert seed["data"]["train"] + seed["data"]["test"] == 40 and seed["data"]["classes"] == 5
    assert json.loads(json.dumps(results))  # strict JSON
    # The page states the preprocessing in words (a figure per key), never a Python dict's repr.
    page = next(run.report.glob("*/report.html")).read_text()
    assert "mean 0.5 · std 0.5" in page and "crop 48" in page and "{&#39;" not in page and "{'" not in page


def test_the_tiny_224px_folder_case_runs(tmp_path: Path):
    """examples/scale/tiny-folder-224.yaml: real JPEG files at 224 px through the whole run, on every change
    (the session's zoo cache: its source is the zoo's MNIST ResNet-18, which the seed cases need too)."""
    case = Path(__file__).resolve().parent.parent / "examples" / "scale" / "tiny-folder-224.yaml"
    run = run_case_file(case, tmp_path / "report")
    assert run.rc == 0, run.out + run.err
    results = run.results
    assert results["per_seed"][0]["data"]["classes"] == 5
    assert results["provenance"]["preprocess"]["crop"] == 224


# --------------------------------------------------------------------------- batched decoders (data.decoder)


def _decoded(root: Path, decoder: str, size: int = 48) -> torch.Tensor:
    """Every image of the folder at ``root`` as the cache holds it when ``decoder`` decodes it."""
    from surgery.data.image_cache import cached_entry
    from surgery.data.image_sources import Geometry, folder_source

    entry = cached_entry(
        folder_source(str(root)), Geometry(resize=size, crop=size, channels=3, decoder=decoder), workers=0
    )
    return CachedImages(entry, np.arange(entry.count), ZOO_PREPROCESS).read(slice(None))


def _mixed_folder(folder: Path) -> Path:
    """The shapes folder plus a PNG and a CMYK JPEG: files decode_jpeg does not read, PIL does."""
    Image.new("RGB", (60, 50), (250, 10, 10)).save(folder / "0-circle" / "png.png")
    Image.new("CMYK", (50, 60), (0, 255, 255, 0)).save(folder / "1-square" / "cmyk.jpg")
    return folder


def _assert_close_to_pil(root: Path, decoder: str, *, mean: float, most: float) -> None:
    """Pixels within ``mean`` grey levels of PIL's on average, and 99% of them within ``most``."""
    reference, batched = _decoded(root, "pil"), _decoded(root, decoder)
    assert batched.shape == reference.shape and batched.dtype == torch.uint8
    difference = (batched.int() - reference.int()).abs().float()
    assert difference.mean() < mean and torch.quantile(difference, 0.99) <= most, (difference.mean(), difference.max())


def test_the_torchvision_decoder_writes_what_pil_writes_within_rounding(folder: Path, isolated_cache: Path):
    # the same libjpeg-turbo decode, resized as a tensor instead of a PIL image: 0.15 levels apart on average
    _assert_close_to_pil(_mixed_folder(folder), "cpu", mean=0.5, most=1)
    # its own cache entry beside PIL's: another decoder writes other pixels
    assert len(list((isolated_cache / "images").glob("*.u8"))) == 2


def test_the_torchvision_decoder_refuses_a_truncated_image_as_pil_does(folder: Path, isolated_cache: Path):
    from surgery.errors import SurgeryInputError

    victim = next(folder.glob("*-cross/*.jpg"))
    victim.write_bytes(victim.read_bytes()[:300])
    with pytest.raises(SurgeryInputError, match=f"cannot read image {victim}"):
        _decoded(folder, "cpu")
    assert not list((isolated_cache / "images").glob("*.u8"))  # nothing half-written is left


@pytest.mark.gpu
def test_the_cuda_decoder_writes_what_pil_writes_within_rounding(folder: Path, isolated_cache: Path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _assert_close_to_pil(_mixed_folder(folder), "cuda", mean=1.5, most=8)  # nvJPEG's IDCT is not libjpeg's


def test_a_case_asks_for_the_batched_decoder(folder: Path, tmp_path: Path, isolated_cache: Path):
    case_path = tmp_path / "own.yaml"
    case_path.write_text(CASE.format(train=f"{{name: imagefolder, root: {folder}, decoder: cpu}}"))
    run = run_case_file(case_path, tmp_path / "report")
    assert run.rc == 0, run.err
    (meta,) = (json.loads(p.read_text()) for p in (isolated_cache / "images").glob("*.json"))
    assert meta["geometry"]["decoder"] == "cpu"
    case_path.write_text(CASE.format(train="{name: shapes, decoder: cpu}"))
    bad = run_case_file(case_path, tmp_path / "report-bad")
    assert bad.rc == 2 and "decoder" in bad.err and len(bad.err.strip().splitlines()) == 1, bad.err
