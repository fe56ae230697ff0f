"""Transplant: copy tensors from a source state_dict into a target of a *different* architecture.

Three strategies, each recording per target tensor which source tensor fed it and how
(:class:`~surgery.ops.record.SurgeryRecord`):

- ``exact``: same name and same shape. What ``load_state_dict(strict=False)`` users think they
  get, except that a shape mismatch is recorded (``fresh``, "shape mismatch") instead of raised.
- ``order``: the naive baseline, pairing tensors in registration order when shapes match
  (see :func:`match_order`). Kept as a baseline: its coverage *count* can look good, but the
  pairs are made by position, not by role (``record.notes["renamed"]`` counts the tensors fed
  by a differently named source tensor, e.g. a BatchNorm's statistics from another block).
- ``select``: weight selection (Xu et al., "Initializing Models with Larger Ones", ICLR 2024):
  layers matched by name (which, for models whose blocks are indexed within a stage, is the
  paper's first-N layer selection), larger source tensors sliced at evenly spaced indices in
  every dimension (see :func:`select_indices`), classifier heads with a different class count
  left fresh.

Input-channel adaptation (``adapt_input=True``, all strategies): when the target's stem conv
differs from its source counterpart in input channels (RGB ↔ grey), the source weight goes
through timm's ``adapt_input_conv`` and the tensor is recorded ``adapted``.

Values are copied into the target's own tensors (``.copy_`` under ``torch.no_grad``), so
buffers (BatchNorm running statistics) move as well as parameters, and parametrisations,
tied weights and optimiser references held on the target stay valid.

Function preservation: transplanting a model into the same architecture with ``exact`` must
give identical outputs, which :func:`outputs_match` measures::

    model, record = transplant(source, resnet18(num_classes=10), "exact")
    assert outputs_match(source, model, torch.randn(2, 3, 32, 32)) <= 1e-6
"""

from __future__ import annotations

import fnmatch
import inspect
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from surgery.errors import SurgeryInputError
from surgery.models.checkpoints import clean_key, clean_prefixes
from surgery.ops.record import Method, SurgeryRecord
from surgery.ops.base import Operation, register_op
from surgery.ops.transplant_spec import STRATEGIES, Strategy, TransplantSpec

__all__ = [
    "Strategy",
    "clean_prefixes",
    "select_indices",
    "select_weights",
    "as_target_rank",
    "adapt_input_weight",
    "find_stem_key",
    "find_head_keys",
    "match_exact",
    "match_order",
    "match_select",
    "transplant",
    "outputs_match",
    "assert_outputs_match",
]

_logger = logging.getLogger(__name__)


# Prefixes added by wrappers: nn.DataParallel / DistributedDataParallel and torch.compile.


@dataclass
class Match:
    """One planned assignment: target tensor ← ``value`` (``None`` when the tensor stays fresh)."""

    target_key: str
    method: Method
    source_key: str | None = None
    source_shape: tuple[int, ...] | None = None
    reason: str | None = None
    value: Tensor | None = None


# --------------------------------------------------------------------------------------------
# State-dict helpers
# --------------------------------------------------------------------------------------------


