"""The public API: a lazy ``import surgery``, keyword-only functions, doctests that run, a result a notebook shows."""

from __future__ import annotations

import doctest
import subprocess
import sys

import pytest

import surgery
import surgery.api
import surgery.stats.bounds

TINY = """\
name: api-tiny
data: {train: {name: digits, limit: 200}, image_size: 16, split_seed: 0}
source: {model: "surgery.train.zoo:stem_trainer", num_classes: 10}
surgery: {op: transplant, target: {model: "surgery.train.zoo:stem_trainer", num_classes: 10}}
finetune: {steps: 2, batch_size: 16}
expect: {coverage: {tensors_min: 1.0}, accuracy: {after_min: 0.99}}
"""


def test_import_surgery_loads_no_torch():
    code = "import surgery, sys; assert 'torch' not in sys.modules, 'torch imported'; print(sorted(dir(surgery))[:3])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("module", [surgery.api, surgery.stats.bounds], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0


def test_run_a_case_with_keyword_arguments_and_show_it_in_a_notebook(tmp_path):
    case_file = tmp_path / "tiny.yaml"
    case_file.write_text(TINY)
    result = surgery.run(surgery.load_case(case_file), device="cpu", seeds=1)
    assert [e.name for e in result.failures] == ["accuracy.after_min"] and not result.passed
    html = result._repr_html_()
    assert html.lower().startswith("<!doctype html>") and "api-tiny" in html and "accuracy.after_min" in html
    with pytest.raises(TypeError):
        surgery.run(surgery.load_case(case_file), "cpu")  # keyword arguments only
    page = surgery.write_report(result, tmp_path / "reports")
    assert page.is_file() and (page.parent / "results.json").is_file()


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        surgery.nope  # noqa: B018
    assert {"run", "load_case", "probe", "transplant", "list_models"} <= set(dir(surgery))
    assert "zoo:mnist-resnet18" in surgery.list_models("zoo")
