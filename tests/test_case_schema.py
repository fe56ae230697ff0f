"""``surgery schema``: the case file's JSON Schema from the pydantic models, committed for editors, and true to them."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from surgery.case import case_schema, find_cases
from surgery.checks import CHECKS, Check, register_check
from surgery.spec import Strict, threshold

from cli_runs import run_cli

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / "schema" / "case.schema.json"
CASES = sorted(find_cases([ROOT / "cases"]))


def _validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def test_the_committed_schema_is_what_surgery_schema_prints():
    rc, out, err = run_cli("schema")
    assert rc == 0, err
    assert json.loads(out) == case_schema()
    assert json.loads(SCHEMA_FILE.read_text(encoding="utf-8")) == case_schema(), (
        "schema/case.schema.json is stale: run `make schema`"
    )


@pytest.mark.parametrize("path", CASES, ids=lambda p: str(p.relative_to(ROOT / "cases")))
def test_every_case_validates_and_points_editors_at_the_schema(path: Path):
    text = path.read_text(encoding="utf-8")
    first = text.splitlines()[0]
    relative = Path(first.removeprefix("# yaml-language-server: $schema="))
    assert first.startswith("# yaml-language-server: $schema=") and (path.parent / relative).resolve() == SCHEMA_FILE
    _validator().validate(yaml.safe_load(text))


def test_every_seed_case_is_covered():
    assert len(CASES) >= 12 and any("scale" in p.parts for p in CASES)


@pytest.mark.parametrize(
    "edit, where",
    [
        (lambda c: c.update(nmae="typo"), "nmae"),
        (lambda c: c["finetune"].update(steps="many"), "steps"),
        (lambda c: c["surgery"].update(op="transmogrify"), "op"),
        (lambda c: c["expect"].update(coverage={"tensors_min": 0.5, "bogus": 1}), "bogus"),
        (lambda c: c.pop("source"), "source"),
        (lambda c: c.update(device="tpu"), "tpu"),
    ],
)
def test_the_schema_rejects_bad_cases(edit, where):
    case = yaml.safe_load((ROOT / "cases/transplant/resnet50-to-resnet18-strategies.yaml").read_text(encoding="utf-8"))
    edit(case)
    errors = list(_validator().iter_errors(case))
    assert errors and any(where in (e.message + " ".join(map(str, e.absolute_path))) for e in errors), [
        e.message for e in errors
    ]


def test_a_third_party_check_has_its_section_in_the_schema():
    class Weights(Strict):
        norm_max: threshold(0.0) | None = None

    @register_check
    class WeightsCheck(Check):
        key = "weight_norm"
        spec = Weights

        def items(self, spec):
            return []

        def evaluate(self, spec, per_seed, judge, metrics):
            return []

    try:
        schema = case_schema()
        assert "weight_norm" in json.dumps(schema["$defs"]["Expectations"])
        rc, out, _ = run_cli("schema")
        assert rc == 0 and "weight_norm" in out
    finally:
        CHECKS.pop("weight_norm", None)
    assert "weight_norm" not in json.dumps(case_schema())
