"""The `webdataset` dataset: samples in webdataset tar shards, read by index.

`--data-root` is a webdataset URL pattern, expanded as webdataset expands it (brace ranges such as
`train-{000000..000127}.tar`, `::` between patterns); the text `{split}` in it becomes the split's name
first, so `shards/{split}-{000000..000009}.tar` names the shards of every split packed into 10 shards, and a
pattern without `{split}` names the shards of whichever split is asked for. Every shard it names must exist.

Each sample is the run of tar members sharing a key, as webdataset groups them: its key is `__key__`,
its class id the text of its `cls` member, its image the first member with one of webdataset's image
extensions. Class names, one per line in class-id order, come from `classes.txt` in the first shard's
folder; the normalisation, optionally, from `normalization.json` there (`{"mean": [...], "std": [...]}`;
ImageNet's otherwise). `richkd pack` writes both.

The cache needs random access (row `i` is sample `i` whatever the loader order), so the shards are indexed
once: their tar headers, each `cls` member and the first bytes of each image (its size) are read, seeking
past the image data; an image is then read by seeking to it. That needs seekable files: local paths,
`file://` and fsspec URLs that read byte ranges (`memory://`, `s3://`, `https://` ...), not `pipe:`.
With `--stream` no stage needs the index: each reads whole shards front to back (`stream_shard`), `pipe:` included;
precompute and train read them once first for their keys and labels (`scan_shards`). `pipe:` shards have no folder:
their class names come from `--class-names` (`streamed_shard_set`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import posixpath
import re
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import torch
import webdataset
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.transforms.v2 import functional as TF
from webdataset.autodecode import IMAGE_EXTENSIONS
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from richkd.pipeline.data import (
    IMAGE_DECODE_ERRORS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDataset,
    as_displayed_rgb,
    register_dataset,
    unreadable_image,
)
from richkd.pipeline.errors import UserError, preview
from richkd.pipeline.execution import progress_bar

SPLIT_PLACEHOLDER = "{split}"
CLASSES_FILE = "classes.txt"
NORMALIZATION_FILE = "normalization.json"
# Members that are no sample's, as webdataset's tar reader skips them (tar_file_iterator's `skip_meta`).
META_MEMBER = re.compile(r"__[^/]*__($|/)")
# Bytes of an image read at first to learn its size; more only when its header is longer.
IMAGE_HEADER_BYTES = 1024
# Shard files each process keeps open for reading images.
OPEN_SHARDS = 64


@dataclass
class Sample:
    key: str
    image: tarfile.TarInfo | None
    cls: tarfile.TarInfo | None


def shard_urls(pattern: str, split: str) -> list[str]:
    """The shards of `split`: `{split}` replaced, then expanded as webdataset expands URLs."""
    return expand_urls(pattern.replace(SPLIT_PLACEHOLDER, split))


@dataclass
class ShardSet:
    """The shards of one split, with the class names and normalisation stored beside them."""

    urls: list[str]
    class_names: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name = "webdataset"  # the dataset name it is read as


def pipe_command(url: str) -> bool:
    return url.startswith("pipe:")


def open_shard_set(pattern: str, split: str, recorded: dict | None = None) -> ShardSet:
    """The shards `pattern` names for `split`, all of which must exist: class names and normalisation come from the
    first shard's folder, or from `recorded` (a store's dataset record, a checkpoint's, or given), which shards
    streamed front to back may need: they may include `pipe:` commands."""
    urls = shard_urls(pattern, split)
    if recorded is None and any(pipe_command(url) for url in urls):
        raise UserError(f"--data-root {pattern}: pipe: URLs cannot be read by index; give the shards' paths "
                        "or fsspec URLs")
    files = [url for url in urls if not pipe_command(url)]
    missing = [url for url in files if not shard_exists(url)]
    if len(missing) == len(urls):
        raise UserError(f"no shards match {pattern} for split '{split}': {missing[0]} does not exist")
    if missing:
        raise UserError(f"{len(missing)} of the {len(urls)} shards of {pattern} do not exist, e.g. {missing[0]}")
    if recorded is not None:
        return ShardSet(urls, list(recorded["class_names"]), tuple(recorded["mean"]), tuple(recorded["std"]))
    fs, first = fsspec.core.url_to_fs(urls[0])
    folder, shown = posixpath.dirname(first), posixpath.dirname(urls[0])  # the latter as the user wrote it
    class_names = read_class_names(fs, posixpath.join(folder, CLASSES_FILE), posixpath.join(shown, CLASSES_FILE))
    mean, std = read_normalization(fs, posixpath.join(folder, NORMALIZATION_FILE),
                                   posixpath.join(shown, NORMALIZATION_FILE))
    return ShardSet(urls, class_names, mean, std)


def streamed_shard_set(pattern: str, split: str, class_names_file: str | None) -> ShardSet:
    """The shards `pattern` names for `split`, to be read front to back. pipe: shards have no folder to hold their
    classes.txt: their class names come from `class_names_file` (the file itself, or any copy), their
    normalisation is ImageNet's; other shards' as `open_shard_set` reads them."""
    if not any(pipe_command(url) for url in shard_urls(pattern, split)):
        return open_shard_set(pattern, split)
    if class_names_file is None:
        raise UserError("pipe: shards have no folder to hold their classes.txt: pass --class-names, a file of the "
                        "class names, one per line in class-id order")
    fs, path = fsspec.core.url_to_fs(class_names_file)
    class_names = read_class_names(fs, path, class_names_file)
    return open_shard_set(pattern, split, {"class_names": class_names, "mean": IMAGENET_MEAN, "std": IMAGENET_STD})


@register_dataset("webdataset")
def open_shards(root: Path | str, split: str, download: bool) -> ImageDataset:
    if download:
        raise UserError("dataset 'webdataset' cannot be downloaded; point --data-root at its shards")
    shard_set = open_shard_set(str(root), split)
    locations: list[tuple[int, int]] = []

    def indexed():
        for number, url in enumerate(shard_set.urls):
            with open_shard(url) as file:
                for sample, label, size in index_shard(file, url, shard_set.class_names):
                    locations.append((sample.image.offset_data, sample.image.size))
                    yield number, sample.key, label, size

    dataset = split_of_shards(shard_set, split, indexed())
    offsets, sizes = np.asarray(locations, np.int64).reshape(-1, 2).T
    shards = np.repeat(np.arange(len(shard_set.urls), dtype=np.int32), dataset.shard_sizes)
    return dataclasses.replace(dataset, load=ShardImages(shard_set.urls, dataset.keys, shards, offsets, sizes))


def shard_starts(shard_sizes: list[int]) -> np.ndarray:
    """The first sample index of each shard, then the number of samples."""
    return np.concatenate([[0], np.cumsum(shard_sizes, dtype=np.int64)])


def scan_shards(shard_set: ShardSet, split: str) -> ImageDataset:
    """The split of `shard_set`, its keys, labels and shard sizes learnt by reading every shard front to back once
    (`pipe:` commands too); its images are then only streamed (`load` is None)."""
    def scanned():
        with progress_bar("shard") as progress:
            for number, url in enumerate(progress.track(shard_set.urls, description=f"reading {split}'s shards")):
                for key, label, encoded in stream_shard(url, len(shard_set.class_names)):
                    yield number, key, label, encoded_image_size(encoded, f"{key} in {url}")

    return split_of_shards(shard_set, split, scanned())


def split_of_shards(shard_set: ShardSet, split: str, samples: Iterator[tuple[int, str, int, tuple[int, int]]]
                    ) -> ImageDataset:
    """The split whose (shard number, key, class id, image (width, height)) are `samples`, in order; every key
    once. Its images are not readable until `load` is set."""
    labels, keys, shards, image_sizes = [], [], [], set()
    shard_of: dict[str, str] = {}
    for number, key, label, size in samples:
        url = shard_set.urls[number]
        if key in shard_of:
            raise UserError(f"sample key '{key}' occurs twice: in {shard_of[key]} and in {url}")
        shard_of[key] = url
        keys.append(key)
        labels.append(label)
        shards.append(number)
        image_sizes.add(size)
    native_size = None
    if len(image_sizes) == 1:  # every image has one size: the native size if it is square
        width, height = image_sizes.pop()
        native_size = width if width == height else None
    return ImageDataset(
        name=shard_set.name,
        split=split,
        class_names=shard_set.class_names,
        labels=np.asarray(labels, dtype=np.int64),
        keys=keys,
        mean=shard_set.mean,
        std=shard_set.std,
        native_size=native_size,
        load=None,
        shard_sizes=np.bincount(np.asarray(shards, np.int64), minlength=len(shard_set.urls)).tolist(),
    )


def shard_exists(url: str) -> bool:
    try:
        fs, path = fsspec.core.url_to_fs(url)
        return fs.exists(path)
    except (ValueError, ImportError) as error:  # an unknown protocol, or its package not installed
        raise UserError(f"cannot read shard {url}: {error}") from error


def open_shard(url: str):
    try:
        return fsspec.open(url, "rb").open()
    except OSError as error:
        raise UserError(f"cannot read shard {url}: {error}") from error


def read_class_names(fs: fsspec.AbstractFileSystem, path: str, shown: str) -> list[str]:
    """Non-empty lines of the class names file, in class-id order."""
    try:
        with fs.open(path, "r", encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError as error:
        raise UserError(f"no class names for the shards: {shown} does not exist (one class name per line, in "
                        "class-id order; `richkd pack` writes it)") from error
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise UserError(f"class names file {shown} is empty: one class name per line, in class-id order")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UserError(f"class names file {shown} names {preview(repeated)} more than once: each class once")
    return names


def read_normalization(fs: fsspec.AbstractFileSystem, path: str, shown: str) -> tuple[tuple[float, ...], ...]:
    """Per-channel mean and std from the normalisation file, ImageNet's when there is none."""
    try:
        with fs.open(path, "r", encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        return IMAGENET_MEAN, IMAGENET_STD
    try:
        stats = json.loads(text)
        mean, std = (tuple(float(value) for value in stats[name]) for name in ("mean", "std"))
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("need 3 values each")
    except (ValueError, TypeError, KeyError) as error:
        raise UserError(f"normalization file {shown} must hold "
                        f'{{"mean": [r, g, b], "std": [r, g, b]}}: {error}') from error
    return mean, std


def index_shard(file, url: str, class_names: list[str]):
    """(sample, class id, image (width, height)) of each sample of one shard, in tar order."""
    try:
        samples = group_members(tarfile.open(fileobj=file, mode="r:"), url)
    except tarfile.TarError as error:
        raise UserError(f"cannot read shard {url}: {error}") from error
    for sample in samples:
        for member, field in ((sample.image, "image member (.png, .jpg, .webp, ...)"), (sample.cls, "cls member")):
            if member is None:
                raise UserError(f"sample '{sample.key}' in {url} has no {field}")
        file.seek(sample.cls.offset_data)
        label = class_id(file.read(sample.cls.size), len(class_names), f"sample '{sample.key}' in {url}")
        yield sample, label, image_size(file, sample.image, f"{sample.key} in {url}")


def class_id(cls: bytes, num_classes: int, sample: str) -> int:
    """The class id a `cls` member holds, which must be one of the class names'."""
    text = cls.decode("utf-8", "replace").strip()
    if not (re.fullmatch(r"[0-9]+", text) and int(text) < num_classes):
        raise UserError(f"{sample}: cls '{text}' is not a class id of its "
                        f"{num_classes} class names (0 to {num_classes - 1})")
    return int(text)


def stream_shard(url: str, num_classes: int) -> Iterator[tuple[str, int, bytes]]:
    """(key, class id, encoded image) of each sample of one shard, reading it once front to back; `url` may
    also be a `pipe:` command, opened as webdataset opens it."""
    try:
        stream = webdataset.gopen(url) if pipe_command(url) else open_shard(url)
        with stream:
            for key, fields in streamed_samples(tarfile.open(fileobj=stream, mode="r|*"), url):
                image = next((name for name in fields if name in IMAGE_EXTENSIONS), None)
                for present, field in ((image, "image member (.png, .jpg, .webp, ...)"),
                                       ("cls" in fields, "cls member")):
                    if not present:
                        raise UserError(f"sample '{key}' in {url} has no {field}")
                yield key, class_id(fields["cls"], num_classes, f"sample '{key}' in {url}"), fields[image]
    except UserError:
        raise
    except (tarfile.TarError, OSError, EOFError) as error:  # the tar reader's, or the stream's (a pipe's exit too)
        raise UserError(f"cannot read shard {url}: {stream_failure(error)}") from error


def stream_failure(error: Exception) -> str:
    """What went wrong reading a shard, without the stream object and URL webdataset appends to errors."""
    text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    exit_status = re.search(r": exit (-?\d+) \(read\)", text)  # how webdataset reports a failed pipe: command
    return f"the command exited with status {exit_status[1]}" if exit_status else text


def sample_members(tar: tarfile.TarFile, url: str) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """(key, lower-case extension, member) of each member that is part of a sample, in tar order.

    A tar cut short where one member ends reads as a shorter tar that ends without its end-of-archive block
    (512 zero bytes, which every tar writer adds); that is refused once the last member has been read."""
    for member in tar:
        if not member.isreg() or META_MEMBER.match(member.name):
            continue
        key, extension = base_plus_ext(member.name)
        if key is not None:
            yield key, extension.lower(), member
    # tarfile stops at the end-of-archive block having read it, and at the end of the data having read less.
    if tar.fileobj.tell() != tar.offset + tarfile.BLOCKSIZE:
        raise UserError(f"shard {url} ends after {tar.offset:,} bytes without tar's end-of-archive block: it was "
                        "cut short (by a copy or download that did not finish?); write or copy it again")


def streamed_samples(tar: tarfile.TarFile, url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: data}) of each sample of a tar read front to back, grouped as `group_members` does."""
    key, fields = None, {}
    for member_key, extension, member in sample_members(tar, url):
        if fields and (member_key != key or extension in fields):
            yield key, fields
            fields = {}
        key = member_key
        fields[extension] = tar.extractfile(member).read()
    if fields:
        yield key, fields


def group_members(tar: tarfile.TarFile, url: str) -> list[Sample]:
    """Consecutive members sharing a key make a sample, as webdataset groups them; reads headers only."""
    samples: list[Sample] = []
    fields: dict[str, tarfile.TarInfo] = {}
    for key, extension, member in sample_members(tar, url):
        if not samples or samples[-1].key != key or extension in fields:
            samples.append(Sample(key, None, None))
            fields = {}
        fields[extension] = member
        if extension == "cls":
            samples[-1].cls = member
        elif extension in IMAGE_EXTENSIONS and samples[-1].image is None:
            samples[-1].image = member
    return samples


def image_size(file, member: tarfile.TarInfo, name: str) -> tuple[int, int]:
    """(width, height) from the image's first bytes (all of them only when its header needs it)."""
    length = min(member.size, IMAGE_HEADER_BYTES)
    while True:
        file.seek(member.offset_data)
        try:
            return encoded_image_size(file.read(length), name, complete=length == member.size)
        except HeaderCutShort:
            length = min(member.size, length * 16)


