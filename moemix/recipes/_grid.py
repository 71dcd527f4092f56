"""A grid image of mixed samples, each titled with its two largest soft-label weights."""
from __future__ import annotations

import io

import torch

__all__ = ["labelled_grid"]


def labelled_grid(x: torch.Tensor, y_soft: torch.Tensor, cols: int = 4) -> torch.Tensor:
    """``[N, C, H, W]`` images in [-1, 1] (any normalisation works, each is min-max scaled) and ``[N, K]``
    targets -> ``[3, H', W']`` float image in [0, 1] for ``SummaryWriter.add_image``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    x = x.detach().float().cpu()
    y_soft = y_soft.detach().float().cpu()
    n = x.shape[0]
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = x[i]
        img = (img - img.min()) / (img.max() - img.min()).clamp(min=1e-8)
        ax.imshow(img.permute(1, 2, 0).numpy() if img.shape[0] == 3 else img[0].numpy(), cmap="gray")
        w, c = y_soft[i].topk(min(2, y_soft.shape[1]))
        ax.set_title(" ".join(f"{int(ci)}:{wi:.2f}" for wi, ci in zip(w.tolist(), c.tolist())), fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    buf.seek(0)
    arr = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
