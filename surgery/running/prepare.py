"""What a run and a gate share: the case's data split, source, patient and probe set, with located errors.

``surgery run`` and ``surgery gate`` build the same things from a case and a seed: the train/test
split (``data.split_seed`` when set, else the seed), the source model, the patient the surgery
makes, the probe set. Both call these functions, so they cannot drift apart.

Every input error found while building them — a forward that fails at this image size, a missing
checkpoint, a graft path or probed layer that does not exist, a device that is not there, a
missing imagefolder root — names the case file, the line and the field that caused it
(``cases/x.yaml:7: surgery.path: …``). Relative paths in a case (checkpoints, imagefolder roots)
resolve against the case file's folder.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
from pathlib import Path
from typing import Any, Iterator, overload

import torch
import torch.nn as nn

from surgery.case import Case, DatasetSpec, ModelSpec
from surgery.stats.drift import drift
from surgery.stats.cka import CKAAccumulator
from surgery.stats.activation_probe import ProbePass, ProbeStats, batches, resolve_layers
from surgery.data.datasets import Split, load_split
from surgery.data.image_cache import CachedImages, head
from surgery.data.preprocess import Preprocess, resolve_preprocess
from surgery.errors import SurgeryInputError
from surgery.train.finetune import progress_bar, resolve_device
from surgery.running.builder import build_model
from surgery.models.checkpoints import build_architecture
from surgery.ops import get_op
from surgery.ops.record import SurgeryRecord
from surgery.models.recipes import ZOO


# Examples per forward when probing: the batch the benchmarks time; fewer for large images, so that a
# batch holds at most PROBE_BATCH_VALUES float32 inputs (32 MB: 55 images at 224 px).
PROBE_BATCH = 256
PROBE_BATCH_VALUES = 2**23


def probe_batch_size(x: torch.Tensor | CachedImages) -> int:
    """Examples per probe forward: ``PROBE_BATCH``, fewer when the images are large."""
    _, c, h, w = x.shape
    return max(1, min(PROBE_BATCH, PROBE_BATCH_VALUES // (c * h * w)))


@contextlib.contextmanager
def blame(case: Case, field: str) -> Iterator[None]:
    """Re-raise an input error from the block as ``FILE:LINE: field: message`` (once: located ones pass)."""
    try:
        yield
    except SurgeryInputError as exc:
        if case.path != "<memory>" and str(exc).startswith(f"{case.path}:"):
            raise
        raise SurgeryInputError(f"{case.where(field)}: {exc}") from None


@overload
def resolve_relative(case: Case, value: str) -> str: ...
@overload
def resolve_relative(case: Case, value: None) -> None: ...
@overload
def resolve_relative(case: Case, value: str | None) -> str | None: ...
def resolve_relative(case: Case, value: str | None) -> str | None:
    """A path written in the case file, resolved against the case file's folder when it is relative."""
    if not value or case.path == "<memory>" or Path(value).expanduser().is_absolute():
        return value
    return str(Path(case.path).parent / Path(value).expanduser())


def model_spec(case: Case, spec: ModelSpec) -> ModelSpec:
    """``spec`` with a relative checkpoint path resolved against the case file's folder."""
    resolved = resolve_relative(case, spec.checkpoint)
    return spec if resolved == spec.checkpoint else spec.model_copy(update={"checkpoint": resolved})


def dataset_spec(case: Case, spec: DatasetSpec) -> DatasetSpec:
    """``spec`` with a relative imagefolder root resolved against the case file's folder."""
    resolved = resolve_relative(case, spec.root)
    return spec if resolved == spec.root else spec.model_copy(update={"root": resolved})


def model_field(prefix: str, spec: ModelSpec) -> str:
    """The field to blame when building ``spec`` fails: its checkpoint when it has one, else its model."""
    return f"{prefix}.checkpoint" if spec.checkpoint else f"{prefix}.model"


def build(case: Case, spec: ModelSpec, field: str, **defaults: Any) -> nn.Module:
    """Build a model spec of the case (relative checkpoint resolved), blaming ``field`` on failure."""
    with blame(case, model_field(field, spec)):
        return build_model(model_spec(case, spec), **defaults)


def device_for(case: Case, override: str | None) -> torch.device:
    """The device a run uses: the override (CLI, plugin) or the case's ``device`` field."""
    if override:
        try:
            return resolve_device(override)
        except SurgeryInputError as exc:
            raise SurgeryInputError(f"--device: {exc}") from None
    with blame(case, "device"):
        return resolve_device(case.device)


def case_preprocess(case: Case) -> Preprocess:
    """The preprocessing of every image of the case: the source model's, with ``data.preprocess`` over it."""
    with blame(case, "data.preprocess" if case.data.preprocess is not None else "source.model"):
        return resolve_preprocess(case.source.model, pretrained=case.source.pretrained, override=case.data.preprocess)


