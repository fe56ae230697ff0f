"""Calibrated verdicts: the bounds' coverage by simulation, claims decided or undecided, threshold forms,
and ``surgery calibrate`` end to end on a tiny real model (record, ``--write``, a run that uses both).

The tiny case: the zoo's stem trainer (a 7×7 conv and a small body), random init, transplanted exactly
into itself and fine-tuned 4 steps on 300 UCI digits at 16 px: about a second per seed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from surgery.stats.bounds import (
    Calibrated,
    calibration_seeds_to_decide,
    decide,
    prediction_bound,
    rounded_bound,
    seeds_to_decide,
)
from surgery.stats.calibration import load_record, record_path
from surgery.case import experiment_hash, load_case, parse_case
from surgery.checks.base import resolve_threshold
from surgery.errors import SurgeryInputError
from surgery.train.numerics import (
    DEFAULT_THREADS,
    cores_of_this_process,
    outside_xdist,
    pin_numerics,
    requested_threads,
)

from cli_runs import run_cli  # the in-process CLI harness of tests/

# ----------------------------------------------------------------------------- the mathematics


def _miss_rate(alpha: float, k: int, aggregate: str, n: int = 8, trials: int = 40_000) -> float:
    """How often the k-seed aggregate of fresh normal draws falls below the bound computed from n draws."""
    rng = np.random.default_rng(1234)
    calib = rng.normal(0.8, 0.05, size=(trials, n))
    mean, std = calib.mean(axis=1), calib.std(axis=1, ddof=1)
    future = rng.normal(0.8, 0.05, size=(trials, k))
    observed = future.mean(axis=1) if aggregate == "mean" else future.min(axis=1)
    bounds = np.array(
        [
            prediction_bound(Calibrated(m, s, n, n), alpha=alpha, k=k, aggregate=aggregate)
            for m, s in zip(mean[:2000], std[:2000])
        ]
    )
    # The bound is m - c * s with c fixed by (alpha, n, k): compute c once, apply to every trial.
    c = (mean[:2000] - bounds) / std[:2000]
    assert np.allclose(c, c[0])
    return float(np.mean(observed < mean - c[0] * std))


@pytest.mark.parametrize("alpha", [0.05, 0.01])
@pytest.mark.parametrize("k,aggregate", [(1, "mean"), (3, "mean"), (3, "worst")])
def test_prediction_bound_covers_at_the_stated_rate(alpha, k, aggregate):
    trials = 40_000
    miss = _miss_rate(alpha, k, aggregate, trials=trials)
    slack = 4 * math.sqrt(alpha * (1 - alpha) / trials)
    if aggregate == "mean":  # exact under normality
        assert abs(miss - alpha) < slack, (miss, alpha)
    else:  # the k seeds share one estimate of m and s, so per-seed alpha_1 is a little conservative
        assert 0.7 * alpha < miss < alpha + slack, (miss, alpha)


def test_bound_tightens_with_seeds_for_a_mean_and_loosens_for_the_worst():
    c = Calibrated(mean=0.9, std=0.02, seeds=10, runs=30)
    one, three = (prediction_bound(c, alpha=0.001, k=k) for k in (1, 3))
    worst3 = prediction_bound(c, alpha=0.001, k=3, aggregate="worst")
    assert one < three < 0.9 and worst3 < one
    t = stats.t.ppf(0.999, 9)
    assert math.isclose(one, 0.9 - t * 0.02 * math.sqrt(1 + 1 / 10))
    assert prediction_bound(c, alpha=0.001, direction="upper") == pytest.approx(0.9 + (0.9 - one))


def test_a_claim_inside_the_spread_is_undecided_and_more_seeds_decide_it():
    c = Calibrated(mean=0.107, std=0.07, seeds=30, runs=90)
    assert decide(c, 0.03, alpha=0.001, k=1) == "undecided"
    needed = seeds_to_decide(c, 0.03, alpha=0.001)
    assert needed is not None and needed > 1
    assert decide(c, 0.03, alpha=0.001, k=needed) == "holds"
    assert decide(c, 0.03, alpha=0.001, k=needed - 1) == "undecided"
    assert decide(c, 0.5, alpha=0.001, k=1) == "fails"
    # With too few calibration seeds, no number of run seeds decides it: the estimate itself is too loose.
    assert seeds_to_decide(Calibrated(mean=0.107, std=0.07, seeds=3, runs=9), 0.03, alpha=0.001) is None
    # A figure without spread (coverage) is decided by any seed count.
    assert decide(Calibrated(1.0, 0.0, 5, 15), 0.99, alpha=0.001, k=1) == "holds"


@pytest.mark.parametrize(("aggregate", "direction", "claim"), [("mean", "lower", 0.3), ("worst", "upper", 3.0)])
def test_what_a_small_calibration_cannot_decide_a_larger_one_would(aggregate, direction, claim):
    """The scale cases' records (3 seeds at 224 px): run seeds cannot decide these claims, calibration seeds can."""
    mean, std = (0.1817, 0.0275) if aggregate == "mean" else (0.8136, 0.42)
    small = Calibrated(mean=mean, std=std, seeds=3, runs=3)
    assert decide(small, claim, alpha=0.001, k=1, direction=direction, aggregate=aggregate) == "undecided"
    assert seeds_to_decide(small, claim, alpha=0.001, direction=direction, aggregate=aggregate) is None
    wanted = calibration_seeds_to_decide(small, claim, alpha=0.001, k=1, direction=direction, aggregate=aggregate)
    assert wanted is not None and wanted > 3

    def with_seeds(n: int) -> str:
        wider = Calibrated(mean=mean, std=std, seeds=n, runs=n)
        return decide(wider, claim, alpha=0.001, k=1, direction=direction, aggregate=aggregate)

    assert with_seeds(wanted) != "undecided" and with_seeds(wanted - 1) == "undecided"
    # a claim at the mean stays undecided however large the calibration
    assert calibration_seeds_to_decide(small, mean, alpha=0.001, k=1, direction=direction, aggregate=aggregate) is None


