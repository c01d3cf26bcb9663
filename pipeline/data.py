"""Datasets: each split gives its labels, sample keys and class names up front, and original images by index.

The registry of dataset names is filled here (CIFAR, image folders), by `demo` and by `shards`;
`datasets.open_dataset` opens one by name.

Row `i` of every per-sample array in the cache is dataset index `i`; `keys[i]` is the sample's own key
(a file path relative to the split's root, or the index for array-backed datasets).
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image, ImageOps
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.v2 import functional as TF

from richkd.pipeline.errors import UserError, read_json

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageDataset:
    """One split of a dataset, indexable without decoding any image."""

    name: str
    split: str
    class_names: list[str]
    labels: np.ndarray
    keys: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # Side of the (square) images when every image has it (for an image folder: every image of a sample), else None.
    native_size: int | None
    # Index -> image; None for shards read only front to back (`--stream`).
    load: Callable[[int], torch.Tensor] | None
    # Samples of each tar shard, in order, for data read from shards (whose readers check them).
    shard_sizes: list[int] | None = None
    # False for images without classes (the demo's captioned pool, whose one folder stands for none).
    labelled: bool = True

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> torch.Tensor:
        """The original image as a uint8 (3, H, W) tensor."""
        return self.load(index)

    def fingerprint(self) -> str:
        """sha256 over labels and keys: what a cache built from this split must match."""
        digest = hashlib.sha256(np.ascontiguousarray(self.labels, dtype="<i8").tobytes())
        digest.update("\n".join(self.keys).encode())
        return digest.hexdigest()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "split": self.split,
            "num_samples": len(self),
            "class_names": list(self.class_names),
            "fingerprint": self.fingerprint(),
            "mean": list(self.mean),
            "std": list(self.std),
            # The side views are cut from: a store's stored crops fit only images of that side.
            "image_size": self.native_size,
            **({"shard_sizes": list(self.shard_sizes)} if self.shard_sizes is not None else {}),
        }


def require_labelled(dataset: ImageDataset, flag: str) -> None:
    """Refuse a split without classes, named by `flag`, where classes are learnt or scored: its one placeholder
    class would train a one-class model, or score every image as that class."""
    if not dataset.labelled:
        raise UserError(f"{flag} {dataset.split}: the {dataset.name}'s {dataset.split} split is unlabelled images "
                        "with captions, for train-clip --split: it has no classes to learn or score; use a labelled "
                        "split")


DATASETS: dict[str, Callable[[Path, str, bool], ImageDataset]] = {}


def register_dataset(name: str):
    def register(build: Callable[[Path, str, bool], ImageDataset]):
        DATASETS[name] = build
        return build

    return register


def _check_split(split: str, splits: tuple[str, ...], name: str) -> None:
    if split not in splits:
        raise UserError(f"dataset '{name}' has no split '{split}'; splits: {', '.join(splits)}")


def _local_cifar(base: type[torchvision.datasets.CIFAR10]) -> type[torchvision.datasets.CIFAR10]:
    """torchvision's CIFAR reader, checking that the batch files exist rather than their md5.

    A download still verifies the archive's md5; locally prepared files (subsets, tests) load as they are.
    """
    return type(
        f"Local{base.__name__}",
        (base,),
        {
            "train_list": [[name, None] for name, _ in base.train_list],
            "test_list": [[name, None] for name, _ in base.test_list],
            "meta": {**base.meta, "md5": None},
        },
    )


def _cifar(name: str, base: type, mean, std) -> None:
    reader = _local_cifar(base)

    @register_dataset(name)
    def build(root: Path, split: str, download: bool) -> ImageDataset:
        _check_split(split, ("train", "test"), name)
        try:
            cifar = reader(str(root), train=split == "train", download=download)
        except RuntimeError as error:
            raise UserError(
                f"no {name} data under {root} (expected {root / base.base_folder}/); pass --download to fetch it"
            ) from error
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as error:  # truncated or foreign files
            raise UserError(f"cannot read {name} data under {root / base.base_folder}: {error}") from error
        images, labels = cifar.data, np.asarray(cifar.targets, dtype=np.int64)
        out_of_range = np.flatnonzero((labels < 0) | (labels >= len(cifar.classes)))
        if out_of_range.size:  # a label past the classes would fail as an index only later, or be scored wrong
            batches = reader.train_list if split == "train" else reader.test_list
            path, row = cifar_file_row([root / base.base_folder / file for file, _ in batches], int(out_of_range[0]))
            raise UserError(f"{path}: sample {row} has label {labels[out_of_range[0]]}, not a class id of the "
                            f"{len(cifar.classes)} {name} classes (0 to {len(cifar.classes) - 1})")
        return ImageDataset(
            name=name,
            split=split,
            class_names=list(cifar.classes),
            labels=labels,
            keys=[str(i) for i in range(len(images))],
            mean=mean,
            std=std,
            native_size=32,
            load=CifarImages(images),
        )


def cifar_file_row(files: list[Path], index: int) -> tuple[Path, int]:
    """The one of a split's CIFAR batch files that holds sample `index` of the split, and its row there."""
    rows = []
    for path in files:
        with open(path, "rb") as file:
            rows.append(len(pickle.load(file, encoding="latin1")["data"]))
    starts = np.cumsum([0, *rows])
    holding = int(np.searchsorted(starts, index, side="right")) - 1
    return files[holding], index - int(starts[holding])


