"""The trust model of case files: which factory references are refused, when, and what is imported.

A case file is code (``package.module:factory`` imports and calls), but a reference may not reach
the standard library, ``builtins`` or private names (refused before any import), nor anything that
is not a class or function defined in the module it names (checked without calling anything).
Seeds are non-negative integers. Every refusal is one line, ``FILE:LINE: field: …``, and exit 2.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch import nn

from surgery import cli
from surgery.case import ModelSpec, parse_case
from surgery.errors import SurgeryInputError
from surgery.running.builder import build_model
from surgery.models.model_refs import resolve_factory, validate_model_ref
from surgery.models.checkpoints import build_architecture

from cli_runs import CaseRun, run_case_file  # the in-process CLI harness of tests/

pytestmark = pytest.mark.usefixtures("isolated_cache")

# A tiny case; line 5 holds the source model, line 2 the seed.
CASE = """\
name: safety
seed: {seed}
device: cpu
data: {{train: {{name: digits, limit: 120}}, image_size: 16, channels: 1, probe_size: 8}}
source: {{model: "{model}"}}
surgery: {{op: activation_swap, from: [ReLU], to: SiLU}}
finetune: {{steps: 2, batch_size: 16, eval_every: 2}}
expect: {{finite: true}}
"""
MODEL_LINE, SEED_LINE = 5, 2


class SafetyNet(nn.Module):
    """A legitimate factory: a class defined in this module, a tiny CNN with a ReLU."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
        )
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def safety_net(num_classes: int = 10, in_chans: int = 1) -> SafetyNet:
    """A legitimate factory function defined in this module."""
    return SafetyNet(num_classes, in_chans)


def not_a_module(num_classes: int = 10) -> dict[str, int]:
    """A factory defined in this module that returns no nn.Module."""
    return {"num_classes": num_classes}


def _ref(factory: object) -> str:
    """``module:name`` of a factory of this test module, whatever name pytest imported it under."""
    return f"{factory.__module__}:{factory.__name__}"


def _run(tmp_path: Path, *, model: str = "surgery.train.zoo:stem_trainer", seed: str = "0") -> CaseRun:
    """``surgery run CASE --report DIR --quiet`` in-process on ``CASE`` with this model and seed."""
    case = tmp_path / "safety.yaml"
    case.write_text(CASE.format(model=model, seed=seed))
    return run_case_file(case, tmp_path / "reports")


def _assert_bad_input(run: CaseRun, line: int, field: str) -> str:
    """Exit 2, one stderr line ``surgery: error: CASE:LINE: FIELD: …``, nothing written; returns the message."""
    assert run.rc == 2, run.out + run.err
    assert run.out == "" and run.err.count("\n") == 1, run.err
    prefix = f"surgery: error: {run.case}:{line}: {field}: "
    assert run.err.startswith(prefix), run.err
    assert not run.report.exists() or not any(run.report.iterdir())
    return run.err[len(prefix) :].strip()


# --------------------------------------------------------------------------- refused references


@pytest.mark.parametrize(
    "ref, module",
    [
        ("os:system", "os"),
        ("builtins:exec", "builtins"),
        ("subprocess:run", "subprocess"),
        ("os.path:join", "os"),
        ("importlib:import_module", "importlib"),
        ("pickle:loads", "pickle"),
    ],
)
def test_standard_library_refs_exit_2_at_parse_time(tmp_path: Path, ref: str, module: str):
    message = _assert_bad_input(_run(tmp_path, model=ref), MODEL_LINE, "source.model")
    assert ref in message and f"{module!r} is a module of the standard library" in message