def test_rounding_never_tightens_a_bound():
    assert rounded_bound(0.8849, "lower") == 0.884
    assert rounded_bound(0.1231, "upper") == 0.124
    assert rounded_bound(0.884, "lower") == 0.884


def test_a_run_uses_the_entry_of_the_largest_seed_count_not_above_its_own():
    thresholds = {1: 0.8, 3: 0.85}
    assert resolve_threshold(thresholds, 1) == 0.8
    assert resolve_threshold(thresholds, 2) == 0.8
    assert resolve_threshold(thresholds, 5) == 0.85
    assert resolve_threshold({3: 0.85}, 1) is None
    assert resolve_threshold(0.7, 4) == 0.7
    assert resolve_threshold("calibrate", 1) is None


# ----------------------------------------------------------------------------- threshold forms in a case file

CASE = """\
name: tiny-calibrated
seed: [0, 1]
device: cpu
data: {{train: {{name: digits, limit: 300}}, image_size: 16, split_seed: 0}}
source: {{model: "surgery.train.zoo:stem_trainer", num_classes: 10}}
surgery:
  op: transplant
  target: {{model: "surgery.train.zoo:stem_trainer", num_classes: 10}}
  strategy: exact
finetune: {{steps: {steps}, batch_size: 16, eval_every: 4, optimizer: {{name: adamw, lr: 3.0e-3}}}}
expect:
  coverage: {{tensors_min: 1.0}}   # a claim: a structural fact
  accuracy:
    after_min: {after_min}   # the threshold calibration derives
"""


@pytest.mark.parametrize(
    "value,fragment",
    [
        ("1.5", "got 1.5; expected a number in [0, 1]"),
        ("{0: 0.5}", "key 0: expected a seed count >= 1"),
        ("{1: 2}", "got 2 for 1 seed(s)"),
        ("{}", "empty mapping"),
        ("calibrated", "or 'calibrate'"),
        (".nan", "got nan"),
    ],
)
def test_bad_thresholds_name_file_line_and_field(value, fragment):
    with pytest.raises(SurgeryInputError) as info:
        parse_case(CASE.format(steps=4, after_min=value), "t.yaml")
    message = str(info.value)
    assert message.startswith("t.yaml:14: expect.accuracy.after_min:") and fragment in message, message


def test_experiment_hash_ignores_thresholds_but_not_the_experiment():
    a = parse_case(CASE.format(steps=4, after_min="0.5"))
    b = parse_case(CASE.format(steps=4, after_min="{1: 0.2, 2: 0.3}"))
    c = parse_case(CASE.format(steps=5, after_min="0.5"))
    assert experiment_hash(a) == experiment_hash(b) != experiment_hash(c)


