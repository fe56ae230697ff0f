"""Helpers shared by the probe and drift tests: small real models, seeded inputs, every stored output.
(Imported by test modules: pytest puts ``tests/`` on ``sys.path``.)"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.models import resnet18


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """NOTE: on shared, busy cores torch's 2 OpenMP threads spin against each other (~40x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return resnet18(num_classes=10).eval()


def seeded_inputs(n: int, seed: int = 1, shape=(3, 32, 32)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g)


def identity_model() -> nn.Module:
    return nn.Sequential(OrderedDict(act=nn.Identity()))


def stored_outputs(
    model: nn.Module, inputs: torch.Tensor, names: list[str], batch_size: int
) -> dict[str, list[list[torch.Tensor]]]:
    """Every output of every call of each layer, cloned (in-place ReLUs later overwrite BN outputs)."""
    modules = dict(model.named_modules())
    out: dict[str, list[list[torch.Tensor]]] = {n: [] for n in names}  # [batch][call]
    handles = [
        modules[n].register_forward_hook(lambda m, a, o, n=n: out[n][-1].append(o.detach().clone())) for n in names
    ]
    try:
        with torch.inference_mode():
            for s in range(0, inputs.shape[0], batch_size):
                for n in names:
                    out[n].append([])
                model(inputs[s : s + batch_size])
    finally:
        for h in handles:
            h.remove()
    return out
