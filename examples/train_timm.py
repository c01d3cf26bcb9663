"""Train a timm model on a richkd store's fused targets in a plain PyTorch loop, with no teacher forward pass.

    python examples/train_timm.py --store cache/demo.zarr --dataset demo --data-root data/demo --model resnet18
"""

import argparse

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from richkd import CachedTargets, kd_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="a store written by `richkd precompute`")
    parser.add_argument("--dataset", required=True, help="the dataset it was precomputed from (e.g. cifar100)")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--model", default="resnet18", help="any timm model name")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--alpha", type=float, default=0.7, help="z_F = alpha z_T + (1 - alpha) z_C")
    parser.add_argument("--temperature", type=float, default=3.0)
    parser.add_argument("--out", default="student.pt")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    targets = CachedTargets(args.store, args.dataset, args.data_root, variant="L", alpha=args.alpha)
    model = timm.create_model(args.model, num_classes=len(targets.class_names)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs)
    loader = DataLoader(targets, batch_size=args.batch_size, shuffle=True, num_workers=2, drop_last=True)
    for epoch in range(args.epochs):
        targets.set_epoch(epoch)  # each epoch replays the next stored view
        model.train()
        total, correct, seen = 0.0, 0, 0
        for batch in loader:
            images, labels = batch["image"].to(device), batch["label"].to(device)
            logits = model(images)
            loss = F.cross_entropy(logits, labels) + 3 * kd_loss(logits, batch["fused_logits"].to(device),
                                                                 args.temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
        schedule.step()
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total / seen:.4f}, train top-1 {100 * correct / seen:.1f}%")
    torch.save({"model": model.state_dict(), "class_names": targets.class_names}, args.out)


if __name__ == "__main__":
    main()
