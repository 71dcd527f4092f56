"""Beat-synchronous mixup (Chen et al., "MusicLDM: Enhancing Novelty in Text-to-Music Generation Using
Beat-Synchronous Mixup Strategies", ICASSP 2024; training code in the mt-musicldm fork).

For each track: tempo bucket ``bpm // 3``; a partner is drawn from the same bucket; both are cropped at a random
downbeat each, so their downbeats line up at t = 0; both are truncated to the shorter remainder; then
``mixed = p * a + (1 - p) * b`` with ``p ~ Beta(5, 5)`` (waveform mixup) or the same on encoder latents
(:class:`LatentBeatSyncMixup`). Tracks alone in their bucket stay unmixed.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..functional._checks import (as_positive_int, check_alpha, check_float_tensor, check_positive_int,
                                 check_probability)
from ..functional.lam import sample_beta
from ..functional.targets import batch_targets, mix_targets
from ..record import MixRecord
from .beat_tracker import track_beats

__all__ = ["BeatSyncMixup", "LatentBeatSyncMixup"]


class BeatSyncMixup:
    """Tempo-bucketed, downbeat-aligned mixup of waveforms ``[B, L]``.

    Returns ``(mixed [B, L], y_soft [B, K] or None)`` (plus a :class:`MixRecord` with ``extra`` holding
    ``bpm``, ``bucket``, ``offset`` (own crop start, samples), ``partner_offset`` and ``length`` (valid samples;
    the rest is zero padding) when ``return_info=True``).

    Args:
        sample_rate: samples per second.
        alpha: Beta(alpha, alpha) for p. Defaults to 5.0 (the paper).
        bucket_bpm: width of a tempo bucket in BPM. Defaults to 3.
        prob: probability of mixing each track. Defaults to 1.0. Setting the attribute ``enabled`` to False
            (``MixSchedule(off_epoch=...)`` does) passes tracks through.
        backend: beat tracker when beats are not given: ``"builtin"`` or ``"librosa"``. Defaults to ``"builtin"``.
        num_classes: K for index labels (optional; MusicLDM itself has none).
        label_smoothing: eps for index labels. Defaults to 0.0.
        return_info: also return the record. Defaults to False.
        generator: optional ``torch.Generator``.
    """

    def __init__(self, sample_rate: int, *, alpha: float = 5.0, bucket_bpm: float = 3.0, prob: float = 1.0,
                 backend: str = "builtin", num_classes: int | None = None, label_smoothing: float = 0.0,
                 return_info: bool = False, generator: torch.Generator | None = None) -> None:
        sample_rate = as_positive_int("sample_rate", sample_rate)
        check_alpha("alpha", alpha)
        check_probability("prob", prob)
        if num_classes is not None:
            check_positive_int("num_classes", num_classes)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if not bucket_bpm > 0:
            raise ValueError(f"bucket_bpm must be > 0, got {bucket_bpm!r}")
        if backend not in ("builtin", "librosa"):
            raise ValueError(f"backend must be 'builtin' or 'librosa', got {backend!r}")
        self.sample_rate = int(sample_rate)
        self.enabled = True  # False passes tracks through (targets still soft), e.g. MixSchedule(off_epoch=...)
        self.alpha, self.bucket_bpm, self.prob, self.backend = float(alpha), float(bucket_bpm), float(prob), backend
        self.num_classes, self.label_smoothing = num_classes, label_smoothing
        self.return_info, self.generator = return_info, generator

    def _randint(self, high: int) -> int:
        src = self.generator.device if self.generator is not None else "cpu"
        return int(torch.randint(0, high, (1,), generator=self.generator, device=src))

    def _pair_within_buckets(self, bucket: torch.Tensor) -> torch.Tensor:
        b = bucket.numel()
        perm = torch.arange(b)
        src = self.generator.device if self.generator is not None else "cpu"
        for key in bucket.unique().tolist():
            members = torch.nonzero(bucket == key).squeeze(1)
            if members.numel() < 2:
                continue
            shuffled = members[torch.randperm(members.numel(), generator=self.generator, device=src).cpu()]
            perm[shuffled] = shuffled.roll(1)  # a cycle: nobody in a bucket of 2+ is their own partner
        return perm

    def analyse(self, wave: torch.Tensor, *, bpm: Sequence[float] | None = None,
                downbeats: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Tempo ``[B]`` and downbeat times (seconds) per track, tracked where not given."""
        bpms, dbs = [], []
        for i in range(wave.shape[0]):
            if bpm is not None and downbeats is not None:
                bpms.append(float(bpm[i]))
                dbs.append(torch.as_tensor(downbeats[i], dtype=torch.float64))
                continue
            beats = track_beats(wave[i], self.sample_rate, backend=self.backend)
            bpms.append(float(bpm[i]) if bpm is not None else beats.bpm)
            dbs.append(torch.as_tensor(downbeats[i], dtype=torch.float64) if downbeats is not None
                       else beats.downbeats.double())
        return torch.tensor(bpms, dtype=torch.float64), dbs

    def align(self, wave: torch.Tensor, *, bpm=None, downbeats=None):
        """Pairs and downbeat-aligned crops: ``(a [B, L], b [B, L], p [B], record)``; zero-padded past ``length``."""
        check_float_tensor("wave", wave)
        if wave.dim() != 2:
            raise ValueError(f"BeatSyncMixup expects waveforms [B, L], got shape {tuple(wave.shape)}")
        b, n = wave.shape
        tempo, dbs = self.analyse(wave, bpm=bpm, downbeats=downbeats)
        bucket = torch.floor(tempo / self.bucket_bpm).long()
        perm = self._pair_within_buckets(bucket)
        src = self.generator.device if self.generator is not None else "cpu"
        apply = torch.rand(b, generator=self.generator, device=src).cpu() < (self.prob if self.enabled else 0.0)
        p = sample_beta(self.alpha, self.alpha, b, generator=self.generator, device="cpu")
        a_out, b_out = wave.clone(), wave.clone()
        offset, partner_offset, length = torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.long), \
            torch.full((b,), n, dtype=torch.long)
        for i in range(b):
            j = int(perm[i])
            if j == i or not apply[i]:
                perm[i] = i
                p[i] = 1.0
                continue
            di = self._pick(dbs[i], n)
            dj = self._pick(dbs[j], n)
            m = min(n - di, n - dj)
            a_out[i].zero_()
            b_out[i].zero_()
            a_out[i, :m] = wave[i, di:di + m]
            b_out[i, :m] = wave[j, dj:dj + m]
            offset[i], partner_offset[i], length[i] = di, dj, m
        record = MixRecord(lam=p, perm=perm, label_lam=p, use_box=torch.zeros(b, dtype=torch.bool), dims=(1,),
                           sizes=(n,), applied=bool((perm != torch.arange(b)).any()),
                           extra={"bpm": tempo.float(), "bucket": bucket, "offset": offset,
                                  "partner_offset": partner_offset, "length": length},
                           not_applicable="this record is a BeatSyncMixup one: the tracks were cropped at their "
                                          "downbeats (extra['offset'], extra['partner_offset'], extra['length']), "
                                          "which apply does not reproduce; crop the aligned tensor with those "
                                          "offsets")
        return a_out, b_out, p, record

    def _pick(self, downbeats: torch.Tensor, n: int) -> int:
        """A random downbeat (in samples) inside the clip; 0 when none is known."""
        pos = (downbeats * self.sample_rate).round().long()
        pos = pos[(pos >= 0) & (pos < n)]
        return int(pos[self._randint(pos.numel())]) if pos.numel() else 0

    def _targets(self, y, record, like):
        if y is None:
            return None
        y_soft = batch_targets(y, like, self.num_classes, self.label_smoothing)  # float32 for half waveforms
        record.targets = y_soft
        return mix_targets(y_soft, record.label_lam, record.perm)

    def __call__(self, wave: torch.Tensor, y: torch.Tensor | None = None, *, bpm: Sequence[float] | None = None,
                 downbeats: Sequence[torch.Tensor] | None = None):
        """Mix a batch of waveforms; ``bpm``/``downbeats`` (seconds, one entry per track) skip the tracker."""
        a, b, p, record = self.align(wave, bpm=bpm, downbeats=downbeats)
        mixed = torch.lerp(b, a, p.to(wave.device, wave.dtype).unsqueeze(1))
        y_mixed = self._targets(y, record, wave)
        return (mixed, y_mixed, record) if self.return_info else (mixed, y_mixed)


