"""The report page of a variant case, as a string: its arms side by side (no files, no torch).

A variant case runs several arms on the same seeds and judges comparative claims on the per-seed
(paired) differences of their accuracy after the fine-tune (:mod:`surgery.running.variants`). Its page
answers which arm came out on top and how sure that is: the decided order, each comparison's paired
difference against its margin (with the calibrated prediction interval when the record is fresh), the
arms' fine-tune curves overlaid, drift and CKA per layer by arm, and a table of the arms linking to each
arm's own case page. Strings are escaped and plots inlined as on every page (:mod:`surgery.report.html`);
:mod:`surgery.report.render` writes the page and the arms' pages to files.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import Any

from surgery.report import plots
from surgery.stats.bounds import calibrated_band
from surgery.report.html import (
    CaseResult,
    activation_rows,
    as_dict,
    as_list,
    as_number,
    best_matches,
    expectation_rows,
    fmt,
    provenance_items,
    render_page,
    run_header,
    svg_markup,
)

# Surgery arms take these colours in the case's order; random arms greys (the baseline's colour on a case page).
ARM_PALETTE = ["#5d3a9b", "#1b7837", "#2166ac", "#b35806", "#c51b7d", "#01665e", "#8c510a", "#4d9221"]
RANDOM_PALETTE = ["#6e6e6e", "#a6a6a6", "#404040"]
STATUS_WORDS = {"passed": "held", "failed": "failed", "undecided": "undecided"}
NO_SEPARATION = "no arm separated"


# ---------------------------------------------------------------------------------------------
# formatting


def points_text(value: Any, *, signed: bool = True) -> str:
    """An accuracy difference in percentage points: ``+3.80 pt`` (``—`` when absent)."""
    x = as_number(value)
    if x is None:
        return "—"
    if not math.isfinite(x):
        return fmt(x)
    return f"{100 * x:+.2f} pt" if signed else f"{100 * x:.2f} pt"


def _spread_text(mean: Any, std: Any, kind: str = "pt") -> str:
    """``mean ± sd`` in percentage points (``pt``) or percent (``pct``); the sd left out when absent."""
    if as_number(mean) is None:
        return "—"
    if kind == "pct":
        head, sd = fmt(mean, "pct"), fmt(std, "pct")
    else:
        head, sd = points_text(mean), points_text(std, signed=False)
    return head if as_number(std) is None else f"{head} ± {sd}"


# ---------------------------------------------------------------------------------------------
# the arms and the order


def arm_specs(result: CaseResult) -> dict[str, dict[str, Any]]:
    """Each arm as the variant run describes it (``init``, ``inits``, ``description``, ``run``,
    ``why_not_run``, ``verdict``), in the case's order; an older result's missing fields filled in."""
    declared = as_dict(as_dict(result.variants).get("arms"))
    names = list(dict.fromkeys([*declared, *as_dict(result.arms)]))
    out = {}
    for name in names:
        spec = as_dict(declared.get(name))
        run = spec.get("run")
        out[name] = {
            "init": spec.get("init") or "surgery",
            "inits": spec.get("inits") or 1,
            "description": spec.get("description") or "",
            "run": (name in as_dict(result.arms)) if run is None else bool(run),
            "why_not_run": spec.get("why_not_run"),
            "verdict": spec.get("verdict"),
        }
    return out


def arm_colors(specs: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """One colour per arm, the same in every plot of the page: surgery arms coloured, random arms grey."""
    out, coloured, grey = {}, 0, 0
    for name, spec in specs.items():
        if spec.get("init") == "random":
            out[name] = RANDOM_PALETTE[grey % len(RANDOM_PALETTE)]
            grey += 1
        else:
            out[name] = ARM_PALETTE[coloured % len(ARM_PALETTE)]
            coloured += 1
    return out


def winners(result: CaseResult) -> list[str]:
    """The arms of the decided order's first tier that were run; empty when no arm was separated (the first
    tier holds every arm run)."""
    specs = arm_specs(result)
    ran = [name for name, spec in specs.items() if spec["run"]]
    variants = as_dict(result.variants)
    tiers = [as_list(t) for t in as_list(variants.get("order"))]
    first = as_list(variants.get("winner")) or (tiers[0] if tiers else [])
    top = [name for name in first if name in ran]
    return [] if not top or set(ran) <= set(top) else top


def winner_text(result: CaseResult) -> str:
    """``winner: select`` (``winner: exact = order`` for a shared first tier), or ``no arm separated``."""
    top = winners(result)
    return f"winner: {' = '.join(top)}" if top else NO_SEPARATION


def order_text(result: CaseResult) -> str:
    """The decided order in words, best first: ``select > exact = order > random``."""
    variants = as_dict(result.variants)
    text = variants.get("order_text")
    if isinstance(text, str) and text:
        return text
    return " > ".join(" = ".join(map(str, as_list(t))) for t in as_list(variants.get("order")))


def _alpha(result: CaseResult) -> float | None:
    """The calibration record's α, from the first expectation judged against it (``None`` when no record was)."""
    for e in result.expectations:
        alpha = as_number(as_dict(e.calibration).get("alpha"))
        if alpha is not None:
            return alpha
    return None


