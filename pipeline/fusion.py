"""Fusing the teacher's logits with CLIP's zero-shot cosines: z_F = alpha * z_T + (1 - alpha) * scale * s_C."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from richkd.cache.schema import stored_arrays, topk_arrays
from richkd.pipeline.topk import SparseLogits, weighted_sum
from richkd.pipeline.variants import VARIANTS, clip_scale_value, weighted_logit_arrays


def standardize(logits: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-sample z-score over classes, so sources of different spread weigh as alpha says."""
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True, unbiased=False)
    return (logits - mean) / (std + eps)


def fuse_logits(teacher_logits: torch.Tensor | None, clip_cosines: torch.Tensor | None, alpha: float,
                scale: float, standardized: bool = False, clip_weight: float | None = None) -> torch.Tensor:
    """z_F = alpha z_T + clip_weight z_C, clip_weight 1 - alpha unless given (0: the teacher-shrink control,
    alpha z_T alone); a source whose weight is zero may be None (it is then never read from the cache)."""
    clip_weight = 1 - alpha if clip_weight is None else clip_weight
    parts = []
    if alpha > 0:
        parts.append(alpha * (standardize(teacher_logits) if standardized else teacher_logits))
    if clip_weight > 0:
        clip_logits = scale * clip_cosines
        parts.append(clip_weight * (standardize(clip_logits) if standardized else clip_logits))
    return sum(parts)


@dataclass(frozen=True)
class Fusion:
    """How a run fuses the cached logits: z_F = teacher_weight z_T + clip_weight * scale * s_C. In a top-k store
    (`topk` > 0, of `classes` classes) the sources are sparse, and so is z_F."""

    teacher_weight: float
    clip_weight: float
    scale: float
    standardize: bool = False
    topk: int = 0
    classes: int = 0

    @classmethod
    def of(cls, variant: str, alpha: float, clip_scale: str, logit_scale: float, standardize: bool = False,
           topk: int = 0, classes: int = 0) -> Fusion:
        """The fusion of `variant` at `alpha`, CLIP's cosines scaled by `clip_scale` of a store whose CLIP has
        `logit_scale`, which holds `topk` logits of `classes` per source (topk 0: dense)."""
        return cls(*VARIANTS[variant].logit_weights(alpha), clip_scale_value(clip_scale, logit_scale), standardize,
                   topk, classes)

    @property
    def arrays(self) -> tuple[str, ...]:
        """The cached arrays it reads."""
        return stored_arrays(weighted_logit_arrays(self.teacher_weight, self.clip_weight), self.topk)

    def fuse(self, targets: dict[str, torch.Tensor]) -> torch.Tensor | SparseLogits:
        """z_F of a batch of cached targets (those of `arrays`)."""
        if not self.topk:
            return fuse_logits(targets.get("teacher/logits"), targets.get("clip/logits"), self.teacher_weight,
                               self.scale, self.standardize, self.clip_weight)
        parts = []
        for name, weight, scale in (("teacher/logits", self.teacher_weight, 1.0),
                                    ("clip/logits", self.clip_weight, self.scale)):
            if weight > 0:
                logits = SparseLogits.from_stored(*(targets[array] for array in topk_arrays(name)),
                                                  self.classes).scaled(scale)
                parts.append((weight, logits.standardized() if self.standardize else logits))
        return weighted_sum(parts)
