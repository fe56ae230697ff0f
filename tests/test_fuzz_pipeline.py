"""The whole pipeline fuzzed: the seed cases with one leaf mutated, run by ``surgery run`` in-process.

Each example takes a case file of ``cases/``, makes it quick (one seed, a few steps, ~100 images,
small probes; zoo models replaced by their untrained architectures so that nothing is trained),
mutates one leaf of its YAML (a type swap, an out-of-range or negative number, an unknown name, an
empty string, a huge list, or a missing field) and runs ``surgery run CASE --report DIR --quiet
--seeds 1``. Whatever the mutation:

- the exit code is 0, 1 or 2: never 3 (an internal error) and never an uncaught exception;
- an exit of 2 comes with exactly one stderr line, which names the case file, and nothing is
  written under ``--report``.

Two forms of the same test, both derandomized: the fast one runs 8 examples in ``make test`` (well
under a minute on two busy cores), the long one (marked ``slow``, run by ``make test-slow`` nightly)
300. ``SURGERY_FUZZ_EXAMPLES=N`` runs N examples in both instead (randomized when
``SURGERY_FUZZ_RANDOM=1``), for a longer hunt. What such a hunt finds is kept as a plain regression
test at the end of this file.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Union

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from surgery.train.zoo import ZOO

from cli_runs import CaseRun, run_case_file  # the in-process CLI harness of tests/

CASES_DIR = Path(__file__).resolve().parents[1] / "cases"
CASES = sorted(CASES_DIR.rglob("*.yaml"))

# --------------------------------------------------------------------------- the hypothesis profile

PROFILE = "surgery-pipeline-fuzz"
FAST_EXAMPLES, LONG_EXAMPLES = (int(os.environ.get("SURGERY_FUZZ_EXAMPLES", n)) for n in ("8", "300"))
settings.register_profile(
    PROFILE,
    max_examples=FAST_EXAMPLES,
    derandomize=os.environ.get("SURGERY_FUZZ_RANDOM") != "1",
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)

# --------------------------------------------------------------------------- making a case quick

# Each zoo model is replaced by its architecture, untrained: a zoo model used in a fresh clone would
# be trained first, for minutes. The stem donor's architecture is the zoo's own stem factory.
ZOO_STANDINS = {
    f"zoo:{r.name}": (r.arch if r.kind == "classifier" else "surgery.train.zoo:make_stem") for r in ZOO.values()
}

# How much work a run may do. These fields have no upper bound in the schema on purpose (a long
# fine-tune is slow, not wrong), so a mutation may not make them larger than this, nor drop them
# (their defaults are larger) nor null a ``limit`` (all the data): the fuzz checks how bad input
# is handled, not how long a machine can train.
BUDGET = {
    "steps": 3,
    "batch_size": 32,
    "limit": 100,
    "size": 100,
    "count": 100,
    "image_size": 32,
    "probe_size": 16,
    "batches": 2,
    "hidden": 128,
    "depth": 2,
    "num_heads": 8,
    "num_classes": 64,
    "in_chans": 8,
    "warmup_steps": 10,
    "eval_every": 1000,
    "unfreeze_at": 1000,
}

Key = Union[str, int]
Path_ = tuple[Key, ...]


# A threshold placeholder (``calibrate``) waits for ``surgery calibrate --write``; the record it would
# use lies beside the original case, not beside the fuzzed copy. A number every threshold field
# takes ([0, 1], [-1, 1] or >= 0) stands in for it; thresholds written as numbers or as mappings from
# seed count to number are kept as they are.
PLACEHOLDERS = {"calibrate": 0.5}


def quick(doc: dict[str, Any]) -> dict[str, Any]:
    """A copy of a case document that runs in seconds on two cores and trains no zoo model."""
    doc = copy.deepcopy(doc)
    doc = _replace_strings(doc, {**ZOO_STANDINS, **PLACEHOLDERS})
    doc["seed"] = 0
    doc["device"] = "cpu"
    data = doc["data"]
    for key in ("train", "probe"):
        if key in data:
            spec = {"name": data[key]} if isinstance(data[key], str) else data[key]
            data[key] = {**spec, "limit": BUDGET["limit"]}
    data["probe_size"] = BUDGET["probe_size"]
    finetune = doc.setdefault("finetune", {})
    finetune.update(steps=2, batch_size=16, eval_every=2)
    bn = doc.get("expect", {}).get("bn_recalibration")
    if isinstance(bn, dict):
        bn["batches"] = BUDGET["batches"]
    return within_budget(doc)  # a 224 px case of 1,000 generated images runs at 32 px on 100


def _replace_strings(node: Any, table: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        return {k: _replace_strings(v, table) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace_strings(v, table) for v in node]
    return table.get(node, node) if isinstance(node, str) else node


def within_budget(doc: Any, key: Key | None = None) -> Any:
    """``doc`` with every number of a BUDGET field above its budget lowered to the budget."""
    if isinstance(doc, dict):
        return {k: within_budget(v, k) for k, v in doc.items()}
    if isinstance(doc, list):
        return [within_budget(v, key) for v in doc]
    cap = BUDGET.get(key) if isinstance(key, str) else None
    if (
        cap is not None
        and isinstance(doc, (int, float))
        and not isinstance(doc, bool)
        and math.isfinite(doc)
        and doc > cap
    ):
        return cap
    return BUDGET["limit"] if key == "limit" and doc is None else doc


def leaves(node: Any, path: Path_ = ()) -> Iterator[tuple[Path_, Any]]:
    """(path, value) of every scalar of a YAML document, and of every empty list or mapping."""
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from leaves(v, path + (k,))
    elif isinstance(node, list) and node:
        for i, v in enumerate(node):
            yield from leaves(v, path + (i,))
    elif path:
        yield path, node


def zoo_refs(node: Any) -> list[str]:
    """Every string of the document that names a zoo model (which would be trained on first use)."""
    return [v for _, v in leaves(node) if isinstance(v, str) and v.strip() in ZOO_STANDINS]


# --------------------------------------------------------------------------- mutations

NAN, INF = float("nan"), float("inf")
NUMBERS = [-3, -1, 0, 1, 513, 4096, 2**63, 2**64, 1.5, -0.5, 1e300, -1e300, NAN, INF, -INF]
NAMES = [
    "no_such_name",
    "zoo:no-such-model",
    "torchvision:no_such_net",
    "timm:no_such_net",
    "no_such_pkg.nets:net",
    "os:system",
    "layer9",
    "Softmax",
    "../../outside",
    "<b>x</b>",
    "cuda:7",
    "\u00e9",
    "calibrate",
]
HUGE = 2000


@dataclass(frozen=True)
class Mutation:
    """Set the leaf at ``path`` to ``value``; ``kind`` says what sort of change it is."""

    kind: str
    path: Path_
    value: Any = None

    def apply(self, doc: dict[str, Any]) -> dict[str, Any]:
        doc = copy.deepcopy(doc)
        parent = doc
        for key in self.path[:-1]:
            parent = parent[key]
        last = self.path[-1]
        if self.kind == "drop":
            del parent[last]
        elif self.kind == "huge list" and isinstance(parent, list):
            parent[:] = [parent[last]] * HUGE  # a list leaf's whole list grows
        elif self.kind == "huge list":
            parent[last] = [parent[last]] * HUGE
        else:
            parent[last] = self.value
        return doc


@st.composite
def mutations(draw: st.DrawFn, doc: dict[str, Any]) -> Mutation:
    """One change to one leaf of ``doc``."""
    path, value = draw(st.sampled_from(list(leaves(doc))))
    # Mostly changes a leaf's own type allows (they reach past the schema into the run), some others.
    if isinstance(value, str):
        kinds = ["name", "name", "empty string", "type swap", "huge list", "drop"]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        kinds = ["number", "number", "negative", "type swap", "huge list", "drop"]
    else:
        kinds = ["type swap", "number", "name", "huge list", "drop"]
    if path[-1] in BUDGET:
        kinds.remove("drop")
    kind = draw(st.sampled_from(kinds))
    if kind == "type swap":
        new: Any = draw(st.sampled_from(["text", 7, 0.5, True, None, [value], {"key": value}]))
    elif kind == "number":
        new = draw(st.sampled_from(NUMBERS))
    elif kind == "negative":
        new = -value if isinstance(value, (int, float)) and not isinstance(value, bool) and value else -1
    elif kind == "name":
        new = draw(st.sampled_from(NAMES + ([value + "x", value.upper()] if isinstance(value, str) else [])))
    elif kind == "empty string":
        new = ""
    else:
        new = None
    return Mutation(kind, path, new)


# --------------------------------------------------------------------------- running


def run_case_text(directory: Path, text: str) -> CaseRun:
    """``surgery run CASE --report DIR --quiet --seeds 1`` in-process, on ``text`` written to ``CASE``."""
    case = directory / "fuzzed.yaml"
    case.write_text(text, encoding="utf-8")
    return run_case_file(case, directory / "reports", "--seeds", "1")


def check_run(run: CaseRun) -> None:
    """The contract of ``surgery run`` on any input: exit 0, 1 or 2; a 2 is one line naming the case."""
    assert run.rc in (0, 1, 2), f"exit {run.rc}\nstdout: {run.out}\nstderr: {run.err}"
    if run.rc == 2:
        lines = run.err.splitlines()
        assert len(lines) == 1 and run.err.endswith("\n"), f"stderr of exit 2 is not one line: {run.err!r}"
        assert lines[0].startswith("surgery: error: ") and str(run.case) in lines[0], lines[0]
        written = [p for p in run.report.rglob("*")] if run.report.exists() else []
        assert not written, f"exit 2 but {len(written)} path(s) written under --report, e.g. {written[:3]}"


def fuzz_one(doc: dict[str, Any], mutation: Mutation) -> CaseRun:
    """Mutate, keep within budget, check no zoo model is named, run and check the contract."""
    mutated = within_budget(mutation.apply(doc))
    assert not zoo_refs(mutated), f"the fuzz would train a zoo model: {zoo_refs(mutated)}"
    text = yaml.safe_dump(mutated, sort_keys=False, allow_unicode=True)
    with tempfile.TemporaryDirectory(prefix="surgery-fuzz-") as tmp:
        run = run_case_text(Path(tmp), text)
        check_run(run)
    return run


@pytest.fixture(scope="module", autouse=True)
def fuzz_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """An empty zoo cache and torch hub, and one thread per run; torch's thread count restored after.

    One thread: on two cores shared with other jobs, a run of tiny batches is many times faster with
    one thread than with two (0.3 s against 19 s measured), and the figures do not matter here.
    """
    import torch

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("fuzz-cache")
        mp.setenv("SURGERY_CACHE", str(cache))
        mp.setenv("TORCH_HOME", str(cache / "torch"))
        mp.setenv("SURGERY_THREADS", "1")
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quick_docs() -> dict[str, dict[str, Any]]:
    """Every seed case, made quick, by its path relative to ``cases/``."""
    docs = {}
    for path in CASES:
        doc = quick(yaml.safe_load(path.read_text()))
        assert not zoo_refs(doc), path
        docs[str(path.relative_to(CASES_DIR))] = doc
    return docs


def test_seed_cases_are_there():
    """The fuzz draws from the seed cases: an empty cases/ would make it test nothing."""
    assert len(CASES) >= 4, "the fuzz draws from the seed cases in cases/"


def fuzz_drawn(quick_docs: dict[str, dict[str, Any]], data: st.DataObject) -> None:
    """Draw a seed case and a mutation of it, and run it (:func:`fuzz_one`)."""
    name = data.draw(st.sampled_from(sorted(quick_docs)), label="case")
    doc = quick_docs[name]
    mutation = data.draw(mutations(doc), label="mutation")
    fuzz_one(doc, mutation)


@settings(settings.get_profile(PROFILE))
@given(data=st.data())
def test_fuzzed_case_exits_0_1_or_2_with_one_line(quick_docs: dict[str, dict[str, Any]], data: st.DataObject):
    """Any one-leaf mutation of a seed case: exit 0, 1 or 2, and a 2 is one line naming the case, nothing written."""
    fuzz_drawn(quick_docs, data)


@pytest.mark.slow
@settings(settings.get_profile(PROFILE), max_examples=LONG_EXAMPLES)
@given(data=st.data())
def test_fuzzed_case_exits_0_1_or_2_with_one_line_long(quick_docs: dict[str, dict[str, Any]], data: st.DataObject):
    """The same contract over many more mutations (the nightly's ``make test-slow``)."""
    fuzz_drawn(quick_docs, data)


# --------------------------------------------------------------------------- what the fuzz found
# Each example a hunt (``SURGERY_FUZZ_EXAMPLES=300 SURGERY_FUZZ_RANDOM=1``) found, kept as a plain test.


def test_split_seed_beyond_torch_range_is_bad_input(quick_docs: dict[str, dict[str, Any]]):
    """``data.split_seed: 2**64`` overflowed torch's generator: exit 3. Now one line, exit 2."""
    run = fuzz_one(
        quick_docs["transplant/resnet50-to-resnet18-strategies.yaml"],
        Mutation("number", ("data", "split_seed"), 2**64),
    )
    assert run.rc == 2 and "data: seed 18446744073709551616" in run.err and "out of range" in run.err


def test_known_batch_of_one(quick_docs: dict[str, dict[str, Any]]):
    """A batch of one sample through a ResNet's BatchNorm in train mode."""
    fuzz_one(
        quick_docs["transplant/resnet50-to-resnet18-strategies.yaml"],
        Mutation("number", ("finetune", "batch_size"), 1),
    )


@pytest.mark.parametrize(
    "case, path, value",
    [
        ("transplant/resnet50-to-resnet18-strategies.yaml", ("surgery", "target", "num_classes"), True),
        ("swap/resnet50-relu-to-silu.yaml", ("source", "num_classes"), 7),
        ("bridge/resnet50-linear-head.yaml", ("surgery", "num_classes"), 3),
    ],
)
def test_known_fewer_outputs_than_classes(
    quick_docs: dict[str, dict[str, Any]], case: str, path: tuple[str, ...], value: Any
):
    """A patient with fewer outputs than the data's 10 classes, from each op that sets the head's width."""
    fuzz_one(quick_docs[case], Mutation("number", path, value))


@pytest.mark.parametrize(
    "case, path",
    [
        ("transplant/resnet50-to-resnet18-strategies.yaml", ("finetune", "optimizer", "lr")),
        ("graft/mnist-stem-into-resnet18-policies.yaml", ("variants", "lr-scale", "surgery", "policy", "lr_scale")),
    ],
)
def test_known_learning_rate_beyond_float32(quick_docs: dict[str, dict[str, Any]], case: str, path: tuple[str, ...]):
    """A learning rate (or a graft's lr_scale) no float32 holds."""
    fuzz_one(quick_docs[case], Mutation("number", path, 1e300))
