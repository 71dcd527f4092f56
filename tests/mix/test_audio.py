"""BeatSyncMixup and the built-in beat tracker on synthetic click tracks of known tempo."""
import math

import pytest
import torch

from moemix.mix import BeatSyncMixup, LatentBeatSyncMixup, track_beats

SR = 16000


def click_track(bpm, seconds=8.0, phase=0.1):
    n = int(SR * seconds)
    wave = torch.zeros(n)
    k = torch.arange(160)
    burst = torch.sin(2 * math.pi * 1000 * k / SR) * torch.exp(-k / 40.0)
    t = phase
    while t < seconds - 0.02:
        i = int(t * SR)
        wave[i:i + 160] += burst
        t += 60.0 / bpm
    return wave


@pytest.mark.parametrize("bpm", [66, 90, 120, 137, 174])
def test_tracker_finds_tempo_within_two_percent(bpm):
    beats = track_beats(click_track(bpm), SR)
    assert abs(beats.bpm - bpm) / bpm < 0.02
    assert abs(float(beats.beats[0]) - 0.1) < 0.02  # the first click
    assert torch.allclose(beats.downbeats[1:] - beats.downbeats[:-1], torch.tensor(4 * 60.0 / bpm), atol=0.02)


def test_librosa_backend_when_installed():
    pytest.importorskip("librosa")
    assert abs(track_beats(click_track(120), SR, backend="librosa").bpm - 120) / 120 < 0.05


def test_pairs_stay_in_one_tempo_bucket_and_downbeats_coincide():
    tempos = [120.0, 121.0, 90.0, 90.5, 150.0]
    wave = torch.stack([click_track(b, phase=0.05 + 0.07 * i) for i, b in enumerate(tempos)])
    bsm = BeatSyncMixup(SR, return_info=True, generator=torch.Generator().manual_seed(0))
    mixed, y, rec = bsm(wave)
    bucket = rec.extra["bucket"]
    assert y is None and mixed.shape == wave.shape
    assert torch.equal(bucket[rec.perm], bucket)
    assert rec.perm[4] == 4 and torch.equal(mixed[4], wave[4])  # alone in its bucket: unmixed
    assert (rec.perm[:4] != torch.arange(4)).all()
    for i in range(4):
        j = int(rec.perm[i])
        # clicks of both tracks after the crop: the first of each sits at t = 0 (the aligned downbeat)
        own = track_beats(wave[i], SR).beats - rec.extra["offset"][i] / SR
        other = track_beats(wave[j], SR).beats - rec.extra["partner_offset"][i] / SR
        own, other = own[own > -0.01], other[other > -0.01]
        assert abs(float(own[0])) < 0.015 and abs(float(other[0])) < 0.015
        length = int(rec.extra["length"][i])
        assert (mixed[i, length:] == 0).all()
        p = float(rec.lam[i])
        a = wave[i, rec.extra["offset"][i]:][:length]
        b = wave[j, rec.extra["partner_offset"][i]:][:length]
        assert torch.allclose(mixed[i, :length], p * a + (1 - p) * b, atol=1e-6)


def test_given_downbeats_skip_the_tracker_and_labels_mix():
    wave = torch.stack([click_track(120, seconds=2), click_track(120, seconds=2, phase=0.3)])
    bsm = BeatSyncMixup(SR, num_classes=3, return_info=True, generator=torch.Generator().manual_seed(1))
    mixed, y, rec = bsm(wave, torch.tensor([0, 2]), bpm=[120, 120], downbeats=[torch.tensor([0.1]), torch.tensor([0.3])])
    assert rec.extra["offset"].tolist() == [1600, 4800]
    assert torch.allclose(y[0], torch.tensor([float(rec.lam[0]), 0.0, 1 - float(rec.lam[0])]))


def test_mix_ratio_is_beta_five_five():
    wave = torch.zeros(64, 800)
    bsm = BeatSyncMixup(SR, return_info=True, generator=torch.Generator().manual_seed(0))
    _, _, rec = bsm(wave + 1e-3, bpm=[120.0] * 64, downbeats=[torch.tensor([0.0])] * 64)
    assert abs(float(rec.lam.mean()) - 0.5) < 0.06 and float(rec.lam.std()) < 0.25


def test_latent_variant_mixes_encoder_outputs():
    wave = torch.stack([click_track(120, seconds=2), click_track(120, seconds=2, phase=0.2)])
    enc = lambda w: w.view(w.shape[0], -1, 100).mean(-1)  # noqa: E731
    lbs = LatentBeatSyncMixup(SR, enc, return_info=True, generator=torch.Generator().manual_seed(0))
    z, _, rec = lbs(wave, bpm=[120, 120], downbeats=[torch.tensor([0.1]), torch.tensor([0.2])])
    a, b, p, _ = BeatSyncMixup(SR, generator=torch.Generator().manual_seed(0)).align(
        wave, bpm=[120, 120], downbeats=[torch.tensor([0.1]), torch.tensor([0.2])])
    assert torch.allclose(z, p[:, None] * enc(a) + (1 - p[:, None]) * enc(b), atol=1e-6)


def test_beatsync_rejects_non_float_and_bad_alpha():
    with pytest.raises(ValueError, match="floating point"):
        BeatSyncMixup(SR)(torch.zeros(2, 100, dtype=torch.int16))
    with pytest.raises(ValueError, match="alpha"):
        BeatSyncMixup(SR, alpha=0.0)


def test_beat_sync_record_refuses_apply_which_cannot_reproduce_its_crops():
    from moemix.mix import BeatSyncMixup
    wave = torch.randn(2, 8000)
    _, _, record = BeatSyncMixup(8000, return_info=True)(wave, bpm=[120.0, 121.0],
                                                          downbeats=[torch.tensor([0.1]), torch.tensor([0.2])])
    with pytest.raises(ValueError, match="BeatSyncMixup one"):
        record.apply(wave)
    off = BeatSyncMixup(8000, return_info=True)
    off.enabled = False  # nothing mixed: apply passes the tensor through
    _, _, record = off(wave, bpm=[120.0, 121.0], downbeats=[torch.tensor([0.1]), torch.tensor([0.2])])
    assert record.apply(wave) is wave
