"""Mixing speed: moemix vs timm ``Mixup`` vs torchvision v2 ``MixUp``/``CutMix``, side by side in one run.

    python benchmarks/mix.py                       # table
    python benchmarks/mix.py --json mix.json       # and a JSON record

Inputs are ``[B, 3, 224, 224]`` float32 with 1000-class index labels. Every library gets the same tensors
and clones its input inside the timed statement (timm mixes in place), labels included. Libraries run
interleaved (one call each per round, order rotated) and the table shows medians over rounds, so load on
the machine hits all of them alike. torchvision has no per-sample mode (its cells read n/a).

Also measured: the TransMix relabelling cost (the CLS-row hook plus :meth:`TransMix.relabel`) as a fraction
of one ViT-Tiny training step (forward, backward, SGD step) on CPU.

JSON: ``{"<case>": {"ms": {"moemix": .., "timm": .., "torchvision": ..}, "vs_timm": moemix / timm},
"transmix_overhead": fraction}``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from moemix.mix import CutMix, MixUp, TransMix, attach_transmix

NUM_CLASSES = 1000


def _timm(case: str):
    from timm.data import Mixup
    kw = dict(num_classes=NUM_CLASSES, label_smoothing=0.0, mode="elem" if "elem" in case else "batch")
    if "mixup" in case:
        return Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, **kw)
    return Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, **kw)


def _torchvision(case: str):
    if "elem" in case:
        return None
    from torchvision.transforms import v2
    return (v2.MixUp if "mixup" in case else v2.CutMix)(alpha=1.0, num_classes=NUM_CLASSES)


def _moemix(case: str):
    mode = "elem" if "elem" in case else "batch"
    cls = MixUp if "mixup" in case else CutMix
    return cls(1.0, mode=mode, num_classes=NUM_CLASSES, generator=torch.Generator().manual_seed(0))


def bench_case(case: str, b: int, reps: int, warmup: int = 3) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(b, 3, 224, 224, generator=g)
    y = torch.randint(0, NUM_CLASSES, (b,), generator=g)
    fns = {}
    for name, make in (("moemix", _moemix), ("timm", _timm), ("torchvision", _torchvision)):
        t = make(case)
        if t is not None:
            fns[name] = (lambda t=t: t(x.clone(), y.clone()))
    times = {k: [] for k in fns}
    names = list(fns)
    for _ in range(warmup):  # warm-up rounds: let the allocator settle before anything is timed
        for f in fns.values():
            f()
    for r in range(reps):
        for k in names[r % len(names):] + names[: r % len(names)]:
            s = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - s)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    ms.setdefault("torchvision", None)
    return {"ms": ms, "vs_timm": ms["moemix"] / ms["timm"]}


def bench_transmix(b: int, reps: int) -> dict:
    import timm
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=NUM_CLASSES)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    mixer = TransMix(num_classes=NUM_CLASSES, switch_prob=1.0, generator=torch.Generator().manual_seed(0))
    hook = attach_transmix(model)
    mixer.use_hook(hook)
    # time the hook body itself: re-register it through a timer
    hook._handle.remove()
    hook_s: list[float] = []

    def timed(mod, inp, out):
        s = time.perf_counter()
        hook._from_qkv(mod, inp, out)
        hook_s.append(time.perf_counter() - s)

    handle = model.blocks[-1].attn.qkv.register_forward_hook(timed)
    x = torch.rand(b, 3, 224, 224)
    y = torch.randint(0, NUM_CLASSES, (b,))
    step_s, relabel_s = [], []
    for r in range(reps + 1):
        xm, y_area, rec = mixer(x, y)
        s = time.perf_counter()
        logits = model(xm)
        t0 = time.perf_counter()
        target = mixer.relabel(rec, hook.cls_attention)
        t1 = time.perf_counter()
        loss = torch.sum(-target * logits.log_softmax(-1), dim=-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        e = time.perf_counter()
        if r:  # skip warm-up
            relabel_s.append(t1 - t0)
            step_s.append(e - s - (t1 - t0) - hook_s[-1])
    handle.remove()
    hook_ms = 1e3 * statistics.median(hook_s[1:])
    relabel_ms = 1e3 * statistics.median(relabel_s)
    step_ms = 1e3 * statistics.median(step_s)
    return {"batch_size": b, "step_ms": step_ms, "hook_ms": hook_ms, "relabel_ms": relabel_ms,
            "overhead": (hook_ms + relabel_ms) / step_ms}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    p.add_argument("--reps", type=int, default=11)
    p.add_argument("--warmup", type=int, default=3, help="untimed interleaved rounds per case")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vit-batch", type=int, default=32)
    p.add_argument("--vit-reps", type=int, default=5)
    p.add_argument("--skip-transmix", action="store_true")
    p.add_argument("--json", type=str, default=None, help="write results to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict = {}
    cases = ["mixup_batch", "cutmix_batch", "mixup_elem", "cutmix_elem"]
    print(f"torch {torch.__version__}, {args.threads} threads, medians of {args.reps} interleaved rounds (ms)")
    print(f"{'case':<22}{'moemix':>10}{'timm':>10}{'torchvision':>13}{'vs_timm':>10}")
    for b in args.batch_sizes:
        for case in cases:
            key = f"{case}_b{b}"
            res = bench_case(case, b, args.reps, args.warmup)
            results[key] = res
            tv = res["ms"]["torchvision"]
            print(f"{key:<22}{res['ms']['moemix']:>10.1f}{res['ms']['timm']:>10.1f}"
                  f"{(f'{tv:.1f}' if tv is not None else 'n/a'):>13}{res['vs_timm']:>10.2f}", flush=True)
    if not args.skip_transmix:
        tm = bench_transmix(args.vit_batch, args.vit_reps)
        results["transmix_overhead"] = tm["overhead"]
        results["transmix"] = tm
        print(f"TransMix on ViT-Tiny (B={tm['batch_size']}): step {tm['step_ms']:.0f} ms, hook {tm['hook_ms']:.2f} ms, "
              f"relabel {tm['relabel_ms']:.2f} ms -> overhead {100 * tm['overhead']:.2f}% of a training step")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
