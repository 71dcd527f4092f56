"""The GEMM library of the fused expert loop on CPU: torch's default BLAS or oneDNN.

torch runs fp32 ``torch.mm`` on x86 through its BLAS (MKL in the official wheels). torch also ships
oneDNN (``torch.backends.mkldnn``), whose AVX-512 matmul kernels ran the fused loop's products faster on
AMD EPYC CPUs, 2 threads (``benchmarks/cpu_gemm.py``, one expert's products one at a time, and
``benchmarks/moe_layer.py --layouts loop,loop_blas`` for the whole layer):

- Zen 5 (``cpu family`` 26, AVX-512): ``torch.mm`` took 2.1-2.2 times oneDNN's time for the layers' products
  and input gradients at the coarse and fine sizes, 1.7-1.9 times for the weight gradients (written into their
  buffers, the copy included), 1.3-2.1 times with 32 rows per expert; with 16 rows 1.1-1.6 times for the
  layers and input gradients and 0.65-0.81 for the weight gradients, a size at which ``"auto"`` runs the padded
  layout (``docs/results/cpu_gemm_zen5.md``). The loop with ``torch.mm`` took 1.55-1.79 times as long at
  ``coarse`` and ``fine`` in two runs (GEMM-library table of ``docs/results/moe_layer.md``).
- Zen 4 (``cpu family`` 25, AVX-512): the loop took 3-6% longer with ``torch.mm`` at ``coarse`` and ``fine``
  (E=8 and 64, 1024 and 512 rows per expert), 13-19% longer with 32 rows per expert and 2-6% longer with 16
  rows of a 512x512 expert (medians of runs 1-6 in the GEMM-library table); the weight gradients were mixed
  (``mm / onednn`` 0.75-1.96, ``docs/results/cpu_gemm.md``), so ``"auto"`` keeps them in ``torch.mm`` there.

:func:`cpu_gemm` decides which library runs a product: ``product="forward"`` for the layers' products and
the input gradients, ``"weight_grad"`` for the weight gradients (``x^T @ grad``). ``"auto"`` (the default)
picks oneDNN for the products measured faster on the kind of machine it runs on: fp32 CPU tensors, an AMD
CPU (``vendor_id`` in ``/proc/cpuinfo``) on which torch dispatches AVX-512 kernels (family 26: every
product, measured on model 2 only; any other family: the forward products, the Zen 4 rule, which unmeasured
families take), oneDNN
built in and enabled (``torch.backends.mkldnn.flags(enabled=False)`` turns it off), and no Python dispatch
mode or torch function mode other than a default device (``FlopCounterMode``, ...) and no ``torch.compile``
tracing active, as those only know the standard ops. Elsewhere (Intel CPUs, where MKL is Intel's own tuned
library; AMD without AVX-512, e.g. Zen 3, where oneDNN was slower at 21 of the loop's 24 products and at
most 7% faster at the other 3, ``docs/results/cpu_gemm_avx2.md``; ARM; bf16/fp16; CUDA) it is
``torch.mm``. :func:`set_cpu_gemm` or the ``MOEMIX_CPU_GEMM`` environment variable (``auto``, ``blas``,
``onednn``) overrides the choice process-wide; ``onednn`` runs every product in oneDNN and still falls
back to BLAS where oneDNN cannot run (not fp32 on CPU, not built in, disabled, a mode or tracing active).

oneDNN is reached through ``torch.ops.mkldnn._linear_pointwise``, the fp32 linear that torch's own
compiler (inductor) emits on CPU; it is not a documented torch API, so its absence also means BLAS. It has
no ``out=``: a product meant for a buffer is copied in (the benchmark times that copy). The two libraries
sum in different orders: results agree to fp32 rounding, not bit for bit.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch import Tensor

from moemix.layers._validate import check_choice

__all__ = ["cpu_gemm", "set_cpu_gemm", "cpu_gemm_setting", "onednn_gemm_usable", "matmul", "cpu_fields",
           "CPU_GEMM_CHOICES", "PRODUCTS"]

CPU_GEMM_CHOICES = ("auto", "blas", "onednn")
PRODUCTS = ("forward", "weight_grad")  # the layers' products and input gradients; the weight gradients
# "auto": the products oneDNN runs on AMD CPUs with AVX-512 kernels, by ``cpu family`` (module doc; any
# family not listed takes the Zen 4 rule).
AUTO_ONEDNN_PRODUCTS = {26: PRODUCTS}
AUTO_ONEDNN_PRODUCTS_OTHER_FAMILIES = ("forward",)
ENV_VAR = "MOEMIX_CPU_GEMM"


_setting = os.environ.get(ENV_VAR, "auto").strip().lower()
check_choice(ENV_VAR, _setting, CPU_GEMM_CHOICES)


def set_cpu_gemm(choice: str) -> None:
    """Which library runs the fused loop's CPU products, process-wide: ``"auto"`` (measured rule, see
    the module doc), ``"blas"`` (always ``torch.mm``) or ``"onednn"`` (wherever oneDNN can run)."""
    global _setting
    check_choice("choice", choice, CPU_GEMM_CHOICES)
    _setting = choice


def cpu_gemm_setting() -> str:
    """The current process-wide setting (:func:`set_cpu_gemm`)."""
    return _setting


def cpu_fields() -> dict:
    """The first processor's ``/proc/cpuinfo`` fields (``vendor_id``, ``cpu family``, ``model``, ``model
    name``, ...; empty where there is no such file); a fresh dict each call."""
    return dict(_read_cpu_fields())


@functools.lru_cache(maxsize=None)
def _read_cpu_fields() -> dict:
    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


@functools.lru_cache(maxsize=None)
def _onednn_linear() -> Optional[object]:
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    return op if op is not None and torch.backends.mkldnn.is_available() else None


@functools.lru_cache(maxsize=None)
def _auto_onednn_products() -> tuple:
    """The products ``"auto"`` runs in oneDNN on this machine (see the module doc): on AMD x86 with AVX-512
    kernels, those measured faster for its CPU family; elsewhere none."""
    fields = cpu_fields()
    if fields.get("vendor_id") != "AuthenticAMD" or not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return ()
    family = fields.get("cpu family", "")
    return AUTO_ONEDNN_PRODUCTS.get(int(family) if family.isdigit() else None, AUTO_ONEDNN_PRODUCTS_OTHER_FAMILIES)


def python_modes_active() -> bool:
    """A Python dispatch mode (``FlopCounterMode``, fake tensors, ...) or a torch function mode other than
    a default device (``torch.set_default_device``, ``with torch.device(...)``) is on in this thread."""
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._device import DeviceContext
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    if _get_current_dispatch_mode() is not None:
        return True
    return torch._C._is_torch_function_mode_enabled() and any(
        not isinstance(mode, DeviceContext) for mode in _get_current_function_mode_stack())


def onednn_gemm_usable(a: Tensor, modes: bool = True) -> bool:
    """Whether oneDNN can run a product of ``a``'s kind here and now (whatever the setting); ``modes=False``
    leaves out the checks for ``torch.compile`` tracing and Python modes (see :func:`cpu_gemm`)."""
    return (a.device.type == "cpu" and a.dtype == torch.float32 and _onednn_linear() is not None
            and torch.backends.mkldnn.enabled
            and not (modes and (torch.compiler.is_compiling() or python_modes_active())))


def cpu_gemm(a: Tensor, modes: bool = True, product: str = "forward") -> str:
    """``"onednn"`` or ``"blas"``: the library that runs products of ``a``'s kind under the setting.
    ``product``: ``"forward"`` (the layers' products and input gradients) or ``"weight_grad"``.
    ``modes=False``: the library outside any tracing or Python mode, what a plain run uses (the ``"auto"``
    layout rule weighs that, so that e.g. ``FlopCounterMode`` sees the layout a plain run takes)."""
    check_choice("product", product, PRODUCTS)
    if _setting == "blas" or not onednn_gemm_usable(a, modes):
        return "blas"
    return "onednn" if _setting == "onednn" or product in _auto_onednn_products() else "blas"


def matmul(a: Tensor, b: Tensor, bias: Optional[Tensor] = None, out: Optional[Tensor] = None,
           library: Optional[str] = None) -> Tensor:
    """``a @ b (+ bias)`` for ``a [M, K]``, ``b [K, N]`` (any strides), ``bias [N]``, in the library
    :func:`cpu_gemm` picks (or ``library``, from an earlier :func:`cpu_gemm` call on the same kind of
    tensors). With ``out`` (``[M, N]``) the result is written there and returned."""
    if (library or cpu_gemm(a)) == "onednn":
        y = _onednn_linear()(a, b.t(), bias, "none", [], "")
        return y if out is None else out.copy_(y)
    if bias is None:
        return torch.mm(a, b, out=out)
    return torch.addmm(bias, a, b, out=out)
