"""Bridge: a frozen source network as a feature extractor at named graph nodes, plus a new trainable head.

Feature extraction is torchvision's ``create_feature_extractor`` (torch.fx), called with timm's
no-trace modules and functions as leaves (what ``timm.layers.create_feature_extractor`` does), so node
names are the same for torchvision and timm models. A model that torch.fx cannot trace falls back to
forward hooks on named modules (node = module path, output = that module's output).

Heads (``head=``):
- ``linear``: global-average-pool each node's features, concatenate, ``Linear``.
- ``mlp``: the same pooling, ``Linear → GELU → Linear`` with ``hidden`` units.
- ``transformer``: each node's feature map becomes tokens (one per spatial position), projected by a
  ``Linear`` to ``hidden``; a class token and a learned position embedding are added; ``depth`` timm ViT
  ``Block``s, ``LayerNorm``, ``Linear`` on the class token. The position embedding is sized from
  ``example_input``: other input sizes are refused with a clear error.

Feature layout (NOTE: a convention, not detected): 4-D features are NCHW, 3-D are NLC (timm ViT
tokens), 2-D are NC. Models that emit NHWC (timm Swin) are pooled over the wrong axes.
"""

from __future__ import annotations

import copy
import difflib
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from surgery.errors import SurgeryInputError, first_line
from surgery.ops.record import SurgeryRecord, recordable_state
from surgery.ops.base import Operation, register_op
from surgery.ops.bridge_spec import HEADS, BridgeSpec, Head


def _tracer_kwargs() -> dict[str, Any]:
    """timm's no-trace modules and functions as fx leaves (torchvision adds its own ops to these)."""
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:
        return {}
    return {"leaf_modules": list(get_notrace_modules()), "autowrap_functions": list(get_notrace_functions())}


def _with_prefixes(names: Sequence[str]) -> list[str]:
    """Node names plus every dotted prefix (``layer4`` for ``layer4.1.relu_1``), in graph order.

    torchvision accepts a prefix as a return node: it stands for the last node inside that module.
    """
    out: dict[str, None] = {}
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            out.setdefault(".".join(parts[:i]), None)
    return list(out)


def _graph_nodes(model: nn.Module) -> list[str] | None:
    """Eval-mode fx node names (prefixes included), or None when the model is not traceable."""
    # torchvision (and timm, in _tracer_kwargs) are imported when a bridge is built, not when a case is parsed
    from torchvision.models.feature_extraction import get_graph_node_names

    try:
        _, eval_nodes = get_graph_node_names(model, tracer_kwargs=_tracer_kwargs(), suppress_diff_warning=True)
    except Exception:  # fx raises many types on untraceable code
        return None
    return _with_prefixes(eval_nodes)


def list_feature_nodes(model: nn.Module) -> list[str]:
    """The names ``bridge(nodes=...)`` accepts, in graph order (for ``surgery inspect``).

    For a traceable model: torchvision's eval-mode node names (with timm's leaf modules) and their
    module prefixes (``layer4``). For an untraceable one: the model's module paths (hook fallback).
    """
    nodes = _graph_nodes(model)
    if nodes is None:
        nodes = [n for n, _ in model.named_modules() if n]
    return nodes


class HookFeatureExtractor(nn.Module):
    """Fallback extractor for untraceable models: runs the whole model, returns named modules' outputs."""

    def __init__(self, model: nn.Module, nodes: Sequence[str]):
        super().__init__()
        self.model = model
        self.nodes = list(nodes)

    def forward(self, x: Tensor) -> dict[str, Any]:
        feats: dict[str, Any] = {}
        handles = [
            self.model.get_submodule(n).register_forward_hook(lambda _m, _i, out, n=n: feats.setdefault(n, out))
            for n in self.nodes
        ]
        try:
            self.model(x)
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in self.nodes if n not in feats]
        if missing:
            raise RuntimeError(f"modules {missing} were not called by the forward pass")
        return {n: feats[n] for n in self.nodes}


def _pool(f: Tensor) -> Tensor:
    if f.ndim == 4:
        return f.mean(dim=(2, 3))
    if f.ndim == 3:
        return f.mean(dim=1)
    return f


def _tokens(f: Tensor) -> Tensor:
    if f.ndim == 4:
        return f.flatten(2).transpose(1, 2)
    if f.ndim == 3:
        return f
    return f.unsqueeze(1)


def _channels(shape: Sequence[int]) -> int:
    """Channels of one sample's feature shape (C,H,W) / (L,C) / (C,)."""
    return shape[0] if len(shape) == 3 else shape[-1]


