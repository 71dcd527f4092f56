"""Forward+backward speed of one MoE layer: moemix SparseMoE against the usual alternatives.

    python benchmarks/moe_layer.py [--quick] [--threads 2] [--json FILE] [--markdown FILE] [--device cpu|cuda]
                                   [--dtype float32|bfloat16]
    python benchmarks/moe_layer.py --profile fine,small_coarse   # where one step's time goes

Variants (all compute the same function family: SwiGLU experts ``w2(silu(x w_gate) * (x w_up))``,
no biases, D=512, float32 unless ``--dtype`` says otherwise; the router is a bias-free linear gate, softmax,
top-k, renormalised):

* ``moemix``: ``SparseMoE(D, H, act_layer="silu", glu=True, bias=False, num_experts=E, k=k)`` with its
  default auxiliary losses (Switch load-balance + router z-loss) computed in the forward pass as the
  layer always does; only ``output.sum()`` is back-propagated. ``--layouts`` adds the same layer with
  one dispatch layout forced (``moemix:sorted``, ``moemix:padded``, ``moemix:grouped_mm``).
* ``hf_loop``: the HF-transformers Mixtral loop (transformers 4.x ``MixtralSparseMoeBlock``, written
  here): one ``nn.Linear`` triple per expert, ``torch.where(expert_mask[e])``, gather, expert MLP,
  ``index_add_``. This is the baseline of the issue's targets (``vs_hf_loop``).
* ``hf_block_grouped_mm``: the installed transformers' own ``MixtralSparseMoeBlock`` with stacked
  expert weights and ``experts_implementation="grouped_mm"`` (the default transformers >= 5 picks for a
  model); only when importable. Its ``"eager"`` loop indexes the stacked parameters per expert, whose
  backward materialises a full-size gradient for every hit expert (seconds per step at E=64 on CPU); it
  is used for the correctness check and timed only with ``--hf-eager``.
* ``gshard``: GShard/DeepSpeed-style capacity dispatch written here: one-hot dispatch and combine
  tensors ``[G, S, E, C]`` over groups of ``S`` tokens (GShard "local group dispatching", ``--group-size``),
  capacity ``C = k * int(cf * ceil(S / E))`` (tutel), cf 1.25, first choices get priority, overflow
  dropped; einsum in, batched expert GEMMs over ``[E, G*C, D]``, einsum out.
* ``dense_active``: a SwiGLU FFN with hidden ``k * H`` (the active FLOPs of one token), no router:
  the practical limit.
* ``megablocks``: megablocks ``dMoE`` (grouped GLU, moemix's weights) with ``--device cuda --dtype bfloat16``
  when megablocks imports (``benchmarks/_megablocks.py``; its grouped GEMMs take bfloat16 only).

Routing: ``balanced`` = router as initialised and standard-normal tokens; ``skewed`` = the gate rows
of a few "hot" experts (``k`` of them, at least 2) get ``4 * u`` added for a fixed unit vector ``u``, so
the tokens with a positive component along ``u`` (about half) send most of their ``k`` choices to the
hot experts. The same router weights are copied into every routed variant, and before timing the
script checks, in float32, that moemix, ``hf_loop`` and the transformers block give the same output to
1e-4 (and GShard too when its capacity is made large enough to drop nothing); it aborts otherwise.
With ``--dtype bfloat16`` the variants are then cast (parameters and input) and timed in bfloat16;
megablocks, bfloat16 only, is checked there (``_megablocks.check_megablocks``): its router weight against moemix's
logits, its experts fed moemix's routing decision and the whole layer on the tokens where both routers
agree, against moemix's output (limits in ``MEGABLOCKS_TOLERANCE``); if a check fails, megablocks is left
out and the JSON's ``skipped`` (printed with each case) says why.

Timing: every step is ``zero grads (set to None, untimed); y = layer(x); y.sum().backward()`` with
``x.requires_grad`` (a layer inside a network), variants interleaved round-robin with the order rotated
each round, medians reported. The ratios ``vs_hf_loop`` and ``vs_dense_active`` are medians over rounds of
the two variants' time ratio within a round (paired, so a slow spell of the shared machine hits both
sides); ``vs_hf_loop_of_medians`` in the JSON is the ratio of the medians. Memory: on CPU each variant
runs one step in a fresh subprocess (``MALLOC_MMAP_THRESHOLD_=65536`` so freed buffers leave the resident
set): two warm-up steps, then the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``) and the
growth of the peak over the resident size just before one more step is reported (activations,
temporaries, gradients; not parameters or inputs). On CUDA: ``max_memory_allocated`` growth over the allocated
bytes before the step.

Allocator: with glibc's defaults, a buffer above the mmap threshold (at most 32 MiB) is returned to the
kernel when freed and its pages are faulted in, zeroed, again the next step; stacked ``[E, in, out]`` weight
gradients are such buffers, one ``nn.Linear`` per expert is not. Run the script under
``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184`` (or with
jemalloc / tcmalloc in ``LD_PRELOAD``) to time every variant with an allocator that keeps freed memory; the
JSON's ``meta.allocator_env`` and the page's command line record which one ran.

JSON (``--json``): ``"meta"`` (command, versions, machine, threads, allocator environment), then one entry per case,
keyed by the configuration for balanced routing and ``<config>_skewed`` for skewed routing, each with
``ms`` (median ms per variant), ``vs_hf_loop`` (HF time / moemix time, higher is better),
``vs_dense_active`` (moemix time / dense time, lower is better) and timing and memory details; peak memory
(``peak_mem_bytes``) is measured for balanced routing only.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import (interleaved_medians, max_rss_bytes, paired_ratio, reset_peak_rss,  # noqa: E402
                     rss_bytes, sync)

from _output import cpu_description, write_results  # noqa: E402
from _megablocks import MEGABLOCKS_DTYPE, make_megablocks, megablocks_import_error, megablocks_problem  # noqa: E402

from moemix.layers import SparseMoE  # noqa: E402

D = 512


@dataclass(frozen=True)
class Config:
    name: str
    E: int
    k: int
    H: int
    T: int


CONFIGS = [
    Config("coarse", 8, 2, 1024, 4096),
    Config("fine", 64, 8, 256, 4096),
    Config("small_coarse", 8, 2, 1024, 128),
    Config("small_fine", 64, 8, 256, 128),
]
ROUTINGS = ("balanced", "skewed")
MAIN_VARIANTS = ("moemix", "hf_loop", "gshard", "dense_active")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------------------
# Reference implementations written for the benchmark
# --------------------------------------------------------------------------------------------------
class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)`` without biases (Mixtral's expert, also the dense baseline)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class HFMixtralLoop(nn.Module):
    """The transformers 4.x ``MixtralSparseMoeBlock`` forward, written out (jitter off)."""

    def __init__(self, dim: int, hidden: int, num_experts: int, k: int):
        super().__init__()
        self.num_experts, self.top_k = num_experts, k
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(dim, hidden) for _ in range(num_experts))

    def forward(self, hidden_states):
        hidden_dim = hidden_states.shape[-1]
        hidden_states = hidden_states.reshape(-1, hidden_dim)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final = torch.zeros_like(hidden_states)
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_layer = self.experts[expert_idx]
            idx, top_x = torch.where(expert_mask[expert_idx].squeeze(0))
            current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
            current = expert_layer(current_state) * routing_weights[top_x, idx, None]
            final.index_add_(0, top_x, current.to(hidden_states.dtype))
        return final


class GShardMoE(nn.Module):
    """GShard/DeepSpeed-style capacity MoE: one-hot dispatch/combine tensors and einsums."""

    def __init__(self, dim: int, hidden: int, num_experts: int, k: int, capacity_factor: float = 1.25,
                 group_size: int = 256):
        super().__init__()
        self.num_experts, self.k, self.hidden = num_experts, k, hidden
        self.capacity_factor, self.group_size = capacity_factor, group_size
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))  # gate | up
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.last_dropped = 0

    def forward(self, x):
        T, dim = x.shape
        E, k = self.num_experts, self.k
        S = min(self.group_size, T)
        if T % S:
            raise ValueError(f"T={T} must be a multiple of the group size {S}")
        G = T // S
        C = k * int(self.capacity_factor * math.ceil(S / E))
        probs = F.softmax(self.gate(x).float(), dim=-1)
        w, idx = torch.topk(probs, k, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        with torch.no_grad():  # slot of each assignment in its expert's buffer, first choices first
            mask = F.one_hot(idx.view(G, S, k), E).transpose(1, 2).reshape(G, k * S, E)
            pos = (torch.cumsum(mask, dim=1) - 1).mul_(mask).sum(-1).view(G, k, S).transpose(1, 2)  # [G,S,k]
            keep = pos < C
            slot = (idx.view(G, S, k) * C + pos.clamp(max=C - 1)).view(G, S, k)
            dispatch = torch.zeros(G, S, E * C, dtype=x.dtype, device=x.device)
            dispatch.scatter_add_(2, slot, keep.to(x.dtype))
            dispatch = dispatch.view(G, S, E, C)
            self.last_dropped = int((~keep).sum())
        combine = torch.zeros(G, S, E * C, dtype=x.dtype, device=x.device)
        combine = combine.scatter_add(2, slot, w.view(G, S, k) * keep).view(G, S, E, C)
        xg = x.view(G, S, dim)
        expert_in = torch.einsum("gsec,gsd->egcd", dispatch, xg).reshape(E, G * C, dim)
        gate, up = torch.bmm(expert_in, self.w1).chunk(2, dim=-1)
        expert_out = torch.bmm(F.silu(gate) * up, self.w2).view(E, G, C, dim)
        return torch.einsum("gsec,egcd->gsd", combine, expert_out).reshape(T, dim)


# --------------------------------------------------------------------------------------------------
# Building one case
# --------------------------------------------------------------------------------------------------
def _hf_block_cls():
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        return MixtralConfig, MixtralSparseMoeBlock
    except Exception:  # noqa: BLE001 - any import problem means "not usable"
        return None


def make_hf_block(cfg: Config, impl: str, moe: SparseMoE):
    found = _hf_block_cls()
    if found is None:
        return None
    MixtralConfig, MixtralSparseMoeBlock = found
    hf_cfg = MixtralConfig(hidden_size=D, intermediate_size=cfg.H, num_local_experts=cfg.E,
                           num_experts_per_tok=cfg.k, hidden_act="silu", router_jitter_noise=0.0)
    hf_cfg._experts_implementation = impl
    block = MixtralSparseMoeBlock(hf_cfg)
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        block.experts.gate_up_proj.copy_(moe.experts.w1.transpose(1, 2))  # [E, 2H, D], gate then up
        block.experts.down_proj.copy_(moe.experts.w2.transpose(1, 2))  # [E, D, H]
    return block


def make_moemix(cfg: Config, routing: str, seed: int) -> SparseMoE:
    torch.manual_seed(seed)
    moe = SparseMoE(D, cfg.H, act_layer="silu", glu=True, bias=False, num_experts=cfg.E, k=cfg.k)
    if routing == "skewed":
        with torch.no_grad():
            u = F.normalize(torch.randn(D, generator=torch.Generator().manual_seed(seed + 1)), dim=0)
            moe.router.weight[: hot_experts(cfg)] += 4.0 * u
    return moe


def hot_experts(cfg: Config) -> int:
    return max(cfg.k, 2)


def make_inputs(cfg: Config, seed: int, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 2)
    return torch.randn(cfg.T, D, generator=g).to(device=device, dtype=dtype).requires_grad_(True)


def make_variant(name: str, cfg: Config, moe: SparseMoE, args) -> Optional[nn.Module]:
    """Module for variant ``name`` with ``moe``'s weights (router and experts), or None if unavailable."""
    H, E, k = cfg.H, cfg.E, cfg.k
    if name == "moemix":
        return moe
    if name.startswith("moemix:"):  # the same layer with one dispatch strategy forced
        layout = name.split(":", 1)[1]
        forced = SparseMoE(D, H, act_layer="silu", glu=True, bias=False, num_experts=E, k=k,
                           dispatch_layout=layout)
        forced.load_state_dict(moe.state_dict())
        return forced
    if name == "hf_loop":
        m = HFMixtralLoop(D, H, E, k)
        with torch.no_grad():
            m.gate.weight.copy_(moe.router.weight)
            for e, ex in enumerate(m.experts):
                ex.w1.weight.copy_(moe.experts.w1[e, :, :H].t())
                ex.w3.weight.copy_(moe.experts.w1[e, :, H:].t())
                ex.w2.weight.copy_(moe.experts.w2[e].t())
        return m
    if name == "gshard":
        m = GShardMoE(D, H, E, k, capacity_factor=args.capacity_factor, group_size=args.group_size)
        with torch.no_grad():
            m.gate.weight.copy_(moe.router.weight)
            m.w1.copy_(moe.experts.w1)
            m.w2.copy_(moe.experts.w2)
        return m
    if name == "dense_active":
        torch.manual_seed(1234)
        return SwiGLU(D, k * H)
    if name == "hf_block_grouped_mm":
        return make_hf_block(cfg, "grouped_mm", moe)
    if name == "hf_block_eager":
        return make_hf_block(cfg, "eager", moe)
    if name == "megablocks":
        if DTYPES[args.dtype] != MEGABLOCKS_DTYPE:
            raise ValueError("its grouped GEMMs take bfloat16 only (run with --dtype bfloat16)")
        problem = megablocks_import_error()
        if problem:
            raise RuntimeError(problem)
        return make_megablocks(moe, args.device)
    raise ValueError(name)


