"""Case files: YAML that keeps its line numbers, validated by pydantic models.

Every error in a case file becomes one :class:`SurgeryInputError` line of the form
``cases/x.yaml:12: surgery.strategy: <what was wrong>; expected <what would be right>``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Sequence, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator
from pydantic_core import ErrorDetails, PydanticCustomError

from surgery.stats.calibration import MEASUREMENT, CalibrationRecord, is_threshold_key, load_record, record_path
from surgery.checks import CHECKS  # importing the package registers the built-in checks
from surgery.checks.comparisons import CompareSpec
from surgery.errors import SurgeryInputError
from surgery.models.model_refs import is_factory_ref, resolve_factory
from surgery.models.recipes import ZOO
from surgery.ops import SPECS  # importing the package registers the built-in operations' specs (no torch)
from surgery.spec import (
    ARM_NAME,
    CALIBRATE,
    DATASETS,
    DatasetSpec,
    DataSpec,
    DistillSpec,
    FinetuneSpec,
    GateSpec,
    ModelSpec,
    NotWorseThanSpec,
    OptimizerSpec,
    ParamGroupSpec,
    ScheduleSpec,
    Strict,
    Threshold,
    ThresholdRange,
    UnitThreshold,
    threshold,
    threshold_range,
    VariantSpec,
)

__all__ = [
    "Case",
    "case_schema",
    "parse_case",
    "load_case",
    "load_cases",
    "check_factories",
    "model_fields",
    "find_cases",
    "experiment_hash",
    "case_calibration",
    "CALIBRATE",
    "DATASETS",
    "DatasetSpec",
    "DataSpec",
    "DistillSpec",
    "FinetuneSpec",
    "GateSpec",
    "NotWorseThanSpec",
    "ModelSpec",
    "OptimizerSpec",
    "ParamGroupSpec",
    "ScheduleSpec",
    "Strict",
    "Threshold",
    "ThresholdRange",
    "UnitThreshold",
    "threshold",
    "threshold_range",
    "CaseCalibration",
    "expectations_model",
]


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
            raise SurgeryInputError(
                f"{filename}:{node.start_mark.line + 1}: {_dotted(path) or '<top>'}: "
                f"{getattr(exc, 'problem', None) or exc}"
            ) from None

    def pairs(node: yaml.MappingNode, path: Path_) -> list[tuple[yaml.Node, yaml.Node, bool]]:
        """(key, value, from_merge) in priority order, merge keys (``<<``) expanded as safe_load does."""
        if not any(k.tag == MERGE_TAG for k, _ in node.value):
            return [(k, v, False) for k, v in node.value]
        explicit = sum(k.tag != MERGE_TAG for k, _ in node.value)
        try:
            constructor.flatten_mapping(node)  # puts the merged pairs first, the explicit ones last
        except yaml.YAMLError as exc:
            raise SurgeryInputError(
                f"{filename}:{node.start_mark.line + 1}: {_dotted(path) or '<top>'}: "
                f"{getattr(exc, 'problem', None) or exc}"
            ) from None
        merged = len(node.value) - explicit
        return [(k, v, i < merged) for i, (k, v) in enumerate(node.value)]

    def convert(node: yaml.Node, path: Path_) -> Any:
        nonlocal count
        count += 1
        if count > MAX_NODES:
            raise SurgeryInputError(
                f"{filename}:{node.start_mark.line + 1}: {_dotted(path) or '<top>'}: "
                f"document expands to more than {MAX_NODES} nodes (aliases); "
                "expected a case file"
            )
        if id(node) in active:
            raise SurgeryInputError(
                f"{filename}:{node.start_mark.line + 1}: {_dotted(path) or '<top>'}: "
                "recursive alias; expected a tree of values"
            )
        lines[path] = node.start_mark.line + 1
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            if node.tag not in (PLAIN_MAP, PLAIN_SEQ):  # e.g. !!python/object/apply on a list: never ignored
                raise SurgeryInputError(
                    f"{filename}:{node.start_mark.line + 1}: {_dotted(path) or '<top>'}: "
                    f"could not determine a constructor for the tag {node.tag!r}; "
                    "expected plain YAML values"
                )
            active.add(id(node))
            try:
                return convert_collection(node, path)
            finally:
                active.discard(id(node))
        return construct(node, path)

    def convert_collection(node: yaml.MappingNode | yaml.SequenceNode, path: Path_) -> Any:
        if isinstance(node, yaml.SequenceNode):
            return [convert(child, path + (i,)) for i, child in enumerate(node.value)]
        out: dict[Any, Any] = {}
        merged_keys: set[str | int] = set()
        for key_node, value_node, from_merge in pairs(node, path):
            key = construct(key_node, path)
            # Integer keys are seed counts of a calibrated threshold ({1: 0.88, 3: 0.9}); the schema
            # refuses them anywhere else as unknown keys.
            if not isinstance(key, str) and (isinstance(key, bool) or not isinstance(key, int)):
                raise SurgeryInputError(
                    f"{filename}:{key_node.start_mark.line + 1}: {_dotted(path) or '<top>'}: "
                    f"key {key!r} is not a string; expected a field name"
                )
            if key in out and key not in merged_keys:
                raise SurgeryInputError(
                    f"{filename}:{key_node.start_mark.line + 1}: {_dotted(path + (key,))}: "
                    f"duplicate key; expected each field once"
                )
            if from_merge:
                merged_keys.add(key)
            else:
                merged_keys.discard(key)
            if key in out:  # an explicit key overrides what a merge put there: forget its lines
                for sub in [p for p in lines if p[: len(path) + 1] == path + (key,)]:
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


def _check_summary(key: str) -> str:
    """A check's section described by its spec's docstring (``expect.KEY``: SUMMARY), its first paragraph."""
    doc = " ".join((CHECKS[key].spec.__doc__ or "").strip().split("\n\n")[0].split())
    return doc.removeprefix(f"``expect.{key}``: ").rstrip(".") or f"the {key} check"


@lru_cache(maxsize=None)
def _models(keys: tuple[str, ...], ops: tuple[str, ...]) -> tuple[type[Strict], type["Case"]]:
    # Types built at run time: Any to the type checker (pydantic's create_model asks for static type forms).
    check_fields: dict[str, Any] = {
        key: (CHECKS[key].spec | None, Field(None, description=_check_summary(key))) for key in keys
    }
    expectations = create_model(
        "Expectations",
        __base__=Strict,
        __doc__="The ``expect`` section: one entry per registered check (surgery.checks), plus ``finite``.",
        **check_fields,
        finite=(bool, Field(True, description="no NaN/inf in the loss or the weights")),
        compare=(
            list[CompareSpec],
            Field([], description="variant cases: claims that one arm beats another, on paired differences"),
        ),
        rank=(
            list[str] | None,
            Field(None, description="variant cases: arms from best to worst; each beats the next (margin 0)"),
        ),
    )
    operations = tuple(SPECS[name] for name in ops)
    surgery: Any = Annotated[Union[operations], Field(discriminator="op")] if len(operations) > 1 else operations[0]
    case = create_model(
        "Case",
        __base__=Case,
        surgery=(surgery, Field(description="the operation performed on the source, chosen by its op")),
        expect=(expectations, Field(description="what the run is held to: one section per check, plus finite")),
    )
    return expectations, case


def expectations_model() -> type[Strict]:
    """The ``expect`` section's model, built from the checks registered now."""
    return _models(tuple(CHECKS), tuple(SPECS))[0]


