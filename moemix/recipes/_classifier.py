"""ImageClassifier: the LightningModule the vision recipes share.

A timm model trained with soft-target cross-entropy on mixed batches, DeiT-style optimisation (AdamW,
linear warmup then cosine decay per step), label smoothing, optional EMA of the weights, optional MoE
blocks (``replace_mlp_with_moe``) whose auxiliary loss is added to the training loss, and TensorBoard
images of the mixed samples. Subclasses choose the mixer and how the targets are formed.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from moemix._checks import ConfigError
from moemix.callbacks.routing_telemetry import tensorboard_writer
from moemix.layers import replace_mlp_with_moe
from moemix.losses import collect_aux_loss

__all__ = ["ImageClassifier", "warmup_cosine"]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_factor: float = 0.01) -> float:
    """LR factor: linear warmup from 0 to 1 over ``warmup_steps``, then cosine to ``min_factor``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def _rng_states() -> Dict[str, Any]:
    import random

    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    # Plain tensors and numbers only, so the checkpoint loads with torch.load(weights_only=True).
    states = {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                        int(has_gauss), float(cached)],
              "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: Dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _check_hyperparameters(*, lr, weight_decay, warmup_epochs, min_lr_factor, moe_every, num_experts, moe_k,
                           moe_aux_loss_coef, with_moe: bool) -> None:
    """Raise naming the ``--model.*`` option for values the optimiser or (``with_moe``) the MoE layers cannot use."""
    problems = [
        ("lr", lr, not 0 < lr < math.inf, "a finite number > 0"),
        ("weight_decay", weight_decay, not 0 <= weight_decay < math.inf, "a finite number >= 0"),
        ("warmup_epochs", warmup_epochs, not (isinstance(warmup_epochs, int) and warmup_epochs >= 0), "an int >= 0"),
        ("min_lr_factor", min_lr_factor, not 0 <= min_lr_factor <= 1, "in [0, 1]"),
        ("moe_every", moe_every, moe_every is not None and not (isinstance(moe_every, int) and moe_every >= 1),
         "an int >= 1 or null"),
    ]
    if with_moe:
        problems += [
            ("num_experts", num_experts, not (isinstance(num_experts, int) and num_experts >= 1), "an int >= 1"),
            ("moe_k", moe_k, not (isinstance(moe_k, int) and 1 <= moe_k <= num_experts),
             f"an int in [1, model.num_experts={num_experts}]"),
            ("moe_aux_loss_coef", moe_aux_loss_coef, not 0 <= moe_aux_loss_coef < math.inf, "a finite number >= 0"),
        ]
    for name, value, bad, expected in problems:
        if bad:
            raise ConfigError(f"model.{name} must be {expected}, got {value!r}")


