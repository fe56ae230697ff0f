"""The fine-tune engine: a short, deterministic training loop.

Embedded sets sit on the device as tensors. Cached images (a user's folder: :mod:`surgery.data.image_cache`)
stream: each step reads its batch as uint8, moves it (pinned, non-blocking on CUDA) and normalises it
on the device, while a background thread reads the next one. ``finetune.augment`` applies to each
training batch on the device (:mod:`surgery.train.augment`).

Parameter groups are chosen by glob on parameter names, each with ``freeze``, ``lr_scale`` and
``unfreeze_at``. A non-finite loss stops the run and is reported, never raised.
"""

from __future__ import annotations

import fnmatch
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from surgery.train.augment import augment_batch, augment_generator
from surgery.spec import DistillSpec, FinetuneSpec, ParamGroupSpec
from surgery.errors import SurgeryInputError
from surgery.data.image_cache import CachedImages, Images, on_device


# Cached images are evaluated in batches of at most this many input values (16 MB as float32): 27 images at
# 224 px, whose ResNet activations stay near a training batch's; 512 at 32 px. It bounds peak memory by a
# batch, not by the test split: at 2**26 (445 images at 224 px) a 10,000-image folder's 200-image test
# split was evaluated in one batch, 1.1 GB over a 1,000-image folder's 20 (benchmarks/test_real_data.py).
EVAL_BATCH_VALUES = 2**22


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU. Asking for a CUDA device that is not there is bad input."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SurgeryInputError(f"device {name!r}: CUDA is not available on this machine; use 'cpu' or 'auto'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SurgeryInputError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """Move a model to the device in channels_last.

    NOTE: channels_last is used on the CPU too: measured 1.7× faster for a ResNet-18 training
    step at 32 px on this project's 2-core machine, and it changes no result beyond float rounding.
    """
    return model.to(device=device, memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's overloads of Module.to omit device with memory_format, which it accepts


def _input(x: Images, device: torch.device, positions: object = slice(None)) -> torch.Tensor:
    """The images of ``x`` at ``positions`` on ``device`` in channels_last, normalised."""
    x = on_device(x, positions, device)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def eval_batch_size(x: Images, batch_size: int) -> int:
    """``batch_size``, made smaller for large cached images so a batch stays within ``EVAL_BATCH_VALUES``."""
    if not isinstance(x, CachedImages):
        return batch_size
    _, c, h, w = x.shape
    return max(1, min(batch_size, EVAL_BATCH_VALUES // (c * h * w)))


# A pass over images (an evaluation, a probe pass) shows a progress bar only once it has run this long: at
# 224 px on a CPU a source's evaluation takes tens of seconds, at 32 px well under this.
PROGRESS_DELAY = 2.0


def progress_bar(total: int, desc: str, progress: bool | None, unit: str = "img") -> tqdm:
    """A bar for a pass over ``total`` images, shown after ``PROGRESS_DELAY`` s when ``progress`` is True, or is
    None and stderr is a terminal."""
    show = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=total, desc=desc, unit=unit, disable=not show, leave=False, delay=PROGRESS_DELAY)


@torch.inference_mode()
def predict(
    model: nn.Module,
    x: Images,
    *,
    device: torch.device,
    batch_size: int = 512,
    progress: bool | None = False,
    desc: str = "evaluating",
) -> torch.Tensor:
    """Logits for every row of ``x`` (eval mode), float32, on the CPU; a bar for a long pass (``progress``)."""
    model.eval()
    out = []
    step = eval_batch_size(x, batch_size)
    with progress_bar(len(x), desc, progress) as bar:
        for i in range(0, len(x), step):
            with autocast(device):
                out.append(model(_input(x, device, slice(i, i + step))).float().cpu())
            bar.update(len(out[-1]))
    return torch.cat(out)


def evaluate(
    model: nn.Module,
    x: Images,
    y: torch.Tensor,
    *,
    device: torch.device,
    batch_size: int = 512,
    progress: bool | None = False,
    desc: str = "evaluating",
) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    logits = predict(model, x, device=device, batch_size=batch_size, progress=progress, desc=desc)
    return float((logits.argmax(1) == y).float().mean())


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module, x: Images, *, device: torch.device, batches: int = 20, batch_size: int = 64, seed: int = 0
) -> int:
    """AdaBN: reset BatchNorm running statistics and re-estimate them on unlabelled ``x``.

    Runs ``batches`` forward passes in train mode without gradients, with a cumulative average
    (momentum None), then puts the model back in eval mode. Returns the number of BN layers reset.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    g = torch.Generator().manual_seed(seed)
    model.train()
    try:
        for _ in range(batches):
            idx = torch.randint(len(x), (min(batch_size, len(x)),), generator=g)
            with autocast(device):
                model(_input(x, device, idx))
    finally:
        for m, momentum in zip(bns, saved):
            m.momentum = momentum
        model.eval()
    return len(bns)


@dataclass
class FinetuneResult:
    """What a fine-tune did: the curve, and whether it stayed finite."""

    curve: list[dict[str, float]] = field(default_factory=list)  # {step, loss, accuracy, lr}
    steps_done: int = 0
    finite: bool = True
    nonfinite_step: int | None = None
    seconds: float = 0.0
    samples_per_second: float = 0.0
    final_accuracy: float | None = None  # on the eval set after the last step; None if training stopped early

    def accuracy_after(self, model: nn.Module, x: Images, y: torch.Tensor, *, device: torch.device) -> float:
        """The trained model's accuracy on ``(x, y)``, which must be the eval set this fine-tune was given:
        the evaluation already taken at the last step when there was one (the same figure), else a new one."""
        return self.final_accuracy if self.final_accuracy is not None else evaluate(model, x, y, device=device)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Group:
    spec: ParamGroupSpec | None
    names: list[str]
    params: list[nn.Parameter]


def _grouped(model: nn.Module, specs: Sequence[ParamGroupSpec]) -> list[_Group]:
    """Each trainable parameter in the first group whose glob matches its name, else in the default (last)."""
    groups = [_Group(spec, [], []) for spec in specs] + [_Group(None, [], [])]
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue  # frozen by the op itself (e.g. a bridge's backbone)
        target = next(
            (g for g in groups[:-1] if g.spec is not None and fnmatch.fnmatchcase(name, g.spec.params)), groups[-1]
        )
        target.names.append(name)
        target.params.append(p)
    return groups


def unmatched_group(model: nn.Module, specs: Sequence[ParamGroupSpec]) -> int | None:
    """The index in ``specs`` of the first group that gets no trainable parameter of ``model`` (first match
    wins, as in a fine-tune), or None when every group gets some."""
    return _first_empty(_grouped(model, specs))


def _first_empty(groups: list[_Group]) -> int | None:
    return next((i for i, g in enumerate(groups[:-1]) if not g.params), None)


def _assign_groups(model: nn.Module, specs: Sequence[ParamGroupSpec]) -> list[_Group]:
    """The fine-tune's parameter groups: ``specs`` in order, then the default; a group with no parameter is
    bad input (a run finds it before it trains: :mod:`surgery.running.preflight`)."""
    groups = _grouped(model, specs)
    if (index := _first_empty(groups)) is not None:
        raise SurgeryInputError(
            f"finetune.groups: params {specs[index].params!r} matches no trainable parameter "
            f"(names look like {next(iter(dict(model.named_parameters())), '?')!r})"
        )
    return [g for g in groups if g.params]


def _lr_factor(step: int, spec: FinetuneSpec) -> float:
    warmup = spec.schedule.warmup_steps
    if warmup and step < warmup:
        return (step + 1) / warmup
    if spec.schedule.name == "cosine":
        span = max(1, spec.steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))
    return 1.0


def _optimizer(groups: list[_Group], spec: FinetuneSpec) -> torch.optim.Optimizer:
    opt = spec.optimizer
    param_groups = [
        {
            "params": g.params,
            "lr": opt.lr * (g.spec.lr_scale if g.spec else 1.0),
            "base_lr": opt.lr * (g.spec.lr_scale if g.spec else 1.0),
        }
        for g in groups
    ]
    if opt.name == "sgd":
        return torch.optim.SGD(param_groups, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    return torch.optim.AdamW(param_groups, lr=opt.lr, weight_decay=opt.weight_decay)


def _set_frozen(groups: list[_Group], step: int) -> None:
    """Freeze groups marked ``freeze`` until their ``unfreeze_at`` step (forever if none).

    ``unfreeze_at`` alone implies ``freeze`` before that step: a group that would train from step 0
    anyway makes ``unfreeze_at`` a silent no-op.
    """
    for g in groups:
        if g.spec is None:
            continue
        frozen = (g.spec.freeze or g.spec.unfreeze_at is not None) and (
            g.spec.unfreeze_at is None or step < g.spec.unfreeze_at
        )
        for p in g.params:
            p.requires_grad_(not frozen)


class BatchFeed:
    """The training batches of a fine-tune in order, on the device.

    A tensor set moves to the device once and is indexed there. Cached images are read a batch at a
    time; a background thread reads the next batch while the current one trains.
    """

    def __init__(self, x: Images, y: torch.Tensor, device: torch.device):
        self.cached = isinstance(x, CachedImages)
        self.device = device
        self.x = x if self.cached else _input(x, device)
        self.y = y.to(device)
        self.pool = ThreadPoolExecutor(max_workers=1) if self.cached else None
        self.pending: tuple[torch.Tensor, object] | None = None

    def _read(self, idx: torch.Tensor) -> torch.Tensor:
        return _input(self.x, self.device, idx)

    def get(self, idx: torch.Tensor, following: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at ``idx`` (with ``following``, the next one, read ahead)."""
        if not self.cached:
            return self.x[idx], self.y[idx]
        assert self.pool is not None
        if self.pending is not None and torch.equal(self.pending[0], idx):
            x = self.pending[1].result()  # type: ignore[attr-defined]
        else:
            x = self._read(idx)
        self.pending = (following, self.pool.submit(self._read, following)) if following is not None else None
        return x, self.y[idx.to(self.device)]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def finetune(
    model: nn.Module,
    train_x: Images,
    train_y: torch.Tensor,
    eval_x: Images,
    eval_y: torch.Tensor,
    spec: FinetuneSpec,
    *,
    seed: int,
    device: torch.device,
    teacher: nn.Module | None = None,
    distill: DistillSpec | None = None,
    progress: bool | None = None,
    desc: str = "fine-tune",
    curve: bool = True,
) -> FinetuneResult:
    """Train ``model`` in place for ``spec.steps`` steps; evaluate every ``spec.eval_every`` steps.

    With ``curve=False`` only the last step is evaluated: the same trajectory and figures (an evaluation
    changes neither the model nor a random stream), a curve of one point, for a run no report draws.

    Deterministic for a seed on the CPU. With ``teacher`` and ``distill``, the loss mixes
    cross-entropy with KL divergence to the teacher's softened logits (Hinton et al.).
    A non-finite loss stops training: the result says so (``finite=False``) instead of raising.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    groups = _assign_groups(model, spec.groups)
    optimizer = _optimizer(groups, spec)
    feed = BatchFeed(train_x, train_y, device)
    augment = augment_generator(seed) if spec.augment is not None else None
    result = FinetuneResult()
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=spec.steps, desc=desc, disable=not show, leave=False, unit="step")
    if teacher is not None:
        teacher.eval()
    running: float | torch.Tensor  # the loss summed on the device (no host sync per step)
    running, seen, start = 0.0, 0, time.perf_counter()
    nonfinite: torch.Tensor | None = None
    # Batch order is drawn on the CPU (deterministic); for a tensor set it lives on the device: no copy per step.
    order_device = torch.device("cpu") if feed.cached else device
    order = torch.randperm(len(train_x), generator=g).to(order_device)
    cursor = 0
    for step in range(spec.steps):
        _set_frozen(groups, step)
        factor = _lr_factor(step, spec)
        for pg in optimizer.param_groups:
            pg["lr"] = pg["base_lr"] * factor
        if cursor + spec.batch_size > len(order):
            order, cursor = torch.randperm(len(train_x), generator=g).to(order_device), 0
        idx = order[cursor : cursor + spec.batch_size]
        cursor += spec.batch_size
        ahead = order[cursor : cursor + spec.batch_size] if cursor + spec.batch_size <= len(order) else None
        x, y = feed.get(idx, ahead if step + 1 < spec.steps else None)
        if augment is not None and spec.augment is not None:  # both or neither
            x = augment_batch(x, spec.augment, augment)
        model.train()
        with autocast(device):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            if teacher is not None and distill is not None:
                with torch.no_grad():
                    soft = teacher(x).float()
                t = distill.temperature
                kd = (
                    F.kl_div(F.log_softmax(logits.float() / t, 1), F.softmax(soft / t, 1), reduction="batchmean")
                    * t
                    * t
                )
                loss = (1 - distill.weight) * loss + distill.weight * kd
        # NOTE: on CUDA, finiteness is read back only at evaluation points (no host sync per step).
        nonfinite = ~torch.isfinite(loss.detach()) if nonfinite is None else nonfinite | ~torch.isfinite(loss.detach())
        if (device.type != "cuda" or (step + 1) % spec.eval_every == 0) and nonfinite.item():
            result.finite, result.nonfinite_step = False, step
            break
        optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:  # every group frozen (e.g. until an unfreeze_at step): nothing to update
            loss.backward()
            if spec.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(
                    [p for grp in groups for p in grp.params if p.grad is not None], spec.clip_grad
                )
            optimizer.step()
        running += loss.detach()
        seen += 1
        result.steps_done = step + 1
        bar.update(1)
        if (curve and result.steps_done % spec.eval_every == 0) or result.steps_done == spec.steps:
            acc = evaluate(model, eval_x, eval_y, device=device)
            result.curve.append(
                {
                    "step": result.steps_done,
                    "loss": float(running) / seen,
                    "accuracy": acc,
                    "lr": spec.optimizer.lr * factor,
                }
            )  # the schedule, before any lr_scale
            bar.set_postfix(loss=f"{float(running) / seen:.3f}", acc=f"{acc:.3f}")
            if result.steps_done == spec.steps:
                result.final_accuracy = acc
            running, seen = 0.0, 0
    bar.close()
    feed.close()
    _set_frozen(groups, spec.steps)  # leave the model's requires_grad as the policy ends
    result.seconds = time.perf_counter() - start
    result.samples_per_second = result.steps_done * spec.batch_size / max(result.seconds, 1e-9)
    model.eval()
    return result


def all_finite(model: nn.Module) -> bool:
    """True when every floating-point tensor in the model's state is finite."""
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())
