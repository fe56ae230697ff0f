"""What a surgery did, tensor by tensor: the data that coverage tables and reports are built from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

Method = Literal["exact", "sliced", "adapted", "fresh"]
FreshReason = Literal["no counterpart", "shape mismatch", "head", "policy"]


@dataclass
class TensorRecord:
    """Where one target tensor's values came from."""

    target_key: str
    shape: list[int]
    method: Method
    source_key: str | None = None
    source_shape: list[int] | None = None
    reason: str | None = None  # set when method == "fresh": one of FreshReason, free text after a colon allowed

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def layer(self) -> str:
        """The module path that owns the tensor (``layer1.0.conv1`` for ``layer1.0.conv1.weight``)."""
        return self.target_key.rsplit(".", 1)[0] if "." in self.target_key else ""


@dataclass
class SurgeryRecord:
    """The record an op returns beside the new model. JSON-serialisable through ``to_dict``."""

    op: str
    tensors: list[TensorRecord] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def add(
        self,
        target_key: str,
        tensor: torch.Tensor,
        method: Method,
        source_key: str | None = None,
        source_shape: list[int] | tuple[int, ...] | None = None,
        reason: str | None = None,
    ) -> None:
        """Record one target tensor."""
        self.tensors.append(
            TensorRecord(
                target_key=target_key,
                shape=list(tensor.shape),
                method=method,
                source_key=source_key,
                source_shape=list(source_shape) if source_shape is not None else None,
                reason=reason,
            )
        )

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "tensors": [asdict(t) for t in self.tensors], "notes": self.notes}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SurgeryRecord":
        return cls(op=data["op"], tensors=[TensorRecord(**t) for t in data["tensors"]], notes=data.get("notes", {}))


def recordable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict entries coverage counts: every floating-point tensor (parameters and BN statistics).

    NOTE: integer buffers such as ``num_batches_tracked`` carry no learned value and are left out.
    """
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
