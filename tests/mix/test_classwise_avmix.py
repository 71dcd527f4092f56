"""ClasswiseMixup (ProxyDet) and AVMix (MixSpeech)."""
import pytest
import torch
import torch.nn.functional as F

from moemix.mix import AVMix, ClasswiseMixup, class_prototypes, loss_classwise_mixup


def test_class_prototypes_are_normalised_class_means():
    feats = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    classes, protos = class_prototypes(feats, torch.tensor([4, 4, 7]))
    assert classes.tolist() == [4, 7] and torch.allclose(protos, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_classwise_mixup_mixes_both_with_the_same_lambda_and_renormalises():
    g = torch.Generator().manual_seed(0)
    r = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    t = F.normalize(torch.randn(5, 4, generator=g), dim=-1)
    rm, tm, rec = ClasswiseMixup(return_info=True, generator=g)(r, t)
    lam = rec.lam[:, None]
    assert torch.allclose(rm, F.normalize(lam * r + (1 - lam) * r[rec.perm], dim=-1), atol=1e-6)
    assert torch.allclose(tm, F.normalize(lam * t + (1 - lam) * t[rec.perm], dim=-1), atol=1e-6)
    assert torch.allclose(rm.norm(dim=-1), torch.ones(5)) and loss_classwise_mixup(rm, rm) == 0


def test_avmix_follows_the_curriculum_and_ors_masks():
    audio, visual = torch.ones(2, 3, 4), torch.zeros(2, 3, 4)
    av = AVMix(start_ratio=0.9, end_ratio=0.1)
    assert torch.allclose(av(audio, visual), torch.full((2, 3, 4), 0.9))
    av.set_progress(1.0)
    mixed, mask = av(audio, visual, audio_mask=torch.tensor([[1, 1, 0]] * 2, dtype=torch.bool),
                     visual_mask=torch.tensor([[1, 0, 1]] * 2, dtype=torch.bool))
    assert torch.allclose(mixed, torch.full((2, 3, 4), 0.1)) and mask.all()


def test_avmix_rejects_misaligned_streams():
    with pytest.raises(ValueError, match="aligned"):
        AVMix()(torch.zeros(2, 3, 4), torch.zeros(2, 5, 4))
