"""Linear CKA between layers, streamed over minibatches at constant memory.

Centered kernel alignment (Kornblith et al. 2019) compares two representations of the same
examples: CKA(X, Y) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with the linear kernels
K = X Xᵀ and L = Y Yᵀ. It is 1 for representations equal up to a rotation and an isotropic
scaling, near 0 for unrelated ones, and it compares layers of different widths: a ResNet-18
stage with the ResNet-50 stage it was transplanted from.

The minibatch form (Nguyen, Raghu and Kornblith 2021) averages the *unbiased* HSIC estimator
(Song et al. 2012) over minibatches of the same examples, so only one minibatch's Gram
matrices are ever held:

    CKA = mean_b HSIC₁(K_b, L_b) / sqrt(mean_b HSIC₁(K_b, K_b) · mean_b HSIC₁(L_b, L_b))

A layer's output is flattened per example (all channels and positions). Minibatches of fewer
than 4 examples carry no unbiased estimate and are skipped. The unbiased estimator can make a
minibatch's HSIC slightly negative for unrelated layers; a CKA of such layers is near 0 and may
be a little below it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["gram", "hsic_unbiased", "CKAAccumulator", "linear_cka"]

MIN_BATCH = 4


def gram(features: Tensor) -> Tensor:
    """The linear Gram matrix ``X Xᵀ`` of a batch, ``X`` its outputs flattened per example (float32 products)."""
    x = features.reshape(features.shape[0], -1)
    x = x.float() if x.dtype not in (torch.float32, torch.float64) else x
    return x @ x.T


def _centred_terms(grams: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For a stack of Gram matrices (m, n, n): each with a zero diagonal, flattened; row sums; totals."""
    k = grams.clone()
    k.diagonal(dim1=1, dim2=2).zero_()
    rows = k.sum(2)
    return k.flatten(1), rows, rows.sum(1)


def _hsic_matrix(a: tuple[Tensor, Tensor, Tensor], b: tuple[Tensor, Tensor, Tensor], n: int) -> Tensor:
    """HSIC₁ between every Gram of ``a`` and every Gram of ``b`` (m_a × m_b), as matrix products."""
    ka, rows_a, total_a = a
    kb, rows_b, total_b = b
    trace = ka @ kb.T  # tr(K̃ L̃) = sum(K̃ ∘ L̃) for symmetric K̃, L̃
    return (trace + torch.outer(total_a, total_b) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (rows_a @ rows_b.T)) / (
        n * (n - 3)
    )


def hsic_unbiased(k: Tensor, l: Tensor) -> float:
    """The unbiased HSIC estimator of Song et al. (2012) for two n×n Gram matrices, n ≥ 4."""
    n = k.shape[0]
    if n < MIN_BATCH:
        raise ValueError(f"the unbiased HSIC needs at least {MIN_BATCH} examples, got {n}")
    return float(_hsic_matrix(_centred_terms(k[None]), _centred_terms(l[None]), n)[0, 0])


class CKAAccumulator:
    """Streamed linear CKA between every pair of ``rows`` × ``cols`` layers.

    Feed each minibatch's Gram matrices (one per layer, the same examples on both sides); read
    :meth:`matrix` or :meth:`value` at the end. Memory: one float64 per pair and per layer.
    """

    def __init__(self, rows: Sequence[str], cols: Sequence[str], *, device: torch.device | str = "cpu"):
        self.rows, self.cols = list(rows), list(cols)
        self.cross = torch.zeros(len(self.rows), len(self.cols), dtype=torch.float64, device=device)
        self.self_rows = torch.zeros(len(self.rows), dtype=torch.float64, device=device)
        self.self_cols = torch.zeros(len(self.cols), dtype=torch.float64, device=device)
        self.batches = 0

    def update(self, row_grams: Sequence[Tensor], col_grams: Sequence[Tensor]) -> None:
        """Add one minibatch: a Gram per row layer and per column layer, all n×n for the same n examples."""
        n = row_grams[0].shape[0] if row_grams else 0
        if n < MIN_BATCH:
            return
        a = _centred_terms(torch.stack([g.double() for g in row_grams]))
        b = _centred_terms(torch.stack([g.double() for g in col_grams]))
        self.cross += _hsic_matrix(a, b, n)
        self.self_rows += torch.diagonal(_hsic_matrix(a, a, n))
        self.self_cols += torch.diagonal(_hsic_matrix(b, b, n))
        self.batches += 1

    def matrix(self) -> Tensor:
        """CKA per pair (rows × cols, float64 on the CPU); NaN where a layer's HSIC is not positive."""
        denom = torch.sqrt(torch.outer(self.self_rows, self.self_cols).clamp(min=0.0)).cpu()
        out = self.cross.cpu() / denom
        out[~(denom > 0)] = math.nan
        return out

    def value(self, row: str, col: str) -> float:
        """CKA between one row layer and one column layer."""
        return float(self.matrix()[self.rows.index(row), self.cols.index(col)])


def linear_cka(x: Tensor, y: Tensor, *, batch_size: int | None = None) -> float:
    """Linear CKA of two representations of the same examples (rows), whole or by minibatches.

    With ``batch_size`` it is the minibatch estimator above; without, one batch of all examples.
    """
    size = batch_size or x.shape[0]
    acc = CKAAccumulator(["x"], ["y"])
    for start in range(0, x.shape[0], size):
        acc.update([gram(x[start : start + size])], [gram(y[start : start + size])])
    return acc.value("x", "y")