class Case(Strict):
    """A case file. Its ``expect`` section's fields come from the registered checks (see :func:`parse_case`)."""

    name: str = Field(min_length=1, description="the case's name in test ids, reports and exported file paths")
    description: str = Field("", description="free text the reports show with the case")
    seed: list[Annotated[int, Field(ge=0, le=2**63 - 1, strict=True)]] = Field(
        [0], min_length=1, description="one non-negative integer (below 2**63) or a list of them"
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="where the models run: auto (CUDA when present, else the CPU), cpu, cuda or cuda:N",
    )
    markers: list[Literal["slow", "gpu"]] = Field(
        [], description="pytest markers on the case's items: slow, gpu (skipped without CUDA)"
    )
    data: DataSpec = Field(description="the images: the train set, its split, the probe set, the preprocessing")
    source: ModelSpec = Field(description="the model the surgery starts from")
    finetune: FinetuneSpec = Field(FinetuneSpec(), description="the fine-tune of the patient after surgery")
    gate: GateSpec | None = Field(None, description="what `surgery gate` scores a release candidate on")
    variants: dict[Annotated[str, Field(pattern=ARM_NAME)], VariantSpec] | None = Field(
        None,
        description="named arms run on the same seeds, paired, each with its own items; expect.compare and "
        "expect.rank judge them against each other (docs: Variants)",
    )
    if TYPE_CHECKING:  # set by the subclass parse_case builds from the registered operations and checks
        surgery: Any
        expect: Any

    # set by load_case, not by the file
    path: str = Field("<memory>", exclude=True)
    file_hash: str = Field("", exclude=True)
    lines: dict[str, int] = Field({}, exclude=True, description="dotted field path -> line in the file")
    # set by parse_case for a case with variants: its arms, each a Case (see arm_cases)
    arms: dict[str, Any] = Field({}, exclude=True)
    # set on an arm: its name, and the dotted fields its variant entry sets (errors name them as variants.ARM.…)
    variant: str = Field("", exclude=True)
    overridden: list[str] = Field([], exclude=True)

    def where(self, field: str) -> str:
        """``FILE:LINE: field`` for a dotted field path, its nearest parent's line if it is not in the file."""
        path = field
        while path and path not in self.lines:
            path = path.rpartition(".")[0]
        if self.variant and any(_within(field, o) for o in self.overridden):
            field = f"variants.{self.variant}.{field}"
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
            for key in LOADER_FIELDS:
                if key in data:
                    raise PydanticCustomError(
                        "unknown_key", "unknown key {shown}; it is set by the loader", {"key": key, "shown": repr(key)}
                    )
        return data


