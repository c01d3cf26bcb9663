"""Augmented views: geometric parameters sampled once per (seed, view, sample), stored, and replayed.

Parameters are in the original image's coordinates. Replaying them with the policy's `replay` on the
original image gives the same uint8 pixels wherever it runs, so the student sees exactly what the
teacher and CLIP saw when the cache was written.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from richkd.pipeline.augment import MIX_PARAMS, Mix, StrongAugment, mix_lambda, strong_augment
from richkd.pipeline.errors import UserError


def view_rng(seed: int, view: int, index: int) -> np.random.Generator:
    """The random stream of one (view, sample): independent of batching, sharding and worker order."""
    return np.random.default_rng((seed, view, index))


@dataclass(frozen=True)
class PadCrop:
    """`RandomCrop(size, padding)` + horizontal flip: params (top, left, flip), top/left may be negative."""

    size: int
    padding: int = 4
    name = "pad_crop"
    param_names = ("top", "left", "flip")

    def sample(self, rng: np.random.Generator, height: int, width: int) -> tuple[int, ...]:
        top = int(rng.integers(-self.padding, height + self.padding - self.size + 1))
        left = int(rng.integers(-self.padding, width + self.padding - self.size + 1))
        return top, left, int(rng.random() < 0.5)

    def replay(self, image: torch.Tensor, params) -> torch.Tensor:
        top, left, flip = (int(p) for p in params)
        view = TF.crop(image, top, left, self.size, self.size)  # zero-fills outside the image, as padding does
        return TF.horizontal_flip(view) if flip else view

    def center(self, image: torch.Tensor) -> torch.Tensor:
        return center_view(image, self.size, resize=False)


@dataclass(frozen=True)
class ResizedCrop:
    """`RandomResizedCrop(size, scale, ratio)` + horizontal flip: params (top, left, height, width, flip)."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    name = "resized_crop"
    param_names = ("top", "left", "height", "width", "flip")

    def sample(self, rng: np.random.Generator, height: int, width: int) -> tuple[int, ...]:
        box = self._box(rng, height, width)
        return (*box, int(rng.random() < 0.5))

    def _box(self, rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int]:
        # torchvision's RandomResizedCrop.get_params, drawn from this view's own generator.
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            h, w = height, width
        return (height - h) // 2, (width - w) // 2, h, w

    def replay(self, image: torch.Tensor, params) -> torch.Tensor:
        top, left, height, width, flip = (int(p) for p in params)
        view = TF.resized_crop(image, top, left, height, width, [self.size, self.size], antialias=True)
        return TF.horizontal_flip(view) if flip else view

    def center(self, image: torch.Tensor) -> torch.Tensor:
        return center_view(image, self.size, resize=True)


@dataclass(frozen=True)
class CenterView:
    """No augmentation, for caching a held-out split: every view is the evaluation view. Params: (flip,) = 0."""

    size: int
    resize: bool = False
    name = "center"
    param_names = ("flip",)

    def sample(self, rng: np.random.Generator, height: int, width: int) -> tuple[int, ...]:
        return (0,)

    def replay(self, image: torch.Tensor, params) -> torch.Tensor:
        return self.center(image)

    def center(self, image: torch.Tensor) -> torch.Tensor:
        return center_view(image, self.size, self.resize)


def center_view(image: torch.Tensor, size: int, resize: bool) -> torch.Tensor:
    """The evaluation view: the central size x size crop, of the image itself (small images, zero-padded if
    smaller) or after resizing its shorter side to size / 0.875 (the ImageNet convention)."""
    if resize:
        image = TF.resize(image, [round(size / 0.875)], antialias=True)
    return TF.center_crop(image, [size, size])


GeometricPolicy = PadCrop | ResizedCrop | CenterView
VIEW_POLICIES = {policy.name: policy for policy in (PadCrop, ResizedCrop, CenterView)}