def soft_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-soft_targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class ImageClassifier(L.LightningModule):
    """Shared training logic; see the recipe modules for the arguments they add.

    Args:
        model_name: any timm model name. Defaults to a small ViT.
        model_kwargs: extra keywords for ``timm.create_model`` (``embed_dim``, ``depth``, ...).
        num_classes: classes (linked from the data module by the CLI).
        img_size: input side length (linked from the data module by the CLI).
        lr: peak learning rate (AdamW). Defaults to 1e-3.
        weight_decay: AdamW weight decay. Defaults to 0.05 (DeiT).
        warmup_epochs: linear warmup length. Defaults to 1.
        min_lr_factor: final LR as a fraction of ``lr``. Defaults to 0.01.
        label_smoothing: eps for the targets. Defaults to 0.1 (DeiT).
        ema_decay: if set, keep an EMA of the weights and evaluate with it. Defaults to None.
        moe_every, moe_blocks, num_experts, moe_k, moe_aux_loss_coef: with ``moe_every`` or ``moe_blocks``
            the chosen blocks' MLPs become :class:`~moemix.layers.SparseMoE` (V-MoE style) and their
            auxiliary loss joins the training loss. Defaults: no MoE; 4 experts, top-2, coefficient 0.01.
        log_images: log a grid of mixed training samples with their soft labels once per epoch. Defaults to True.
    """

    def __init__(self, model_name: str = "vit_tiny_patch16_224", model_kwargs: Optional[Dict[str, Any]] = None,
                 num_classes: int = 10, img_size: int = 32, lr: float = 1e-3, weight_decay: float = 0.05,
                 warmup_epochs: int = 1, min_lr_factor: float = 0.01, label_smoothing: float = 0.1,
                 ema_decay: Optional[float] = None, moe_every: Optional[int] = None,
                 moe_blocks: Optional[Sequence[int]] = None, num_experts: int = 4, moe_k: int = 2,
                 moe_aux_loss_coef: float = 0.01, log_images: bool = True):
        super().__init__()
        self.save_hyperparameters()
        import timm

        if not timm.is_model(model_name):
            raise ConfigError(f"model.model_name={model_name!r} is not a timm model (see timm.list_models())")
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"model.label_smoothing must be in [0, 1), got {label_smoothing}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ConfigError(f"model.ema_decay must be in (0, 1) or null, got {ema_decay}")
        _check_hyperparameters(lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                               min_lr_factor=min_lr_factor, moe_every=moe_every, num_experts=num_experts, moe_k=moe_k,
                               moe_aux_loss_coef=moe_aux_loss_coef,
                               with_moe=moe_every is not None or moe_blocks is not None)
        self.model = self.build_model(timm, model_name, dict(model_kwargs or {}), num_classes, img_size)
        self.moe_block_names = []
        if moe_every is not None or moe_blocks is not None:
            try:
                self.moe_block_names = replace_mlp_with_moe(self.model, every=moe_every, blocks=moe_blocks,
                                                            num_experts=num_experts, k=moe_k,
                                                            aux_loss_coef=moe_aux_loss_coef)
            except ValueError as err:
                raise ConfigError(f"model.moe_every={moe_every}, model.moe_blocks={moe_blocks}: {err}") from None
        self.ema = None
        if ema_decay is not None:
            self.ema = torch.optim.swa_utils.AveragedModel(
                self.model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        self.mixer = None

    def build_model(self, timm, model_name: str, kwargs: Dict[str, Any], num_classes: int, img_size: int) -> nn.Module:
        return timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # --- targets -----------------------------------------------------------------------------------
    def mix_batch(self, x: torch.Tensor, y: torch.Tensor):
        """``(x_mixed, y_soft, record)``; without a mixer the targets are smoothed one-hots."""
        if self.mixer is None:
            eps, k = self.hparams.label_smoothing, self.hparams.num_classes
            return x, F.one_hot(y, k).float() * (1 - eps) + eps / k, None
        out = self.mixer(x, y)
        return out[0], out[1], (out[2] if len(out) == 3 else None)

    def targets_after_forward(self, y_soft: torch.Tensor, record) -> torch.Tensor:
        """Hook for relabelling that needs the forward pass (TransMix)."""
        return y_soft

    # --- steps -------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int):
        x, y = batch[0], batch[1]
        x_mixed, y_soft, record = self.mix_batch(x, y)
        logits = self(x_mixed)
        y_soft = self.targets_after_forward(y_soft, record)
        loss_cls = soft_cross_entropy(logits, y_soft)
        loss_aux = collect_aux_loss(self.model) if self.moe_block_names else loss_cls.new_zeros(())
        loss = loss_cls + loss_aux
        self.log_dict({"train/loss": loss, "train/loss_cls": loss_cls, "train/loss_aux": loss_aux},
                      prog_bar=True, on_step=True, on_epoch=True, batch_size=x.shape[0])
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        if batch_idx == 0 and self.hparams.log_images:
            self.log_mixed_samples(x_mixed, y_soft)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def _evaluate(self, batch, stage: str):
        x, y = batch[0], batch[1]
        logits = self.eval_model()(x)
        loss = F.cross_entropy(logits.float(), y)
        acc = (logits.argmax(-1) == y).float().mean()
        self.log_dict({f"{stage}/loss": loss, f"{stage}/acc": acc}, prog_bar=True, on_epoch=True, batch_size=x.shape[0],
                      sync_dist=True)  # over all ranks' samples under DDP
        return loss

    def validation_step(self, batch, batch_idx: int):
        return self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int):
        return self._evaluate(batch, "test")

    def predict_step(self, batch, batch_idx: int):
        return self.eval_model()(batch[0]).softmax(-1)

    # --- optimisation ------------------------------------------------------------------------------
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "cls_token" in name
             else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.hparams.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.hparams.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = max(1, self.trainer.max_epochs or 1)
        warmup = min(total - 1, self.hparams.warmup_epochs * total // epochs) if total > 1 else 0
        self._warn_if_schedule_changed(total, warmup)
        self._schedule = {"total_steps": total, "warmup_steps": warmup}
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: warmup_cosine(step, max(warmup, 1), total, self.hparams.min_lr_factor))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _warn_if_schedule_changed(self, total: int, warmup: int) -> None:
        """A resumed run whose schedule length differs from the checkpoint's (another ``max_epochs``, batch
        size or ``limit_train_batches``) continues on the new warmup-cosine curve from the saved step."""
        saved = getattr(self, "_resumed_schedule", None)
        if saved and (saved["total_steps"], saved["warmup_steps"]) != (total, warmup):
            warnings.warn(f"the checkpoint's learning-rate schedule had {saved['total_steps']} steps "
                          f"({saved['warmup_steps']} warmup), this run's has {total} ({warmup} warmup): training "
                          "continues from the saved step on the new warmup-cosine curve, so the learning rate "
                          "jumps to the new curve's value there", stacklevel=2)

    # --- exact resume --------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # Mixing and data order draw from the global generators; saving them makes `fit --ckpt_path`
        # continue exactly as an uninterrupted run would.
        checkpoint["rng_states"] = _rng_states()
        if getattr(self, "_schedule", None):
            checkpoint["lr_schedule"] = dict(self._schedule)

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        if "rng_states" in checkpoint:
            _set_rng_states(checkpoint["rng_states"])
        self._resumed_schedule = checkpoint.get("lr_schedule")

    # --- images ------------------------------------------------------------------------------------
    def log_mixed_samples(self, x: torch.Tensor, y_soft: torch.Tensor, n: int = 16) -> None:
        writer = tensorboard_writer(self.logger)
        if writer is None:
            return
        from moemix.recipes._grid import labelled_grid

        writer.add_image("train/mixed_samples", labelled_grid(x[:n], y_soft[:n]), self.current_epoch)
