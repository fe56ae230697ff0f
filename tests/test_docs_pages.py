"""Generated docs pages: the performance tables come from the published benchmark JSON, not from prose."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def load_hook():
    spec = importlib.util.spec_from_file_location("performance_hook", DOCS / "performance_hook.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("value", "goal", "met"),
    [
        (1.14, ">= 0.9", "✓"),
        (0.87, ">= 0.9", "✗"),
        (1.10, "<= 1.10", "✓"),
        (1.2, "< 1.0", "✗"),
        (1.02, "0.90 to 1.10", "✓"),
        (1.3, "0.90 to 1.10", "✗"),
        (73.9, "within 10% of 512", "–"),
        (0.4, "", "–"),
    ],
)
def test_goals_are_judged_by_their_form(value, goal, met):
    assert load_hook().goal_met(value, goal) == met


def test_every_published_figure_is_on_the_page_with_its_machine_speed():
    hook = load_hook()
    page = (DOCS / "performance.md").read_text(encoding="utf-8")
    assert hook.MARK in page
    folders = [p for p in hook.RESULTS.iterdir() if p.is_dir()]
    assert folders, "no benchmark results are published under docs/benchmarks/"
    tables = hook.tables()
    for folder in folders:
        assert f"### {folder.name}" in tables
        for path in folder.glob("*.json"):
            run = json.loads(path.read_text(encoding="utf-8"))
            for bench in run["benchmarks"]:
                for key in bench.get("extra_info", {}):
                    if not key.endswith("_goal"):
                        assert f"| {key} |" in tables, (path, key)
    assert "ResNet-18 training step **" in tables  # each machine's speed, to scale its times by


def test_a_new_machine_folder_becomes_a_new_section(tmp_path):
    hook = load_hook()
    published = next(p for p in sorted(hook.RESULTS.iterdir()) if p.is_dir())
    shutil.copytree(published, tmp_path / "2099-01-01-other")
    run = json.loads((tmp_path / "2099-01-01-other" / "fast.json").read_text(encoding="utf-8"))
    run["machine_info"]["surgery"]["resnet18_step_s"] = 0.25
    (tmp_path / "2099-01-01-other" / "fast.json").write_text(json.dumps(run), encoding="utf-8")
    tables = hook.tables(tmp_path)
    assert tables.index("### 2099-01-01-other") == 0  # newest first
    assert "training step **0.25 s**" in tables


def test_the_report_page_shows_the_browser_tests_screenshot():
    assert "](img/report.png)" in (DOCS / "report.md").read_text(encoding="utf-8")
    assert (DOCS / "img" / "report.png").is_file() and (DOCS / "img" / "report.chromium").is_file()


def test_the_seed_case_table_is_every_record_and_the_getting_started_page_asks_for_it():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    assert spec and spec.loader
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    from surgery.case import find_cases
    from surgery.stats.calibration import load_record, record_path

    table = hooks.calibration_table()
    records = [load_record(record_path(p)) for p in find_cases([hooks.CASES]) if record_path(p).is_file()]
    assert len(table.splitlines()) == 2 + sum(len(r.thresholds) for r in records)
    assert "| graft-stem-policies | compare.lr-scale>freeze |" in table and "1 seed holds, 3 seeds holds" in table
    # a claim only seeds together decide names them: N seeds against a calibration of the same N
    assert re.search(r"\((\d+) seeds against a calibration of \1 would decide it\)", table)
    assert hooks.TABLE_MARK in (DOCS / "getting-started.md").read_text(encoding="utf-8")
