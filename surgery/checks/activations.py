"""Activation probe and drift metrics: streamed per-layer statistics, compared between two models.

The probe hooks named modules, runs a probe set through the model batch by batch and keeps,
per layer, only a constant amount of state (``LayerStats``): Welford moments merged per batch
with Chan's parallel formula (float64), min/max, the near-zero fraction, which channels ever
fire, an exact histogram and a uniform reservoir sample. Memory does not grow with the
probe-set size: nothing is kept beyond the current batch, the reservoir and the histogram.

Drift between a reference model and a patient (the model after surgery, or after fine-tune)
is measured per layer on those summaries:

- ``wasserstein_norm``: W1 between the two reservoir samples divided by the reference std
  (Evidently's default drift test for numerical data, threshold 0.1);
- ``ks``: the two-sample Kolmogorov–Smirnov statistic on the reservoirs;
- ``psi``: population stability index on histogram bins shared by both models.

Edges convention: probe the reference first, then probe every patient with
``edges=shared_edges(reference)`` (or simply ``edges=reference``) so both histograms count on
the same bins; patient values outside the reference range land in the end bins.

Example::

    layers = resolve_layers(model, ["layer?"])
    ref = probe_activations(source, probe_x, layers)
    pat = probe_activations(patient, probe_x, layers, edges=shared_edges(ref))
    table = drift_table(ref, pat)          # pandas.DataFrame, one row per layer
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from pydantic import Field

from surgery.checks.base import Check, register_check, seeds_label, worst_dead_row, worst_drift_row
from surgery.spec import Strict, UnitThreshold, threshold
from surgery.errors import SurgeryInputError

__all__ = [
    "NEAR_ZERO_EPS",
    "PSI_EPS",
    "W1_NORM_FLOOR",
    "LayerStats",
    "resolve_layers",
    "probe_activations",
    "shared_edges",
    "wasserstein_1d",
    "ks_statistic",
    "psi",
    "drift",
    "drift_table",
    "DRIFT_COLUMNS",
]

# NOTE: an absolute threshold, chosen, not derived. It counts the exact zeros of ReLU-like
# activations (and float32 round-off around them) without needing the layer's scale, which a
# streamed single pass does not know in advance. GELU/SiLU negatives (~1e-2) are not "near zero".
NEAR_ZERO_EPS = 1e-6
# Evidently's conventions: the W1 normaliser is max(std(reference), 0.001), and empty histogram
# bins get a share of 0.0001 in the PSI so the logarithm stays finite.
W1_NORM_FLOOR = 1e-3
PSI_EPS = 1e-4
# Resolution of the streamed histogram: cells per output bin on the internal grid.
_CELLS_PER_BIN = 256
# Values handled at once in float64 (8 MiB): the probe's temporaries do not grow with the batch.
_CHUNK = 1 << 20


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
                f"layer {pattern!r} matches no module of {type(model).__name__}; "
                f"{_suggest(pattern, names)}")
        selected.update(hits)
    return [n for n in names if n in selected]


def _suggest(pattern: str, names: list[str]) -> str:
    close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.5)
    if close:
        return "close names: " + ", ".join(close)
    top = [n for n in names if "." not in n][:8]
    return "top-level modules: " + (", ".join(top) if top else "(none)")


# ----------------------------------------------------------------------------- statistics

@dataclass
class LayerStats:
    """Streamed statistics of one layer's output over a probe set.

    ``count`` is the number of finite values the statistics cover (all calls of the module,
    all samples, all positions); ``nonfinite`` counts NaN/inf values, which are left out of
    every statistic except the dead-channel test. ``std`` is the population std (ddof=0).
    Channels are dim 1 of the output (NCHW and (N, features) layouts; for a ViT's (N, L, D)
    output that is the token axis). A module called ``calls`` times per forward has its
    channels counted per call: ``channels`` is their sum and ``dead_channels`` index the
    concatenation, call 0 first. The histogram has ``len(hist_counts)`` bins on
    ``hist_edges`` (float64, one more than bins); its counts sum to ``count``.
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
    reservoir: Tensor
    dead_channels: list[int] = field(default_factory=list)
    calls: int = 1
    nonfinite: int = 0
    shape: list[int] = field(default_factory=list)  # per-sample output shape of the first call
    near_zero_eps: float = NEAR_ZERO_EPS

    def to_dict(self, *, reservoir: bool = True) -> dict[str, Any]:
        """Plain JSON-able numbers and lists (NaN stays a float NaN when ``count`` is 0)."""
        d: dict[str, Any] = {
            "name": self.name, "count": int(self.count), "mean": float(self.mean), "std": float(self.std),
            "min": float(self.min), "max": float(self.max), "near_zero_frac": float(self.near_zero_frac),
            "near_zero_eps": float(self.near_zero_eps), "dead_channel_frac": float(self.dead_channel_frac),
            "channels": int(self.channels), "dead_channels": [int(c) for c in self.dead_channels],
            "calls": int(self.calls), "nonfinite": int(self.nonfinite), "shape": [int(s) for s in self.shape],
            "hist_counts": [int(c) for c in self.hist_counts.tolist()],
            "hist_edges": [float(e) for e in self.hist_edges.tolist()],
        }
        if reservoir:
            d["reservoir"] = [float(v) for v in self.reservoir.tolist()]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerStats":
        """Inverse of ``to_dict`` (an absent reservoir comes back empty)."""
        d = dict(data)
        d["hist_counts"] = torch.tensor(d["hist_counts"], dtype=torch.int64)
        d["hist_edges"] = torch.tensor(d["hist_edges"], dtype=torch.float64)
        d["reservoir"] = torch.tensor(d.get("reservoir", []), dtype=torch.float32)
        return cls(**d)