SCHEMA_ID = "https://surgery.invalid/case.schema.json"
LOADER_FIELDS = ("path", "file_hash", "lines", "arms", "variant", "overridden")


# Shorthands the models' ``mode="before"`` validators accept, which pydantic's schema cannot see:
# a section written as a string, and a list field written as one item.
STRING_SHORTHANDS = {
    "DatasetSpec": "a dataset name, short for {name: …}",
    "PreprocessSpec": "a preset (zoo | imagenet), short for {preset: …}",
}
ONE_OR_MANY = {None: ("seed",), "ActivationSwapSpec": ("from",)}  # None: the case itself


def _accept_shorthands(schema: dict[str, Any]) -> None:
    defs = schema.get("$defs", {})
    for name, description in STRING_SHORTHANDS.items():
        if name in defs:
            defs[name] = {
                "anyOf": [{"type": "string", "description": description}, defs[name]],
                "title": defs[name].get("title", name),
                "description": defs[name].get("description", ""),
            }
    if "DatasetSpec" in defs:  # {dataset: pkg.mod:Name, …}: keys other than these are the Dataset's keyword arguments
        own = defs["DatasetSpec"]["anyOf"][-1].get("properties", {})
        said = {key: own.get(key, {}).get("description", "") for key in ("dataset", "root", "limit")}
        defs["DatasetSpec"]["anyOf"].append(
            {
                "type": "object",
                "required": ["dataset"],
                "additionalProperties": True,
                "description": "a map-style Dataset by reference; its other keys are the Dataset's keyword arguments",
                "properties": {
                    "dataset": {"type": "string", "description": said["dataset"]},
                    "name": {"const": "dataset", "description": "may be left out: a reference implies it"},
                    "root": {"type": "string", "description": said["root"]},
                    "limit": {"type": "integer", "exclusiveMinimum": 0, "description": said["limit"]},
                },
            }
        )
    for owner, fields in ONE_OR_MANY.items():
        model = schema if owner is None else defs.get(owner, {})
        for field in fields:
            prop = model.get("properties", {}).get(field)
            if prop and prop.get("type") == "array":
                model["properties"][field] = {
                    "anyOf": [prop["items"], prop],
                    "title": prop.get("title", field),
                    **({"description": prop["description"]} if "description" in prop else {}),
                }


