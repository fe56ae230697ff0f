"""``surgery run | inspect | zoo`` end to end on a tiny case: exit codes, results.json, determinism.

The case: a random-init ResNet-18 transplanted (exact) into a ResNet-18 on 400 UCI digits at 32 px,
fine-tuned 5 SGD steps of 16 images. Each run takes some seconds on 2 busy cores, so runs are shared.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from surgery import cli

from surgery.train import zoo

from cli_runs import CaseRun, run_case_file, run_cli  # the in-process CLI harness of tests/

CASE = """\
name: {name}
seed: 0
device: cpu
data: {{train: {{name: digits, limit: 400}}, image_size: 32}}
source: {{model: "torchvision:resnet18", num_classes: 10}}
surgery:
  op: transplant
  target: {{model: "torchvision:resnet18", num_classes: 10}}
  strategy: exact
finetune: {{steps: 5, batch_size: 16, eval_every: 5, optimizer: {{name: sgd, lr: {lr}}}}}
expect:
  coverage: {{tensors_min: 0.99, elements_min: 0.99}}
  accuracy: {{after_min: {after_min}}}
"""


def _run_cli(
    directory: Path,
    name: str,
    *,
    lr: str = "0.01",
    after_min: str = "0.0",
    case_text: str | None = None,
    report: str = "reports",
) -> CaseRun:
    directory.mkdir(parents=True, exist_ok=True)
    case = directory / f"{name}.yaml"
    if case_text is None:
        case_text = CASE.format(name=name, lr=lr, after_min=after_min)
    case.write_text(case_text)
    return run_case_file(case, directory / report)


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("cache")
        mp.setenv("SURGERY_CACHE", str(cache))
        mp.setenv("TORCH_HOME", str(cache / "torch"))
        yield cache


@pytest.fixture(scope="module")
def passing(tmp_path_factory, module_cache) -> CaseRun:
    return _run_cli(tmp_path_factory.mktemp("pass"), "tiny-pass")


@pytest.fixture(scope="module")
def failing(tmp_path_factory, module_cache) -> CaseRun:
    return _run_cli(tmp_path_factory.mktemp("fail"), "tiny-fail", after_min="0.999")


def test_run_exits_0_when_expectations_hold(passing):
    assert passing.rc == 0, passing.out + passing.err
    assert passing.err == ""
    assert passing.out.startswith("PASS tiny-pass: 4/4 expectations held")
    results = passing.results
    assert results["schema_version"] == 2 and results["passed"] is True and results["case"] == "tiny-pass"
    names = [e["name"] for e in results["expectations"]]
    assert names == ["coverage.tensors_min", "coverage.elements_min", "accuracy.after_min", "finite"]
    assert all(e["passed"] for e in results["expectations"])
    assert results["metrics"]["coverage"] == {"tensors": 1.0, "elements": 1.0}
    acc = results["per_seed"][0]["accuracy"]
    assert acc["source"] == acc["before"]  # an exact transplant into the same architecture changes nothing
    assert results["per_seed"][0]["data"] == {
        "name": "digits",
        "train": 320,
        "test": 80,
        "classes": 10,
        "preprocess": "zoo ([-1, 1])",
    }
    assert results["per_seed"][0]["finetune"]["steps_done"] == 5
    assert (passing.report / "tiny-pass" / "report.html").is_file()


def test_run_exits_1_and_names_the_failed_expectation(failing):
    assert failing.rc == 1, failing.out + failing.err
    assert failing.err == ""
    lines = failing.out.splitlines()
    assert lines[0].startswith("FAIL tiny-fail: 3/4 expectations held")
    failed = [ln.strip() for ln in lines[1:] if ln.startswith("    ")]
    assert len(failed) == 1
    assert failed[0].startswith("accuracy.after_min: observed ") and "< after_min 0.999" in failed[0]
    results = failing.results
    assert results["passed"] is False
    after = next(e for e in results["expectations"] if e["name"] == "accuracy.after_min")
    assert after["passed"] is False and after["threshold"] == 0.999 and after["observed"] < 0.999


def test_same_case_twice_gives_identical_results(passing, tmp_path, module_cache):
    again = _run_cli(tmp_path, "tiny-pass", case_text=passing.case.read_text())
    assert again.rc == 0
    first, second = passing.results, again.results
    assert first["metrics"] == second["metrics"]
    for a, b in zip(first["per_seed"], second["per_seed"]):
        assert a["accuracy"] == b["accuracy"]
        strip = lambda run: {k: v for k, v in run.items() if k not in ("seconds", "samples_per_second")}  # noqa: E731
        assert strip(a["finetune"]) == strip(b["finetune"])
    assert [(e["name"], e["observed"]) for e in first["expectations"]] == [
        (e["name"], e["observed"]) for e in second["expectations"]
    ]


def test_thresholds_do_not_change_the_numbers(passing, failing):
    """The failing case differs only in a threshold: every measured figure is the same."""
    assert passing.results["metrics"] == failing.results["metrics"]


def test_huge_learning_rate_fails_finite_and_writes_results(tmp_path, module_cache):
    run = _run_cli(tmp_path, "tiny-huge", lr="1.0e+8")
    assert run.rc == 1, run.out + run.err
    assert run.err == ""
    assert "finite: observed 0" in run.out
    results = run.results
    finite = next(e for e in results["expectations"] if e["name"] == "finite")
    assert finite["passed"] is False
    seed = results["per_seed"][0]
    assert seed["finite"] is False and seed["finetune"]["finite"] is False
    step = seed["finetune"]["nonfinite_step"]
    assert isinstance(step, int) and 0 <= step < 5
    assert finite["details"]["nonfinite_seeds"] == [0]
    assert (run.report / "tiny-huge" / "report.html").is_file()


def test_run_with_bad_model_at_build_time_exits_2(tmp_path, module_cache, capsys):
    """A factory ref that passes the schema but cannot be imported: exit 2, one line, no results written."""
    case = tmp_path / "bad.yaml"
    case.write_text(
        CASE.format(name="bad", lr="0.01", after_min="0.0").replace(
            'source: {model: "torchvision:resnet18", num_classes: 10}', 'source: {model: "nosuchpkg.nets:net"}'
        )
    )
    rc = cli.main(["run", str(case), "--report", str(tmp_path / "reports"), "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "nosuchpkg.nets:net" in err and "cannot import" in err
    assert not list((tmp_path / "reports").glob("*/results.json"))


# --------------------------------------------------------------------------- inspect and zoo


def test_skip_slow_leaves_out_the_cases_marked_slow(tmp_path, module_cache):
    (tmp_path / "quick.yaml").write_text(CASE.format(name="tiny-quick", lr="0.01", after_min="0.0"))
    slow = CASE.format(name="tiny-slow", lr="0.01", after_min="0.0").replace("seed: 0\n", "seed: 0\nmarkers: [slow]\n")
    (tmp_path / "slow.yaml").write_text(slow)
    rc, out, err = run_cli("run", tmp_path, "--report", tmp_path / "reports", "--quiet", "--skip-slow")
    assert rc == 0, out + err
    assert "left out 1 case(s) marked slow (--skip-slow): tiny-slow" in out
    assert sorted(p.name for p in (tmp_path / "reports").iterdir() if p.is_dir()) == ["tiny-quick"]

    (tmp_path / "quick.yaml").unlink()
    rc, out, err = run_cli("run", tmp_path, "--report", tmp_path / "other", "--quiet", "--skip-slow")
    assert rc == 2 and "every case in" in err and "--skip-slow leaves them out" in err, out + err
    assert not (tmp_path / "other").exists()


def test_inspect_lists_modules_and_shapes(capsys):
    assert cli.main(["inspect", "torchvision:resnet18"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(ln.split()[0] == "layer4" for ln in lines if ln.strip())
    conv1 = next(ln for ln in lines if ln.startswith("conv1 "))
    assert "Conv2d" in conv1 and "weight=[64, 3, 7, 7]" in conv1
    assert any(ln.startswith("layer4.1.conv2 ") and "weight=[512, 512, 3, 3]" in ln for ln in lines)
    assert any(ln.startswith("fc ") and "weight=[1000, 512]" in ln and "bias=[1000]" in ln for ln in lines)


def test_inspect_with_classes(capsys):
    assert cli.main(["inspect", "torchvision:resnet18", "--num-classes", "7"]) == 0
    assert "weight=[7, 512]" in capsys.readouterr().out


def test_inspect_unknown_model_exits_2(capsys):
    assert cli.main(["inspect", "torchvision:resnet19"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "resnet19" in err and "did you mean resnet18" in err


def test_zoo_list_prints_every_model(isolated_cache, capsys):
    assert cli.main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    for name, recipe in zoo.ZOO.items():
        row = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        assert recipe.dataset in row and row.rstrip().endswith("no")
    assert str(isolated_cache) in out


def test_zoo_build_then_list(isolated_cache, monkeypatch, capsys):
    monkeypatch.setitem(zoo.ZOO, "mnist-stem", dataclasses.replace(zoo.ZOO["mnist-stem"], steps=3))
    assert cli.main(["zoo", "build", "mnist-stem"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mnist-stem: test accuracy 0.") and str(isolated_cache) in out
    assert cli.main(["zoo", "list"]) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("mnist-stem "))
    assert row.rstrip().endswith("yes") and " 0." in row


def test_zoo_build_unknown_name_exits_2(isolated_cache, capsys):
    assert cli.main(["zoo", "build", "mnist-resnet19"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mnist-resnet19" in err