def dataset_field(prefix: str, spec: DatasetSpec) -> str:
    """The field to blame when reading ``spec`` fails: its root, its dataset reference, or the set itself."""
    if spec.name == "dataset":
        return f"{prefix}.dataset"
    return f"{prefix}.root" if spec.name == "imagefolder" else prefix


def load_data(case: Case, seed: int) -> Split:
    """The train/test split of ``seed`` (or of ``data.split_seed`` when the case fixes it)."""
    data = case.data
    preprocess = case_preprocess(case)
    with blame(case, dataset_field("data.train", data.train)):
        return load_split(
            dataset_spec(case, data.train),
            image_size=data.image_size,
            channels=data.channels,
            seed=seed if data.split_seed is None else data.split_seed,
            test_fraction=data.test_fraction,
            holdout=data.holdout,
            preprocess=preprocess,
            workers=data.workers,
        )


def probe_inputs(case: Case, split: Split, seed: int) -> torch.Tensor | CachedImages:
    """The probe set: ``data.probe``'s test split, or the train data's test split, ``probe_size`` images."""
    data = case.data
    if data.probe is None:
        return head(split.test_x, data.probe_size)
    with blame(case, dataset_field("data.probe", data.probe)):
        probe = load_split(
            dataset_spec(case, data.probe),
            image_size=data.image_size,
            channels=data.channels,
            seed=seed,
            test_fraction=data.test_fraction,
            preprocess=split.preprocess,
            workers=data.workers,
        )
    return head(probe.test_x, data.probe_size)


def check_patient(case: Case, patient: nn.Module, split: Split) -> int:
    """The patient's forward on the case's images; fewer outputs than the data's classes is bad input."""
    width = check_forward(case, patient, split, "patient after surgery")
    if width < split.num_classes:
        raise SurgeryInputError(
            f"{case.where(get_op(case.surgery.op).classes_field)}: the patient outputs {width} values but "
            f"{split.name} has {split.num_classes} classes; expected at least "
            f"{split.num_classes} outputs"
        )
    return width


def build_source(case: Case, split: Split) -> tuple[nn.Module, int]:
    """The source model in eval mode, and the width of its output on the case's images."""
    source = build(case, case.source, "source", num_classes=split.num_classes, in_chans=case.data.channels).eval()
    return source, check_forward(case, source, split, f"source {case.source.model}")


def example_inputs(split: Split) -> torch.Tensor:
    """Two test images, normalised: what a forward is checked on."""
    return split.test_x[:2]


# What a forward on inputs of the wrong size raises: torch a RuntimeError, timm often an AssertionError.
FORWARD_ERRORS = (RuntimeError, AssertionError, ValueError)


def forward_error(what: str, split: Split, exc: BaseException) -> SurgeryInputError:
    """The one-line bad-input error for a model whose forward fails on the case's images."""
    first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]
    return SurgeryInputError(
        f"{what}: forward fails on {tuple(split.test_x.shape[1:])} inputs "
        f"(is data.image_size too small for this architecture?): {first}"
    )


def check_forward(case: Case, model: nn.Module, split: Split, what: str) -> int:
    """One eval forward on two test images; returns the output width. Too-small inputs are bad input."""
    model.eval()
    try:
        with torch.no_grad():
            out = model(example_inputs(split).to(next(model.parameters()).device))
    except FORWARD_ERRORS as exc:
        raise SurgeryInputError(f"{case.where('data.image_size')}: {forward_error(what, split, exc)}") from None
    return int(out.shape[-1])


def architecture_ref(ref: str) -> str:
    """The architecture behind a model reference (a zoo model's recipe arch)."""
    kind, _, name = ref.partition(":")
    return ZOO[name].arch if kind == "zoo" else ref


