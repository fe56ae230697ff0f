"""The building blocks of a case file's schema: strict sections, thresholds, data, models, fine-tune.

No torch here: pydantic models only. :mod:`surgery.case` assembles a case from them and from the
sections each operation and each check registers (:mod:`surgery.checks.base`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, field_validator, model_validator
from pydantic_core import PydanticCustomError

from surgery.models.model_refs import refuse_untrusted, validate_model_ref

DATASETS = ("mnist5k", "digits", "shapes", "imagefolder", "dataset")
EMBEDDED_DATASETS = ("mnist5k", "digits", "shapes")  # held as tensors; the others stream from a uint8 cache


class Strict(BaseModel):
    """Base for every case-file section: unknown keys are errors that list the known ones."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            allowed = [f.alias or n for n, f in cls.model_fields.items() if not f.exclude]
            for key in data:
                if key not in allowed:
                    raise PydanticCustomError(
                        "unknown_key",
                        "unknown key {shown}; expected one of: {allowed}",
                        {"key": key, "shown": repr(key), "allowed": ", ".join(allowed)},
                    )
        return data


# --------------------------------------------------------------------------- thresholds

CALIBRATE = "calibrate"
Threshold = Union[float, dict[int, float], str]
"""A threshold in a case file, in one of three forms:

- a number: a *claim* the case asserts (kept as written; calibration says whether the seeds a run
  uses can decide it, and an undecided claim is reported as undecided, never as passed);
- a mapping from seed count to number, ``{1: 0.884, 3: 0.902}``: a *calibrated* threshold, written
  by ``surgery calibrate --write``; a run of k seeds uses the entry of the largest count <= k;
- the word ``calibrate``: a placeholder for a threshold ``surgery calibrate --write`` will fill in.
"""


@dataclass(frozen=True)
class ThresholdRange:
    """The numbers a threshold field accepts (annotation metadata; calibration clips its bounds to it)."""

    lo: float | None
    hi: float | None

    def clip(self, value: float) -> float:
        """``value`` moved into the range."""
        if self.lo is not None and value < self.lo:
            return self.lo
        return self.hi if self.hi is not None and value > self.hi else value


def threshold_range(spec: BaseModel, field: str) -> ThresholdRange:
    """The range of a threshold field of an ``expect`` section (unbounded when it declares none)."""
    info = type(spec).model_fields[field]
    found = [m for m in info.metadata if isinstance(m, ThresholdRange)]
    pending = [info.annotation]
    while pending and not found:  # ``Annotated[...] | None`` keeps its metadata inside the union
        hint = pending.pop()
        found = [m for m in getattr(hint, "__metadata__", ()) if isinstance(m, ThresholdRange)]
        pending += list(get_args(hint))
    return found[0] if found else ThresholdRange(None, None)


