"""Case files: every error names the file, the line, the field and what was expected; the CLI exits 2.

The base case (``BASE_CASE`` in conftest.py) has fixed line numbers:

     1 name        4 data       6 surgery:     10 finetune:     13   optimizer:     16 expect:
     2 seed        5 source     7   op          11   steps        14     name
     3 device                   8   target      12   batch_size   15     lr
                                9   strategy
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from surgery import cli
from surgery.case import Case, load_case, parse_case
from surgery.errors import SurgeryInputError

FILE = "bad.yaml"


def _error(text: str, filename: str = FILE) -> str:
    with pytest.raises(SurgeryInputError) as info:
        parse_case(text, filename)
    message = str(info.value)
    assert "\n" not in message
    return message


def _replace(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def _assert_located(message: str, line: int, field: str, *expected: str, filename: str = FILE) -> None:
    """``file:line: field: ...`` with each ``expected`` fragment somewhere in the message."""
    assert message.startswith(f"{filename}:{line}: {field}:"), message
    for fragment in expected:
        assert fragment in message, (fragment, message)


def _cli_run(path: Path, capsys) -> tuple[int, str, str]:
    rc = cli.main(["run", str(path), "--quiet"])
    out, err = capsys.readouterr()
    return rc, out, err


# --------------------------------------------------------------------------- the valid case


def test_base_case_is_valid(base_case):
    case = parse_case(base_case, "ok.yaml")
    assert isinstance(case, Case)
    assert case.seed == [0] and case.path == "ok.yaml"
    assert case.surgery.op == "transplant" and case.surgery.strategy == "exact"
    assert case.finetune.optimizer.name == "sgd" and case.finetune.steps == 5
    assert len(case.file_hash) == 16


def test_load_case_reads_file_and_records_path(tmp_path, base_case):
    path = tmp_path / "ok.yaml"
    path.write_text(base_case)
    case = load_case(path)
    assert case.path == str(path) and case.name == "unit-case"


def test_load_case_missing_file(tmp_path):
    with pytest.raises(SurgeryInputError, match="nope.yaml: cannot read case file"):
        load_case(tmp_path / "nope.yaml")


@pytest.mark.parametrize("seed, expected", [("0", [0]), ("7", [7]), ("[0, 1, 2]", [0, 1, 2]), ("[3]", [3])])
def test_seed_int_or_list(base_case, seed, expected):
    assert parse_case(_replace(base_case, "seed: 0", f"seed: {seed}")).seed == expected


@pytest.mark.parametrize("seed", ["true", "[]", "zero", "[0, one]"])
def test_bad_seed(base_case, seed):
    message = _error(_replace(base_case, "seed: 0", f"seed: {seed}"))
    assert message.startswith(f"{FILE}:2: seed"), message


def test_repository_cases_are_valid():
    cases = sorted((Path(__file__).resolve().parent.parent / "cases").rglob("*.yaml"))
    for path in cases:
        assert isinstance(load_case(path), Case)


# --------------------------------------------------------------------------- each kind of error

ERRORS = {
    # id: (old, new, line, field, fragments of what was expected)
    "yaml-syntax": ("strategy: exact", "strategy: [exact", 10, "YAML syntax error", ("expected",)),
    "yaml-bad-indent": ("  steps: 5", "  steps: 5\n bad: 1", 12, "YAML syntax error", ()),
    "unknown-key-top": (
        "device: cpu",
        "device: cpu\ncolour: red",
        4,
        "colour",
        ("unknown key 'colour'", "expected one of", "finetune"),
    ),
    "unknown-key-nested": (
        "    lr: 0.01",
        "    lr: 0.01\n    lrate: 0.1",
        16,
        "finetune.optimizer.lrate",
        ("unknown key 'lrate'", "expected one of", "lr", "momentum"),
    ),
    "unknown-key-in-flow": (
        "target: {model:",
        "target: {colour: 1, model:",
        8,
        "surgery.target.colour",
        ("unknown key 'colour'", "num_classes"),
    ),
    "wrong-type": ("steps: 5", "steps: many", 11, "finetune.steps", ("valid integer", "'many'")),
    "wrong-type-float": ("lr: 0.01", "lr: fast", 15, "finetune.optimizer.lr", ("valid number", "'fast'")),
    "out-of-range": ("batch_size: 16", "batch_size: 0", 12, "finetune.batch_size", ("greater than or equal to 2",)),
    "unknown-op": (
        "op: transplant",
        "op: transplnt",
        7,
        "surgery.op",
        ("'transplnt'", "transplant", "activation_swap", "graft", "bridge"),
    ),
    "missing-op": ("  op: transplant\n", "", 6, "surgery.op", ("missing", "transplant", "bridge")),
    "unknown-strategy": (
        "strategy: exact",
        "strategy: exakt",
        9,
        "surgery.strategy",
        ("'exakt'", "'exact'", "'order'", "'select'"),
    ),
    "unknown-optimizer": ("name: sgd", "name: adam", 14, "finetune.optimizer.name", ("'adam'", "'adamw'")),
    "unknown-torchvision": (
        'target: {model: "torchvision:resnet18"',
        'target: {model: "torchvision:resnet19"',
        8,
        "surgery.target.model",
        ("unknown torchvision model 'resnet19'", "did you mean", "resnet18"),
    ),
    "unknown-timm": (
        'source: {model: "torchvision:resnet18"',
        'source: {model: "timm:resnet19d"',
        5,
        "source.model",
        ("unknown timm model 'resnet19d'", "did you mean", "resnet18d"),
    ),
    "unknown-zoo": (
        'source: {model: "torchvision:resnet18"',
        'source: {model: "zoo:mnist-resnet19"',
        5,
        "source.model",
        ("unknown zoo model 'mnist-resnet19'", "did you mean mnist-resnet18", "expected one of", "mnist-stem"),
    ),
    "bad-model-ref": (
        'source: {model: "torchvision:resnet18"',
        'source: {model: "resnet18"',
        5,
        "source.model",
        ("torchvision:NAME", "timm:NAME", "zoo:NAME", "package.module:factory"),
    ),
    "unknown-dataset": (
        "train: digits",
        "train: digitz",
        4,
        "data.train",
        ("'digitz'", "'mnist5k'", "'digits'", "'shapes'", "'imagefolder'"),
    ),
    "unknown-dataset-block": (
        "data: {train: digits, image_size: 32}",
        "data:\n  image_size: 32\n  train:\n    limit: 10\n    name: cifar",
        8,
        "data.train.name",
        ("'cifar'", "'mnist5k'"),
    ),
    "missing-source": (
        'source: {model: "torchvision:resnet18", num_classes: 10}\n',
        "",
        1,
        "source",
        ("missing required field",),
    ),
    "missing-nested": (
        'target: {model: "torchvision:resnet18", num_classes: 10}',
        "target: {num_classes: 10}",
        8,
        "surgery.target.model",
        ("missing required field",),
    ),
    "duplicate-key": ("device: cpu", "device: cpu\nseed: 1", 4, "seed", ("duplicate key", "once")),
    "duplicate-key-nested": (
        "  batch_size: 16",
        "  batch_size: 16\n  steps: 6",
        13,
        "finetune.steps",
        ("duplicate key",),
    ),
    "imagefolder-without-root": (
        "train: digits",
        "train: imagefolder",
        4,
        "data.train",
        ("imagefolder needs 'root'", "one folder per class"),
    ),
    "bad-device": ("device: cpu", "device: tpu", 3, "device", ("'tpu'", "pattern")),
    "python-tag": (
        "device: cpu",
        "device: !!python/object/apply:os.system ['touch pwned']",
        3,
        "device",
        ("could not determine a constructor",),
    ),
    "non-string-key": ("device: cpu", "device: cpu\n1.5: one", 4, "<top>", ("not a string", "field name")),
    "integer-key": ("device: cpu", "device: cpu\n1: one", 4, "1", ("unknown key 1", "expected one of")),
    "internal-field": ("device: cpu", "device: cpu\npath: /etc", 4, "path", ("unknown key 'path'",)),
}


@pytest.mark.parametrize("kind", list(ERRORS))
def test_error_names_file_line_field_and_expectation(base_case, kind):
    old, new, line, field, fragments = ERRORS[kind]
    _assert_located(_error(_replace(base_case, old, new)), line, field, *fragments)


@pytest.mark.parametrize(
    "payload",
    [
        "!!python/object/apply:os.system ['touch {p}']",
        "!!python/object/apply:os.system\n  - touch {p}",
        "{{!!python/name:os.system x: 1}}",
        "!!python/object/new:os.system ['touch {p}']",
    ],
)
def test_python_tags_never_run(base_case, tmp_path, monkeypatch, payload):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    text = _replace(base_case, "device: cpu", "device: " + payload.format(p=marker))
    message = _error(text)
    assert message.startswith(f"{FILE}:3: device") and "constructor for the tag" in message
    assert not marker.exists()


@pytest.mark.parametrize(
    "kind",
    [
        "yaml-syntax",
        "unknown-key-nested",
        "wrong-type",
        "unknown-op",
        "unknown-strategy",
        "unknown-torchvision",
        "unknown-dataset",
        "missing-source",
        "duplicate-key",
        "imagefolder-without-root",
    ],
)
def test_cli_run_bad_case_exits_2_with_one_line(tmp_path, base_case, capsys, kind):
    old, new, line, field, fragments = ERRORS[kind]
    path = tmp_path / "bad.yaml"
    path.write_text(_replace(base_case, old, new))
    rc, out, err = _cli_run(path, capsys)
    assert rc == 2
    assert out == ""
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    assert f"{path}:{line}: {field}:" in lines[0]
    for fragment in fragments:
        assert fragment in lines[0]


def test_cli_validates_every_file_before_running_any(tmp_path, base_case, capsys):
    """A suite with one bad file runs nothing: exit 2, one line naming the bad file, no report written."""
    (tmp_path / "a-good.yaml").write_text(base_case)
    (tmp_path / "b-bad.yaml").write_text(_replace(base_case, "steps: 5", "steps: many"))
    rc = cli.main(["run", str(tmp_path), "--report", str(tmp_path / "reports"), "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "b-bad.yaml:11: finetune.steps" in err
    assert not (tmp_path / "reports").exists()


def test_cli_subprocess_unknown_key(tmp_path, base_case):
    """The installed console entry point, in a fresh process: exit 2, exactly one line on stderr."""
    path = tmp_path / "bad.yaml"
    path.write_text(_replace(base_case, "    lr: 0.01", "    lr: 0.01\n    lrate: 0.1"))
    proc = subprocess.run(
        [sys.executable, "-m", "surgery.cli", "run", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SURGERY_CACHE": str(tmp_path / "cache")},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"{path}:16: finetune.optimizer.lrate: unknown key 'lrate'" in proc.stderr


def test_cli_missing_case_file(tmp_path, capsys):
    rc = cli.main(["run", str(tmp_path / "absent.yaml")])
    _, err = capsys.readouterr()
    assert rc == 2 and err.count("\n") == 1 and "absent.yaml" in err


# --------------------------------------------------------------------------- YAML safety and oddities


def test_yaml_merge_keys_work_like_safe_load(base_case):
    text = _replace(base_case, "finetune:\n  steps: 5\n", "finetune:\n  <<: {steps: 9, eval_every: 3}\n  steps: 5\n")
    case = parse_case(text)
    assert case.finetune.steps == 5 and case.finetune.eval_every == 3


def test_recursive_alias_is_an_error(base_case):
    message = _error(_replace(base_case, "seed: 0", "seed: &s [*s]"))
    assert message.startswith(f"{FILE}:2: seed") and "recursive" in message


def test_alias_bomb_is_refused_quickly(base_case):
    bomb = "lol0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"lol{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9)
    )
    message = _error(bomb + base_case)
    assert "more than" in message and "nodes" in message


def test_deeply_nested_yaml_is_an_error():
    message = _error("name: " + "[" * 5000 + "]" * 5000)
    assert message.startswith(f"{FILE}:1:")


@pytest.mark.parametrize("text", ["", "just a string", "- a\n- b\n", "42"])
def test_non_mapping_document(text):
    message = _error(text)
    assert message.startswith(f"{FILE}:1: <top>:") and "mapping" in message


# --------------------------------------------------------------------------- fuzzing

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "transplant",
            "exact",
            "digits",
            "torchvision:resnet18",
            "zoo:mnist-stem",
            "timm:resnet18",
            "sgd",
            "cuda",
            "auto",
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6,
)


def _paths(node, prefix=()):
    """Every (path) to a mapping entry or list item in a parsed document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield prefix + (key,)
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield prefix + (i,)
            yield from _paths(value, prefix + (i,))


