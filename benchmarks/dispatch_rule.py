"""The CPU dispatch rule: fused loop, padded and sorted layouts over a sweep of expert sizes and rows.

    python benchmarks/dispatch_rule.py [--shapes E:k:H,...] [--rows 16,32,...] [--extra loop_serial,...]
                                       [--json FILE] [--markdown FILE]

For each expert shape (``E`` SwiGLU experts of hidden width ``H``, top-``k``, ``D=512`` as in
``benchmarks/moe_layer.py``) and each mean number of rows per expert (``T = rows * E / k`` tokens), with
balanced and skewed routing (``moe_layer.py``'s routers), one ``SparseMoE`` step (forward + backward) is
timed interleaved with ``dispatch_layout`` forced to ``loop``, ``padded`` and ``sorted``. ``padded / loop``
and ``sorted / loop`` are medians of per-round time ratios (above 1: the loop is faster); ``expert MACs``
is mean rows x ``D`` x ``2H`` (one expert's first-layer multiply-adds), the size ``"auto"`` weighs
(:func:`moemix.layers.layout_rule.choose_layout`, with the fused loop's GEMM library on this machine);
``auto`` is what the rule picks for these counts and ``auto / best`` its time over the fastest layout's (the largest paired ratio of ``auto`` over a layout; 1 when
``auto`` picked the fastest). ``--extra`` times further forced-loop variants of ``moe_layer.py``
(``loop_serial``, ``loop_workers``, ``loop_unchunked``, ``loop_blas``) in the same rounds and reports each
one's time over ``loop``'s; they do not count as layouts ``auto`` could pick.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _output import cpu_description, write_results  # noqa: E402
from _timing import interleaved_medians, paired_ratio  # noqa: E402
from moe_layer import (D, LOOP_VARIANTS, Config, expert_counts, make_inputs, make_moemix, make_step,  # noqa: E402
                       make_variant)

from moemix.layers.layout_rule import choose_layout  # noqa: E402

LAYOUTS = ("loop", "padded", "sorted")
SHAPES = "8:2:1024,8:2:256,16:2:512,64:8:256,64:8:1024"
ROWS = "16,32,64,128,256"


def parse_shapes(text: str):
    shapes = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(f"--shapes: expected E:k:H with positive integers, got {item!r}")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def run_case(E: int, k: int, H: int, rows: int, routing: str, args) -> dict:
    cfg = Config(f"E{E}_k{k}_H{H}_rows{rows}", E, k, H, rows * E // k)
    moe = make_moemix(cfg, routing, args.seed)
    x = make_inputs(cfg, args.seed, "cpu")
    steps = {name: make_step(f"moemix:{name}", make_variant(f"moemix:{name}", cfg, moe, args), x)
             for name in (*LAYOUTS, *args.extra)}
    timings = interleaved_medians(steps, "cpu", repeats=args.repeats, warmup=2, budget_s=args.budget_s)
    counts = expert_counts(moe, x)
    hit = sum(1 for c in counts if c)
    macs_per_row = D * moe.experts.w1.shape[-1]
    auto = choose_layout(counts, macs_per_row=macs_per_row, loop_gemm=moe.experts.loop_gemm(x))
    # the layout auto loses most against, by paired ratio (auto itself when auto is fastest: ratio 1)
    vs_auto = {layout: paired_ratio(timings[auto], timings[layout]) for layout in LAYOUTS}
    best = max(LAYOUTS, key=lambda layout: vs_auto[layout])
    return {"E": E, "k": k, "H": H, "rows": rows, "routing": routing, "tokens": cfg.T,
            "ms": {name: timings[name]["ms"] for name in steps}, "rounds": timings["loop"]["n"],
            "padded_over_loop": paired_ratio(timings["padded"], timings["loop"]),
            "sorted_over_loop": paired_ratio(timings["sorted"], timings["loop"]),
            "padding": E * max(counts) / sum(counts), "expert_macs": sum(counts) / hit * macs_per_row,
            "auto": auto, "best": best, "auto_over_best": vs_auto[best],
            "over_loop": {name: paired_ratio(timings[name], timings["loop"]) for name in args.extra}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=SHAPES, help="comma-separated E:k:H")
    p.add_argument("--rows", default=ROWS, help="comma-separated mean rows per expert")
    p.add_argument("--routings", default="balanced,skewed")
    p.add_argument("--extra", default="", help="comma-separated forced-loop variants also timed: "
                                               + ", ".join(LOOP_VARIANTS))
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--budget-s", type=float, default=4.0, help="stop a case's rounds after this much timing")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None, help="also write the table with its command line to this file")
    args = p.parse_args()
    args.dtype, args.device, args.capacity_factor, args.group_size = "float32", "cpu", 1.25, None
    args.extra = [name for name in args.extra.split(",") if name]
    unknown = [name for name in args.extra if name not in LOOP_VARIANTS]
    if unknown:
        raise SystemExit(f"--extra: expected names from {', '.join(LOOP_VARIANTS)}, got {', '.join(unknown)}")
    torch.set_num_threads(args.threads)
    meta = {"command": "python benchmarks/dispatch_rule.py " + " ".join(sys.argv[1:]), "torch": torch.__version__,
            "threads": args.threads, "cpu": cpu_description()}
    results: dict = {"meta": meta, "cases": []}
    extra_cols = "".join(f" {name} / loop |" for name in args.extra)
    lines = ["| E | k | H | rows | routing | padding | expert MACs | loop ms | padded / loop | sorted / loop "
             "| auto | auto / best |" + extra_cols, "|---" * (12 + len(args.extra)) + "|"]
    print("\n".join(lines), flush=True)
    for E, k, H in parse_shapes(args.shapes):
        for rows in (int(r) for r in args.rows.split(",")):
            for routing in args.routings.split(","):
                c = run_case(E, k, H, rows, routing, args)
                results["cases"].append(c)
                line = (f"| {E} | {k} | {H} | {rows} | {routing} | {c['padding']:.2f} | {c['expert_macs'] / 1e6:.3g}M "
                        f"| {c['ms']['loop']:.1f} | {c['padded_over_loop']:.2f} | {c['sorted_over_loop']:.2f} "
                        f"| {c['auto']} | {c['auto_over_best']:.2f} |"
                        + "".join(f" {c['over_loop'][name]:.2f} |" for name in args.extra))
                lines.append(line)
                print(line, flush=True)
    cases = results["cases"]
    ratios = sorted(c["auto_over_best"] for c in cases)
    summary = (f"auto / best over {len(cases)} cases: median {ratios[len(ratios) // 2]:.2f}, worst {ratios[-1]:.2f}; "
               f"auto picked the fastest layout in {sum(c['auto'] == c['best'] for c in cases)}")
    results["summary"] = summary
    print(summary)
    write_results(results, [*lines, "", summary], __doc__,
                  f"torch {torch.__version__}, cpu ({meta['cpu']}), float32, {args.threads} threads", args.json,
                  args.markdown)


if __name__ == "__main__":
    main()
