"""`surgery gate`: exit codes (0 pass, 1 an expectation failed, 2 bad input), the verdict files, safety.

One small "release candidate" is shared by the module: a ResNet-18 at 16 px on 400 UCI digits
whose BatchNorm statistics are estimated on the train split (AdaBN) and whose head is fitted in
closed form (ridge regression on the pooled features). That takes forward passes only — a few
seconds — where 60 SGD steps take minutes on this project's busy 2-core machine; the model
reaches ~0.75 test accuracy, well above the case's ``after_min: 0.5``.
The case transplants ``torchvision:resnet18`` (with that checkpoint) into ``torchvision:resnet18``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from surgery.case import DatasetSpec
from surgery.cli import main
from surgery.data.datasets import load_split
from surgery.train.finetune import predict, recalibrate_bn
from surgery.running.release_gate import GATE_FILE, bn_stats_rows, write_verdict
from surgery.results import CaseResult, ExpectationResult

IMAGE_SIZE, LIMIT, SEED = 16, 400, 0
GATE_NAMES = ["gate.accuracy", "gate.recovery", "gate.drift_max", "gate.finite", "gate.bn_stats"]

CASE = """\
name: release-candidate
description: ResNet-18 transplanted into itself (exact) on 400 digits at 16 px; the gate checks a finished copy.
seed: {seed}
device: cpu
data: {{train: {{name: digits, limit: {limit}}}, image_size: {size}}}
source: {{model: "torchvision:resnet18", num_classes: 10, checkpoint: "{source}"}}
surgery:
  op: transplant
  target: {{model: "torchvision:resnet18", num_classes: 10}}
  strategy: exact
finetune: {{steps: 1}}
expect:
  activations: {{layers: ["layer?"], drift_max: 0.1}}
  accuracy: {{after_min: 0.5, recovery_min: 0.95}}
"""


def _candidate() -> tuple[nn.Module, float]:
    """A ResNet-18 with AdaBN statistics and a ridge-regression head: (model, test accuracy)."""
    cpu = torch.device("cpu")
    split = load_split(DatasetSpec(name="digits", limit=LIMIT), image_size=IMAGE_SIZE, channels=3, seed=SEED)
    torch.manual_seed(SEED)
    model = torchvision.models.resnet18(num_classes=10)
    recalibrate_bn(model, split.train_x, device=cpu, batches=4, batch_size=80, seed=SEED)
    head, model.fc = model.fc, nn.Identity()
    feats = predict(model, split.train_x, device=cpu).double()
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    z = (feats - mu) / sd
    onehot = nn.functional.one_hot(split.train_y, 10).double()
    ridge = 1000.0 * torch.eye(z.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(z.T @ z + ridge, z.T @ (onehot - onehot.mean(0)))
    with torch.no_grad():
        head.weight.copy_((w / sd[:, None]).T.float())
        head.bias.copy_((onehot.mean(0) - (mu / sd) @ w).float())
    model.fc = head
    logits = predict(model, split.test_x, device=cpu)
    return model.eval(), float((logits.argmax(1) == split.test_y).float().mean())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The case file (in its own directory), the source checkpoint, and a copy of it to release."""
    root = tmp_path_factory.mktemp("gate")
    mp = pytest.MonkeyPatch()
    mp.setenv("SURGERY_CACHE", str(root / "cache"))
    model, accuracy = _candidate()
    assert accuracy >= 0.65, accuracy  # well above the case's after_min
    state = {k: v.clone() for k, v in model.state_dict().items()}
    (root / "source").mkdir()
    (root / "cases").mkdir()
    (root / "release").mkdir()
    torch.save(state, root / "source" / "resnet18-digits.pt")
    torch.save(state, root / "release" / "model.pt")
    case_path = root / "cases" / "release.yaml"
    case_path.write_text(
        CASE.format(
            seed=SEED, limit=LIMIT, size=IMAGE_SIZE, source=(root / "source" / "resnet18-digits.pt").as_posix()
        ),
        encoding="utf-8",
    )
    yield {
        "root": root,
        "case": case_path,
        "checkpoint": root / "release" / "model.pt",
        "state": state,
        "accuracy": accuracy,
    }
    mp.undo()


