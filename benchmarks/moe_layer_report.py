"""Write docs/results/moe_layer.md from the JSON files of benchmarks/moe_layer.py.

    python benchmarks/moe_layer.py --layouts loop,loop_serial,loop_blas,sorted,padded --json default.json
    python benchmarks/moe_layer.py --layouts loop,loop_serial,loop_blas,sorted,padded --allocator reuse \
        --no-memory --json reuse.json
    python benchmarks/moe_layer.py --configs coarse,fine --layouts loop_serial,loop_workers --no-memory \
        --json workers.json
    python benchmarks/row_buffers.py --json row_buffers.json
    python benchmarks/moe_layer.py --quick --routings balanced --no-memory --layouts loop,sorted,padded,grouped_mm \
        --json grouped_mm.json
    python benchmarks/moe_layer_report.py default.json reuse.json [--cuda cuda_float32.json cuda_bfloat16.json ...] \
        [--note cuda_float32.json "what it timed" ...] [--cpu-grouped-mm grouped_mm.json] [--workers workers.json] \
        [--row-buffers row_buffers.json] [--runs run1.json run2.json ...] > docs/results/moe_layer.md

The CUDA runs come from ``bash benchmarks/cuda_suite.sh OUT_DIR SDIST_DIR`` (``OUT_DIR/cuda_float32.json``,
``OUT_DIR/cuda_bfloat16.json``) or from ``benchmarks/moe_layer.py --device cuda`` alone; ``--note JSON TEXT``
says under a run's command line what it timed (e.g. which ``"auto"`` rule).

``--runs`` takes further runs of the same command (any subset of configurations, e.g.
``--configs small_coarse,small_fine --no-memory``) and adds a table of ``vs_hf_loop`` per run with the
median over runs, for the configurations whose ratio moves between runs; ``--runs-since N ...`` adds the
median of each group of runs from one ``N`` to the next (runs of a later library, or of another machine:
every run's command line says which library the fused loop's products ran in, and the CPU when recorded).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import paired_ratio  # noqa: E402

from moemix.layers.expert_workers import workers_pay_off  # noqa: E402

TARGETS = {  # the targets, (vs_hf_loop minimum, vs_dense_active maximum)
    "coarse": (1.0, 1.10), "fine": (1.25, 1.35), "small_coarse": (1.2, None), "small_fine": (1.5, None),
}
COLUMNS = ["moemix", "hf_loop", "gshard", "dense_active", "hf_block_grouped_mm", "moemix:loop",
           "moemix:loop_serial", "moemix:loop_workers", "moemix:loop_blas", "moemix:sorted", "moemix:padded",
           "moemix:grouped_mm", "megablocks"]
LAYOUT_PAIRS = [("moemix:padded", "moemix:grouped_mm")]  # paired ratio columns where a run timed both


def fmt(v):
    return "-" if v is None else f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def table(results: dict, targets: Optional[dict] = TARGETS) -> list:
    """Times per variant, the ratios (``a / b`` for the ``LAYOUT_PAIRS`` a run timed: median of per-round
    time ratios), and whether ``targets`` (the CPU targets by default; None: no column) are met."""
    cases = [k for k in results if k != "meta"]
    cols = [c for c in COLUMNS if any(c in results[k]["ms"] for k in cases)]
    ratios = ["vs_hf_loop", "vs_dense_active"] + [f"vs_{c}" for c in ("megablocks",) if c in cols]
    pairs = [(a, b) for a, b in LAYOUT_PAIRS if a in cols and b in cols]
    head = ([f"{c} ms" for c in cols] + ratios + [f"{a.split(':')[1]} / {b.split(':')[1]}" for a, b in pairs]
            + (["target"] if targets is not None else []) + ["load max/mean"])
    lines = ["| case | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for k in cases:
        e = results[k]
        cells = [fmt(e["ms"].get(c)) for c in cols] + ["-" if e.get(r) is None else f"{e[r]:.2f}" for r in ratios]
        detail = e.get("timing_detail", {})
        cells += [f"{paired_ratio(detail[a], detail[b]):.2f}" if a in detail and b in detail else "-" for a, b in pairs]
        if targets is not None:
            cells.append(target_cell(e, *targets.get(k, (None, None))))
        cells.append(f"{e['routing_stats']['max_over_mean_load']:.2f}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines


def skipped_notes(results: dict) -> list:
    """One line per variant that was left out of some cases, with the cases and the reason given."""
    reasons: dict = {}
    for k in (k for k in results if k != "meta"):
        for name, why in (results[k].get("skipped") or {}).items():
            reasons.setdefault((name, why), []).append(k)
    return [""] + [f"- `{name}` not timed in {', '.join(cases)}: {why}" for (name, why), cases in reasons.items()] \
        if reasons else []


def target_cell(entry: dict, hf_min: Optional[float], dense_max: Optional[float]) -> str:
    target = []
    if hf_min is not None:
        target.append(f"hf >= {hf_min} {'met' if entry['vs_hf_loop'] >= hf_min else 'missed'}")
    if dense_max is not None:
        target.append(f"dense <= {dense_max} {'met' if entry['vs_dense_active'] <= dense_max else 'missed'}")
    return "; ".join(target) or "-"


def memory_table(results: dict) -> list:
    cases = [k for k in results if k != "meta" and results[k].get("peak_mem_bytes")]
    if not cases:
        return []
    cols = [c for c in COLUMNS if any(c in (results[k]["peak_mem_bytes"] or {}) for k in cases)]
    lines = ["| case | " + " | ".join(f"{c} MiB" for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for k in cases:
        mem = results[k]["peak_mem_bytes"]
        lines.append(f"| {k} | " + " | ".join("-" if mem.get(c) is None else f"{mem[c] / 2**20:.0f}" for c in cols) + " |")
    return lines


def workers_table(results: dict) -> list:
    """The fused loop with its worker threads forced on and off, with the paired ratio (data behind the rules)."""
    lines = ["| case | moemix:loop_serial ms | moemix:loop_workers ms | serial / workers (paired) | moemix uses workers |",
             "|---|---|---|---|---|"]
    for k in (k for k in results if k != "meta"):
        t = results[k]["timing_detail"]
        ratio = paired_ratio(t["moemix:loop_serial"], t["moemix:loop_workers"])
        cfg = results[k]["config"]
        uses = workers_pay_off(cfg["T"] * cfg["k"] / cfg["E"], cfg["D"] * 2 * cfg["H"], cfg["E"])  # SwiGLU: gate, up
        lines.append(f"| {k} | {fmt(t['moemix:loop_serial']['ms'])} | {fmt(t['moemix:loop_workers']['ms'])} | "
                     f"{ratio:.3f} | {'yes' if uses else 'no'} |")
    return lines


def has_loop_blas(results: dict) -> bool:
    return any("moemix:loop_blas" in results[k]["timing_detail"] for k in results if k != "meta")


def gemm_library_table(named_runs: list, groups: Sequence[tuple] = ()) -> list:
    """``moemix:loop_blas`` over ``moemix:loop`` (paired) in each ``(label, number, results)`` run (``number``:
    1-based run number, None for a run outside the numbered ones), the median, and the median of the runs of
    each ``(first, last)`` group that holds more than one of them."""
    first = named_runs[0][2]
    cases = [k for k in first if k != "meta" and "moemix:loop_blas" in first[k]["timing_detail"]]
    members = [[i for i, (_, n, _) in enumerate(named_runs) if n is not None and a <= n <= b] for a, b in groups]
    shown = [(f"median of runs {a}-{b}", m) for (a, b), m in zip(groups, members) if len(m) > 1]
    head = ["case", "moemix:loop ms", "moemix:loop_blas ms", *(label for label, _, _ in named_runs), "median",
            *(label for label, _ in shown)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for k in cases:
        t = first[k]["timing_detail"]
        ratios = [paired_ratio(r[k]["timing_detail"]["moemix:loop_blas"], r[k]["timing_detail"]["moemix:loop"])
                  for _, _, r in named_runs]
        medians = [statistics.median(ratios)] + [statistics.median(ratios[i] for i in m) for _, m in shown]
        lines.append(f"| {k} | {fmt(t['moemix:loop']['ms'])} | {fmt(t['moemix:loop_blas']['ms'])} | "
                     + " | ".join(f"{v:.3f}" for v in ratios + medians) + " |")
    return lines


def run_groups(count: int, since: Sequence[int]) -> list:
    """``(first, last)`` run numbers (1-based) of each group that starts at one ``since`` value and ends before
    the next (the last at run ``count``)."""
    bounds = list(since) + [count + 1]
    return [(a, b - 1) for a, b in zip(bounds, bounds[1:])]


def row_buffers_table(results: dict) -> list:
    """The layer on a buffer layout against the same layer allocating its expert-buffer rows afresh."""
    lines = ["| case | layout | recycled ms | fresh ms | hf_loop ms | fresh / recycled (paired) | vs_hf_loop | "
             "vs_hf_loop with fresh rows | page faults per step: recycled | fresh | hf_loop |", "|---" * 11 + "|"]
    for k in (k for k in results if k != "meta"):
        e = results[k]
        ms, faults = e["ms"], e["faults_per_step"]
        lines.append(f"| {k} | {e.get('layout', '-')} | {fmt(ms['recycled'])} | {fmt(ms['fresh'])} | {fmt(ms['hf_loop'])} | "
                     f"{e['fresh_over_recycled']:.3f} | {e['vs_hf_loop']:.2f} | {e['vs_hf_loop_fresh']:.2f} | "
                     f"{faults['recycled']:.0f} | {faults['fresh']:.0f} | {faults['hf_loop']:.0f} |")
    return lines


def runs_table(runs: list, since: Sequence[int] = ()) -> list:
    """``vs_hf_loop`` of every case in every run, the median over all runs and, for each ``since`` value, the
    median over runs from it to the run before the next value (1-based; the runs of a later library or
    another machine), left out for a single run."""
    cases = []
    for results in runs:
        cases += [k for k in results if k != "meta" and k not in cases]
    groups = [(a, b) for a, b in run_groups(len(runs), since) if b > a]
    head = ([f"run {i + 1}" for i in range(len(runs))] + ["median"]
            + [f"median of runs {a}-{b}" for a, b in groups] + ["target"])
    lines = ["| case | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for k in cases:
        ratios = [r[k]["vs_hf_loop"] if k in r else None for r in runs]
        medians = [statistics.median(v for v in ratios if v is not None)]
        medians += [statistics.median(v for v in ratios[a - 1:b] if v is not None) for a, b in groups]
        hf_min = TARGETS.get(k, (None, None))[0]
        lines.append(f"| {k} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in ratios + medians)
                     + f" | {'-' if hf_min is None else f'>= {hf_min}'} |")
    return lines


def meta_line(results: dict) -> str:
    m = results["meta"]
    return (f"`{m['command']}`: torch {m['torch']}, transformers {m.get('transformers', '-')}, "
            f"{m.get('dtype', 'float32')}, {m['device']}"
            f"{' (' + m['gpu'] + ')' if 'gpu' in m else ''}{' (' + m['cpu'] + ')' if 'cpu' in m else ''}, "
            f"{m['threads']} threads, allocator {m.get('allocator', 'default')}"
            f"{', fused-loop GEMMs in ' + m['cpu_gemm'] if m.get('device') == 'cpu' and 'cpu_gemm' in m else ''}"
            f"{' (weight gradients in ' + m['cpu_gemm_weight_grad'] + ')' if 'cpu_gemm_weight_grad' in m else ''}")


def load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def section(title: str, results: dict, intro, lines: list) -> list:
    """A ``## title`` section: the command line of the run, an optional paragraph, then the table."""
    return ["", f"## {title}", "", meta_line(results), ""] + ([intro, ""] if intro else []) + lines


