"""Audio-visual stream mixup with a curriculum (Cheng et al., "MixSpeech: Cross-Modality Self-Learning with
Audio-Visual Stream Mixup for Visual Speech Translation and Recognition", ICCV 2023).

Two time-aligned feature streams ``[B, T, D]`` (audio and visual, same T and D after their front-ends) are
interpolated into a mixed stream ``ratio * audio + (1 - ratio) * visual``; a curriculum lowers the audio share
over training so the model moves from the easy (audio) to the hard (visual) modality. The schedule below is
linear in training progress (the paper's exact schedule is *unverified*); :class:`MixSchedule` or
:meth:`AVMix.set_progress` drives it.
"""
from __future__ import annotations

import torch

from .functional._checks import check_float_tensor, check_probability
from .functional.mixing import mix_attention_mask

__all__ = ["AVMix"]


class AVMix:
    """Interpolate aligned audio and visual streams with a scheduled audio share.

    Args:
        start_ratio: audio share at progress 0. Defaults to 0.9.
        end_ratio: audio share at progress 1. Defaults to 0.1.
        jitter: half-width of a per-sample uniform perturbation of the ratio. Defaults to 0.0.
        generator: optional ``torch.Generator`` (for ``jitter``).

    Call: ``mix(audio [B, T, D], visual [B, T, D], *, audio_mask=None, visual_mask=None)`` returns the mixed
    stream ``[B, T, D]`` (and the OR-ed mask ``[B, T]`` when masks are given).
    """

    def __init__(self, start_ratio: float = 0.9, end_ratio: float = 0.1, *, jitter: float = 0.0,
                 generator: torch.Generator | None = None) -> None:
        check_probability("start_ratio", start_ratio)
        check_probability("end_ratio", end_ratio)
        check_probability("jitter", jitter)
        self.start_ratio, self.end_ratio, self.jitter = float(start_ratio), float(end_ratio), float(jitter)
        self.generator = generator
        self.progress = 0.0

    @property
    def ratio(self) -> float:
        """Current audio share."""
        return self.start_ratio + (self.end_ratio - self.start_ratio) * self.progress

    def set_progress(self, progress: float) -> None:
        """Training progress in [0, 1] (e.g. ``epoch / max_epochs``)."""
        self.progress = min(1.0, max(0.0, float(progress)))

    def __call__(self, audio: torch.Tensor, visual: torch.Tensor, *, audio_mask: torch.Tensor | None = None,
                 visual_mask: torch.Tensor | None = None):
        check_float_tensor("audio", audio)
        check_float_tensor("visual", visual)
        if audio.shape != visual.shape:
            raise ValueError(f"audio and visual streams must be aligned to one shape, got {tuple(audio.shape)} and "
                             f"{tuple(visual.shape)}")
        b = audio.shape[0]
        ratio = torch.full((b,), self.ratio)
        if self.jitter > 0:
            src = self.generator.device if self.generator is not None else "cpu"
            ratio = (ratio + self.jitter * (2 * torch.rand(b, generator=self.generator, device=src).cpu() - 1)).clamp(0, 1)
        w = ratio.to(audio.device, audio.dtype).view(b, *([1] * (audio.dim() - 1)))
        mixed = torch.lerp(visual, audio, w)
        if audio_mask is None and visual_mask is None:
            return mixed
        am = audio_mask if audio_mask is not None else visual_mask
        vm = visual_mask if visual_mask is not None else audio_mask
        both = torch.cat([am, vm])
        perm = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
        return mixed, mix_attention_mask(both, perm)[:b]
