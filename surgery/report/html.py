"""The HTML of the reports, as strings: a case page, a comparison, an index (no files, no torch).

The page answers three questions without opening JSON: did the surgery hold (the expectations),
where in the network did the distribution shift (histograms, drift, dead channels per layer),
and how fast did accuracy come back (the fine-tune curve against the source and the baseline).

Pages are self-contained: CSS and plots (inline SVG, see :mod:`surgery.report.plots`) live in
the file, and a Content-Security-Policy (``default-src 'none'``) tells the browser to fetch
nothing and run no script even if a string slipped through. Every string from a case or a
result goes through jinja2's autoescape; only the SVG made by matplotlib is marked safe.
:mod:`surgery.report.render` writes these pages to files.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from surgery.report import plots

# A surgery.results.CaseResult (or its JSON loaded back): the views only read its attributes. Not imported,
# so that a result can render itself (CaseResult._repr_html_) without an import cycle.
CaseResult = Any

# Figures shown on the page, the index and the comparison: key, label, kind (pct | ratio | sec | num).
FIGURES = [
    ("coverage.tensors", "coverage (tensors)", "pct"),
    ("coverage.elements", "coverage (elements)", "pct"),
    ("accuracy.source", "source accuracy", "pct"),
    ("accuracy.before", "before fine-tune", "pct"),
    ("accuracy.after", "after fine-tune", "pct"),
    ("accuracy.baseline", "baseline (random init)", "pct"),
    ("accuracy.recovery", "recovery (after / source)", "ratio"),
    ("accuracy.bn_gain", "AdaBN gain", "pct"),
    ("drift.surgery", "worst drift after surgery", "num"),
    ("drift.finetune", "worst drift after fine-tune", "num"),
    ("seconds", "time", "sec"),
]
PROVENANCE_ORDER = [
    "git_commit",
    "case_hash",
    "surgery",
    "torch",
    "torchvision",
    "timm",
    "python",
    "machine",
    "device",
    "cuda",
    "seeds",
    "created",
]
COVERAGE_COLUMNS = ["layer", "numel", *plots.METHODS, "elements_covered", "reason"]
DETAILS_LIMIT = 4000  # characters of an expectation's details shown on the page


# ---------------------------------------------------------------------------------------------
# formatting


def as_number(value: Any) -> float | None:
    """A float, or ``None`` for anything that is not a number (NaN stays NaN)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def fmt(value: Any, kind: str = "num") -> str:
    """How a figure is shown: ``pct`` 84.96%, ``ratio`` 2.675, ``sec`` 64.8 s, ``num`` 4 significant digits."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    x = as_number(value)
    if x is None:
        return str(value)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if kind == "pct":
        return f"{100 * x:.2f}%"
    if kind == "sec":
        return f"{x:.1f} s" if x < 600 else f"{x / 60:.1f} min"
    if kind == "ratio":
        return f"{x:.3f}"
    if kind == "int":
        return f"{x:.0f}"
    return f"{x:.4g}"


@functools.lru_cache(maxsize=1)
def _env() -> Environment:
    env = Environment(
        loader=PackageLoader("surgery.report", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = fmt
    env.globals.update(
        stage_colors=plots.STAGE_COLORS, stage_labels=plots.STAGE_LABELS, method_colors=plots.METHOD_COLORS
    )
    return env


def render_page(template: str, **context: Any) -> str:
    return _env().get_template(template).render(**context)


def svg_markup(text: str | None) -> Markup | None:
    """A plot's SVG marked safe for the templates (``None`` stays ``None``)."""
    # The only markup marked safe: SVG written by matplotlib, which escapes the text it draws.
    return Markup(text) if text else None


# ---------------------------------------------------------------------------------------------
# reading a result defensively (results of failed runs miss sections)


def as_dict(value: Any) -> dict[str, Any]:
    """``value`` if it is a dict, else an empty one (a section a failed run left out)."""
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    """``value`` if it is a list, else an empty one."""
    return value if isinstance(value, list) else []


def _agg(result: CaseResult, name: str) -> dict[str, Any] | None:
    agg = as_dict(result.metrics.get("accuracy")).get(name)
    return agg if isinstance(agg, dict) else None


