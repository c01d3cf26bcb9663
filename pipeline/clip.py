"""CLIP as a multi-prompt zero-shot classifier, through open_clip.

`--clip` takes any open_clip model name (or an `hf-hub:` / `local-dir:` identifier); `--clip-pretrained`
a pretrained tag that open_clip fetches on a connected machine, a local checkpoint file, or `random`
(untrained weights, for benchmarks and tests).
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from richkd.pipeline.errors import UserError, read_text
from richkd.pipeline.models import file_sha256

# The templates of the method's reference implementation.
DEFAULT_TEMPLATES = (
    "a photo of a {}",
    "a blurry photo of a {}",
    "a cropped photo of a {}",
    "a close-up photo of a {}",
    "a low resolution photo of a {}",
    "a bright photo of a {}",
    "a picture of a {}",
    "a detailed image of a {}",
    "a sketch of a {}",
    "a natural photo of a {} in the wild",
    "a realistic image of a {}",
    "a high quality photo of a {}",
)

RANDOM_WEIGHTS = "random"


@functools.cache
def open_clip_library():
    """open_clip, imported on first use (it takes most of a second, which every CLI command would pay),
    with richkd's own model configs (a tiny 32 x 32 CLIP for the demo) registered next to its own."""
    import open_clip

    open_clip.add_model_config(Path(__file__).parent / "clip_configs")
    return open_clip
SCHEMAS = ("hf-hub:", "local-dir:")