class _Histogram:
    """Exact counts, in one pass, on bins chosen by the data or given by a reference.

    Without given edges the counts live on a fine grid of ``bins * _CELLS_PER_BIN`` cells of a
    power-of-two width (so every cell edge is an exact float). The grid starts from the first
    batch's range, centred with room on both sides; a batch that falls outside re-centres it
    and, when needed, doubles the cell width by merging neighbour cells, which keeps every
    count exact. ``finish`` groups the occupied cells into exactly ``bins`` equal-width bins
    that cover [min, max] with less than ~1.5 bins of slack, split at both ends.
    With given edges, values are counted with ``bucketize``; values below the first edge go
    to the first bin and values above the last edge to the last bin.
    """

    def __init__(self, bins: int, edges: Tensor | None, device: torch.device):
        self.device = device
        self.edges = None if edges is None else edges.to(device=device, dtype=torch.float64)
        self.bins = bins if edges is None else int(edges.numel()) - 1
        self.cells = self.bins * _CELLS_PER_BIN
        self.width = 0.0   # cell width (a power of two)
        self.first = 0     # global index of cell 0: cell j covers [(first+j)*width, (first+j+1)*width)
        self.counts: Tensor | None = None
        if self.edges is not None:
            self.counts = torch.zeros(self.bins, dtype=torch.int64, device=device)

    def add(self, x: Tensor, lo: float, hi: float) -> None:
        """Count ``x`` (finite, float64, 1-D, non-empty) whose min and max are ``lo`` and ``hi``."""
        if self.edges is not None:
            idx = torch.bucketize(x, self.edges[1:-1], right=True)
            self.counts += torch.bincount(idx, minlength=self.bins)
            return
        if self.counts is None:
            span = max(hi - lo, max(abs(lo), abs(hi), 1.0) * 2.0 ** -20)
            self.width = 2.0 ** math.ceil(math.log2(span / (self.cells // 2)))
            a, b = math.floor(lo / self.width), math.floor(hi / self.width)
            self.first = a - (self.cells - (b - a + 1)) // 2
            self.counts = torch.zeros(self.cells, dtype=torch.int64, device=self.device)
        else:
            a, b = math.floor(lo / self.width), math.floor(hi / self.width)
            if a < self.first or b >= self.first + self.cells:
                self._regrid(a, b)
        idx = torch.floor(x / self.width).long() - self.first
        self.counts += torch.bincount(idx.clamp_(0, self.cells - 1), minlength=self.cells)

    def _regrid(self, a: int, b: int) -> None:
        """Re-centre (and coarsen by 2**p) the grid so it holds the counts and global cells a..b."""
        nz = torch.nonzero(self.counts).flatten()
        lo_g = min(a, self.first + int(nz[0]))
        hi_g = max(b, self.first + int(nz[-1]))
        p = 0
        while (hi_g >> p) - (lo_g >> p) + 1 > self.cells:  # >> is floor division for negatives too
            p += 1
        span = (hi_g >> p) - (lo_g >> p) + 1
        new_first = (lo_g >> p) - (self.cells - span) // 2
        old = self.first + torch.arange(self.cells, device=self.device)
        # |old| < 2**62, so an arithmetic shift by min(p, 62) is floor(old / 2**p) even for a huge p.
        new_idx = (old >> min(p, 62)) - new_first
        # Empty cells may map outside the new grid; clamping them adds zeros.
        counts = torch.zeros_like(self.counts).index_add_(0, new_idx.clamp_(0, self.cells - 1), self.counts)
        self.counts, self.first, self.width = counts, new_first, math.ldexp(self.width, p)

    def finish(self) -> tuple[Tensor, Tensor]:
        """(counts int64[bins], edges float64[bins + 1]) on the CPU."""
        if self.edges is not None:
            return self.counts.cpu(), self.edges.cpu()
        if self.counts is None or not bool(self.counts.any()):  # no finite value seen
            return torch.zeros(self.bins, dtype=torch.int64), torch.linspace(0.0, 1.0, self.bins + 1, dtype=torch.float64)
        nz = torch.nonzero(self.counts).flatten()
        f, last = int(nz[0]), int(nz[-1])
        group = -(-(last - f + 1) // self.bins)  # cells per output bin
        start = f - (self.bins * group - (last - f + 1)) // 2
        cell = torch.arange(self.cells, device=self.device)
        keep = (cell >= f) & (cell <= last)
        out_idx = torch.div(cell[keep] - start, group, rounding_mode="floor")
        counts = torch.zeros(self.bins, dtype=torch.int64, device=self.device).index_add_(0, out_idx, self.counts[keep])
        edges = (self.first + start + group * torch.arange(self.bins + 1, dtype=torch.float64)) * self.width
        return counts.cpu(), edges


class _Accumulator:
    """Everything the probe keeps for one layer: O(reservoir + bins + channels), whatever the probe size."""

    def __init__(self, name: str, *, reservoir_size: int, bins: int, edges: Tensor | None, seed: int,
                 near_zero_eps: float):
        self.name = name
        self.reservoir_size = reservoir_size
        self.bins = bins
        self.given_edges = edges
        self.seed = (seed * 1_000_003 + zlib.crc32(name.encode())) % 2 ** 63  # per layer: independent of the others
        self.eps = near_zero_eps
        self.generator: torch.Generator | None = None
        self.hist: _Histogram | None = None
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.lo = math.inf
        self.hi = -math.inf
        self.near_zero = 0
        self.nonfinite = 0
        self.alive: list[Tensor] = []   # per call ordinal: bool[channels], True once a value > 0 was seen
        self.call = 0                   # call ordinal within the current forward
        self.max_calls = 0
        self.shape: list[int] = []
        self.res_vals: Tensor | None = None
        self.res_keys: Tensor | None = None

    def start_forward(self) -> None:
        self.call = 0

    def update(self, output: Tensor) -> None:
        x = output.detach()
        if x.dtype != torch.float32:
            x = x.float()  # bf16/fp16 outputs (autocast) and integer outputs alike
        ordinal = self.call
        self.call += 1
        self.max_calls = max(self.max_calls, self.call)
        if not self.shape:
            self.shape = list(x.shape[1:])
        self._update_channels(x, ordinal)

        flat = x.reshape(-1)
        finite = torch.isfinite(flat)
        n_finite = int(finite.sum())
        if n_finite < flat.numel():
            self.nonfinite += flat.numel() - n_finite
            flat = flat[finite]
        if n_finite == 0:
            return
        # Chunks bound the float64 temporaries (values, random keys) whatever the batch size.
        for chunk in flat.split(_CHUNK):
            self._update_values(chunk)

    def _update_values(self, flat: Tensor) -> None:
        x64 = flat.double()
        m = x64.numel()
        b_mean = x64.mean()
        b_m2 = ((x64 - b_mean) ** 2).sum()
        lo, hi = float(x64.min()), float(x64.max())
        b_mean_f, b_m2_f = float(b_mean), float(b_m2)
        # Chan et al.: merge (n, mean, M2) of this chunk into the running moments.
        n = self.n + m
        delta = b_mean_f - self.mean
        self.mean += delta * m / n
        self.m2 += b_m2_f + delta * delta * self.n * m / n
        self.n = n
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self.near_zero += int((flat.abs() <= self.eps).sum())
        if self.hist is None:
            self.hist = _Histogram(self.bins, self.given_edges, flat.device)
        self.hist.add(x64, lo, hi)
        del x64
        self._update_reservoir(flat)

    def _update_channels(self, x: Tensor, ordinal: int) -> None:
        if x.dim() >= 2:
            dims = [d for d in range(x.dim()) if d != 1]
            fired = x.amax(dim=dims) > 0  # NaN compares False: a NaN never makes a channel alive
        else:
            fired = (x > 0).any().reshape(1)
        if ordinal == len(self.alive):
            self.alive.append(fired)
        elif self.alive[ordinal].numel() != fired.numel():
            raise ValueError(f"layer {self.name!r}: call {ordinal} gave {fired.numel()} channels, "
                             f"earlier {self.alive[ordinal].numel()}")
        else:
            self.alive[ordinal] |= fired

    def _update_reservoir(self, flat: Tensor) -> None:
        # Uniform sampling without replacement: every value gets an iid U(0,1) key and the
        # reservoir holds the values with the k smallest keys seen so far.
        if self.generator is None:
            self.generator = torch.Generator(device=flat.device).manual_seed(self.seed)
        keys = torch.rand(flat.numel(), generator=self.generator, device=flat.device, dtype=torch.float64)
        k = self.reservoir_size
        if k <= 0:
            return
        if self.res_keys is not None and self.res_keys.numel() == k:
            cand = keys < self.res_keys.max()  # only these can enter a full reservoir
            keys, flat = keys[cand], flat[cand]
            if keys.numel() == 0:
                return
        all_keys = keys if self.res_keys is None else torch.cat([self.res_keys, keys])
        all_vals = flat if self.res_vals is None else torch.cat([self.res_vals, flat])
        if all_keys.numel() > k:
            all_keys, idx = torch.topk(all_keys, k, largest=False, sorted=False)
            all_vals = all_vals[idx]
        self.res_keys, self.res_vals = all_keys, all_vals.clone()

    def finish(self) -> LayerStats:
        if self.max_calls == 0:
            raise SurgeryInputError(f"layer {self.name!r} was not called in the forward pass (or its output "
                                    "holds no tensor); pick a layer the forward uses")
        alive = torch.cat([a.cpu() for a in self.alive])
        dead = (~alive).nonzero().flatten().tolist()
        counts, edges = (self.hist.finish() if self.hist is not None
                         else _Histogram(self.bins, self.given_edges, torch.device("cpu")).finish())
        res = torch.empty(0) if self.res_vals is None else self.res_vals.cpu()
        nan = math.nan
        return LayerStats(
            name=self.name, count=self.n,
            mean=self.mean if self.n else nan, std=math.sqrt(self.m2 / self.n) if self.n else nan,
            min=self.lo if self.n else nan, max=self.hi if self.n else nan,
            near_zero_frac=self.near_zero / self.n if self.n else nan,
            dead_channel_frac=len(dead) / alive.numel() if alive.numel() else 0.0,
            channels=int(alive.numel()), dead_channels=dead, calls=self.max_calls, nonfinite=self.nonfinite,
            shape=self.shape, near_zero_eps=self.eps,
            hist_counts=counts.clone(), hist_edges=edges.clone(), reservoir=res.float().clone())


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


def probe_activations(model: nn.Module, inputs: Tensor, layers: Sequence[str], *, batch_size: int = 256,
                      device: str | torch.device = "cpu", reservoir_size: int = 4096, bins: int = 40,
                      edges: Mapping[str, Tensor | LayerStats] | None = None, seed: int = 0,
                      near_zero_eps: float = NEAR_ZERO_EPS) -> dict[str, LayerStats]:
    """Stream ``inputs`` through ``model`` and summarise the output of each selected layer.

    ``layers`` are names or globs (see ``resolve_layers``). The model is moved to ``device``
    (as ``nn.Module.to`` does, in place) and run in eval mode under ``torch.inference_mode``;
    each module's train/eval flag is restored afterwards and the hooks are always removed.
    Each call of a hooked module is accumulated (a ReLU reused twice per block counts twice);
    tuple/list/dict outputs contribute their first tensor; outputs are cast to float32.

    Histograms: with ``edges`` (a mapping layer -> edges tensor, e.g. ``shared_edges(ref)``,
    or the reference's ``dict[str, LayerStats]`` itself) counts are made on those bins and
    values outside go to the end bins. Without, the edges are chosen in the same single pass
    (see ``_Histogram``): ``bins`` equal-width bins covering the layer's [min, max].

    The reservoir keeps ``reservoir_size`` values (all of them when fewer were seen), chosen
    uniformly and deterministically from ``seed`` and the layer name.
    """
    names = resolve_layers(model, layers)
    if not names:
        raise SurgeryInputError("no layers to probe: the layer list is empty")
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise SurgeryInputError("the probe set is empty")
    if batch_size < 1 or bins < 1 or reservoir_size < 0:
        raise ValueError("batch_size and bins must be >= 1 and reservoir_size >= 0")
    device = torch.device(device)
    modules = dict(model.named_modules())
    accs = {n: _Accumulator(n, reservoir_size=reservoir_size, bins=bins, edges=_edges_for(edges, n), seed=seed,
                            near_zero_eps=near_zero_eps) for n in names}
    modes = {m: m.training for m in model.modules()}
    handles = []

    def make_hook(acc: _Accumulator):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            t = _first_tensor(output)
            if t is not None:
                acc.update(t)
        return hook

    try:
        for n in names:
            handles.append(modules[n].register_forward_hook(make_hook(accs[n])))
        model.to(device)
        model.eval()
        with torch.inference_mode():
            for start in range(0, inputs.shape[0], batch_size):
                batch = inputs[start:start + batch_size].to(device, non_blocking=True)
                for acc in accs.values():
                    acc.start_forward()
                model(batch)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    # Outside inference_mode, so the returned tensors are ordinary tensors.
    return {n: accs[n].finish() for n in names}


def shared_edges(reference: Mapping[str, LayerStats]) -> dict[str, Tensor]:
    """The histogram edges a patient probe must reuse to be compared with ``reference``.

    Pass the result as ``probe_activations(..., edges=...)``: the reference's own bins, so PSI
    and the overlaid histograms compare counts on identical bins.
    """
    return {name: s.hist_edges.clone() for name, s in reference.items()}


# ----------------------------------------------------------------------------- drift

def _sample(x: Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    return np.sort(np.asarray(x, dtype=np.float64).ravel())


def wasserstein_1d(u: Tensor | np.ndarray, v: Tensor | np.ndarray) -> float:
    """W1 between two empirical samples: the integral of |F_u - F_v| (``scipy.stats.wasserstein_distance``)."""
    u, v = _sample(u), _sample(v)
    if u.size == 0 or v.size == 0:
        return math.nan
    values = np.sort(np.concatenate([u, v]))
    deltas = np.diff(values)
    cdf_u = np.searchsorted(u, values[:-1], side="right") / u.size
    cdf_v = np.searchsorted(v, values[:-1], side="right") / v.size
    return float(np.sum(np.abs(cdf_u - cdf_v) * deltas))


def ks_statistic(u: Tensor | np.ndarray, v: Tensor | np.ndarray) -> float:
    """Two-sample KS statistic sup |F_u - F_v| (``scipy.stats.ks_2samp(u, v).statistic``)."""
    u, v = _sample(u), _sample(v)
    if u.size == 0 or v.size == 0:
        return math.nan
    values = np.concatenate([u, v])
    cdf_u = np.searchsorted(u, values, side="right") / u.size
    cdf_v = np.searchsorted(v, values, side="right") / v.size
    return float(np.max(np.abs(cdf_u - cdf_v)))


def psi(reference_counts: Tensor | np.ndarray, patient_counts: Tensor | np.ndarray, *, eps: float = PSI_EPS) -> float:
    """Population stability index sum((p - q) * ln(p / q)) over bins shared by both counts.

    Shares of 0 are replaced by ``eps`` (Evidently's 0.0001) so empty bins stay finite.
    """
    p = np.asarray(torch.as_tensor(reference_counts).cpu().double().numpy(), dtype=np.float64)
    q = np.asarray(torch.as_tensor(patient_counts).cpu().double().numpy(), dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"PSI needs counts on the same bins, got {p.size} and {q.size} bins")
    if p.sum() <= 0 or q.sum() <= 0:
        return math.nan
    p, q = p / p.sum(), q / q.sum()
    p, q = np.where(p == 0, eps, p), np.where(q == 0, eps, q)
    return float(np.sum((p - q) * np.log(p / q)))


def drift(reference: LayerStats, patient: LayerStats) -> dict[str, Any]:
    """Drift of one layer from ``reference`` to ``patient``.

    Returns ``layer``, ``wasserstein`` (raw W1 on the reservoirs), ``wasserstein_norm`` (W1 /
    max(reference std, 0.001), the std being the reference's exact streamed std), ``ks``,
    ``psi`` and ``psi_basis``: ``"histogram"`` when both were counted on the same edges (the
    convention), else ``"reservoir"`` — both reservoirs binned on the reference's edges, an
    approximation flagged so a report can say so.
    """
    w1 = wasserstein_1d(reference.reservoir, patient.reservoir)
    norm = max(reference.std, W1_NORM_FLOOR) if math.isfinite(reference.std) else math.nan
    if (reference.hist_edges.shape == patient.hist_edges.shape
            and torch.equal(reference.hist_edges, patient.hist_edges)):
        value, basis = psi(reference.hist_counts, patient.hist_counts), "histogram"
    else:
        edges = reference.hist_edges.double()
        counts = [torch.bincount(torch.bucketize(s.reservoir.double(), edges[1:-1], right=True),
                                 minlength=edges.numel() - 1) for s in (reference, patient)]
        value, basis = psi(*counts), "reservoir"
    return {"layer": reference.name, "wasserstein": w1, "wasserstein_norm": w1 / norm,
            "ks": ks_statistic(reference.reservoir, patient.reservoir), "psi": value, "psi_basis": basis}


DRIFT_COLUMNS = ["layer", "w1_norm", "ks", "psi", "ref_mean", "ref_std", "pat_mean", "pat_std", "dead_channel_frac"]


def drift_table(reference: Mapping[str, LayerStats], patient: Mapping[str, LayerStats]) -> pd.DataFrame:
    """One row per layer of ``reference`` (in its order): drift metrics and both models' moments.

    ``dead_channel_frac`` is the patient's. Both mappings must hold the same layers.
    """
    missing = [n for n in reference if n not in patient]
    extra = [n for n in patient if n not in reference]
    if missing or extra:
        raise ValueError(f"reference and patient probe different layers: missing in patient {missing}, "
                         f"only in patient {extra}")
    rows = []
    for name, ref in reference.items():
        pat = patient[name]
        d = drift(ref, pat)
        rows.append({"layer": name, "w1_norm": d["wasserstein_norm"], "ks": d["ks"], "psi": d["psi"],
                     "ref_mean": ref.mean, "ref_std": ref.std, "pat_mean": pat.mean, "pat_std": pat.std,
                     "dead_channel_frac": pat.dead_channel_frac})
    return pd.DataFrame(rows, columns=DRIFT_COLUMNS)


class ActivationsExpect(Strict):
    """``expect.activations``: per-layer drift from the reference (normalised W1) and dead channels."""

    layers: list[str] = Field(min_length=1, description="module names or globs of the patient")
    reference_layers: list[str] | None = Field(None, description="the reference's names, if they differ")
    drift_max: threshold(0.0) | None = Field(None, description="normalised W1; Evidently's default is 0.1")
    dead_max: UnitThreshold | None = None
    at: Literal["surgery", "finetune"] = Field("surgery", description="which patient drift_max applies to")


@register_check
class ActivationsCheck(Check):
    """The worst layer over the seeds, at the stage ``at`` names; a NaN distance is the worst."""

    key = "activations"
    spec = ActivationsExpect

    def items(self, spec: ActivationsExpect) -> list[str]:
        return [f"activations.{f}" for f in ("drift_max", "dead_max") if getattr(spec, f) is not None]

    def evaluate(self, spec, per_seed, judge, metrics):
        rows = [r for s in per_seed for r in s.get("activations", []) if r["stage"] == spec.at]
        which = seeds_label(per_seed)
        out = []
        if spec.drift_max is not None:
            worst = worst_drift_row(rows)
            out.append(judge("activations.drift_max", worst["w1_norm"], spec.drift_max, "upper", "worst",
                             f"normalised W1 after {spec.at}, layer {worst['layer']}, {which}",
                             {"layer": worst["layer"], "per_layer": {r["layer"]: r["w1_norm"] for r in rows}},
                             strict=True))
        if spec.dead_max is not None:
            worst = worst_dead_row(rows)
            out.append(judge("activations.dead_max", worst["dead_channel_frac"], spec.dead_max, "upper", "worst",
                             f"dead-channel fraction after {spec.at}, layer {worst['layer']}, {which}",
                             {"layer": worst["layer"]}))
        return out
