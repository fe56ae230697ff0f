"""Case files: YAML that keeps its line numbers, validated by pydantic models.

Every error in a case file becomes one :class:`SurgeryInputError` line of the form
``cases/x.yaml:12: surgery.strategy: <what was wrong>; expected <what would be right>``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PlainValidator, ValidationError, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from surgery.errors import SurgeryInputError
from surgery.model_refs import validate_model_ref

DATASETS = ("mnist5k", "digits", "shapes", "imagefolder")


# --------------------------------------------------------------------------- YAML with marks

Path_ = tuple[Union[str, int], ...]


MAX_NODES = 100_000  # alias expansion beyond this is refused (a "billion laughs" document)
MERGE_TAG = "tag:yaml.org,2002:merge"
PLAIN_MAP, PLAIN_SEQ = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"


def _compose_with_lines(text: str, filename: str) -> tuple[Any, dict[Path_, int]]:
    """Parse YAML safely and return (data, {key path: 1-based line})."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SurgeryInputError(f"{filename}:{line}: YAML syntax error: {problem}") from None
    except RecursionError:
        raise SurgeryInputError(f"{filename}:1: YAML nested too deeply; expected a case file") from None
    lines: dict[Path_, int] = {}
    constructor = yaml.SafeLoader("")
    count = 0
    active: set[int] = set()  # nodes being converted: an alias to one of them is a cycle

    def construct(node: yaml.Node, path: Path_) -> Any:
        try:
            return constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            raise SurgeryInputError(f"{filename}:{node.start_mark.line + 1}: {_dotted(path) or '<top>'}: "
                                    f"{getattr(exc, 'problem', None) or exc}") from None

    def pairs(node: yaml.MappingNode, path: Path_) -> list[tuple[yaml.Node, yaml.Node, bool]]:
        """(key, value, from_merge) in priority order, merge keys (``<<``) expanded as safe_load does."""
        if not any(k.tag == MERGE_TAG for k, _ in node.value):
            return [(k, v, False) for k, v in node.value]
        explicit = sum(k.tag != MERGE_TAG for k, _ in node.value)
        try:
            constructor.flatten_mapping(node)  # puts the merged pairs first, the explicit ones last
        except yaml.YAMLError as exc:
            raise SurgeryInputError(f"{filename}:{node.start_mark.line + 1}: {_dotted(path) or '<top>'}: "
                                    f"{getattr(exc, 'problem', None) or exc}") from None
        merged = len(node.value) - explicit
        return [(k, v, i < merged) for i, (k, v) in enumerate(node.value)]

    def convert(node: yaml.Node, path: Path_) -> Any:
        nonlocal count
        count += 1
        if count > MAX_NODES:
            raise SurgeryInputError(f"{filename}:{node.start_mark.line + 1}: {_dotted(path) or '<top>'}: "
                                    f"document expands to more than {MAX_NODES} nodes (aliases); "
                                    "expected a case file")
        if id(node) in active:
            raise SurgeryInputError(f"{filename}:{node.start_mark.line + 1}: {_dotted(path) or '<top>'}: "
                                    "recursive alias; expected a tree of values")
        lines[path] = node.start_mark.line + 1
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            if node.tag not in (PLAIN_MAP, PLAIN_SEQ):  # e.g. !!python/object/apply on a list: never ignored
                raise SurgeryInputError(f"{filename}:{node.start_mark.line + 1}: {_dotted(path) or '<top>'}: "
                                        f"could not determine a constructor for the tag {node.tag!r}; "
                                        "expected plain YAML values")
            active.add(id(node))
            try:
                return convert_collection(node, path)
            finally:
                active.discard(id(node))
        return construct(node, path)

    def convert_collection(node: yaml.Node, path: Path_) -> Any:
        if isinstance(node, yaml.SequenceNode):
            return [convert(child, path + (i,)) for i, child in enumerate(node.value)]
        out: dict[Any, Any] = {}
        merged_keys: set[str] = set()
        for key_node, value_node, from_merge in pairs(node, path):
            key = construct(key_node, path)
            # Integer keys are seed counts of a calibrated threshold ({1: 0.88, 3: 0.9}); the schema
            # refuses them anywhere else as unknown keys.
            if not isinstance(key, str) and (isinstance(key, bool) or not isinstance(key, int)):
                raise SurgeryInputError(
                    f"{filename}:{key_node.start_mark.line + 1}: {_dotted(path) or '<top>'}: "
                    f"key {key!r} is not a string; expected a field name")
            if key in out and key not in merged_keys:
                raise SurgeryInputError(
                    f"{filename}:{key_node.start_mark.line + 1}: {_dotted(path + (key,))}: "
                    f"duplicate key; expected each field once")
            if from_merge:
                merged_keys.add(key)
            else:
                merged_keys.discard(key)
            if key in out:  # an explicit key overrides what a merge put there: forget its lines
                for sub in [p for p in lines if p[:len(path) + 1] == path + (key,)]:
                    del lines[sub]
            out[key] = convert(value_node, path + (key,))
            lines[path + (key,)] = key_node.start_mark.line + 1
        return out

    try:
        data = convert(root, ()) if root is not None else None
    except RecursionError:
        raise SurgeryInputError(f"{filename}:1: YAML nested too deeply; expected a case file") from None
    return data, lines


