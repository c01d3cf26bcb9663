"""The data path alone, per core: precompute's views per second before and after decoding each image once, and
distill's against label-only training's.

An image folder of JPEGs of ImageNet's most common size, 500 x 375 (or --width/--height), whose content (smooth
random colour fields with a grain of noise, quality 90) makes files of about ImageNet's average 110 KB, and 8 views
of `RandomResizedCrop(224)` + flip: the teacher and CLIP are left out (a null model), so only decoding, cutting the
views and stacking them are timed, on one thread, in this process. Decoded images are not kept (as at ImageNet
size, where they overflow the 256 MiB a process keeps), so every decode is paid.

- before: what precompute did until it decoded once, re-enacted: one item per (view, sample), each decoding its
  image and replaying that view;
- after: precompute's `SampleViews`, every view of a sample from one decode;
- distill: `LabelledViews` replaying a stored view of each sample (one view an epoch), and label-only training's,
  drawing a fresh view.

    python benchmarks/precompute_views.py [--images 512] [--views 8] [--width 500 --height 375] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import richkd.pipeline.data as data
from richkd.pipeline.data import open_image_folder
from richkd.pipeline.loading import LabelledViews
from richkd.pipeline.views import image_for_views, make_view_policy, sample_view
from richkd.stages.precompute import SampleViews

CLASSES = 4


def write_jpegs(root: Path, images: int, width: int, height: int) -> float:
    """Colour fields upsampled 8x with Gaussian grain (sd 16), a class folder each quarter; their mean size in KB."""
    rng = np.random.default_rng(0)
    paths = []
    for index in range(images):
        coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
        grain = np.clip(smooth + rng.normal(0, 16, smooth.shape), 0, 255).astype(np.uint8)
        folder = root / "train" / f"class_{index % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(folder / f"{index:05d}.jpg")
        Image.fromarray(grain).save(paths[-1], quality=90)
    return float(np.mean([path.stat().st_size for path in paths])) / 1024


def views_per_second(items, count: int, repeats: int) -> float:
    """`count` views over the seconds it takes to produce every item of `items()`: the median of `repeats` runs."""
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in items():
            pass
        rates.append(count / (time.perf_counter() - started))
    return float(np.median(rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each path; the median is printed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data.DECODED_IMAGES_BYTES = 0  # every decode is paid, as at ImageNet size
    with tempfile.TemporaryDirectory() as folder:
        kilobytes = write_jpegs(Path(folder), args.images, args.width, args.height)
        dataset = open_image_folder(Path(folder), "train")
        policy = make_view_policy("resized_crop", dataset.native_size, None)
        samples, views = range(len(dataset)), range(args.views)

        def per_view_items():
            for view in views:
                for index in samples:
                    image = image_for_views(dataset, policy, index)
                    yield policy.replay(image, sample_view(policy, 0, view, index, image))

        total, repeats = args.views * len(dataset), args.repeats
        before = views_per_second(per_view_items, total, repeats)
        decode_once = SampleViews(dataset, policy, 0, args.views)
        after = views_per_second(lambda: (decode_once[index] for index in samples), total, repeats)
        stored = LabelledViews(dataset, policy, np.stack([sample_view(policy, 0, 0, index, dataset.image(index))
                                                          for index in samples]))
        fresh = LabelledViews(dataset, policy, seed=0, stream=1)
        distill = views_per_second(lambda: (stored[index] for index in samples), len(dataset), repeats)
        label_only = views_per_second(lambda: (fresh[index] for index in samples), len(dataset), repeats)
    print(f"{len(dataset)} JPEGs of {args.width} x {args.height} ({kilobytes:.0f} KB on average), {args.views} views "
          f"({policy.name} to {policy.size} px), one thread, the median of {args.repeats} runs")
    print("| data path | views/s per core |\n|---|---:|")
    print(f"| precompute before: one decode per view | {before:,.0f} |")
    print(f"| precompute after: one decode per sample | {after:,.0f} |")
    print(f"| distill: a stored view replayed | {distill:,.0f} |")
    print(f"| label-only training: a fresh view | {label_only:,.0f} |")
    print(f"\ndecode-once ratio: {after / before:.2f}x; distill against label-only: {distill / label_only:.2f}x")


if __name__ == "__main__":
    main()