def _order_view(
    result: CaseResult, specs: dict[str, dict[str, Any]], colors: dict[str, str], arm_pages: Mapping[str, str]
) -> dict[str, Any]:
    tiers = [[str(a) for a in as_list(t)] for t in as_list(as_dict(result.variants).get("order"))]
    top = set(winners(result))
    return {
        "text": order_text(result),
        "winner": winner_text(result),
        "separated": bool(top),
        "alpha": _alpha(result),
        "tiers": [
            [
                {
                    "arm": arm,
                    "run": specs.get(arm, {}).get("run", True),
                    "winner": arm in top,
                    "color": colors.get(arm, "#d0d7de"),
                    "href": arm_pages.get(arm) or f"#arm-{arm}",
                }
                for arm in tier
            ]
            for tier in tiers
        ],
        "not_run": [
            {"arm": name, "why": spec["why_not_run"] or "not run"} for name, spec in specs.items() if not spec["run"]
        ],
    }


# ---------------------------------------------------------------------------------------------
# the comparisons


def _is_comparison(details: dict[str, Any]) -> bool:
    return "better" in details and "than" in details and "arm" not in details


def _decide_text(calibration: dict[str, Any]) -> str:
    """What the calibration says about deciding the claim: decided, or how many seeds would decide it."""
    decision = calibration.get("decision")
    k = calibration.get("k")
    if decision in ("holds", "fails"):
        return f"decided ({decision}) with {k} seed{'s' if k != 1 else ''}"
    if calibration.get("seeds_to_decide") is not None:
        return f"{calibration['seeds_to_decide']} seeds would decide it"
    if calibration.get("calibration_seeds_to_decide") is not None:
        return f"calibrating with {calibration['calibration_seeds_to_decide']} seeds would decide it"
    if decision == "undecided":
        return "more seeds alone cannot decide it"
    return f"threshold calibrated for {k} seeds" if calibration.get("form") == "calibrated" else ""


def comparison_rows(result: CaseResult) -> list[dict[str, Any]]:
    """Each comparison of a variant result: its claim, this run's paired differences, its status and, when a
    fresh calibration record judged it, the calibrated distribution, bound and seeds needed to decide."""
    rows = []
    for e in result.expectations:
        details = as_dict(e.details)
        if not _is_comparison(details):
            continue
        figures = as_dict(details.get("figures"))
        differences = sorted(
            ((str(seed), as_number(diff)) for seed, diff in as_dict(details.get("differences")).items()),
            key=lambda item: (0, int(item[0])) if item[0].lstrip("-").isdigit() else (1, item[0]),
        )
        cal = as_dict(e.calibration) or as_dict(details.get("calibration"))
        calibration = None
        if cal:
            band = calibrated_band(cal)
            calibration = {
                "mean": cal.get("mean"),
                "std": cal.get("std"),
                "spread": _spread_text(cal.get("mean"), cal.get("std")),
                "bound": cal.get("bound"),
                "bound_text": points_text(cal.get("bound")),
                "band": list(band) if band else None,
                "band_text": f"[{points_text(band[0])}, {points_text(band[1])}]" if band else "—",
                "alpha": cal.get("alpha"),
                "k": cal.get("k"),
                "seeds": cal.get("seeds"),
                "runs": cal.get("runs"),
                "decision": cal.get("decision"),
                "decide": _decide_text(cal),
            }
        better, than = str(details["better"]), str(details["than"])
        mean = figures.get("mean") if figures else None
        rows.append(
            {
                "name": e.name,
                "better": better,
                "than": than,
                "field": details.get("field"),
                "margin": e.threshold,
                "claim": f"{better} − {than} ≥ {points_text(e.threshold, signed=False)}"
                if e.threshold is not None
                else f"{better} − {than} ≥ (not set)",
                "mean": mean,
                "std": figures.get("std"),
                "n": figures.get("n") or len(differences),
                "spread": _spread_text(mean, figures.get("std")),
                "differences": [{"seed": seed, "text": points_text(diff), "value": diff} for seed, diff in differences],
                "status": e.status or ("passed" if e.passed else "failed"),
                "status_word": STATUS_WORDS.get(e.status, e.status),
                "message": e.message,
                "calibration": calibration,
            }
        )
    return rows