def _dotted(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# --------------------------------------------------------------------------- schema


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
                    raise PydanticCustomError("unknown_key", "unknown key {shown}; expected one of: {allowed}",
                                              {"key": key, "shown": repr(key), "allowed": ", ".join(allowed)})
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


def _threshold(lo: float | None = None, hi: float | None = None) -> Any:
    """The annotated type of a threshold field whose numbers must lie in [lo, hi]."""
    span = f"in [{lo:g}, {hi:g}]" if lo is not None and hi is not None else \
        f">= {lo:g}" if lo is not None else "a finite number"

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
        raise ValueError(f"got {value!r}; expected a number {span}, a mapping from seed count to such a "
                         f"number (e.g. {{1: 0.88, 3: 0.9}}), or {CALIBRATE!r}")

    # Typed Any for pydantic: the validator above is the whole check, and serialisation passes values through.
    return Annotated[Any, PlainValidator(check), ThresholdRange(lo, hi)]


UnitThreshold = _threshold(0.0, 1.0)


class DatasetSpec(Strict):
    """One dataset. A bare string (``digits``) is shorthand for ``{name: digits}``."""

    name: Literal["mnist5k", "digits", "shapes", "imagefolder"]
    root: str | None = Field(None, description="imagefolder: directory of class folders")
    limit: int | None = Field(None, gt=0, description="use at most this many samples")
    size: int = Field(3000, gt=0, description="shapes: number of images generated")
    background: float = Field(0.0, ge=0, le=1, description="shapes: background brightness")
    color_shift: float = Field(0.0, ge=-1, le=1, description="shapes: shift of the foreground hue")
    noise: float = Field(0.0, ge=0, description="shapes: std of added Gaussian noise")
    blur: float = Field(0.0, ge=0, description="shapes: sigma of a Gaussian blur, in pixels")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _root_for_imagefolder(self) -> "DatasetSpec":
        if self.name == "imagefolder" and not self.root:
            raise ValueError("imagefolder needs 'root': a directory with one folder per class")
        return self


class DataSpec(Strict):
    train: DatasetSpec
    probe: DatasetSpec | None = Field(None, description="probe set for activations; default: train's test split")
    image_size: int = Field(32, ge=8, le=512)
    channels: Literal[1, 3] = 3
    test_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int | None = Field(None, description="fixed train/test split (default: the run's seed); "
                                   "set 0 on mnist5k to keep the zoo's own test split unseen")
    probe_size: int = Field(256, gt=0, description="samples probed for activation statistics")


class ModelSpec(Strict):
    model: str = Field(description="torchvision:NAME | timm:NAME | zoo:NAME | package.module:factory")
    num_classes: int | None = Field(None, gt=0)
    in_chans: int | None = Field(None, gt=0)
    checkpoint: str | None = Field(None, description=".pt/.pth (weights_only) or .safetensors")
    pretrained: bool = Field(False, description="timm/torchvision weights from the local cache only")

    @field_validator("model")
    @classmethod
    def _known_model(cls, ref: str) -> str:
        validate_model_ref(ref)
        return ref


class TransplantSpec(Strict):
    op: Literal["transplant"]
    target: ModelSpec
    strategy: Literal["exact", "order", "select"] = "exact"
    adapt_input: bool = True


class ActivationSwapSpec(Strict):
    op: Literal["activation_swap"]
    from_: list[str] = Field(alias="from", min_length=1)
    to: str

    @field_validator("from_", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class GraftPolicy(Strict):
    freeze: bool = False
    lr_scale: float = Field(1.0, ge=0, le=1000)
    unfreeze_at: int | None = Field(None, ge=0, description="step at which a frozen graft starts training")


class GraftSpec(Strict):
    op: Literal["graft"]
    donor: ModelSpec
    path: str
    policy: GraftPolicy = GraftPolicy()


class DistillSpec(Strict):
    temperature: float = Field(2.0, gt=0)
    weight: float = Field(0.5, ge=0, le=1)


class BridgeSpec(Strict):
    op: Literal["bridge"]
    nodes: list[str] = Field(min_length=1)
    head: Literal["linear", "mlp", "transformer"] = "linear"
    num_classes: int | None = Field(None, gt=0, description="default: the train dataset's class count")
    hidden: int = Field(256, gt=0)
    depth: int = Field(1, gt=0)
    num_heads: int = Field(4, gt=0)
    distill: DistillSpec | None = None


SurgerySpec = Annotated[Union[TransplantSpec, ActivationSwapSpec, GraftSpec, BridgeSpec], Field(discriminator="op")]


class OptimizerSpec(Strict):
    name: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)


class ScheduleSpec(Strict):
    name: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)


