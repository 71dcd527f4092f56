"""Run the vision recipes over seeds on the embedded digits and write docs/results/vision.md.

    bash recipes/vision.sh                 # 3 seeds, the recipes' default epochs
    EPOCHS=15 SEEDS="0 1 2" bash recipes/vision.sh
    bash recipes/vision.sh --families cnn  # rerun the CNN runs only; the ViT runs come from --json

ViT (TransMix recipe): no mixing, MixUp, CutMix, MixUp+CutMix, MixUp+CutMix+TransMix.
CNN (Patch Mixing recipe): Patch Mixing vs CutMix, with the occlusion curve (patches replaced by other
images' patches or by noise) on the test split, plotted to docs/results/vision_occlusion.png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

VIT_VARIANTS = {
    "no mixing": ["--model.mixup_alpha", "0", "--model.cutmix_alpha", "0", "--model.transmix", "false"],
    "MixUp": ["--model.cutmix_alpha", "0", "--model.transmix", "false"],
    "CutMix": ["--model.mixup_alpha", "0", "--model.transmix", "false"],
    "MixUp+CutMix": ["--model.transmix", "false"],
    "MixUp+CutMix+TransMix": [],
}
CNN_VARIANTS = {"CutMix": ["--model.mixing", "cutmix"], "Patch Mixing": ["--model.mixing", "patchmix"]}


def fit_and_test(cli_main, args, workdir):
    base = ["--trainer.logger.init_args.save_dir", workdir, "--trainer.default_root_dir", workdir,
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    cli = cli_main(["fit", *base, *args])
    val_acc = float(cli.trainer.callback_metrics.get("val/acc", float("nan")))  # test() replaces the metrics
    result = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    return {"val_acc": val_acc, **result}


def mean_std(values):
    values = [float(v) for v in values]
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt_mean_std(values, digits=2):
    if any(v != v for v in values):  # nan: not recorded
        return "-"
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def main():
    from moemix.recipes import cnn_patchmix, vit_transmix

    p = argparse.ArgumentParser()
    p.add_argument("--seeds", default=os.environ.get("SEEDS", "0 1 2"))
    p.add_argument("--epochs", type=int, default=int(os.environ.get("EPOCHS", "0")) or None)
    p.add_argument("--out", default="docs/results/vision.md")
    p.add_argument("--json", default="docs/results/vision.json")
    p.add_argument("--from-json", default=None, help="only rewrite the markdown from a saved JSON")
    p.add_argument("--families", default="vit cnn",
                   help="families to run; the other families' runs are read from --json (same seeds and epochs)")
    args = p.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        args.epochs = saved["epochs"]
        return write_markdown(saved["runs"], saved["seeds"], args)
    seeds = [int(s) for s in args.seeds.split()]
    epochs = ["--trainer.max_epochs", str(args.epochs)] if args.epochs else []
    families = args.families.split()
    runs = {"vit": {}, "cnn": {}}
    if set(runs) - set(families):
        with open(args.json) as f:
            saved = json.load(f)
        if saved["seeds"] != seeds or saved["epochs"] != args.epochs:
            raise ValueError(f"{args.json} has seeds {saved['seeds']} and epochs {saved['epochs']}; "
                             f"rerun every family for seeds {seeds} and epochs {args.epochs}")
        runs.update({family: saved["runs"][family] for family in set(runs) - set(families)})
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for family, cli_main, variants in (("vit", vit_transmix.cli_main, VIT_VARIANTS),
                                           ("cnn", cnn_patchmix.cli_main, CNN_VARIANTS)):
            if family not in families:
                continue
            for name, extra in variants.items():
                for seed in seeds:
                    workdir = os.path.join(tmp, family, name.replace("+", "_").replace(" ", "_"), str(seed))
                    res = fit_and_test(cli_main, ["--seed_everything", str(seed), "--data.seed", "0", *epochs, *extra],
                                       workdir)
                    runs[family].setdefault(name, []).append(res)
                    print(f"[{time.time() - start:.0f}s] {family} {name} seed {seed}: test acc {res['test/acc']:.4f}",
                          flush=True)
    with open(args.json, "w") as f:
        json.dump({"seeds": seeds, "epochs": args.epochs, "runs": runs}, f, indent=1)
    write_markdown(runs, seeds, args)


def write_markdown(runs, seeds, args):
    from moemix.data import load_digits_tensors

    sizes = {name: len(y) for name, (_, y) in load_digits_tensors(32, seed=0).items()}
    lines = ["# Vision recipes on the embedded digits", "",
             f"Command: `bash recipes/vision.sh` (SEEDS=\"{' '.join(map(str, seeds))}\""
             + (f", EPOCHS={args.epochs}" if args.epochs else "") + "). Data: scikit-learn digits upsampled to 32 px, "
             f"fixed stratified split ({sizes['train']:,} train / {sizes['val']} val / {sizes['test']} test; "
             "`--data.seed 0`); the seed changes weights, "
             "mixing and data order. Top-1 on the test split, mean ± std over seeds.", "",
             "## ViT (vit_transmix: 4-block, 96-wide ViT, 4-px patches)", "",
             "| mixing | test top-1 (%) | val top-1 (%) |", "|---|---|---|"]
    for name, res in runs["vit"].items():
        lines.append(f"| {name} | {fmt_mean_std([100 * r['test/acc'] for r in res])} | "
                     f"{fmt_mean_std([100 * r['val_acc'] for r in res])} |")
    lines += ["", "## CNN (cnn_patchmix: ResNet-18, 8x8 patch grid)", "",
              "| mixing | test top-1 (%) | " + " | ".join(f"patches {f:.0%}" for f in (0.2, 0.4, 0.6))
              + " | " + " | ".join(f"noise {f:.0%}" for f in (0.2, 0.4, 0.6)) + " |",
              "|---|---|" + "---|" * 6]
    for name, res in runs["cnn"].items():
        cells = [fmt_mean_std([100 * r["test/acc"] for r in res])]
        for mode in ("patches", "noise"):
            for f in (0.2, 0.4, 0.6):
                cells.append(fmt_mean_std([100 * r[f"test/occlusion_{mode}_{f:.1f}"] for r in res], 1))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    png = os.path.splitext(os.path.basename(args.out))[0] + "_occlusion.png"
    lines += ["", f"![occlusion curve]({png})", ""]
    plot_occlusion(runs["cnn"], os.path.join(os.path.dirname(args.out), png))
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out}")


def plot_occlusion(cnn_runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
    for ax, mode in zip(axes, ("patches", "noise")):
        for name, res in cnn_runs.items():
            means = [statistics.mean(r[f"test/occlusion_{mode}_{f:.1f}"] for r in res) for f in fractions]
            ax.plot(fractions, means, marker="o", label=name)
        ax.set_title(f"patches replaced by {'other images' if mode == 'patches' else 'noise'}")
        ax.set_xlabel("fraction of the 8x8 grid replaced")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("test accuracy")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
