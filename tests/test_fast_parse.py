"""Parse first, import later (issue 30): a case file's every parse-time error comes without torch.

The registries know each operation's spec without importing the module that applies it, the torchvision and
timm names come from a shipped list, and a factory reference is imported only in a second stage, after every
file of a run has been parsed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Literal

import pytest

from surgery.models import model_names
from surgery.case import check_factories, model_fields, parse_case
from surgery.checks import list_checks
from surgery.errors import SurgeryInputError
from surgery.ops import get_op, list_ops, register_op, register_op_spec
from surgery.ops.activation_spec import ACTIVATION_KINDS, TARGET_KINDS
from surgery.ops import base as ops_base
from surgery.ops.base import Operation
from surgery.ops.transplant_spec import TransplantSpec
from surgery.spec import Strict

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "torchvision", "timm", "pandas", "matplotlib", "scipy")

COMMON = """\
seed: [0, 1]
device: cpu
data: {train: digits, probe: digits, image_size: 16, channels: 1}
source: {model: "zoo:mnist-resnet18", num_classes: 10}
finetune: {steps: 5, batch_size: 16, groups: [{params: "fc.*", lr_scale: 2.0}]}
"""
# One case per operation; together they declare every check and every kind of model reference.
CASES = {
    "transplant": """\
surgery: {op: transplant, target: {model: "torchvision:resnet18", num_classes: 10}, strategy: select}
expect:
  coverage: {tensors_min: 0.5, elements_min: 0.5}
  accuracy: {after_min: 0.5, beats_baseline: {margin: 0.0, model: {model: "timm:resnet18.a1_in1k"}}}
  similarity: {layers: [layer1], cka_min: 0.1}
""",
    "activation_swap": """\
surgery: {op: activation_swap, from: [relu, swish], to: hardswish}
expect:
  activations: {layers: ["layer*"], drift_max: 0.5, dead_max: 0.5}
  bn_recalibration: {gain_min: -1.0}
""",
    "graft": """\
surgery: {op: graft, path: conv1, donor: {model: "surgery.train.zoo:stem_trainer"}, policy: {freeze: true}}
expect: {accuracy: {after_min: 0.1}}
""",
    "bridge": """\
surgery: {op: bridge, nodes: [layer4], head: transformer, distill: {temperature: 2.0}}
expect: {accuracy: {after_min: 0.1, beats_baseline: {model: {model: "torchvision:resnet18"}}}}
""",
}


def _case_text(op: str) -> str:
    return f"name: every-{op}\n{COMMON}{CASES[op]}"


def test_the_cases_here_name_every_operation_and_every_check():
    """Keeps the next test honest: a new op or check must be added to CASES."""
    assert sorted(CASES) == sorted(list_ops())
    declared = {key for op in CASES for key in parse_case(_case_text(op)).expect.model_dump(exclude_none=True)}
    assert set(list_checks()) <= declared


def test_loading_a_case_of_every_op_and_check_imports_no_torch(tmp_path: Path):
    paths = []
    for op in CASES:
        paths.append(tmp_path / f"{op}.yaml")
        paths[-1].write_text(_case_text(op), encoding="utf-8")
    script = textwrap.dedent(f"""
        import sys
        import surgery
        for path in {[str(p) for p in paths]!r}:
            case = surgery.load_case(path)
            print(case.surgery.op)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
        print("heavy:", heavy[:5])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [*CASES, "heavy: []"]


