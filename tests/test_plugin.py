"""The pytest plugin on real (tiny) cases: one item per expectation, one-line failures, bad input."""

from __future__ import annotations

import json
import os
import re

import pytest


pytest_plugins = ["pytester"]

# The zoo's stem trainer (a 7x7 conv and a small body) at 16 px: a run is a second or two, not ResNet-18's ten.
TINY = """\
name: tiny-{name}
seed: 0
data: {{train: {{name: digits, limit: 300}}, image_size: 16}}
source: {{model: "surgery.train.zoo:stem_trainer", num_classes: 10}}
surgery:
  op: transplant
  target: {{model: "surgery.train.zoo:stem_trainer", num_classes: 10}}
  strategy: exact
finetune: {{steps: 3, batch_size: 16, eval_every: 3}}
expect:
  coverage: {{tensors_min: 1.0}}
  accuracy: {{after_min: {after_min}}}
"""


@pytest.fixture
def case_dir(pytester: pytest.Pytester):
    pytester.mkdir("cases")
    return pytester.path / "cases"


def test_items_per_expectation_one_line_failure_and_seed_cap(pytester: pytest.Pytester, case_dir, tmp_path):
    (case_dir / "ok.yaml").write_text(TINY.format(name="ok", after_min=0.0).replace("seed: 0", "seed: [0, 1]"))
    (case_dir / "bad.yaml").write_text(TINY.format(name="bad", after_min=0.999))
    report = tmp_path / "reports"
    result = pytester.runpytest_inprocess(
        "cases", "-p", "no:cacheprovider", f"--surgery-report={report}", "--surgery-seeds", "1"
    )
    # ok: coverage, accuracy, finite pass; bad: accuracy.after_min fails, the other two pass
    result.assert_outcomes(passed=5, failed=1)
    out = result.stdout.str()
    assert "tiny-bad: accuracy.after_min: observed" in out
    assert "< after_min 0.999 (accuracy, seed 0)" in out
    assert "Traceback" not in out and "def runtest" not in out
    assert json.loads((report / "tiny-ok" / "results.json").read_text())["seeds"] == [0]
    assert (report / "index.html").is_file()


def test_collects_expectation_names(pytester: pytest.Pytester, case_dir):
    (case_dir / "ok.yaml").write_text(TINY.format(name="ok", after_min=0.0))
    result = pytester.runpytest_inprocess("cases", "--collect-only", "-q", "-p", "no:cacheprovider")
    out = result.stdout.str()
    for name in ("coverage.tensors_min", "accuracy.after_min", "finite"):
        assert f"cases/ok.yaml::{name}" in out


def test_bad_case_is_one_failing_item_naming_the_line(pytester: pytest.Pytester, case_dir):
    text = TINY.format(name="typo", after_min=0.0).replace("strategy: exact", "strategy: exact\n  stratgy: x")
    (case_dir / "typo.yaml").write_text(text)
    result = pytester.runpytest_inprocess("cases", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*bad input: *typo.yaml:9: surgery.stratgy: unknown key 'stratgy'*"])


def test_cases_that_would_train_the_same_baseline_run_on_one_xdist_worker(pytester: pytest.Pytester, case_dir):
    """A process reuses a baseline it trained on equal inputs, so the scheduler keeps such case files on one
    worker; plain ``loadfile`` gives these two to both workers, one each, and the test file to the first.
    Where items go is the question, not what they find: the cases are marked ``gpu``, so without CUDA their
    items are dealt out and skipped unrun."""
    import torch

    for name in ("a1", "a2"):
        text = TINY.format(name=name, after_min="0.0, beats_baseline: {margin: -1.0}")
        (case_dir / f"{name}.yaml").write_text(text.replace("seed: 0\n", "seed: 0\nmarkers: [gpu]\n"))
    pytester.makepyfile(test_other="def test_other():\n    pass\n")
    result = pytester.runpytest_inprocess("-n", "2", "-v", "-p", "no:cacheprovider", "--surgery-threads", "1")
    result.assert_outcomes(**({"passed": 9} if torch.cuda.is_available() else {"passed": 1, "skipped": 8}))
    workers: dict[str, set[str]] = {}
    for line in result.stdout.lines:
        if match := re.match(r"\[(gw\d)\] .*(?:PASSED|SKIPPED) (\S+?)::", line):
            workers.setdefault(match[2], set()).add(match[1])
    assert workers.keys() == {"cases/a1.yaml", "cases/a2.yaml", "test_other.py"}, workers
    assert workers["cases/a1.yaml"] == workers["cases/a2.yaml"] and len(workers["cases/a1.yaml"]) == 1, workers


def test_xdist_workers_wait_passively_when_they_oversubscribe_the_cores(pytester: pytest.Pytester, monkeypatch):
    """Workers whose threads, with a zoo build's, outnumber the cores start with ``OMP_WAIT_POLICY=PASSIVE``
    (see ``_workers_oversubscribe``); workers that fit keep OpenMP's default; a policy the user set is kept;
    the controller's environment is as it was after the session."""
    pytester.makepyfile(
        test_env="""
        import os

        def test_policy():
            assert os.environ.get("PYTEST_XDIST_WORKER")
            assert os.environ.get("OMP_WAIT_POLICY", "") == os.environ["EXPECTED_POLICY"]
        """
    )
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    cores = os.cpu_count() or 1

    def session(workers: int, zoo_threads: int, expected: str) -> None:
        monkeypatch.setenv("SURGERY_ZOO_THREADS", str(zoo_threads))
        monkeypatch.setenv("EXPECTED_POLICY", expected)
        result = pytester.runpytest_inprocess("-n", str(workers), "--surgery-threads", "1", "-p", "no:cacheprovider")
        result.assert_outcomes(passed=1)

    session(2, cores, "PASSIVE")  # 1 thread beside a build of every core
    assert "OMP_WAIT_POLICY" not in os.environ
    session(1, 1, "")  # one worker of 1 thread, builds of 1 thread: they fit
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    session(2, cores, "ACTIVE")
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
