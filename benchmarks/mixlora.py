"""Forward+backward speed and peak memory of one MixLoRA layer: moemix against the mixlora package and a naive loop.

    python benchmarks/mixlora.py [--quick] [--threads 2] [--json FILE] [--markdown FILE]

One ViT-S-sized plain FFN (timm ``Mlp``, D=384, H=1536, GELU), 8 LoRA experts, top-2, r=8, alpha=16, LoRA
dropout 0.05, T=4096 tokens, float32, training mode (dropout on, as in fine-tuning); every variant gets the same
base FFN, router and LoRA weights (checked to give the same output in eval mode before timing).

* ``moemix``: :class:`moemix.layers.MixLoRA`: the base ``fc1`` once for all tokens, gathered into the expert
  buffer; LoRA factors per expert slice; the base ``fc2`` as one GEMM over all routed rows; one combine.
* ``mixlora_pkg``: the ``mixlora`` package's ``MixLoraSparseMoe`` (0.2.3; ``pip install mixlora==0.2.3``), the
  reference implementation: ``fc1`` once, then a loop over experts (slice, LoRA, ``fc2``, ``index_add_``).
* ``naive``: the same loop, but each expert also recomputes the base ``fc1`` on its rows (what the paper's shared
  projection avoids).

Timing: ``zero grads; y = layer(x); y.sum().backward()`` with ``x.requires_grad``, variants interleaved
round-robin, medians; ``vs_*`` ratios are medians of per-round paired ratios (``other / moemix``, higher is
better for moemix). Memory: one step per variant in a fresh subprocess, growth of the peak resident set over the
resident size before the step (``MALLOC_MMAP_THRESHOLD_=65536`` so freed buffers leave the resident set).
Targets: ``vs_naive >= 1.3``, ``vs_mixlora_pkg >= 1.0``, peak memory at most the package's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _output import cpu_description, write_results  # noqa: E402
from _timing import interleaved_medians, max_rss_bytes, paired_ratio, reset_peak_rss, rss_bytes  # noqa: E402

D, H, E, K, R, ALPHA, T = 384, 1536, 8, 2, 8, 16, 4096
VARIANTS = ("moemix", "mixlora_pkg", "naive")


def make_moemix(seed: int = 0):
    import timm

    from moemix.layers import MixLoRA

    torch.manual_seed(seed)
    layer = MixLoRA(timm.layers.Mlp(D, H), num_experts=E, k=K, r=R, alpha=ALPHA)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("experts.lora_B"):
                p.normal_(std=0.02)  # a trained adapter, not the zero init
    return layer


class NaiveMixLoRA(nn.Module):
    """Per expert: gather its rows, base fc1 on them, + LoRA, act, base fc2 + LoRA, weight, ``index_add_``."""

    def __init__(self, ours):
        super().__init__()
        self.ours = ours  # shares every weight with the moemix layer

    def forward(self, x):
        ours = self.ours
        parts, experts = ours.experts.parts, ours.experts
        tokens = x.reshape(-1, D)
        decision = ours.router(tokens)
        out = torch.zeros_like(tokens)
        for e in range(E):
            token_idx, slot = torch.where(decision.indices == e)
            rows = tokens[token_idx]
            s, drop = experts.scaling, experts.lora_dropout
            h = parts.act(parts.gate(rows) + drop(rows) @ experts.lora_A_gate[e] @ experts.lora_B_gate[e] * s)
            y = parts.down(h) + drop(h) @ experts.lora_A_down[e] @ experts.lora_B_down[e] * s
            out.index_add_(0, token_idx, y * decision.weights[token_idx, slot, None])
        return out.view_as(x)


def make_package(ours):
    """The mixlora package's layer holding the same weights as ``ours``, or None when it is not installed."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]  # this file is named mixlora.py too
    try:
        from mixlora.config import LoraConfig, MixLoraConfig
        from mixlora.lora_linear import LoraLinear
        from mixlora.model import MixLoraSparseMoe
    except ImportError:
        return None
    finally:
        sys.path.insert(0, here)
    base = ours.experts.ffn
    config = MixLoraConfig(dtype_=torch.float32, model_type_="phi", num_experts_=E, top_k_=K, jitter_noise_=0.0,
                           act_fn_=ours.experts.parts.act)
    layer = MixLoraSparseMoe(base, config)
    layer.gate_ = ours.router.weight.detach().clone()
    lora = LoraConfig(dtype_=torch.float32, lora_r_=R, lora_alpha_=ALPHA, lora_dropout_=0.05)
    modules = nn.ModuleList()
    for e in range(E):
        for ours_name, their_name in (("gate", "fc1"), ("down", "fc2")):
            a = getattr(ours.experts, f"lora_A_{ours_name}")[e].detach().t().clone()
            b = getattr(ours.experts, f"lora_B_{ours_name}")[e].detach().t().clone()
            module = LoraLinear(getattr(base, their_name), lora, (a, b))
            layer.experts_[f"experts.{e}.{their_name}"] = module
            modules.append(module)
    layer.lora_modules = modules  # registered, so .train() / .parameters() reach them
    return layer


