"""Recipe: a timm CNN trained with Patch Mixing, evaluated under patch occlusion.

    python -m moemix.recipes.cnn_patchmix fit                          # embedded digits, ResNet-18
    python -m moemix.recipes.cnn_patchmix fit --model.mixing cutmix    # the baseline it is compared with
    python -m moemix.recipes.cnn_patchmix test --ckpt_path runs/cnn_patchmix/version_0/checkpoints/last.ckpt

Patch Mixing (Lee et al., arXiv 2306.17848) replaces a random fraction of grid patches with another image's
patches and labels by the replaced fraction; the paper finds it gives CNNs ViT-like patch selectivity and
robustness to occlusion. ``test`` reports, besides accuracy, the occlusion curve of the paper's patch
replacement evaluation: accuracy when a fraction of the grid's patches is replaced by patches of other images
(``test/occlusion_patches_<f>``) or by Gaussian noise (``test/occlusion_noise_<f>``), and a plot of both.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from moemix._checks import ConfigError
from moemix.mix import CutMix, MixUp, MixUpCutMix, PatchMix
from moemix.mix.functional import grid_to_pixels, mix, pair_indices, patch_masks
from moemix.recipes._classifier import ImageClassifier
from moemix.recipes._cli import run_cli

__all__ = ["CNNPatchMix", "MIXINGS", "occlude", "cli_main"]

MIXINGS = ("none", "mixup", "cutmix", "mixup_cutmix", "patchmix")
OCCLUSION_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def occlude(x: torch.Tensor, fraction: float, grid: Sequence[int], mode: str,
            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Replace ``round(fraction * cells)`` random grid cells of each image ``[B, C, H, W]`` by the cells of
    another image of the batch (``mode="patches"``, pairs by flipping the batch) or by N(0, 1) noise
    (``mode="noise"``). Out of place."""
    b = x.shape[0]
    cells = patch_masks(tuple(grid), torch.full((b,), float(fraction)), generator=generator, device="cpu")
    pixels = grid_to_pixels(cells, x.shape[-2:]).to(x.device)
    if mode == "patches":
        return mix(x, None, pair_indices(b, "flip"), pixels, dims=(2, 3))
    if mode == "noise":
        noise = torch.randn(x.shape, generator=generator, device="cpu").to(x)
        return torch.where(pixels.unsqueeze(1), noise, x)
    raise ValueError(f"mode must be 'patches' or 'noise', got {mode!r}")


class CNNPatchMix(ImageClassifier):
    """CNN classifier trained with Patch Mixing (or another mixing for comparison).

    Args:
        model_name: timm CNN (ResNet / ConvNeXt families). Defaults to ``resnet18``.
        mixing: ``"patchmix"``, ``"cutmix"``, ``"mixup"``, ``"mixup_cutmix"`` or ``"none"``. Defaults to patchmix.
        patch_grid: grid of the patch mixing and of the occlusion evaluation. Defaults to 8 (4-pixel
            patches at 32 pixels).
        patch_ratio_range: range of the uniform replaced fraction (the paper does not state it). Defaults
            to (0, 1).
        mix_prob: probability of mixing a batch / sample. Defaults to 1.0.
        mixup_alpha, cutmix_alpha: Beta parameters of the MixUp / CutMix baselines. Defaults 0.8 / 1.0.
        Other arguments: :class:`~moemix.recipes._classifier.ImageClassifier`.
    """

    def __init__(self, model_name: str = "resnet18", model_kwargs: Optional[Dict[str, Any]] = None,
                 num_classes: int = 10, img_size: int = 32, mixing: str = "patchmix", patch_grid: int = 8,
                 patch_ratio_range: Sequence[float] = (0.0, 1.0), mix_prob: float = 1.0, mixup_alpha: float = 0.8,
                 cutmix_alpha: float = 1.0, lr: float = 2e-3, weight_decay: float = 0.05, warmup_epochs: int = 1,
                 min_lr_factor: float = 0.01, label_smoothing: float = 0.1, ema_decay: Optional[float] = None,
                 log_images: bool = True):
        if mixing not in MIXINGS:
            raise ConfigError(f"model.mixing must be one of {MIXINGS}, got {mixing!r}")
        if not isinstance(patch_grid, int) or patch_grid < 1 or img_size % patch_grid:
            raise ConfigError(f"model.patch_grid={patch_grid} must be a positive divisor of model.img_size={img_size}")
        super().__init__(model_name, model_kwargs, num_classes, img_size, lr, weight_decay, warmup_epochs,
                         min_lr_factor, label_smoothing, ema_decay, log_images=log_images)
        self.save_hyperparameters()
        common = dict(label_smoothing=label_smoothing, num_classes=num_classes)
        self.mixer = {
            "none": None,
            "mixup": lambda: MixUp(mixup_alpha, prob=mix_prob, **common),
            "cutmix": lambda: CutMix(cutmix_alpha, prob=mix_prob, correct_lam=True, **common),
            "mixup_cutmix": lambda: MixUpCutMix(mixup_alpha, cutmix_alpha, prob=mix_prob, **common),
            "patchmix": lambda: PatchMix((patch_grid, patch_grid), ratio_range=tuple(patch_ratio_range),
                                         prob=mix_prob, **common),
        }[mixing]
        self.mixer = self.mixer() if self.mixer is not None else None
        self._occlusion: Dict[str, List[float]] = {}

    def on_test_epoch_start(self) -> None:
        self._occlusion = {}
        self._occlusion_generator = torch.Generator().manual_seed(1234)

    def test_step(self, batch, batch_idx: int):
        loss = super().test_step(batch, batch_idx)
        x, y = batch[0], batch[1]
        model, grid = self.eval_model(), (self.hparams.patch_grid,) * 2
        for mode in ("patches", "noise"):
            for f in OCCLUSION_FRACTIONS:
                logits = model(occlude(x, f, grid, mode, self._occlusion_generator))
                correct = (logits.argmax(-1) == y).float().sum().item()
                totals = self._occlusion.setdefault(f"{mode}_{f:.1f}", [0.0, 0.0])
                totals[0] += correct
                totals[1] += y.numel()
        return loss

    def on_test_epoch_end(self) -> None:
        counts = {key: self.trainer.strategy.reduce(torch.tensor(totals, dtype=torch.float64, device=self.device),
                                                    reduce_op="sum").tolist()
                  for key, totals in self._occlusion.items()}  # all ranks' test samples under DDP
        accuracy = {key: c / max(n, 1.0) for key, (c, n) in counts.items()}
        self.log_dict({f"test/occlusion_{key}": value for key, value in accuracy.items()})
        self.occlusion_accuracy = accuracy
        from moemix.callbacks.routing_telemetry import tensorboard_writer

        writer = tensorboard_writer(self.logger)
        if writer is not None:
            writer.add_figure("test/occlusion_curve", occlusion_figure(accuracy), self.current_epoch)


def occlusion_figure(accuracy: Dict[str, float]):
    """Matplotlib figure of accuracy against the occluded fraction, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    for mode in ("patches", "noise"):
        xs = [f for f in OCCLUSION_FRACTIONS if f"{mode}_{f:.1f}" in accuracy]
        ax.plot(xs, [accuracy[f"{mode}_{f:.1f}"] for f in xs], marker="o", label=f"replaced by {mode}")
    ax.set_xlabel("fraction of patches replaced")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    return fig


def cli_main(args=None):
    """``python -m moemix.recipes.cnn_patchmix {fit,validate,test,predict} ...``"""
    return run_cli(CNNPatchMix, "cnn_patchmix", args=args)


if __name__ == "__main__":
    cli_main()
