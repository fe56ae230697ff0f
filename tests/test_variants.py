"""Variant cases: arms parsed as cases of their own, paired runs, comparisons judged on paired differences,
and their calibration (issue "Variants and paired comparisons")."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from cli_runs import run_cli
from surgery.case import case_calibration, experiment_hash, load_case, parse_case
from surgery.checks.base import Judge
from surgery.checks.comparisons import comparisons, decided_order, describe_order, evaluate_comparisons
from surgery.checks.expect import expectation_names, threshold_line, threshold_path, uncalibrated_fields
from surgery.errors import SurgeryInputError
from surgery.results import ExpectationResult
from surgery.running.prepare import build_source, load_data, paired_init_seed, perform_surgery, random_init_model
from surgery.running.cases import run_case
from surgery.running.runner import RunOptions
from surgery.running.variants import arms_left_out, seed_expectations
from surgery.stats.calibration import CalibrationRecord, ItemCalibration, load_record, record_path
from surgery.stats.bounds import (
    Calibrated,
    calibration_seeds_to_decide,
    decide,
    seeds_to_decide,
    seeds_to_decide_together,
)
from surgery.stats.pairing import pairing_spread

# Line numbers matter: error tests name them. The source is a ResNet-50 from random init (no zoo: fast), the
# target a ResNet-18, so 'exact' leaves tensors fresh (block conv1 kernels, downsample, fc).
VARIANT_CASE = """\
name: tiny-variants
seed: [0, 1]
device: cpu
data: {{train: {{name: digits, limit: 400}}, image_size: 16}}
source: {{model: "torchvision:resnet50", num_classes: 10}}
surgery:
  op: transplant
  target: {{model: "torchvision:resnet18", num_classes: 10}}
  strategy: select
finetune:
  steps: {steps}
  batch_size: 16
  eval_every: 2
variants:
  exact:
    surgery: {{strategy: exact}}
    expect: {{coverage: {{tensors_min: 0.5}}}}
  select: {{}}
  random: {{init: random, inits: 2}}
expect:
  coverage: {{tensors_min: 0.9}}
  accuracy: {{after_min: {after_min}}}
  compare:
    - {{better: select, than: random, margin: {margin}}}
  rank: [select, exact]
