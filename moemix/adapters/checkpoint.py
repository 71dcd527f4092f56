"""Adapter-only checkpoints: the trainable tensors of a model after :func:`inject_mixlora`, in one safetensors
file whose metadata records how to inject them again into a fresh copy of the base model."""
from __future__ import annotations

import json
import os
from typing import Dict

import torch
from torch import nn

from moemix.adapters.inject import AdapterReport, inject_mixlora
from moemix.adapters.lora import LoRALinear
from moemix.adapters.mixlora import MixLoRA

__all__ = ["save_adapters", "load_adapters"]

_KEY = "moemix_adapters"


def save_adapters(model: nn.Module, path: str, report: AdapterReport) -> Dict[str, torch.Tensor]:
    """Write the parameters that train after injection (adapters, routers, ``trainable`` modules) to ``path``
    (safetensors) with ``report``'s configuration; returns the saved tensors."""
    from safetensors.torch import save_file

    if not report.config:
        raise ValueError("report must be the AdapterReport inject_mixlora returned for this model")
    tensors = {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    if not tensors:
        raise ValueError("model has no trainable parameters to save: call inject_mixlora on it first")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, metadata={_KEY: json.dumps(report.config)})
    return tensors


def load_adapters(model: nn.Module, path: str) -> AdapterReport:
    """Inject the adapters recorded in ``path`` into ``model`` (a fresh copy of the base model the file was
    saved from; a model that already has them is used as it is) and load their tensors. A file saved from
    another architecture raises ``ValueError`` naming the first tensor that does not fit."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as f:
        config = json.loads((f.metadata() or {}).get(_KEY, "null"))
    if config is None:
        raise ValueError(f"path: {path} is not a moemix adapter file (no '{_KEY}' metadata)")
    injected = all(isinstance(_get(model, name), MixLoRA) for name in config["ffn"]) and \
        all(isinstance(_get(model, name), LoRALinear) for name in config["attention"])
    if injected:
        report = AdapterReport(config["ffn"], config["attention"], 0, 0, config)
    else:
        try:
            report = inject_mixlora(model, ffn_pattern=config["ffn"], attn_pattern=config["attention"],
                                    trainable=config["trainable"], **config["mixlora"],
                                    attn_r=config["lora"]["r"], attn_alpha=config["lora"]["alpha"])
        except ValueError as err:
            raise ValueError(f"path: {path} was saved from another architecture: {err}") from None
    params = dict(model.named_parameters())
    tensors = load_file(path, device=str(next(model.parameters()).device))
    for name, tensor in tensors.items():
        if name not in params or params[name].shape != tensor.shape:
            here = "missing here" if name not in params else f"of shape {tuple(params[name].shape)} here"
            raise ValueError(f"path: {path} was saved from another architecture: {name} has shape "
                             f"{tuple(tensor.shape)} in the file, {here}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    report.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report.total_params = sum(p.numel() for p in model.parameters())
    return report


def _get(model: nn.Module, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
