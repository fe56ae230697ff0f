"""The activation probe: streamed per-layer statistics of a model's outputs over a probe set.

The probe hooks named modules, runs the probe set through the model batch by batch and keeps,
per layer, a constant amount of state whatever the probe-set size:

- moments: per call, the batch's mean and centred sum of squares (on a CPU, from one read of
  the sum and one of the sum of squares; two-pass, from deviations to a shift, where the mean is
  large against the spread and on other devices), merged across calls in float64 with Chan's
  parallel formula; min and max;
- the near-zero count (``|x| <= near_zero_eps``) and, per channel, whether it ever fired
  (a value > 0);
- a uniform sample of ``sample_size`` values, drawn without replacement. The probe knows the
  probe-set size, so once a layer's first output shows how many values a sample contributes,
  the positions of the sample among all the values to come are drawn up front (NumPy, seeded
  by ``seed`` and the layer name); each batch then only gathers the values at its positions.
  No random key per value, no per-batch top-k;
- the histogram, counted at the end on that sample: equal-width ``bins`` over the layer's
  exact [min, max], or on the edges a reference gives (values outside go to the end bins).

# NOTE: the histogram counts the sample, not every value. Counting every value (``histc``,
# ``bincount``) costs 1–2 ns per value on a CPU, more than the rest of the probe together and
# more than the 10% of a bare forward the probe may cost. On 16,384 sampled values the PSI
# of two identical distributions is ~0.005 (Evidently's alarm is 0.1 to 0.25); moments, min,
# max, near-zero and dead channels stay exact over all values.

On CUDA everything stays on the device while the batches stream: after the first batch (whose
hook copies the sample's positions over once), no host synchronisation until
:meth:`ProbePass.finish`. Non-finite values (NaN, inf) are counted in ``nonfinite`` and
left out of every statistic but the dead-channel test.

Example::

    ref = probe_activations(source, probe_x, ["layer?"])
    pat = probe_activations(patient, probe_x, ["layer?"], edges=ref)   # the reference's bins
    from surgery.stats.drift import drift_table
    drift_table(ref, pat)                                               # one row per layer
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from surgery.stats.cka import gram
from surgery.errors import SurgeryInputError

__all__ = [
    "NEAR_ZERO_EPS",
    "SAMPLE_SIZE",
    "GRAM_BATCH",
    "LayerStats",
    "ProbeStats",
    "ProbePass",
    "resolve_layers",
    "probe_activations",
    "shared_edges",
]

# NOTE: an absolute threshold, chosen, not derived. It counts the exact zeros of ReLU-like
# activations (and float32 round-off around them) without needing the layer's scale, which a
# streamed single pass does not know in advance. GELU/SiLU negatives (~1e-2) are not "near zero".
NEAR_ZERO_EPS = 1e-6
# Values per layer in the uniform sample behind W1, KS and the histogram.
SAMPLE_SIZE = 16_384
# Examples per minibatch of the streamed CKA: its Gram matrices cost examples x this x features.
GRAM_BATCH = 64
# Values per row whose squares are summed in float32 (the rows' sums are added in float64).
SQUARES_ROW = 4096
# The one-read moments are used while sum(x^2) <= this x M2 (|mean| <= 3.9 std): their error stays below 1e-6.
CANCELLATION_LIMIT = 16.0


# ----------------------------------------------------------------------------- layer names


def resolve_layers(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Module names of ``model`` selected by exact names or ``fnmatch`` globs, in model order.

    Globs follow ``fnmatch.fnmatchcase`` over ``model.named_modules()`` names, so ``*`` also
    crosses dots: ``layer?`` selects the four ResNet stages, ``layer*`` every module below
    them too. The root module (name ``""``) is never selected. A pattern that matches nothing
    raises ``SurgeryInputError`` naming it and the closest valid names.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    names = [n for n, _ in model.named_modules() if n]
    name_set = set(names)
    selected: set[str] = set()
    for pattern in patterns:
        if pattern in name_set:
            selected.add(pattern)
            continue
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise SurgeryInputError(
                f"layer {pattern!r} matches no module of {type(model).__name__}; {_suggest(pattern, names)}"
            )
        selected.update(hits)
    return [n for n in names if n in selected]


def _suggest(pattern: str, names: list[str]) -> str:
    close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.5)
    if close:
        return "close names: " + ", ".join(close)
    top = [n for n in names if "." not in n][:8]
    return "top-level modules: " + (", ".join(top) if top else "(none)")


# ----------------------------------------------------------------------------- results


@dataclass
class LayerStats:
    """Streamed statistics of one layer's output over a probe set.

    ``count`` is the number of finite values the statistics cover (all calls of the module,
    all samples, all positions); ``nonfinite`` counts NaN/inf values, which are left out of
    every statistic except the dead-channel test. ``std`` is the population std (ddof=0).
    Channels are dim 1 of the output (NCHW and (N, features) layouts; for a ViT's (N, L, D)
    output that is the token axis). A module called ``calls`` times per forward has its
    channels counted per call: ``channels`` is their sum and ``dead_channels`` index the
    concatenation, call 0 first. ``sample`` is a uniform sample of the finite values (all of
    them when there are at most ``SAMPLE_SIZE``); the histogram has ``len(hist_counts)`` bins
    on ``hist_edges`` (float64, one more than bins) and counts that sample.
    """

    name: str
    count: int
    mean: float
    std: float
    min: float
    max: float
    near_zero_frac: float
    dead_channel_frac: float
    channels: int
    hist_counts: Tensor
    hist_edges: Tensor
    sample: Tensor
    dead_channels: list[int] = field(default_factory=list)
    calls: int = 1
    nonfinite: int = 0
    shape: list[int] = field(default_factory=list)  # per-sample output shape of the first call
    near_zero_eps: float = NEAR_ZERO_EPS

    def to_dict(self, *, sample: bool = True) -> dict[str, Any]:
        """Plain JSON-able numbers and lists (NaN stays a float NaN when ``count`` is 0)."""
        d: dict[str, Any] = {
            "name": self.name,
            "count": int(self.count),
            "mean": float(self.mean),
            "std": float(self.std),
            "min": float(self.min),
            "max": float(self.max),
            "near_zero_frac": float(self.near_zero_frac),
            "near_zero_eps": float(self.near_zero_eps),
            "dead_channel_frac": float(self.dead_channel_frac),
            "channels": int(self.channels),
            "dead_channels": [int(c) for c in self.dead_channels],
            "calls": int(self.calls),
            "nonfinite": int(self.nonfinite),
            "shape": [int(s) for s in self.shape],
            "hist_counts": [int(c) for c in self.hist_counts.tolist()],
            "hist_edges": [float(e) for e in self.hist_edges.tolist()],
        }
        if sample:
            d["sample"] = [float(v) for v in self.sample.tolist()]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerStats":
        """Inverse of ``to_dict`` (an absent sample comes back empty)."""
        d = dict(data)
        d["hist_counts"] = torch.tensor(d["hist_counts"], dtype=torch.int64)
        d["hist_edges"] = torch.tensor(d["hist_edges"], dtype=torch.float64)
        d["sample"] = torch.tensor(d.get("sample", []), dtype=torch.float32)
        return cls(**d)


class ProbeStats(dict[str, LayerStats]):
    """The result of one probe pass: ``LayerStats`` by layer name, in model order."""

    def edges(self) -> dict[str, Tensor]:
        """Each layer's histogram edges: pass as ``edges=`` so another probe counts on the same bins."""
        return shared_edges(self)

    def to_dict(self, *, sample: bool = False) -> dict[str, dict[str, Any]]:
        """Plain JSON-able statistics per layer (samples left out unless asked for)."""
        return {name: stats.to_dict(sample=sample) for name, stats in self.items()}