def _floating(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The entries coverage counts (same rule as ``recordable_state``: floating-point tensors)."""
    return {k: v for k, v in state.items() if v.is_floating_point()}


def _source_state(source: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(source, nn.Module):
        state: Mapping[str, Any] = source.state_dict()
    elif isinstance(source, Mapping):
        state = source
    else:
        raise SurgeryInputError(
            f"transplant source must be an nn.Module or a state_dict mapping, got {type(source).__name__}"
        )
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise SurgeryInputError(
            f"transplant source is not a state_dict: entry {bad[0]!r} is a {type(state[bad[0]]).__name__}, "
            "not a tensor (for a training checkpoint, pass its 'state_dict' or 'model' entry)"
        )
    return clean_prefixes(state)


def _compute_dtype(tensor: Tensor) -> Tensor:
    # NOTE: arithmetic (input adaptation) is done in at least float32, as timm does, so that half
    # and bfloat16 sources are summed/scaled without overflow or rounding drift; float64 stays float64.
    return tensor.detach().to(torch.promote_types(tensor.dtype, torch.float32))


# --------------------------------------------------------------------------------------------
# Weight selection
# --------------------------------------------------------------------------------------------


def select_indices(source_size: int, target_size: int, device: torch.device | None = None) -> Tensor:
    """Evenly spaced indices that pick ``target_size`` of ``source_size`` entries: first and last kept.

    ``torch.linspace(0, T - 1, S).round().long()`` with T = source size, S = target size.
    """
    if target_size > source_size:
        raise ValueError(f"cannot select {target_size} of {source_size} entries")
    # NOTE: the published weight-selection code (OscarXZQ/weight-selection, uniform_element_selection)
    # does something else in both of its branches:
    #  - when S divides T it takes ``arange(S) * (T // S)``: the first entry of every group, so the
    #    last index is T - T//S, not T - 1 (T=2048, S=512 → 0, 4, …, 2044; here → 0, 4, …, 2047);
    #  - otherwise ``round(linspace(0, T, S))``: endpoint T is one past the last valid index (off by
    #    one), and the indices stay float, which ``index_select`` rejects — that branch cannot run.
    # We use the DESIGN's single rule for both cases: endpoints included, so the first and last
    # channel of every dimension survive. ``round`` is torch's (half to even); when S == T the
    # indices are exactly 0..T-1, so equal dims are copied unchanged.
    return torch.linspace(0, source_size - 1, target_size, device=device).round().long()


def select_weights(source: Tensor, target_shape: Sequence[int]) -> Tensor:
    """Uniform element selection: slice ``source`` down to ``target_shape`` in every dimension.

    Every source dim must be ≥ the target dim (and the ranks equal); indices per dim from
    :func:`select_indices`. Selection copies values, so it keeps the source dtype.
    """
    target_shape = tuple(int(s) for s in target_shape)
    if source.dim() != len(target_shape):
        raise ValueError(f"rank mismatch: source {tuple(source.shape)} vs target {target_shape}")
    out = source.detach()
    for dim, (src_size, tgt_size) in enumerate(zip(source.shape, target_shape)):
        if src_size < tgt_size:
            raise ValueError(f"source dim {dim} is {src_size} < target {tgt_size}")
        if src_size != tgt_size:
            out = out.index_select(dim, select_indices(src_size, tgt_size, device=out.device))
    return out


def as_target_rank(source: Tensor, target_shape: Sequence[int]) -> Tensor:
    """``source`` viewed with the target's rank when the two differ only by trailing size-1 dims.

    A Linear weight ``[O, I]`` and a 1×1 conv weight ``[O, I, 1, 1]`` are the same operator
    (timm's ConvNeXt atto…nano use 1×1 convs where the larger ConvNeXts use Linear layers).
    Any other rank difference returns ``source`` unchanged.
    """
    rank = len(target_shape)
    if source.dim() < rank and all(int(s) == 1 for s in target_shape[source.dim() :]):
        return source.reshape(*source.shape, *([1] * (rank - source.dim())))
    if source.dim() > rank and all(s == 1 for s in source.shape[rank:]):
        return source.reshape(source.shape[:rank])
    return source


def embed_kernel(source: Tensor, target_shape: Sequence[int]) -> Tensor:
    """A conv weight with a smaller kernel put at the centre of the target's larger kernel, zeros around.

    Channels are first reduced by weight selection. With 'same' padding, a k×k kernel centred in a
    K×K kernel computes the same function (a 1×1 conv as the centre tap of a 3×3), so a bottleneck's
    1×1 conv can initialise a basic block's 3×3 conv. Raises ``ValueError`` when not applicable.
    """
    target_shape = tuple(int(s) for s in target_shape)
    if source.dim() != 4 or len(target_shape) != 4:
        raise ValueError("kernel embedding applies to 4-D conv weights")
    (o, i, kh, kw), (to, ti, th, tw) = source.shape, target_shape
    if o < to or i < ti or kh > th or kw > tw or (th - kh) % 2 or (tw - kw) % 2 or (kh, kw) == (th, tw):
        raise ValueError(f"cannot embed {tuple(source.shape)} into {target_shape}")
    selected = select_weights(source, (to, ti, kh, kw))
    out = selected.new_zeros(target_shape)
    top, left = (th - kh) // 2, (tw - kw) // 2
    out[:, :, top : top + kh, left : left + kw] = selected
    return out


def _embeddable(source_shape: Sequence[int], target_shape: Sequence[int]) -> bool:
    try:
        embed_kernel(torch.empty(source_shape, device="meta"), target_shape)
    except ValueError:
        return False
    return True


def _selectable(source_shape: Sequence[int], target_shape: Sequence[int]) -> bool:
    return len(source_shape) == len(target_shape) and all(s >= t for s, t in zip(source_shape, target_shape))


# --------------------------------------------------------------------------------------------
# Input-channel adaptation
# --------------------------------------------------------------------------------------------


def find_stem_key(state: Mapping[str, Tensor]) -> str | None:
    """The stem conv's weight: the first 4-D floating-point ``*weight`` entry in registration order."""
    # NOTE: a heuristic (registration order is forward order for torchvision and timm CNNs and
    # for ViT patch embeddings); it is applied the same way to source and target.
    for key, value in state.items():
        if value.is_floating_point() and value.dim() == 4 and key.endswith("weight"):
            return key
    return None


def adapt_input_weight(source: Tensor, target_shape: Sequence[int], *, select: bool = False) -> Tensor:
    """A source conv weight adapted to the target's input channels with timm's ``adapt_input_conv``.

    Only dim 1 (input channels) may differ, unless ``select`` is true, in which case the other
    dims are first reduced by weight selection (:func:`select_weights`). Raises ``ValueError``
    when the weight cannot be adapted. Computed in float32 (at least); returned in that dtype.
    """
    target_shape = tuple(int(s) for s in target_shape)
    if source.dim() != 4 or len(target_shape) != 4:
        raise ValueError("input adaptation needs 4-D conv weights")
    out_c, in_c, kh, kw = target_shape
    weight = _compute_dtype(source)
    other_target = (out_c, weight.shape[1], kh, kw)
    if tuple(weight.shape) != other_target:
        if not (select and _selectable(weight.shape, other_target)):
            raise ValueError(f"source {tuple(source.shape)} differs from target {target_shape} beyond input channels")
        weight = select_weights(weight, other_target)
    try:
        adapted = _timm_adapt(in_c, weight)
    except (NotImplementedError, AssertionError, ValueError) as exc:
        raise ValueError(f"timm adapt_input_conv cannot convert {weight.shape[1]} → {in_c} input channels") from exc
    if tuple(adapted.shape) != target_shape:
        raise ValueError(f"timm adapt_input_conv cannot convert {weight.shape[1]} → {in_c} input channels")
    return adapted


def _timm_adapt(in_chans: int, weight: Tensor) -> Tensor:
    # imported here: timm takes a second or two to import, and parsing a case or transplanting without
    # adaptation needs none of it. timm.models exports it from timm.models._manipulate.
    from timm.models import adapt_input_conv

    source_chans = weight.shape[1]
    # NOTE: the source's physical input channels: its weight's dim 1, except a space-to-depth stem
    # (dim 1 a multiple of 3 above 3), which timm treats as RGB. So RGB → grey sums, grey → RGB
    # repeats and divides by 3 (same response to a grey image replicated on 3 channels).
    base_chans = 3 if source_chans % 3 == 0 else source_chans
    if "base_chans" in inspect.signature(adapt_input_conv).parameters:  # timm >= 1.0.2x: the trained count
        return adapt_input_conv(in_chans, weight, base_chans=base_chans)
    if base_chans == 1 and in_chans != 1:
        # Older timm assumes an RGB source: lift the grey weight to the equivalent RGB weight first.
        weight = weight.repeat(1, 3, 1, 1) / 3.0
    return adapt_input_conv(in_chans, weight)


def _try_adapt(
    target_key: str,
    source_key: str,
    source: Tensor,
    target: Tensor,
    *,
    select: bool,
    source_shape: tuple[int, ...] | None = None,
) -> Match:
    source_shape = tuple(source.shape) if source_shape is None else source_shape
    try:
        value = adapt_input_weight(source, target.shape, select=select)
    except ValueError as exc:
        return Match(target_key, "fresh", source_key, source_shape, f"shape mismatch: {exc}")
    return Match(target_key, "adapted", source_key, source_shape, value=value)


def _needs_adaptation(source: Tensor, target: Tensor) -> bool:
    return source.dim() == 4 and target.dim() == 4 and source.shape[1] != target.shape[1]


# --------------------------------------------------------------------------------------------
# Classifier head
# --------------------------------------------------------------------------------------------


def find_head_keys(model: nn.Module, head_keys: Iterable[str] | None = None) -> set[str]:
    """The classifier head's state_dict keys (wrapper prefixes stripped).

    With ``head_keys``, the keys matching any of the globs (a glob may name a key, ``fc.weight``,
    or a module, ``fc`` / ``head.*``). Without, the weight and bias of the model's last
    ``nn.Linear`` in registration order.
    """
    # NOTE: "last Linear" is a heuristic: right for torchvision/timm classifiers (``fc``,
    # ``head.fc``, ``classifier``), wrong for a model whose head is a 1×1 conv; pass globs there.
    keys = [clean_key(k) for k, v in model.state_dict().items()]
    if head_keys is not None:
        globs = [head_keys] if isinstance(head_keys, str) else list(head_keys)
        found = {
            k for k in keys for g in globs if fnmatch.fnmatchcase(k, g) or fnmatch.fnmatchcase(k.rsplit(".", 1)[0], g)
        }
        if globs and not found:
            raise SurgeryInputError(f"head_keys {globs} match no tensor of the target model")
        return found
    last: str | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = clean_key(name)
    if last is None:
        return set()
    return {k for k in keys if k in (f"{last}.weight", f"{last}.bias")}


# --------------------------------------------------------------------------------------------
# Strategies: each maps (source, target) floating-point states to one Match per target tensor
# --------------------------------------------------------------------------------------------


def match_exact(
    source: Mapping[str, Tensor], target: Mapping[str, Tensor], *, stem_key: str | None = None
) -> list[Match]:
    """Same name and same shape → ``exact``; same name, other shape → fresh "shape mismatch";
    no such name → fresh "no counterpart". With ``stem_key``, that tensor is adapted when it
    differs from its same-name source only in input channels."""
    matches = []
    for key, tgt in target.items():
        src = source.get(key)
        if src is None:
            matches.append(Match(key, "fresh", reason="no counterpart"))
        elif src.shape == tgt.shape:
            matches.append(Match(key, "exact", key, tuple(src.shape), value=src))
        elif key == stem_key and _needs_adaptation(src, tgt):
            matches.append(_try_adapt(key, key, src, tgt, select=False))
        else:
            matches.append(Match(key, "fresh", key, tuple(src.shape), "shape mismatch"))
    return matches


def match_order(
    source: Mapping[str, Tensor],
    target: Mapping[str, Tensor],
    *,
    stem_key: str | None = None,
    source_stem_key: str | None = None,
) -> list[Match]:
    """The naive baseline: one forward pass over both states in registration order.

    A cursor walks the source. For each target tensor, in order, the first source tensor at or
    after the cursor with the *identical* shape is taken (``exact``, whatever its name) and the
    cursor moves just past it; source tensors skipped over are never revisited. No such tensor →
    fresh "no counterpart" and the cursor stays. Names are ignored entirely.
    With ``stem_key``/``source_stem_key``, the target stem is paired with the source stem (if the
    cursor has not passed it) and adapted when only input channels differ; the cursor then moves
    past the source stem.
    """
    src_keys = list(source)
    position = {k: i for i, k in enumerate(src_keys)}
    cursor = 0
    matches = []
    for key, tgt in target.items():
        if (
            key == stem_key
            and source_stem_key is not None
            and position[source_stem_key] >= cursor
            and _needs_adaptation(source[source_stem_key], tgt)
        ):
            match = _try_adapt(key, source_stem_key, source[source_stem_key], tgt, select=False)
            if match.method == "adapted":
                matches.append(match)
                cursor = position[source_stem_key] + 1
                continue
        for j in range(cursor, len(src_keys)):
            src = source[src_keys[j]]
            if src.shape == tgt.shape:
                matches.append(Match(key, "exact", src_keys[j], tuple(src.shape), value=src))
                cursor = j + 1
                break
        else:
            matches.append(Match(key, "fresh", reason="no counterpart"))
    return matches


def match_select(
    source: Mapping[str, Tensor],
    target: Mapping[str, Tensor],
    *,
    stem_key: str | None = None,
    head_keys: Iterable[str] = (),
) -> list[Match]:
    """Weight selection: match by name, slice larger source tensors at evenly spaced indices.

    Per target tensor with a same-name source tensor:
    - head tensor (in ``head_keys``) whose class count (dim 0) differs → fresh "head";
    - the stem (``stem_key``) when input channels differ → adapted (other dims selected first);
    - equal shapes → ``exact``; every source dim ≥ target dim → ``sliced`` (a Linear weight
      and a 1×1 conv weight are matched, see :func:`as_target_rank`);
    - a conv whose source kernel is smaller (1×1 → 3×3) → ``adapted``: centred, see :func:`embed_kernel`;
    - otherwise (a smaller source dim, or another rank) → fresh "shape mismatch".
    Name matching *is* the paper's first-N layer selection for models whose blocks are numbered
    within a stage (torchvision/timm ResNets ``layerS.B``, ConvNeXt ``stages.S.blocks.B``, ViT
    ``blocks.B``): target block B of stage S takes source block B of stage S, and the source's
    extra, deeper blocks are left unused.
    """
    heads = set(head_keys)
    matches = []
    for key, tgt in target.items():
        original = source.get(key)
        if original is None:
            matches.append(Match(key, "fresh", reason="no counterpart"))
            continue
        source_shape = tuple(original.shape)
        # NOTE: Linear [O, I] ↔ 1×1 conv [O, I, 1, 1] are matched (see as_target_rank); values that
        # only change view are still "exact", and the record keeps the source's own shape.
        src = as_target_rank(original, tgt.shape)
        if key in heads and (src.dim() == 0 or tgt.dim() == 0 or src.shape[0] != tgt.shape[0]):
            matches.append(Match(key, "fresh", key, source_shape, "head"))
        elif key == stem_key and _needs_adaptation(src, tgt):
            matches.append(_try_adapt(key, key, src, tgt, select=True, source_shape=source_shape))
        elif src.shape == tgt.shape:
            matches.append(Match(key, "exact", key, source_shape, value=src))
        elif _selectable(src.shape, tgt.shape):
            matches.append(Match(key, "sliced", key, source_shape, value=select_weights(src, tgt.shape)))
        elif _embeddable(src.shape, tgt.shape):
            # NOTE: an extension of weight selection, not in the paper: a smaller source kernel is
            # centred in the target's (1×1 bottleneck conv → 3×3 basic-block conv), recorded "adapted".
            matches.append(Match(key, "adapted", key, source_shape, value=embed_kernel(src, tgt.shape)))
        else:
            matches.append(Match(key, "fresh", key, source_shape, "shape mismatch"))
    return matches


# --------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _copy_into(destination: Tensor, value: Tensor) -> None:
    destination.copy_(value.detach().to(dtype=destination.dtype))


def transplant(
    source: nn.Module | Mapping[str, Tensor],
    target: nn.Module,
    strategy: Strategy,
    *,
    adapt_input: bool = True,
    head_keys: Sequence[str] | None = None,
) -> tuple[nn.Module, SurgeryRecord]:
    """Copy tensors of ``source`` into ``target`` (modified in place and returned) by ``strategy``.

    Args:
        source: a model or a state_dict; ``module.`` / ``_orig_mod.`` prefixes are stripped.
        target: the model to initialise; its tensors not set from the source keep their values
            (recorded ``fresh`` with a reason).
        strategy: ``"exact"``, ``"order"`` or ``"select"`` (see the module docstring).
        adapt_input: adapt the stem conv across input channels with timm's ``adapt_input_conv``
            (all strategies). Off: a stem that differs in input channels is a shape mismatch
            under ``exact``/``order``, and under ``select`` is sliced like any tensor when the
            source has more channels (3 → 1 keeps channel 0).
        head_keys: globs naming the classifier head's tensors (default: the last ``nn.Linear``;
            ``[]``: no head).
            Only ``select`` uses them: a head whose class count differs starts fresh ("head").

    Returns:
        ``(target, record)``: one TensorRecord per floating-point target state_dict entry (keys as
        in ``target.state_dict()``), ``record.notes`` with ``strategy``, ``unused_source_keys``
        (floating-point source entries that fed nothing), ``source_tensors``, ``adapt_input``,
        ``renamed`` (tensors fed by a source tensor of another name), ``adapted`` (keys),
        ``head_keys`` and ``integer_buffers_copied``.

    Never raises on mismatched tensors; raises :class:`SurgeryInputError` on an unknown strategy,
    a source that is not a model or a state_dict, or ``head_keys`` that match nothing.
    """
    if strategy not in STRATEGIES:
        raise SurgeryInputError(f"unknown transplant strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if not isinstance(target, nn.Module):
        raise SurgeryInputError(f"transplant target must be an nn.Module, got {type(target).__name__}")

    source_state = _source_state(source)
    source_float = _floating(source_state)
    # keep_vars=False: detached tensors sharing storage with the parameters and buffers.
    target_raw = target.state_dict()
    raw_key = {clean_key(k): k for k in target_raw}
    target_state = clean_prefixes(target_raw)
    target_float = _floating(target_state)

    stem_key = find_stem_key(target_float) if adapt_input else None
    heads = find_head_keys(target, head_keys) if strategy == "select" or head_keys is not None else set()

    if strategy == "exact":
        matches = match_exact(source_float, target_float, stem_key=stem_key)
    elif strategy == "order":
        source_stem = find_stem_key(source_float) if adapt_input else None
        matches = match_order(source_float, target_float, stem_key=stem_key, source_stem_key=source_stem)
    else:
        matches = match_select(source_float, target_float, stem_key=stem_key, head_keys=heads)

    record = SurgeryRecord(op="transplant")
    used: set[str] = set()
    for match in matches:
        destination = target_state[match.target_key]
        if match.value is not None:
            _copy_into(destination, match.value)
            used.add(match.source_key)  # type: ignore[arg-type]
        record.add(
            raw_key[match.target_key],
            destination,
            match.method,
            source_key=match.source_key,
            source_shape=match.source_shape,
            reason=match.reason,
        )

    # Integer buffers (BatchNorm's num_batches_tracked) are not counted by coverage but are
    # copied along with their layer under the name-based strategies, as load_state_dict would.
    integer_copied = 0
    if strategy != "order":
        for key, destination in target_state.items():
            src = source_state.get(key)
            if (
                not destination.is_floating_point()
                and src is not None
                and not src.is_floating_point()
                and src.shape == destination.shape
            ):
                _copy_into(destination, src)
                integer_copied += 1

    record.notes = {
        "strategy": strategy,
        "unused_source_keys": sum(1 for k in source_float if k not in used),
        "source_tensors": len(source_float),
        "adapt_input": adapt_input,
        # tensors fed by a source tensor of another name (only `order` does this): counted as
        # covered, but set by position, not by role.
        "renamed": sum(1 for m in matches if m.value is not None and m.source_key != m.target_key),
        "adapted": [raw_key[m.target_key] for m in matches if m.method == "adapted"],
        "head_keys": sorted(raw_key[k] for k in heads if k in raw_key),
        "integer_buffers_copied": integer_copied,
    }
    if strategy == "select":
        record.notes["selection"] = "linspace(0, T-1, S).round()"
    return target, record


# --------------------------------------------------------------------------------------------
# Function preservation
# --------------------------------------------------------------------------------------------


def _flat_tensors(output: Any) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for k in sorted(output) for t in _flat_tensors(output[k])]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _flat_tensors(item)]
    return []


@torch.no_grad()
def _eval_forward(model: nn.Module, x: Tensor) -> Any:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return model(x)
    finally:
        for module, mode in modes.items():
            module.training = mode


def outputs_match(a: nn.Module, b: nn.Module, x: Tensor, *, atol: float = 1e-6) -> float:
    """The function-preservation check: max |a(x) - b(x)| with both models in eval mode.

    Each model's train/eval flags are restored afterwards. Tuple/list/dict outputs are compared
    tensor by tensor. Returns ``inf`` when the outputs' structure or shapes differ, ``nan`` when
    an output has NaN. A difference above ``atol`` is logged (INFO) with its size; the caller
    decides (``outputs_match(...) <= atol``, or :func:`assert_outputs_match`).

    Example: a transplant into the same architecture must be the identity::

        target, _ = transplant(source, torchvision.models.resnet18(num_classes=10), "exact")
        assert outputs_match(source, target, torch.randn(4, 3, 32, 32)) <= 1e-6
    """
    out_a = _flat_tensors(_eval_forward(a, x))
    out_b = _flat_tensors(_eval_forward(b, x))
    if len(out_a) != len(out_b) or any(ta.shape != tb.shape for ta, tb in zip(out_a, out_b)):
        _logger.info("outputs_match: output structures differ")
        return float("inf")
    if not out_a:
        return 0.0
    diffs = torch.stack([(ta.float() - tb.float().to(ta.device)).abs().max() for ta, tb in zip(out_a, out_b)])
    diff = float(diffs.max())
    if not diff <= atol:
        _logger.info("outputs_match: max abs difference %.3g exceeds atol %.3g", diff, atol)
    return diff


def assert_outputs_match(a: nn.Module, b: nn.Module, x: Tensor, *, atol: float = 1e-6) -> float:
    """:func:`outputs_match`, raising ``AssertionError`` when the difference exceeds ``atol``."""
    diff = outputs_match(a, b, x, atol=atol)
    if not diff <= atol:
        raise AssertionError(f"outputs differ: max abs difference {diff:.3g} > atol {atol:.3g}")
    return diff


@register_op
class Transplant(Operation):
    """Build the target, copy the source into it by ``strategy``; the baseline is the target from random init."""

    name = "transplant"
    spec = TransplantSpec
    classes_field = "surgery.target.num_classes"
    blamed_field = "strategy"
    layer_map = True

    def apply(self, spec, source, *, example, num_classes, in_chans, build):
        target = build(spec.target, "surgery.target", num_classes=num_classes, in_chans=in_chans)
        return transplant(source, target, spec.strategy, adapt_input=spec.adapt_input)

    def models(self, spec):
        return [("surgery.target", spec.target)]

    def baseline_architecture(self, spec, source_ref):
        return spec.target.model
