"""`richkd pack`: write a split of any dataset richkd reads into webdataset tar shards, the same bytes on every run.

The shards are `<out>/<split>-000000.tar`, `<out>/<split>-000001.tar`, ... with `--samples-per-shard` samples
each, in dataset order, so the `webdataset` dataset reads them back in the same order. A sample is
`<key>.cls` (the class id) and `<key>.png`, or with `--format original` the image file's own bytes under its
own extension. Beside the shards go `classes.txt` (the class names, one per line in class-id order) and
`normalization.json` (the dataset's per-channel mean and std), which the `webdataset` dataset reads.

Keys: webdataset splits a member name at the first dot of its file name, so the dataset's key has `%` written
as `%25` and `.` as `%2E` (`cat/0001.png` -> `cat/0001%2Epng`; CIFAR's `17` stays `17`): distinct keys stay
distinct.

Reproducible: members in a fixed order, every tar header field fixed (mtime 0, uid and gid 0, user and group
`richkd`, mode 0444), PNGs encoded by Pillow with its fixed defaults. webdataset's TarWriter sets those fields
as told; its ShardWriter is not used because shards are written under temporary names and renamed only once
all are complete (an interrupted run leaves no `.tar` behind), which it has no hook for.
"""

from __future__ import annotations

import io
import json
import math
import posixpath
from pathlib import Path

import fsspec
from PIL import Image
from webdataset import TarWriter

from richkd.pipeline.data import FolderImages, ImageDataset
from richkd.pipeline.datasets import open_dataset
from richkd.pipeline.errors import UserError
from richkd.pipeline.execution import progress_bar
from richkd.pipeline.runtime import console
from richkd.pipeline.shards import CLASSES_FILE, NORMALIZATION_FILE
from richkd.stages.options import PackConfig

PARTIAL = ".partial"


def shard_key(key: str) -> str:
    """The webdataset key of a dataset key: no dots, and distinct keys stay distinct."""
    return key.replace("%", "%25").replace(".", "%2E")


def encoded_image(dataset: ImageDataset, index: int, image_format: str) -> tuple[str, bytes]:
    """(extension, bytes) of the sample's image member."""
    if image_format == "original":
        path = Path(dataset.load.paths[index])
        return path.suffix[1:].lower(), path.read_bytes()
    buffer = io.BytesIO()
    Image.fromarray(dataset.image(index).permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return "png", buffer.getvalue()


def write_shard(fs: fsspec.AbstractFileSystem, path: str, dataset: ImageDataset, indices: range,
                image_format: str, advance) -> None:
    with fs.open(path, "wb") as file, TarWriter(file, user="richkd", group="richkd", mode=0o444, mtime=0,
                                                encoder=False) as writer:
        for index in indices:
            extension, data = encoded_image(dataset, index, image_format)
            writer.write({"__key__": shard_key(dataset.keys[index]), "cls": str(int(dataset.labels[index])).encode(),
                          extension: data})
            advance()


def run(config: PackConfig) -> dict:
    dataset = open_dataset(config.dataset, config.data_root, config.split, config.download)
    if config.format == "original" and not isinstance(dataset.load, FolderImages):
        raise UserError(f"--format original copies image files, and dataset '{config.dataset}' is not made of "
                        "image files; use --format png")
    fs, folder = fsspec.core.url_to_fs(config.out)
    side_files = {
        CLASSES_FILE: "".join(f"{name}\n" for name in dataset.class_names),
        NORMALIZATION_FILE: json.dumps({"mean": list(dataset.mean), "std": list(dataset.std)}) + "\n",
    }
    for name, text in side_files.items():
        path = posixpath.join(folder, name)
        if not config.overwrite and fs.exists(path) and fs.cat_file(path).decode() != text:
            raise UserError(f"{config.out} holds the {name} of another dataset than {config.dataset}; pack into "
                            "another folder, or pass --overwrite")
    existing = sorted(fs.glob(posixpath.join(folder, f"{config.split}-*.tar")))
    if existing and not config.overwrite:
        raise UserError(f"{config.out} already holds shards of split '{config.split}' "
                        f"({posixpath.basename(existing[0])}, ...); pass --overwrite to replace them")

    fs.makedirs(folder, exist_ok=True)
    for path in fs.glob(posixpath.join(folder, f"{config.split}-*.tar{PARTIAL}")):  # left by an interrupted run
        fs.rm(path)
    count = math.ceil(len(dataset) / config.samples_per_shard)
    paths = [posixpath.join(folder, f"{config.split}-{shard:06d}.tar") for shard in range(count)]
    with progress_bar("img") as progress:
        task = progress.add_task(f"pack {config.split}", total=len(dataset))
        for shard, path in enumerate(paths):
            indices = range(shard * config.samples_per_shard, min(len(dataset), (shard + 1) * config.samples_per_shard))
            write_shard(fs, path + PARTIAL, dataset, indices, config.format, lambda: progress.advance(task))
    for path in existing:
        fs.rm(path)
    for path in paths:
        fs.mv(path + PARTIAL, path)
    for name, text in side_files.items():
        fs.pipe_file(posixpath.join(folder, name), text.encode())

    data_root = f"{config.out.rstrip('/')}/{config.split}-{{000000..{count - 1:06d}}}.tar"
    console.print(f"packed {len(dataset)} samples into {count} shard{'s' * (count > 1)}: read them with --dataset "
                  f"webdataset --data-root '{data_root}'", soft_wrap=True, markup=False)
    return {"out": config.out, "split": config.split, "samples": len(dataset), "shards": count,
            "data_root": data_root}
