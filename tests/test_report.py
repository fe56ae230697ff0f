"""HTML reports: key figures on the page, escaping, self-containment, size, comparison, index, failed runs.

The results are built here as the runner would write them (a ResNet-50-sized synthetic result),
so the tests need no model, no data and no earlier run.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from surgery.report.render import figures, render_report, write_case_report, write_index
from surgery.results import CaseResult, ExpectationResult, load_results, safe_name

XSS = "<script>alert(1)</script>"
SMALL = (1, 1, 1, 1)
NETWORK_URL = re.compile(
    r"""(?:src|href|action|poster|data)\s*=\s*["']?\s*(?:https?:|ftp:|wss?:|//)"""
    r"""|url\(\s*["']?\s*(?:https?:|//)""",
    re.I,
)


def _resnet50_like_record(stages=(3, 4, 10, 3)) -> dict:
    """A transplant record with ResNet-50 names: ~330 tensors, a mix of methods."""
    tensors = []

    def conv(name, shape, method="exact"):
        tensors.append(
            {
                "target_key": f"{name}.weight",
                "shape": shape,
                "method": method,
                "source_key": None if method == "fresh" else f"{name}.weight",
                "source_shape": None if method == "fresh" else [2 * shape[0], *shape[1:]],
                "reason": "shape mismatch: no slice rule" if method == "fresh" else None,
            }
        )

    def bn(name, width, method="exact"):
        for p in ("weight", "bias", "running_mean", "running_var"):
            tensors.append(
                {
                    "target_key": f"{name}.{p}",
                    "shape": [width],
                    "method": method,
                    "source_key": f"{name}.{p}",
                    "source_shape": [2 * width],
                    "reason": None,
                }
            )

    conv("conv1", [64, 3, 7, 7], "adapted")
    bn("bn1", 64)
    for s, blocks in enumerate(stages, start=1):
        width = 64 * 2 ** (s - 1)
        for b in range(blocks):
            pre = f"layer{s}.{b}"
            method = "sliced" if s >= 3 else "exact"
            conv(f"{pre}.conv1", [width, width * 4, 1, 1], method)
            bn(f"{pre}.bn1", width, method)
            conv(f"{pre}.conv2", [width, width, 3, 3], "fresh" if (s, b) == (4, 2) else method)
            bn(f"{pre}.bn2", width, method)
            conv(f"{pre}.conv3", [width * 4, width, 1, 1], method)
            bn(f"{pre}.bn3", width * 4, method)
            if b == 0:
                conv(f"{pre}.downsample.0", [width * 4, width * 2, 1, 1], method)
                bn(f"{pre}.downsample.1", width * 4, method)
    tensors.append(
        {
            "target_key": "fc.weight",
            "shape": [10, 2048],
            "method": "fresh",
            "source_key": None,
            "source_shape": None,
            "reason": "head",
        }
    )
    tensors.append(
        {
            "target_key": "fc.bias",
            "shape": [10],
            "method": "fresh",
            "source_key": None,
            "source_shape": None,
            "reason": "head",
        }
    )
    return {
        "op": "transplant",
        "tensors": tensors,
        "notes": {"strategy": "select", "unused_source_keys": 12, "adapt_input": True},
    }


def _coverage_table(record: dict) -> list[dict]:
    rows: dict[str, dict] = {}
    for t in record["tensors"]:
        layer = t["target_key"].rsplit(".", 1)[0]
        row = rows.setdefault(
            layer,
            {"layer": layer, "numel": 0, "exact": 0, "sliced": 0, "adapted": 0, "fresh": 0, "reason": "", "covered": 0},
        )
        n = math.prod(t["shape"])
        row["numel"] += n
        row[t["method"]] += 1
        row["covered"] += 0 if t["method"] == "fresh" else n
        if t["reason"]:
            row["reason"] = t["reason"]
    out = []
    for row in rows.values():
        covered = row.pop("covered")
        out.append(dict(row, elements_covered=covered / row["numel"]))
    return out