def shared_edges(reference: Mapping[str, LayerStats]) -> dict[str, Tensor]:
    """The histogram edges a patient probe must reuse to be compared with ``reference``."""
    return {name: s.hist_edges.clone() for name, s in reference.items()}


# ----------------------------------------------------------------------------- streaming


class _SamplePlan:
    """Where a uniform sample of one call ordinal's values lies, drawn before the values arrive."""

    def __init__(self, total: int, size: int, rng: np.random.Generator, device: torch.device):
        if size >= total:
            positions = np.arange(total, dtype=np.int64)
        else:
            positions = np.sort(rng.choice(total, size=size, replace=False, shuffle=False)).astype(np.int64)
        self.total = total
        self.host = positions  # bounds per batch are found on the host ...
        self.device_positions = torch.from_numpy(positions).to(device)  # ... and gathered on the device
        self.offset = 0
        self.values: list[Tensor] = []

    def take(self, flat: Tensor, channels_last_shape: Sequence[int] | None = None) -> None:
        """Keep the values of ``flat`` (the next ``flat.numel()`` values in order) that the plan chose.

        With ``channels_last_shape`` (N, C, H, W), ``flat`` holds a channels_last tensor in memory order
        (N, H, W, C); the plan's positions count in the logical (N, C, H, W) order all the same.
        """
        n = flat.numel()
        lo, hi = np.searchsorted(self.host, [self.offset, self.offset + n])
        if hi > lo:
            index = self.device_positions[lo:hi] - self.offset
            if channels_last_shape is not None:
                _, c, h, w = channels_last_shape
                image, rest = index // (c * h * w), index % (c * h * w)
                channel, pixel = rest // (h * w), rest % (h * w)
                index = image * (c * h * w) + pixel * c + channel
            self.values.append(flat[index])
        self.offset += n