class LatentBeatSyncMixup(BeatSyncMixup):
    """Beat-synchronous mixup in a latent space: ``decoder(p * encoder(a) + (1 - p) * encoder(b))``.

    ``a`` and ``b`` are the downbeat-aligned crops of :meth:`BeatSyncMixup.align`; ``encoder`` maps ``[B, L]``
    waveforms to latents ``[B, ...]`` (a VAE's mean, a mel + VAE stack); ``decoder`` is optional (None returns
    the mixed latents, as MusicLDM's latent mixup feeds the diffusion model directly).
    """

    def __init__(self, sample_rate: int, encoder: Callable[[torch.Tensor], torch.Tensor],
                 decoder: Callable[[torch.Tensor], torch.Tensor] | None = None, **kwargs) -> None:
        super().__init__(sample_rate, **kwargs)
        self.encoder, self.decoder = encoder, decoder

    def __call__(self, wave, y=None, *, bpm=None, downbeats=None):
        a, b, p, record = self.align(wave, bpm=bpm, downbeats=downbeats)
        za, zb = self.encoder(a), self.encoder(b)
        z = torch.lerp(zb, za, p.to(za.device, za.dtype).view(-1, *([1] * (za.dim() - 1))))
        out = self.decoder(z) if self.decoder is not None else z
        y_mixed = self._targets(y, record, za)
        return (out, y_mixed, record) if self.return_info else (out, y_mixed)
