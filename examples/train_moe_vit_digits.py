"""Train a small timm ViT whose every second MLP is a SparseMoE on scikit-learn's digits.

Runs on 2 CPU cores in about a minute with no download:

    python examples/train_moe_vit_digits.py --epochs 15
"""
import argparse
import time

import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from moemix.layers import replace_mlp_with_moe
from moemix.losses import collect_aux_loss


def load_data(img_size: int, seed: int):
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=img_size, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - 0.5) / 0.5
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(y))
    return (x[perm[:split]], y[perm[:split]]), (x[perm[split:]], y[perm[split:]])


@torch.no_grad()
def accuracy(model, x, y, batch_size=256):
    model.eval()
    correct = sum((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(y), batch_size))
    return correct / len(y)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    (x_train, y_train), (x_val, y_val) = load_data(16, args.seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, num_classes=10,
                              embed_dim=96, depth=4, num_heads=3)
    replaced = replace_mlp_with_moe(model, every=2, num_experts=args.num_experts, k=args.k)
    print(f"MoE blocks: {replaced}")
    steps = args.epochs * ((len(y_train) + args.batch_size - 1) // args.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(y_train))
        for i in range(0, len(y_train), args.batch_size):
            idx = perm[i:i + args.batch_size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx], label_smoothing=0.1)
            aux = collect_aux_loss(model)
            opt.zero_grad(set_to_none=True)
            (loss + aux).backward()
            opt.step()
            sched.step()
        load = model.blocks[1].mlp.tokens_per_expert.tolist()
        print(f"epoch {epoch + 1}/{args.epochs}  loss {loss.item():.3f}  aux {aux.item():.4f}  "
              f"val acc {accuracy(model, x_val, y_val):.3f}  tokens/expert (block 1) {load}  "
              f"{time.time() - start:.0f}s")
    print(f"final validation accuracy: {accuracy(model, x_val, y_val):.4f}")


if __name__ == "__main__":
    main()