def test_a_new_zoo_recipe_makes_the_records_of_the_cases_that_use_it_stale(monkeypatch):
    """The zoo trains the source from its recipe: another recipe is another source, so other figures."""
    from surgery.models import recipes

    text = CASE.format(steps=4, after_min="0.5")
    factory_source = '{model: "surgery.train.zoo:stem_trainer", num_classes: 10}'
    assert factory_source in text
    from_zoo = parse_case(text.replace(factory_source, '{model: "zoo:mnist-resnet18"}', 1))
    without_zoo, with_zoo = experiment_hash(parse_case(text)), experiment_hash(from_zoo)
    recipe = recipes.ZOO["mnist-resnet18"]
    longer = dataclasses.replace(recipe, steps=recipe.steps + 1)
    monkeypatch.setitem(recipes.ZOO, "mnist-resnet18", longer)
    assert experiment_hash(from_zoo) != with_zoo
    assert experiment_hash(parse_case(text)) == without_zoo  # a case that names no zoo model is not touched


# ----------------------------------------------------------------------------- end to end


# (seeds, perturbed seeds) of the calibration the end-to-end tests share: 2 × native + 1 thread (1 seed) in CI,
# the long form 3 × native + 1 thread (2 seeds) nightly (``slow``): each profile is a subprocess that imports torch.
CALIBRATIONS = [(2, 1), pytest.param((3, 2), marks=pytest.mark.slow, id="3x2-slow")]


@pytest.fixture(scope="module", params=CALIBRATIONS, ids=lambda p: f"{p[0]}x{p[1]}")
def calibration(request) -> tuple[int, int]:
    return request.param


@pytest.fixture(scope="module")
def calibrated(calibration, tmp_path_factory) -> Path:
    """A tiny case with a placeholder, calibrated with native + 1 thread profiles (``calibration``), written back."""
    seeds, perturbed = calibration
    case = tmp_path_factory.mktemp("calibrated") / "tiny.yaml"
    case.write_text(CASE.format(steps=4, after_min="calibrate"))
    rc, out, err = run_cli(
        "calibrate",
        str(case),
        "--seeds",
        str(seeds),
        "--perturbed-seeds",
        str(perturbed),
        "--profiles",
        "native,threads1",
        "--alpha",
        "0.01",
        "--write",
    )
    assert rc == 0, out + err
    (case.parent / "calibrate.log").write_text(out)
    return case