def _curve(steps: int, every: int, start: float, end: float, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for step in range(every, steps + 1, every):
        t = step / steps
        acc = start + (end - start) * (1 - math.exp(-4 * t)) + rng.normal(0, 0.01)
        out.append(
            {
                "step": step,
                "loss": 2.3 * math.exp(-3 * t) + 0.1 + rng.normal(0, 0.02),
                "accuracy": min(1.0, acc),
                "lr": 1e-3,
            }
        )
    return out


def _layer_maps() -> dict:
    """A ResNet-50 (16 blocks) x ResNet-18 (8 blocks) CKA map per stage: a diagonal band, blurred after fine-tune."""
    rows = [f"layer{s}.{b}" for s, n in zip(range(1, 5), (3, 4, 6, 3)) for b in range(n)]
    cols = [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]

    def grid(sharp: float) -> list:
        return [[round(float(np.exp(-sharp * abs(i / 15 - j / 7))), 4) for j in range(8)] for i in range(16)]

    return {
        stage: {"reference_layers": rows, "layers": cols, "cka": grid(sharp)}
        for stage, sharp in (("surgery", 4.0), ("finetune", 2.0))
    }


def synthetic_result(
    *,
    name: str = "resnet50-to-resnet50-select",
    n_layers: int = 16,
    seeds=(0,),
    bins: int = 64,
    steps: int = 1000,
    eval_every: int = 10,
    blocks=(3, 4, 10, 3),
) -> CaseResult:
    """A result shaped like the runner's for a ResNet-50 case probing ``n_layers`` layers.

    ``blocks=(1, 1, 1, 1)`` makes a small record (fast to draw) for tests that are not about size.
    """
    record = _resnet50_like_record(blocks)
    layers = [f"layer{1 + i * 4 // n_layers}.{i % 4}" for i in range(n_layers)]
    per_seed = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        rows, hists = [], {}
        for i, layer in enumerate(layers):
            edges = np.linspace(-0.5, 6.0, bins + 1)
            ref = rng.gamma(2.0, 0.6, 20000)
            hists[layer] = {
                "edges": edges.round(6).tolist(),
                "reference": np.histogram(np.clip(ref, edges[0], edges[-1]), edges)[0].tolist(),
            }
            for stage, scale in (("surgery", 0.9 + 0.05 * i), ("finetune", 1.0 + 0.01 * i)):
                pat = rng.gamma(2.0, 0.6 * scale, 20000)
                hists[layer][stage] = np.histogram(np.clip(pat, edges[0], edges[-1]), edges)[0].tolist()
                rows.append(
                    {
                        "layer": layer,
                        "reference_layer": layer,
                        "stage": stage,
                        "w1_norm": abs(scale - 1) * 1.5,
                        "ks": abs(scale - 1) / 3,
                        "psi": abs(scale - 1) / 2,
                        "cka": round(1.0 - abs(scale - 1) / 2, 4),
                        "ref_mean": 1.2,
                        "ref_std": 0.85,
                        "mean": 1.2 * scale,
                        "std": 0.85 * scale,
                        "min": 0.0,
                        "max": 9.5,
                        "near_zero_frac": 0.2,
                        "dead_channel_frac": 0.02 * (i % 3),
                        "ref_dead_channel_frac": 0.01 * (i % 2),
                        "nonfinite": 0,
                    }
                )
        per_seed.append(
            {
                "seed": seed,
                "accuracy": {
                    "source": 0.9712,
                    "before": 0.4123,
                    "after": 0.9345 - 0.01 * seed,
                    "baseline": 0.8123,
                    "recovery": (0.9345 - 0.01 * seed) / 0.9712,
                    "bn_before": 0.4123,
                    "bn_after": 0.6543,
                    "bn_gain": 0.242,
                },
                "finite": True,
                "finetune": {
                    "curve": _curve(steps, eval_every, 0.41, 0.93, seed),
                    "steps_done": steps,
                    "finite": True,
                    "nonfinite_step": None,
                    "seconds": 412.5,
                    "samples_per_second": 155.2,
                },
                "baseline_curve": _curve(steps, eval_every, 0.1, 0.81, seed + 100),
                "coverage": {
                    "tensors": 0.9877,
                    "elements": 0.9512,
                    "n_tensors": len(record["tensors"]),
                    "by_method": {},
                    "fresh_reasons": {"head": 2},
                },
                "data": {"name": "digits", "train": 1438, "test": 359, "classes": 10},
                "activations": rows,
                "histograms": hists,
                "layer_maps": _layer_maps(),
            }
        )
    agg = lambda v: {"mean": v, "std": 0.0, "worst": v, "n": len(seeds)}  # noqa: E731
    expectations = [
        ExpectationResult(
            "coverage.tensors_min",
            True,
            0.9877,
            0.9,
            {"by_method": {"exact": 100}},
            "observed 0.9877 >= tensors_min 0.9 (coverage, tensors)",
        ),
        ExpectationResult(
            "accuracy.after_min",
            True,
            0.9345,
            0.9,
            {"figures": agg(0.9345)},
            "observed 0.9345 >= after_min 0.9 (accuracy, seed 0)",
        ),
        ExpectationResult(
            "accuracy.beats_baseline",
            True,
            0.1222,
            0.05,
            {},
            "observed 0.1222 >= beats_baseline 0.05 (after - baseline, accuracy, seed 0)",
        ),
        ExpectationResult(
            "activations.drift_max",
            False,
            1.125,
            0.5,
            {"layer": layers[-1]},
            f"observed 1.125 >= drift_max 0.5 (normalised W1 after surgery, layer {layers[-1]}, seed 0)",
        ),
        ExpectationResult("finite", True, 1.0, 1.0, {}, "observed 1 == finite 1 (finite, seed 0)"),
    ]
    return CaseResult(
        case=name,
        path=f"cases/{name}.yaml",
        expectations=expectations,
        seeds=list(seeds),
        metrics={
            "accuracy": {
                "source": agg(0.9712),
                "before": agg(0.4123),
                "after": agg(0.9345),
                "baseline": agg(0.8123),
                "recovery": agg(0.9622),
                "bn_before": agg(0.4123),
                "bn_after": agg(0.6543),
                "bn_gain": agg(0.242),
                "gap_to_baseline": agg(0.1222),
            },
            "coverage": {"tensors": 0.9877, "elements": 0.9512},
        },
        per_seed=per_seed,
        record=record,
        tables={
            "coverage": _coverage_table(record),
            "activations": [dict(r, seed=s["seed"]) for s in per_seed for r in s["activations"]],
        },
        description="ResNet-50 weights selected into a ResNet-50 on digits.",
        provenance={
            "surgery": "0.1.0",
            "torch": "2.14.1",
            "torchvision": "0.29.1",
            "timm": "1.0.31",
            "python": "3.11.7",
            "machine": "x86_64",
            "device": "cpu",
            "cuda": None,
            "git_commit": "0123456789abcdef0123456789abcdef01234567",
            "case_hash": "ddfa5b09ba112732",
            "seeds": list(seeds),
            "created": "2026-11-21T23:45:36+00:00",
        },
        seconds=1234.5,
    )


def _text(page: str) -> str:
    """The page as a reader sees it: tags dropped, entities decoded, whitespace collapsed."""
    import html

    body = re.sub(r"<(style|svg)\b.*?</\1>", " ", page, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


@pytest.fixture(scope="module")
def big() -> CaseResult:
    return synthetic_result()


@pytest.fixture(scope="module")
def big_page(big, tmp_path_factory) -> tuple[Path, str]:
    path = write_case_report(big, tmp_path_factory.mktemp("reports"))
    return path, path.read_text(encoding="utf-8")


def test_case_report_files_and_key_figures(big, big_page):
    path, page = big_page
    assert path.name == "report.html" and path.parent.name == safe_name(big.case)
    assert load_results(path.parent / "results.json").case == big.case
    assert (path.parent / "coverage.csv").is_file() and (path.parent / "activations.csv").is_file()
    text = _text(page)
    for needle in (
        "FAIL — 4/5 expectations held",
        "activations.drift_max",
        "observed 1.125 >= drift_max 0.5",
        "98.77%",
        "95.12%",  # coverage tensors / elements
        "97.12%",
        "41.23%",
        "93.45%",
        "81.23%",  # source, before, after, baseline
        "0.962",
        "24.20%",  # recovery, AdaBN gain
        "fc.weight",
        "head",
        "shape mismatch: no slice rule",
        "0123456789abcdef",
        "Fresh tensors (3)",
    ):
        assert needle in text, needle
    # every plot is there, as inline SVG
    # 16 histograms, drift, dead channels, curve, coverage map, a CKA layer map per stage
    assert page.count("<svg") == 16 + 4 + 2
    assert "<?xml" not in page and "<!DOCTYPE svg" not in page


def test_page_is_self_contained(big_page):
    _, page = big_page
    assert "http://" not in page and "https://" not in page
    assert not NETWORK_URL.search(page)
    assert not re.search(r"<(script|link|img|iframe|object|embed)\b", page, re.I)
    assert "default-src 'none'" in page  # the browser is told to fetch nothing


def test_size_of_a_resnet50_report_stays_under_2mb(big, big_page):
    path, _ = big_page
    assert len(big.record["tensors"]) >= 320 and len(big.per_seed[0]["histograms"]) == 16
    assert path.stat().st_size < 2_000_000, path.stat().st_size
    # three seeds add curves and rows, not another megabyte
    three = render_report(synthetic_result(seeds=(0, 1, 2)), path.with_name("three.html"))
    assert three.stat().st_size < 2_000_000, three.stat().st_size


def test_svg_ids_are_unique_within_a_page_and_pages_are_reproducible(big_page, tmp_path):
    _, page = big_page
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))
    small = synthetic_result(n_layers=2, steps=50, blocks=SMALL)
    first = render_report(small, tmp_path / "first.html").read_text(encoding="utf-8")
    assert render_report(small, tmp_path / "again.html").read_text(encoding="utf-8") == first