@pytest.mark.parametrize("ref", ["os:system", "builtins:exec", "subprocess:run"])
def test_standard_library_refs_are_refused_without_an_import(tmp_path: Path, ref: str):
    """In a fresh interpreter the module is dropped from sys.modules first: parsing must not bring it back.

    ``surgery.models.checkpoints`` (which does the check) is imported before, as the loader would import it anyway.
    """
    module = ref.partition(":")[0]
    case = tmp_path / "case.yaml"
    case.write_text(CASE.format(model=ref, seed=0))
    script = textwrap.dedent(f"""
        import sys
        import surgery.models.checkpoints
        from surgery.case import load_case
        from surgery.errors import SurgeryInputError
        sys.modules.pop({module!r})
        try:
            load_case({str(case)!r})
        except SurgeryInputError as exc:
            print(exc)
        print({module!r} in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    error, imported = done.stdout.splitlines()
    assert error.startswith(f"{case}:{MODEL_LINE}: source.model: model {ref!r}: ")
    assert imported == "False"


def test_a_stdlib_module_never_imported_stays_unimported(tmp_path: Path):
    """``this`` prints the Zen of Python when imported: the refusal comes first, so nothing is printed."""
    case = tmp_path / "case.yaml"
    case.write_text(CASE.format(model="this:s", seed=0))
    script = (
        f"import sys\nfrom surgery.case import load_case\n"
        f"try:\n    load_case({str(case)!r})\nexcept Exception as exc:\n    sys.stderr.write(str(exc))\n"
        f"sys.stderr.write(' imported=' + str('this' in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout == ""
    assert "'this' is a module of the standard library" in done.stderr and done.stderr.endswith("imported=False")


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A fresh importable package whose every import, lazy lookup or call leaves a marker file.

    Its ``__init__`` defines ``net`` (a legitimate factory) and ``maker`` (a callable instance); its
    ``lazy`` module answers any missing name through a module ``__getattr__``; ``_impl`` is private.
    """
    name = f"pkg_{uuid.uuid4().hex[:12]}"
    root = tmp_path / "site" / name
    root.mkdir(parents=True)
    marks = tmp_path / "marks"
    marks.mkdir()
    mark = f"import pathlib\ndef _mark(what):\n    (pathlib.Path({str(marks)!r}) / what).touch()\n"
    (root / "__init__.py").write_text(
        mark
        + textwrap.dedent("""
        _mark("imported")
        import torch.nn as nn

        def net(num_classes=10, in_chans=3):
            return nn.Conv2d(in_chans, num_classes, 1)

        class Maker:
            def __call__(self, **kwargs):
                _mark("called")
                return nn.Identity()

        maker = Maker()
    """)
    )
    (root / "lazy.py").write_text(
        mark + "def __getattr__(name):\n    _mark('getattr')\n    raise AttributeError(name)\n"
    )
    (root / "_impl.py").write_text(mark + "_mark('private imported')\ndef net():\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield name, marks
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]


@pytest.mark.parametrize(
    "template, what",
    [
        ("{pkg}._impl:net", "'_impl' is a private name"),
        ("{pkg}:_net", "'_net' is a private name"),
        ("{pkg}.lazy:_anything", "'_anything' is a private name"),
    ],
)
def test_private_names_are_refused_before_any_import(package, template: str, what: str):
    name, marks = package
    ref = template.format(pkg=name)
    with pytest.raises(ValueError, match=re.escape(what)):
        validate_model_ref(ref)
    assert name not in sys.modules and not list(marks.iterdir())


def test_private_names_in_a_case_file(tmp_path: Path):
    message = _assert_bad_input(_run(tmp_path, model="surgery.train.zoo:_recipe"), MODEL_LINE, "source.model")
    assert "'_recipe' is a private name" in message


def test_a_callable_instance_is_refused_without_calling_it(package):
    name, marks = package
    validate_model_ref(f"{name}:maker")  # parsing a case imports nothing
    assert not list(marks.iterdir())
    with pytest.raises(ValueError, match="maker is a Maker, expected a factory"):
        resolve_factory(f"{name}:maker")
    assert [p.name for p in marks.iterdir()] == ["imported"]  # imported to look, never called


def test_a_missing_name_does_not_run_the_module_getattr(package):
    name, marks = package
    with pytest.raises(ValueError, match="cannot import 'net' from .*: no such name"):
        resolve_factory(f"{name}.lazy:net")
    assert "getattr" not in {p.name for p in marks.iterdir()}


@pytest.mark.parametrize(
    "ref, fragment",
    [
        (
            "surgery.models.checkpoints:Path",
            "Path is defined in 'pathlib', not in 'surgery.models.checkpoints'",
        ),  # a re-exported class
        (
            "surgery.models.model_names:lru_cache",
            "lru_cache is defined in 'functools', not in 'surgery.models.model_names'",
        ),
        ("surgery.train.zoo:ZOO", "ZOO is a dict, expected a factory"),
        ("surgery.models.checkpoints:PREFIXES", "PREFIXES is a tuple, expected a factory"),
        ("surgery.train.zoo:no_such_factory", "cannot import 'no_such_factory' from 'surgery.train.zoo'"),
        ("nosuchpkg.models:net", "cannot import 'nosuchpkg.models' (ModuleNotFoundError"),
    ],
)
def test_what_is_not_a_factory_defined_in_its_module(tmp_path: Path, ref: str, fragment: str):
    validate_model_ref(ref)  # the syntax and the trust rules hold: only importing the module tells
    with pytest.raises(ValueError, match=re.escape(fragment)):
        resolve_factory(ref)
    with pytest.raises(SurgeryInputError, match=re.escape(fragment)):
        build_architecture(ref)
    message = _assert_bad_input(_run(tmp_path, model=ref), MODEL_LINE, "source.model")
    assert ref in message and fragment in message


def test_refusal_names_the_line_of_a_nested_model(tmp_path: Path):
    case = tmp_path / "graft.yaml"
    case.write_text(
        CASE.format(model="surgery.train.zoo:stem_trainer", seed=0).replace(
            "surgery: {op: activation_swap, from: [ReLU], to: SiLU}",
            'surgery:\n  op: graft\n  path: conv1\n  donor: {model: "subprocess:Popen"}',
        )
    )
    with pytest.raises(SurgeryInputError) as info:
        parse_case(case.read_text(), str(case))
    assert str(info.value).startswith(f"{case}:9: surgery.donor.model: model 'subprocess:Popen': ")


def test_inspect_refuses_the_same_refs(capsys: pytest.CaptureFixture[str]):
    assert cli.main(["inspect", "builtins:exec"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "'builtins' is a module of the standard library" in err


# --------------------------------------------------------------------------- what the factory returns


def test_a_factory_returning_no_module_is_one_line_naming_the_case_line(tmp_path: Path):
    ref = _ref(not_a_module)
    message = _assert_bad_input(_run(tmp_path, model=ref), MODEL_LINE, "source.model")
    assert message == f"model {ref!r}: the factory returned a value of type dict, expected an nn.Module"


# --------------------------------------------------------------------------- legitimate factories


@pytest.mark.parametrize("factory", [safety_net, SafetyNet])
def test_a_factory_defined_in_its_module_still_builds(factory):
    model = build_model(ModelSpec(model=_ref(factory), num_classes=3), in_chans=1)
    assert isinstance(model, SafetyNet) and model(torch.zeros(2, 1, 16, 16)).shape == (2, 3)


@pytest.mark.parametrize(
    "ref",
    [
        "surgery.train.zoo:stem_trainer",
        "surgery.train.zoo:StemTrainer",
        "surgery.train.zoo:make_stem",
        "torch.nn:Identity",
    ],
)  # re-exported by its own package: accepted
def test_public_factories_of_their_package_are_accepted(ref: str):
    validate_model_ref(ref)
    assert isinstance(build_architecture(ref, num_classes=4, in_chans=1), nn.Module)


def test_a_case_with_a_local_factory_runs(tmp_path: Path):
    run = _run(tmp_path, model=_ref(safety_net))
    assert run.rc == 0, run.out + run.err
    assert run.out.startswith("PASS safety: ") and (run.report / "safety" / "results.json").is_file()


# --------------------------------------------------------------------------- seeds


@pytest.mark.parametrize(
    "seed, field, fragment",
    [
        ("-3", "seed", "greater than or equal to 0 (got -3)"),
        ("[0, 1, -1]", "seed[2]", "greater than or equal to 0 (got -1)"),
        ("true", "seed", "valid integer (got True)"),
        ('"3"', "seed", "valid integer (got '3')"),
        ("1.5", "seed", "valid integer (got 1.5)"),
        ("null", "seed", "valid integer (got None)"),
        ("[]", "seed", "at least 1 item"),
        (str(2**64), "seed", "less than or equal to"),  # beyond what torch.manual_seed takes
    ],
)
def test_bad_seeds_exit_2_at_their_line(tmp_path: Path, seed: str, field: str, fragment: str):
    message = _assert_bad_input(_run(tmp_path, seed=seed), SEED_LINE, field)
    assert fragment in message


@pytest.mark.parametrize("seed, parsed", [("0", [0]), ("7", [7]), ("[3, 0]", [3, 0]), (str(2**63 - 1), [2**63 - 1])])
def test_good_seeds_parse(seed: str, parsed: list[int]):
    assert parse_case(CASE.format(model="surgery.train.zoo:stem_trainer", seed=seed)).seed == parsed