class _Scratch:
    """One float32 buffer shared by every layer of a pass, as large as the largest output seen."""

    def __init__(self) -> None:
        self.buffer: Tensor | None = None

    def get(self, like: Tensor) -> Tensor:
        if self.buffer is None or self.buffer.numel() < like.numel() or self.buffer.device != like.device:
            self.buffer = torch.empty(like.numel(), dtype=torch.float32, device=like.device)
        return self.buffer[: like.numel()]


class _LayerAccumulator:
    """Everything the probe keeps for one layer: O(sample + channels), whatever the probe size."""

    def __init__(
        self,
        name: str,
        *,
        total_samples: int,
        sample_size: int,
        seed: int,
        near_zero_eps: float,
        device: torch.device,
        scratch: "_Scratch",
    ):
        self.name = name
        self.scratch = scratch
        self.total_samples = total_samples
        self.sample_size = sample_size
        self.rng = np.random.default_rng((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        self.eps = near_zero_eps
        self.device = device
        self.sync_free = device.type != "cpu"  # on a CPU, reading a scalar costs nothing: take the fast path
        # Running state: Python numbers until a device tensor is merged in (then tensors, on the device).
        self.n: Any = 0
        self.mean: Any = 0.0
        self.m2: Any = 0.0
        self.lo: Any = math.inf
        self.hi: Any = -math.inf
        self.near_zero: Any = 0
        self.nonfinite: Any = 0
        if self.sync_free:  # made on the device now, so that merging never copies a Python number over
            self.n, self.mean, self.m2, self.lo, self.hi = (
                torch.tensor(v, dtype=torch.float64, device=device) for v in (0.0, 0.0, 0.0, math.inf, -math.inf)
            )
            self.near_zero, self.nonfinite = (torch.zeros((), dtype=torch.int64, device=device) for _ in range(2))
        self.alive: list[Tensor] = []  # per call ordinal: bool[channels], True once a value > 0 was seen
        self.plans: list[_SamplePlan] = []  # per call ordinal
        self.per_sample: list[int] = []  # per call ordinal: values per input sample
        self.call = 0
        self.batch = 0
        self.max_calls = 0
        self.shape: list[int] = []

    def start_batch(self, batch: int) -> None:
        self.call, self.batch = 0, batch

    def update(self, output: Tensor) -> None:
        x = output.detach()
        if x.dtype != torch.float32:
            x = x.float()  # bf16/fp16 outputs (autocast) and integer outputs alike
        ordinal = self.call
        self.call += 1
        self.max_calls = max(self.max_calls, self.call)
        if not self.shape:
            self.shape = list(x.shape[1:])
        # A channels_last output (what the harness's models give) is read in memory order: reshaping it
        # to logical order would copy it, and its per-channel maxima are then a column reduction.
        pixels = _channels_last_pixels(x)
        flat = x.reshape(-1) if pixels is None else pixels.reshape(-1)
        self._plan(ordinal, flat.numel()).take(flat, None if pixels is None else x.shape)
        channel_max = self._update_channels(x, ordinal, pixels)
        if flat.numel():
            self._update_values(flat, channel_max)

    def _plan(self, ordinal: int, numel: int) -> _SamplePlan:
        if ordinal == len(self.plans):
            if numel % self.batch:
                raise SurgeryInputError(
                    f"layer {self.name!r}: its output ({numel} values for a batch of {self.batch}) does not scale "
                    "with the batch; probe a module whose output has the batch as its first dimension"
                )
            self.per_sample.append(numel // self.batch)
            self.plans.append(
                _SamplePlan(self.per_sample[-1] * self.total_samples, self.sample_size, self.rng, self.device)
            )
        elif numel != self.per_sample[ordinal] * self.batch:
            raise SurgeryInputError(
                f"layer {self.name!r}: call {ordinal} gave {numel} values for a batch of {self.batch}, earlier "
                f"{self.per_sample[ordinal]} per sample; the probe needs outputs of one size per sample"
            )
        return self.plans[ordinal]

    def _update_channels(self, x: Tensor, ordinal: int, pixels: Tensor | None) -> Tensor | None:
        if x.dim() >= 2:
            if not x.numel():
                channel_max = None
            elif pixels is not None:  # channels_last: (pixels, channels) rows, reduced over the rows
                channel_max = pixels.amax(0)
            else:  # over the batch first (an elementwise max of contiguous slabs), then the small rest
                channel_max = x.amax(0).flatten(1).amax(1) if x.dim() > 2 else x.amax(0)
            fired = (
                channel_max > 0
                if channel_max is not None
                else torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
            )
        else:
            channel_max = None
            fired = (x > 0).any().reshape(1)  # NaN compares False: a NaN never makes a channel alive
        if ordinal == len(self.alive):
            self.alive.append(fired)
        elif self.alive[ordinal].numel() != fired.numel():
            raise SurgeryInputError(
                f"layer {self.name!r}: call {ordinal} gave {fired.numel()} channels, "
                f"earlier {self.alive[ordinal].numel()}"
            )
        else:
            self.alive[ordinal] |= fired
        return channel_max

    def _update_values(self, flat: Tensor, channel_max: Tensor | None) -> None:
        moments = None if self.sync_free else self._moments_host(flat, channel_max)
        self._merge(*(moments or self._moments_masked(flat)))

    def _moments_host(self, flat: Tensor, channel_max: Tensor | None) -> tuple | None:
        """(n, mean, M2, min, max, near-zero count) of ``flat`` as Python numbers: the CPU's fast path.

        None when ``flat`` holds a NaN or an infinity (the masked path handles those).
        """
        n = flat.numel()
        # One read each for the sum and the sum of squares, nothing written: M2 = sum(x^2) - sum(x)^2 / n,
        # which is exact to ~4e-8 x sum(x^2) / M2 (cascade sum; squares summed per row of SQUARES_ROW values in
        # float32, the rows in float64). Where the mean is large against the spread that cancels: the
        # shifted two-pass moments then (two passes more, one written).
        total = float(flat.sum())
        squares = _sum_of_squares(flat)
        if not (math.isfinite(total) and math.isfinite(squares)):
            return None
        m2 = squares - total * total / n
        if squares > CANCELLATION_LIMIT * m2:
            mean, m2 = self._shifted_moments(flat)
        else:
            mean = total / n
        lo = float(flat.amin())
        hi = float(channel_max.amax() if channel_max is not None else flat.amax())
        # A compare written as floats and summed is 3x faster than counting a bool tensor.
        # NOTE: float sums of ones are exact below 2**24, so larger outputs are counted in slices.
        scratch = self.scratch.get(flat)
        if lo < -self.eps:
            torch.abs(flat, out=scratch).le_(self.eps)
        else:
            torch.le(flat, self.eps, out=scratch)
        near_zero = sum(int(part.sum()) for part in scratch.split(1 << 24))
        return n, mean, m2, lo, hi, near_zero

    def _shifted_moments(self, flat: Tensor) -> tuple[float, float]:
        """(mean, M2) of finite ``flat`` from deviations to a float32 shift: no cancellation when |mean| >> std.

        The shift is the running mean, or the first value of the first call; the deviations' own sum
        corrects mean and M2 for it, so no pass is spent on the batch's mean. Both sums are cascade
        sums (float32 BLAS dot products lose 1e-4 relative over millions of values).
        """
        n = flat.numel()
        shift = float(np.float32(self.mean if self.n else flat[0]))
        scratch = self.scratch.get(flat)
        deviation_sum = float(torch.sub(flat, shift, out=scratch).sum())
        squares = float(scratch.square_().sum())
        return shift + deviation_sum / n, squares - deviation_sum * deviation_sum / n

    def _moments_masked(self, flat: Tensor) -> tuple:
        """The same as device tensors, leaving out non-finite values; no host synchronisation."""
        mask = torch.isfinite(flat)
        finite = mask.sum()
        self.nonfinite = self.nonfinite + (flat.numel() - finite)
        n = finite.double()
        shift = torch.where(mask, flat, 0.0).sum() / n.clamp(min=1).float()
        deviations = torch.where(mask, flat - shift, 0.0)
        deviation_sum = deviations.sum().double()
        m2 = deviations.square_().sum().double() - deviation_sum * deviation_sum / n.clamp(min=1)
        mean = shift.double() + deviation_sum / n.clamp(min=1)
        lo = torch.where(mask, flat, math.inf).amin().double()
        hi = torch.where(mask, flat, -math.inf).amax().double()
        near_zero = torch.count_nonzero(mask & (flat.abs() <= self.eps))
        return n, mean, m2, lo, hi, near_zero

    def _merge(self, n: Any, mean: Any, m2: Any, lo: Any, hi: Any, near_zero: Any) -> None:
        """Chan et al.: merge (n, mean, M2) of one call into the running moments, in float64.

        The arguments are Python numbers (CPU fast path) or device tensors (elsewhere); the
        running state becomes a tensor as soon as one tensor is merged.
        """
        n_total = self.n + n
        delta = mean - self.mean
        weight = n / n_total if isinstance(n_total, (int, float)) else n / n_total.clamp(min=1)
        self.mean = self.mean + delta * weight
        self.m2 = self.m2 + m2 + delta * delta * self.n * weight
        self.n = n_total
        if isinstance(lo, float) and isinstance(self.lo, float):
            self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        else:
            self.lo = torch.minimum(self._tensor(self.lo), self._tensor(lo))
            self.hi = torch.maximum(self._tensor(self.hi), self._tensor(hi))
        self.near_zero = self.near_zero + near_zero

    def _tensor(self, value: Any) -> Tensor:
        return torch.as_tensor(value, dtype=torch.float64, device=self.device)

    def finish(self, bins: int, edges: Tensor | None) -> LayerStats:
        if self.max_calls == 0:
            raise SurgeryInputError(
                f"layer {self.name!r} was not called in the forward pass (or its output "
                "holds no tensor); pick a layer the forward uses"
            )
        alive = torch.cat([a.cpu() for a in self.alive])
        dead = (~alive).nonzero().flatten().tolist()
        n = int(self.n)
        nan = math.nan
        lo, hi = (float(self.lo), float(self.hi)) if n else (nan, nan)
        sample = self._sample()
        if edges is None:
            edges = _equal_width_edges(lo, hi, bins)
        counts = histogram(sample, edges)
        return LayerStats(
            name=self.name,
            count=n,
            mean=float(self.mean) if n else nan,
            std=math.sqrt(max(float(self.m2), 0.0) / n) if n else nan,
            min=lo,
            max=hi,
            near_zero_frac=int(self.near_zero) / n if n else nan,
            dead_channel_frac=len(dead) / alive.numel() if alive.numel() else 0.0,
            channels=int(alive.numel()),
            dead_channels=dead,
            calls=self.max_calls,
            nonfinite=int(self.nonfinite),
            shape=self.shape,
            near_zero_eps=self.eps,
            hist_counts=counts,
            hist_edges=edges,
            sample=sample,
        )

    def _sample(self) -> Tensor:
        """The finite sampled values of every call ordinal, merged into one uniform sample."""
        parts = [torch.cat(p.values).cpu() if p.values else torch.empty(0) for p in self.plans]
        if len(parts) > 1:
            # Each ordinal's sample is uniform within it: a multivariate hypergeometric draw of how many
            # to keep from each makes a uniform sample of the union.
            totals = np.array([p.total for p in self.plans], dtype=np.int64)
            keep = self.rng.multivariate_hypergeometric(totals, min(self.sample_size, int(totals.sum())))
            parts = [part[torch.from_numpy(self.rng.permutation(len(part))[:k])] for part, k in zip(parts, keep)]
        sample = torch.cat(parts) if parts else torch.empty(0)
        return sample[torch.isfinite(sample)].float().clone()


def _channels_last_pixels(x: Tensor) -> Tensor | None:
    """For a 4-D channels_last ``x`` that is not also contiguous: a (N·H·W, C) view of it, else None."""
    if x.dim() != 4 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return None
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _sum_of_squares(flat: Tensor) -> float:
    """The sum of the squares of contiguous ``flat``, read once: float32 norms of its rows, their squares in float64."""
    rows = flat.numel() // SQUARES_ROW
    head = flat[: rows * SQUARES_ROW].view(rows, SQUARES_ROW)
    total = float(torch.linalg.vector_norm(head, dim=1).double().square().sum()) if rows else 0.0
    tail = flat[rows * SQUARES_ROW :]
    return total + (float(torch.linalg.vector_norm(tail)) ** 2 if tail.numel() else 0.0)


def _equal_width_edges(lo: float, hi: float, bins: int) -> Tensor:
    """``bins`` equal-width bins over [lo, hi] (a unit span around a constant; [0, 1] without data)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    elif hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return torch.linspace(lo, hi, bins + 1, dtype=torch.float64)


def histogram(values: Tensor, edges: Tensor) -> Tensor:
    """Counts of ``values`` on ``edges`` (int64, one fewer than edges); values outside go to the end bins."""
    edges = edges.detach().to("cpu", torch.float64).flatten()
    index = torch.bucketize(values.detach().to("cpu", torch.float64), edges[1:-1], right=True)
    return torch.bincount(index, minlength=edges.numel() - 1)


def _first_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, Tensor):
                return item
    if isinstance(output, Mapping):
        for item in output.values():
            if isinstance(item, Tensor):
                return item
    return None


def _edges_for(edges: Mapping[str, Tensor | LayerStats] | None, name: str) -> Tensor | None:
    if edges is None:
        return None
    if name not in edges:
        raise ValueError(f"no histogram edges given for layer {name!r} (have: {', '.join(edges) or 'none'})")
    e = edges[name]
    e = e.hist_edges if isinstance(e, LayerStats) else torch.as_tensor(e)
    e = e.detach().to("cpu", torch.float64).flatten()
    if e.numel() < 2 or not bool((e[1:] > e[:-1]).all()):
        raise ValueError(f"histogram edges for layer {name!r} must be at least 2 strictly increasing values")
    return e


class ProbePass:
    """One probe pass over a model, fed batch by batch: hooks on entry, statistics from :meth:`finish`.

    ``total_samples`` is the number of input samples that will be fed in all (the sample's
    positions are drawn from it). Feeding stays on the device: on CUDA nothing synchronises
    with the host until ``finish``. Use it as a context manager so the hooks always go::

        with ProbePass(model, ["layer?"], total_samples=len(x)) as probe:
            for batch in x.split(256):
                probe.feed(batch)
        stats = probe.finish()
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        *,
        total_samples: int,
        device: str | torch.device = "cpu",
        sample_size: int = SAMPLE_SIZE,
        bins: int = 40,
        edges: Mapping[str, Tensor | LayerStats] | None = None,
        seed: int = 0,
        near_zero_eps: float = NEAR_ZERO_EPS,
        gram_layers: Sequence[str] = (),
        gram_batch: int = GRAM_BATCH,
    ):
        self.names = resolve_layers(model, layers) if layers else []
        self.gram_names = resolve_layers(model, gram_layers) if gram_layers else []
        if not self.names and not self.gram_names:
            raise SurgeryInputError("no layers to probe: the layer list is empty")
        if total_samples < 1:
            raise SurgeryInputError("the probe set is empty")
        if bins < 1 or sample_size < 0:
            raise ValueError("bins must be >= 1 and sample_size >= 0")
        self.model, self.device, self.bins = model, torch.device(device), bins
        self.edges = {n: _edges_for(edges, n) for n in self.names}
        scratch = _Scratch()
        self.accumulators = {
            n: _LayerAccumulator(
                n,
                total_samples=total_samples,
                sample_size=sample_size,
                seed=seed,
                near_zero_eps=near_zero_eps,
                device=self.device,
                scratch=scratch,
            )
            for n in self.names
        }
        self.gram_batch = gram_batch
        self.grams: dict[str, list[Tensor]] = {}
        self.last_gram: tuple[Tensor, list[Tensor]] | None = None  # the latest output whose Grams were computed
        self.modes = {m: m.training for m in model.modules()}
        self.handles: list[Any] = []

    def __enter__(self) -> "ProbePass":
        modules = dict(self.model.named_modules())
        for name, acc in self.accumulators.items():
            self.handles.append(modules[name].register_forward_hook(_hook(acc)))
        for name in self.gram_names:
            self.handles.append(modules[name].register_forward_hook(self._gram_hook(name)))
        self.model.to(self.device)
        self.model.eval()
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for module, training in self.modes.items():
            module.training = training

    @torch.inference_mode()
    def feed(self, batch: Tensor) -> None:
        """Run one batch (moved to the device) through the model and accumulate each layer's output."""
        for acc in self.accumulators.values():
            acc.start_batch(batch.shape[0])
        self.grams, self.last_gram = {}, None
        self.model(batch.to(self.device, non_blocking=True))
        self.last_gram = None

    def _gram_hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is not None and name not in self.grams:  # the first call of a module called twice
                # A container's output is often its last child's very tensor (ResNet's layer4 and layer4.1), and
                # its hook fires right after the child's: the Grams of that one tensor are computed once.
                # NOTE: matched by identity with the tensor held, never by address: a freed output's memory is
                # reused for a later block's (ResNet-50's layer2.2 lies where layer2.0 lay).
                if self.last_gram is not None and self.last_gram[0] is tensor:
                    self.grams[name] = self.last_gram[1]
                else:
                    self.grams[name] = [gram(part) for part in tensor.detach().split(self.gram_batch)]
                    self.last_gram = (tensor, self.grams[name])

        return hook

    def batch_grams(self) -> list[list[Tensor]]:
        """The last batch's Gram matrices, per minibatch of ``gram_batch`` examples: one per layer of ``gram_names``.

        ``gram_names`` are the ``gram_layers`` resolved, in model order.
        """
        missing = [n for n in self.gram_names if n not in self.grams]
        if missing:
            raise SurgeryInputError(
                f"layer {missing[0]!r} was not called in the forward pass (or its output holds "
                "no tensor); pick a layer the forward uses"
            )
        return [list(parts) for parts in zip(*(self.grams[n] for n in self.gram_names))]

    def finish(self, edges: Mapping[str, Tensor | LayerStats] | None = None) -> ProbeStats:
        """The statistics of everything fed, per layer (the one place that reads back to the host).

        ``edges`` given here replace those given at construction: a pass run beside its reference
        learns the reference's bins only when both finish.
        """
        bins = {n: _edges_for(edges, n) for n in self.names} if edges is not None else self.edges
        return ProbeStats((n, self.accumulators[n].finish(self.bins, bins[n])) for n in self.names)


def _hook(acc: _LayerAccumulator):
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        tensor = _first_tensor(output)
        if tensor is not None:
            acc.update(tensor)

    return hook


def batches(inputs: Any, batch_size: int) -> Iterator[Tensor]:
    """``inputs`` (a tensor, or cached images indexed like one) in consecutive slices of ``batch_size``."""
    for start in range(0, inputs.shape[0], batch_size):
        yield inputs[start : start + batch_size]


def _batch_images(batch: Any) -> Tensor:
    """The images of one batch of a DataLoader: the batch itself, or the first item of an (images, labels) pair."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise SurgeryInputError(f"a probe batch is a {type(batch).__name__}; expected a tensor or an (images, labels) pair")


def input_batches(inputs: Any, batch_size: int) -> tuple[int, Iterable[Tensor]]:
    """The number of samples in ``inputs`` and its batches.

    ``inputs``: a tensor or cached images (sliced by ``batch_size``), a ``DataLoader`` (its dataset's
    length; batches as it gives them, ``(images, labels)`` or images), or a list of batches. A one-shot
    iterator is refused: the sample plan needs the count before the first batch.
    """
    if hasattr(inputs, "shape"):
        return int(inputs.shape[0]) if len(inputs.shape) else 0, batches(inputs, batch_size)
    if isinstance(inputs, torch.utils.data.DataLoader):
        dataset = inputs.dataset
        if not hasattr(dataset, "__len__"):
            raise SurgeryInputError(
                "probe: the DataLoader's dataset has no length (an IterableDataset); pass a "
                "map-style dataset or a list of batches"
            )
        total = len(dataset)
        if inputs.drop_last and inputs.batch_size:
            total -= total % inputs.batch_size
        return total, (_batch_images(b) for b in inputs)
    if isinstance(inputs, Sequence):
        images = [_batch_images(b) for b in inputs]
        return sum(int(b.shape[0]) for b in images), images
    raise SurgeryInputError(
        f"probe: inputs are a {type(inputs).__name__}; expected a tensor, a DataLoader or a list of batches"
    )


def probe_activations(
    model: nn.Module,
    inputs: Any,
    layers: Sequence[str],
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    sample_size: int = SAMPLE_SIZE,
    bins: int = 40,
    edges: Mapping[str, Tensor | LayerStats] | None = None,
    seed: int = 0,
    near_zero_eps: float = NEAR_ZERO_EPS,
) -> ProbeStats:
    """Stream ``inputs`` through ``model`` and summarise the output of each selected layer.

    ``inputs``: a tensor ``(N, ...)``, cached images, a ``DataLoader`` or a list of batches
    (:func:`input_batches`); a DataLoader's batches may be ``(images, labels)`` pairs.

    ``layers`` are names or globs (see ``resolve_layers``). The model is moved to ``device``
    (as ``nn.Module.to`` does, in place) and run in eval mode under ``torch.inference_mode``;
    each module's train/eval flag is restored afterwards and the hooks are always removed.
    Each call of a hooked module is accumulated (a ReLU reused twice per block counts twice);
    tuple/list/dict outputs contribute their first tensor; outputs are cast to float32.

    Histograms: with ``edges`` (a mapping layer -> edges tensor, or another probe's
    ``ProbeStats`` itself) counts are made on those bins and values outside go to the end
    bins. Without, ``bins`` equal-width bins cover the layer's [min, max]. The sample of
    ``sample_size`` values is uniform and deterministic given ``seed`` and the layer name.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    total, stream = input_batches(inputs, batch_size)
    if total == 0:
        raise SurgeryInputError("the probe set is empty")
    with ProbePass(
        model,
        layers,
        total_samples=total,
        device=device,
        sample_size=sample_size,
        bins=bins,
        edges=edges,
        seed=seed,
        near_zero_eps=near_zero_eps,
    ) as probe:
        fed = 0
        for batch in stream:
            fed += int(batch.shape[0])
            if fed > total:
                raise SurgeryInputError(f"probe: the inputs gave more than the {total} samples their length says")
            probe.feed(batch)
    return probe.finish()
