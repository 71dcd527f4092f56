"""Draw mixed samples from real images: docs/images/mix_gallery.png.

    python examples/mix_gallery.py [--out docs/images/mix_gallery.png]

Uses four scikit-image sample photos (``pip install scikit-image``), else sklearn's 8x8 digits. Rows: the
originals, MixUp, CutMix, CutMix with per-sample boxes (elem), PatchMix, each titled by the label weights.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from moemix.mix import CutMix, MixUp, PatchMix


def load_images(size: int = 128) -> tuple[torch.Tensor, list[str]]:
    try:
        from skimage import data
        names = ["astronaut", "chelsea", "coffee", "rocket"]
        imgs = [torch.from_numpy(getattr(data, n)().copy()).permute(2, 0, 1).float() / 255 for n in names]
    except ImportError:
        from sklearn.datasets import load_digits
        d = load_digits()
        imgs = [torch.from_numpy(d.images[i]).float().div(16).expand(3, 8, 8) for i in range(4)]
        names = [f"digit {d.target[i]}" for i in range(4)]
    x = torch.stack([F.interpolate(i[None], size=(size, size), mode="bilinear", align_corners=False)[0] for i in imgs])
    return x.clamp(0, 1), names


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="docs/images/mix_gallery.png")
    args = p.parse_args(argv)
    x, names = load_images()
    y = torch.arange(4)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    rows = [("original", x, torch.eye(4))]
    for title, mixer in [("MixUp", MixUp(1.0, num_classes=4, mode="elem", generator=g())),
                         ("CutMix", CutMix(1.0, num_classes=4, generator=g())),
                         ("CutMix elem", CutMix(1.0, num_classes=4, mode="elem", generator=g())),
                         ("PatchMix 8x8", PatchMix((8, 8), num_classes=4, ratio_range=(0.3, 0.6), generator=g()))]:
        xm, ym = mixer(x, y)
        rows.append((title, xm, ym))
    cell, pad, head = x.shape[-1], 6, 18
    canvas = Image.new("RGB", (110 + 4 * (cell + pad), len(rows) * (cell + head + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (title, imgs, targets) in enumerate(rows):
        top = r * (cell + head + pad)
        draw.text((4, top + head + cell // 2), title, fill="black")
        for c in range(4):
            arr = (imgs[c].permute(1, 2, 0).clamp(0, 1) * 255).byte().numpy()
            left = 110 + c * (cell + pad)
            canvas.paste(Image.fromarray(arr), (left, top + head))
            top2 = targets[c].topk(2)
            label = names[c] if r == 0 else " ".join(f"{names[int(i)][:5]} {float(v):.2f}"
                                                     for v, i in zip(top2.values, top2.indices) if v > 0.005)
            draw.text((left, top + 3), label, fill="black")
    canvas.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
