"""RoutingTelemetry: expert-load statistics of every MoE layer, logged per epoch."""
from __future__ import annotations

from typing import Dict, List, Optional

import lightning as L
import torch
from torch import nn

__all__ = ["RoutingTelemetry", "moe_layers", "load_heatmap", "tensorboard_writer"]


def tensorboard_writer(logger):
    """The ``SummaryWriter`` behind a Lightning TensorBoard logger, else None (no logger, dummy logger, CSV...)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    return logger.experiment if isinstance(logger, TensorBoardLogger) else None


def moe_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Submodules that record ``tokens_per_expert`` after a forward (SparseMoE and its relatives)."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "tokens_per_expert") and hasattr(m, "num_experts")}


def load_heatmap(loads: torch.Tensor, cell: int = 16) -> torch.Tensor:
    """``[L, E]`` load fractions -> ``[3, L*cell, E*cell]`` RGB image in [0, 1] (white = 0, dark blue = 2x uniform)."""
    uniform = 1.0 / loads.shape[1]
    v = (loads / (2 * uniform)).clamp(0, 1)
    rgb = torch.stack([1 - 0.85 * v, 1 - 0.6 * v, 1 - 0.2 * v])  # white -> blue
    return rgb.repeat_interleave(cell, 1).repeat_interleave(cell, 2)


class RoutingTelemetry(L.Callback):
    """Accumulates tokens per expert of every MoE layer over each training epoch and logs them.

    At every training epoch end it logs, per layer, ``routing/<layer>/max_load`` (largest expert share
    divided by the uniform share ``1/E``; 1.0 is perfect balance), ``routing/<layer>/dropped`` (dropped
    assignments in the epoch), and, when the logger is TensorBoard, an image ``routing/expert_load``:
    a heat map with one row per MoE layer and one column per expert, colour = share of that layer's
    assignments. The last epoch's ``[L, E]`` fractions stay in ``self.last_loads``.

    Args:
        log_image: log the heat map image. Defaults to True.
    """

    def __init__(self, log_image: bool = True):
        super().__init__()
        self.log_image = log_image
        self._counts: Dict[str, torch.Tensor] = {}
        self._dropped: Dict[str, int] = {}
        self._before: Dict[str, Optional[torch.Tensor]] = {}  # each layer's record before the training step
        self.last_loads: Optional[torch.Tensor] = None
        self.layer_names: List[str] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._counts, self._dropped = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._before = {name: layer.tokens_per_expert for name, layer in moe_layers(pl_module).items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for name, layer in moe_layers(pl_module).items():
            counts = layer.tokens_per_expert
            if counts is None or counts is self._before.get(name):  # the layer did not run in this step (an EMA copy)
                continue
            counts = counts.detach().to(torch.float64)  # stays on the device: no sync per batch
            self._counts[name] = self._counts.get(name, 0) + counts
            self._dropped[name] = self._dropped.get(name, 0) + int(getattr(layer, "dropped_tokens", 0))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._counts:
            return
        self.layer_names = sorted(self._counts)
        loads = torch.stack([self._counts[n] / self._counts[n].sum().clamp(min=1) for n in self.layer_names])
        self.last_loads = loads.float().cpu()
        metrics = {}
        for name, row in zip(self.layer_names, self.last_loads):
            metrics[f"routing/{name}/max_load"] = float(row.max() * row.numel())
            metrics[f"routing/{name}/dropped"] = float(self._dropped[name])
        pl_module.log_dict(metrics, on_epoch=True, sync_dist=False)
        writer = tensorboard_writer(trainer.logger)
        if self.log_image and writer is not None:
            writer.add_image("routing/expert_load", load_heatmap(self.last_loads), trainer.current_epoch)
