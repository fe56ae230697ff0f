"""Nightly history: dated report directories with a ``latest`` link, the rank test, the calibrated band, and
``surgery history`` over thirty nights made from real runs of a tiny case (see ``history_nights.py``: the
seeds vary by run, the provenance and the planted figures by editing copies of the real results)."""

from __future__ import annotations

import html
import itertools
import math
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from scipy import stats

from surgery.stats.bounds import Calibrated, prediction_bound
from surgery.nightly.history import drift_test, mann_whitney_u, read_history
from surgery.stats.bounds import calibrated_band
from surgery.nightly.nights import LATEST, find_nights, new_dated_dir, point_latest

from cli_runs import run_cli
from history_nights import CPU_FROM, LATER_CPU, TORCH_FROM, expectation, real_runs, thirty_nights
from history_nights import NAME as CASE
from history_nights import case_text
from test_report import NETWORK_URL
from test_report_browser import find_chromium, open_page, pixels_near, rgb

pytest_plugins = ["pytester"]

STEP_FROM, STEP = 23, -0.25  # the planted step: accuracy 0.25 lower from night 23 on (inside its wide band)


def _text(page: str) -> str:
    body = re.sub(r"<(style|svg)\b.*?</\1>", " ", page, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


# ----------------------------------------------------------------------------- statistics


def test_mann_whitney_u_is_scipys_exact_test_and_counts_ties_exactly():
    rng = np.random.default_rng(3)
    for n, m in ((7, 7), (4, 9), (10, 10)):
        for _ in range(10):
            x, y = list(rng.normal(0.5, 1, n)), list(rng.normal(0, 1, m))
            u, p = mann_whitney_u(x, y)
            ref = stats.mannwhitneyu(x, y, alternative="two-sided", method="exact")
            assert u == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue, rel=1e-12)
    # With ties: the permutation distribution, counted by brute force over all 3,432 splits.
    x, y = [0.5, 0.5, 0.6, 0.7, 0.7, 0.7, 0.8], [0.6, 0.6, 0.7, 0.8, 0.9, 0.9, 0.9]
    ranks = stats.rankdata(x + y)
    sums = [ranks[list(c)].sum() for c in itertools.combinations(range(14), 7)]
    observed = ranks[:7].sum()
    brute = min(
        1.0, 2 * min(sum(s <= observed + 1e-9 for s in sums), sum(s >= observed - 1e-9 for s in sums)) / len(sums)
    )
    assert mann_whitney_u(x, y)[1] == pytest.approx(brute, rel=1e-12)
    # 7 against 7 fully separated: p = 2 / C(14, 7), the smallest there is, below ASV's 0.002
    assert mann_whitney_u([0.0] * 7, [1.0] * 7) == (0.0, pytest.approx(2 / math.comb(14, 7)))
    assert mann_whitney_u([1.0] * 7, [1.0] * 7)[1] == 1.0
    # large pools: the normal approximation with tie and continuity corrections, as scipy's
    x, y = list(rng.normal(0.3, 1, 40)), list(rng.normal(0, 1, 40))
    ref = stats.mannwhitneyu(x, y, alternative="two-sided", method="asymptotic")
    assert mann_whitney_u(x, y)[1] == pytest.approx(ref.pvalue, rel=1e-9)


def test_drift_test_needs_two_windows_and_says_which_way_it_moved():
    steady = [0.9, 0.91, 0.89, 0.9, 0.92, 0.88, 0.9] * 2
    assert drift_test(steady[:13], window=7).p is None and "needs 14 runs" in drift_test(steady[:13]).describe()
    assert not drift_test(steady, window=7).flagged
    down = steady[:7] + [v - 0.05 for v in steady[7:]]
    drift = drift_test(down, window=7, direction="lower")
    assert drift.flagged and drift.towards_threshold and drift.shift == pytest.approx(-0.05)
    assert (
        "towards its threshold" in drift.describe()
        and "Mann–Whitney U, last 7 runs vs the 7 before" in drift.describe()
    )
    assert drift_test(down, window=7, direction="upper").towards_threshold is False


def test_calibrated_band_is_the_runs_two_sided_prediction_interval():
    cal = Calibrated(mean=0.9, std=0.02, seeds=8, runs=40)
    lower = prediction_bound(cal, alpha=0.001, k=3)
    judged = {
        "mean": 0.9,
        "std": 0.02,
        "seeds": 8,
        "runs": 40,
        "alpha": 0.001,
        "k": 3,
        "aggregate": "mean",
        "bound": lower,
    }
    lo, hi = calibrated_band(judged)
    assert lo == pytest.approx(lower) and hi == pytest.approx(
        prediction_bound(cal, alpha=0.001, k=3, direction="upper")
    )
    del judged["bound"]  # an older result: computed from the calibration itself
    assert calibrated_band(judged) == pytest.approx((lo, hi))
    assert calibrated_band(None) is None and calibrated_band({"mean": 1}) is None