def activation_rows(result: CaseResult) -> list[dict[str, Any]]:
    """The per-layer activation rows of a result (its table, else each seed's rows with its seed)."""
    rows = as_list(result.tables.get("activations"))
    if not rows:
        rows = [
            dict(r, seed=s.get("seed"))
            for s in as_list(result.per_seed)
            if isinstance(s, dict)
            for r in as_list(s.get("activations"))
            if isinstance(r, dict)
        ]
    return [r for r in rows if isinstance(r, dict)]


def _worst_drift(rows: list[dict[str, Any]], stage: str) -> float | None:
    found = [as_number(r.get("w1_norm")) for r in rows if r.get("stage") == stage]
    values = [v for v in found if v is not None]
    if not values:
        return None
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def figures(result: CaseResult) -> dict[str, float | None]:
    """The key figures of a result, by the keys of :data:`FIGURES` (``None`` when absent)."""
    coverage = as_dict(result.metrics.get("coverage"))
    out: dict[str, float | None] = {
        "coverage.tensors": as_number(coverage.get("tensors")),
        "coverage.elements": as_number(coverage.get("elements")),
    }
    for name in ("source", "before", "after", "baseline", "recovery", "bn_gain"):
        agg = _agg(result, name)
        out[f"accuracy.{name}"] = as_number(agg.get("mean")) if agg else None
    rows = activation_rows(result)
    out["drift.surgery"] = _worst_drift(rows, "surgery")
    out["drift.finetune"] = _worst_drift(rows, "finetune")
    out["seconds"] = as_number(result.seconds)
    return out


def _threshold(result: CaseResult, name: str) -> float | None:
    exp = result.expectation(name)
    return as_number(exp.threshold) if exp is not None else None


def verdict_of(result: CaseResult) -> str:
    return "error" if result.error else ("pass" if result.passed else "fail")


