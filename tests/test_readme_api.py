"""The README's Python API block, run as a user runs it: top to bottom in a fresh interpreter.

Public names stay what they are: ``surgery.run`` imports the modules behind ``surgery.probe`` and
``surgery.gate``, and a submodule of the same name would replace the function on the package.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import surgery

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARK = "<!-- api example: run by tests/test_readme_api.py -->"
CASE = "cases/transplant/resnet50-to-resnet18-strategies.yaml"
TINY = """\
name: api-tiny
data: {train: {name: digits, limit: 200}, image_size: 16, split_seed: 0}
source: {model: "surgery.train.zoo:stem_trainer", num_classes: 10}
surgery: {op: transplant, target: {model: "surgery.train.zoo:stem_trainer", num_classes: 10}}
finetune: {steps: 2, batch_size: 16}
expect: {coverage: {tensors_min: 1.0}}
"""


def readme_api_block() -> str:
    section = README.read_text(encoding="utf-8").split(MARK, 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def run_fresh(code: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env, timeout=1800)


def test_no_public_name_is_also_a_submodule():
    modules = {m.name for m in pkgutil.iter_modules(surgery.__path__)}
    assert not modules & set(surgery.__all__), "a submodule import would replace these public names"


def test_every_public_name_is_the_documented_object_after_run_is_touched():
    """``surgery.run`` first (it imports most of the package), then every name: each is what its module defines."""
    code = """
import importlib, surgery
surgery.run
import surgery.api, surgery.running.runner, surgery.running.release_gate, surgery.stats.activation_probe
wrong = []
for name, module in surgery._EXPORTS.items():
    value, expected = getattr(surgery, name), getattr(importlib.import_module(module), name)
    if value is not expected or not callable(value):
        wrong.append((name, repr(value)[:80]))
assert not wrong, wrong
assert surgery.probe.__module__ == "surgery.api" and surgery.gate.__module__ == "surgery.api"
print(len(surgery._EXPORTS))
"""
    proc = run_fresh(code, ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout) == len(surgery.__all__) - 1  # all but __version__


def test_the_readme_api_block_runs_on_a_tiny_case(tmp_path: Path):
    """The block as written, the seed case swapped for a tiny one so it takes seconds (the verbatim run is slow)."""
    block = readme_api_block()
    assert CASE in block, f"the README's API block no longer loads {CASE}"
    (tmp_path / "tiny.yaml").write_text(TINY)
    proc = run_fresh(block.replace(CASE, "tiny.yaml") + "\nprint('API-BLOCK-DONE')\n", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "API-BLOCK-DONE" in proc.stdout
    assert (tmp_path / "reports" / "api-tiny" / "report.html").is_file()


@pytest.mark.slow
def test_the_readme_api_block_runs_verbatim():
    """Verbatim, from the repository root, on the seed case it names (minutes on a CPU: the zoo's ResNet-50)."""
    proc = run_fresh(readme_api_block() + "\nprint('API-BLOCK-DONE')\n", ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "API-BLOCK-DONE" in proc.stdout