def _interval_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The comparison rows as :func:`surgery.report.plots.paired_intervals` draws them."""
    return [
        {
            "label": r["name"],
            "points": [d["value"] for d in r["differences"]],
            "mean": r["mean"],
            "std": r["std"],
            "status": r["status"],
            "margin": r["margin"],
            "band": r["calibration"]["band"] if r["calibration"] else None,
            "calibrated_mean": r["calibration"]["mean"] if r["calibration"] else None,
            "bound": r["calibration"]["bound"] if r["calibration"] else None,
        }
        for r in rows
    ]


# ---------------------------------------------------------------------------------------------
# the arms' runs: curves, drift, CKA


def _arm_results(result: CaseResult) -> dict[str, CaseResult]:
    """Each arm that ran, as a result of its own (an arm whose stored result cannot be read is left out)."""
    out = {}
    for name in as_dict(result.arms):
        try:
            out[name] = result.arm(name)
        except (TypeError, KeyError, ValueError):
            continue
    return out


def _arm_curves(arm_result: CaseResult) -> list[dict[str, Any]]:
    """Every fine-tune curve of an arm: one per seed, or for a random arm one per seed and init."""
    out = []
    for s in as_list(arm_result.per_seed):
        s = as_dict(s)
        ft = as_dict(s.get("finetune"))
        inits = [c for c in as_list(s.get("init_curves")) if isinstance(c, list)]
        for i, curve in enumerate(inits or [as_list(ft.get("curve"))]):
            out.append(
                {
                    "seed": s.get("seed"),
                    "init": i if inits else None,
                    "curve": curve,
                    "nonfinite_step": ft.get("nonfinite_step") if i == 0 else None,
                }
            )
    return out


def mean_curve(curves: list[list[Any]]) -> list[dict[str, float]]:
    """Loss and accuracy averaged over ``curves`` at the steps every one of them evaluated."""
    by_step: list[dict[float, dict[str, Any]]] = []
    for curve in curves:
        points = {}
        for p in curve:
            step = as_number(as_dict(p).get("step"))
            if step is not None:
                points[step] = p
        by_step.append(points)
    if not by_step:
        return []
    common = sorted(set(by_step[0]).intersection(*by_step[1:]))
    out = []
    for step in common:
        point: dict[str, float] = {"step": step}
        for key in ("loss", "accuracy"):
            values = [as_number(points[step].get(key)) for points in by_step]
            point[key] = (
                math.nan if any(v is None for v in values) else statistics.fmean(v for v in values if v is not None)
            )
        out.append(point)
    return out


def _curve_view(
    arm_results: dict[str, CaseResult], colors: dict[str, str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The runs :func:`surgery.report.plots.finetune_curve` draws (each curve thin, the arm's mean bold and
    labelled: one legend entry per arm), and per arm what its bold line is."""
    runs: list[dict[str, Any]] = []
    summary = []
    for arm, arm_result in arm_results.items():
        curves = _arm_curves(arm_result)
        if not any(c["curve"] for c in curves):
            continue
        color = colors[arm]
        if len(curves) > 1:
            for c in curves:
                where = f"seed {c['seed']}" + (f" init {c['init']}" if c["init"] is not None else "")
                runs.append(
                    {
                        "label": f"_{arm} {where}",
                        "curve": c["curve"],
                        "color": color,
                        "thin": True,
                        "nonfinite_step": c["nonfinite_step"],
                    }
                )
            mean = mean_curve([c["curve"] for c in curves])
            runs.append({"label": arm, "curve": mean or curves[0]["curve"], "color": color})
        else:
            runs.append(
                {
                    "label": arm,
                    "curve": curves[0]["curve"],
                    "color": color,
                    "nonfinite_step": curves[0]["nonfinite_step"],
                }
            )
        seeds = len({c["seed"] for c in curves})
        inits = len(curves) // max(1, seeds)
        shown = f"mean of {len(curves)} curves ({seeds} seed{'s' if seeds != 1 else ''}" + (
            f" × {inits} inits)" if inits > 1 else ")"
        )
        summary.append(
            {"arm": arm, "color": color, "curves": len(curves), "shown": shown if len(curves) > 1 else "one curve"}
        )
    return runs, summary