def case_schema() -> dict[str, Any]:
    """The case file's JSON Schema, from the same pydantic models :func:`parse_case` validates with.

    Built from the operations and checks registered now (a third-party check's section included, once
    its module is imported or named in the ``surgery.checks`` entry points). Editors use it through a
    ``# yaml-language-server: $schema=…`` line; ``surgery schema`` prints it.
    """
    schema = _models(tuple(CHECKS), tuple(SPECS))[1].model_json_schema()
    for key in LOADER_FIELDS:  # set by load_case, refused in a file
        schema["properties"].pop(key, None)
    _accept_shorthands(schema)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "surgery case file",
        **{k: v for k, v in schema.items() if k != "title"},
    }


# --------------------------------------------------------------------------- loading


def _error_line(err: ErrorDetails, data: Any, lines: dict[Path_, int]) -> tuple[int, str]:
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


def _error_message(err: ErrorDetails) -> str:
    msg = err["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    if err["type"] == "missing":
        return "missing required field"
    if err["type"] == "union_tag_not_found":
        return f"missing required field; expected one of: {', '.join(SPECS)}"
    if err["type"] == "union_tag_invalid":
        tags = err.get("ctx", {}).get("expected_tags", "")
        return (
            f"got {err['input'].get('op')!r}; expected one of: {tags}"
            if isinstance(err["input"], dict)
            else msg[0].lower() + msg[1:]
        )
    if err["type"] == "literal_error":
        return f"got {err['input']!r}; {msg[0].lower()}{msg[1:]}"
    if (
        err["type"] not in ("unknown_key", "value_error", "union_tag_invalid", "missing")
        and "input" in err
        and not isinstance(err["input"], (dict, list))
    ):
        return f"{msg[0].lower()}{msg[1:]} (got {err['input']!r})"
    return msg[0].lower() + msg[1:] if msg else msg


def _validate(
    data: dict[str, Any], lines: dict[Path_, int], filename: str, arm: str = "", overridden: Sequence[str] = ()
) -> Case:
    """Validate parsed YAML as a case; a pydantic error becomes one line naming the field (``variants.ARM.…``
    when it lies in what ``overridden``, the fields arm ``arm``'s entry sets, holds)."""
    try:
        return _models(tuple(CHECKS), tuple(SPECS))[1].model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        line, field = _error_line(err, data, lines)
        if any(_within(field, o) for o in overridden):
            field = f"variants.{arm}.{field}"
        suffix = f" (in variant {arm!r}, the case with its entry merged over it)" if arm else ""
        raise SurgeryInputError(f"{filename}:{line}: {field}: {_error_message(err)}{suffix}") from None


def parse_case(text: str, filename: str = "<memory>") -> Case:
    """Parse and validate case-file text; raise SurgeryInputError (one line) on any problem."""
    data, lines = _compose_with_lines(text, filename)
    if not isinstance(data, dict):
        raise SurgeryInputError(f"{filename}:1: <top>: expected a mapping with name, data, source, surgery, expect")
    case = _validate(data, lines, filename)
    case.path = filename
    case.file_hash = hashlib.sha256(text.encode()).hexdigest()[:16]
    case.lines = {_dotted(path): line for path, line in lines.items() if path}
    if case.gate is not None and case.gate.data == "holdout" and not case.data.holdout:
        raise SurgeryInputError(
            f"{case.where('gate.data')}: 'holdout' needs data.holdout > 0 (e.g. 0.2), or a "
            "dataset of its own, e.g. {name: imagefolder, root: release-eval}"
        )
    _check_comparisons(case)
    if case.variants:
        case.arms = _arm_cases(case, data, lines)
    return case


# --------------------------------------------------------------------------- variants


def _leaves(lines: dict[Path_, int], prefix: Path_) -> list[str]:
    """The dotted paths, relative to ``prefix``, of the values under it that hold no further keys."""
    under = [path[len(prefix) :] for path in lines if path[: len(prefix)] == prefix and len(path) > len(prefix)]
    return [_dotted(p) for p in under if not any(q[: len(p)] == p and len(q) > len(p) for q in under)]


def _within(field: str, prefix: str) -> bool:
    """Whether dotted ``field`` is ``prefix`` or lies inside it."""
    return field == prefix or field.startswith((prefix + ".", prefix + "["))


def _check_comparisons(case: Case) -> None:
    """``expect.compare`` and ``expect.rank`` name arms of ``variants``, each pair once; ``beats_baseline`` is
    replaced by a random arm in a variant case."""
    arms = list(case.variants or {})
    compare, rank = case.expect.compare, case.expect.rank
    if not case.variants:
        if compare or rank is not None:
            field = "expect.compare" if compare else "expect.rank"
            raise SurgeryInputError(f"{case.where(field)}: compares arms; expected a variants section naming them")
        return
    if len(arms) < 2:
        raise SurgeryInputError(f"{case.where('variants')}: one arm compares with nothing; expected two or more")
    accuracy = getattr(case.expect, "accuracy", None)
    if accuracy is not None and accuracy.beats_baseline is not None:
        raise SurgeryInputError(
            f"{case.where('expect.accuracy.beats_baseline')}: in a variant case the baseline is an arm; expected "
            "a variant with init: random and expect.compare: [{better: ARM, than: that arm, margin: …}]"
        )
    pairs: set[tuple[str, str]] = set()
    for i, spec in enumerate(compare):
        for key in ("better", "than"):
            if getattr(spec, key) not in arms:
                raise SurgeryInputError(
                    f"{case.where(f'expect.compare[{i}].{key}')}: got {getattr(spec, key)!r}; "
                    f"expected one of the arms: {', '.join(arms)}"
                )
        if spec.better == spec.than:
            raise SurgeryInputError(f"{case.where(f'expect.compare[{i}].than')}: an arm compared with itself")
        if (spec.better, spec.than) in pairs:
            raise SurgeryInputError(f"{case.where(f'expect.compare[{i}]')}: this pair is compared twice")
        pairs.add((spec.better, spec.than))
    if rank is not None:
        if len(rank) < 2 or len(set(rank)) != len(rank) or any(name not in arms for name in rank):
            raise SurgeryInputError(
                f"{case.where('expect.rank')}: got {rank!r}; expected two or more distinct arms of: {', '.join(arms)}"
            )


def _merged(base: Any, override: Any) -> Any:
    """``override`` deep-merged over ``base``: mappings key by key (one naming another ``op`` replaces the
    section), anything else replaced."""
    if not isinstance(base, dict) or not isinstance(override, dict):
        return override
    if "op" in override and override["op"] != base.get("op"):
        return override
    out = dict(base)
    for key, value in override.items():
        out[key] = _merged(base[key], value) if key in base else value
    return out


ARM_SECTIONS = ("surgery", "finetune", "expect")


def _arm_cases(case: Case, data: dict[str, Any], lines: dict[Path_, int]) -> dict[str, Case]:
    """Each arm of ``case.variants`` as a case of its own, named ``CASE.ARM``: the case with the arm's sections
    merged over it (a random arm keeps only ``finite`` of the expectations), validated as a case."""
    base = {key: value for key, value in data.items() if key != "variants"}
    base["expect"] = {k: v for k, v in data.get("expect", {}).items() if k not in ("compare", "rank")}
    shared = {path: line for path, line in lines.items() if path[:1] != ("variants",)}
    arms: dict[str, Case] = {}
    for arm, spec in (case.variants or {}).items():
        entry = data["variants"][arm]
        merged = dict(base)
        if spec.init == "random":
            merged["expect"] = {"finite": base["expect"].get("finite", True)}
        for section in ARM_SECTIONS:
            if section in entry:
                merged[section] = _merged(merged.get(section), entry[section])
        own = {path[2:]: line for path, line in lines.items() if path[:2] == ("variants", arm) and len(path) > 2}
        arm_lines = {**shared, **own}
        overridden = [leaf for leaf in _leaves(lines, ("variants", arm)) if any(_within(leaf, s) for s in ARM_SECTIONS)]
        arm_case = _validate(merged, arm_lines, case.path, arm, overridden)
        arm_case.name = f"{case.name}.{arm}"
        arm_case.description = spec.description or case.description
        arm_case.path, arm_case.file_hash, arm_case.variant = case.path, case.file_hash, arm
        arm_case.lines = {_dotted(path): line for path, line in arm_lines.items() if path}
        arm_case.overridden = overridden
        arms[arm] = arm_case
    return arms


def load_case(path: str | Path) -> Case:
    """Load one case file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SurgeryInputError(f"{path}: cannot read case file: {exc.__class__.__name__}: {exc}") from None
    return parse_case(text, str(path))


def model_fields(case: Case) -> list[tuple[str, ModelSpec]]:
    """Every model section of ``case`` with its dotted field (``source``, ``surgery.donor`` …), in file order."""
    found: list[tuple[str, ModelSpec]] = []

    def walk(value: Any, field: str) -> None:
        if isinstance(value, ModelSpec):
            found.append((field, value))
        elif isinstance(value, BaseModel):
            for name, info in type(value).model_fields.items():
                if not info.exclude:
                    walk(getattr(value, name), f"{field}.{info.alias or name}".lstrip("."))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{field}[{i}]")

    walk(case, "")
    return sorted(found, key=lambda item: case.lines.get(item[0], 0))


def check_factories(case: Case) -> None:
    """The second stage of loading a case: import each ``package.module:factory`` it names and check the factory
    (:func:`surgery.models.model_refs.resolve_factory`); a bad one is a SurgeryInputError at its line.

    Parsing (:func:`load_case`) imports no torch; this imports the factories' packages, which usually do.
    """
    for field, spec in model_fields(case):
        if is_factory_ref(spec.model):
            try:
                resolve_factory(spec.model)
            except ValueError as exc:
                raise SurgeryInputError(f"{case.where(field + '.model')}: {exc}") from None


def load_cases(paths: Sequence[str | Path]) -> list[Case]:
    """Load case files in two stages: every file parsed first (no torch: a typo in the last one costs a second),
    then every factory they name imported and checked (:func:`check_factories`)."""
    cases = [load_case(p) for p in paths]
    for case in cases:
        check_factories(case)
    return cases


CASE_SUFFIXES = (".yaml", ".yml")  # what a case file is named


def find_cases(paths: Sequence[str | Path]) -> list[Path]:
    """Expand files and directories into case files (``**/*.yaml`` / ``*.yml``), sorted."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(q for q in p.rglob("*") if q.suffix in CASE_SUFFIXES)
        elif p.exists():
            found.append(p)
        else:
            raise SurgeryInputError(f"{p}: no such case file or directory")
    return found


# --------------------------------------------------------------------------- calibration of a case


def _zoo_names(value: Any) -> set[str]:
    """The zoo models a dumped case names anywhere (``"zoo:NAME"`` strings)."""
    if isinstance(value, str):
        return {value.removeprefix("zoo:")} if value.startswith("zoo:") else set()
    if isinstance(value, dict):
        return set().union(*(_zoo_names(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_zoo_names(v) for v in value))
    return set()


def _without_thresholds(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_thresholds(v) for k, v in value.items() if not is_threshold_key(str(k))}
    if isinstance(value, list):
        return [_without_thresholds(v) for v in value]
    return value


def _pruned(value: Any) -> Any:
    """Mappings left empty (their thresholds taken out) removed, recursively."""
    if isinstance(value, dict):
        kept = {k: _pruned(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v != {}}
    return value


def experiment_hash(case: Case) -> str:
    """A hash of what the figures depend on: the case without name, description, seeds, markers, thresholds.

    Sections a case leaves out (``None``) are left out of the hash too, so registering a new check does
    not make every record stale; the ``gate`` section scores a checkpoint after the run and is left out.
    ``MEASUREMENT`` stands for the code that computes the figures (:mod:`surgery.stats.calibration`), and
    each zoo model the case names enters by its recipe's key: a new recipe trains other weights.
    """
    data = case.model_dump(mode="json", by_alias=True, exclude_none=True)
    for key in ("name", "description", "seed", "markers", "device", "gate"):
        data.pop(key, None)
    data["measurement"] = MEASUREMENT
    data["expect"] = _without_thresholds(data["expect"])
    if not data["expect"].get("compare"):  # a case without variants hashes as it did before they existed
        data["expect"].pop("compare", None)
    for entry in (data.get("variants") or {}).values():
        entry.pop("description", None)
        expect = _pruned(_without_thresholds(entry.pop("expect", None) or {}))
        if expect:  # an arm's section holding only thresholds (calibrate --write puts them there) is no change
            entry["expect"] = expect
    # the zoo models named by what is hashed (not by a description), each by its recipe
    zoo_recipes = {name: ZOO[name].key() for name in sorted(_zoo_names(data)) if name in ZOO}
    if zoo_recipes:  # a case that names no zoo model hashes as it did before recipes entered the hash
        data["zoo_recipes"] = zoo_recipes
    blob = json.dumps(data, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class CaseCalibration:
    """The calibration a run of a case uses: the record, and whether it still fits the case."""

    record: CalibrationRecord | None
    path: Path | None
    fresh: bool

    @property
    def usable(self) -> CalibrationRecord | None:
        """The record when it belongs to this experiment, else None."""
        return self.record if self.fresh else None

    def for_arm(self, arm: str) -> "CaseCalibration":
        """The calibration of one arm of a variant case: the case's record, seen through ``arm_view``."""
        return CaseCalibration(None if self.record is None else self.record.arm_view(arm), self.path, self.fresh)

    def status(self) -> str:
        """One line for the report: calibrated, stale or missing."""
        if self.record is None:
            return "not calibrated: thresholds are used as written (run `surgery calibrate`)"
        if not self.fresh:
            return (
                f"calibration record {self.path} is stale (the case changed since); thresholds are used as "
                "written and claims are not judged for decidability (re-run `surgery calibrate`)"
            )
        return f"calibrated at alpha = {self.record.alpha:g} over seeds {self.record.seeds} ({self.path})"


def case_calibration(case: Case) -> CaseCalibration:
    """The record beside ``case``'s file, if any, and whether it is fresh."""
    if case.path == "<memory>":
        return CaseCalibration(None, None, False)
    path = record_path(case.path)
    if not path.is_file():
        return CaseCalibration(None, path, False)
    record = load_record(path)
    return CaseCalibration(record, path, record.experiment_hash == experiment_hash(case))
