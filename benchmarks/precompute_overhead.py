"""How close `richkd precompute` runs to the bare forward passes it cannot avoid.

Times, on the same images, (a) resnet32x4 and CLIP ViT-B-32 (random weights) forward on tensors that
are already preprocessed and in memory, and (b) `richkd precompute` end to end: reading a CIFAR-100
folder in worker processes, replaying views, preprocessing, both forward passes, float16 conversion
and writing the Zarr store. Prints images per second of each and their ratio (goal: at least 0.9).

The two are measured alternately (bare, precompute, bare, ...) and compared by their medians, as
this machine's speed drifts by several percent between runs. Precompute uses one prompt template:
encoding prompts is a one-off cost before the block loop and is reported separately.

    python benchmarks/precompute_overhead.py [--images 384] [--batch-size 64] [--num-workers 1] [--rounds 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from synthetic import write_synthetic_cifar100, write_teacher

from richkd.pipeline.clip import load_clip
from richkd.pipeline.data import normalize
from richkd.pipeline.datasets import open_dataset
from richkd.pipeline.views import PadCrop, sample_view
from richkd.stages import precompute


def bare_forward_rate(teacher, clip, teacher_inputs, clip_inputs, batch_size: int) -> float:
    """Images per second of both forward passes alone."""
    with torch.inference_mode():
        teacher(teacher_inputs[:batch_size])  # warm-up
        clip.encode_images(clip_inputs[:batch_size])
        started = time.perf_counter()
        for first in range(0, len(teacher_inputs), batch_size):
            teacher(teacher_inputs[first:first + batch_size])
            clip.encode_images(clip_inputs[first:first + batch_size])
    return len(teacher_inputs) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic_cifar100(root / "data", train=args.images, test=8)
        write_teacher(root / "teacher.pth")
        teacher, _ = precompute.load_teacher("resnet32x4", str(root / "teacher.pth"), 100, torch.device("cpu"))
        clip = load_clip("ViT-B-32", "random")

        dataset = open_dataset("cifar100", root / "data", "train")
        policy = PadCrop(size=32)
        views = torch.stack([policy.replay(dataset.image(i), sample_view(policy, 0, 0, i, dataset.image(i)))
                             for i in range(len(dataset))])
        # The same memory format as precompute uses, so that the baseline is as fast as the models can run.
        teacher.to(memory_format=torch.channels_last)
        clip.model.to(memory_format=torch.channels_last)
        teacher_inputs = normalize(views, dataset.mean, dataset.std).contiguous(memory_format=torch.channels_last)
        clip_inputs = clip.preprocess(views).contiguous(memory_format=torch.channels_last)
        (root / "templates.txt").write_text("a photo of a {}\n")

        bare_rates = [bare_forward_rate(teacher, clip, teacher_inputs, clip_inputs, args.batch_size)]
        results = []
        for round_number in range(args.rounds):
            config = precompute.PrecomputeConfig(
                dataset="cifar100", data_root=str(root / "data"), teacher="resnet32x4",
                teacher_checkpoint=str(root / "teacher.pth"), clip="ViT-B-32", clip_pretrained="random",
                templates=str(root / "templates.txt"), views=1, shard_size=args.batch_size * 4,
                batch_size=args.batch_size, num_workers=args.num_workers, device="cpu",
                out=str(root / f"cache{round_number}.zarr"))
            results.append(precompute.run(config))
            bare_rates.append(bare_forward_rate(teacher, clip, teacher_inputs, clip_inputs, args.batch_size))

    bare = statistics.median(bare_rates)
    cached = statistics.median(result.images_per_second for result in results)
    setup = statistics.median(result.seconds - result.loop_seconds for result in results)
    print(f"images: {args.images}, batch size {args.batch_size}, loader workers {args.num_workers}, "
          f"torch threads {torch.get_num_threads()}, rounds {args.rounds}")
    print(f"bare forward passes (resnet32x4 + ViT-B-32): {bare:7.2f} img/s  "
          f"(runs: {', '.join(f'{rate:.2f}' for rate in bare_rates)})")
    print(f"richkd precompute, block loop:               {cached:7.2f} img/s  "
          f"(runs: {', '.join(f'{result.images_per_second:.2f}' for result in results)})")
    print(f"setup before the loop (models, one prompt template x 100 classes): {setup:.1f} s")
    print(f"ratio precompute / bare forward: {cached / bare:.3f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
