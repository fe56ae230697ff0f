"""Shared fixtures for the harness's own tests: an isolated zoo cache, tiny models, case-file text."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from surgery.train.numerics import outside_xdist, torch_threads

# A small, self-contained valid case (does not depend on cases/, which evolves): every line is known,
# so error tests can name the exact line a problem is on.
BASE_CASE = """\
name: unit-case
seed: 0
device: cpu
data: {train: digits, image_size: 32}
source: {model: "torchvision:resnet18", num_classes: 10}
surgery:
  op: transplant
  target: {model: "torchvision:resnet18", num_classes: 10}
  strategy: exact
finetune:
  steps: 5
  batch_size: 16
  optimizer:
    name: sgd
    lr: 0.01
expect:
  coverage: {tensors_min: 0.9}
  accuracy: {after_min: 0.0}
"""


class TinyCNN(nn.Module):
    """A small CNN with named parts (``stem``, ``body``, ``head``) and BatchNorm: fast to train on 2 cores.

    At 16 px it reaches about 0.95 on the UCI digits in 40 AdamW steps.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 8, bn: bool = True):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1, bias=not bn), norm(width), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.body = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=not bn),
            norm(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))


@pytest.fixture
def make_tiny():
    """``make_tiny(seed=0, **kwargs)``: a seeded TinyCNN."""

    def make(seed: int = 0, **kwargs) -> TinyCNN:
        torch.manual_seed(seed)
        return TinyCNN(**kwargs)

    return make


@pytest.fixture(scope="session")
def digits16():
    """The UCI digits at 16 px, 1 channel, split with seed 0 (shared: loading is the slow part)."""
    from surgery.case import DatasetSpec
    from surgery.data.datasets import load_split

    return load_split(DatasetSpec(name="digits"), image_size=16, channels=1, seed=0)


@pytest.fixture
def base_case() -> str:
    """The text of a small valid case file; its line numbers are fixed (see ``BASE_CASE``)."""
    return BASE_CASE


@pytest.fixture
def pytester(pytester, monkeypatch):
    """pytest's own ``pytester``, its inner runs as a plain pytest session even when these tests run under
    pytest-xdist (a worker's ``PYTEST_XDIST_*`` variables would make the inner session act as a worker).

    An in-process session that runs a case pins torch's thread count as a session of its own would (2 outside
    xdist); the count this process ran at is put back after the test, so the tests after it keep theirs."""
    for name in os.environ.keys() - outside_xdist(os.environ).keys():
        monkeypatch.delenv(name)
    with torch_threads(torch.get_num_threads()):
        yield pytester
