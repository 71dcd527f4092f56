"""Sampling the mixing coefficient lambda from a Beta distribution with an injected generator.

``torch.distributions.Beta`` cannot take a ``torch.Generator``, so Beta draws here are built from two
Gamma draws, each by Marsaglia and Tsang's rejection method ("A simple method for generating gamma
variables", ACM TOMS 2000) on ``torch.randn``/``torch.rand`` with the caller's generator. The same
generator and seed therefore give the same lambdas on every run.
"""
from __future__ import annotations

import torch

from ._checks import check_alpha

__all__ = ["sample_beta", "sample_lambda"]


def _device_of(generator: torch.Generator | None, device) -> torch.device:
    if generator is not None:
        return generator.device
    return torch.device(device) if device is not None else torch.device("cpu")


def _sample_gamma(concentration: float, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """Gamma(concentration, 1) draws of shape [n], float64, on the generator's device."""
    boost = concentration < 1.0
    a = concentration + 1.0 if boost else concentration
    d = a - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    out = torch.empty(n, dtype=torch.float64, device=device)
    todo = torch.arange(n, device=device)
    while todo.numel():
        m = todo.numel()
        z = torch.randn(m, dtype=torch.float64, device=device, generator=generator)
        u = torch.rand(m, dtype=torch.float64, device=device, generator=generator)
        v = (1.0 + c * z) ** 3
        ok = (v > 0) & (torch.log(u.clamp_min(1e-300)) < 0.5 * z * z + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        out[todo[ok]] = d * v[ok]
        todo = todo[~ok]
    if boost:  # Gamma(a) = Gamma(a + 1) * U ** (1 / a)
        u = torch.rand(n, dtype=torch.float64, device=device, generator=generator)
        out = out * u.clamp_min(1e-300) ** (1.0 / concentration)
    return out


def sample_beta(alpha: float, beta: float | None = None, size: int = 1, *,
                generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Draw ``size`` samples of Beta(alpha, beta) (``beta`` defaults to ``alpha``).

    Args:
        alpha: first concentration, > 0.
        beta: second concentration, > 0. Defaults to ``alpha`` (the symmetric mixup prior).
        size: number of draws.
        generator: source of randomness; draws are made on its device. Defaults to torch's global RNG.
        device: device of the result. Defaults to the generator's device, else CPU.

    Returns:
        float32 tensor of shape ``[size]`` with values in [0, 1].
    """
    beta = alpha if beta is None else beta
    check_alpha("alpha", alpha)
    check_alpha("beta", beta)
    src = _device_of(generator, None)
    a = _sample_gamma(float(alpha), size, generator, src)
    b = _sample_gamma(float(beta), size, generator, src)
    total = a + b
    underflow = total <= 0  # both gammas can underflow to 0 for tiny concentrations (subnormal sums are kept)
    lam = a / torch.where(underflow, torch.ones_like(total), total)
    if bool(underflow.any()):  # draw from the limit distribution: 1 with probability alpha / (alpha + beta), else 0
        coin = torch.rand(size, generator=generator, device=src, dtype=torch.float64) < alpha / (alpha + beta)
        lam = torch.where(underflow, coin.double(), lam)
    return lam.float().to(device if device is not None else src)


def sample_lambda(alpha: float, batch_size: int | None = None, *,
                  generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Mixing coefficient lambda ~ Beta(alpha, alpha) (Zhang et al., "mixup", ICLR 2018).

    Args:
        alpha: Beta concentration, > 0 (``alpha <= 0`` raises ``ValueError``; turn mixing off instead).
        batch_size: ``None`` for one lambda per batch (a 0-d tensor), else one per sample (``[B]``).
        generator: optional ``torch.Generator`` for reproducible draws.
        device: device of the result.

    Returns:
        a 0-d tensor (per batch) or a ``[B]`` tensor (per sample), float32 in [0, 1].
    """
    lam = sample_beta(alpha, alpha, 1 if batch_size is None else batch_size, generator=generator, device=device)
    return lam[0] if batch_size is None else lam
