"""Cross-check against timm's Mixup: with the same lambda, box and flip pairing, outputs and targets match."""
import pytest
import torch

timm_mixup = pytest.importorskip("timm.data.mixup")

from moemix.mix import MixUpCutMix  # noqa: E402

K = 10


def _ours(x, y, use_cutmix, lam, box=None):
    m = MixUpCutMix(1.0, 1.0, num_classes=K, label_smoothing=0.1, return_info=True)
    m._params = lambda b, sizes: (torch.arange(b - 1, -1, -1), torch.full((b,), lam), torch.full((b,), use_cutmix),
                                  None if box is None else torch.tensor([box]), True)
    return m(x, y)


def test_batch_mixup_matches_timm():
    x, y = torch.rand(6, 3, 16, 16), torch.randint(0, K, (6,))
    t = timm_mixup.Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, num_classes=K, label_smoothing=0.1)
    t._params_per_batch = lambda: (0.3, False)
    xt, yt = t(x.clone(), y)
    xo, yo, _ = _ours(x, y, False, 0.3)
    assert torch.allclose(xo, xt, atol=1e-6) and torch.allclose(yo, yt, atol=1e-6)


def test_batch_cutmix_matches_timm(monkeypatch):
    x, y = torch.rand(6, 3, 16, 16), torch.randint(0, K, (6,))
    box = (2, 11, 4, 16)
    lam = 1 - (9 * 12) / 256
    monkeypatch.setattr(timm_mixup, "cutmix_bbox_and_lam", lambda *a, **k: (box, lam))
    t = timm_mixup.Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, num_classes=K, label_smoothing=0.1)
    t._params_per_batch = lambda: (0.5, True)
    xt, yt = t(x.clone(), y)
    xo, yo, rec = _ours(x, y, True, lam, box)
    assert torch.equal(xo, xt) and torch.allclose(yo, yt, atol=1e-6)


def test_same_box_sampler_as_timm_gives_timm_corrected_lambda():
    from moemix.mix import functional as MF
    boxes = MF.rand_boxes((224, 224), torch.tensor([0.37]), generator=torch.Generator().manual_seed(0))
    yl, yh, xl, xh = boxes[0].tolist()
    timm_lam = 1.0 - (yh - yl) * (xh - xl) / float(224 * 224)
    assert abs(float(1 - MF.box_fraction(boxes, (224, 224))[0]) - timm_lam) < 1e-6
