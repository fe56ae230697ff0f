"""The release gate on held-out data: champion against candidate, provenance carried in the exported weights.

One small real case is run once for the module: a conv net (``surgery.train.zoo:stem_trainer``) fine-tuned
for 40 steps on UCI digits at 16 px, a fifth of the digits held out for the gate. ``surgery run
--export`` writes its patient; the tests gate it against itself, against a head-permuted copy and
against a candidate fine-tuned 10x shorter, through the real CLI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_runs import run_case_file, run_cli
from surgery.case import load_case
from surgery.stats.compare import compare_predictions
from surgery.data.datasets import holdout_indices
from surgery.running.export import read_metadata
from surgery.running.release_gate import GATE_FILE, gate_schema_path
from surgery.running.prepare import load_data

CASE = """\
name: release-small
seed: [0]
device: cpu
data: {{train: digits, image_size: 16, holdout: 0.2}}
source: {{model: "surgery.train.zoo:stem_trainer", num_classes: 10}}
surgery: {{op: transplant, target: {{model: "surgery.train.zoo:stem_trainer", num_classes: 10}}, strategy: exact}}
finetune: {{steps: {steps}, batch_size: 32, schedule: {{name: cosine, warmup_steps: 2}}}}
expect:
  coverage: {{tensors_min: 1.0}}
  accuracy: {{after_min: 0.3}}
gate:
  data: holdout
  not_worse_than: {{accuracy: 0.02, confidence: 0.95}}
"""
SCHEMA = json.loads(gate_schema_path().read_text())


def _write_case(folder: Path, steps: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "release-small.yaml"
    path.write_text(CASE.format(steps=steps))
    return path


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The case, the exported champion (40 steps), and a candidate fine-tuned 10x shorter (4 steps)."""
    root = tmp_path_factory.mktemp("release")
    case = _write_case(root / "case", 40)
    run = run_case_file(case, root / "reports", "--export", root / "export")
    assert run.rc == 0, run.err
    champion = root / "export" / "release-small" / "seed-0.safetensors"
    short_case = _write_case(root / "short", 4)
    short = run_case_file(short_case, root / "short-reports", "--export", root / "short-export")
    assert short.rc in (0, 1), short.err
    return {
        "root": root,
        "case": case,
        "champion": champion,
        "run": run,
        "short": root / "short-export" / "release-small" / "seed-0.safetensors",
    }


def _gate(release, candidate: Path, out: Path, *extra: str):
    result = run_cli(
        "gate", candidate, "--case", release["case"], "--champion", release["champion"], "--report", out, *extra
    )
    verdict = json.loads((out / GATE_FILE).read_text()) if (out / GATE_FILE).exists() else None
    return result, verdict


def test_gate_examples_are_disjoint_from_every_seeds_split():
    case = load_case(Path(__file__).resolve().parent.parent / "cases" / "shift" / "mnist-to-digits-adabn.yaml")
    held = None
    for seed in range(12):
        split = load_data(case, seed)
        gate = set(split.holdout_index.tolist())
        assert gate and not gate & set(split.train_index.tolist()) and not gate & set(split.test_index.tolist())
        assert held is None or gate == held  # the same examples whatever the seed
        held = gate
        assert len(split.train_index) + len(split.test_index) + len(gate) == 1797
    assert holdout_indices(1797, 0.0).numel() == 0


def test_export_carries_provenance(release):
    meta = read_metadata(release["champion"])
    results = release["run"].results
    assert meta["case"] == "release-small" and meta["seed"] == "0" and meta["verdict"] == "pass"
    assert meta["case_hash"] == load_case(release["case"]).file_hash
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["metrics"]["accuracy"]["after"] == pytest.approx(results["per_seed"][0]["accuracy"]["after"])
    assert meta["coverage"]["tensors"] == 1.0
    assert "exported" in release["run"].out