"""


def variant_text(steps: int = 2, after_min: str = "0.0", margin: str = "-1.0") -> str:
    return VARIANT_CASE.format(steps=steps, after_min=after_min, margin=margin)


def test_each_arm_is_the_case_with_its_entry_merged_over_it():
    case = parse_case(variant_text(), "v.yaml")
    assert list(case.arms) == ["exact", "select", "random"]
    exact, select, random = case.arms.values()
    assert (exact.name, exact.surgery.strategy, exact.expect.coverage.tensors_min) == (
        "tiny-variants.exact",
        "exact",
        0.5,
    )
    assert (select.surgery.strategy, select.expect.coverage.tensors_min) == ("select", 0.9)
    assert select.expect.accuracy.after_min == 0.0 and exact.expect.accuracy.after_min == 0.0
    # A random arm keeps no expectations of its own but finite; every arm keeps the data and the fine-tune.
    assert random.expect.coverage is None and random.expect.accuracy is None and random.expect.finite
    assert {a.finetune.steps for a in case.arms.values()} == {2}
    # Where an arm's field comes from: its own entry (named variants.ARM.…) or the case.
    assert exact.where("surgery.strategy") == "v.yaml:16: variants.exact.surgery.strategy"
    assert select.where("surgery.strategy") == "v.yaml:9: surgery.strategy"


def test_an_entry_naming_another_op_replaces_the_surgery_section():
    text = variant_text().replace(
        "  select: {}\n",
        "  select: {}\n"
        '  graft: {surgery: {op: graft, donor: {model: "torchvision:resnet18", num_classes: 10}, path: conv1}}\n',
    )
    case = parse_case(text, "v.yaml")
    assert case.arms["graft"].surgery.op == "graft" and not hasattr(case.arms["graft"].surgery, "strategy")


@pytest.mark.parametrize(
    "old, new, expected",
    [
        (
            "surgery: {strategy: exact}",
            "surgery: {strategy: exactly}",
            "v.yaml:16: variants.exact.surgery.strategy: got 'exactly'",
        ),
        (
            "surgery: {strategy: exact}",
            "surgery: {stratgy: exact}",
            "v.yaml:16: variants.exact.surgery.stratgy: unknown key",
        ),
        (
            "{coverage: {tensors_min: 0.5}}",
            "{coverage: {tensors_min: 1.5}}",
            "v.yaml:17: variants.exact.expect.coverage.tensors_min",
        ),
        (
            "than: random",
            "than: randm",
            "v.yaml:24: expect.compare[0].than: got 'randm'; expected one of the arms: exact, select, random",
        ),
        ("than: random", "than: select", "v.yaml:24: expect.compare[0].than: an arm compared with itself"),
        ("rank: [select, exact]", "rank: [select, select]", "v.yaml:25: expect.rank: got ['select', 'select']"),
        ("{init: random, inits: 2}", "{init: random, surgery: {strategy: exact}}", "v.yaml:19: variants.random"),
        ("  select: {}", "  select: {inits: 3}", "v.yaml:18: variants.select"),
        ("  select: {}", "  Select: {}", "v.yaml:18: variants.Select"),
        ("  exact:\n", "  exact:\n    finetune: {steps: -1}\n", "v.yaml:16: variants.exact.finetune.steps"),
    ],
)
def test_a_bad_variant_is_one_line_naming_its_field_and_line(old, new, expected):
    text = variant_text()
    assert old in text
    with pytest.raises(SurgeryInputError) as info:
        parse_case(text.replace(old, new, 1), "v.yaml")
    assert str(info.value).startswith(expected), str(info.value)
    assert "\n" not in str(info.value)


def test_comparisons_need_variants_and_beats_baseline_is_an_arm_there(base_case):
    with pytest.raises(SurgeryInputError, match=r"^c.yaml:19: expect.rank: compares arms; expected a variants"):
        parse_case(base_case + "  rank: [a, b]\n", "c.yaml")
    text = variant_text().replace("accuracy: {after_min: 0.0}", "accuracy: {after_min: 0.0, beats_baseline: {}}")
    with pytest.raises(SurgeryInputError, match=r"^v.yaml:22: expect.accuracy.beats_baseline: in a variant case"):
        parse_case(text, "v.yaml")


def test_items_are_each_arms_then_the_comparisons_with_their_thresholds_lines():
    case = parse_case(variant_text(), "v.yaml")
    names = expectation_names(case)
    assert names == [
        "exact/coverage.tensors_min",
        "exact/accuracy.after_min",
        "exact/finite",
        "select/coverage.tensors_min",
        "select/accuracy.after_min",
        "select/finite",
        "random/finite",
        "compare.select>random",
        "rank.select>exact",
    ]
    assert threshold_path(case, "exact/accuracy.after_min") == ("variants", "exact", "expect", "accuracy", "after_min")
    assert threshold_path(case, "compare.select>random") == ("expect", "compare", 0, "margin")
    # The line a pytest skip points at: the arm's own entry, else the case's expect section, the compare entry.
    assert threshold_line(case, "exact/coverage.tensors_min") == 17
    assert threshold_line(case, "exact/accuracy.after_min") == 22
    assert threshold_line(case, "compare.select>random") == 24
    placeholder = parse_case(variant_text(margin="calibrate", after_min="calibrate"), "v.yaml")
    assert uncalibrated_fields(placeholder) == [
        "variants.exact.expect.accuracy.after_min",
        "variants.select.expect.accuracy.after_min",
        "expect.compare.0.margin",
    ]


def test_the_experiment_hash_ignores_thresholds_written_into_an_arm_but_not_its_surgery():
    text = variant_text()
    base = experiment_hash(parse_case(text))
    written = text.replace(
        "  select: {}\n", "  select:\n    description: any\n    expect: {accuracy: {after_min: {1: 0.5}}}\n"
    )
    assert experiment_hash(parse_case(written)) == base
    assert experiment_hash(parse_case(text.replace("strategy: exact}", "strategy: order}"))) != base
    assert experiment_hash(parse_case(text.replace("inits: 2", "inits: 3"))) != base


def test_arms_share_the_initial_values_of_fresh_tensors_within_a_seed():
    case = parse_case(variant_text(), "v.yaml")
    exact, random = case.arms["exact"], case.arms["random"]
    split = load_data(exact, 0)
    source, _ = build_source(exact, split)  # as the run builds it: a ResNet-50 from random init
    patient, record = perform_surgery(exact, source, split, init_seed=paired_init_seed(0))
    fresh = [t.target_key for t in record.tensors if t.method == "fresh"]
    assert "fc.weight" in fresh and len(fresh) > 5
    state = patient.state_dict()
    first = random_init_model(random, split, paired_init_seed(0)).state_dict()
    second = random_init_model(random, split, paired_init_seed(0, 1)).state_dict()
    other_seed = random_init_model(random, split, paired_init_seed(1)).state_dict()
    for name in fresh:
        assert torch.equal(state[name], first[name]), name
    assert not torch.equal(first["fc.weight"], second["fc.weight"])
    assert not torch.equal(first["fc.weight"], other_seed["fc.weight"])


@pytest.fixture(scope="module")
def variant_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("variants") / "tiny.yaml"
    path.write_text(variant_text())
    case = load_case(path)
    return case, run_case(case, RunOptions(progress=False))


def test_a_run_judges_each_arm_and_each_comparison_on_paired_differences(variant_run):
    case, result = variant_run
    assert [e.name for e in result.expectations] == expectation_names(case)
    assert set(result.arms) == {"exact", "select", "random"} and result.seeds == [0, 1]
    after = result.variants["after"]
    inits = result.variants["inits"]["random"]
    for seed in ("0", "1"):
        assert len(inits[seed]) == 2 and after["random"][seed] == pytest.approx(statistics.fmean(inits[seed]))
    compare = result.expectation("compare.select>random")
    diffs = {seed: after["select"][seed] - after["random"][seed] for seed in ("0", "1")}
    assert compare.details["differences"] == pytest.approx(diffs)
    assert compare.observed == pytest.approx(statistics.fmean(diffs.values()))
    assert compare.passed  # margin -1: any difference holds
    # Each arm's own result is a case result: the select arm filled every tensor, exact left some fresh.
    assert result.arm("select").metrics["coverage"]["tensors"] == 1.0
    assert result.arm("exact").metrics["coverage"]["tensors"] < 1.0
    assert result.expectation("exact/coverage.tensors_min").passed
    # Paired: the seeds' batch orders are the arms' own; arms see the same split (same test set size).
    tests = {result.arm(a).per_seed[0]["data"]["test"] for a in ("exact", "select")}
    assert len(tests) == 1
    assert describe_order(result.variants["order"]) == result.variants["order_text"]


def test_seed_expectations_give_each_items_figure_for_one_seed(variant_run):
    case, result = variant_run
    by_seed = seed_expectations(case, result)
    assert set(by_seed) == {0, 1}
    for seed, items in by_seed.items():
        named = {e.name: e for e in items}
        assert set(named) == set(expectation_names(case))
        after = result.variants["after"]
        assert named["compare.select>random"].observed == pytest.approx(
            after["select"][str(seed)] - after["random"][str(seed)]
        )


def _record(case, mean: float, std: float, seeds: int = 8) -> CalibrationRecord:
    item = ItemCalibration("lower", "mean", {"native": {}}, mean, std, seeds, seeds)
    return CalibrationRecord(
        case.name, experiment_hash(case), 0.001, list(range(seeds)), {}, items={"compare.select>random": item}
    )


def test_a_random_arm_whose_comparisons_these_seeds_cannot_decide_is_left_out():
    case = parse_case(variant_text(margin="0.03"), "v.yaml")
    noisy = _record(case, 0.12, 0.045)  # the old single-case select-vs-random figures: undecided at 1 seed
    assert arms_left_out(case, 1, noisy, RunOptions()) == {"random": "these seeds cannot decide any comparison with it"}
    assert arms_left_out(case, 1, noisy, RunOptions(calibrating=True)) == {}
    assert arms_left_out(case, 1, _record(case, 0.2, 0.01), RunOptions()) == {}
    judged = evaluate_comparisons(
        case, {"select": {0: 0.9}}, Judge(seeds=1, record=noisy), {"random": "these seeds cannot decide"}
    )
    assert judged[0].status == "undecided" and "arm random was not run" in judged[0].message


def test_a_left_out_arms_own_items_are_undecided_with_why(tmp_path):
    """Every item of a left-out arm has a result (pytest items exist for them): undecided, never passed."""
    path = tmp_path / "v.yaml"
    path.write_text(variant_text(margin="0.03"))
    case = load_case(path)
    record = _record(case, 0.12, 0.045)
    from surgery.stats.calibration import save_record

    save_record(record, record_path(path))
    result = run_case(case, RunOptions(progress=False, max_seeds=1))
    assert set(result.arms) == {"exact", "select"} and result.variants["arms"]["random"]["run"] is False
    finite = result.expectation("random/finite")
    assert finite.status == "undecided" and "arm random was not run" in finite.message
    assert [e.name for e in result.expectations] == expectation_names(case)


def test_the_decided_order_places_an_arm_below_every_arm_shown_to_beat_it():
    case = parse_case(variant_text().replace("rank: [select, exact]", "rank: [select, exact, random]"), "v.yaml")

    def held(better: str, than: str, status: str = "passed") -> ExpectationResult:
        return ExpectationResult(
            f"x.{better}>{than}", status == "passed", 0.1, 0.0, {"better": better, "than": than}, "", status
        )

    assert decided_order(case, [held("select", "exact"), held("exact", "random")]) == [
        ["select"],
        ["exact"],
        ["random"],
    ]
    assert decided_order(case, [held("select", "random"), held("exact", "random", "undecided")]) == [
        ["exact", "select"],
        ["random"],
    ]
    assert describe_order(decided_order(case, [])) == "exact = select = random"
    # A held non-inferiority claim (negative margin) orders nothing; arms not run are not in the order.
    within = held("exact", "select")
    within.threshold = -0.02
    assert decided_order(case, [within]) == [["exact", "select", "random"]]
    assert decided_order(case, [held("select", "random")], ["exact", "select"]) == [["exact", "select"]]
    assert [c.name for c in comparisons(case)] == ["compare.select>random", "rank.select>exact", "rank.exact>random"]


def test_pairing_spread_measures_unpaired_paired_and_averaged():
    # Two profiles' figures: the select arm moves with the seed's data, so pairing cancels most of it.
    figures = {
        "native": {
            "select": {"0": {"after": 0.90}, "1": {"after": 0.80}, "2": {"after": 0.85}},
            "random": {
                "0": {"after": 0.80, "inits": [0.82, 0.78]},
                "1": {"after": 0.69, "inits": [0.70, 0.68]},
                "2": {"after": 0.76, "inits": [0.74, 0.78]},
            },
        }
    }
    spread = pairing_spread(figures, "select", "random")
    sel, single = [0.90, 0.80, 0.85], [0.82, 0.70, 0.74]
    assert spread["runs"] == 3 and spread["inits"] == 2
    assert spread["unpaired"] == pytest.approx(math.hypot(statistics.stdev(sel), statistics.stdev(single)))
    assert spread["paired"] == pytest.approx(statistics.stdev([a - b for a, b in zip(sel, single)]))
    assert spread["paired_averaged"] == pytest.approx(statistics.stdev([0.10, 0.11, 0.09]))
    assert spread["paired"] < spread["unpaired"]


def test_calibrating_a_variant_case_writes_arm_thresholds_and_comparison_samples(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(variant_text(after_min="calibrate"))
    rc, out, err = run_cli("calibrate", str(path), "--seeds", "2", "--profiles", "native", "--alpha", "0.01", "--write")
    assert rc == 0, out + err
    assert "compare.select>random: sd of the difference over 2 runs: unpaired" in out
    case = load_case(path)
    calibration = case_calibration(case)
    assert calibration.fresh, "writing an arm's thresholds must not make its record stale"
    record = load_record(record_path(path))
    assert {"exact/accuracy.after_min", "select/accuracy.after_min", "compare.select>random"} <= set(record.items)
    assert set(record.arm_figures["native"]) == {"exact", "select", "random"}
    assert len(record.arm_figures["native"]["random"]["0"]["inits"]) == 2
    # The calibrated bounds went into each arm's own entry; the case's placeholder stays as the default.
    for arm in ("exact", "select"):
        written = case.arms[arm].expect.accuracy.after_min
        assert isinstance(written, dict) and set(written) == {1, 2}
    assert "    expect:\n      accuracy:" in path.read_text() or "after_min: {1:" in path.read_text()
    assert not uncalibrated_fields(case)
    # --rederive: the same samples at another alpha, nothing run; the record stays fresh.
    before = record.thresholds["select/accuracy.after_min"]["bounds"]["1"]
    rc, out, err = run_cli("calibrate", str(path), "--rederive", "--alpha", "0.2", "--write")
    assert rc == 0, out + err
    again = load_record(record_path(path))
    assert again.alpha == 0.2 and again.thresholds["select/accuracy.after_min"]["bounds"]["1"] >= before
    assert again.items == record.items and case_calibration(load_case(path)).fresh
    # A run reads the arm's view of the record.
    rc, out, err = run_cli("run", str(path), "--report", str(tmp_path / "r"), "--quiet", "--seeds", "1")
    assert rc == 0, out + err
    results = json.loads(next((tmp_path / "r").glob("*/results.json")).read_text())
    after = next(e for e in results["expectations"] if e["name"] == "select/accuracy.after_min")
    assert "calibrated" in after["message"] and after["calibration"]["k"] == 1


def test_what_neither_more_run_seeds_nor_a_larger_calibration_decides_together_they_do():
    # The strategies case's select - random: mean 0.099, sd 0.062 over 8 calibration seeds, claim 0.03.
    calibrated = Calibrated(mean=0.0987, std=0.062, seeds=8, runs=14)
    assert seeds_to_decide(calibrated, 0.03, alpha=0.001) is None
    assert calibration_seeds_to_decide(calibrated, 0.03, alpha=0.001, k=3) is None
    n = seeds_to_decide_together(calibrated, 0.03, alpha=0.001)
    assert n is not None and n > 8

    def decision(count: int) -> str:
        wider = Calibrated(calibrated.mean, calibrated.std, seeds=count, runs=count)
        return decide(wider, 0.03, alpha=0.001, k=count)

    assert decision(n) == "holds" and decision(n - 1) == "undecided"
    assert seeds_to_decide_together(calibrated, 0.03, alpha=0.001, aggregate="worst") is None


def test_surgery_run_reports_a_bad_variant_with_exit_code_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(variant_text().replace("strategy: exact}", "strategy: exactly}"))
    rc, out, err = run_cli("run", str(path))
    assert rc == 2 and f"{path}:16: variants.exact.surgery.strategy" in err and len(err.strip().splitlines()) == 1


def test_parsing_a_variant_case_imports_no_torch():
    """Parse first, import later: a variant case's arms are validated without torch."""
    import subprocess
    import sys

    code = (
        "import sys, surgery\n"
        "case = surgery.load_case('cases/transplant/resnet50-to-resnet18-strategies.yaml')\n"
        "assert case.arms and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]\n"
    )
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_gating_a_checkpoint_against_a_variant_case_is_bad_input(tmp_path):
    case = tmp_path / "v.yaml"
    case.write_text(variant_text())
    candidate = tmp_path / "candidate.safetensors"
    candidate.write_bytes(b"")
    rc, out, err = run_cli("gate", str(candidate), "--case", str(case), "--report", str(tmp_path / "r"))
    assert rc == 2 and f"{case}:14: variants: a variant case compares arms" in err, err
    assert not (tmp_path / "r").exists()
