"""Stage configuration: one dataclass per stage, filled from defaults, a params file and CLI flags.

Each field carries its CLI help text in its metadata, so the dataclass is the single description
of a stage's options: the CLI builds its flags from it and `params.yaml` sections are checked
against it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import yaml

from richkd.pipeline.errors import UserError, read_text
from richkd.pipeline.runtime import DEVICE_CHOICES


class DemoPreset(NamedTuple):
    """A preset of `richkd demo` as its options name it: what it shows, and its splits with labels."""

    description: str
    labelled_splits: tuple[str, ...]


# The names the options accept, kept here so that neither help texts nor the checks of options import the code
# behind them (torch, torchvision): `richkd --help` answers at once.
DATASET_NAMES = ("cifar10", "cifar100", "imagefolder", "demo", "webdataset")
AUGMENTS = ("none", "randaugment", "trivialaugment", "autoaugment")
MIXES = ("none", "mixup", "cutmix", "both")
# Confidence at or above which a prediction counts as confident (evaluate's and report's default).
CONFIDENCE_THRESHOLD = 0.9
# The demo's image side, and its presets (`richkd.pipeline.demo` draws them): what each shows, and its labelled
# splits (the captioned pool is every preset's).
DEMO_SIDE = 16
DEMO_PRESETS = {
    "shapes": DemoPreset("eight kinds of object, the class in the shape alone", ("train", "test")),
    "study": DemoPreset("24 patterned shapes in superclasses by shape; a test split in colours the labels never show",
                        ("train", "test", "shifted")),
}

Config = TypeVar("Config")


def option(default: Any, help: str, panel: str | None = None) -> Any:
    """A config field with its CLI help text and the `--help` section it is listed in."""
    metadata = {"help": help, "panel": panel}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_default(field: dataclasses.Field) -> Any:
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def field_type(config_class: type, name: str) -> type:
    """The plain type of a field: `int | None` gives `int`."""
    return _type_and_optional(config_class, name)[0]


def accepts_none(config_class: type, name: str) -> bool:
    """Whether the field may be None (`int | None`)."""
    return _type_and_optional(config_class, name)[1]


@functools.cache
def type_hints(config_class: type) -> dict[str, Any]:
    """The fields' types, evaluated once a class (each evaluation compiles every annotation of the class)."""
    return typing.get_type_hints(config_class)


def _type_and_optional(config_class: type, name: str) -> tuple[type, bool]:
    hint = type_hints(config_class)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(arg for arg in typing.get_args(hint) if arg is not type(None)), type(None) in typing.get_args(hint)
    return hint, False


def read_params_section(path: str | Path, section: str) -> dict[str, Any]:
    """The `section:` mapping of a YAML params file (empty when the section is)."""
    text = read_text(path, "params file")
    try:
        params = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise UserError(f"params file {path} is not valid YAML{line}: {getattr(error, 'problem', error)}") from error
    if not isinstance(params, dict):
        raise UserError(f"params file {path} must be a mapping of stage sections, found {type(params).__name__}")
    if section not in params:  # a misspelt section would otherwise leave every option at its default unseen
        found = ", ".join(f"'{name}'" for name in params) or "none: the file is empty"
        raise UserError(f"params file {path} has no '{section}:' section (sections: {found})")
    values = params[section] or {}
    if not isinstance(values, dict):
        raise UserError(f"params file {path}: section '{section}' must be a mapping, found {type(values).__name__}")
    return values


def coerce(config_class: type, name: str, value: Any, source: str) -> Any:
    """Check a params-file value against the field's type (YAML already parsed numbers and booleans)."""
    wanted = field_type(config_class, name)
    if value is None:
        if not accepts_none(config_class, name):
            raise UserError(f"{source}: '{name}' must be {wanted.__name__}, got null (leave the field out for "
                            "its default)")
        return None
    if typing.get_origin(wanted) is list:
        if isinstance(value, str):  # one name, as the flag given once
            return [value]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise UserError(f"{source}: '{name}' must be a list of names, got {value!r}")
        return value
    if wanted is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if wanted is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text
        try:
            return float(value)
        except ValueError:
            pass
    if wanted is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
        raise UserError(f"{source}: '{name}' must be {wanted.__name__}, got {value!r}")
    return value