def test_calibrate_writes_a_record_and_the_thresholds_keeping_comments(calibrated, calibration):
    seeds, perturbed = calibration
    # Each profile runs its seeds in as many processes as this process's share of the cores holds at the threads
    # they pin (native 2, whatever this process runs at: under xdist, 1); one is this process.
    log = (calibrated.parent / "calibrate.log").read_text()
    for profile, threads in (("native", 2), ("threads1", 1)):
        jobs = min(seeds if profile == "native" else perturbed, max(1, cores_of_this_process() // threads))
        where = "this process" if jobs == 1 else f"{jobs} processes"
        expected = f"({where} × {threads} thread{'s' if threads > 1 else ''})"
        assert f"profile {profile}: " in log and expected in log.split(f"profile {profile}: ")[1], log
    record = load_record(record_path(calibrated))
    case = load_case(calibrated)
    assert record.experiment_hash == experiment_hash(case)
    assert record.seeds == list(range(seeds)) and set(record.profiles) == {"native", "threads1"}
    after = record.items["accuracy.after_min"]
    assert set(after.samples) == {"native", "threads1"}
    assert set(after.samples["threads1"]) == {str(s) for s in range(perturbed)}
    assert after.runs == seeds + perturbed and after.seeds == seeds
    assert record.profiles["threads1"]["threads"] == 1 and record.profiles["native"]["threads"] == 2
    # The placeholder became the bounds for 1 seed and for the case's 2 seeds; the comment survived.
    text = calibrated.read_text()
    assert "# the threshold calibration derives" in text and "# a claim: a structural fact" in text
    written = case.expect.accuracy.after_min
    assert isinstance(written, dict) and set(written) == {1, 2}
    assert written[1] == pytest.approx(record.thresholds["accuracy.after_min"]["bounds"]["1"])
    assert written[1] <= after.mean
    # The coverage claim is a structural fact: no spread, decided for every seed count.
    assert record.thresholds["coverage.tensors_min"]["decision"] == {"1": "holds", "2": "holds"}


def test_a_profile_run_in_this_process_has_the_figures_of_its_subprocess(calibrated, calibration):
    """The native profile ran in the calibrating process (one job); its worker subprocess, the path the other
    profiles take, computes the same figures for the same seed, to the bit."""
    native = next(
        line for line in (calibrated.parent / "calibrate.log").read_text().splitlines() if "profile native:" in line
    )
    if "(this process" not in native:
        pytest.skip("the native profile ran in subprocesses here (more cores than its threads)")
    out = calibrated.parent / "worker-native.json"
    proc = subprocess.run(
        [sys.executable, "-m", "surgery.running.calibrate", "--worker", str(calibrated), "--worker-seeds", "1"]
        + ["--worker-out", str(out)],
        capture_output=True,
        text=True,
        env=outside_xdist({key: value for key, value in os.environ.items() if key != "SURGERY_THREADS"}),
    )
    assert proc.returncode == 0, proc.stderr
    worker = json.loads(out.read_text())
    record = load_record(record_path(calibrated))
    assert worker["provenance"]["threads"] == record.profiles["native"]["threads"] == 2
    for item, per_seed in worker["figures"].items():
        assert per_seed["1"] == record.items[item].samples["native"]["1"], item


def test_a_run_shows_the_calibrated_distribution_in_its_messages(calibrated, calibration, tmp_path):
    rc, out, err = run_cli("run", str(calibrated), "--report", str(tmp_path / "r"), "--quiet", "--seeds", "1")
    assert rc == 0, out + err
    results = json.loads(next((tmp_path / "r").glob("*/results.json")).read_text())
    after = next(e for e in results["expectations"] if e["name"] == "accuracy.after_min")
    assert "calibrated" in after["message"] and f"{calibration[0]} seeds × 2 numeric profiles" in after["message"]
    assert after["calibration"]["k"] == 1 and after["status"] == "passed"
    assert results["calibration"].startswith("calibrated at alpha = 0.01")
    prov = results["provenance"]
    assert prov["threads"] == requested_threads() and prov["cpu_capability"] and "deterministic_algorithms" in prov
    assert "<svg" in (tmp_path / "r" / "tiny-calibrated" / "report.html").read_text()


def test_a_claim_the_seeds_cannot_decide_is_skipped_in_pytest_and_undecided_in_therun_cli(
    calibrated, tmp_path, pytester
):
    record = load_record(record_path(calibrated))
    mean = record.items["accuracy.after_min"].mean
    assert record.items["accuracy.after_min"].std > 0
    claim = tmp_path / "cases" / "claim.yaml"
    claim.parent.mkdir()
    text = calibrated.read_text()
    start = text.index("after_min:")
    claim.write_text(text[:start] + f"after_min: {mean:.6f}\n")  # a claim right at the calibrated mean
    record_path(claim).write_text(record_path(calibrated).read_text())

    rc, out, _ = run_cli("run", str(claim), "--report", str(tmp_path / "r"), "--quiet", "--seeds", "1")
    assert rc == 0 and "1 undecided" in out and "undecided at α = 0.01 with 1 seed" in out, out

    session = pytester.runpytest_inprocess(str(claim), "-rs", "-q", "--surgery-seeds", "1", "-p", "no:cacheprovider")
    out = session.stdout.str()
    assert session.ret == 0, out
    assert "SKIPPED" in out and "undecided at α = 0.01" in out, out
    assert "claim.yaml:14: undecided" in out, out  # the skip points at the threshold's line
    assert "1 skipped" in out and "passed" in out


@pytest.fixture(scope="module")
def calibrated_gap(tmp_path_factory) -> Path:
    """The tiny case with a gap to calibrate against a ResNet-18 baseline (the patient's own architecture from
    the seed's init would be the patient itself: a gap of exactly 0)."""
    case = tmp_path_factory.mktemp("gap") / "gap.yaml"
    case.write_text(
        CASE.format(steps=4, after_min="0.0")
        + '    beats_baseline: {margin: calibrate, model: {model: "torchvision:resnet18"}}\n'
    )
    rc, out, err = run_cli("calibrate", str(case), "--seeds", "4", "--profiles", "native", "--alpha", "0.01", "--write")
    assert rc == 0, out + err
    return case


def _with_margin(calibrated: Path, folder: Path, margin: float) -> Path:
    """A copy of the calibrated gap case (with its record) whose baseline margin is the claim ``margin``."""
    case = folder / f"margin{margin:+.3f}.yaml"
    text = calibrated.read_text()
    start = text.index("beats_baseline:")
    case.write_text(
        text[:start] + f'beats_baseline: {{margin: {margin:.6f}, model: {{model: "torchvision:resnet18"}}}}\n'
    )
    record_path(case).write_text(record_path(calibrated).read_text())
    return case


def test_a_baseline_claim_the_seeds_cannot_decide_trains_no_baseline(calibrated_gap, tmp_path):
    import surgery

    gap = load_record(record_path(calibrated_gap)).items["accuracy.beats_baseline"]
    assert gap.std > 0
    # A claim at the calibrated mean: one seed cannot decide it, so the baselines' fine-tunes would be wasted.
    undecidable = surgery.run(surgery.load_case(_with_margin(calibrated_gap, tmp_path, gap.mean)), seeds=1)
    verdict = next(e for e in undecidable.expectations if e.name == "accuracy.beats_baseline")
    assert verdict.status == "undecided" and "the baseline was not run" in verdict.message, verdict.message
    assert all("baseline" not in s["accuracy"] for s in undecidable.per_seed)
    # A claim far below every calibrated gap is decided: the baseline trains and the gap is measured.
    decidable = surgery.run(surgery.load_case(_with_margin(calibrated_gap, tmp_path, gap.mean - 1.0)), seeds=1)
    verdict = next(e for e in decidable.expectations if e.name == "accuracy.beats_baseline")
    assert verdict.status == "passed" and verdict.observed is not None, verdict.message
    assert decidable.per_seed[0]["accuracy"]["baseline"] is not None


def test_a_changed_experiment_makes_the_record_stale(calibrated, tmp_path):
    changed = tmp_path / "changed.yaml"
    changed.write_text(calibrated.read_text().replace("steps: 4", "steps: 3"))
    record_path(changed).write_text(record_path(calibrated).read_text())
    rc, out, err = run_cli("run", str(changed), "--report", str(tmp_path / "r"), "--quiet", "--seeds", "1")
    assert rc == 0, out + err
    results = json.loads(next((tmp_path / "r").glob("*/results.json")).read_text())
    assert "stale" in results["calibration"]
    assert all(e["calibration"] is None for e in results["expectations"])


def test_an_uncalibrated_placeholder_is_bad_input_at_its_line(tmp_path):
    case = tmp_path / "new.yaml"
    case.write_text(CASE.format(steps=4, after_min="calibrate"))
    rc, out, err = run_cli("run", str(case), "--report", str(tmp_path / "r"), "--quiet")
    assert rc == 2 and not (tmp_path / "r").exists()
    assert err.strip().splitlines() == [
        f"surgery: error: {case}:14: expect.accuracy.after_min: the placeholder 'calibrate' is not a threshold "
        f"yet; run `surgery calibrate {case} --write` first"
    ]


def test_threads_are_pinned_and_recorded(tmp_path, monkeypatch):
    case = tmp_path / "threads.yaml"
    case.write_text(CASE.format(steps=2, after_min="0.0"))
    monkeypatch.setenv("SURGERY_THREADS", "1")
    rc, out, err = run_cli("run", str(case), "--report", str(tmp_path / "r"), "--quiet")
    assert rc == 0, out + err
    assert json.loads((tmp_path / "r" / "tiny-calibrated" / "results.json").read_text())["provenance"]["threads"] == 1
    monkeypatch.setenv("SURGERY_THREADS", "zero")
    rc, _, err = run_cli("run", str(case), "--report", str(tmp_path / "r2"), "--quiet")
    assert rc == 2 and "SURGERY_THREADS='zero': expected a positive integer" in err
    monkeypatch.delenv("SURGERY_THREADS")
    pin_numerics()  # the rest of the session runs with the project's profile again


def test_an_xdist_worker_counts_its_share_of_the_cores_and_a_subprocess_the_default_threads(monkeypatch):
    """What a calibration sizes its jobs by: in a worker of N, cores / N; its subprocesses, outside xdist, pin
    ``$SURGERY_THREADS`` or the default, whatever the worker runs at."""
    cores = os.cpu_count() or 1
    monkeypatch.delenv("SURGERY_THREADS", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    assert cores_of_this_process() == cores and requested_threads() == DEFAULT_THREADS
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", str(cores))
    assert cores_of_this_process() == 1 and requested_threads() == 1
    assert requested_threads(workers=0) == DEFAULT_THREADS
    monkeypatch.setenv("SURGERY_THREADS", "3")
    assert requested_threads(workers=0) == 3 and requested_threads() == 3
