"""Strong augmentation drawn once per (seed, view, sample), stored with the view and replayed (ml-dr's idea).

torchvision's RandAugment, TrivialAugmentWide and AutoAugment (ImageNet policy), with their default parameters,
are drawn as what their `forward` draws at random: per op slot the op, its magnitude bin and its sign; and
RandomErasing's box. Replaying applies the same ops with torchvision's own op function on the uint8 view, so the
pixels are the same wherever and whenever it runs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import autoaugment as torchvision_augment
from torchvision.transforms.v2 import functional as TF

# Op slots stored per view: RandAugment's 2 ops, AutoAugment's sub-policy of 2, TrivialAugment's 1.
OP_SLOTS = 2
SLOT_PARAMS = ("op", "bin", "negate")  # op -1: no op in the slot; bin -1 (unused): an op without magnitude
ERASE_PARAMS = ("erase_top", "erase_left", "erase_height", "erase_width")  # height 0: nothing erased
NO_OP = (-1, -1, 0)

TRANSFORMS = {"randaugment": torchvision_augment.RandAugment, "trivialaugment": torchvision_augment.TrivialAugmentWide,
              "autoaugment": torchvision_augment.AutoAugment}


@dataclass(frozen=True)
class StrongAugment:
    """`augment` (none or one of TRANSFORMS, at torchvision's defaults) and RandomErasing with probability `erase`
    (torchvision's scale and ratio, erased to 0), on square views of side `size`."""

    augment: str
    erase: float
    size: int
    erase_scale: tuple[float, float] = (0.02, 0.33)
    erase_ratio: tuple[float, float] = (0.3, 3.3)

    @property
    def param_names(self) -> tuple[str, ...]:
        slots = tuple(f"{name}{slot}" for slot in range(OP_SLOTS) for name in SLOT_PARAMS) if self.ops else ()
        return slots + (ERASE_PARAMS if self.erase else ())

    @property
    def ops(self) -> bool:
        return self.augment != "none"

    def _transform(self):
        return TRANSFORMS[self.augment]()

    def _space(self, transform) -> dict[str, tuple[torch.Tensor, bool]]:
        """The transform's ops with their magnitude bins, as its `forward` builds them (private to torchvision,
        whose version richkd pins)."""
        if isinstance(transform, torchvision_augment.TrivialAugmentWide):
            return transform._augmentation_space(transform.num_magnitude_bins)
        bins = 10 if isinstance(transform, torchvision_augment.AutoAugment) else transform.num_magnitude_bins
        return transform._augmentation_space(bins, (self.size, self.size))

    @functools.cached_property
    def _ops(self) -> tuple:
        """(the transform, its op space, the ops' names in order), built once rather than for every view."""
        transform = self._transform()
        space = self._space(transform)
        return transform, space, list(space)

    def sample(self, rng: np.random.Generator) -> tuple[int, ...]:
        """Draw what the transform's `forward` would, from this view's generator."""
        drawn: tuple[int, ...] = ()
        if self.ops:
            transform, space, names = self._ops
            slots = []
            if isinstance(transform, torchvision_augment.AutoAugment):
                for name, probability, magnitude_bin in transform.policies[int(rng.integers(len(transform.policies)))]:
                    applied, negate = rng.random() <= probability, int(rng.integers(2))
                    slots.append((names.index(name), -1 if magnitude_bin is None else magnitude_bin, negate)
                                 if applied else NO_OP)
            else:
                trivial = isinstance(transform, torchvision_augment.TrivialAugmentWide)
                for _ in range(1 if trivial else transform.num_ops):
                    op = int(rng.integers(len(names)))
                    magnitudes, _ = space[names[op]]
                    if magnitudes.ndim == 0:  # an op without magnitude
                        magnitude_bin = -1
                    else:
                        magnitude_bin = int(rng.integers(len(magnitudes))) if trivial else transform.magnitude
                    slots.append((op, magnitude_bin, int(rng.integers(2))))
            drawn = sum((*slots, *[NO_OP] * (OP_SLOTS - len(slots))), ())
        if self.erase:
            drawn += self._erase_box(rng)
        return drawn

    def _erase_box(self, rng: np.random.Generator) -> tuple[int, int, int, int]:
        # torchvision's RandomErasing.get_params, drawn from this view's own generator.
        if rng.random() >= self.erase:
            return 0, 0, 0, 0
        area = self.size * self.size
        log_ratio = (math.log(self.erase_ratio[0]), math.log(self.erase_ratio[1]))
        for _ in range(10):
            erase_area = area * rng.uniform(*self.erase_scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            height, width = int(round(math.sqrt(erase_area * aspect))), int(round(math.sqrt(erase_area / aspect)))
            if height < self.size and width < self.size:
                return (int(rng.integers(0, self.size - height + 1)), int(rng.integers(0, self.size - width + 1)),
                        height, width)
        return 0, 0, 0, 0

    def apply(self, view: torch.Tensor, params) -> torch.Tensor:
        """The stored ops and erasing of `params` on a uint8 (3, size, size) view."""
        params = [int(p) for p in params]
        if self.ops:
            _, space, names = self._ops
            for slot in range(OP_SLOTS):
                op, magnitude_bin, negate = params[3 * slot: 3 * slot + 3]
                if op < 0:
                    continue
                magnitudes, signed = space[names[op]]
                magnitude = float(magnitudes[magnitude_bin].item()) if magnitudes.ndim > 0 else 0.0
                view = torchvision_augment._apply_op(view, names[op], -magnitude if signed and negate else magnitude,
                                                     interpolation=InterpolationMode.NEAREST, fill=None)
            params = params[3 * OP_SLOTS:]
        if self.erase and params[2]:
            top, left, height, width = params
            view = TF.erase(view, top, left, height, width, torch.zeros((), dtype=view.dtype))
        return view

    def describe(self) -> dict:
        return asdict(self)


def strong_augment(augment: str, erase: float, size: int) -> StrongAugment | None:
    """The strong augmentation of `--augment` and `--random-erase` (checked by ViewOptions), or None for neither."""
    if augment == "none" and not erase:
        return None
    return StrongAugment(augment, erase, size)


MIX_PARAMS = ("mix", "partner", "lambda_bits", "box_top", "box_left", "box_height", "box_width")
MIXUP, CUTMIX = 1, 2


@dataclass(frozen=True)
class Mix:
    """Mixup or cutmix of each view with the same view of another sample of the `samples` (its store row), at
    timm's defaults: mixup lambda ~ Beta(0.8, 0.8), cutmix's box from lambda ~ Beta(1, 1) with lambda then the
    share of the view left; `both` picks one of the two per view, evenly (timm's switch_prob 0.5). Lambda is stored
    as its float32 bits, so that it replays exactly."""

    kind: str
    samples: int
    size: int
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    param_names = MIX_PARAMS

    def sample(self, rng: np.random.Generator, index: int) -> tuple[int, ...]:
        kind = {"mixup": MIXUP, "cutmix": CUTMIX}.get(self.kind) or (CUTMIX if rng.random() < 0.5 else MIXUP)
        partner = int(rng.integers(self.samples - 1))
        partner += partner >= index  # any sample but this one
        if kind == MIXUP:
            return MIXUP, partner, lambda_bits(rng.beta(self.mixup_alpha, self.mixup_alpha)), 0, 0, 0, 0
        # timm's rand_bbox: a box of sides size * sqrt(1 - lambda) around a random centre, cut by the view's edges.
        cut = int(self.size * math.sqrt(1 - rng.beta(self.cutmix_alpha, self.cutmix_alpha)))
        centre_y, centre_x = (int(c) for c in rng.integers(self.size, size=2))
        top, bottom = max(centre_y - cut // 2, 0), min(centre_y + cut // 2, self.size)
        left, right = max(centre_x - cut // 2, 0), min(centre_x + cut // 2, self.size)
        kept = 1 - (bottom - top) * (right - left) / self.size**2
        return CUTMIX, partner, lambda_bits(kept), top, left, bottom - top, right - left

    def apply(self, view: torch.Tensor, partner_view: torch.Tensor, params) -> torch.Tensor:
        """The uint8 view mixed with its partner's, as `params` (this mix's part of a view's) say."""
        kind, _, _, top, left, height, width = (int(p) for p in params)
        if kind == MIXUP:
            weight = mix_lambda(params)
            return (weight * view.float() + (1 - weight) * partner_view.float()).round_().to(torch.uint8)
        mixed = view.clone()
        mixed[:, top:top + height, left:left + width] = partner_view[:, top:top + height, left:left + width]
        return mixed

    def describe(self) -> dict:
        return asdict(self)


def lambda_bits(value: float) -> int:
    return int(np.float32(value).view(np.int32))


def mix_lambda(params) -> float:
    """The share of a mixed view's own sample, from its mix params."""
    return float(np.int32(params[2]).view(np.float32))
