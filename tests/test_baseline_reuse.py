"""A baseline trained, or a source evaluated, on inputs equal to an earlier case's is reused, with equal figures."""

from __future__ import annotations

import json

import pytest

from surgery.case import parse_case
from surgery.running.reuse import BASELINES, SOURCE_ACCURACIES
from surgery.running.cases import run_case
from surgery.running.runner import RunOptions

CASE = """\
name: reuse-{strategy}
seed: {seed}
device: cpu
data: {{train: {{name: digits, limit: 240}}, image_size: 16, split_seed: 0}}
source: {{model: "surgery.train.zoo:stem_trainer", num_classes: 10}}
surgery:
  op: transplant
  target: {{model: "surgery.train.zoo:stem_trainer", num_classes: 10}}
  strategy: {strategy}
finetune: {{steps: {steps}, batch_size: 16, eval_every: {steps}, optimizer: {{name: adamw, lr: 0.003}}}}
expect:
  accuracy: {{after_min: 0.0, beats_baseline: {{margin: -1.0}}}}
"""


def baseline_figures(
    strategy: str = "exact", *, seed: int = 0, steps: int = 4, threads: int = 1, curves: bool = True
) -> tuple:
    """Source accuracy, baseline accuracy and curve of a one-seed run of the case (baseline: a fresh small CNN)."""
    case = parse_case(CASE.format(strategy=strategy, seed=seed, steps=steps), f"reuse-{strategy}.yaml")
    result = run_case(case, RunOptions(threads=threads, progress=False, curves=curves))
    (only,) = result.per_seed
    return only["accuracy"]["source"], only["accuracy"]["baseline"], only["baseline_curve"]


@pytest.fixture(autouse=True)
def empty_memos():
    clear_memos()
    yield
    clear_memos()


def clear_memos() -> None:
    BASELINES.clear()
    SOURCE_ACCURACIES.clear()


def test_a_second_case_with_the_same_baseline_inputs_reuses_figures_equal_to_a_fresh_training():
    first = baseline_figures("exact")
    reused = baseline_figures("order")  # another surgery, the same baseline: the target's architecture, fresh
    assert (BASELINES.misses, BASELINES.hits) == (SOURCE_ACCURACIES.misses, SOURCE_ACCURACIES.hits) == (1, 1)
    clear_memos()
    trained = baseline_figures("order")
    assert (BASELINES.misses, BASELINES.hits) == (SOURCE_ACCURACIES.misses, SOURCE_ACCURACIES.hits) == (1, 0)
    assert reused == first == trained
    reused[2].clear()  # the caller owns what it got: the memo keeps its own copy
    assert baseline_figures("exact") == trained


@pytest.mark.parametrize("changed", [{"seed": 1}, {"steps": 5}, {"threads": 2}, {"curves": False}])
def test_a_baseline_with_any_input_changed_is_trained_again(changed):
    baseline_figures("exact")
    baseline_figures("order", **changed)
    assert (BASELINES.misses, BASELINES.hits) == (2, 0)
    assert SOURCE_ACCURACIES.hits == (1 if changed in ({"steps": 5}, {"curves": False}) else 0)  # the same source


def test_a_run_without_curves_has_the_figures_of_a_run_with_them():
    """``RunOptions(curves=False)`` (pytest without a report, calibration): one evaluation per fine-tune, the
    last, and every figure as with the curve; a baseline memo never hands one kind of run the other's curve."""
    text = CASE.format(strategy="exact", seed=0, steps=6).replace("eval_every: 6", "eval_every: 2")
    case = parse_case(text, "c.yaml")
    full, final = (run_case(case, RunOptions(threads=1, progress=False, curves=c)) for c in (True, False))
    assert [e.observed for e in final.expectations] == [e.observed for e in full.expectations]
    [a], [b] = full.per_seed, final.per_seed
    assert a["accuracy"] == b["accuracy"]
    assert [len(a["finetune"]["curve"]), len(a["baseline_curve"])] == [3, 3]
    assert [len(b["finetune"]["curve"]), len(b["baseline_curve"])] == [1, 1]
    assert b["finetune"]["curve"][0]["accuracy"] == a["finetune"]["curve"][-1]["accuracy"]


def test_of_the_seed_cases_the_two_bridges_and_only_they_would_train_one_baseline():
    """What keeps cases on one pytest-xdist worker (:mod:`surgery.running.worker_groups`), read from the parsed
    case: equal data, fine-tune, seeds, device and baseline model."""
    from pathlib import Path

    from surgery.case import find_cases, load_case
    from surgery.running.worker_groups import shared_baseline_key

    seed_cases = find_cases([Path(__file__).parent.parent / "cases"])
    keys = {path.name: shared_baseline_key(load_case(path)) for path in seed_cases}
    shared = sorted(name for name, key in keys.items() if key is not None and list(keys.values()).count(key) > 1)
    assert shared == ["resnet50-linear-head.yaml", "resnet50-transformer-head.yaml"], keys
    key = lambda steps, name: shared_baseline_key(parse_case(CASE.format(strategy="exact", seed=0, steps=steps), name))  # noqa: E731
    assert key(4, "a.yaml") == key(4, "b.yaml") != key(5, "a.yaml")  # the file is not an input; the budget is


def test_a_source_accuracy_stored_by_another_process_is_read_and_a_damaged_one_evaluated_again(tmp_path, monkeypatch):
    """The next process (here: this one, its memo emptied) reads the stored figure instead of evaluating; the
    stored value is made distinguishable to show it is the one read. Another thread count is another file, and
    a damaged file is evaluated again and replaced."""
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path))
    evaluated = baseline_figures()[0]
    (stored,) = (tmp_path / "evaluations").iterdir()
    assert json.loads(stored.read_text()) == {"accuracy": evaluated}

    stored.write_text(json.dumps({"accuracy": 0.875}))  # far from this random source's ~0.08
    clear_memos()
    assert baseline_figures()[0] == 0.875 and SOURCE_ACCURACIES.misses == 1  # not in memory: read from disk
    clear_memos()
    assert baseline_figures(threads=2)[0] == pytest.approx(evaluated, abs=0.05)  # other numerics: evaluated
    assert len(list((tmp_path / "evaluations").iterdir())) == 2

    stored.write_text('{"accuracy": ')
    clear_memos()
    assert baseline_figures()[0] == evaluated
    assert json.loads(stored.read_text()) == {"accuracy": evaluated}


def test_an_unwritable_cache_costs_the_evaluation_not_the_run(tmp_path, monkeypatch):
    """A cache the user cannot write (a read-only mount): the source is evaluated, nothing is stored, the run
    goes on with the same figure."""
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path))
    evaluated = baseline_figures()[0]
    (tmp_path / "evaluations").rename(tmp_path / "was")
    (tmp_path / "evaluations").write_text("a file where the folder would be")  # no file can be written under it
    clear_memos()
    assert baseline_figures()[0] == evaluated
