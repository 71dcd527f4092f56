"""What recycling the expert-buffer rows buys: the default layer against the same layer allocating its
temporaries afresh every step (no ``RecycledPool``), with the HF loop alongside, in one process.

    python benchmarks/row_buffers.py --json row_buffers.json

For each small configuration of ``benchmarks/moe_layer.py`` the layer runs a buffer layout: padded where
the rows-per-expert part of the ``"auto"`` rule takes it, else sorted (by default ``"auto"`` runs the fused
loop at ``small_coarse`` and under skew, whose buffers are recycled separately); it times forward +
backward of the three variants interleaved, and counts the minor page faults each step takes
(``getrusage``). ``fresh / recycled`` is the median of per-round ratios.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved_medians, paired_ratio  # noqa: E402
from moe_layer import (CONFIGS, ROUTINGS, expert_counts, make_inputs, make_moemix, make_step,  # noqa: E402
                       make_variant)

from moemix.layers.layout_rule import choose_layout  # noqa: E402


def transformers_version() -> str:
    try:
        import transformers
    except ImportError:
        return "-"
    return transformers.__version__


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def counting_faults(step, totals: dict, name: str):
    def run():
        start = minor_faults()
        step()
        totals[name] += minor_faults() - start
    return run


def buffer_layout(moe, x) -> str:
    """Padded where the rows-per-expert part of the auto rule takes it for this routing, else sorted."""
    return "padded" if choose_layout(expert_counts(moe, x)) == "padded" else "sorted"


def run_case(cfg, routing: str, repeats: int) -> dict:
    moe = make_moemix(cfg, routing, 0)
    x = make_inputs(cfg, 0, "cpu")
    moe.dispatch_layout = layout = buffer_layout(moe, x)
    fresh = copy.deepcopy(moe)
    fresh.experts._row_pool = None  # every op allocates its tensors anew
    modules = {"recycled": moe, "fresh": fresh, "hf_loop": make_variant("hf_loop", cfg, moe, None)}
    plain = {name: make_step("hf_loop" if name == "hf_loop" else "moemix", m, x) for name, m in modules.items()}
    for step in plain.values():  # warm-up: buffers made, nothing counted
        step()
    faults = dict.fromkeys(modules, 0)
    steps = {name: counting_faults(step, faults, name) for name, step in plain.items()}
    timings = interleaved_medians(steps, "cpu", repeats=repeats, warmup=0)
    return {
        "layout": layout,
        "ms": {name: t["ms"] for name, t in timings.items()},
        "faults_per_step": {name: faults[name] / timings[name]["n"] for name in modules},
        "fresh_over_recycled": paired_ratio(timings["fresh"], timings["recycled"]),
        "vs_hf_loop": paired_ratio(timings["hf_loop"], timings["recycled"]),
        "vs_hf_loop_fresh": paired_ratio(timings["hf_loop"], timings["fresh"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="small_coarse,small_fine")
    p.add_argument("--routings", default=",".join(ROUTINGS))
    p.add_argument("--repeats", type=int, default=31)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    by_name = {c.name: c for c in CONFIGS}
    results = {"meta": {"command": "python benchmarks/row_buffers.py " + " ".join(sys.argv[1:]),
                        "torch": torch.__version__, "transformers": transformers_version(), "device": "cpu",
                        "threads": args.threads}}
    print("| case | layout | recycled ms | fresh ms | hf_loop ms | fresh / recycled | vs_hf_loop | vs_hf_loop (fresh) "
          "| faults/step recycled | fresh | hf_loop |")
    print("|---" * 11 + "|")
    for name in args.configs.split(","):
        for routing in args.routings.split(","):
            case = name if routing == "balanced" else f"{name}_{routing}"
            r = results[case] = run_case(by_name[name], routing, args.repeats)
            ms, fl = r["ms"], r["faults_per_step"]
            print(f"| {case} | {r['layout']} | {ms['recycled']:.1f} | {ms['fresh']:.1f} | {ms['hf_loop']:.1f} | "
                  f"{r['fresh_over_recycled']:.3f} | {r['vs_hf_loop']:.2f} | {r['vs_hf_loop_fresh']:.2f} | "
                  f"{fl['recycled']:.0f} | {fl['fresh']:.0f} | {fl['hf_loop']:.0f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