class ParamGroupSpec(Strict):
    params: str = Field(description="glob over parameter names, e.g. 'conv1.*' or 'layer4.*'")
    freeze: bool = False
    lr_scale: float = Field(1.0, ge=0, le=1000)
    unfreeze_at: int | None = Field(None, ge=0)


class FinetuneSpec(Strict):
    steps: int = Field(100, ge=0)
    batch_size: int = Field(64, ge=2, description="at least 2: BatchNorm cannot train on one example")
    optimizer: OptimizerSpec = OptimizerSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    eval_every: int = Field(25, gt=0)
    clip_grad: float | None = Field(None, gt=0)
    groups: list[ParamGroupSpec] = []
    bn_recalibrate: bool = Field(False, description="AdaBN on the train split before the first step")


class CoverageExpect(Strict):
    tensors_min: UnitThreshold | None = None
    elements_min: UnitThreshold | None = None
    tensors_max: UnitThreshold | None = Field(None, description="for baselines expected to cover little")


class BeatsBaseline(Strict):
    margin: _threshold(-1.0, 1.0) = Field(0.0, description="after must exceed the baseline by at least this much")
    model: ModelSpec | None = Field(None, description="baseline model; default: the patient's architecture")


class AccuracyExpect(Strict):
    source_min: UnitThreshold | None = None
    before_min: UnitThreshold | None = None
    after_min: UnitThreshold | None = None
    recovery_min: _threshold(0.0) | None = None
    beats_baseline: BeatsBaseline | None = None
    aggregate: Literal["mean", "worst"] = "mean"


class ActivationsExpect(Strict):
    layers: list[str] = Field(min_length=1, description="module names or globs of the patient")
    reference_layers: list[str] | None = Field(None, description="the reference's names, if they differ")
    drift_max: _threshold(0.0) | None = Field(None, description="normalised W1; Evidently's default is 0.1")
    dead_max: UnitThreshold | None = None
    at: Literal["surgery", "finetune"] = Field("surgery", description="which patient drift_max applies to")


class BnRecalibrationExpect(Strict):
    gain_min: _threshold(-1.0, 1.0) = 0.0
    batches: int = Field(20, gt=0)


class Expectations(Strict):
    coverage: CoverageExpect | None = None
    accuracy: AccuracyExpect | None = None
    activations: ActivationsExpect | None = None
    bn_recalibration: BnRecalibrationExpect | None = None
    finite: bool = True