def make_variants(seed: int = 0) -> dict:
    ours = make_moemix(seed)
    variants = {"moemix": ours, "naive": NaiveMixLoRA(ours)}
    package = make_package(ours)
    if package is not None:
        variants["mixlora_pkg"] = package
    return variants


def inputs(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, T, D, generator=torch.Generator().manual_seed(seed + 1))


def check_same_function(variants: dict, x: torch.Tensor) -> float:
    with torch.no_grad():
        outs = {name: m.eval()(x.clone()) for name, m in variants.items()}
    worst = max(float((outs[n] - outs["moemix"]).abs().max()) for n in outs)
    if worst > 1e-4:
        raise RuntimeError(f"the variants disagree by {worst:.2e}: {sorted(outs)}")
    return worst


def make_step(module: nn.Module, x: torch.Tensor):
    module.train()
    x = x.clone().requires_grad_()
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        module(x).sum().backward()
    return step


def memory_worker(name: str, threads: int) -> None:
    torch.set_num_threads(threads)
    step = make_step(make_variants()[name], inputs())
    step()
    step()
    reset_peak_rss()
    before = rss_bytes()
    step()
    print(json.dumps({"bytes": max(max_rss_bytes() - before, 0)}))


def measure_memory(name: str, threads: int):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    env.update(MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--_mem-worker", name, "--threads", str(threads)],
                         env=env, capture_output=True, text=True)
    if res.returncode:
        print(f"  memory worker for {name} failed: {res.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])["bytes"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer rounds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--markdown", metavar="FILE")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--_mem-worker", dest="mem_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mem_worker:
        return memory_worker(args.mem_worker, args.threads)
    torch.set_num_threads(args.threads)
    variants = make_variants()
    x = inputs()
    diff = check_same_function(variants, x)
    missing = [] if "mixlora_pkg" in variants else ["mixlora_pkg: the mixlora package is not installed"]
    timings = interleaved_medians({n: make_step(m, x) for n, m in variants.items()}, "cpu",
                                  repeats=5 if args.quick else 21, budget_s=None if args.quick else 60.0)
    memory = {} if args.no_memory else {n: measure_memory(n, args.threads) for n in variants}
    ratios = {f"vs_{n}": paired_ratio(timings[n], timings["moemix"]) for n in variants if n != "moemix"}
    results = {"meta": {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "cpu": cpu_description(),
                        "shape": {"D": D, "H": H, "E": E, "k": K, "r": R, "alpha": ALPHA, "T": T}},
               "ms": {n: t["ms"] for n, t in timings.items()}, **ratios, "peak_mem_bytes": memory,
               "check_max_abs_diff": diff, "skipped": missing, "timing_detail": timings}
    mib = {n: (f"{v / 2 ** 20:.0f}" if v is not None else "-") for n, v in memory.items()}
    table = ["| variant | ms | moemix speed-up | peak MiB |", "|---|---|---|---|"]
    for n in variants:
        speedup = "1.00" if n == "moemix" else f"{ratios[f'vs_{n}']:.2f}"
        table.append(f"| {n} | {timings[n]['ms']:.1f} | {speedup} | {mib.get(n, '-')} |")
    print("\n".join(table + [f"skipped: {m}" for m in missing]))
    write_results(results, table, __doc__, f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
                  f"{results['meta']['cpu']}, float32, {torch.get_num_threads()} threads", args.json, args.markdown)


if __name__ == "__main__":
    main()