def _mutate(doc, path, action, value, new_key):
    value = copy.deepcopy(value)  # the same object twice would make a cycle
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if action == "drop":
        del parent[last]
    elif action == "replace":
        parent[last] = value
    elif action == "rename" and isinstance(parent, dict):
        parent[new_key] = parent.pop(last)
    elif action == "insert" and isinstance(parent, dict):
        parent[new_key] = value
    return doc


def _check_parse(text: str) -> None:
    try:
        case = parse_case(text, "fuzz.yaml")
    except SurgeryInputError as exc:
        message = str(exc)
        assert "\n" not in message and message.strip() == message and message
        assert re.match(r"^fuzz\.yaml:\d+: ", message), message
    else:
        assert isinstance(case, Case)


FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


@FUZZ
@given(
    data=st.data(),
    action=st.sampled_from(["drop", "replace", "rename", "insert"]),
    value=values,
    new_key=st.text(max_size=10),
    rounds=st.integers(1, 3),
)
def test_fuzz_mutated_documents(base_case, data, action, value, new_key, rounds):
    doc = yaml.safe_load(base_case)
    for _ in range(rounds):
        paths = list(_paths(doc))
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        doc = _mutate(doc, path, action, value, new_key)
    _check_parse(yaml.safe_dump(doc, allow_unicode=True, default_flow_style=data.draw(st.booleans())))