def test_history_imports_no_torch():
    code = (
        "import sys; import surgery.cli, surgery.nightly.nights, surgery.nightly.history, surgery.report.history; "
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------- nights on disk


def test_dated_directories_never_collide_and_latest_follows(tmp_path):
    first = new_dated_dir(tmp_path)
    second = new_dated_dir(tmp_path, now=None)
    assert first != second and second.parent == tmp_path
    assert point_latest(first) == tmp_path / LATEST and (tmp_path / LATEST).resolve() == first.resolve()
    point_latest(second)
    assert (tmp_path / LATEST).resolve() == second.resolve()
    assert (tmp_path / LATEST).readlink() == Path(second.name)  # relative: the folder can move


def test_history_of_a_folder_without_reports_is_bad_input(tmp_path):
    rc, out, err = run_cli("history", tmp_path)
    assert rc == 2 and err.startswith(f"surgery: error: {tmp_path}: no report directory here")
    rc, out, err = run_cli("history", tmp_path / "missing")
    assert rc == 2 and "no such directory" in err


def test_pytest_report_dated_names_one_night_for_all_xdist_workers(pytester, tmp_path):
    (pytester.mkdir("cases") / "tiny.yaml").write_text(case_text(seed=0, drift_max="6.0", after_min="0.0"))
    report = tmp_path / "nightly"
    options = ("cases", "-p", "no:cacheprovider", f"--surgery-report={report}", "--surgery-report-dated")
    pytester.runpytest_inprocess(*options, "--collect-only").assert_outcomes()
    assert not any(report.iterdir())  # nothing ran: no empty night is left behind
    pytester.runpytest_inprocess(*options, "-n", "1").assert_outcomes(passed=4)  # the worker writes the case
    found = find_nights([report])
    assert len(found) == 1 and found[0].parent == report and (report / LATEST).resolve() == found[0].resolve()
    assert (found[0] / "index.html").is_file() and (found[0] / CASE / "results.json").is_file()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Three real dated runs of the tiny case (seeds 0, 1, 2) and their ``latest`` link."""
    return real_runs(tmp_path_factory.mktemp("history"))


def test_run_dated_keeps_nights_side_by_side(runs):
    dated = sorted(p for p in runs.iterdir() if not p.is_symlink())
    assert len(dated) == 3 and all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d{6}Z(-\d+)?", p.name) for p in dated)
    assert (runs / LATEST).is_symlink() and (runs / LATEST).resolve() == dated[-1].resolve()
    for night in dated:
        assert (night / "index.html").is_file() and (night / CASE / "report.html").is_file()
    assert find_nights([runs]) == dated  # latest counts once
    assert find_nights([runs / LATEST]) == [runs / LATEST]  # a night named through the link is still a night
    history = read_history([runs])
    assert [n.results[CASE].seeds for n in history.nights] == [[0], [1], [2]]


def _plants(i: int, data: dict) -> None:
    """Night 9 fails (drift far above its threshold), night 4 passes outside its band, night 14 is undecided."""
    drift, accuracy = expectation(data, "activations.drift_max"), expectation(data, "accuracy.after_min")
    if i == 9:
        drift.update(observed=drift["threshold"] * 1.2, passed=False, status="failed")
    if i == 4:
        drift.update(observed=0.05)
    if i == 14:
        accuracy.update(passed=False, status="undecided")


@pytest.fixture(scope="module")
def history_dir(runs, tmp_path_factory) -> Path:
    return thirty_nights(runs, tmp_path_factory.mktemp("thirty"), edit=_plants)


def test_history_of_thirty_nights_renders_flags_and_links(history_dir):
    rc, out, err = run_cli("history", history_dir)
    assert rc == 0, err
    page_path = history_dir / "history.html"
    assert out.splitlines()[0] == str(page_path)
    assert f"{CASE}: activations.drift_max: failed, outside band" in out
    assert f"{CASE}: accuracy.after_min: undecided" in out and "drifting" not in out
    page = page_path.read_text(encoding="utf-8")
    assert len(page.encode()) < 2_000_000
    assert "default-src 'none'" in page and "<script" not in page.lower()
    text = _text(page)
    assert "30 nights, 2026-11-01 03:15 … 2026-11-30 03:15" in text
    assert "latest night 2026-11-30T031500Z: 1/1 cases passed · 0 undecided · 0 failed" in text
    assert "1 expectation failed at least once · 1 outside the calibrated band · 0 drifting · 1 undecided" in text
    assert "two-sided Mann–Whitney U of the last k = 7 runs" in text and "p < 0.002" in text
    # provenance changes, where the copies' provenance changed
    assert re.search(r"P1 before 2026-11-13T031500Z .*torch: \S+ → 2\.15\.0\+cu130", text)
    assert re.search(rf"P2 before 2026-11-21T031500Z .*cpu_capability: \S+ → {LATER_CPU}", text)
    assert (TORCH_FROM, CPU_FROM) == (12, 20)
    # each point links to its night's report (2 drawn expectations × 30 nights), and the files exist; the two that
    # never moved (coverage, finite) are table rows, not plots
    links = re.findall(r'<a href="([^"#]+)#e-([^"]+)"[^>]*><title>([^<]*)</title>', page)
    assert len(links) == 60 and {f for _, f, _ in links} == {"accuracy.after_min", "activations.drift_max"}
    assert text.count("steady: the same figure in every run (not drawn)") == 2
    for href, fragment, _tip in links:
        assert (history_dir / unquote(href)).is_file() and unquote(href).endswith(f"{CASE}/report.html")
        assert f'<tr id="e-{fragment}"' in (history_dir / unquote(href)).read_text(encoding="utf-8")  # its row
    tips = {html.unescape(t) for _, _, t in links}
    assert any(t.startswith("activations.drift_max = ") and "(failed;" in t and "OUTSIDE BAND" in t for t in tips)
    # the nights table links each night's index
    assert len(re.findall(r'<a href="2026-11-\d\dT031500Z/index.html">', page)) == 30


def test_a_planted_step_inside_the_band_is_flagged_as_drift(runs, history_dir, tmp_path):
    def step(i: int, data: dict) -> None:
        accuracy = expectation(data, "accuracy.after_min")
        if i >= STEP_FROM:
            accuracy["observed"] += STEP

    history = read_history([thirty_nights(runs, tmp_path, edit=step)])
    series = next(s for s in history.series if s.name == "accuracy.after_min")
    assert series.drift.flagged and series.drift.p < 0.002 and series.drift.towards_threshold
    assert series.drift.shift == pytest.approx(STEP, abs=0.12)
    assert not series.outside and not series.failed  # inside its band, and still passing: drift before failure
    assert series.flags == ["drifting"]
    # the same nights without the step: nothing moved
    plain = next(s for s in read_history([history_dir]).series if s.name == "accuracy.after_min")
    assert not plain.drift.flagged and plain.drift.p > 0.05
    rc, out, _ = run_cli("history", tmp_path, "-o", tmp_path / "page.html")
    assert rc == 0 and f"{CASE}: accuracy.after_min: drifting" in out
    text = _text((tmp_path / "page.html").read_text(encoding="utf-8"))
    assert re.search(
        r"drifting: Mann–Whitney U, last 7 runs vs the 7 before, U = \S+, p = \S+ \(flag at "
        r"p < 0\.002\); median moved -0\.2\d* towards its threshold",
        text,
    )


# ----------------------------------------------------------------------------- in a browser


def test_history_page_and_index_in_headless_chromium(history_dir, tmp_path):
    chromium = find_chromium()
    run_cli("history", history_dir)
    dom, shot, requests = open_page(chromium, history_dir / "history.html", tmp_path, "history")
    assert requests == [], requests
    assert not NETWORK_URL.search(dom)
    assert not re.search(r"<(script|link|img|iframe|object|embed)\b", dom, re.I)
    text = _text(dom)
    for needle in ("surgery history", "Needs attention", CASE, "activations.drift_max", "outside band", "P2"):
        assert needle in text, needle
    image = rgb(shot)
    assert image.std() > 0.1
    for colour in ("#c6dbef", "#b2182b", "#1a7f37"):  # the band, the threshold, passed points
        assert pixels_near(image, colour) > 150, colour

    index_dom, index_shot, index_requests = open_page(chromium, history_dir / LATEST / "index.html", tmp_path, "index")
    assert index_requests == [] and "1/1 cases passed · 0 undecided · 0 failed" in _text(index_dom)
    assert pixels_near(rgb(index_shot), "#1a7f37") > 200  # the green banner