def test_every_string_from_the_case_is_escaped(tmp_path):
    result = synthetic_result(name=XSS, n_layers=2, blocks=SMALL)
    result.description = f"desc {XSS}"
    result.path = f"cases/{XSS}.yaml"
    result.expectations[0].message = f"message {XSS}"
    result.expectations[0].details = {"note": XSS}
    result.provenance["git_commit"] = XSS
    result.record["tensors"][-1]["reason"] = f"head {XSS}"
    result.tables["coverage"][0]["layer"] = XSS
    layer = result.per_seed[0]["activations"][0]["layer"]
    result.per_seed[0]["histograms"][XSS] = result.per_seed[0]["histograms"].pop(layer)
    path = write_case_report(result, tmp_path)
    assert path.resolve().is_relative_to(tmp_path.resolve())
    page = path.read_text(encoding="utf-8")
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert _text(page).count(XSS) >= 6  # shown as text, in every place it appeared
    index = write_index(tmp_path).read_text(encoding="utf-8")
    assert "<script" not in index.lower() and "&lt;script&gt;" in index
    # names with "$" are data for matplotlib, not mathtext
    odd = synthetic_result(n_layers=1, blocks=SMALL)
    odd.tables["coverage"][0]["layer"] = "conv_$x^2$"
    assert ">conv_$x^2$</text>" in render_report(odd, tmp_path / "odd.html").read_text(encoding="utf-8")