@dataclass
class CifarImages:
    """Index -> CHW uint8 tensor over CIFAR's in-memory HWC array (picklable for loader workers)."""

    images: np.ndarray

    def __call__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.images[index]).permute(2, 0, 1).contiguous()


_cifar("cifar10", torchvision.datasets.CIFAR10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_cifar("cifar100", torchvision.datasets.CIFAR100, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))


# What decoding a damaged or foreign image raises: PIL's errors (UnidentifiedImageError is an OSError; truncated
# or malformed files also raise SyntaxError, ValueError or struct.error) and its guard against decompression bombs.
IMAGE_DECODE_ERRORS = (OSError, SyntaxError, ValueError, struct.error, Image.DecompressionBombError)


def unreadable_image(name: str, error: Exception) -> UserError:
    """The one-line error for image `name` (its path, or its key and shard), which raised `error` decoding."""
    if isinstance(error, Image.DecompressionBombError):  # PIL's own message blames an attack, not the image's size
        return UserError(f"cannot read image {name}: it has more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels, "
                         "PIL's decompression-bomb limit; resize it")
    return UserError(f"cannot read image {name}: {error}")

# PIL modes of 16-bit single-channel images (16-bit PNGs open as I;16), which converting to RGB would clip at 255.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def as_displayed_rgb(image: Image.Image) -> Image.Image:
    """An opened image as 8-bit RGB the way viewers show it: turned by its EXIF orientation (a photo stored on its
    side is shown, and so learnt, upright, and its size is the one a user sees), 16-bit grey levels scaled to
    8 bits, not clipped."""
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(image, dtype=np.float64) / 257
        return Image.fromarray(np.round(grey).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """An image file as as_displayed_rgb shows it."""
    with Image.open(path) as image:
        return as_displayed_rgb(image)


# Decoded images each process keeps, so that a small dataset is decoded once, not once an epoch.
DECODED_IMAGES_BYTES = 256 * 2**20


@dataclass
class FolderImages:
    """Index -> CHW uint8 tensor, decoding the file with `loader`; the first DECODED_IMAGES_BYTES of decoded
    images are kept in memory."""

    paths: list[str]
    loader: Callable
    decoded: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    decoded_bytes: int = 0

    def __call__(self, index: int) -> torch.Tensor:
        if index in self.decoded:
            return self.decoded[index]
        path = self.paths[index]
        try:
            image = TF.pil_to_tensor(self.loader(path))
        except IMAGE_DECODE_ERRORS as error:
            raise unreadable_image(path, error) from error
        if self.decoded_bytes + image.numel() <= DECODED_IMAGES_BYTES:
            self.decoded[index] = image
            self.decoded_bytes += image.numel()
        return image


@register_dataset("imagefolder")
def _imagefolder(root: Path, split: str, download: bool) -> ImageDataset:
    if download:
        raise UserError("dataset 'imagefolder' cannot be downloaded; point --data-root at the folder")
    return open_image_folder(root, split)


def open_image_folder(root: Path, split: str) -> ImageDataset:
    """`root/<split>/<class>/<image>`: class names are the folder names, in sorted order."""
    folder = root / split
    if not folder.is_dir():
        raise UserError(f"no split folder {folder} (an image folder dataset is <root>/<split>/<class>/<image>)")
    try:
        # A class folder may be empty in one split; the class list stays that of the folders.
        images = torchvision.datasets.ImageFolder(str(folder), allow_empty=True)
    except FileNotFoundError as error:
        raise UserError(f"no class folders under {folder}: {error}") from error
    paths = [path for path, _ in images.samples]
    if not paths:
        raise UserError(f"no images under {folder} (supported: {', '.join(IMG_EXTENSIONS)})")
    native_size = sampled_native_size(paths)
    return ImageDataset(
        name="imagefolder",
        split=split,
        class_names=list(images.classes),
        labels=np.asarray(images.targets, dtype=np.int64),
        keys=[Path(path).relative_to(folder).as_posix() for path in paths],
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        native_size=native_size,
        load=FolderImages(paths, load_rgb),
    )


# Images whose sizes are read (from their headers, without decoding) to find a folder's native size.
NATIVE_SIZE_SAMPLE = 32


def sampled_native_size(paths: list[str]) -> int | None:
    """The side of the images when NATIVE_SIZE_SAMPLE of them, evenly spaced, are all square and of one side (as
    stored: turning an image by its EXIF orientation keeps a square's side)."""
    picked = paths[::max(1, len(paths) // NATIVE_SIZE_SAMPLE)][:NATIVE_SIZE_SAMPLE]
    sizes = set()
    for path in picked:
        try:
            with Image.open(path) as image:
                sizes.add(image.size)
        except IMAGE_DECODE_ERRORS as error:
            raise unreadable_image(path, error) from error
    (width, height), *others = sizes
    return width if not others and width == height else None


def write_cifar(root: str | Path, name: str, splits: dict[str, tuple[np.ndarray, np.ndarray]],
                class_names: list[str]) -> None:
    """Write images in torchvision's on-disk CIFAR format (python pickles), e.g. a subset or a synthetic set.

    `splits` maps "train"/"test" to (uint8 images (N, 32, 32, 3), int labels (N,)).
    """
    base = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    folder = Path(root) / base.base_folder
    folder.mkdir(parents=True, exist_ok=True)
    label_key = "fine_labels" if name == "cifar100" else "labels"
    files = {"train": base.train_list, "test": base.test_list}
    for split, (images, labels) in splits.items():
        rows = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), int(np.prod(images.shape[1:])))
        parts = np.array_split(np.arange(len(images)), len(files[split]))  # CIFAR-10 has 5 train batches
        for (filename, _), part in zip(files[split], parts):
            batch = {"data": rows[part], label_key: [int(labels[i]) for i in part]}
            with open(folder / filename, "wb") as f:
                pickle.dump(batch, f)
    with open(folder / base.meta["filename"], "wb") as f:
        pickle.dump({base.meta["key"]: list(class_names)}, f)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float, scaled to [0, 1] and standardised per channel."""
    return TF.normalize(images.float().div_(255), list(mean), list(std))


def read_captions(path: str | Path, keys: list[str]) -> list[str]:
    """One caption per sample from a JSON file mapping each sample key to its caption."""
    captions = read_json(path, "captions file")
    if not isinstance(captions, dict):
        raise UserError(f"captions file {path} must map each sample key to its caption, "
                        f"found {type(captions).__name__}")
    missing = [key for key in keys if key not in captions]
    if missing:
        raise UserError(f"captions file {path} has no caption for {len(missing)} samples (e.g. {missing[0]})")
    not_text = [key for key in keys if not isinstance(captions[key], str)]
    if not_text:
        raise UserError(f"captions file {path}: {len(not_text)} captions are not text (e.g. {not_text[0]}: "
                        f"{captions[not_text[0]]!r})")
    return [captions[key] for key in keys]