def threshold(lo: float | None = None, hi: float | None = None) -> Any:
    """The annotated type of a threshold field whose numbers must lie in [lo, hi]."""
    span = (
        f"in [{lo:g}, {hi:g}]"
        if lo is not None and hi is not None
        else f">= {lo:g}"
        if lo is not None
        else "a finite number"
    )

    def number(value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"got {value!r}{where}; expected a number {span}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ValueError(f"got {value!r}{where}; expected a number {span}")
        return float(value)

    def check(value: Any) -> Threshold:
        if value == CALIBRATE:
            return CALIBRATE
        if isinstance(value, dict):
            if not value:
                raise ValueError("empty mapping; expected seed counts to thresholds, e.g. {1: 0.88, 3: 0.9}")
            out = {}
            for key, item in value.items():
                if isinstance(key, bool) or not isinstance(key, int) or key < 1:
                    raise ValueError(f"key {key!r}: expected a seed count >= 1, e.g. {{1: 0.88, 3: 0.9}}")
                out[key] = number(item, f" for {key} seed(s)")
            return dict(sorted(out.items()))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return number(value, "")
        raise ValueError(
            f"got {value!r}; expected a number {span}, a mapping from seed count to such a "
            f"number (e.g. {{1: 0.88, 3: 0.9}}), or {CALIBRATE!r}"
        )

    # Typed Any for pydantic: the validator above is the whole check, and serialisation passes values through.
    return Annotated[Any, PlainValidator(check), ThresholdRange(lo, hi)]


UnitThreshold = threshold(0.0, 1.0)
SignedUnitThreshold = threshold(-1.0, 1.0)
NonNegativeThreshold = threshold(0.0)


def check_reference_syntax(ref: str, what: str) -> str:
    """A ``package.module:Name`` reference checked as text (no import): syntax, and the trust rules of model
    factories (:func:`surgery.models.model_refs.refuse_untrusted`). Importing it is the run's job."""
    module_name, sep, name = ref.partition(":")
    if not sep or not all(part.isidentifier() for part in module_name.split(".")) or not name.isidentifier():
        raise ValueError(f"{what} {ref!r}: expected package.module:Name, e.g. torchvision.datasets:CIFAR10")
    refuse_untrusted(ref, what)
    return ref


class DatasetSpec(Strict):
    """One dataset. A bare string (``digits``) is shorthand for ``{name: digits}``.

    ``{dataset: "torchvision.datasets:CIFAR10", root: ~/data, train: true}`` names any map-style
    ``torch.utils.data.Dataset`` by reference; its other keys are the dataset's keyword arguments.
    """

    name: Literal["mnist5k", "digits", "shapes", "imagefolder", "dataset"] = Field(
        description="mnist5k (5,000 MNIST digits), digits (scikit-learn's 1,797 8x8 digits), shapes (generated), "
        "imagefolder (read from root) or dataset (a reference)"
    )
    root: str | None = Field(
        None,
        description="imagefolder: a directory of class folders, or a .tar of one; dataset: passed as its root argument",
    )
    dataset: str | None = Field(
        None, description="a map-style Dataset by reference, package.module:Name (same trust rules as model factories)"
    )
    kwargs: dict[str, Any] | None = Field(
        None, description="dataset: keyword arguments (written inline beside 'dataset')"
    )
    decoder: Literal["pil", "cpu", "cuda"] | None = Field(
        None,
        description="imagefolder: who decodes the files on the first read: pil (default: torchvision "
        "ImageFolder's pixels exactly), or torchvision.io.decode_jpeg in batches on cpu or cuda (nvJPEG); "
        "files it cannot read go through PIL",
    )
    limit: int | None = Field(None, gt=0, description="use at most this many samples")
    size: int = Field(3000, gt=0, description="shapes: number of images generated")
    background: float = Field(0.0, ge=0, le=1, description="shapes: background brightness")
    color_shift: float = Field(0.0, ge=-1, le=1, description="shapes: shift of the foreground hue")
    noise: float = Field(0.0, ge=0, description="shapes: std of added Gaussian noise")
    blur: float = Field(0.0, ge=0, description="shapes: sigma of a Gaussian blur, in pixels")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"name": data}
        if isinstance(data, dict) and "dataset" in data:
            own = {"name", "dataset", "root", "limit"}
            kwargs = {k: v for k, v in data.items() if k not in own}
            return {
                **{k: v for k, v in data.items() if k in own},
                "name": data.get("name", "dataset"),
                "kwargs": kwargs or None,
            }
        return data

    @field_validator("dataset")
    @classmethod
    def _reference(cls, ref: str | None) -> str | None:
        return None if ref is None else check_reference_syntax(ref, "dataset")

    @model_validator(mode="after")
    def _root_for_imagefolder(self) -> "DatasetSpec":
        if self.name == "imagefolder" and not self.root:
            raise ValueError("imagefolder needs 'root': a directory with one folder per class, or a .tar of one")
        if self.name == "dataset" and not self.dataset:
            raise ValueError("name 'dataset' needs 'dataset': a reference such as torchvision.datasets:CIFAR10")
        if self.decoder is not None and self.name != "imagefolder":
            raise ValueError("'decoder' applies to an imagefolder's files; drop it")
        if self.dataset and self.name != "dataset":
            raise ValueError(f"'dataset' is a reference of its own; drop 'name: {self.name}'")
        return self

    @property
    def embedded(self) -> bool:
        """True for the embedded sets, held as tensors; False for files and datasets read through the cache."""
        return self.name in EMBEDDED_DATASETS