@FUZZ
@given(data=st.data(), junk=st.text(max_size=40))
def test_fuzz_line_edits(base_case, data, junk):
    lines = base_case.splitlines()
    i = data.draw(st.integers(0, len(lines) - 1))
    edit = data.draw(st.sampled_from(["delete", "insert", "replace", "append", "swap", "indent"]))
    if edit == "delete":
        del lines[i]
    elif edit == "insert":
        lines.insert(i, junk)
    elif edit == "replace":
        lines[i] = junk
    elif edit == "append":
        lines[i] += junk
    elif edit == "swap":
        j = data.draw(st.integers(0, len(lines) - 1))
        lines[i], lines[j] = lines[j], lines[i]
    else:
        lines[i] = " " * data.draw(st.integers(1, 4)) + lines[i]
    _check_parse("\n".join(lines) + "\n")


@FUZZ
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_fuzz_random_text(text):
    _check_parse(text)


@FUZZ
@given(
    text=st.lists(
        st.sampled_from(
            [
                "name: x",
                "seed: [0",
                "&a",
                "*a",
                "<<: *a",
                "- ",
                "? ",
                ": ",
                "{",
                "}",
                "[",
                "]",
                "!!python/name:os.system",
                "!!binary",
                "'",
                '"',
                "#",
                "|",
                ">",
                "---",
                "...",
                "%YAML 1.1",
                "\n",
                "\n  ",
                "\t",
                "data:",
                "op: graft",
            ]
        ),
        max_size=30,
    ).map("".join)
)
def test_fuzz_yaml_tokens(text):
    _check_parse(text)


def test_the_readme_field_by_field_case_parses():
    """The docs' annotated case file (docs/case-file.md) is a valid case, gate section included."""
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "case-file.md").read_text()
    text = page.split("# A case file, field by field")[1].split("```yaml")[1].split("```")[0]
    case = parse_case(text, "docs/case-file.md")
    assert case.surgery.strategy == "select" and case.gate.data == "holdout" and case.data.holdout == 0.2
