"""Per-step host cost of one MoE layer: forward + backward at widths where the arithmetic is negligible.

    python benchmarks/host_overhead.py [--fresh-buffers] [--json FILE] [--markdown FILE]

At the sizes of ``benchmarks/moe_layer.py`` a CUDA step is mostly host work (Python, dispatcher, kernel
launches: the dense FFN took about 1 ms on an H200, moemix 4.6-7.4 ms), which no CPU timing at those sizes
shows. This benchmark isolates that part on the CPU: the same variants as ``moe_layer.py`` (moemix with a
dispatch strategy forced, and on the padded layout without its auxiliary losses, which the peers do not
compute; GShard, transformers' ``grouped_mm`` block, the HF loop, the dense FFN) with
``D = H = 8`` and 32 tokens, so each step's time is its fixed cost per call. One thread; each timed call
runs the step ``--steps`` times; variants interleaved, medians of ``--repeats`` rounds; ``x / gshard`` is
the median of per-round ratios.

A second table counts the ATen ops (views apart) each variant dispatches in one step.

``--fresh-buffers`` turns off moemix's recycled CPU buffers (``moemix.layers.recycled_buffers``), whose
bookkeeping runs on CPU only: the host path a CUDA step takes. What is not measured: the cost of launching
kernels on a GPU, which grows with the number of kernels rather than with Python work.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_layer as layer_bench  # noqa: E402
from _output import write_results  # noqa: E402
from _timing import interleaved_medians, paired_ratio  # noqa: E402

import moemix.layers.recycled_buffers as recycled_buffers  # noqa: E402
from moemix.layers import SparseMoE  # noqa: E402

WIDTH = 8
TOKENS = 32
SHAPES = ((8, 2), (64, 8))  # (E, k): coarse and fine routing
NO_AUX = "moemix:padded:no_aux"  # the padded layout without the auxiliary losses (aux_loss=None, z_loss_coef=0)
VARIANTS = ("moemix:padded", NO_AUX, "moemix:sorted", "moemix:grouped_mm", "moemix:loop", "gshard",
            "hf_block_grouped_mm", "hf_loop", "dense_active")
PEER = "gshard"


class _Args:
    capacity_factor, group_size, dtype, device = 1.25, 256, "float32", "cpu"


def without_aux_losses(moe: SparseMoE) -> SparseMoE:
    """``moe``'s layer (same weights) on the padded layout, computing no auxiliary loss."""
    layer = SparseMoE(layer_bench.D, moe.experts.hidden_features, act_layer="silu", glu=True, bias=False,
                      num_experts=moe.num_experts, k=moe.k, dispatch_layout="padded", aux_loss=None, z_loss_coef=0.0)
    layer.load_state_dict(moe.state_dict())
    return layer


class _OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched, views apart (on a GPU most of them launch a kernel)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not func.is_view
        return func(*args, **(kwargs or {}))


def count_ops(step) -> int:
    """ATen ops (views apart) one call of ``step`` dispatches."""
    with _OpCounter() as counter:
        step()
    return counter.ops


def time_shape(num_experts: int, k: int, steps: int, repeats: int) -> dict:
    layer_bench.D = WIDTH  # the variants read the model width from the layer benchmark's module
    cfg = layer_bench.Config(f"E{num_experts}_k{k}", num_experts, k, WIDTH, TOKENS)
    moe = layer_bench.make_moemix(cfg, "balanced", 0)
    calls, ops = {}, {}
    for name in VARIANTS:
        module = without_aux_losses(moe) if name == NO_AUX else layer_bench.make_variant(name, cfg, moe, _Args)
        if module is None:
            continue
        step = layer_bench.make_step(name, module, layer_bench.make_inputs(cfg, 0, "cpu"))
        step()
        ops[name] = count_ops(step)

        def many(step=step):
            for _ in range(steps):
                step()

        calls[name] = many
    timings = interleaved_medians(calls, "cpu", repeats=repeats, warmup=2)
    return {"E": num_experts, "k": k, "ops_per_step": ops,
            "us_per_step": {n: 1e3 * t["ms"] / steps for n, t in timings.items()},
            "vs_peer": {n: paired_ratio(t, timings[PEER]) for n, t in timings.items()}}


def markdown(rows: list, fresh: bool) -> list:
    """The time table (with ratios to the peer), then the op-count table, each under its caption."""
    names = list(rows[0]["us_per_step"])
    lines = [f"Host cost per forward + backward step, D = H = {WIDTH}, {TOKENS} tokens, 1 thread, recycled CPU "
             f"buffers {'off (the CUDA host path)' if fresh else 'on (the CPU default)'}; `x / {PEER}` is the "
             "median of per-round time ratios.", "",
             "| E | k | " + " | ".join(f"{n} us" for n in names) + " | " + " | ".join(
                 f"{n} / {PEER}" for n in names if n != PEER) + " |",
             "|---" * (2 + 2 * len(names) - 1) + "|"]
    for r in rows:
        lines.append(f"| {r['E']} | {r['k']} | " + " | ".join(f"{r['us_per_step'][n]:.0f}" for n in names) + " | "
                     + " | ".join(f"{r['vs_peer'][n]:.2f}" for n in names if n != PEER) + " |")
    lines += ["", "ATen ops one step dispatches, views apart (on a GPU most of them launch a kernel; counted on the "
              "CPU, where moemix also converts its sort keys to float).", "",
              "| E | k | " + " | ".join(f"{n} ops" for n in names) + " |", "|---" * (2 + len(names)) + "|"]
    lines += [f"| {r['E']} | {r['k']} | " + " | ".join(str(r["ops_per_step"][n]) for n in names) + " |" for r in rows]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fresh-buffers", action="store_true", help="moemix without its recycled CPU buffers (as on CUDA)")
    p.add_argument("--steps", type=int, default=20, help="steps per timed call (default 20)")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds (default 15)")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None, help="also write the table with its command line to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.fresh_buffers:
        recycled_buffers._recyclable = lambda device: False
    rows = [time_shape(e, k, args.steps, args.repeats) for e, k in SHAPES]
    lines = markdown(rows, args.fresh_buffers)
    print("\n".join(lines))
    command = " ".join(["python", "benchmarks/host_overhead.py", *(argv if argv is not None else sys.argv[1:])])
    meta = {"command": command, "torch": torch.__version__, "threads": 1, "fresh_buffers": args.fresh_buffers,
            "width": WIDTH, "tokens": TOKENS, "steps": args.steps, "repeats": args.repeats}
    write_results({"meta": meta, "rows": rows}, lines, __doc__, f"torch {torch.__version__}, cpu, 1 thread",
                  args.json, args.markdown)


if __name__ == "__main__":
    main()
