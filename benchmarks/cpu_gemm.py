"""The expert products one at a time: ``torch.mm``/``torch.bmm`` against oneDNN (moemix.layers.cpu_gemm).

    python benchmarks/cpu_gemm.py --json docs/results/cpu_gemm.json --markdown docs/results/cpu_gemm.md

For one expert of each configuration of ``benchmarks/moe_layer.py`` (balanced rows per expert
``T * k / E``; SwiGLU, so the first layer is ``D x 2H``), it times every product of the fused loop's
forward and backward with either library, interleaved: the two layers' GEMMs, their input gradients
(``product="forward"`` in ``cpu_gemm``) and their weight gradients (``"weight_grad"``; written into a
buffer, as the loop writes them, so oneDNN's time includes the copy, since its op has no ``out=``). For the
small configurations it also times the padded layout's batched first-layer GEMM ``[E, C, D] @ [E, D, 2H]``
(``C`` = rows per expert) as one ``torch.bmm`` against oneDNN one expert at a time. ``mm / onednn``
above 1 means oneDNN is faster (median of per-round ratios).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _output import cpu_description, write_results  # noqa: E402
from _timing import interleaved_medians, paired_ratio  # noqa: E402
from moe_layer import CONFIGS, D  # noqa: E402

from moemix.layers.cpu_gemm import matmul, onednn_gemm_usable  # noqa: E402

SMALL = ("small_coarse", "small_fine")


def loop_products(rows: int, hidden: int, g: torch.Generator) -> Dict[str, tuple]:
    """``name -> (a, b)`` for ``a @ b``, the products of one expert in the fused loop (weights stored as the
    layer stores them: ``w1 [D, 2H]``, ``w2 [H, D]``)."""
    def randn(*shape):
        return torch.randn(*shape, generator=g)

    x, w1, w2 = randn(rows, D), randn(D, 2 * hidden), randn(hidden, D)
    act, grad_y, grad_h = randn(rows, hidden), randn(rows, D), randn(rows, 2 * hidden)
    return {
        "layer 1: x @ w1": (x, w1),
        "layer 2: a @ w2": (act, w2),
        "input grad 2: g @ w2^T": (grad_y, w2.t()),
        "input grad 1: gh @ w1^T": (grad_h, w1.t()),
        "weight grad 1: x^T @ gh": (x.t(), grad_h),
        "weight grad 2: a^T @ g": (act.t(), grad_y),
    }


def product_pair(a: torch.Tensor, b: torch.Tensor, into_buffer: bool) -> Dict[str, Callable[[], object]]:
    """Either library's ``a @ b``; ``into_buffer``: written into one preallocated ``[M, N]`` tensor, as the loop
    writes its weight gradients (oneDNN's product then includes the copy)."""
    out = torch.empty(a.shape[0], b.shape[1]) if into_buffer else None
    return {"mm": lambda: matmul(a, b, out=out, library="blas"),
            "onednn": lambda: matmul(a, b, out=out, library="onednn")}


def padded_pair(experts: int, rows: int, hidden: int, g: torch.Generator) -> Dict[str, Callable[[], object]]:
    x, w1 = torch.randn(experts, rows, D, generator=g), torch.randn(experts, D, 2 * hidden, generator=g)
    return {"mm": lambda: torch.bmm(x, w1),
            "onednn": lambda: [matmul(x[e], w1[e], library="onednn") for e in range(experts)]}


def measure(pair: Dict[str, Callable[[], object]], repeats: int) -> dict:
    timings = interleaved_medians(pair, "cpu", repeats=repeats, warmup=2)
    return {"mm_ms": timings["mm"]["ms"], "onednn_ms": timings["onednn"]["ms"],
            "mm_over_onednn": paired_ratio(timings["mm"], timings["onednn"])}


def row(case: str, product: str, entry: dict) -> str:
    line = (f"| {case} | {product} | {entry['shape']} | {entry['mm_ms']:.3f} | {entry['onednn_ms']:.3f} | "
            f"{entry['mm_over_onednn']:.3f} |")
    print(line, flush=True)
    return line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=",".join(c.name for c in CONFIGS))
    p.add_argument("--rows", default=None,
                   help="comma-separated rows per expert to time instead of each configuration's balanced count "
                        "(cases named <config>@<rows>; the padded comparison is left out)")
    p.add_argument("--repeats", type=int, default=41)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None, help="also write the table with its command line to this file")
    args = p.parse_args()
    if not onednn_gemm_usable(torch.empty(1)):
        sys.exit("this torch has no usable oneDNN fp32 linear (torch.ops.mkldnn._linear_pointwise)")
    torch.set_num_threads(args.threads)
    by_name = {c.name: c for c in CONFIGS}
    results: dict = {"meta": {"command": "python benchmarks/cpu_gemm.py " + " ".join(sys.argv[1:]),
                              "torch": torch.__version__, "device": "cpu", "threads": args.threads,
                              "cpu": cpu_description()}}
    lines = ["| case | product | shape | mm ms | onednn ms | mm / onednn |", "|---" * 6 + "|"]
    print("\n".join(lines))
    cases = [(name, by_name[name], by_name[name].T * by_name[name].k // by_name[name].E)
             for name in args.configs.split(",")]
    if args.rows:
        cases = [(f"{name}@{rows}", cfg, rows) for name, cfg, _ in cases for rows in map(int, args.rows.split(","))]
    for name, cfg, rows in cases:
        g = torch.Generator().manual_seed(0)
        case = results[name] = {}
        for product, (a, b) in loop_products(rows, cfg.H, g).items():
            entry = case[product] = {"shape": f"{a.shape[0]}x{a.shape[1]} @ {b.shape[0]}x{b.shape[1]}",
                                     **measure(product_pair(a, b, product.startswith("weight grad")), args.repeats)}
            lines.append(row(name, product, entry))
        if name in SMALL:
            entry = case["padded layer 1: bmm vs per expert"] = {
                "shape": f"{cfg.E}x{rows}x{D} @ {cfg.E}x{D}x{2 * cfg.H}",
                **measure(padded_pair(cfg.E, rows, cfg.H, g), args.repeats)}
            lines.append(row(name, "padded layer 1: bmm vs per expert", entry))
    setting = f"torch {torch.__version__}, cpu ({results['meta']['cpu']}), {args.threads} threads"
    write_results(results, lines, __doc__, setting, args.json, args.markdown)


if __name__ == "__main__":
    main()