def _listing(*dirs: Path) -> dict[str, list[str]]:
    return {str(d): sorted(str(p.relative_to(d)) for p in d.rglob("*")) for d in dirs}


def _gate(capsys, checkpoint: Path, case: Path, report: Path) -> tuple[int, str, str]:
    code = main(["gate", str(checkpoint), "--case", str(case), "--report", str(report)])
    out, err = capsys.readouterr()
    return code, out, err


def _strict_load(path: Path) -> dict:
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def _html_reports(report: Path) -> list[Path]:
    return sorted(report.rglob("report.html"))


def _save_variant(world, tmp_path: Path, name: str, change) -> Path:
    state = {k: v.clone() for k, v in world["state"].items()}
    state = change(state) or state
    path = tmp_path / "release" / name
    path.parent.mkdir(exist_ok=True)
    torch.save(state, path)
    return path


# ----------------------------------------------------------------------------- exit 0 / 1


def test_good_checkpoint_passes_and_writes_the_verdict_only_under_report(world, tmp_path, capsys):
    ckpt, case = world["checkpoint"], world["case"]
    before = _listing(case.parent, ckpt.parent, world["root"] / "source")
    report = tmp_path / "out" / "gate"
    code, out, err = _gate(capsys, ckpt, case, report)
    assert code == 0, out + err
    assert "\nPASS release-candidate: 5/5 expectations held" in out
    assert out.startswith(f"candidate: {ckpt} (sha256 ") and "no surgery metadata" in out
    verdict = _strict_load(report / GATE_FILE)
    assert verdict["verdict"] == "pass" and verdict["passed"] is True
    assert verdict["checkpoint"] == str(ckpt)
    assert verdict["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert [e["name"] for e in verdict["expectations"]] == GATE_NAMES
    by_name = {e["name"]: e for e in verdict["expectations"]}
    assert by_name["gate.accuracy"]["observed"] == pytest.approx(world["accuracy"])
    assert by_name["gate.recovery"]["observed"] == pytest.approx(1.0)
    assert by_name["gate.drift_max"]["observed"] == pytest.approx(0.0, abs=1e-6)  # the checkpoint is the source
    assert "after_min 0.5" in by_name["gate.accuracy"]["message"]
    assert "20 BatchNorm layer(s) checked" in by_name["gate.bn_stats"]["message"]
    assert _html_reports(report), "no HTML report"
    assert verdict["provenance"]["checkpoint_sha256"] == verdict["sha256"]
    assert {r["stage"] for r in verdict["tables"]["activations"]} == {"gate"}
    assert len(verdict["tables"]["bn_stats"]) == 20 and all(r["ok"] for r in verdict["tables"]["bn_stats"])
    assert _listing(case.parent, ckpt.parent, world["root"] / "source") == before  # nothing written elsewhere
    leftovers = [p for p in report.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers


def test_nan_in_one_weight_fails_finite(world, tmp_path, capsys):
    """The same checkpoint (as .safetensors) with one NaN weight: exit 1, the weight and the first module named."""
    from safetensors.torch import save_file

    state = {k: v.clone().contiguous() for k, v in world["state"].items()}
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = math.nan
    ckpt = tmp_path / "release" / "nan.safetensors"
    ckpt.parent.mkdir()
    save_file(state, str(ckpt))
    report = tmp_path / "report"
    code, out, err = _gate(capsys, ckpt, world["case"], report)
    assert code == 1, out + err
    assert "\nFAIL release-candidate" in out
    verdict = _strict_load(report / GATE_FILE)  # strict JSON even with NaN figures inside
    assert verdict["verdict"] == "fail"
    finite = next(e for e in verdict["expectations"] if e["name"] == "gate.finite")
    assert not finite["passed"]
    assert "layer2.0.conv1.weight" in finite["message"] and finite["message"].startswith("observed 0 != finite 1")
    assert finite["details"]["nonfinite_weights"] == ["layer2.0.conv1.weight"]
    assert next(iter(finite["details"]["nonfinite_outputs"])) == "layer2.0.conv1"  # the first module to go NaN
    assert "    gate.finite: observed 0 != finite 1" in out
    assert _html_reports(report)
    assert (
        err.startswith("surgery: warning: scored on the digits test split") and err.count("\n") == 1
    )  # no gate section


def test_untrained_checkpoint_fails_accuracy_drift_and_bn_stats(world, tmp_path, capsys):
    torch.manual_seed(1)
    fresh = torchvision.models.resnet18(num_classes=10).state_dict()
    ckpt = _save_variant(world, tmp_path, "fresh.pt", lambda _state: fresh)
    report = tmp_path / "report"
    code, out, _ = _gate(capsys, ckpt, world["case"], report)
    assert code == 1
    verdict = _strict_load(report / GATE_FILE)
    failed = {e["name"]: e["message"] for e in verdict["expectations"] if not e["passed"]}
    assert set(failed) == {"gate.accuracy", "gate.recovery", "gate.drift_max", "gate.bn_stats"}, failed
    assert failed["gate.bn_stats"].startswith(
        "observed 20 > bad_layers 0 (BatchNorm running statistics bad in 20 of 20"
    )
    assert "num_batches_tracked is 0" in failed["gate.bn_stats"]
    assert "normalised W1, checkpoint vs source, layer layer" in failed["gate.drift_max"]
    for name in failed:
        assert f"    {name}: observed " in out
    assert _html_reports(report)


# ----------------------------------------------------------------------------- exit 2: bad input


@pytest.mark.parametrize("kind", ["truncated", "empty", "missing", "not a state_dict"])
def test_unreadable_checkpoint_is_bad_input(world, tmp_path, capsys, kind):
    ckpt = tmp_path / "model.pt"
    good = world["checkpoint"].read_bytes()
    if kind == "truncated":
        ckpt.write_bytes(good[: len(good) // 2])
    elif kind == "empty":
        ckpt.write_bytes(b"")
    elif kind == "not a state_dict":
        torch.save([torch.zeros(3)], ckpt)
    report = tmp_path / "report"
    code, out, err = _gate(capsys, ckpt, world["case"], report)
    assert code == 2
    assert out == "" and err.count("\n") == 1 and err.startswith(f"surgery: error: checkpoint {ckpt}")
    assert {
        "truncated": "truncated or corrupt",
        "empty": "truncated or corrupt",
        "missing": "no such file",
        "not a state_dict": "expected a state_dict",
    }[kind] in err
    assert not report.exists()  # nothing half-written


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_device_is_bad_input(world, tmp_path, capsys):
    code = main(
        [
            "gate",
            str(world["checkpoint"]),
            "--case",
            str(world["case"]),
            "--report",
            str(tmp_path / "r"),
            "--device",
            "cuda",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "CUDA is not available" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("kind", ["keys match nothing", "wrong shape", "missing keys"])
def test_checkpoint_that_does_not_fit_the_target_is_bad_input(world, tmp_path, capsys, kind):
    def change(state):
        if kind == "keys match nothing":
            return {f"encoder.{k}": v for k, v in state.items()}
        if kind == "wrong shape":
            state["fc.weight"], state["fc.bias"] = torch.zeros(5, 512), torch.zeros(5)
        else:
            del state["layer4.1.bn2.running_var"]

    ckpt = _save_variant(world, tmp_path, "misfit.pt", change)
    report = tmp_path / "report"
    code, out, err = _gate(capsys, ckpt, world["case"], report)
    assert code == 2, out + err
    assert err.count("\n") == 1 and err.startswith(f"surgery: error: checkpoint {ckpt}: ")
    assert {
        "keys match nothing": "none of its 122 keys match the model",
        "wrong shape": "wrong shape",
        "missing keys": "1 model key(s) missing",
    }[kind] in err
    assert not report.exists()


class _OpenFileWhenUnpickled:
    """A checkpoint payload: unpickling it calls ``open(path, 'w')``, which creates the file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_payload_is_refused_and_never_runs(world, tmp_path):
    # The payload is live: an unsafe load does create its file ...
    witness = tmp_path / "witness-created"
    torch.save({"conv1.weight": torch.zeros(1), "x": _OpenFileWhenUnpickled(witness)}, tmp_path / "witness.pt")
    handle = torch.load(tmp_path / "witness.pt", weights_only=False)["x"]
    handle.close()
    assert witness.exists()
    # ... and `surgery gate` (a real process, the installed CLI's code path) refuses it before it runs.
    target = tmp_path / "pwned"
    evil = _save_variant(world, tmp_path, "evil.pt", lambda s: {**s, "payload": _OpenFileWhenUnpickled(target)})
    report = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "surgery.cli", "gate", str(evil), "--case", str(world["case"]), "--report", str(report)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "SURGERY_CACHE": str(world["root"] / "cache")},
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "refused, it is not weights-only" in proc.stderr
    assert proc.stdout == ""
    assert not target.exists()
    assert not report.exists()


# ----------------------------------------------------------------------------- parts


def test_bn_stats_rows_flag_each_kind_of_bad_statistics():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.LazyLinear(2),
        nn.BatchNorm1d(2, track_running_stats=False),
    )
    rows = bn_stats_rows(model)
    assert [r["layer"] for r in rows] == ["1"]  # no running statistics, nothing to check
    assert not rows[0]["ok"] and "num_batches_tracked is 0" in rows[0]["problems"]
    assert bn_stats_rows(model, counted=set())[0]["ok"]  # a checkpoint without the counter is not penalised
    model[1].num_batches_tracked.fill_(3)
    assert bn_stats_rows(model)[0]["ok"]
    model[1].running_var[1] = -0.5
    model[1].running_var[2] = math.inf
    model[1].running_mean[0] = math.nan
    row = bn_stats_rows(model)[0]
    assert (row["nonpositive_var"], row["nonfinite_var"], row["nonfinite_mean"]) == (1, 1, 1)
    assert row["problems"] == (
        "running_var non-finite in 1 channel(s); running_var <= 0 in 1 channel(s); "
        "running_mean non-finite in 1 channel(s)"
    )
    assert bn_stats_rows(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))) == []


def test_verdict_is_strict_json_and_written_last(tmp_path, monkeypatch):
    result = CaseResult(
        case="c",
        path="<memory>",
        expectations=[
            ExpectationResult("gate.drift_max", False, math.nan, 0.1, {"per_layer": {"layer1": math.inf}}, "m")
        ],
    )
    write_verdict(result, tmp_path / "r", checkpoint=Path("m.pt"), sha256="0" * 64)
    verdict = _strict_load(tmp_path / "r" / GATE_FILE)
    assert verdict["expectations"][0]["observed"] is None
    assert verdict["expectations"][0]["details"]["per_layer"]["layer1"] is None
    assert verdict["verdict"] == "fail" and verdict["sha256"] == "0" * 64

    # A report that cannot be written leaves no verdict behind (and the previous one intact).
    import surgery.report.render as render

    def broken(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(render, "write_case_report", broken)
    result.expectations[0].passed = True
    with pytest.raises(OSError):
        write_verdict(result, tmp_path / "r", checkpoint=Path("m.pt"), sha256="1" * 64)
    assert _strict_load(tmp_path / "r" / GATE_FILE)["sha256"] == "0" * 64