def test_compare_marks_a_flipped_expectation_and_provenance(tmp_path):
    a = synthetic_result(n_layers=4, blocks=SMALL)
    b = copy.deepcopy(a)
    flip = b.expectation("accuracy.after_min")
    flip.passed, flip.observed = False, 0.71
    flip.message = "observed 0.71 < after_min 0.9 (accuracy, seed 0)"
    b.metrics["accuracy"]["after"]["mean"] = 0.71
    b.provenance["git_commit"] = "fedcba9876543210fedcba9876543210fedcba98"
    b.provenance["torch"] = "2.15.0"
    page = render_report(a, tmp_path / "compare.html", compare=b).read_text(encoding="utf-8")
    text = _text(page)
    assert "1 expectation flipped" in text and "flipped: now fails" in text
    row = re.search(r'<tr class="changed">\s*<td><code>accuracy\.after_min</code>', page)
    assert row, "the flipped expectation's row is marked"
    assert "93.45%" in text and "71.00%" in text and "-22.45 pt" in text
    assert "provenance: git_commit, torch." in text
    unchanged = re.search(r'<tr class="">\s*<td><code>coverage\.tensors_min</code>', page)
    assert unchanged, "an expectation that held in both runs is not marked"
    assert "http://" not in page and "https://" not in page

    same = render_report(a, tmp_path / "same.html", compare=copy.deepcopy(a)).read_text(encoding="utf-8")
    assert "No change" in _text(same)