@dataclass
class ClipTeacher:
    model: torch.nn.Module
    tokenizer: object
    name: str
    pretrained: str | None
    checkpoint_sha256: str | None
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str

    @property
    def logit_scale(self) -> float:
        """The model's own temperature, exp(logit_scale): the `clip` scale of fused logits."""
        return float(self.model.logit_scale.detach().exp().item())

    def preprocess(self, views: torch.Tensor) -> torch.Tensor:
        """uint8 square views (B, 3, h, w) -> CLIP's input: resized to its image size, CLIP-normalised."""
        images = views.float().div_(255)
        if tuple(images.shape[-2:]) != self.image_size:
            mode = InterpolationMode(self.interpolation)
            images = TF.resize(images, list(self.image_size), interpolation=mode, antialias=True)
        return TF.normalize(images, list(self.mean), list(self.std))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings of preprocessed images."""
        return self.model.encode_image(images, normalize=True)

    def describe(self) -> dict:
        return {
            "model": self.name,
            "pretrained": self.pretrained,
            "checkpoint_sha256": self.checkpoint_sha256,
            "logit_scale": self.logit_scale,
            "image_size": list(self.image_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }


def load_clip(name: str, pretrained: str | None, device: torch.device | str = "cpu") -> ClipTeacher:
    """An open_clip model in eval mode with its tokenizer and image preprocessing settings."""
    open_clip = open_clip_library()
    has_schema = name.startswith(SCHEMAS)
    if not has_schema and name not in open_clip.list_models():
        raise UserError(f"unknown CLIP model '{name}'; see open_clip.list_models() (e.g. ViT-B-32, ViT-L-14)"
                        " or use hf-hub:ORG/REPO or local-dir:PATH")
    checkpoint_sha256 = None
    if has_schema:
        weights = None
    elif pretrained is None:
        raise UserError("--clip-pretrained is required: a pretrained tag (e.g. openai), a checkpoint file, "
                        f"or '{RANDOM_WEIGHTS}' for untrained weights")
    elif pretrained == RANDOM_WEIGHTS:
        weights = None
    elif Path(pretrained).is_file():
        weights = pretrained
        checkpoint_sha256 = file_sha256(pretrained)
    elif open_clip.get_pretrained_cfg(name, pretrained):
        weights = pretrained
        require_reachable_hub_weights(name, pretrained)
    elif any(sep in pretrained for sep in ("/", "\\", ".")):
        raise UserError(f"CLIP checkpoint {pretrained} does not exist")
    else:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise UserError(f"'{pretrained}' is not a pretrained tag of {name}; tags: {', '.join(tags) or 'none'}"
                        " (or pass a checkpoint file)")
    if name.startswith("local-dir:") and Path(name.removeprefix("local-dir:")).is_dir():
        checkpoint_sha256 = bundle_sha256(Path(name.removeprefix("local-dir:")))
    try:
        model = open_clip.create_model(name, pretrained=weights, device=device)
        tokenizer = open_clip.get_tokenizer(name)
    except (FileNotFoundError, ValueError) as error:
        raise UserError(f"cannot load CLIP {name}: {error}") from error
    except RuntimeError as error:
        # open_clip raises RuntimeError both for failed downloads and for checkpoints that do not fit.
        first_line = str(error).strip().splitlines()[0]
        source = name if has_schema else f"{name} with weights {weights or RANDOM_WEIGHTS}"
        raise UserError(f"cannot load CLIP {source}: {first_line}") from error
    model.eval()
    cfg = model.visual.preprocess_cfg
    size = cfg["size"]
    return ClipTeacher(
        model=model,
        tokenizer=tokenizer,
        name=name,
        pretrained=None if has_schema else pretrained,
        checkpoint_sha256=checkpoint_sha256,
        image_size=(size, size) if isinstance(size, int) else tuple(size),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=cfg["interpolation"],
    )


# How long the hub may take to answer whether weights that are not cached can be downloaded.
HUB_TIMEOUT_SECONDS = 10


def require_reachable_hub_weights(name: str, tag: str) -> None:
    """Fail at once, before open_clip's download retries and their warnings, when the weights of a pretrained tag
    come from the Hugging Face hub, are not in its local cache, and the hub is offline or does not answer."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, HTTPError

    hub = open_clip_library().get_pretrained_cfg(name, tag).get("hf_hub", "")
    if not hub:
        return
    repo, filename = os.path.split(hub)
    filename = filename or "open_clip_pytorch_model.bin"
    # open_clip looks for a .safetensors twin of the file first.
    alternative = "open_clip_model.safetensors" if filename == "open_clip_pytorch_model.bin" else \
        filename.removesuffix(".bin") + ".safetensors"
    if any(isinstance(huggingface_hub.try_to_load_from_cache(repo, file), str) for file in (alternative, filename)):
        return
    where = f"the weights '{tag}' of CLIP {name} ({repo} on the Hugging Face hub)"
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise UserError(f"{where} are not in the local cache and HF_HUB_OFFLINE is set: download them once with "
                        "a network connection, or pass a checkpoint file")
    try:
        huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(repo, filename), timeout=HUB_TIMEOUT_SECONDS)
    except (HTTPError, HfHubHTTPError, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{where} are not in the local cache and cannot be downloaded: {reason}") from error


def bundle_sha256(folder: Path) -> str:
    """sha256 over every file of an open_clip `local-dir:` bundle (config and weights), in name order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(f"{path.name}:{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def read_lines(path: str | Path, what: str) -> list[str]:
    """Non-empty lines of a text file, `#` comments skipped."""
    lines = [line.strip() for line in read_text(path, f"{what} file").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def read_templates(path: str | Path) -> list[str]:
    """Prompt templates, one per line, each with one `{}` where the class name goes."""
    templates = read_lines(path, "templates")
    if not templates:
        raise UserError(f"templates file {path} has no templates")
    for number, template in enumerate(templates, 1):
        if template.count("{}") != 1:
            raise UserError(f"templates file {path}: template {number} '{template}' must contain '{{}}' exactly once")
        try:
            template.format("class")
        except (KeyError, IndexError, ValueError):
            raise UserError(f"templates file {path}: template {number} '{template}' has braces besides its '{{}}'; "
                            "write a literal brace as {{ or }}") from None
    return templates


def read_class_names(path: str | Path, expected: int) -> list[str]:
    """Class names, one per line, in class-index order; there must be one per class."""
    names = read_lines(path, "class names")
    if len(names) != expected:
        raise UserError(f"class names file {path} has {len(names)} names, the dataset has {expected} classes")
    return names


def prompt_class_name(name: str) -> str:
    """A dataset's class name as it reads in a sentence: `aquarium_fish` -> `aquarium fish`."""
    return " ".join(name.replace("_", " ").split())