def _source_accuracy(arm_results: dict[str, CaseResult]) -> float | None:
    """The source model's accuracy on the target data (the surgery arms share the source)."""
    for arm_result in arm_results.values():
        source = as_dict(as_dict(arm_result.metrics.get("accuracy")).get("source"))
        value = as_number(source.get("mean"))
        if value is not None:
            return value
    return None


def _first_layer_maps(arm_result: CaseResult) -> tuple[dict[str, Any], Any]:
    for s in as_list(arm_result.per_seed):
        maps = as_dict(as_dict(s).get("layer_maps"))
        if maps:
            return maps, as_dict(s).get("seed")
    return {}, None


def _own_cka(layer_map: dict[str, Any], layer: str) -> float | None:
    """The CKA of a patient block with the source block of the same name (the map's diagonal), if any."""
    refs, cols, values = (
        as_list(layer_map.get("reference_layers")),
        as_list(layer_map.get("layers")),
        as_list(layer_map.get("cka")),
    )
    if layer not in refs or layer not in cols:
        return None
    row = as_list(values[refs.index(layer)]) if refs.index(layer) < len(values) else []
    j = cols.index(layer)
    return as_number(row[j]) if j < len(row) else None


def cka_view(arm_results: dict[str, CaseResult]) -> dict[str, Any]:
    """Per patient block (rows) and surgery arm (columns): the CKA with the source block of the same name after
    surgery and after fine-tune, and the closest source block when another one is closer (the first seed that
    has layer maps)."""
    arms: list[str] = []
    seeds: dict[str, Any] = {}
    layers: dict[str, None] = {}  # patient blocks in order of first appearance
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    for arm, arm_result in arm_results.items():
        maps, seed = _first_layer_maps(arm_result)
        if not maps:
            continue
        arms.append(arm)
        seeds[arm] = seed
        for stage, layer_map in maps.items():
            layer_map = as_dict(layer_map)
            best = {str(b["layer"]): b for b in best_matches(layer_map)}
            for layer in map(str, as_list(layer_map.get("layers"))):
                layers.setdefault(layer, None)
                cell = cells.setdefault(layer, {}).setdefault(arm, {})
                cell[str(stage)] = _own_cka(layer_map, layer)
                match = best.get(layer)
                if match is not None and match["reference_layer"] != layer:
                    cell["best"] = {"stage": str(stage), "layer": match["reference_layer"], "cka": match["cka"]}
                elif match is not None:
                    cell.pop("best", None)  # the block's own is the closest at the later stage
    return {
        "arms": arms,
        "seeds": seeds,
        "same_seed": len(set(seeds.values())) <= 1,
        "rows": [{"layer": layer, "cells": cells.get(layer, {})} for layer in layers],
    }


def _drift_plot(arm_results: dict[str, CaseResult], colors: dict[str, str]) -> Any:
    runs = {arm: activation_rows(r) for arm, r in arm_results.items()}
    runs = {arm: rows for arm, rows in runs.items() if rows}
    if not runs:
        return None
    return svg_markup(plots.compare_drift(runs, None, colors=colors, title="Drift per layer by arm"))