@dataclass(frozen=True)
class Augmented:
    """A geometric policy's view, then stored strong augmentation on it, then mixing with another sample's view:
    params are the policy's, the augmentation's, then the mix's."""

    base: GeometricPolicy
    augment: StrongAugment | None = None
    mix: Mix | None = None

    @property
    def name(self) -> str:
        return self.base.name

    @property
    def size(self) -> int:
        return self.base.size

    @property
    def param_names(self) -> tuple[str, ...]:
        return (*self.base.param_names, *(self.augment.param_names if self.augment else ()),
                *(self.mix.param_names if self.mix else ()))

    def sample(self, rng: np.random.Generator, height: int, width: int, index: int) -> tuple[int, ...]:
        return (*self.base.sample(rng, height, width), *(self.augment.sample(rng) if self.augment else ()),
                *(self.mix.sample(rng, index) if self.mix else ()))

    def replay(self, image: torch.Tensor, params) -> torch.Tensor:
        """The view before mixing (`rebuild_view` mixes it)."""
        split = len(self.base.param_names)
        view = self.base.replay(image, params[:split])
        return self.augment.apply(view, params[split:split + len(self.augment.param_names)]) if self.augment else view

    def center(self, image: torch.Tensor) -> torch.Tensor:
        return self.base.center(image)


ViewPolicy = GeometricPolicy | Augmented

# Output side of resized crops when the user gives none (the ImageNet convention).
DEFAULT_RESIZED_SIZE = 224


# The largest side of a small-image dataset (CIFAR's 32, STL's 64...): `auto` pad-crops it, and its corruptions
# take CIFAR-10-C's parameters.
SMALL_IMAGE_SIDE = 64


def make_view_policy(name: str, native_size: int | None, image_size: int | None, augment: str = "none",
                     erase: float = 0.0, mix: str = "none", samples: int = 0) -> ViewPolicy:
    """`auto` pad-crops datasets whose images all share one small side (CIFAR) and resized-crops the rest; with
    `augment` or `erase`, strong augmentation follows, and with `mix`, mixing with another of the `samples`
    (see `richkd.pipeline.augment`)."""
    base = geometric_policy(name, native_size, image_size)
    strong = strong_augment(augment, erase, base.size)
    if strong is None and mix == "none":
        return base
    if isinstance(base, CenterView):
        raise UserError("--augment, --random-erase and --mix augment training views; the center policy has none")
    if mix != "none" and samples < 2:
        raise UserError(f"--mix needs at least two samples to mix, the split has {samples}")
    return Augmented(base, strong, Mix(mix, samples, base.size) if mix != "none" else None)


