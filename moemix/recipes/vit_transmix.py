"""Recipe: a timm ViT trained with MixUp/CutMix and TransMix relabelling.

    python -m moemix.recipes.vit_transmix fit                        # embedded digits, ~2-3 min on 2 CPU cores
    python -m moemix.recipes.vit_transmix fit --config configs/vit_transmix.yaml
    python -m moemix.recipes.vit_transmix fit --model.moe_every 2    # V-MoE style MoE blocks
    python -m moemix.recipes.vit_transmix fit --data.root /data/cifar10 --trainer.accelerator gpu
    python -m moemix.recipes.vit_transmix fit --print_config

TransMix (Chen et al., CVPR 2022): the CutMix batches' targets are re-weighted by the last block's class
attention on the pasted region, ``lam = (lam_area + lam_attn) / 2`` (see :mod:`moemix.mix.transmix`).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

from moemix._checks import ConfigError
from moemix.mix import MixUpCutMix, TransMix, attach_transmix
from moemix.recipes._classifier import ImageClassifier
from moemix.recipes._cli import run_cli

__all__ = ["ViTTransMix", "create_vit", "DEFAULT_MODEL_KWARGS", "cli_main"]


DEFAULT_MODEL_KWARGS = {"embed_dim": 96, "depth": 4, "num_heads": 3}


def create_vit(model_name: str, model_kwargs: Optional[Dict[str, Any]], num_classes: int, img_size: int,
               patch_size: int):
    """The recipe's timm ViT (``model_kwargs`` None: :data:`DEFAULT_MODEL_KWARGS`); a ``ConfigError`` for a model
    that is not a ViT with a class token and ``blocks``."""
    import timm

    kwargs = dict(DEFAULT_MODEL_KWARGS if model_kwargs is None else model_kwargs)
    kwargs.setdefault("img_size", img_size)
    kwargs.setdefault("patch_size", patch_size)
    vit = "a timm ViT with a class token and `blocks` (e.g. vit_tiny_patch16_224)"
    try:
        model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as err:  # a CNN does not take the ViT keywords
        raise ConfigError(f"model.model_name={model_name!r} must be {vit} that takes model.model_kwargs "
                          f"{kwargs} ({err})") from None
    if not hasattr(model, "blocks") or getattr(model, "cls_token", None) is None:
        raise ConfigError(f"model.model_name={model_name!r} must be {vit}")
    return model


class ViTTransMix(ImageClassifier):
    """ViT classifier with MixUp/CutMix (+ TransMix).

    Args:
        model_name: timm ViT name. Defaults to ``vit_tiny_patch16_224`` resized by ``model_kwargs``.
        model_kwargs: defaults to a 4-block, 96-wide ViT with 4-pixel patches for the 32-pixel digits.
        patch_size: ViT patch size; ``img_size`` must be divisible by it. Defaults to 4.
        mixup_alpha, cutmix_alpha, switch_prob, mix_prob: mixing (DeiT: 0.8, 1.0, 0.5, 1.0). ``0`` disables one.
        transmix: relabel CutMix batches with class attention. Defaults to True.
        Other arguments: :class:`~moemix.recipes._classifier.ImageClassifier`.
    """

    def __init__(self, model_name: str = "vit_tiny_patch16_224", model_kwargs: Optional[Dict[str, Any]] = None,
                 num_classes: int = 10, img_size: int = 32, patch_size: int = 4, mixup_alpha: float = 0.8,
                 cutmix_alpha: float = 1.0, switch_prob: float = 0.5, mix_prob: float = 1.0, transmix: bool = True,
                 lr: float = 2e-3, weight_decay: float = 0.05, warmup_epochs: int = 1, min_lr_factor: float = 0.01,
                 label_smoothing: float = 0.1, ema_decay: Optional[float] = None, moe_every: Optional[int] = None,
                 moe_blocks: Optional[Sequence[int]] = None, num_experts: int = 4, moe_k: int = 2,
                 moe_aux_loss_coef: float = 0.01, log_images: bool = True):
        if img_size % patch_size:
            raise ConfigError(f"model.img_size={img_size} must be divisible by model.patch_size={patch_size}")
        if model_kwargs is None:
            model_kwargs = dict(DEFAULT_MODEL_KWARGS)
        if transmix and cutmix_alpha <= 0:
            raise ConfigError("model.transmix needs CutMix: set model.cutmix_alpha > 0 or model.transmix false")
        super().__init__(model_name, model_kwargs, num_classes, img_size, lr, weight_decay, warmup_epochs,
                         min_lr_factor, label_smoothing, ema_decay, moe_every, moe_blocks, num_experts, moe_k,
                         moe_aux_loss_coef, log_images)
        self.save_hyperparameters()
        self.attention_hook = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            kwargs = dict(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=mix_prob, switch_prob=switch_prob,
                          label_smoothing=label_smoothing, num_classes=num_classes)
            if transmix:
                self.mixer = TransMix(**kwargs)
                self.attention_hook = self.mixer.use_hook(attach_transmix(self.model))
            else:
                self.mixer = MixUpCutMix(**kwargs)

    def build_model(self, timm, model_name, kwargs, num_classes, img_size):
        return create_vit(model_name, kwargs, num_classes, img_size, self.hparams.patch_size)

    def targets_after_forward(self, y_soft, record):
        if self.attention_hook is None or record is None:
            return y_soft
        return self.mixer.relabel(record, self.attention_hook.cls_attention)


def cli_main(args=None):
    """``python -m moemix.recipes.vit_transmix {fit,validate,test,predict} ...``"""
    return run_cli(ViTTransMix, "vit_transmix", args=args)


if __name__ == "__main__":
    cli_main()