def _details_text(details: Any) -> str:
    if not details:
        return ""
    try:
        text = json.dumps(details, indent=1, default=str, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(details)
    return text if len(text) <= DETAILS_LIMIT else text[:DETAILS_LIMIT] + "\n… (truncated)"


# ---------------------------------------------------------------------------------------------
# page models


def expectation_rows(result: CaseResult) -> list[dict[str, Any]]:
    """Every expectation of a result as the expectations table shows it (details as indented JSON)."""
    return [
        {
            "name": e.name,
            "passed": bool(e.passed),
            "status": e.status or ("passed" if e.passed else "failed"),
            "observed": e.observed,
            "threshold": e.threshold,
            "message": e.message,
            "details": _details_text(e.details),
        }
        for e in result.expectations
    ]


def _calibration_rows(result: CaseResult) -> list[dict[str, Any]]:
    """The calibrated expectations, for the band plot: distribution, threshold, observed, outcome."""
    rows = []
    for e in result.expectations:
        cal = as_dict(e.calibration)
        if cal:
            rows.append(
                {
                    "name": e.name,
                    "mean": cal.get("mean"),
                    "std": cal.get("std"),
                    "samples": as_list(cal.get("samples")),
                    "threshold": e.threshold,
                    "observed": e.observed,
                    "status": e.status,
                }
            )
    return rows


def _glance(result: CaseResult) -> list[dict[str, str]]:
    """The story at a glance: one card per figure that the run produced."""
    figs, cards = figures(result), []
    n_seeds = len(result.seeds) or len(as_list(result.per_seed))

    def spread(name: str) -> str:
        agg = _agg(result, name)
        if not agg or (agg.get("n") or 1) <= 1:
            return ""
        return f"± {fmt(agg.get('std'), 'pct')} · worst {fmt(agg.get('worst'), 'pct')} · {agg.get('n')} seeds"

    if figs["coverage.tensors"] is not None:
        cards.append(
            {
                "label": "coverage",
                "value": fmt(figs["coverage.tensors"], "pct"),
                "sub": f"of tensors · {fmt(figs['coverage.elements'], 'pct')} of elements",
            }
        )
    for name, label in (
        ("source", "source accuracy"),
        ("before", "after surgery"),
        ("after", "after fine-tune"),
        ("baseline", "baseline"),
    ):
        if figs[f"accuracy.{name}"] is not None:
            sub = (
                spread(name)
                or {
                    "source": "source model on the target data",
                    "before": "before fine-tune",
                    "after": "the patient, fine-tuned",
                    "baseline": "random init, same budget",
                }[name]
            )
            cards.append({"label": label, "value": fmt(figs[f"accuracy.{name}"], "pct"), "sub": sub})
    if figs["accuracy.recovery"] is not None:
        cards.append(
            {"label": "recovery", "value": fmt(figs["accuracy.recovery"], "ratio"), "sub": "after / source accuracy"}
        )
    if figs["accuracy.bn_gain"] is not None:
        before, after = _agg(result, "bn_before"), _agg(result, "bn_after")
        shift = f"{fmt(before and before.get('mean'), 'pct')} → {fmt(after and after.get('mean'), 'pct')}"
        cards.append({"label": "AdaBN gain", "value": fmt(figs["accuracy.bn_gain"], "pct"), "sub": shift})
    for stage, label in (("surgery", "worst drift, surgery"), ("finetune", "worst drift, fine-tune")):
        if figs[f"drift.{stage}"] is not None:
            cards.append({"label": label, "value": fmt(figs[f"drift.{stage}"]), "sub": "normalised W1"})
    cards.append(
        {"label": "time", "value": fmt(figs["seconds"], "sec"), "sub": f"{n_seeds} seed{'s' if n_seeds != 1 else ''}"}
    )
    return cards


def _per_seed_rows(result: CaseResult) -> list[dict[str, Any]]:
    rows = []
    for s in as_list(result.per_seed):
        if not isinstance(s, dict):
            continue
        acc, ft = as_dict(s.get("accuracy")), as_dict(s.get("finetune"))
        rows.append(
            {
                "seed": s.get("seed"),
                "source": acc.get("source"),
                "before": acc.get("before"),
                "after": acc.get("after"),
                "baseline": acc.get("baseline"),
                "recovery": acc.get("recovery"),
                "finite": s.get("finite"),
                "steps": ft.get("steps_done"),
                "nonfinite_step": ft.get("nonfinite_step"),
                "seconds": ft.get("seconds"),
                "throughput": ft.get("samples_per_second"),
            }
        )
    return rows


def _record_view(result: CaseResult) -> dict[str, Any]:
    record = as_dict(result.record)
    tensors = [t for t in as_list(record.get("tensors")) if isinstance(t, dict)]

    def shape(value: Any) -> str:
        return "×".join(str(d) for d in value) if isinstance(value, list) else "—"

    def row(t: dict[str, Any]) -> dict[str, Any]:
        return {
            "key": t.get("target_key"),
            "shape": shape(t.get("shape")),
            "method": t.get("method"),
            "source_key": t.get("source_key") or "—",
            "source_shape": shape(t.get("source_shape")),
            "reason": t.get("reason") or "",
        }

    by_method = {m: sum(1 for t in tensors if t.get("method") == m) for m in plots.METHODS}
    notes = {
        str(k): (json.dumps(v, default=str) if isinstance(v, (list, dict)) else v)
        for k, v in as_dict(record.get("notes")).items()
    }
    return {
        "op": record.get("op"),
        "n_tensors": len(tensors),
        "by_method": by_method,
        "fresh": [row(t) for t in tensors if t.get("method") == "fresh"],
        "changed": [row(t) for t in tensors if t.get("method") in ("sliced", "adapted")],
        "notes": notes,
    }


def _activation_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = [
        "seed",
        "layer",
        "reference_layer",
        "stage",
        "w1_norm",
        "ks",
        "psi",
        "cka",
        "ref_mean",
        "ref_std",
        "mean",
        "std",
        "min",
        "max",
        "near_zero_frac",
        "dead_channel_frac",
        "ref_dead_channel_frac",
        "nonfinite",
    ]
    return [{k: r.get(k) for k in keys} for r in rows]


def _histogram_plots(result: CaseResult) -> tuple[list[dict[str, Any]], Any]:
    """Histograms of the first seed that has them, one small SVG per layer."""
    for s in as_list(result.per_seed):
        hists = as_dict(as_dict(s).get("histograms"))
        if hists:
            out = []
            for layer, hist in hists.items():
                svg = plots.histogram(as_dict(hist), str(layer))
                out.append({"layer": str(layer), "svg": svg_markup(svg)})
            return out, s.get("seed")
    return [], None


def _layer_maps(result: CaseResult) -> tuple[list[dict[str, Any]], Any]:
    """The CKA layer maps of the first seed that has them, one heatmap per stage."""
    for s in as_list(result.per_seed):
        maps = as_dict(as_dict(s).get("layer_maps"))
        if maps:
            out = []
            for stage, layer_map in maps.items():
                layer_map = as_dict(layer_map)
                title = f"after {stage}" if stage in ("surgery", "finetune") else str(stage)
                out.append(
                    {
                        "stage": str(stage),
                        "svg": svg_markup(plots.layer_map(layer_map, title)),
                        "best": best_matches(layer_map),
                    }
                )
            return out, s.get("seed")
    return [], None


def best_matches(layer_map: dict[str, Any]) -> list[dict[str, Any]]:
    """For each patient block: the source block with the highest CKA, and that CKA."""
    rows, cols, values = (
        as_list(layer_map.get("reference_layers")),
        as_list(layer_map.get("layers")),
        as_list(layer_map.get("cka")),
    )
    out = []
    for j, col in enumerate(cols):
        column = [
            (as_number(row[j]) if isinstance(row, list) and j < len(row) else None, i) for i, row in enumerate(values)
        ]
        scored = [(v, i) for v, i in column if v is not None]
        if scored:
            value, i = max(scored)
            out.append({"layer": col, "reference_layer": rows[i] if i < len(rows) else "?", "cka": value})
    return out


def _curve_runs(result: CaseResult, *, label_prefix: str = "", style: str = "-") -> list[dict[str, Any]]:
    runs = []
    for s in as_list(result.per_seed):
        s = as_dict(s)
        ft = as_dict(s.get("finetune"))
        runs.append(
            {
                "label": f"{label_prefix}seed {s.get('seed')}",
                "curve": as_list(ft.get("curve")),
                "baseline_curve": as_list(s.get("baseline_curve")),
                "nonfinite_step": ft.get("nonfinite_step"),
                "style": style,
            }
        )
    return runs


def _provenance_text(value: Any) -> Any:
    """A provenance value as the page shows it: lists comma-joined, a dict (the preprocessing) as
    ``key value`` pairs separated by `` · ``, so no Python repr reaches the reader."""
    if isinstance(value, list):
        return ", ".join(fmt(v) if isinstance(v, float) else str(v) for v in value)
    if isinstance(value, dict):
        return " · ".join(f"{k} {_provenance_text(v)}" for k, v in value.items() if v is not None)
    return value


def provenance_items(prov: dict[str, Any]) -> list[tuple[str, Any]]:
    """Provenance as (field, text) pairs for the page's footer, the usual fields first."""
    keys = [k for k in PROVENANCE_ORDER if k in prov] + sorted(k for k in prov if k not in PROVENANCE_ORDER)
    return [(k, _provenance_text(prov[k])) for k in keys]


def _gate_view(prov: dict[str, Any]) -> dict[str, Any] | None:
    """The release gate's figures for its section of the page (a gate run only)."""
    gate = prov.get("gate")
    if not isinstance(gate, dict):
        return None
    comparison = as_dict(gate.get("comparison"))
    rows = []
    if comparison:
        pct = round(100 * (2 * float(comparison.get("confidence", 0.95)) - 1))
        interval = comparison.get("interval") or [None, None]
        rows = [
            ("candidate accuracy", fmt(comparison.get("candidate_accuracy"))),
            ("champion accuracy", fmt(comparison.get("champion_accuracy"))),
            ("difference (candidate − champion)", fmt(comparison.get("difference"))),
            (f"{pct}% paired-bootstrap interval", f"[{fmt(interval[0])}, {fmt(interval[1])}]"),
            (
                f"one-sided {comparison.get('confidence')} lower bound vs −margin",
                f"{fmt(comparison.get('lower_bound'))} vs −{comparison.get('margin')}",
            ),
            (
                "McNemar exact p (discordant: candidate only / champion only)",
                f"{fmt(comparison.get('mcnemar_p'))} ({comparison.get('candidate_only')} / "
                f"{comparison.get('champion_only')})",
            ),
            ("flip rate (answers changed)", fmt(comparison.get("flip_rate"))),
        ]
    accuracy = as_dict(gate.get("accuracy"))
    interval = accuracy.get("interval") or [None, None]
    return {
        "data": gate.get("data"),
        "held_out": gate.get("held_out"),
        "warnings": as_list(gate.get("warnings")),
        "candidate": as_dict(gate.get("candidate")),
        "champion": as_dict(gate.get("champion")),
        "accuracy": f"{fmt(accuracy.get('value'))} [{fmt(interval[0])}, {fmt(interval[1])}]",
        "comparison": rows,
        "drift": [
            {k: r.get(k) for k in ("layer", "w1_norm", "ks", "psi")}
            for r in as_list(gate.get("champion_drift"))
            if isinstance(r, dict)
        ],
    }


def case_view(result: CaseResult) -> dict[str, Any]:
    """Everything the case template shows, computed from ``result`` (strings still unescaped)."""
    act_rows = activation_rows(result)
    drift_max = _threshold(result, "activations.drift_max") or _threshold(result, "gate.drift_max")
    dead_max = _threshold(result, "activations.dead_max") or _threshold(result, "gate.dead_max")
    hists, hist_seed = _histogram_plots(result)
    layer_maps, layer_map_seed = _layer_maps(result)
    acc_source, acc_baseline = _agg(result, "source"), _agg(result, "baseline")
    held = sum(1 for e in result.expectations if e.passed)
    undecided = sum(1 for e in result.expectations if e.status == "undecided")
    n_seeds = len({r.get("seed") for r in act_rows}) or 1
    coverage_rows = [
        {k: r.get(k) for k in COVERAGE_COLUMNS} for r in as_list(result.tables.get("coverage")) if isinstance(r, dict)
    ]
    return {
        "case": result.case,
        "path": result.path,
        "description": result.description,
        "error": result.error,
        "verdict": verdict_of(result),
        "held": held,
        "undecided": undecided,
        "total": len(result.expectations),
        "calibration": result.calibration,
        "calibration_notes": list(result.calibration_notes),
        "expectations": expectation_rows(result),
        "glance": _glance(result),
        "per_seed": _per_seed_rows(result),
        "plots": {
            "drift": svg_markup(plots.drift(act_rows, drift_max, seeds=n_seeds)),
            "dead": svg_markup(plots.dead_channels(act_rows, dead_max)),
            "curve": svg_markup(
                plots.finetune_curve(
                    _curve_runs(result),
                    source=as_number(acc_source.get("mean")) if acc_source else None,
                    baseline=as_number(acc_baseline.get("mean")) if acc_baseline else None,
                )
            ),
            "coverage": svg_markup(plots.coverage_map(coverage_rows)),
            "calibration": svg_markup(plots.calibration_bands(_calibration_rows(result))),
        },
        "has_activations": bool(act_rows),
        "drift_max": drift_max,
        "dead_max": dead_max,
        "histograms": hists,
        "histogram_seed": hist_seed,
        "layer_maps": layer_maps,
        "layer_map_seed": layer_map_seed,
        "has_cka": any(r.get("cka") is not None for r in act_rows),
        "activations": _activation_table(act_rows),
        "coverage": coverage_rows,
        "record": _record_view(result),
        "provenance": provenance_items({k: v for k, v in as_dict(result.provenance).items() if k != "gate"}),
        "gate": _gate_view(as_dict(result.provenance)),
        "schema_version": result.schema_version,
    }


# ---------------------------------------------------------------------------------------------
# comparison


def _shown_differently(a: Any, b: Any, kind: str) -> bool:
    """A figure moved when it reads differently on the page (the precision the reader sees)."""
    return fmt(a, kind) != fmt(b, kind)


def compare_view(a: CaseResult, b: CaseResult) -> dict[str, Any]:
    """Two runs side by side: expectations that flipped, figures that moved, provenance that differs."""
    exp_a = {e.name: e for e in a.expectations}
    exp_b = {e.name: e for e in b.expectations}
    expectations = []
    for name in list(dict.fromkeys([*exp_a, *exp_b])):
        ea, eb = exp_a.get(name), exp_b.get(name)
        if ea is None or eb is None:
            change = "only in A" if eb is None else "only in B"
        elif ea.passed != eb.passed:
            change = "fixed" if eb.passed else "broke"
        else:
            change = "moved" if _shown_differently(ea.observed, eb.observed, "num") else ""
        expectations.append(
            {
                "name": name,
                "change": change,
                "a": None
                if ea is None
                else {"passed": ea.passed, "observed": ea.observed, "threshold": ea.threshold, "message": ea.message},
                "b": None
                if eb is None
                else {"passed": eb.passed, "observed": eb.observed, "threshold": eb.threshold, "message": eb.message},
            }
        )
    fa, fb = figures(a), figures(b)
    moved = []
    for key, label, kind in FIGURES:
        va, vb = fa.get(key), fb.get(key)
        if va is None and vb is None:
            continue
        delta = None if va is None or vb is None else vb - va
        changed = _shown_differently(va, vb, kind) and key != "seconds"
        moved.append(
            {
                "key": key,
                "label": label,
                "kind": kind,
                "a": va,
                "b": vb,
                "changed": changed,
                "delta": delta,
                "delta_text": _delta_text(delta, kind),
            }
        )
    pa, pb = as_dict(a.provenance), as_dict(b.provenance)
    prov = []
    extra = sorted((set(pa) | set(pb)) - set(PROVENANCE_ORDER))
    for key in [k for k in PROVENANCE_ORDER if k in pa or k in pb] + extra:
        prov.append(
            {
                "key": key,
                "a": pa.get(key),
                "b": pb.get(key),
                "changed": pa.get(key) != pb.get(key),
                "expected": key == "created",
            }
        )
    rec_a, rec_b = _record_view(a), _record_view(b)
    methods = [
        {
            "method": m,
            "a": rec_a["by_method"][m],
            "b": rec_b["by_method"][m],
            "changed": rec_a["by_method"][m] != rec_b["by_method"][m],
        }
        for m in plots.METHODS
    ]
    drift_max = _threshold(b, "activations.drift_max") or _threshold(a, "activations.drift_max")
    src = _agg(b, "source") or _agg(a, "source")
    runs = _curve_runs(a, label_prefix="A ", style="-") + _curve_runs(b, label_prefix="B ", style="--")
    flipped = [e["name"] for e in expectations if e["change"] in ("fixed", "broke")]
    summary = {
        "flipped": flipped,
        "only": [e["name"] for e in expectations if e["change"].startswith("only")],
        "moved": [m["label"] for m in moved if m["changed"]],
        "provenance": [p["key"] for p in prov if p["changed"] and not p["expected"]],
        "coverage": [m["method"] for m in methods if m["changed"]],
    }
    return {
        "a": run_header(a),
        "b": run_header(b),
        "same_case": a.case == b.case,
        "expectations": expectations,
        "figures": moved,
        "provenance": prov,
        "methods": methods,
        "summary": summary,
        "changes": sum(len(v) for v in summary.values()),
        "plots": {
            "curve": svg_markup(plots.finetune_curve(runs, source=as_number(src.get("mean")) if src else None)),
            "drift": svg_markup(plots.compare_drift({"A": activation_rows(a), "B": activation_rows(b)}, drift_max)),
        },
    }


def _delta_text(delta: float | None, kind: str) -> str:
    if delta is None or math.isnan(delta):
        return ""
    if kind == "pct":
        return f"{100 * delta:+.2f} pt"
    if kind == "sec":
        return f"{delta:+.1f} s"
    return f"{delta:+.4g}"


def run_header(result: CaseResult) -> dict[str, Any]:
    """What identifies a run on a page: case, verdict, expectations held, when, commit, case hash."""
    prov = as_dict(result.provenance)
    return {
        "case": result.case,
        "path": result.path,
        "verdict": verdict_of(result),
        "error": result.error,
        "held": sum(1 for e in result.expectations if e.passed),
        "total": len(result.expectations),
        "created": prov.get("created"),
        "commit": prov.get("git_commit"),
        "case_hash": prov.get("case_hash"),
        "description": result.description,
    }


# ---------------------------------------------------------------------------------------------
# pages as strings


def case_html(result: CaseResult) -> str:
    """The self-contained report page of one result of a single case (a variant case's page is
    :func:`surgery.report.pages.page_html`'s)."""
    with plots.id_scope():
        return render_page("case.html.j2", v=case_view(result), title=f"{result.case} · surgery report")


def compare_html(a: CaseResult, b: CaseResult) -> str:
    """Two runs of a case side by side (A and B), changes marked."""
    with plots.id_scope():
        return render_page("compare.html.j2", v=compare_view(a, b), title=f"{a.case} vs {b.case} · surgery comparison")
