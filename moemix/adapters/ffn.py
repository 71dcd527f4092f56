"""The parts of a pretrained feed-forward block that adapters wrap: its projections and activation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

__all__ = ["FFNParts", "ffn_parts"]


@dataclass
class FFNParts:
    """A dense FFN ``down(drop1(act(gate(x)) [* up(x)]))`` then ``drop2``, as its modules.

    ``up`` is None for a plain two-layer MLP (timm ``Mlp``: ``fc1``, ``fc2``); gated FFNs (LLaMA-style
    ``gate_proj`` / ``up_proj`` / ``down_proj``, timm ``SwiGLU``: ``fc1_g`` / ``fc1_x`` / ``fc2``) have it.
    """

    gate: nn.Linear
    up: Optional[nn.Linear]
    down: nn.Linear
    act: nn.Module
    drop1: nn.Module
    drop2: nn.Module

    @property
    def in_features(self) -> int:
        return self.gate.in_features

    @property
    def hidden_features(self) -> int:
        return self.gate.out_features

    @property
    def out_features(self) -> int:
        return self.down.out_features


def _module(mlp: nn.Module, name: str) -> nn.Module:
    found = getattr(mlp, name, None)
    return found if isinstance(found, nn.Module) else nn.Identity()


def ffn_parts(mlp: nn.Module, name: str = "ffn") -> FFNParts:
    """The projections of ``mlp`` (named ``name`` in errors): a timm ``Mlp`` (``fc1``, ``act``, ``fc2``), timm
    ``SwiGLU``, an HF LLaMA/Mistral/Qwen-style MLP (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``) or an
    ``nn.Sequential(Linear, act, [Dropout], Linear, [Dropout])``. A hidden norm layer (timm ``norm_layer``) is
    refused: adapters would skip it."""
    linear = lambda *names: all(isinstance(getattr(mlp, n, None), nn.Linear) for n in names)  # noqa: E731
    norm = getattr(mlp, "norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        raise ValueError(f"{name} ({type(mlp).__name__}) has a hidden norm layer, which the adapters do not apply")
    if isinstance(mlp, nn.Sequential):
        return _sequential_parts(mlp, name)
    if linear("gate_proj", "up_proj", "down_proj"):
        act = getattr(mlp, "act_fn", None)
        if not callable(act):
            raise ValueError(f"{name} ({type(mlp).__name__}) has gate_proj/up_proj/down_proj but no act_fn")
        act = act if isinstance(act, nn.Module) else _Callable(act)
        parts = FFNParts(mlp.gate_proj, mlp.up_proj, mlp.down_proj, act, nn.Identity(), nn.Identity())
    elif linear("fc1_g", "fc1_x", "fc2"):
        parts = FFNParts(mlp.fc1_g, mlp.fc1_x, mlp.fc2, mlp.act, _module(mlp, "drop1"), _module(mlp, "drop2"))
    elif linear("fc1", "fc2"):
        if mlp.fc2.in_features != mlp.fc1.out_features:
            raise ValueError(f"{name} ({type(mlp).__name__}) looks gated in one layer (fc1 out {mlp.fc1.out_features} "
                             f"!= fc2 in {mlp.fc2.in_features}); split it into gate and up projections first")
        parts = FFNParts(mlp.fc1, None, mlp.fc2, _module(mlp, "act"), _module(mlp, "drop1"), _module(mlp, "drop2"))
    else:
        raise ValueError(f"{name} ({type(mlp).__name__}) is not a known FFN: expected nn.Linear fc1/fc2 (timm Mlp), "
                         "fc1_g/fc1_x/fc2 (timm SwiGLU) or gate_proj/up_proj/down_proj with act_fn (LLaMA-style)")
    if parts.up is not None and parts.up.out_features != parts.gate.out_features:
        raise ValueError(f"{name}: the gate and up projections have different widths")
    return parts


def _sequential_parts(mlp: nn.Sequential, name: str) -> FFNParts:
    layers = [m for m in mlp if not isinstance(m, nn.Identity)]
    drops = [isinstance(m, nn.Dropout) for m in layers]
    core = [m for m, d in zip(layers, drops) if not d]
    if len(core) != 3 or not isinstance(core[0], nn.Linear) or not isinstance(core[2], nn.Linear) \
            or isinstance(core[1], nn.Linear) or core[0].out_features != core[2].in_features:
        raise ValueError(f"{name} (nn.Sequential) must be Linear, activation, Linear (dropouts allowed)")
    after_act = layers[layers.index(core[1]) + 1]
    drop1 = after_act if isinstance(after_act, nn.Dropout) else nn.Identity()
    drop2 = layers[-1] if isinstance(layers[-1], nn.Dropout) else nn.Identity()
    return FFNParts(core[0], None, core[2], core[1], drop1, drop2)


class _Callable(nn.Module):
    """A plain function (HF ``ACT2FN`` entries are modules, custom code may use functions) as a module."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)