def forward_of(name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if name.startswith("hf_block"):
        return module(x.unsqueeze(0)).squeeze(0)  # transformers' block takes [B, S, D]
    return module(x)


def make_step(name: str, module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        for p in params:  # set_to_none (zero_grad's default) so no variant pays for accumulation
            p.grad = None
        x.grad = None
        forward_of(name, module, x).sum().backward()

    return step


# --------------------------------------------------------------------------------------------------
# Correctness guard
# --------------------------------------------------------------------------------------------------
def check_same_function(cfg: Config, routing: str, moe: SparseMoE, modules: Dict[str, nn.Module],
                        x: torch.Tensor, args) -> Dict[str, float]:
    """Max |moemix - other| for the routed variants; exits if any exceeds the tolerance."""
    diffs = {}
    with torch.no_grad():
        ref = moe(x)
        others = {n: m for n, m in modules.items()
                  if n in ("hf_loop", "hf_block_grouped_mm", "hf_block_eager") or n.startswith("moemix:")}
        if "hf_block_eager" not in others and "hf_loop" in others:
            eager = make_hf_block(cfg, "eager", moe)
            if eager is not None:
                others["hf_block_eager"] = eager.to(x.device)
        for name, m in others.items():
            diffs[name] = (forward_of(name, m, x) - ref).abs().max().item()
        if "gshard" in modules:  # with a capacity that drops nothing GShard computes the same function
            xs = x[: min(cfg.T, 128)]
            big = GShardMoE(D, cfg.H, cfg.E, cfg.k, capacity_factor=cfg.E / cfg.k, group_size=args.group_size)
            big.load_state_dict(modules["gshard"].state_dict())
            big.to(x.device)
            diffs["gshard(no-drop)"] = (big(xs) - moe(xs)).abs().max().item()
            if big.last_dropped:
                sys.exit(f"internal error: GShard check dropped {big.last_dropped} tokens")
    tol = 1e-4
    bad = {n: d for n, d in diffs.items() if not d <= tol}
    if bad:
        sys.exit(f"ABORT: {cfg.name}/{routing}: outputs differ from moemix beyond {tol}: {bad}. "
                 "The comparison would not be fair; fix the weight copying or the implementation.")
    return diffs


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------
def measure_memory_here(name: str, cfg: Config, routing: str, args, device) -> Optional[int]:
    """Peak bytes of one fwd+bwd step beyond what was resident/allocated just before it."""
    moe = make_moemix(cfg, routing, args.seed)
    module = make_variant(name, cfg, moe, args)
    if module is None:
        return None
    dtype = DTYPES[args.dtype]
    module = module.to(device=device, dtype=dtype)
    x = make_inputs(cfg, args.seed, device, dtype)
    step = make_step(name, module, x)
    if name != "moemix":
        del moe
    gc.collect()
    if torch.device(device).type == "cuda":
        step()  # warm (cuBLAS workspaces etc.), then measure a steady-state step
        sync(device)
        for p in module.parameters():
            p.grad = None
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        sync(device)
        return torch.cuda.max_memory_allocated() - before
    # Two full warm-up steps (code pages, thread pools, allocator arenas, lazily created buffers), then
    # the kernel's peak-RSS mark is reset to the current RSS and one step is measured.
    for _ in range(2):
        step()
    for p in module.parameters():
        p.grad = None
    x.grad = None
    gc.collect()
    reset_peak_rss()
    before = rss_bytes()
    step()
    return max(max_rss_bytes() - before, 0)


ALLOCATOR_ENV = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def allocator_env() -> dict:
    """The environment variables that change how this process's ``malloc`` keeps freed memory."""
    return {k: os.environ[k] for k in ALLOCATOR_ENV if k in os.environ}


def measure_memory_subprocess(name: str, cfg: Config, routing: str, args) -> Optional[int]:
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    env.update(MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--_mem-worker", f"{cfg.name},{routing},{name}",
           "--layouts", args.layouts, "--dtype", args.dtype,
           "--threads", str(args.threads), "--seed", str(args.seed), "--group-size", str(args.group_size),
           "--capacity-factor", str(args.capacity_factor)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        print(f"  memory worker for {name} failed: {res.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    value = json.loads(res.stdout.strip().splitlines()[-1])["bytes"]
    return value


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm", "mkldnn::_linear_pointwise")


def profile_case(cfg: Config, routing: str, args, device, names=("moemix", "hf_loop", "dense_active")) -> None:
    """Print where one step's time goes (``--profile``): GEMM share and the largest other ops, per variant."""
    from torch.profiler import profile

    moe = make_moemix(cfg, routing, args.seed)
    dtype = DTYPES[args.dtype]
    x = make_inputs(cfg, args.seed, device, dtype)
    for name in names:
        step = make_step(name, make_variant(name, cfg, moe, args).to(device=device, dtype=dtype), x)
        for _ in range(2):
            step()
        sync(device)
        with profile() as prof:
            for _ in range(3):
                step()
            sync(device)
        ops = [(e.key, e.self_cpu_time_total / 3e3) for e in prof.key_averages()]
        total = sum(ms for _, ms in ops)
        gemm = sum(ms for key, ms in ops if key in GEMM_OPS)
        others = sorted(((ms, key) for key, ms in ops if key not in GEMM_OPS), reverse=True)[:6]
        print(f"{cfg.name}/{routing} {name}: {total:.1f} ms per step under the profiler, GEMMs {gemm:.1f} ms "
              f"({100 * gemm / total:.0f}%); then " + ", ".join(f"{key} {ms:.1f}" for ms, key in others))


def variants_for(args, device) -> list:
    names = list(MAIN_VARIANTS)
    names += [f"moemix:{layout}" for layout in args.layouts.split(",") if layout]
    if _hf_block_cls() is not None:
        names.append("hf_block_grouped_mm")
        if args.hf_eager:
            names.append("hf_block_eager")
    if torch.device(device).type == "cuda":
        names.append("megablocks")
    return names


def expert_counts(moe: SparseMoE, x: torch.Tensor) -> list:
    """Assignments per expert that ``moe``'s router makes for tokens ``x`` (host ints)."""
    with torch.no_grad():
        return torch.bincount(moe.router(x).indices.flatten(), minlength=moe.num_experts).tolist()


def routing_stats(moe: SparseMoE) -> Dict[str, float]:
    tpe = moe.tokens_per_expert.float()
    return {"max_over_mean_load": (tpe.max() / tpe.mean()).item(),
            "hot_share": (tpe[:hot_experts_from(moe)].sum() / tpe.sum()).item()}


def hot_experts_from(moe: SparseMoE) -> int:
    return max(moe.k, 2)


def run_case(cfg: Config, routing: str, args, device, repeats: int, budget_s: float) -> dict:
    moe = make_moemix(cfg, routing, args.seed)
    names = variants_for(args, device)
    modules = {}
    skipped = {}
    for name in names:
        try:
            m = make_variant(name, cfg, moe, args)
        except Exception as exc:  # noqa: BLE001 - optional variants
            if name in MAIN_VARIANTS:
                raise
            skipped[name] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        if m is None:
            skipped[name] = "not importable"
            continue
        modules[name] = m.to(device)
    x = make_inputs(cfg, args.seed, device)
    diffs = check_same_function(cfg, routing, moe, modules, x, args)
    dtype = DTYPES[args.dtype]
    if dtype != torch.float32:
        for m in modules.values():
            m.to(dtype)
        x = make_inputs(cfg, args.seed, device, dtype)
    if "megablocks" in modules:
        problem = megablocks_problem(modules["megablocks"], moe, x, diffs)
        if problem:
            skipped["megablocks"] = problem
            del modules["megablocks"]
    with torch.no_grad():
        moe(x)
    stats = routing_stats(moe)
    gshard_dropped = None
    if "gshard" in modules:
        with torch.no_grad():
            modules["gshard"](x)
        gshard_dropped = modules["gshard"].last_dropped / (cfg.T * cfg.k)
    steps = {}
    for name, m in modules.items():
        step = make_step(name, m, x)
        try:
            step()  # also verifies the backward works (transformers' grouped_mm fallback on CPU, ...)
        except Exception as exc:  # noqa: BLE001
            if name in MAIN_VARIANTS:
                raise
            skipped[name] = f"backward failed: {type(exc).__name__}: {exc}"[:200]
            continue
        steps[name] = step
    timings = interleaved_medians(steps, device, repeats=repeats, warmup=1, budget_s=budget_s)
    return {"timings": timings, "check_max_abs_diff": diffs, "routing": stats, "gshard_dropped_frac": gshard_dropped,
            "skipped": skipped,
            "param_dtypes": {name: str(next(modules[name].parameters()).dtype).replace("torch.", "") for name in steps}}


def fmt_ms(v):
    return "-" if v is None else (f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}")


def fmt_mb(v):
    return "-" if v is None else f"{v / 2**20:.0f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats, same four configurations")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--markdown", metavar="FILE", help="write this description, the command and the table")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="parameters and input of every variant (default float32; the correctness check runs "
                        "in float32 first either way)")
    p.add_argument("--configs", default=",".join(c.name for c in CONFIGS), help="comma-separated subset")
    p.add_argument("--routings", default=",".join(ROUTINGS), help="balanced,skewed")
    p.add_argument("--repeats", type=int, default=None, help="override the timed rounds per case")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--hf-eager", action="store_true",
                   help="also time transformers' own eager expert loop (very slow backward at E=64 on CPU)")
    p.add_argument("--group-size", type=int, default=256, help="GShard tokens per dispatch group (default 256)")
    p.add_argument("--capacity-factor", type=float, default=1.25, help="GShard capacity factor (default 1.25)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layouts", default="", help="also time moemix with these dispatch layouts forced, "
                   "e.g. sorted,padded,grouped_mm (the data behind the 'auto' rule)")
    p.add_argument("--profile", metavar="CASES", default=None,
                   help="instead of timing, profile these cases (e.g. fine,small_coarse_skewed) for moemix, "
                        "hf_loop and dense_active and print the GEMM share of each step")
    p.add_argument("--_mem-worker", dest="mem_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    configs = {c.name: c for c in CONFIGS}

    if args.profile:
        cases = {(c.name if r == "balanced" else f"{c.name}_{r}"): (c, r) for c in CONFIGS for r in ROUTINGS}
        for key in args.profile.split(","):
            if key not in cases:
                sys.exit(f"--profile: unknown case {key!r}; expected some of {sorted(cases)}")
            profile_case(*cases[key], args, device)
        return

    if args.mem_worker:
        cname, routing, name = args.mem_worker.split(",")
        print(json.dumps({"bytes": measure_memory_here(name, configs[cname], routing, args, device)}))
        return

    selected = [configs[n] for n in args.configs.split(",")]
    routings = args.routings.split(",")
    header = (f"moemix MoE layer benchmark: fwd+bwd, D={D}, {args.dtype}, SwiGLU experts without bias, "
              f"device={device}, threads={torch.get_num_threads()}, torch {torch.__version__}, "
              f"{'quick' if args.quick else 'full'} run")
    print(header, flush=True)

    results: dict = {"meta": {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                              "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
                              "torch": torch.__version__, "python": platform.python_version(),
                              "platform": platform.platform(), "cpu_count": os.cpu_count(),
                              "gshard": {"capacity_factor": args.capacity_factor, "group_size": args.group_size},
                              "allocator_env": allocator_env()}}
    if torch.device(device).type == "cuda":
        results["meta"]["gpu"] = torch.cuda.get_device_name()
    else:
        results["meta"]["cpu"] = cpu_description()
    try:
        import transformers
        results["meta"]["transformers"] = transformers.__version__
    except Exception:  # noqa: BLE001
        pass

    rows = []
    for cfg in selected:
        large = cfg.T >= 1024
        if args.repeats is not None:
            repeats, budget = args.repeats, None
        elif args.quick:
            repeats, budget = (3, None) if large else (7, None)
        else:
            repeats, budget = (9, 75.0) if large else (31, 15.0)
        for routing in routings:
            key = cfg.name if routing == "balanced" else f"{cfg.name}_{routing}"
            print(f"[{key}] E={cfg.E} k={cfg.k} H={cfg.H} T={cfg.T}: checking, timing...", flush=True)
            case = run_case(cfg, routing, args, device, repeats, budget)
            timings = case["timings"]
            ms = {n: t["ms"] for n, t in timings.items()}
            memory = {}
            if not args.no_memory and routing == "balanced":
                for name in case["timings"]:
                    if torch.device(device).type == "cuda":
                        memory[name] = measure_memory_here(name, cfg, routing, args, device)
                    else:
                        memory[name] = measure_memory_subprocess(name, cfg, routing, args)
            entry = {
                "config": {"E": cfg.E, "k": cfg.k, "H": cfg.H, "T": cfg.T, "D": D, "routing": routing},
                "ms": ms,
                "vs_hf_loop": paired_ratio(timings["hf_loop"], timings["moemix"]),
                "vs_dense_active": paired_ratio(timings["moemix"], timings["dense_active"]),
                "vs_hf_loop_of_medians": ms["hf_loop"] / ms["moemix"],
                "timing_detail": case["timings"],
                "peak_mem_bytes": memory or None,
                "check_max_abs_diff": case["check_max_abs_diff"],
                "routing_stats": case["routing"],
                "gshard_dropped_fraction": case["gshard_dropped_frac"],
                "skipped": case["skipped"],
                "param_dtypes": case["param_dtypes"],
            }
            for peer in ("hf_block_grouped_mm", "megablocks"):
                if peer in ms:
                    entry[f"vs_{peer}"] = paired_ratio(timings[peer], timings["moemix"])
            results[key] = entry
            rows.append((key, entry))
            print("   " + "  ".join(f"{n}={fmt_ms(v)}ms" for n, v in ms.items())
                  + f"  vs_hf_loop={entry['vs_hf_loop']:.2f} vs_dense={entry['vs_dense_active']:.2f}", flush=True)
            for name, why in case["skipped"].items():
                print(f"   {name} not timed: {why}", flush=True)

    lines = print_table(rows)
    where = results["meta"].get("gpu") or results["meta"].get("cpu")
    malloc = " ".join(f"{k}={v}" for k, v in results["meta"]["allocator_env"].items()) or "default allocator"
    write_results(results, lines, __doc__, f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {where}, "
                  f"{args.dtype}, {torch.get_num_threads()} threads, {malloc}", args.json, args.markdown)


def print_table(rows):
    extra = sorted({n for _, e in rows for n in e["ms"] if n not in MAIN_VARIANTS})
    cols = list(MAIN_VARIANTS) + extra
    short = {"moemix": "moemix", "hf_loop": "hf_loop", "gshard": "gshard", "dense_active": "dense",
             "hf_block_grouped_mm": "hf_gmm", "hf_block_eager": "hf_eager", "megablocks": "mblocks"}
    head = (["case"] + [f"{short.get(c, c)} ms" for c in cols]
            + ["vs_hf_loop", "vs_dense", "load max/mean", "gshard drop"]
            + [f"{short.get(c, c)} MiB" for c in cols])
    lines = []
    for key, e in rows:
        mem = e["peak_mem_bytes"] or {}
        lines.append([key] + [fmt_ms(e["ms"].get(c)) for c in cols]
                     + [f"{e['vs_hf_loop']:.2f}", f"{e['vs_dense_active']:.2f}",
                        f"{e['routing_stats']['max_over_mean_load']:.2f}",
                        "-" if e["gshard_dropped_fraction"] is None else f"{100 * e['gshard_dropped_fraction']:.1f}%"]
                     + [fmt_mb(mem.get(c)) for c in cols])
    table = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    table += ["| " + " | ".join(line) + " |" for line in lines]
    table += ["", "ms: median fwd+bwd time (lower is better); vs_hf_loop = hf_loop/moemix, median of per-round "
              "ratios (higher is better); vs_dense = moemix/dense_active (1.0 is the limit). moemix computes its "
              "default aux losses (switch + z-loss) in forward; only the output sum is back-propagated. MiB: peak "
              "memory of one fwd+bwd beyond what was resident before it (CPU: peak-RSS growth in a fresh process; "
              "CUDA: max_memory_allocated growth); balanced routing only."]
    print("\n" + "\n".join(table))
    return table


if __name__ == "__main__":
    main()