def paired_init_seed(seed: int, init: int = 0) -> int:
    """The RNG seed a variant arm builds its models from, for run seed ``seed`` and random init ``init``: every
    arm of a seed builds its target from ``init`` 0, so the tensors a surgery leaves fresh start from the
    values the random arm's first init gives them."""
    digest = hashlib.sha256(f"surgery-variant-init/{seed}/{init}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def seeded_build(case: Case, spec: ModelSpec, field: str, init_seed: int | None, **defaults: Any) -> nn.Module:
    """:func:`build`, its random initial values drawn from ``init_seed`` (None: the global RNG, as it is)."""
    if init_seed is None:
        return build(case, spec, field, **defaults)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return build(case, spec, field, **defaults)


def perform_surgery(
    case: Case, source: nn.Module, split: Split, init_seed: int | None = None
) -> tuple[nn.Module, SurgeryRecord]:
    """Apply the case's operation to ``source`` (never modified); return the patient and the record.

    ``init_seed``: the models the operation builds draw their initial values from it (variant arms, paired).
    """
    op = get_op(case.surgery.op)
    with blame(case, f"surgery.{op.blamed_field}"):
        return op.apply(
            case.surgery,
            source,
            example=example_inputs(split),
            num_classes=split.num_classes,
            in_chans=case.data.channels,
            build=lambda spec, field, **kw: seeded_build(case, spec, field, init_seed, **kw),
        )


def random_init_model(case: Case, split: Split, init_seed: int) -> nn.Module:
    """The surgery's architecture from random init (drawn from ``init_seed``), made like the patient: a
    variant case's random arm."""
    op = get_op(case.surgery.op)
    with blame(case, f"surgery.{op.blamed_field}"):
        ref = architecture_ref(op.baseline_architecture(case.surgery, case.source.model))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = build_architecture(ref, num_classes=split.num_classes, in_chans=case.data.channels)
        return op.baseline(case.surgery, model)


def probed_expectation(case: Case) -> tuple[str, Any] | None:
    """The expectation whose ``layers`` the probe follows, as (field, spec): ``expect.activations``, else
    ``expect.similarity``; None when the case has neither."""
    if case.expect.activations is not None:
        return "expect.activations", case.expect.activations
    if case.expect.similarity is not None:
        return "expect.similarity", case.expect.similarity
    return None


def probed_layers(case: Case, model: nn.Module, *, reference: bool = False) -> list[str]:
    """The module names of ``model`` that ``case`` probes (its ``reference_layers`` with ``reference``), in model
    order; [] when the case probes nothing. A name that matches no module is bad input at its line."""
    probed = probed_expectation(case)
    if probed is None:
        return []
    field, spec = probed
    patterns, key = spec.layers, f"{field}.layers"
    if reference and spec.reference_layers:
        patterns, key = spec.reference_layers, f"{field}.reference_layers"
    with blame(case, key):
        return resolve_layers(model, patterns)


def paired_probed_layers(case: Case, reference: nn.Module, patient: nn.Module) -> tuple[list[str], list[str]]:
    """The patient's and the reference's probed layers (:func:`probed_layers`), one for one; a count that
    differs is bad input at the probed expectation's ``layers``."""
    layers = probed_layers(case, patient)
    ref_layers = probed_layers(case, reference, reference=True)
    if len(layers) != len(ref_layers):
        probed = probed_expectation(case)  # not None: a case that probes nothing has no layers on either side
        field = probed[0] if probed is not None else "expect"
        raise SurgeryInputError(
            f"{case.where(field + '.layers')}: {len(layers)} patient layers {layers[:4]} but "
            f"{len(ref_layers)} reference layers {ref_layers[:4]}; set reference_layers to pair them"
        )
    return layers, ref_layers


class Probes:
    """Activation probes of the reference and the patient at each stage, in one pass over the probe set.

    ``probe(stage, model)`` keeps a snapshot of the model as it is then; the first read of the
    results runs every snapshot and the reference side by side on each batch. So the reference
    forward runs once, histograms share the reference's bins, and the linear CKA between each
    patient layer and its reference layer (and, for an op that asks for it, the reference ×
    patient layer map) is computed from the same batches at constant memory.
    """

    def __init__(
        self,
        case: Case,
        reference: nn.Module,
        patient: nn.Module,
        probe_x: torch.Tensor | CachedImages,
        device: torch.device,
        seed: int,
        *,
        progress: bool | None = False,
    ):
        self.layers, self.ref_layers = paired_probed_layers(case, reference, patient)
        self.progress = progress  # a bar for a long probe pass (see surgery.train.finetune.progress_bar)
        self.reference, self.x, self.device, self.seed = reference, probe_x, device, seed
        self.map_rows: list[str] = []
        self.map_cols: list[str] = []
        if get_op(case.surgery.op).layer_map:
            self.map_rows, self.map_cols = map_layers(reference), map_layers(patient)
        self.snapshots: dict[str, nn.Module] = {}
        self.results: tuple[ProbeStats, dict[str, ProbeStats], dict[str, CKAAccumulator]] | None = None

    def probe(self, stage: str, model: nn.Module) -> None:
        """Keep ``model`` as it is now, to be probed as ``stage``."""
        self.snapshots[stage] = copy.deepcopy(model)
        self.results = None

    def _run(self) -> tuple[ProbeStats, dict[str, ProbeStats], dict[str, CKAAccumulator]]:
        if self.results is not None:
            return self.results
        n = self.x.shape[0]
        ref_grams = list(dict.fromkeys(self.ref_layers + self.map_rows))
        pat_grams = list(dict.fromkeys(self.layers + self.map_cols))
        with contextlib.ExitStack() as stack:
            ref = stack.enter_context(
                ProbePass(
                    self.reference,
                    self.ref_layers,
                    total_samples=n,
                    device=self.device,
                    seed=self.seed,
                    gram_layers=ref_grams,
                )
            )
            stages = {
                stage: stack.enter_context(
                    ProbePass(
                        model, self.layers, total_samples=n, device=self.device, seed=self.seed, gram_layers=pat_grams
                    )
                )
                for stage, model in self.snapshots.items()
            }
            # batch_grams() lists each pass's Grams in its gram_names order (model order)
            cka = {
                stage: CKAAccumulator(ref.gram_names, probe.gram_names, device=self.device)
                for stage, probe in stages.items()
            }
            bar = stack.enter_context(progress_bar(n, f"probing {len(stages) + 1} models", self.progress))
            for batch in batches(self.x, probe_batch_size(self.x)):
                ref.feed(batch)
                row_grams = ref.batch_grams()
                for stage, probe in stages.items():
                    probe.feed(batch)
                    for rows, cols in zip(row_grams, probe.batch_grams()):
                        cka[stage].update(rows, cols)
                bar.update(len(batch))
        reference = ref.finish()
        edges = {p: reference[r].hist_edges for p, r in zip(self.layers, self.ref_layers)}
        self.results = reference, {stage: probe.finish(edges) for stage, probe in stages.items()}, cka
        return self.results

    def rows(self) -> list[dict[str, Any]]:
        """Per layer and stage: drift against the reference, linear CKA, moments, dead channels."""
        reference, stages, cka = self._run()
        rows = []
        for pat_name, ref_name in zip(self.layers, self.ref_layers):
            ref = reference[ref_name]
            for stage, stats in stages.items():
                pat = stats[pat_name]
                d = drift(ref, pat)
                rows.append(
                    {
                        "layer": pat_name,
                        "reference_layer": ref_name,
                        "stage": stage,
                        "w1_norm": d["wasserstein_norm"],
                        "ks": d["ks"],
                        "psi": d["psi"],
                        "cka": _finite_or_none(cka[stage].value(ref_name, pat_name)),
                        "ref_mean": ref.mean,
                        "ref_std": ref.std,
                        "mean": pat.mean,
                        "std": pat.std,
                        "min": pat.min,
                        "max": pat.max,
                        "near_zero_frac": pat.near_zero_frac,
                        "dead_channel_frac": pat.dead_channel_frac,
                        "ref_dead_channel_frac": ref.dead_channel_frac,
                        "nonfinite": pat.nonfinite,
                    }
                )
        return rows

    def layer_maps(self) -> dict[str, dict[str, Any]]:
        """Per stage, the reference × patient CKA matrix of the op's layer map (empty when the op has none)."""
        if not self.map_rows:
            return {}
        _, _, cka = self._run()
        out = {}
        for stage, acc in cka.items():
            matrix = acc.matrix()
            rows = [acc.rows.index(r) for r in self.map_rows]
            cols = [acc.cols.index(c) for c in self.map_cols]
            out[stage] = {
                "reference_layers": self.map_rows,
                "layers": self.map_cols,
                "cka": [[_finite_or_none(float(matrix[i, j])) for j in cols] for i in rows],
            }
        return out

    def histograms(self) -> dict[str, dict[str, Any]]:
        """Per patient layer: the reference's bin edges and counts, and each stage's counts on them."""
        reference, stages, _ = self._run()
        out = {}
        for pat_name, ref_name in zip(self.layers, self.ref_layers):
            ref = reference[ref_name]
            out[pat_name] = {
                "edges": ref.hist_edges.tolist(),
                "reference": ref.hist_counts.tolist(),
                **{stage: stats[pat_name].hist_counts.tolist() for stage, stats in stages.items()},
            }
        return out


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


# NOTE: a choice, not a rule of nature: the "blocks" of a network are the modules that sit directly
# in an nn.Sequential, have children of their own and are not Sequential themselves (ResNet's
# layer1.0 …, timm's blocks.0.0 …). At most MAP_LAYERS of them, evenly spaced, keep the map legible.
MAP_LAYERS = 24


def map_layers(model: nn.Module) -> list[str]:
    """The blocks of ``model`` for a CKA layer map: at most ``MAP_LAYERS``, evenly spaced, in model order."""
    modules = dict(model.named_modules())
    blocks = [
        name
        for name, module in modules.items()
        if name
        and isinstance(modules[name.rpartition(".")[0]], nn.Sequential)
        and not isinstance(module, nn.Sequential)
        and any(True for _ in module.children())
    ]
    if len(blocks) > MAP_LAYERS:
        step = (len(blocks) - 1) / (MAP_LAYERS - 1)
        blocks = [blocks[round(i * step)] for i in range(MAP_LAYERS)]
    return blocks