def main():
    p = argparse.ArgumentParser()
    p.add_argument("default_json")
    p.add_argument("reuse_json", nargs="?")
    p.add_argument("--cuda", nargs="*", default=[], help="CUDA runs (e.g. float32 and bfloat16), a section each; "
                   "several runs of one dtype are numbered in the given order")
    p.add_argument("--note", nargs=2, action="append", default=[], metavar=("JSON", "TEXT"),
                   help="a sentence printed under that CUDA run's command line (e.g. which moemix it timed)")
    p.add_argument("--workers", default=None, help="a --layouts loop_serial,loop_workers run")
    p.add_argument("--row-buffers", default=None, help="a benchmarks/row_buffers.py run")
    p.add_argument("--cpu-grouped-mm", default=None, help="a CPU run with --layouts ...,grouped_mm")
    p.add_argument("--runs", nargs="*", default=[], help="more runs of the same command (vs_hf_loop spread)")
    p.add_argument("--runs-since", type=int, nargs="*", default=[], metavar="N",
                   help="runs from N (1-based) to the next N timed a later library or another machine: also "
                        "their own median")
    p.add_argument("--runs-note", default=None, help="a sentence under the runs' list (e.g. which library each timed)")
    args = p.parse_args()
    if any(not 1 <= n <= len(args.runs) for n in args.runs_since) or args.runs_since != sorted(set(args.runs_since)):
        p.error(f"--runs-since: expected increasing run numbers from 1 to {len(args.runs)} (the --runs given), "
                f"got {args.runs_since}")
    out = ["# MoE layer speed: moemix vs the HF loop, GShard and a dense FFN", "",
           "Produced by `benchmarks/moe_layer.py` and formatted by `benchmarks/moe_layer_report.py` (see its "
           "docstring for the commands; `bash benchmarks/moe_layer_report.sh` rewrites this page from the runs kept "
           "in `docs/results`). Forward + backward of one layer, D=512, float32 unless a section says "
           "otherwise, SwiGLU experts without bias, medians of interleaved repeats; `vs_hf_loop` = HF time / moemix time (higher is better), "
           "`vs_dense_active` = moemix time / time of a dense SwiGLU FFN with hidden k*H (the same active "
           "FLOPs; 1.0 is the practical limit); both ratios are medians over rounds of the two variants' "
           "time ratio within a round, so they need not equal the ratio of the ms columns. `moemix` is the default (`dispatch_layout=\"auto\"`); the "
           "`moemix:<strategy>` columns force one strategy and are the data behind the auto rule.", ""]
    default = load_json(args.default_json)
    out += ["## CPU, default glibc allocator", "", meta_line(default), ""]
    if default["meta"].get("cpu_gemm") == "onednn":
        out += ["On this machine the fused loop (`moemix:loop`, and `moemix` where it picks the loop) runs its "
                "products through oneDNN (on Zen 4 all but the weight gradients; `moemix.layers.cpu_gemm`), while the HF loop, GShard and the dense FFN use `torch.mm` (the "
                "machine's BLAS): part of the margin over them is the GEMM library. `moemix:loop_blas` "
                "is the same loop with `torch.mm`; the paired ratios are in the GEMM-library table below.", ""]
    out += table(default)
    out += ["", "Peak memory of one step beyond what was resident before it (fresh process per variant, "
            "balanced routing):", ""] + memory_table(default)
    reuse = load_json(args.reuse_json) if args.reuse_json else None
    runs = [load_json(path) for path in args.runs]
    if reuse is not None:
        out += section("CPU, freed memory reused (`moemix.utils.reuse_freed_memory()`, every variant)", reuse,
                       None, table(reuse))
    if runs:
        out += ["", "## CPU: `vs_hf_loop` across repeated runs", "",
                "One process per run, run one after another:", ""]
        out += [f"{i + 1}. " + meta_line(results) for i, results in enumerate(runs)] + [""]
        out += ([args.runs_note, ""] if args.runs_note else []) + runs_table(runs, args.runs_since)
    named = ([(f"run {i + 1}", i + 1 if runs else None, r) for i, r in enumerate(runs or [default])]
             + ([("reuse", None, reuse)] if reuse else []))
    # where the loop's default is BLAS, moemix:loop_blas is the same loop: nothing to compare
    named = [entry for entry in named if has_loop_blas(entry[2]) and entry[2]["meta"].get("cpu_gemm") == "onednn"]
    if named:
        out += ["", "## CPU: the fused loop's GEMM library", "",
                "Runs whose fused loop ran its fp32 products in `onednn` (`moemix.layers.cpu_gemm`; runs where "
                "the default is BLAS are left out: there `moemix:loop_blas` is the same loop); `moemix:loop_blas` "
                "is the same loop with `torch.mm`. Per run, `moemix:loop_blas` time over `moemix:loop` time (median of "
                "per-round ratios; above 1 means the default is faster): the runs above (`run i`, default "
                "allocator) and the freed-memory-reused run (`reuse`); times from the first; medians over the groups "
                "of runs of the table above. Single products: `docs/results/cpu_gemm.md` (Zen 4) and "
                "`docs/results/cpu_gemm_zen5.md`.", ""]
        out += gemm_library_table(named, run_groups(len(runs), args.runs_since) if runs else ())
    if args.workers:
        workers = load_json(args.workers)
        out += section("CPU: the fused loop with and without its worker threads", workers,
                       "`serial / workers` above 1 means the worker threads are faster (median of per-round ratios); "
                       "`moemix uses workers` is what the rules in `moemix.layers.expert_workers` decide for balanced "
                       "routing.", workers_table(workers))
    if args.row_buffers:
        rows = load_json(args.row_buffers)
        out += section("CPU: recycled temporaries of the buffer layouts against fresh ones", rows,
                       "`fresh` is the same layer with every op on the expert buffer allocating its tensors anew "
                       "each step (no `RecycledPool`); `fresh / recycled` above 1 means recycling is faster (median "
                       "of per-round ratios). Page faults are minor faults per timed step (`getrusage`).",
                       row_buffers_table(rows))
    if args.cpu_grouped_mm:
        gmm = load_json(args.cpu_grouped_mm)
        out += section("CPU: the grouped_mm layout", gmm,
                       "`moemix:grouped_mm` is `dispatch_layout=\"grouped_mm\"` (`F.grouped_mm`), which `\"auto\"` "
                       "takes on CUDA in bfloat16 only; `padded / grouped_mm` below 1 means the padded layout is "
                       "faster.", table(gmm, targets=None))
    notes = dict(args.note)
    cuda_runs = [(path, load_json(path)) for path in args.cuda]
    dtypes = [cuda["meta"].get("dtype", "float32") for _, cuda in cuda_runs]
    for i, (path, cuda) in enumerate(cuda_runs):
        dtype = dtypes[i]
        several = dtypes.count(dtype) > 1
        run_number = dtypes[:i + 1].count(dtype)
        title = f"CUDA, {dtype}" + (f", run {run_number}" if several else "")
        intro = (notes[path] + " " if path in notes else "") + "The targets above are for 2 CPU cores; none is set for CUDA."
        if any("megablocks" in cuda[k]["ms"] for k in cuda if k != "meta"):
            intro += " `vs_megablocks` is megablocks time / moemix time (higher is better)."
        memory = memory_table(cuda)
        if memory:
            memory = ["", "Peak memory of one step beyond what was allocated before it (`max_memory_allocated`, "
                      "balanced routing):", ""] + memory
        out += section(title, cuda, intro,
                       table(cuda, targets=None) + skipped_notes(cuda) + memory)
    print("\n".join(out))


if __name__ == "__main__":
    main()
