"""Recipe: transfer a pretrained ViT checkpoint to a new dataset by full fine-tuning, a linear probe, LoRA,
MixLoRA or EMoE.

    python -m moemix.recipes.vit_transmix fit --data.dataset mnist          # pretrain on full MNIST
    python -m moemix.recipes.adapt fit --model.checkpoint runs/vit_transmix/version_0/checkpoints/last.ckpt \\
        --model.method mixlora                                                # adapt to the embedded digits
    python -m moemix.recipes.adapt test --ckpt_path best

Methods (the classification head is new and trains in every one):

* ``full``: every weight trains (the dense fine-tuning baseline).
* ``linear``: only the head (linear probe).
* ``lora``: LoRA on the q and v slices of each block's ``qkv`` (Hu et al. 2022); r, alpha, dropout as below.
* ``mixlora``: :func:`~moemix.layers.inject_mixlora`: every FFN becomes ``num_experts`` LoRA experts (top-``moe_k``)
  on the frozen FFN, plus LoRA on q and v (Li et al. 2024).
* ``emoe``: :func:`~moemix.layers.moefy`: every 2nd block's FFN is split into ``emoe_experts`` experts (top-
  ``emoe_k``, frozen average gate) by balanced k-means, then everything fine-tunes (Qiu et al. 2023).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
from torch import nn

from moemix._checks import ConfigError
from moemix.adapters import inject_mixlora, moefy
from moemix.recipes._classifier import ImageClassifier
from moemix.recipes._cli import run_cli
from moemix.recipes.vit_transmix import create_vit

__all__ = ["AdaptViT", "METHODS", "load_vit_checkpoint", "cli_main"]

METHODS = ("full", "linear", "lora", "mixlora", "emoe")
HOW_TO_PRETRAIN = ("pretrain one with `python -m moemix.recipes.vit_transmix fit --data.dataset mnist` and pass its "
                   "runs/vit_transmix/version_N/checkpoints/last.ckpt")


def load_vit_checkpoint(path: Optional[str]) -> nn.Module:
    """The dense timm ViT a ``vit_transmix`` checkpoint holds (its EMA weights when it kept an EMA)."""
    if path is None:
        raise ConfigError(f"model.checkpoint is required: {HOW_TO_PRETRAIN}")
    if not os.path.isfile(path):
        raise ConfigError(f"model.checkpoint={path!r} is not a file: {HOW_TO_PRETRAIN}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hp = ckpt.get("hyper_parameters", {})
    if not {"model_name", "patch_size", "img_size", "num_classes"} <= set(hp) or "state_dict" not in ckpt:
        raise ConfigError(f"model.checkpoint={path!r} is not a checkpoint of the vit_transmix recipe")
    if hp.get("moe_every") is not None or hp.get("moe_blocks") is not None:
        raise ConfigError(f"model.checkpoint={path!r} has MoE blocks; adapt starts from a dense ViT")
    model = create_vit(hp["model_name"], hp.get("model_kwargs"), hp["num_classes"], hp["img_size"], hp["patch_size"])
    prefix = "ema.module." if any(k.startswith("ema.module.") for k in ckpt["state_dict"]) else "model."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first_line = str(err).splitlines()[0]
        raise ConfigError(f"model.checkpoint={path!r} does not fit {hp['model_name']}: {first_line}") from None
    model.pretrained_img_size = hp["img_size"]
    return model


class AdaptViT(ImageClassifier):
    """A pretrained ViT adapted to new data.

    Args:
        checkpoint: a ``vit_transmix`` checkpoint (dense ViT). Required.
        method: one of ``METHODS``. Defaults to ``"mixlora"``.
        num_experts, moe_k: MixLoRA experts and top-k. Defaults 8, 2 (the paper).
        lora_r, lora_alpha, lora_dropout: LoRA and MixLoRA adapters. Defaults 8, 16, 0.05.
        emoe_experts, emoe_k: EMoE experts per FFN and top-k. Defaults 24, 4 (the paper's ViT-S setting).
        aux_loss_coef: MixLoRA's load-balance coefficient. Defaults to 0.01.
        Other arguments: :class:`~moemix.recipes._classifier.ImageClassifier` (no mixing here).
    """

    def __init__(self, checkpoint: Optional[str] = None, method: str = "mixlora", num_classes: int = 10,
                 img_size: int = 32, num_experts: int = 8, moe_k: int = 2, lora_r: int = 8, lora_alpha: float = 16.0,
                 lora_dropout: float = 0.05, emoe_experts: int = 24, emoe_k: int = 4, aux_loss_coef: float = 0.01,
                 lr: float = 1e-3, weight_decay: float = 0.05, warmup_epochs: int = 1, min_lr_factor: float = 0.01,
                 label_smoothing: float = 0.1, ema_decay: Optional[float] = None, log_images: bool = True):
        if method not in METHODS:
            raise ConfigError(f"model.method must be one of {METHODS}, got {method!r}")
        super().__init__("vit_tiny_patch16_224", None, num_classes, img_size, lr, weight_decay, warmup_epochs,
                         min_lr_factor, label_smoothing, ema_decay, log_images=log_images)
        self.save_hyperparameters()

    def build_model(self, timm, model_name: str, kwargs: Dict[str, Any], num_classes: int, img_size: int) -> nn.Module:
        hp = self.hparams
        model = load_vit_checkpoint(hp.checkpoint)
        if img_size != model.pretrained_img_size:
            raise ConfigError(f"data.img_size={img_size} must equal the checkpoint's image size "
                              f"{model.pretrained_img_size}")
        model.reset_classifier(num_classes)
        try:
            self.adapted_modules = self._adapt(model)
        except ValueError as err:
            raise ConfigError(f"model.method={hp.method}: {err}") from None
        return model

    def _adapt(self, model: nn.Module):
        hp = self.hparams
        lora = dict(r=hp.lora_r, alpha=hp.lora_alpha, dropout=hp.lora_dropout)
        if hp.method == "mixlora":
            return inject_mixlora(model, num_experts=hp.num_experts, k=hp.moe_k, aux_loss_coef=hp.aux_loss_coef,
                                  trainable=["head"], **lora).ffn
        if hp.method == "lora":
            inject_mixlora(model, ffn_pattern=(), trainable=["head"], **lora)
            return []
        if hp.method == "emoe":
            return moefy(model, every=2, num_experts=hp.emoe_experts, k=hp.emoe_k)
        if hp.method == "linear":
            model.requires_grad_(False)
            model.get_classifier().requires_grad_(True)
        return []

    def setup(self, stage: str) -> None:
        self.moe_block_names = list(self.adapted_modules)  # their auxiliary losses join the training loss
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.trainable_params, self.total_params = trainable, sum(p.numel() for p in self.model.parameters())


def cli_main(args=None):
    """``python -m moemix.recipes.adapt {fit,validate,test,predict} ...``"""
    return run_cli(AdaptViT, "adapt", args=args)


if __name__ == "__main__":
    cli_main()
