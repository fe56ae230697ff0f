"""The package's structure: no module imports another module's private names, report rendering needs no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "surgery"
MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_names_imported_across_modules(path):
    """``from x import _y`` is refused, for our modules and third-party ones alike (``surgery._io`` is a private
    *module* with public names, as timm's ``_builder``: importing its public names is fine)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    private = [f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               for alias in node.names if alias.name.startswith("_") and alias.name != "__version__"]
    private += [f"{node.module}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
                and any(part.startswith("_") for part in node.module.split(".")[:-1] + [node.module.split(".")[-1]])
                and not node.module.startswith("surgery.") and node.module != "__future__"]
    assert not private, f"{path.name} imports private names: {private}"


def test_rendering_a_report_imports_no_torch(tmp_path):
    code = ("import sys; import surgery.report.render, surgery.results, surgery.calibration, surgery.bounds; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
