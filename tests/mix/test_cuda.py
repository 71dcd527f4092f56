"""The vectorised accelerator paths agree with the CPU row loops (runs only where CUDA is available)."""
import pytest
import torch

from moemix.mix import CutMix, MixUpCutMix, PatchMix

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_cuda_mixing_equals_cpu(mode):
    x, y = torch.rand(7, 3, 32, 32), torch.randint(0, 10, (7,))
    for mixer_cls in (lambda g: MixUpCutMix(0.8, 1.0, num_classes=10, mode=mode, return_info=True, generator=g),
                      lambda g: CutMix(1.0, num_classes=10, mode=mode, return_info=True, generator=g)):
        xc, yc, rc = mixer_cls(torch.Generator().manual_seed(0))(x, y)
        xg, yg, rg = mixer_cls(torch.Generator().manual_seed(0))(x.cuda(), y.cuda())
        assert xg.is_cuda and torch.allclose(xg.cpu(), xc, atol=1e-6) and torch.allclose(yg.cpu(), yc, atol=1e-6)


@cuda
def test_cuda_generator_and_patchmix():
    g = torch.Generator(device="cuda").manual_seed(0)
    x, y = torch.rand(4, 3, 28, 28, device="cuda"), torch.randint(0, 5, (4,), device="cuda")
    xm, ym = MixUpCutMix(0.8, 1.0, num_classes=5, mode="elem", generator=g)(x, y)
    assert xm.is_cuda and torch.allclose(ym.sum(1), torch.ones(4, device="cuda"))
    xm, ym = PatchMix((7, 7), num_classes=5, generator=g)(x, y)
    assert xm.is_cuda and ym.is_cuda
