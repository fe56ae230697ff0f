"""The report of a variant case: its page (order, comparisons, intervals, curves, drift and CKA by arm, arms),
the arms' own pages, the index row naming the winner, escaping, and arms left out of a run.

The result is a real run's ``results.json`` (``tests/data/variant-results.json``: a 2-step toy run of
``cases/transplant/resnet50-to-resnet18-strategies.yaml``, floats rounded, duplicate per-seed sections
dropped); its calibration record was stale, so its comparisons carry no calibration unless a test adds one.
"""

from __future__ import annotations

import copy
import html
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from surgery.checks.comparisons import decided_order, describe_order
from surgery.report.html import case_html, figures, fmt
from surgery.report.pages import page_html
from surgery.report.render import render_report, summary_table, write_case_report, write_index
from surgery.report.variants import variant_html, variant_view, winner_text
from surgery.results import CaseResult, ExpectationResult, load_results, safe_name

DATA = Path(__file__).parent / "data" / "variant-results.json"
ARMS = ["exact", "order", "select", "random"]
COMPARISONS = ["compare.select>random", "compare.exact>random", "rank.select>exact", "rank.exact>order"]
XSS = "<script>alert(1)</script>"
NETWORK_URL = re.compile(r"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:|ftp:|//)""", re.I)


@pytest.fixture(scope="module")
def sample() -> dict[str, Any]:
    return json.loads(DATA.read_text(encoding="utf-8"))


def result_of(data: dict[str, Any]) -> CaseResult:
    return CaseResult.from_dict(copy.deepcopy(data))


def decided(
    data: dict[str, Any], held: tuple[str, ...] = tuple(COMPARISONS), name: str | None = None
) -> dict[str, Any]:
    """The sample with the comparisons in ``held`` passed, the others failed, and the order the runner would
    decide from them (:func:`surgery.checks.comparisons.decided_order`)."""
    data = copy.deepcopy(data)
    if name:
        data["case"] = name
    for e in data["expectations"]:
        if e["name"] in COMPARISONS:
            e["passed"] = e["name"] in held
            e["status"] = "passed" if e["passed"] else "failed"
    case = SimpleNamespace(variants={arm: None for arm in data["variants"]["arms"]})
    tiers = decided_order(case, CaseResult.from_dict(copy.deepcopy(data)).expectations)
    data["variants"].update(order=tiers, order_text=describe_order(tiers), winner=tiers[0])
    return data


def without_random_arm(data: dict[str, Any]) -> dict[str, Any]:
    """The sample as a run that left its random arm out: no result, ``run`` false with why, and its
    comparisons undecided without differences (as :mod:`surgery.running.variants` writes them)."""
    data = copy.deepcopy(data)
    why = "these seeds cannot decide any comparison with it"
    del data["arms"]["random"]
    data["variants"]["arms"]["random"].update(run=False, why_not_run=why, verdict=None)
    del data["variants"]["after"]["random"]
    data["variants"]["inits"] = {}
    data["expectations"] = [e for e in data["expectations"] if not e["name"].startswith("random/")]
    for e in data["expectations"]:
        if e["name"].endswith(">random"):
            e.update(
                passed=False, status="undecided", observed=None, message=f"undecided: arm random was not run: {why}"
            )
            e["details"].update(differences={}, figures=None)
    return data