class PreprocessSpec(Strict):
    """``data.preprocess``: overrides of the source model's preprocessing (any field left out keeps the model's)."""

    preset: Literal["zoo", "imagenet"] | None = Field(
        None,
        description="start from a preset instead of the source's own: zoo ([-1, 1]) or imagenet (mean/std, crop 0.875)",
    )
    mean: list[float] | None = Field(None, min_length=1, max_length=3, description="per-channel mean in [0, 1] units")
    std: list[Annotated[float, Field(gt=0)]] | None = Field(
        None, min_length=1, max_length=3, description="per-channel std"
    )
    crop_pct: float | None = Field(
        None, gt=0, le=1, description="centre crop / resized shorter side (torchvision's ResNet-50: 224 / 232)"
    )
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = Field(
        None,
        description="resampling of the resize before the centre crop (folders and datasets; embedded sets: bilinear)",
    )

    @model_validator(mode="before")
    @classmethod
    def _preset_shorthand(cls, data: Any) -> Any:
        return {"preset": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _same_length(self) -> "PreprocessSpec":
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values but std {len(self.std)}; give one per channel")
        return self


class DataSpec(Strict):
    train: DatasetSpec = Field(
        description="the images the run trains and tests on, split train/test by each seed (after the holdout)"
    )
    probe: DatasetSpec | None = Field(None, description="probe set for activations; default: train's test split")
    image_size: int = Field(
        32, ge=8, le=512, description="side of the square images the models see, in pixels (images are resized to it)"
    )
    channels: Literal[1, 3] = Field(3, description="1 (grey) or 3 (RGB) image channels; the models' default in_chans")
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="fraction of data.train (holdout excluded) in each seed's test split"
    )
    split_seed: int | None = Field(
        None,
        description="fixed train/test split (default: the run's seed); "
        "set 0 on mnist5k to keep the zoo's own test split unseen",
    )
    probe_size: int = Field(256, gt=0, description="samples probed for activation statistics")
    holdout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="fraction of data.train kept for the release gate "
        "(`gate: {data: holdout}`): a fixed draw that no seed's train or test split contains",
    )
    preprocess: PreprocessSpec | None = Field(
        None,
        description="mean, std, crop_pct, interpolation; default: the "
        "source model's own (pretrained torchvision/timm), else the zoo's",
    )
    workers: int | None = Field(
        None, ge=0, le=64, description="processes decoding images on the first read (default: the CPU count, at most 8)"
    )


class ModelSpec(Strict):
    model: str = Field(description="torchvision:NAME | timm:NAME | zoo:NAME | package.module:factory")
    num_classes: int | None = Field(
        None,
        gt=0,
        description="outputs of the model's head; default: the train dataset's class count "
        "(a donor: the architecture's own; pretrained weights and zoo: models keep their head)",
    )
    in_chans: int | None = Field(
        None,
        gt=0,
        description="input channels of the model's first layer; default: data.channels (zoo: models keep theirs)",
    )
    checkpoint: str | None = Field(None, description=".pt/.pth (weights_only) or .safetensors")
    pretrained: bool = Field(False, description="timm/torchvision weights from the local cache only")

    @field_validator("model")
    @classmethod
    def _known_model(cls, ref: str) -> str:
        validate_model_ref(ref)
        return ref


class DistillSpec(Strict):
    temperature: float = Field(
        2.0,
        gt=0,
        description="softmax temperature of both the teacher's (source's) and the patient's logits; higher is softer",
    )
    weight: float = Field(
        0.5,
        ge=0,
        le=1,
        description="share of the distillation term in the loss: 0 is cross-entropy only, 1 distillation only",
    )


class OptimizerSpec(Strict):
    name: Literal["sgd", "adamw"] = Field("adamw", description="the optimiser: sgd (with momentum) or adamw")
    lr: float = Field(1e-3, gt=0, le=1e30, description="at most 1e30: times lr_scale it must stay a float32")
    weight_decay: float = Field(
        0.0, ge=0, le=1e6, description="weight decay of the optimiser (decoupled for adamw, L2 for sgd); 0: none"
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd's momentum, 0 to 1 (exclusive); adamw ignores it")


class ScheduleSpec(Strict):
    name: Literal["constant", "cosine"] = Field(
        "constant",
        description="the learning rate after warm-up: constant, or a cosine decay towards 0 at the last step",
    )
    warmup_steps: int = Field(
        0, ge=0, description="first steps, in which the learning rate rises linearly to lr; 0: none"
    )


class RandomResizedCropSpec(Strict):
    scale: tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]] = Field(
        (0.08, 1.0), description="[low, high]: the crop's area as a fraction of the image, drawn uniformly"
    )
    ratio: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = Field(
        (3 / 4, 4 / 3), description="[low, high]: the crop's aspect ratio (width / height), drawn log-uniformly"
    )


class AugmentSpec(Strict):
    """``finetune.augment``: seeded augmentation of each training batch, on the device; none by default."""

    hflip: bool = Field(False, description="flip half the images left-right")
    random_resized_crop: RandomResizedCropSpec | None = Field(
        None, description="a random crop of area in 'scale' and aspect in 'ratio', resized back"
    )