def build_config(
    config_class: type[Config],
    section: str,
    params_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Defaults, then the params file's `section`, then `overrides` (the flags the user gave)."""
    names = {f.name for f in dataclasses.fields(config_class)}
    values: dict[str, Any] = {}
    if params_path is not None:
        source = f"{params_path} [{section}]"
        for name, value in read_params_section(params_path, section).items():
            if name not in names:
                raise UserError(f"{source}: unknown field '{name}'; fields are: {', '.join(sorted(names))}")
            values[name] = coerce(config_class, name, value, source)
    values.update(overrides or {})
    config = config_class(**values)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    # A stage's outputs: checked before any work, so nothing computed is lost to a path that cannot be written.
    for name, directory in OUTPUT_FIELDS.items():
        if isinstance(getattr(config, name, None), str):
            require_writable(getattr(config, name), f"--{name}", directory)
    return config


# The fields that name where a stage writes: a directory (--out) or a file (--output).
OUTPUT_FIELDS = {"out": True, "output": False}


def require_writable(path: str, flag: str, directory: bool) -> None:
    """A user error unless `path` (a local path; URLs are left to their store) can be written as a directory
    or a file: an existing one of the other kind, or a missing one whose nearest ancestor is not a writable
    directory, is refused."""
    if "://" in path:
        return
    target = Path(path)
    if target.exists():
        if directory != target.is_dir():
            raise UserError(f"{flag} {path} is {'a file' if directory else 'a directory'}: it must name "
                            f"{'a directory' if directory else 'a file'}")
        if not os.access(target, os.W_OK):
            raise UserError(f"{flag} {path} is not writable")
        return
    ancestor = next(parent for parent in target.absolute().parents if parent.exists())
    if not ancestor.is_dir():
        raise UserError(f"{flag} {path} cannot be created: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path} cannot be created: {ancestor} is not writable")


def to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain JSON/YAML-ready data."""
    return dataclasses.asdict(config)


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, flag: str = "size") -> int:
    """A byte count such as `4GiB`, `512MB` or `1000000`."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match[2].upper() not in SIZE_UNITS:
        raise UserError(f"{flag} must be a size such as 4GiB, 512MB or a number of bytes, got '{text}'")
    return int(float(match[1]) * SIZE_UNITS[match[2].upper()])


def require(condition: bool, message: str) -> None:
    """Raise a UserError with `message` unless `condition` holds."""
    if not condition:
        raise UserError(message)


def require_positive(value: float, flag: str) -> None:
    """A positive, finite number: inf passes `> 0` and would fail later, mid-run."""
    require(value > 0, f"{flag} must be positive, got {value}")
    require(math.isfinite(value), f"{flag} must be finite, got {value}")


class Options:
    """Base of the option groups below: each checks its own fields, then lets the next group check."""

    def validate(self) -> None:
        pass


@dataclass
class DataOptions(Options):
    """Which dataset a command reads."""

    dataset: str = option("cifar100", f"Dataset name: {', '.join(DATASET_NAMES)}.", "Data")
    data_root: str = option(
        "data", "Where the dataset is stored: torchvision's layout, <root>/<split>/<class>/<image>, what "
        "`richkd demo` wrote, or for webdataset a tar-shard URL pattern such as 'shards/{split}-{000000..000127}.tar'.",
        "Data")
    split: str = option("train", "Dataset split.", "Data")
    download: bool = option(False, "Download the dataset into --data-root first (torchvision datasets).", "Data")


@dataclass
class StreamOptions(DataOptions):
    """Tar shards read front to back instead of by index."""

    stream: bool = option(
        False, "Read the tar shards (--dataset webdataset) front to back instead of by index: sequential reads for "
        "shards on slow or remote storage, and `pipe:` URLs work (give their class names to --class-names).",
        "Streaming")

    def validate(self) -> None:
        super().validate()
        require(not self.stream or self.dataset == "webdataset",
                f"--stream reads tar shards: it needs --dataset webdataset, not '{self.dataset}'")
        # Of the commands that draw views (precompute, train); distill refuses a mixed store itself.
        require(not (self.stream and getattr(self, "mix", "none") != "none"), "--mix takes each view's partner from "
                "another sample, whose image a stream cannot fetch: run without --stream")


@dataclass
class ViewOptions(Options):
    """How augmented views of an image are made."""

    view_policy: str = option(
        "auto", "auto, pad_crop (RandomCrop + flip, for 32 x 32 images), resized_crop (RandomResizedCrop + flip) "
        "or center (no augmentation, for a held-out split).", "Views")
    image_size: int | None = option(
        None, "Side of each view (default: the images' side, or 224 for resized crops); pad_crop below the images' "
        "side cuts a patch of that side from each image, it does not resize.", "Views")
    augment: str = option(
        "none", "Strong augmentation after the crop: none, randaugment, trivialaugment or autoaugment (torchvision's, "
        "at their defaults); precompute draws it once per view and stores it, train afresh each epoch.", "Views")
    random_erase: float = option(
        0.0, "Probability of erasing a random box of each view (torchvision's RandomErasing, to 0), stored as "
        "--augment is.", "Views")
    mix: str = option(
        "none", "Mix each view with the same view of another sample: none, mixup, cutmix or both (one of the two per "
        "view), at timm's defaults; the partner and lambda are stored with the view, the labels mixed by lambda.",
        "Views")

    def validate(self) -> None:
        super().validate()
        require(self.image_size is None or self.image_size >= 1,
                f"--image-size must be positive, got {self.image_size}")
        require(self.augment in AUGMENTS, f"--augment must be one of {', '.join(AUGMENTS)}, got '{self.augment}'")
        require(0 <= self.random_erase < 1,
                f"--random-erase must be a probability in [0, 1), got {self.random_erase}")
        require(self.mix in MIXES, f"--mix must be one of {', '.join(MIXES)}, got '{self.mix}'")


@dataclass
class ExecutionOptions(Options):
    """Where a command runs."""

    num_workers: int = option(2, "Data loading worker processes (0 loads in the main process).", "Execution")
    device: str = option("auto", f"Device: {DEVICE_CHOICES}.", "Execution")

    def validate(self) -> None:
        super().validate()
        require(self.num_workers >= 0, f"--num-workers must be 0 or more, got {self.num_workers}")


NAMED_NORMALIZATIONS = ("imagenet", "clip")
# Images, evenly spaced over the split, whose pixels give `--normalize dataset`'s statistics.
MEASURED_IMAGES = 1000
NUMBER = r"\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*"


def normalization_numbers(spec: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of `--normalize MEAN,STD`, each for three channels."""
    parts = spec.split(",")
    require(len(parts) in (2, 6) and all(re.fullmatch(NUMBER, part) for part in parts),
            f"--normalize must be auto, dataset, {', '.join(NAMED_NORMALIZATIONS)} or MEAN,STD numbers (2 or 6 of "
            f"them), got '{spec}'")
    numbers = [float(part) for part in parts]
    mean, std = (numbers[:1] * 3, numbers[1:] * 3) if len(numbers) == 2 else (numbers[:3], numbers[3:])
    require(all(value > 0 for value in std), f"--normalize {spec}: every std must be positive")
    return tuple(mean), tuple(std)


@dataclass
class NormalizeOptions(Options):
    """How a model's inputs are normalised."""

    normalize: str = option(
        "auto", "Input normalisation: auto (what the model or store records, else the dataset's own statistics: "
        "CIFAR's, the shards' normalization.json, ImageNet's for image folders), imagenet, clip (OpenAI CLIP's), "
        f"dataset (measured on up to {MEASURED_IMAGES:,} images of --split) or MEAN,STD as numbers, one of each for "
        "every channel or three of each (r,g,b,r,g,b).", "Data")

    def validate(self) -> None:
        super().validate()
        if self.normalize not in ("auto", "dataset", *NAMED_NORMALIZATIONS):
            normalization_numbers(self.normalize)