class Case(Strict):
    name: str = Field(min_length=1)
    description: str = ""
    seed: list[Annotated[int, Field(ge=0, le=2**63 - 1, strict=True)]] = Field(
        [0], min_length=1, description="one non-negative integer (below 2**63) or a list of them")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    markers: list[Literal["slow", "gpu"]] = []
    data: DataSpec
    source: ModelSpec
    surgery: SurgerySpec
    finetune: FinetuneSpec = FinetuneSpec()
    expect: Expectations

    # set by load_case, not by the file
    path: str = Field("<memory>", exclude=True)
    file_hash: str = Field("", exclude=True)
    lines: dict[str, int] = Field({}, exclude=True, description="dotted field path -> line in the file")

    def where(self, field: str) -> str:
        """``FILE:LINE: field`` for a dotted field path, its nearest parent's line if it is not in the file."""
        path = field
        while path and path not in self.lines:
            path = path.rpartition(".")[0]
        return f"{self.path}:{self.lines.get(path, 1)}: {field}"

    @field_validator("seed", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        """``seed: 3`` is ``seed: [3]``; any other scalar is checked as one seed, so its error says integer."""
        return value if isinstance(value, list) else [value]

    @model_validator(mode="before")
    @classmethod
    def _no_internal_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("path", "file_hash", "lines"):
                if key in data:
                    raise PydanticCustomError("unknown_key", "unknown key {shown}; it is set by the loader",
                                              {"key": key, "shown": repr(key)})
        return data


# --------------------------------------------------------------------------- loading


def _error_line(err: dict[str, Any], data: Any, lines: dict[Path_, int]) -> tuple[int, str]:
    """Map a pydantic error location onto the YAML: (line, dotted field path)."""
    loc = list(err["loc"])
    if err["type"] == "unknown_key":
        loc.append(err["ctx"]["key"])
    path: Path_ = ()
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            path += (part,)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            path += (part,)
            node = node[part]
        elif err["type"] == "unknown_key" and part == loc[-1]:
            path += (part,)
        # else: a union tag or validator name pydantic inserted; not a YAML key
    if err["type"] in ("union_tag_invalid", "union_tag_not_found") and isinstance(node, dict):
        path += ("op",)
    if err["type"] == "missing" and loc and isinstance(loc[-1], str) and path[-1:] != (loc[-1],):
        path += (loc[-1],)  # name the missing field; its line is its parent's
    line = lines.get(path) or lines.get(path[:-1]) or 1
    if err["type"] == "unknown_key" and path and not isinstance(path[-1], str):  # an integer key: name it as a key
        return line, ".".join(filter(None, [_dotted(path[:-1]), str(path[-1])]))
    return line, _dotted(path) or "<top>"


def _error_message(err: dict[str, Any]) -> str:
    msg = err["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    if err["type"] == "missing":
        return "missing required field"
    if err["type"] == "union_tag_not_found":
        return "missing required field; expected one of: transplant, activation_swap, graft, bridge"
    if err["type"] == "union_tag_invalid":
        tags = err.get("ctx", {}).get("expected_tags", "")
        return f"got {err['input'].get('op')!r}; expected one of: {tags}" if isinstance(err["input"], dict) \
            else msg[0].lower() + msg[1:]
    if err["type"] == "literal_error":
        return f"got {err['input']!r}; {msg[0].lower()}{msg[1:]}"
    if err["type"] not in ("unknown_key", "value_error", "union_tag_invalid", "missing") and "input" in err \
            and not isinstance(err["input"], (dict, list)):
        return f"{msg[0].lower()}{msg[1:]} (got {err['input']!r})"
    return msg[0].lower() + msg[1:] if msg else msg


def parse_case(text: str, filename: str = "<memory>") -> Case:
    """Parse and validate case-file text; raise SurgeryInputError (one line) on any problem."""
    data, lines = _compose_with_lines(text, filename)
    if not isinstance(data, dict):
        raise SurgeryInputError(f"{filename}:1: <top>: expected a mapping with name, data, source, surgery, expect")
    try:
        case = Case.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        line, field = _error_line(err, data, lines)
        raise SurgeryInputError(f"{filename}:{line}: {field}: {_error_message(err)}") from None
    case.path = filename
    case.file_hash = hashlib.sha256(text.encode()).hexdigest()[:16]
    case.lines = {_dotted(path): line for path, line in lines.items() if path}
    return case


def load_case(path: str | Path) -> Case:
    """Load one case file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SurgeryInputError(f"{path}: cannot read case file: {exc.__class__.__name__}: {exc}") from None
    return parse_case(text, str(path))


def find_cases(paths: list[str | Path]) -> list[Path]:
    """Expand files and directories into case files (``**/*.yaml`` / ``*.yml``), sorted."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(q for q in p.rglob("*") if q.suffix in (".yaml", ".yml"))
        elif p.exists():
            found.append(p)
        else:
            raise SurgeryInputError(f"{p}: no such case file or directory")
    return found