def test_index_links_every_case_and_skips_unreadable(tmp_path):
    names = ["alpha", "beta gamma", XSS]
    for i, name in enumerate(names):
        result = synthetic_result(name=name, n_layers=2, steps=100, blocks=SMALL)
        result.expectation("activations.drift_max").passed = i != 1
        write_case_report(result, tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text(json.dumps({"schema_version": 0}), encoding="utf-8")
    page = write_index(tmp_path).read_text(encoding="utf-8")
    hrefs = re.findall(r'<a href="([^"]+)"', page)
    assert sorted(hrefs) == sorted(f"{safe_name(n)}/report.html" for n in names)
    for href in hrefs:
        assert (tmp_path / href).is_file()
    text = _text(page)
    assert "2/3 cases passed" in text and "broken/results.json skipped" in text and "old/results.json skipped" in text
    assert "41.23% → 93.45%" in text and "81.23%" in text and "0.962" in text and "4/5" in text and "5/5" in text


def test_failed_run_renders(tmp_path):
    # a run that stopped with an error: no expectations, metrics, curves or record
    error = CaseResult(case="broken-case", path="cases/broken.yaml", error="RuntimeError: <boom> at step 3")
    page = render_report(error, tmp_path / "error.html").read_text(encoding="utf-8")
    assert "ERROR" in page and "RuntimeError: &lt;boom&gt; at step 3" in page

    # a run whose fine-tune diverged: NaN losses, NaN drift, an empty baseline curve
    nan = synthetic_result(n_layers=3, steps=30, blocks=SMALL)
    seed = nan.per_seed[0]
    for point in seed["finetune"]["curve"]:
        point["loss"] = point["accuracy"] = float("nan")
    seed["finetune"].update(finite=False, nonfinite_step=10)
    seed["baseline_curve"] = []
    for row in seed["activations"]:
        if row["stage"] == "finetune":
            row["w1_norm"] = float("nan")
    nan.tables["activations"] = [dict(r, seed=0) for r in seed["activations"]]
    for hist in seed["histograms"].values():
        hist["finetune"] = [0] * len(hist["finetune"])
    nan.metrics["accuracy"]["after"] = {"mean": float("nan"), "std": float("nan"), "worst": float("nan"), "n": 1}
    nan.expectations.append(ExpectationResult("finite", False, 0.0, 1.0, {}, "observed 0 != finite 1"))
    page = render_report(nan, tmp_path / "nan.html").read_text(encoding="utf-8")
    text = _text(page)
    assert "No finite point on the fine-tune curve" in text and "non-finite at step 10" in text
    assert "NaN" in text
    assert figures(nan)["drift.finetune"] != figures(nan)["drift.finetune"]  # NaN is the worst drift

    # a round trip through results.json (NaN survives as JSON NaN) still renders
    again = write_case_report(load_results(write_case_report(nan, tmp_path).parent / "results.json"), tmp_path)
    assert "FAIL" in again.read_text(encoding="utf-8")


def test_report_without_activations_or_record(tmp_path):
    result = synthetic_result(n_layers=1, steps=20, blocks=SMALL)
    result.tables = {}
    result.record = {"op": "activation_swap", "tensors": [], "notes": {}}
    for seed in result.per_seed:
        seed.pop("activations"), seed.pop("histograms")
    text = _text(render_report(result, tmp_path / "r.html").read_text(encoding="utf-8"))
    assert "Activations were not probed" in text and "No coverage table" in text


def test_index_is_one_line_per_case_failed_then_undecided_then_passed(tmp_path):
    for name, status in (("a-pass", "passed"), ("b-fail", "failed"), ("c-undecided", "undecided")):
        result = synthetic_result(name=name, n_layers=2, steps=100, blocks=SMALL)
        drift = result.expectation("activations.drift_max")
        drift.status, drift.passed = status, status == "passed"
        write_case_report(result, tmp_path)
    write_case_report(CaseResult(case="d-error", path="cases/d.yaml", error="RuntimeError: boom"), tmp_path)
    page = write_index(tmp_path).read_text(encoding="utf-8")
    rows = re.findall(r'<tr class="(\w*)">\s*<td><a href="[^"]+">([^<]+)</a>', page)
    assert rows == [("fail", "b-fail"), ("fail", "d-error"), ("undecided", "c-undecided"), ("", "a-pass")]
    text = _text(page)
    assert "1/4 cases passed · 1 undecided · 1 failed · 1 error" in text  # undecided is not counted as passed
    assert re.search(r'<div class="banner fail" id="verdict">', page)
    for badge in ("PASS", "FAIL", "UNDECIDED", "ERROR"):
        assert f">{badge}</span>" in page
    # the description is folded into the row's last cell, behind what went wrong
    assert "<summary>failed: activations.drift_max</summary>" in page
    assert "<summary>undecided: activations.drift_max</summary>" in page
    assert "<summary>error: RuntimeError: boom</summary>" in page
    cells = re.findall(r'<td class="why small">(.*?)</td>', page, re.S)
    assert len(cells) == 4 and all(c.startswith("<details>") and c.rstrip().endswith("</details>") for c in cells)
    description = "ResNet-50 weights selected into a ResNet-50 on digits."
    assert page.count(description) == 3 == sum(c.count(description) for c in cells)


def test_index_orders_numbered_cases_as_numbers(tmp_path):
    for name in ("seed-10", "seed-2", "seed-1"):
        write_case_report(synthetic_result(name=name, n_layers=2, steps=100, blocks=SMALL), tmp_path)
    page = write_index(tmp_path).read_text(encoding="utf-8")
    assert re.findall(r'<td><a href="[^"]+">(seed-\d+)</a>', page) == ["seed-1", "seed-2", "seed-10"]