class HeaderCutShort(Exception):
    """The first bytes of an image do not hold its whole header."""


def encoded_image_size(encoded: bytes, name: str, complete: bool = True) -> tuple[int, int]:
    """(width, height) of an encoded image, from its header; `complete`: `encoded` is the whole image, so that
    a header it cannot be read from is broken, not cut short."""
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            return image.size
    except IMAGE_DECODE_ERRORS as error:  # a header cut short fails in format-specific ways
        if not complete:
            raise HeaderCutShort from error
        raise unreadable_image(name, error) from error


# This process's open shard files, most recently used last; a forked loader worker starts without them.
_open_shards: OrderedDict[str, object] = OrderedDict()
os.register_at_fork(after_in_child=_open_shards.clear)


def shard_file(url: str):
    """The shard, kept open for reading images from it."""
    if url in _open_shards:
        _open_shards.move_to_end(url)
    else:
        if len(_open_shards) >= OPEN_SHARDS:
            _open_shards.popitem(last=False)[1].close()
        _open_shards[url] = open_shard(url)
    return _open_shards[url]


@dataclass
class ShardImages:
    """Index -> CHW uint8 tensor: seek to the sample's image in its shard and decode it (picklable)."""

    urls: list[str]
    keys: list[str]
    shards: np.ndarray  # the shard of each sample, an index into urls
    offsets: np.ndarray  # where its image member's data starts
    sizes: np.ndarray  # and its length in bytes

    def encoded(self, index: int) -> bytes:
        file = shard_file(self.urls[self.shards[index]])
        file.seek(int(self.offsets[index]))
        return file.read(int(self.sizes[index]))

    def __call__(self, index: int) -> torch.Tensor:
        return decode_image(self.encoded(index), f"{self.keys[index]} in {self.urls[self.shards[index]]}")


class CenterViewStream(IterableDataset):
    """A split's shards read front to back for evaluation: (centre view, class id, 0) of each sample, once;
    loader workers split the shards."""

    def __init__(self, shards: ShardSet, policy):
        super().__init__()
        self.shards, self.policy = shards, policy

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for url in self.shards.urls[worker::workers]:
            for key, label, encoded in stream_shard(url, len(self.shards.class_names)):
                yield self.policy.center(decode_image(encoded, f"{key} in {url}")), label, 0


def decode_image(encoded: bytes, name: str) -> torch.Tensor:
    """An encoded image as a CHW uint8 RGB tensor, shown as as_displayed_rgb shows an image file."""
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            return TF.pil_to_tensor(as_displayed_rgb(image))
    except IMAGE_DECODE_ERRORS as error:
        raise unreadable_image(name, error) from error