def text_of(page: str) -> str:
    """The page's visible text, one space between words (plots and styles left out)."""
    page = re.sub(r"<(svg|style)\b.*?</\1>", " ", page, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


def comparison_rows(page: str) -> dict[str, str]:
    """Each comparison row of the comparisons table: name -> its row's class."""
    return {html.unescape(name): cls for name, cls in re.findall(r'<tr id="c-([^"]+)" class="([^"]*)"', page)}


# ---------------------------------------------------------------------------------------------


def test_page_shows_the_decided_order_and_the_winner(sample):
    result = result_of(decided(sample))
    assert result.variants["order_text"] == "select > exact > order = random"
    page = variant_html(result)
    text = text_of(page)
    assert "winner: select — select > exact > order = random" in text
    assert "An arm stands above another only where a comparison between them held" in text
    tiers = re.search(r'<div class="order" id="order-tiers">(.*?)</div>', page, re.S)
    assert tiers is not None
    assert re.findall(r'class="arm[^"]*"[^>]*>([^<]+)</a>', tiers.group(1)) == ["select", "exact", "order", "random"]
    assert tiers.group(1).count('class="tier') == 3
    assert page.count('<span class="badge pass">winner</span>') == 1  # in the arms table, on select's row
    assert re.search(r'<tr id="arm-select".*?winner</span>', page, re.S)


def test_no_arm_separated_when_the_first_tier_holds_every_arm(sample):
    result = result_of(sample)  # the toy run: every comparison failed, one tier
    assert result.variants["order"] == [ARMS]
    assert winner_text(result) == "no arm separated"
    text = text_of(variant_html(result))
    assert "no arm separated — exact = order = select = random" in text
    assert "(no fresh calibration record: a claim held when this run's paired mean met its margin)" in text


def test_one_row_per_comparison_with_its_status_and_paired_differences(sample):
    held = ("compare.select>random", "rank.select>exact")
    result = result_of(decided(sample, held))
    page = variant_html(result)
    rows = comparison_rows(page)
    assert list(rows) == COMPARISONS
    for name, cls in rows.items():
        assert cls == ("pass" if name in held else "fail")
    view = variant_view(result)
    by_name = {c["name"]: c for c in view["comparisons"]}
    assert [c["status_word"] for c in view["comparisons"]] == ["held", "failed", "held", "failed"]
    first = by_name["compare.select>random"]
    assert first["claim"] == "select − random ≥ 3.00 pt"
    assert first["spread"] == "-3.80 pt ± 1.25 pt"
    assert [d["text"] for d in first["differences"]] == ["-5.05 pt", "-2.55 pt"]
    assert first["calibration"] is None
    row = re.search(r'<tr id="c-compare.select&gt;random".*?</tr>', page, re.S)
    assert row is not None
    assert "seed 0: -5.05 pt" in text_of(row.group(0)) and "not calibrated" in row.group(0)


def test_a_calibrated_comparison_shows_its_interval_bound_and_seeds_to_decide(sample):
    data = copy.deepcopy(sample)
    comparison = next(e for e in data["expectations"] if e["name"] == "compare.select>random")
    comparison.update(status="undecided", passed=False)
    comparison["calibration"] = {
        "mean": 0.02,
        "std": 0.015,
        "seeds": 8,
        "runs": 40,
        "alpha": 0.001,
        "k": 2,
        "aggregate": "mean",
        "direction": "lower",
        "bound": -0.018,
        "form": "claim",
        "decision": "undecided",
        "seeds_to_decide": 9,
        "calibration_seeds_to_decide": None,
    }
    result = result_of(data)
    view = variant_view(result)
    cal = view["comparisons"][0]["calibration"]
    assert cal["band"] == pytest.approx([-0.018, 0.058])  # the bound, mirrored about the calibrated mean
    assert (cal["spread"], cal["bound_text"], cal["decide"]) == (
        "+2.00 pt ± 1.50 pt",
        "-1.80 pt",
        "9 seeds would decide it",
    )
    assert view["order"]["alpha"] == 0.001
    page = variant_html(result)
    assert comparison_rows(page)["compare.select>random"] == "undecided"
    row = text_of(re.search(r'<tr id="c-compare.select&gt;random".*?</tr>', page, re.S).group(0))
    assert "+2.00 pt ± 1.50 pt" in row and "-1.80 pt" in row and "α = 0.001, 2 seeds" in row
    assert "9 seeds would decide it" in row
    assert "at the calibration record's α = 0.001" in text_of(page)
    intervals = str(view["plots"]["intervals"])
    assert ">calibrated prediction interval</text>" in intervals and ">bound judged against</text>" in intervals
    for name in COMPARISONS:
        assert f">{html.escape(name)}</text>" in intervals  # one row (tick label) per comparison


def test_curves_of_every_arm_overlaid_one_line_each(sample):
    result = result_of(sample)
    view = variant_view(result)
    assert [c["arm"] for c in view["curves"]] == ARMS
    assert view["curves"][-1]["shown"] == "mean of 4 curves (2 seeds × 2 inits)"  # the random arm: every init
    svg = str(view["plots"]["curves"])
    legend = re.findall(r"<text[^>]*>([^<]*)</text>", svg)
    assert [label for label in legend if label in ARMS] == ARMS  # one legend entry (bold line) per arm
    colors = {c["arm"]: c["color"] for c in view["curves"]}
    assert len(set(colors.values())) == len(ARMS)
    assert all(f"stroke: {color}" in svg for color in colors.values())


def test_drift_and_cka_by_arm(sample):
    view = variant_view(result_of(sample))
    drift = str(view["plots"]["drift"])
    for arm in ("exact", "order", "select"):  # the random arm probes no activations
        assert f">{arm}: after fine-tune</text>" in drift
    assert "random:" not in drift
    cka = view["cka"]
    assert cka["arms"] == ["exact", "order", "select"]
    layers = [r["layer"] for r in cka["rows"]]
    assert layers[0] == "layer1.0" and len(layers) == 8
    first = cka["rows"][0]["cells"]["select"]
    assert first["surgery"] == pytest.approx(0.99115) and first["finetune"] == pytest.approx(0.99175)
    table = re.search(r'<table class="cka">.*?</table>', variant_html(result_of(sample)), re.S).group(0)
    assert table.count("<tr>") == 1 + len(layers)
    assert f"{fmt(first['surgery'])} → {fmt(first['finetune'])}" in table


def test_write_case_report_writes_and_links_every_arm_page(sample, tmp_path):
    result = result_of(sample)
    path = write_case_report(result, tmp_path)
    assert path == tmp_path / safe_name(result.case) / "report.html"
    page = path.read_text(encoding="utf-8")
    links = re.findall(r'<a class="arm-page" href="([^"]+)"', page)
    written = sorted(p.relative_to(path.parent).as_posix() for p in path.parent.glob("arms/*/report.html"))
    assert sorted(links) == written == sorted(f"arms/{arm}/report.html" for arm in ARMS)
    for arm in ARMS:
        arm_page = (path.parent / "arms" / arm / "report.html").read_text(encoding="utf-8")
        assert f"<h1>{result.case}.{arm}</h1>" in arm_page  # the arm's own case page
        assert 'id="order"' not in arm_page
    assert load_results(path.parent / "results.json").arms.keys() == result.arms.keys()
    assert not NETWORK_URL.search(page)


def test_an_arm_not_run_shows_why_and_its_old_page_goes(sample, tmp_path):
    write_case_report(result_of(sample), tmp_path)  # an earlier run that ran every arm
    result = result_of(without_random_arm(sample))
    path = write_case_report(result, tmp_path)
    assert not (path.parent / "arms" / "random").exists()
    page = path.read_text(encoding="utf-8")
    why = "these seeds cannot decide any comparison with it"
    assert f"<code>random</code>: {why}" in page  # the note under the order
    row = text_of(re.search(r'<tr id="arm-random".*?</tr>', page, re.S).group(0))
    assert "not run" in row and why in row and "no page (not run)" in row
    assert sorted(re.findall(r'<a class="arm-page" href="arms/([^/"]+)/', page)) == ["exact", "order", "select"]
    assert re.search(r'class="arm not-run"[^>]*>random \(not run\)</a>', page)
    view = variant_view(result)
    assert [c["arm"] for c in view["curves"]] == ["exact", "order", "select"]
    assert comparison_rows(page)["compare.select>random"] == "undecided"
    undecided = {c["name"]: c for c in view["comparisons"]}["compare.exact>random"]
    assert undecided["differences"] == [] and undecided["spread"] == "—"


def test_an_older_result_without_run_flags_or_order_text(sample):
    data = decided(sample)
    for spec in data["variants"]["arms"].values():
        del spec["run"], spec["why_not_run"]
    del data["variants"]["order_text"]
    result = result_of(data)
    assert winner_text(result) == "winner: select"
    assert "select > exact > order = random" in text_of(variant_html(result))


def test_every_string_from_the_case_is_escaped(sample, tmp_path):
    data = copy.deepcopy(sample)
    data["variants"]["arms"]["select"]["description"] = XSS
    data["description"] = XSS
    data["variants"]["arms"]["random"].update(run=False, why_not_run=XSS)
    path = write_case_report(result_of(data), tmp_path)
    page = path.read_text(encoding="utf-8")
    assert XSS not in page and "<script" not in page
    assert page.count(html.escape(XSS)) >= 3  # description, the arm's, why it was not run


def test_index_names_the_winner_and_survives_missing_figures(sample, tmp_path):
    loose = result_of(sample)
    won = result_of(decided(sample, name="strategies-decided"))
    for result in (loose, won):
        write_case_report(result, tmp_path)
        assert figures(result)["accuracy.after"] is None  # a variant result has no case-level figures
    write_case_report(
        CaseResult(case="plain", path="p.yaml", expectations=[ExpectationResult("x", True, 1, 1)]), tmp_path
    )
    index = write_index(tmp_path).read_text(encoding="utf-8")
    cells = {}
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", index, re.S):
        case = re.search(r'<a href="([^"/]+)/report.html">', row)
        if case:
            variant = re.search(r'<td colspan="5" class="variant"[^>]*>(.*?)</td>', row, re.S)
            cells[case.group(1)] = text_of(variant.group(1)).strip() if variant else None
    assert cells == {
        "strategies-decided": "winner: select · select > exact > order = random",
        safe_name(loose.case): "no arm separated · exact = order = select = random",
        "plain": None,  # a plain case keeps its figures
    }
    table = summary_table(tmp_path)
    assert "| strategies-decided | 2 |" in table and "| plain | 0 |" in table


def test_every_caller_of_a_report_page_gets_the_variant_page(sample, tmp_path):
    result = result_of(decided(sample))
    for page in (
        page_html(result),
        result._repr_html_(),
        render_report(result, tmp_path / "r.html").read_text(encoding="utf-8"),
    ):
        assert 'id="order-tiers"' in page and "winner: select" in page
        assert "arm-page" not in page  # no arm pages were written beside it
    assert variant_html(result) == variant_html(result)  # reproducible (plot ids numbered per page)


def test_a_random_arms_own_page_says_it_performs_no_surgery(sample):
    result = result_of(sample)
    random_page = text_of(case_html(result.arm("random")))
    assert "No surgery: every tensor of this model starts from random init" in random_page
    assert "every recorded target tensor came from the source" not in random_page
    assert "No surgery" not in text_of(case_html(result.arm("select")))