def _num_tokens(shape: Sequence[int]) -> int:
    if len(shape) == 3:
        return shape[1] * shape[2]
    return shape[0] if len(shape) == 2 else 1


class PoolHead(nn.Module):
    """Global average pool per node, concatenate, then ``Linear`` (``hidden=None``) or ``Linear-GELU-Linear``."""

    def __init__(self, nodes: Sequence[str], channels: Sequence[int], num_classes: int, hidden: int | None = None):
        super().__init__()
        self.nodes = list(nodes)
        width = sum(channels)
        if hidden is None:
            self.net: nn.Module = nn.Linear(width, num_classes)
        else:
            self.net = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, num_classes))

    def forward(self, feats: dict[str, Tensor]) -> Tensor:
        return self.net(torch.cat([_pool(feats[n]) for n in self.nodes], dim=1))


class TokenHead(nn.Module):
    """Tokens from every node's spatial positions → ``depth`` timm ViT blocks → class token → ``Linear``."""

    def __init__(
        self,
        nodes: Sequence[str],
        shapes: Sequence[Sequence[int]],
        num_classes: int,
        *,
        dim: int,
        depth: int,
        num_heads: int,
    ):
        super().__init__()
        from timm.layers import trunc_normal_
        from timm.models.vision_transformer import Block

        self.nodes = list(nodes)
        self.num_tokens = [_num_tokens(s) for s in shapes]
        self.proj = nn.ModuleList(nn.Linear(_channels(s), dim) for s in shapes)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + sum(self.num_tokens), dim))
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward(self, feats: dict[str, Tensor]) -> Tensor:
        tokens = [proj(_tokens(feats[n])) for n, proj in zip(self.nodes, self.proj)]
        counts = [t.shape[1] for t in tokens]
        if counts != self.num_tokens:
            raise RuntimeError(
                f"transformer head: token counts per node {counts} != {self.num_tokens} fixed by example_input "
                f"(the position embedding is sized for the example input's resolution)"
            )
        x = torch.cat([self.cls_token.expand(tokens[0].shape[0], -1, -1), *tokens], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.fc(x[:, 0])


class BridgeModel(nn.Module):
    """A frozen feature extractor (``.backbone``) and a trainable head (``.head``).

    The backbone's parameters do not require grad and it stays in eval mode whatever ``train()`` is
    called with, so its BatchNorm statistics never move. (No ``torch.no_grad`` in ``forward``: setting
    ``requires_grad`` back on is enough to make it trainable again.)
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, nodes: Sequence[str]):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.nodes = list(nodes)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()

    def train(self, mode: bool = True) -> "BridgeModel":
        super().train(mode)
        self.backbone.eval()
        return self

    def features(self, x: Tensor) -> dict[str, Tensor]:
        """The backbone's features at ``nodes``."""
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def _check_nodes(model: nn.Module, nodes: Sequence[str], valid: list[str]) -> None:
    known = set(valid)
    for node in nodes:
        if node not in known:
            close = difflib.get_close_matches(node, valid, n=3, cutoff=0.6)
            top = [n for n in valid if "." not in n][:12]
            hint = f"close matches: {', '.join(close)}; " if close else ""
            raise SurgeryInputError(
                f"bridge: unknown node {node!r} in {type(model).__name__}; {hint}"
                f"valid nodes include {', '.join(top)} (see `surgery inspect`)"
            )


def bridge(
    source: nn.Module,
    nodes: Sequence[str],
    head: Head,
    num_classes: int,
    *,
    example_input: Tensor,
    hidden: int = 256,
    depth: int = 1,
    num_heads: int = 4,
) -> tuple[BridgeModel, SurgeryRecord]:
    """Make ``source`` a frozen feature extractor at ``nodes`` and put a new ``head`` on its features.

    ``source`` is not modified (a deep copy becomes the backbone). ``nodes`` are names from
    ``list_feature_nodes(source)`` (fx node names or module prefixes such as ``layer4``). Feature shapes
    are measured on ``example_input`` (eval, no grad); the head is built from them and placed on the
    input's device. ``hidden`` is the MLP width and the transformer's token dimension (it must be
    divisible by ``num_heads``); ``depth`` is the number of transformer blocks.

    Example::

        >>> model, rec = bridge(torchvision.models.resnet18(), ["layer3", "layer4"], "linear", 10,
        ...                     example_input=torch.randn(2, 3, 32, 32))
        >>> model(torch.randn(4, 3, 32, 32)).shape
        torch.Size([4, 10])
    """
    if isinstance(nodes, str):
        nodes = [nodes]
    nodes = list(dict.fromkeys(nodes))
    if not nodes:
        raise SurgeryInputError("bridge: no nodes given (see `surgery inspect` for node names)")
    if head not in HEADS:
        raise SurgeryInputError(f"bridge: unknown head {head!r}; known: {', '.join(HEADS)}")
    if num_classes < 1 or hidden < 1 or depth < 1 or num_heads < 1:
        raise SurgeryInputError(
            f"bridge: num_classes, hidden, depth and num_heads must be >= 1 "
            f"(got {num_classes}, {hidden}, {depth}, {num_heads})"
        )
    if head == "transformer" and hidden % num_heads:
        raise SurgeryInputError(f"bridge: hidden={hidden} is not divisible by num_heads={num_heads}")

    source = copy.deepcopy(source).eval()
    graph_nodes = _graph_nodes(source)
    backbone: nn.Module | None = None
    if graph_nodes is not None:
        _check_nodes(source, nodes, graph_nodes)
        from torchvision.models.feature_extraction import create_feature_extractor

        try:
            backbone = create_feature_extractor(
                source, return_nodes=nodes, tracer_kwargs=_tracer_kwargs(), suppress_diff_warning=True
            )
            extractor, prefix = "torchvision.fx", "backbone."
        except Exception:  # a node only present in the eval graph, or a train-mode trace failure
            backbone = None
    if backbone is None:
        _check_nodes(source, nodes, [n for n, _ in source.named_modules() if n])
        backbone = HookFeatureExtractor(source, nodes)
        extractor, prefix = "hooks", "backbone.model."
    backbone.eval()

    with torch.no_grad():
        try:
            feats = backbone(example_input)
        except Exception as exc:
            raise SurgeryInputError(
                f"bridge: the source fails on example_input of shape {tuple(example_input.shape)}: {first_line(exc)}"
            ) from exc
    shapes: dict[str, list[int]] = {}
    for node in nodes:
        f = feats.get(node)
        if not isinstance(f, Tensor) or f.ndim not in (2, 3, 4) or not f.is_floating_point():
            what = f"shape {tuple(f.shape)}" if isinstance(f, Tensor) else type(f).__name__
            raise SurgeryInputError(
                f"bridge: node {node!r} gives {what}; a feature node must give a float tensor of 2, 3 or 4 dims"
            )
        shapes[node] = list(f.shape[1:])

    per_node = [shapes[n] for n in nodes]
    if head == "transformer":
        head_module: nn.Module = TokenHead(nodes, per_node, num_classes, dim=hidden, depth=depth, num_heads=num_heads)
    else:
        head_module = PoolHead(
            nodes, [_channels(s) for s in per_node], num_classes, hidden=hidden if head == "mlp" else None
        )
    head_module.to(device=example_input.device, dtype=feats[nodes[0]].dtype)
    model = BridgeModel(backbone, head_module, nodes)

    record = SurgeryRecord(op="bridge")
    source_state = recordable_state(source)
    for key, tensor in recordable_state(model).items():
        if key.startswith(prefix):
            skey = key[len(prefix) :]
            record.add(key, tensor, "exact", source_key=skey, source_shape=source_state[skey].shape)
        else:
            record.add(key, tensor, "fresh", reason="head")
    used = {t.source_key for t in record.tensors}
    record.notes = {
        "nodes": nodes,
        "head": head,
        "feature_shapes": shapes,  # per sample, without the batch dimension
        "extractor": extractor,  # "torchvision.fx" (timm leaf modules) or "hooks" (untraceable model)
        "hidden": hidden if head != "linear" else None,
        "depth": depth if head == "transformer" else None,
        "num_heads": num_heads if head == "transformer" else None,
        "trainable_params": sum(p.numel() for p in model.head.parameters()),
        "frozen_params": sum(p.numel() for p in model.backbone.parameters()),
        "source_unused": sorted(k for k in source_state if k not in used),  # e.g. the source's classifier
        "param_glob": "head.*",
    }
    return model, record


@register_op
class Bridge(Operation):
    """A bridge's baseline must be named (``beats_baseline.model``): a new head alone is no architecture."""

    name = "bridge"
    spec = BridgeSpec
    classes_field = "surgery.num_classes"
    blamed_field = "nodes"

    def apply(self, spec, source, *, example, num_classes, in_chans, build):
        return bridge(
            source,
            spec.nodes,
            spec.head,
            spec.num_classes or num_classes,
            example_input=example,
            hidden=spec.hidden,
            depth=spec.depth,
            num_heads=spec.num_heads,
        )

    def baseline_architecture(self, spec, source_ref):
        raise SurgeryInputError(
            "a bridge needs the baseline model to train from scratch, e.g. {model: torchvision:resnet18}"
        )

    def distill(self, spec):
        return spec.distill