def test_candidate_gated_against_itself_passes(release, tmp_path):
    (rc, out, err), verdict = _gate(release, release["champion"], tmp_path / "g")
    assert rc == 0, out + err
    assert "candidate: " in out and "case release-small" in out and "held-out digits" in out
    jsonschema.validate(verdict, SCHEMA)
    comparison = verdict["gate"]["comparison"]
    assert comparison["difference"] == 0 and comparison["flip_rate"] == 0 and comparison["interval"] == [0, 0]
    assert verdict["gate"]["held_out"] and verdict["gate"]["examples"] == 359
    assert verdict["verdict"] == "pass"
    page = (tmp_path / "g" / "release-small" / "report.html").read_text()
    assert 'id="gate"' in page and "paired-bootstrap interval" in page and "flip rate" in page


def test_head_permuted_candidate_fails_naming_interval_and_flip_rate(release, tmp_path):
    state = load_file(str(release["champion"]))
    head = [k for k, v in state.items() if v.dim() == 2 and v.shape[0] == 10][-1]  # the classifier's weight
    bias = head.rsplit(".", 1)[0] + ".bias"
    state[head], state[bias] = state[head].roll(1, 0).contiguous(), state[bias].roll(1, 0).contiguous()
    permuted = tmp_path / "permuted.safetensors"
    save_file(state, str(permuted))
    (rc, out, err), verdict = _gate(release, permuted, tmp_path / "g")
    assert rc == 1, out + err
    line = next(ln for ln in out.splitlines() if "gate.not_worse_than" in ln)
    assert "paired-bootstrap interval [" in line and "flip rate" in line and "McNemar" in line
    jsonschema.validate(verdict, SCHEMA)
    assert verdict["gate"]["comparison"]["flip_rate"] > 0.5 and verdict["verdict"] == "fail"


def test_shorter_finetune_is_judged_by_the_non_inferiority_rule(release, tmp_path):
    (rc, out, err), verdict = _gate(release, release["short"], tmp_path / "g")
    jsonschema.validate(verdict, SCHEMA)
    comparison = verdict["gate"]["comparison"]
    rule = next(e for e in verdict["expectations"] if e["name"] == "gate.not_worse_than")
    assert rule["passed"] == (comparison["lower_bound"] >= -0.02) == comparison["non_inferior"]
    others_hold = all(e["passed"] for e in verdict["expectations"] if e["name"] != "gate.not_worse_than")
    assert rc == (0 if rule["passed"] and others_hold else 1)
    lo, hi = comparison["interval"]
    assert f"[{lo:+.4f}, {hi:+.4f}]" in rule["message"]
    # The same figures from the statistics module, on the predictions behind them, by the same rule.
    assert lo <= comparison["difference"] <= hi


def test_champion_of_another_architecture_is_bad_input(release, tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"fc.weight": torch.zeros(10, 4), "fc.bias": torch.zeros(10)}, str(other))
    out = tmp_path / "g"
    rc, _, err = run_cli("gate", release["champion"], "--case", release["case"], "--champion", other, "--report", out)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and str(other) in err and "champion" in err
    assert not out.exists()


def test_missing_champion_is_bad_input_and_writes_nothing(release, tmp_path):
    out = tmp_path / "g"
    rc, _, err = run_cli(
        "gate",
        release["champion"],
        "--case",
        release["case"],
        "--champion",
        tmp_path / "nope.safetensors",
        "--report",
        out,
    )
    assert rc == 2 and "nope.safetensors" in err and "no such file" in err and not out.exists()


def test_gate_warns_when_the_case_changed_since_export(release, tmp_path):
    edited = tmp_path / "case" / "release-small.yaml"
    edited.parent.mkdir()
    edited.write_text(CASE.format(steps=40).replace("after_min: 0.3", "after_min: 0.31"))
    rc, out, err = run_cli(
        "gate", release["champion"], "--case", edited, "--champion", release["champion"], "--report", tmp_path / "g"
    )
    assert rc == 0, out + err
    assert "warning: candidate was exported from case release-small with hash" in err
    assert "same experiment" in err


def test_gate_without_a_gate_section_warns_that_its_examples_are_not_held_out(release, tmp_path):
    case = tmp_path / "plain.yaml"
    case.write_text(CASE.format(steps=40).split("gate:")[0].replace(", holdout: 0.2", ""))
    rc, out, err = run_cli("gate", release["champion"], "--case", case, "--report", tmp_path / "g")
    assert rc in (0, 1) and "other seeds of the case may have trained on them" in err
    verdict = json.loads((tmp_path / "g" / GATE_FILE).read_text())
    jsonschema.validate(verdict, SCHEMA)
    assert verdict["gate"]["held_out"] is False and verdict["gate"]["comparison"] is None


