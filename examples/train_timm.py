"""Train a timm model on a richkd store's fused targets in a plain PyTorch loop, with no teacher forward pass.

On the demo's stores (`dvc repro` makes both: cache/demo.zarr of the training split, cache/demo_test.zarr of
the test split's centre views), timm's tiny ResNet with a stem for 16 px images reaches about 85% on the test
split (chance 12.5%) in about a minute on one CPU core:

    python examples/train_timm.py --store cache/demo.zarr --test-store cache/demo_test.zarr \
        --dataset demo --data-root data/demo --model test_resnet --small-image-stem --batch-size 16 --epochs 20

An ImageNet ResNet as it is (--model resnet18) shrinks a 16 px image to 4 px before its first block, and learns
slowly: 39% in 15 epochs, at twice the time.
"""

import argparse

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from richkd import CachedTargets, kd_loss


def use_small_image_stem(model: nn.Module) -> None:
    """timm's ResNets shrink their input 4x before the first block (ImageNet's 224 px to 56 px), which leaves a
    16 px image 4 px wide: give them the stem of CIFAR's ResNets instead, one 3x3 convolution at full size."""
    model.conv1 = nn.Conv2d(3, model.bn1.num_features, 3, padding=1, bias=False)
    model.maxpool = nn.Identity()


@torch.no_grad()
def top1(model: nn.Module, targets: CachedTargets, batch_size: int, device: torch.device) -> float:
    """The share of the store's samples (their stored views) that the model classifies right."""
    model.eval()
    correct = 0
    for batch in DataLoader(targets, batch_size=batch_size, num_workers=2):
        correct += int((model(batch["image"].to(device)).argmax(1) == batch["label"].to(device)).sum())
    return correct / len(targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="a store of the training split, from `richkd precompute`")
    parser.add_argument("--test-store", help="a store of a held-out split to report the model's accuracy on (e.g. "
                        "`richkd precompute --split test --views 1 --view-policy center`)")
    parser.add_argument("--dataset", required=True, help="the dataset they were precomputed from (e.g. cifar100)")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--test-split", default="test", help="the split --test-store was precomputed from")
    parser.add_argument("--model", default="resnet18", help="any timm model name")
    parser.add_argument("--small-image-stem", action="store_true",
                        help="a timm ResNet for images of 32 px or less: a 3x3 stem that keeps their size")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--alpha", type=float, default=0.7, help="z_F = alpha z_T + (1 - alpha) z_C")
    parser.add_argument("--temperature", type=float, default=3.0)
    parser.add_argument("--kd-weight", type=float, default=1.0, help="weight of the KD loss beside cross-entropy "
                        "(3 in the paper; at small batches that is a step too large: the demo's params.yaml)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the model's weights and the batches' order")
    parser.add_argument("--out", default="student.pt")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    targets = CachedTargets(args.store, args.dataset, args.data_root, variant="L", alpha=args.alpha)
    held_out = (CachedTargets(args.test_store, args.dataset, args.data_root, args.test_split)
                if args.test_store else None)
    model = timm.create_model(args.model, num_classes=len(targets.class_names))
    if args.small_image_stem:
        use_small_image_stem(model)
    model = model.to(device)
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
            loss = F.cross_entropy(logits, labels) + args.kd_weight * kd_loss(
                logits, batch["fused_logits"].to(device), args.temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
        schedule.step()
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total / seen:.4f}, train top-1 {100 * correct / seen:.1f}%")
    if held_out is not None:
        print(f"{args.test_split} top-1: {100 * top1(model, held_out, args.batch_size, device):.1f}% "
              f"of {len(held_out)} images (chance {100 / len(targets.class_names):.1f}%)")
    torch.save({"model": model.state_dict(), "class_names": targets.class_names, "timm_model": args.model,
                "small_image_stem": args.small_image_stem}, args.out)


if __name__ == "__main__":
    main()
