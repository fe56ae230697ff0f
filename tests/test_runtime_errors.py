"""Input errors found at run time name the case file, the line and the field: exit 2, one line, nothing written.

Each case below parses fine; the problem shows only when the run builds its models or data. The
tiny models (the zoo's stem trainer, random init) keep each run to a second or two.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import surgery.train.finetune as finetune_module
from surgery import cli
from surgery.case import load_case
from surgery.running.prepare import load_data
from surgery.running.reuse import SOURCE_ACCURACIES
from surgery.stats.calibration import record_path
from surgery.train.zoo import stem_trainer

from cli_runs import run_case_file, run_cli  # the in-process CLI harness of tests/

CASE = """\
name: located
device: {device}
data:
  train: {train}
  image_size: {image_size}
  split_seed: 0
source:
  model: "{source}"
  num_classes: 10{checkpoint}
surgery:
  op: graft
  donor: {{model: "torch.nn:Identity"}}
  path: {path}
finetune: {{steps: 1, batch_size: 8{groups}}}
expect:
  activations: {{layers: [{layer}], drift_max: 5.0}}{baseline}
"""


# A baseline whose checkpoint is missing: the baseline is built only after every seed has run.
ABSENT_BASELINE = "\n  accuracy: {beats_baseline: {model: {model: 'torch.nn:Identity', checkpoint: absent.pt}}}"


def _case(tmp_path: Path, **fields: str) -> Path:
    values = {
        "device": "cpu",
        "train": "{name: digits, limit: 100}",
        "image_size": "16",
        "checkpoint": "",
        "path": "body.0",
        "layer": "body.1",
        "source": "surgery.train.zoo:stem_trainer",
        "groups": "",
        "baseline": "",
    }
    values.update(fields)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "located.yaml"
    path.write_text(CASE.format(**values))
    return path


def _run(case: Path, report: Path) -> tuple[int, list[str]]:
    run = run_case_file(case, report)
    return run.rc, run.err.strip().splitlines()


@pytest.mark.parametrize(
    "fields,line,field,fragment",
    [
        ({"source": "timm:vit_tiny_patch16_224"}, 5, "data.image_size", "forward fails"),
        ({"checkpoint": "\n  checkpoint: weights/absent.safetensors"}, 10, "source.checkpoint", "no such file"),
        ({"path": "body.99"}, 13, "surgery.path", "body.99"),
        ({"layer": "no_such_layer"}, 16, "expect.activations.layers", "no_such_layer"),
        ({"device": "cuda:7"}, 2, "device", "cuda"),
        ({"train": "{name: imagefolder, root: missing-folder}"}, 4, "data.train.root", "missing-folder"),
        ({"groups": ", groups: [{params: 'body.9.*'}]"}, 14, "finetune.groups[0].params", "matches no trainable"),
        ({"groups": ", groups: [{params: '*'}, {params: 'body.*'}]"}, 14, "finetune.groups[1].params", "earlier group"),
        (
            {"baseline": ABSENT_BASELINE},
            17,
            "expect.accuracy.beats_baseline.model.checkpoint",
            "no such file",
        ),
    ],
    ids=[
        "image-size",
        "checkpoint",
        "graft-path",
        "probed-layer",
        "device",
        "imagefolder-root",
        "group-glob",
        "group-taken",
        "baseline-checkpoint",
    ],
)
def test_runtime_input_errors_name_file_line_and_field(tmp_path, fields, line, field, fragment):
    case = _case(tmp_path, **fields)
    report = tmp_path / "reports"
    rc, err = _run(case, report)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"surgery: error: {case}:{line}: {field}: ") and fragment in err[0], err[0]
    assert not report.exists()


@pytest.mark.parametrize(
    "fields",
    [
        {"layer": "no_such_layer"},
        {"groups": ", groups: [{params: 'body.9.*'}]"},
        {"baseline": ABSENT_BASELINE},
    ],
    ids=["probed-layer", "group-glob", "baseline-checkpoint"],
)
def test_errors_the_models_show_come_before_the_run_evaluates_anything(tmp_path, fields):
    """Found from the models alone, before the source's evaluation (at 224 px the first long wait), the
    fine-tune and, for the baseline, every seed; the same case without the error does evaluate the source."""
    evaluations = SOURCE_ACCURACIES.hits + SOURCE_ACCURACIES.misses
    rc, err = _run(_case(tmp_path, **fields), tmp_path / "reports")
    assert rc == 2, err
    assert SOURCE_ACCURACIES.hits + SOURCE_ACCURACIES.misses == evaluations
    rc, err = _run(_case(tmp_path), tmp_path / "reports")
    assert rc == 0, err
    assert SOURCE_ACCURACIES.hits + SOURCE_ACCURACIES.misses == evaluations + 1


def test_a_relative_checkpoint_resolves_against_the_case_file(tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    weights.mkdir()
    torch.manual_seed(3)
    save_file({k: v.contiguous() for k, v in stem_trainer().state_dict().items()}, str(weights / "stem.safetensors"))
    case = _case(tmp_path, checkpoint="\n  checkpoint: weights/stem.safetensors")
    text = case.read_text()
    start, end = text.index("surgery:"), text.index("finetune:")
    case.write_text(text[:start] + "surgery: {op: activation_swap, from: ReLU, to: SiLU}\n" + text[end:])
    monkeypatch.chdir(Path("/"))  # the working directory does not matter
    rc, err = _run(case, tmp_path / "reports")
    assert rc == 0, err


def test_the_gate_scores_on_the_split_its_run_used(tmp_path):
    """``seed: [1]`` with ``split_seed: 0``: run and gate both draw the split of seed 0."""
    case_file = _case(tmp_path)
    case_file.write_text(case_file.read_text().replace("device: cpu", "device: cpu\nseed: [1]"))
    case = load_case(case_file)
    split = load_data(case, case.seed[0])
    reference = load_data(case.model_copy(update={"seed": [0]}), 0)
    assert torch.equal(split.test_x, reference.test_x) and torch.equal(split.train_y, reference.train_y)
    other = load_data(case.model_copy(update={"data": case.data.model_copy(update={"split_seed": None})}), 1)
    assert not torch.equal(other.test_y, split.test_y)


@pytest.mark.parametrize("delay,shown", [(0.0, True), (finetune_module.PROGRESS_DELAY, False)], ids=["long", "short"])
def test_a_long_evaluation_or_probe_pass_shows_a_bar_and_a_short_one_none(tmp_path, capsys, monkeypatch, delay, shown):
    """At 224 px on a CPU a source's evaluation and the probe pass take tens of seconds each: with progress
    on, a pass shows its bar once it has run ``PROGRESS_DELAY`` seconds (here 0, as if long; and as it is,
    which this 16 px case never reaches); ``--quiet`` (progress off) shows none."""
    from surgery.running.runner import RunOptions
    from surgery.running.cases import run_case

    monkeypatch.setattr(finetune_module, "PROGRESS_DELAY", delay)
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))  # no source accuracy stored by another run
    case = load_case(_case(tmp_path))
    SOURCE_ACCURACIES.clear()
    run_case(case, RunOptions(progress=True, threads=1))
    err = capsys.readouterr().err
    for bar in ("evaluating the source", "evaluating the patient", "probing 3 models"):
        assert (bar in err) == shown, err
    SOURCE_ACCURACIES.clear()
    run_case(case, RunOptions(progress=False, threads=1))
    assert "evaluating" not in capsys.readouterr().err


def test_surgery_run_reports_a_later_cases_model_error_before_it_runs_the_first(tmp_path):
    """``surgery run A B``: B's mistyped layer is reported before A runs (stdout and stderr in one stream, in
    the order they were written), and A still runs; exit 2."""
    first, second = _case(tmp_path / "a"), _case(tmp_path / "b", layer="no_such_layer")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        rc = cli.main(["run", str(first), str(second), "--report", str(tmp_path / "reports"), "--quiet"])
    lines = printed.getvalue().splitlines()
    error = next(i for i, line in enumerate(lines) if line.startswith(f"surgery: error: {second}:16: "))
    passed = next(i for i, line in enumerate(lines) if line.startswith("PASS located"))
    assert rc == 2 and error < passed, lines


def test_surgery_calibrate_checks_every_case_before_it_calibrates_the_first(tmp_path):
    first, second = _case(tmp_path / "a"), _case(tmp_path / "b", layer="no_such_layer")
    rc, _, err = run_cli("calibrate", first, second, "--seeds", "2", "--profiles", "native")
    assert rc == 2 and err.startswith(f"surgery: error: {second}:16: expect.activations.layers: "), err
    assert not record_path(first).exists()  # nothing calibrated, nothing written


BRIDGE_WITH_A_HEAD_GROUP = """\
name: head-group
seed: [0, 1]
device: cpu
data: {train: {name: digits, limit: 100}, image_size: 16, split_seed: 0}
source: {model: "torchvision:resnet18", num_classes: 10}
surgery: {op: bridge, nodes: [layer4], head: linear}
finetune: {steps: 1, batch_size: 8, groups: [{params: "head.*", lr_scale: 0.5}]}
expect:
  accuracy: {after_min: 0.0, beats_baseline: {margin: -1.0, model: {model: "torchvision:resnet18"}}}
"""


def test_a_group_the_baseline_does_not_have_is_located_before_any_seed_runs(tmp_path):
    """The baseline fine-tunes with ``finetune.groups`` too: a bridge's ``head.*`` names the patient's head,
    which a ResNet-18 trained from scratch does not have. Found with the baseline's other checks, before the
    source is evaluated, not after every seed with no line."""
    case = tmp_path / "head-group.yaml"
    case.write_text(BRIDGE_WITH_A_HEAD_GROUP)
    evaluations = SOURCE_ACCURACIES.hits + SOURCE_ACCURACIES.misses
    rc, err = _run(case, tmp_path / "reports")
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"surgery: error: {case}:7: finetune.groups[0].params: 'head.*' matches no "), err
    assert "random-init baseline" in err[0]
    assert SOURCE_ACCURACIES.hits + SOURCE_ACCURACIES.misses == evaluations