def test_gate_data_of_its_own_is_used_whole(release, tmp_path):
    """gate.data as an imagefolder beside the case (a relative root): every image scored, none of the case's split."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(30):
        folder = tmp_path / "case" / "release-eval" / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 255 / 16).astype("uint8")).save(folder / f"{i}.png")
    case = tmp_path / "case" / "release-small.yaml"
    case.write_text(CASE.format(steps=40).replace("  data: holdout", "  data: {name: imagefolder, root: release-eval}"))
    out = tmp_path / "g"
    rc, stdout, err = run_cli(
        "gate", release["champion"], "--case", case, "--champion", release["champion"], "--report", out
    )
    verdict = json.loads((out / GATE_FILE).read_text())
    jsonschema.validate(verdict, SCHEMA)
    assert verdict["gate"]["examples"] == 30 and verdict["gate"]["held_out"]
    assert "30 examples of imagefolder (gate.data, used whole)" in stdout and "warning: scored on" not in err


def test_gate_holdout_needs_data_holdout(tmp_path):
    case = tmp_path / "bad.yaml"
    case.write_text(CASE.format(steps=1).replace(", holdout: 0.2", ""))
    rc, _, err = run_cli("run", case, "--report", tmp_path / "r")
    assert rc == 2 and f"{case}:12: gate.data:" in err and "data.holdout" in err


def test_paired_statistics_agree_with_scipy_and_a_direct_bootstrap():
    from scipy.stats import binomtest
    import numpy as np

    rng = np.random.default_rng(3)
    y = rng.integers(0, 10, 500)
    a = np.where(rng.random(500) < 0.9, y, (y + 1) % 10)
    b = np.where(rng.random(500) < 0.8, y, (y + 3) % 10)
    c = compare_predictions(y, a, b, confidence=0.95, margin=0.0, resamples=4000)
    only_a, only_b = int(((a == y) & (b != y)).sum()), int(((a != y) & (b == y)).sum())
    assert (c.candidate_only, c.champion_only) == (only_a, only_b)
    assert c.mcnemar_p == pytest.approx(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    assert c.flip_rate == pytest.approx(float((a != b).mean()))
    # A direct bootstrap with index draws gives the same interval within its Monte Carlo error.
    idx = rng.integers(0, 500, (4000, 500))
    direct = (a == y)[idx].mean(1) - (b == y)[idx].mean(1)
    assert c.lower_bound == pytest.approx(np.quantile(direct, 0.05), abs=0.01)
    assert c.interval[1] == pytest.approx(np.quantile(direct, 0.95), abs=0.01)
    assert c.non_inferior and c.difference == pytest.approx(float((a == y).mean() - (b == y).mean()))


def test_readme_gating_pipeline_runs_as_written(tmp_path, monkeypatch):
    """The commands of the docs' "Gating a release" block (docs/release-gate.md), run in a scratch copy of the
    seed case."""
    root = Path(__file__).resolve().parent.parent
    readme = (root / "docs" / "release-gate.md").read_text()
    block = readme.split("<!-- gate-pipeline: run by tests/test_release_gate.py -->", 1)[1].split("```sh", 1)[1]
    commands = " ".join(block.split("```", 1)[0].replace("\\\n", " ").split("\n")).split("surgery ")[1:]
    (tmp_path / "cases" / "shift").mkdir(parents=True)
    for name in ("mnist-to-digits-adabn.yaml", "mnist-to-digits-adabn.calibration.json"):
        shutil.copy(root / "cases" / "shift" / name, tmp_path / "cases" / "shift" / name)
    monkeypatch.chdir(tmp_path)
    codes = []
    for command in commands:
        words = command.split("#")[0].split()
        codes.append(run_cli(*words).rc)
    assert codes == [0, 0], codes  # run + export; the candidate gated against the champion (itself, here)
    verdict = json.loads(next(tmp_path.rglob(GATE_FILE)).read_text())
    jsonschema.validate(verdict, SCHEMA)
