"""One expert-buffer GEMM three ways: per-slice (moemix's sorted layout), batched, ``F.grouped_mm``.

    python benchmarks/grouped_mm.py [--device cpu|cuda] [--dtype float32|bfloat16] [--json FILE] [--markdown FILE]

For each configuration of ``benchmarks/moe_layer.py`` (balanced routing: ``T * k`` rows split evenly over
``E`` experts), the first layer of the SwiGLU experts, ``[rows, D] @ [D, 2H]`` per expert, forward and
backward (output gradient given, input and weight gradients computed), timed interleaved:

* ``per_slice``: ``moemix.layers.grouped_matmul`` on the sorted layout, one GEMM per expert slice (host
  counts);
* ``padded_bmm``: ``grouped_matmul`` on the padded layout, one batched GEMM over ``[E, C, D]`` (no padding
  here: every expert has ``C`` rows);
* ``grouped_mm``: ``torch.nn.functional.grouped_mm`` with the slice ends as a device ``int32`` tensor (its
  backward needs a contiguous output gradient; ``.sum().backward()`` hands it a stride-0 one and fails).

Outputs and gradients are checked against ``per_slice`` before timing. ``x / grouped_mm`` above 1 means
``grouped_mm`` is faster (median of per-round ratios). Only the GEMMs are timed, not the dispatch: that
``grouped_mm`` needs no host counts (so no host sync) is not part of these numbers.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _output import write_results  # noqa: E402
from _timing import interleaved_medians, paired_ratio  # noqa: E402
from moe_layer import CONFIGS, D, DTYPES  # noqa: E402

from moemix.layers import grouped_matmul, plan_dispatch  # noqa: E402

VARIANTS = ("per_slice", "padded_bmm", "grouped_mm")


def make_steps(E: int, rows: int, hidden: int, device, dtype) -> Dict[str, Callable[[], list]]:
    """Each variant's forward + backward for ``E`` experts of ``rows`` rows; returns ``[y, dx, dw]``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(E * rows, D, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    w = (torch.randn(E, D, 2 * hidden, generator=g) / D ** 0.5).to(device=device, dtype=dtype).requires_grad_(True)
    grad_y = torch.randn(E * rows, 2 * hidden, generator=g).to(device=device, dtype=dtype)
    indices = torch.arange(E, device=device).repeat_interleave(rows).unsqueeze(1)  # every expert `rows` rows
    sorted_plan, padded_plan = (plan_dispatch(indices, E, layout=layout) for layout in ("sorted", "padded"))
    offs = torch.cumsum(sorted_plan.tokens_per_expert, 0).to(torch.int32)
    products = {"per_slice": lambda: grouped_matmul(x, w, sorted_plan),
                "padded_bmm": lambda: grouped_matmul(x, w, padded_plan),
                "grouped_mm": lambda: F.grouped_mm(x, w, offs=offs)}

    def step(product):
        def run():
            x.grad = w.grad = None
            y = product()
            y.backward(grad_y)
            return [y, x.grad, w.grad]
        return run

    return {name: step(products[name]) for name in VARIANTS}


def check(steps: Dict[str, Callable[[], list]], dtype) -> Dict[str, float]:
    """Largest difference of each variant's output and gradients from ``per_slice``'s, relative to their scale.

    A variant other than ``per_slice`` that raises (``grouped_mm`` for a dtype or device its kernels do
    not take) is removed from ``steps``; its entry is the error instead.
    """
    ref = [t.detach().float().clone() for t in steps["per_slice"]()]
    diffs = {}
    for name in VARIANTS[1:]:
        try:
            got = [t.detach().float() for t in steps[name]()]
        except Exception as exc:  # noqa: BLE001 - reported, and the others are still timed
            diffs[name] = f"failed: {type(exc).__name__}: {exc}"[:300]
            del steps[name]
            continue
        diffs[name] = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    bad = {n: d for n, d in diffs.items() if isinstance(d, float) and not d <= tol}
    if bad:
        sys.exit(f"ABORT: outputs or gradients differ from per_slice beyond {tol}: {bad}")
    return diffs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=",".join(c.name for c in CONFIGS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None, help="also write the table with its command line to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    by_name = {c.name: c for c in CONFIGS}
    meta = {"command": "python benchmarks/grouped_mm.py " + " ".join(sys.argv[1:]), "torch": torch.__version__,
            "device": str(device), "dtype": args.dtype, "threads": args.threads}
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    results: dict = {"meta": meta}
    lines = ["| case | rows per expert | " + " | ".join(f"{v} ms" for v in VARIANTS)
             + " | per_slice / grouped_mm | padded_bmm / grouped_mm |", "|---" * 7 + "|"]
    print("\n".join(lines), flush=True)
    for name in args.configs.split(","):
        cfg = by_name[name]
        rows = cfg.T * cfg.k // cfg.E
        steps = make_steps(cfg.E, rows, cfg.H, device, dtype)
        diffs = check(steps, dtype)
        timings = interleaved_medians(steps, device, repeats=args.repeats, warmup=2)
        entry = results[name] = {"rows_per_expert": rows, "ms": {v: timings[v]["ms"] for v in timings},
                                 "check_rel_diff": diffs}
        for v in ("per_slice", "padded_bmm"):
            entry[f"{v}_over_grouped_mm"] = (paired_ratio(timings[v], timings["grouped_mm"])
                                             if v in timings and "grouped_mm" in timings else None)
        cells = [f"{entry['ms'][v]:.3f}" if v in entry["ms"] else "-" for v in VARIANTS]
        cells += [f"{entry[k]:.3f}" if entry[k] is not None else "-"
                  for k in ("per_slice_over_grouped_mm", "padded_bmm_over_grouped_mm")]
        line = f"| {name} | {rows} | " + " | ".join(cells) + " |"
        lines.append(line)
        print(line, flush=True)
    where = f"{device}" + (f" ({meta['gpu']})" if "gpu" in meta else "")
    write_results(results, lines, __doc__, f"torch {torch.__version__}, {where}, {args.dtype}, {args.threads} threads",
                  args.json, args.markdown)


if __name__ == "__main__":
    main()
