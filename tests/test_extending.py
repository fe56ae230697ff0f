"""The README's "Extending" example, run as written: a new check in one file, registered, parsed, judged."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import surgery
from surgery.checks import CHECKS, load_plugin_checks, register_check
from surgery.checks.expect import expectation_names

README = Path(__file__).resolve().parent.parent / "docs" / "extending.md"  # the docs' page, code run as written
CASE = """\
name: params-example
data: {train: {name: digits, limit: 200}, image_size: 16, split_seed: 0}
source: {model: "surgery.train.zoo:stem_trainer", num_classes: 10}
surgery: {op: transplant, target: {model: "surgery.train.zoo:stem_trainer", num_classes: 10}}
finetune: {steps: 2, batch_size: 16}
expect:
  coverage: {tensors_min: 1.0}
  params: {count_max: %s}
"""


def _example_code() -> str:
    section = README.read_text(encoding="utf-8").split("# Extending", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def example_package(tmp_path, monkeypatch):
    """The README's module as ``my_checks.params`` in a package on sys.path, with an installed entry point."""
    package = tmp_path / "my_checks"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "params.py").write_text(_example_code())
    dist = tmp_path / "my_checks-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-checks\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[surgery.checks]\nparams = my_checks.params\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    CHECKS.pop("params", None)
    for name in ("my_checks", "my_checks.params"):
        sys.modules.pop(name, None)


def test_the_readme_check_registers_through_its_entry_point_and_judges_a_run(example_package):
    assert "params" not in CHECKS
    assert load_plugin_checks() == ["params"] and "params" in CHECKS
    case = surgery.parse_case(CASE % "100")
    assert expectation_names(case) == ["coverage.tensors_min", "params.count_max", "finite"]
    result = surgery.run(case, device="cpu", seeds=1)
    count = result.per_seed[0]["checks"]["params"]["count"]
    failure = result.expectation("params.count_max")
    assert not failure.passed and failure.observed == count > 100
    assert failure.message.startswith(f"observed {count:.4g} > count_max 100 (parameters of the patient")
    assert surgery.run(surgery.parse_case(CASE % str(count)), device="cpu", seeds=1).passed


def test_unknown_sections_are_still_refused_and_keys_are_unique(example_package):
    with pytest.raises(surgery.SurgeryInputError, match=r"expect.params: unknown key 'params'"):
        surgery.parse_case(CASE % "100")  # the check is not loaded yet: `params` is unknown
    load_plugin_checks()
    with pytest.raises(ValueError, match="registered already"):
        register_check(type(CHECKS["params"]))
    with pytest.raises(surgery.SurgeryInputError, match=r"params.count_max: got -1"):
        surgery.parse_case(CASE % "-1")


SWAP = """\
name: swap
data: {train: digits}
source: {model: "torchvision:resnet18"}
surgery: {op: activation_swap, from: ReLU, to: %s}
expect: {coverage: {tensors_min: 1.0}}
"""


def test_operations_come_from_the_registry():
    from surgery.ops import get_op, list_ops, register_op

    assert list_ops() == surgery.list_ops() == ["transplant", "activation_swap", "graft", "bridge"]
    with pytest.raises(ValueError, match="registered already"):
        register_op(type(get_op("graft")))
    with pytest.raises(surgery.SurgeryInputError) as info:
        surgery.parse_case(SWAP.replace("op: activation_swap", "op: transplnt") % "SiLU", "swap.yaml")
    assert str(info.value).startswith("swap.yaml:4: surgery.op: got 'transplnt'; expected one of:")
    assert all(name in str(info.value) for name in list_ops())


def test_activation_names_are_checked_when_the_case_is_parsed():
    with pytest.raises(surgery.SurgeryInputError) as info:
        surgery.parse_case(SWAP % "SiLUU", "swap.yaml")
    assert str(info.value).startswith("swap.yaml:4: surgery.to: unknown target activation 'SiLUU' (did you mean SiLU")
    assert surgery.parse_case(SWAP % "silu", "swap.yaml").surgery.to == "SiLU"  # the canonical spelling