def _drift_limits(arm_results: dict[str, CaseResult]) -> list[dict[str, Any]]:
    """Each arm's own ``drift_max`` (the arms' thresholds differ, so the plot draws none)."""
    out = []
    for arm, arm_result in arm_results.items():
        found = arm_result.expectation("activations.drift_max")
        if found is not None and found.threshold is not None:
            out.append({"arm": arm, "threshold": found.threshold})
    return out


# ---------------------------------------------------------------------------------------------
# the table of arms


def _accuracy_after(result: CaseResult, arm: str, arm_result: CaseResult | None) -> dict[str, Any]:
    agg = as_dict(as_dict(result.metrics.get("accuracy_after")).get(arm))
    if not agg and arm_result is not None:
        agg = as_dict(as_dict(arm_result.metrics.get("accuracy")).get("after"))
    return agg


def _arm_rows(
    result: CaseResult,
    specs: dict[str, dict[str, Any]],
    arm_results: dict[str, CaseResult],
    colors: dict[str, str],
    arm_pages: Mapping[str, str],
) -> list[dict[str, Any]]:
    rows = []
    top = set(winners(result))
    for name, spec in specs.items():
        arm_result = arm_results.get(name)
        after = _accuracy_after(result, name, arm_result)
        random = spec["init"] == "random"
        inits = spec["inits"]
        rows.append(
            {
                "arm": name,
                "color": colors[name],
                "description": spec["description"],
                "init": f"random init, {inits} per seed averaged" if random and inits > 1 else spec["init"],
                "run": spec["run"],
                "why_not_run": spec["why_not_run"],
                "verdict": spec["verdict"] or (arm_result.verdict if arm_result is not None else None),
                "after": _spread_text(after.get("mean"), after.get("std"), "pct"),
                "seeds": after.get("n"),
                "held": sum(1 for e in arm_result.expectations if e.passed) if arm_result is not None else None,
                "total": len(arm_result.expectations) if arm_result is not None else None,
                "href": arm_pages.get(name),
                "winner": name in top,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# the page


def variant_view(result: CaseResult, arm_pages: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Everything the variant template shows, computed from ``result`` (strings still unescaped).

    ``arm_pages``: arm -> the link to its own case page, relative to this page (arms without one get none).
    """
    arm_pages = dict(arm_pages or {})
    specs = arm_specs(result)
    colors = arm_colors(specs)
    arm_results = _arm_results(result)
    comparisons = comparison_rows(result)
    curve_runs, curves = _curve_view(arm_results, colors)
    header = run_header(result)
    return {
        **header,
        "undecided": sum(1 for e in result.expectations if e.status == "undecided"),
        "seeds": list(result.seeds),
        "calibration": result.calibration,
        "calibration_notes": list(result.calibration_notes),
        "order": _order_view(result, specs, colors, arm_pages),
        "comparisons": comparisons,
        "curves": curves,
        "cka": cka_view(arm_results),
        "drift_limits": _drift_limits(arm_results),
        "arms": _arm_rows(result, specs, arm_results, colors, arm_pages),
        "expectations": expectation_rows(result),
        "plots": {
            "intervals": svg_markup(plots.paired_intervals(_interval_rows(comparisons))),
            "curves": svg_markup(plots.finetune_curve(curve_runs, source=_source_accuracy(arm_results))),
            "drift": _drift_plot(arm_results, colors),
        },
        "provenance": provenance_items(as_dict(result.provenance)),
        "schema_version": result.schema_version,
    }


def variant_html(result: CaseResult, arm_pages: Mapping[str, str] | None = None) -> str:
    """The self-contained report page of a variant case's result, linking to the arms' pages in ``arm_pages``."""
    with plots.id_scope():
        return render_page(
            "variant.html.j2", v=variant_view(result, arm_pages), title=f"{result.case} · surgery variants"
        )


__all__ = [
    "arm_colors",
    "arm_specs",
    "cka_view",
    "comparison_rows",
    "mean_curve",
    "order_text",
    "points_text",
    "variant_html",
    "variant_view",
    "winner_text",
    "winners",
]