class ParamGroupSpec(Strict):
    params: str = Field(description="glob over parameter names, e.g. 'conv1.*' or 'layer4.*'")
    freeze: bool = Field(False, description="the group's parameters do not train (until unfreeze_at, if set)")
    lr_scale: float = Field(1.0, ge=0, le=1e6, description="factor on optimizer.lr for the group's parameters")
    unfreeze_at: int | None = Field(
        None, ge=0, description="step from which the group trains; before it the group is frozen, even without freeze"
    )


class FinetuneSpec(Strict):
    steps: int = Field(100, ge=0, description="optimiser steps of the fine-tune after surgery; 0: no fine-tune")
    batch_size: int = Field(64, ge=2, description="at least 2: BatchNorm cannot train on one example")
    optimizer: OptimizerSpec = Field(OptimizerSpec(), description="the optimiser and its learning rate")
    schedule: ScheduleSpec = Field(ScheduleSpec(), description="how the learning rate changes over the steps")
    eval_every: int = Field(
        25,
        gt=0,
        description=(
            "steps between evaluations on the test split (the report's fine-tune curve); the last step always is, "
            "and is the only one where no report is written (pytest without --surgery-report, calibration)"
        ),
    )
    clip_grad: float | None = Field(
        None, gt=0, description="gradients clipped to this total L2 norm at each step; none: no clipping"
    )
    groups: list[ParamGroupSpec] = Field(
        [],
        description="parameters by name glob with their own freeze, lr_scale, unfreeze_at; "
        "a parameter joins the first group that matches, else trains at lr",
    )
    bn_recalibrate: bool = Field(False, description="AdaBN on the train split before the first step")
    augment: AugmentSpec | None = Field(None, description="hflip, random_resized_crop; none by default")


class NotWorseThanSpec(Strict):
    """The non-inferiority rule of the gate: the candidate may be worse than the champion by at most ``accuracy``."""

    accuracy: float = Field(0.0, ge=0, le=1, description="largest accuracy loss against the champion accepted")
    confidence: float = Field(0.95, ge=0.5, lt=1, description="confidence of the one-sided bound on the loss")


class GateSpec(Strict):
    """The ``gate:`` section: what ``surgery gate`` scores a release candidate on, and against what."""

    data: Union[Literal["holdout"], DatasetSpec] = Field(
        "holdout", description="holdout: the part of data.train set aside by data.holdout; or a dataset, used whole"
    )
    champion: str | None = Field(None, description="the released checkpoint to compare with (--champion overrides)")
    not_worse_than: NotWorseThanSpec | None = Field(None, description="non-inferiority against the champion")
    resamples: int = Field(2000, ge=100, le=100_000, description="paired bootstrap resamples")


ARM_NAME = r"^[a-z][a-z0-9_-]{0,31}$"


class VariantSpec(Strict):
    """One arm of ``variants``: overrides of the case's surgery, fine-tune and expectations, or a random init.

    An arm with ``init: surgery`` (the default) is the case with these sections deep-merged over it, validated
    as a case of its own; one with ``init: random`` is the surgery's architecture from random init (the
    random-init baseline), fine-tuned on the same budget. Every arm runs on the same seeds, paired: within a
    seed all arms share the split, the batch order, the probe samples and the initial values of every tensor
    the surgery leaves fresh.
    """

    description: str = Field("", description="free text the report shows with the arm")
    init: Literal["surgery", "random"] = Field(
        "surgery",
        description="surgery: the case's surgery with this arm's overrides; random: its architecture "
        "from random init, fine-tuned on the same budget",
    )
    inits: int = Field(
        1,
        ge=1,
        le=16,
        description="random arms only: random initialisations per seed, their accuracies averaged "
        "(a quieter baseline); the first shares the fresh tensors' initial values with the surgery arms",
    )
    surgery: dict[str, Any] | None = Field(
        None, description="fields of the surgery section this arm changes (a new op replaces the section)"
    )
    finetune: dict[str, Any] | None = Field(None, description="fields of the finetune section this arm changes")
    expect: dict[str, Any] | None = Field(
        None, description="fields of the expect section this arm changes (its calibrated thresholds live here)"
    )

    @model_validator(mode="after")
    def _random_takes_no_surgery(self) -> "VariantSpec":
        if self.init == "random" and (self.surgery is not None or self.expect is not None):
            raise ValueError(
                "a random arm has no surgery and no expectations of its own; expected init, inits, finetune, "
                "description (compare it with expect.compare or expect.rank)"
            )
        if self.init == "surgery" and self.inits != 1:
            raise ValueError("inits averages random initialisations; expected it only with init: random")
        return self