def test_a_run_parses_every_file_before_importing_anything_heavy(tmp_path: Path):
    """``surgery run A B`` with a typo in B, and ``calibrate --show`` the same: one line, exit 2, no torch."""
    good, bad = tmp_path / "a.yaml", tmp_path / "b.yaml"
    good.write_text(_case_text("transplant"), encoding="utf-8")
    bad.write_text(_case_text("graft").replace("policy: {freeze: true}", "policy: {frezee: true}"), encoding="utf-8")
    script = textwrap.dedent(f"""
        import sys
        from surgery import cli
        for command in ("run", "calibrate --show"):
            rc = cli.main([*command.split(), {str(good)!r}, {str(bad)!r}, "--report", {str(tmp_path / "r")!r}]
                          if command == "run" else [*command.split(), {str(good)!r}, {str(bad)!r}])
            print(command, rc)
        print("heavy:", sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})[:5])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.stdout.splitlines() == ["run 2", "calibrate --show 2", "heavy: []"], done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and all(
        line.startswith(f"surgery: error: {bad}:7: surgery.policy.frezee: unknown key") for line in lines
    ), done.stderr
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- the second stage: factories


def test_factories_are_checked_after_parsing_at_their_line():
    text = _case_text("graft").replace("surgery.train.zoo:stem_trainer", "surgery.train.zoo:ZOO")
    case = parse_case(text, "g.yaml")  # the syntax and the trust rules hold: parsing imports nothing
    assert [field for field, _ in model_fields(case)] == ["source", "surgery.donor"]
    with pytest.raises(SurgeryInputError) as info:
        check_factories(case)
    assert str(info.value) == (
        "g.yaml:7: surgery.donor.model: model 'surgery.train.zoo:ZOO': ZOO is a dict, expected a "
        "factory (a class or function defined in surgery.train.zoo)"
    )


def test_trust_rules_still_refuse_at_parse_time():
    with pytest.raises(
        SurgeryInputError,
        match=r"^g.yaml:7: surgery.donor.model: model 'os:system': 'os' is a "
        r"module of the standard library",
    ):
        parse_case(_case_text("graft").replace("surgery.train.zoo:stem_trainer", "os:system"), "g.yaml")


def test_every_model_field_is_found_nested_and_in_file_order():
    case = parse_case(_case_text("transplant"))
    assert [field for field, _ in model_fields(case)] == [
        "source",
        "surgery.target",
        "expect.accuracy.beats_baseline.model",
    ]


# --------------------------------------------------------------------------- the registries


def test_an_operation_is_applied_by_the_module_its_spec_names():
    code = (
        "import sys; from surgery.ops import get_op, list_ops; "
        "assert not any(f'surgery.ops.{m}' in sys.modules for m in ('transplant', 'activation', 'graft', "
        "'bridge')); op = get_op('graft'); print(type(op).__module__, op.spec.__module__, 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.stdout.split() == ["surgery.ops.graft", "surgery.ops.graft_spec", "True"], done.stderr


def test_a_spec_registers_once_and_an_operation_must_use_its_spec(monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(ValueError, match="'transplant' is registered already"):
        register_op_spec(applied_in="elsewhere")(type("TransplantAgain", (TransplantSpec,), {}))
    monkeypatch.setattr(ops_base, "SPECS", dict(ops_base.SPECS))  # the registries as they were, afterwards
    monkeypatch.setattr(ops_base, "APPLIED_IN", dict(ops_base.APPLIED_IN))
    monkeypatch.setattr(ops_base, "OPS", dict(ops_base.OPS))

    @register_op_spec(applied_in=__name__)
    class MirrorSpec(Strict):
        op: Literal["mirror"]

    class OtherMirrorSpec(Strict):
        op: Literal["mirror"]

    class Mirror(Operation):
        name = "mirror"
        spec = OtherMirrorSpec

    with pytest.raises(TypeError, match="op 'mirror' has the spec .*MirrorSpec, not .*OtherMirrorSpec"):
        register_op(Mirror)
    Mirror.spec = MirrorSpec
    register_op(Mirror)
    assert get_op("mirror").spec is MirrorSpec and ops_base.list_ops()[-1] == "mirror"


def test_an_operation_spec_names_its_op():
    class NoOp(Strict):
        x: int = 0

    with pytest.raises(TypeError, match="op: Literal"):
        register_op_spec(applied_in="nowhere")(NoOp)


def test_activation_names_of_the_spec_are_the_classes_of_the_swap():
    from surgery.ops.activation import TARGETS, kind_of

    assert tuple(TARGETS) == TARGET_KINDS
    assert all(kind_of(make()) in ACTIVATION_KINDS for make in TARGETS.values())


# --------------------------------------------------------------------------- torchvision and timm names


def test_shipped_model_names_are_those_of_the_installed_libraries():
    shipped = json.loads(model_names.NAMES_FILE.read_text(encoding="utf-8"))
    assert shipped == model_names.generate(), "stale: run `python -m surgery.models.model_names` and commit the file"


def test_a_list_of_another_version_is_not_trusted(monkeypatch: pytest.MonkeyPatch):
    model_names.known_names.cache_clear()
    monkeypatch.setattr(model_names, "installed_version", lambda library: "0.0.0-not-shipped")
    monkeypatch.setattr(model_names, "listed_names", lambda library: ["asked_the_library"])
    try:
        assert model_names.known_names("timm") == {"asked_the_library"}
    finally:
        model_names.known_names.cache_clear()