def geometric_policy(name: str, native_size: int | None, image_size: int | None) -> GeometricPolicy:
    small = native_size is not None and native_size <= SMALL_IMAGE_SIDE
    if name == "auto":
        name = "pad_crop" if small else "resized_crop"
    if name == "center":
        return CenterView(size=image_size or native_size or DEFAULT_RESIZED_SIZE, resize=not small)
    if name not in VIEW_POLICIES:
        raise UserError(f"unknown view policy '{name}'; known: auto, {', '.join(VIEW_POLICIES)}")
    if name == "pad_crop":
        if native_size is None and image_size is None:
            raise UserError("view policy pad_crop needs --image-size for a dataset whose images may differ in size")
        size = image_size or native_size
        return PadCrop(size=size, padding=max(1, size // 8))  # CIFAR's 4 pixels of 32, at any side
    return ResizedCrop(size=image_size or DEFAULT_RESIZED_SIZE)


def policy_summary(policy: ViewPolicy, native_size: int | None) -> str:
    """One line on the views a stage will cut, and why, for its start-up message."""
    if isinstance(policy, Augmented):
        return f"{policy_summary(policy.base, native_size)}; then {', '.join(augmentation_summary(policy))}"
    images = (f"the images are {native_size} x {native_size}" if native_size is not None
              else "the images differ in size, or are not square")
    if isinstance(policy, PadCrop):
        return f"views: pad-crop to {policy.size} px, padding {policy.padding}, and flips ({images})"
    if isinstance(policy, ResizedCrop):
        return f"views: random resized crops to {policy.size} px, and flips ({images})"
    return f"views: the centre {policy.size} px ({images})"


def augmentation_summary(policy: ViewPolicy) -> list[str]:
    """What a policy adds after its crop, in words (nothing for a geometric policy)."""
    if not isinstance(policy, Augmented):
        return []
    strong, added = policy.augment, []
    if strong is not None:
        added += [strong.augment] * strong.ops + [f"random erasing (p {strong.erase:g})"] * (strong.erase > 0)
    if policy.mix is not None:
        added.append(f"{policy.mix.kind} with another sample")
    return added


def keeps_scale(policy: ViewPolicy) -> bool:
    """Whether views are cut at the image's own scale (pad-crops, centre crops without resizing), which is right
    for images of the one small side the policy was chosen for."""
    policy = policy.base if isinstance(policy, Augmented) else policy
    return isinstance(policy, PadCrop) or (isinstance(policy, CenterView) and not policy.resize)


def image_for_views(dataset, policy: ViewPolicy, index: int, image: torch.Tensor | None = None) -> torch.Tensor:
    """Image `index` of `dataset` (read by index unless given), to cut views of `policy` from. An image folder's
    side is found from a sample of its images: one of another side would be cut at another scale, unnoticed, so
    it is refused."""
    image = dataset.image(index) if image is None else image
    side = dataset.native_size
    if side is not None and keeps_scale(policy) and image.shape[1:] != (side, side):
        raise UserError(f"image {dataset.keys[index]} of the {dataset.split} split is {image.shape[2]} x "
                        f"{image.shape[1]} where the images sampled are {side} x {side}, the side {policy.name} "
                        "views are cut at: give every image one size, or pass --view-policy resized_crop")
    return image


def describe_policy(policy: ViewPolicy) -> dict:
    if isinstance(policy, Augmented):
        return {**describe_policy(policy.base), "param_names": list(policy.param_names),
                **({"augment": policy.augment.describe()} if policy.augment else {}),
                **({"mix": policy.mix.describe()} if policy.mix else {})}
    return {"policy": policy.name, "param_names": list(policy.param_names), **asdict(policy)}


def policy_from_description(description: dict) -> ViewPolicy:
    """The policy recorded in a store's attributes."""
    fields = {k: v for k, v in description.items()
              if k not in ("policy", "param_names", "seed", "count", "augment", "mix")}
    policy_class = VIEW_POLICIES[description["policy"]]
    if policy_class is ResizedCrop:
        fields = {**fields, "scale": tuple(fields["scale"]), "ratio": tuple(fields["ratio"])}
    base = policy_class(**fields)
    if "augment" not in description and "mix" not in description:
        return base
    strong = description.get("augment")
    if strong is not None:
        strong = StrongAugment(**{**strong, "erase_scale": tuple(strong["erase_scale"]),
                                  "erase_ratio": tuple(strong["erase_ratio"])})
    return Augmented(base, strong, Mix(**description["mix"]) if "mix" in description else None)


def sample_view(policy: ViewPolicy, seed: int, view: int, index: int, image: torch.Tensor) -> np.ndarray:
    """The stored parameters of view `view` of sample `index`."""
    rng = view_rng(seed, view, index)
    height, width = image.shape[-2], image.shape[-1]
    drawn = policy.sample(rng, height, width, index) if isinstance(policy, Augmented) else policy.sample(
        rng, height, width)
    return np.asarray(drawn, dtype=np.int32)


def mixing(policy: ViewPolicy) -> Mix | None:
    return policy.mix if isinstance(policy, Augmented) else None


def mix_params(policy: ViewPolicy, params) -> np.ndarray | None:
    """The mix's part of a view's params (its partner's index at 1), or None when the policy does not mix."""
    return None if mixing(policy) is None else np.asarray(params)[..., -len(MIX_PARAMS):]


def rebuild_view(policy: ViewPolicy, image: torch.Tensor, params,
                 partner: Callable[[int], tuple[torch.Tensor, np.ndarray]]) -> torch.Tensor:
    """The view `params` describe: replayed, then mixed with its partner's same view, where `partner(i)` gives the
    image and that view's params of sample i (the partner's own mix is not applied)."""
    view = policy.replay(image, params)
    own = mix_params(policy, params)
    if own is None:
        return view
    partner_image, partner_params = partner(int(own[1]))
    return policy.mix.apply(view, policy.replay(partner_image, partner_params), own)


def with_partner_indices(policy: ViewPolicy, params: np.ndarray, index_of_row: np.ndarray) -> np.ndarray:
    """Params by dataset index whose partners name store rows, with the partners named by dataset index instead
    (for a dataset that lists the store's samples in another order)."""
    if mixing(policy) is None:
        return params
    params = params.copy()
    partner = params.shape[-1] - len(MIX_PARAMS) + 1
    params[:, partner] = index_of_row[params[:, partner]]
    return params


def mixed_label(policy: ViewPolicy, params, label: int, partner_label: int, classes: int) -> torch.Tensor:
    """A mixed view's label: lambda of its own class and 1 - lambda of its partner's."""
    target = torch.zeros(classes)
    weight = mix_lambda(mix_params(policy, params))
    target[label] += weight
    target[partner_label] += 1 - weight
    return target
