"""The distillation variants and the fusion weights they give the teacher and CLIP: what `--variant`, `--alpha` and
`--clip-scale` mean, without torch, so that the command line reads them at once; `richkd.pipeline.fusion` fuses."""

from __future__ import annotations

import math
from dataclasses import dataclass

from richkd.pipeline.errors import UserError

# The paper's fusion weight of the teacher.
DEFAULT_ALPHA = 0.7
# Named CLIP scales: `raw` keeps cosines as they are (the reference code), `clip` uses the model's exp(logit_scale).
CLIP_SCALES = ("raw", "clip")


def clip_scale_value(scale: str, logit_scale: float) -> float:
    """The factor applied to CLIP's cosines: `raw` (1.0), `clip` (the model's own) or a positive number."""
    if scale == "raw":
        return 1.0
    if scale == "clip":
        return float(logit_scale)
    try:
        value = float(scale)
    except ValueError:
        raise UserError(f"--clip-scale must be raw, clip or a positive number, got '{scale}'") from None
    if not value > 0:
        raise UserError(f"--clip-scale must be positive, got {scale}")
    if not math.isfinite(value):
        raise UserError(f"--clip-scale must be finite, got {scale}")
    return value


def weighted_logit_arrays(teacher_weight: float, clip_weight: float) -> tuple[str, ...]:
    """The cached logits a fusion with these weights reads: none whose weight is zero."""
    return ("teacher/logits",) * (teacher_weight > 0) + ("clip/logits",) * (clip_weight > 0)


@dataclass(frozen=True)
class Variant:
    """What a run adds to cross-entropy: a logit loss on z_F = teacher_weight z_T + clip_weight z_C (weights from
    alpha), a feature loss, or both."""

    description: str
    logits: bool = False
    features: bool = False
    teacher_in_logits: bool = True
    clip_in_logits: bool = True

    def logit_weights(self, alpha: float) -> tuple[float, float]:
        """(weight of z_T, weight of z_C) in z_F."""
        teacher = alpha if self.teacher_in_logits else 0.0
        return teacher, (1 - teacher) * self.clip_in_logits

    def logit_arrays(self, alpha: float) -> tuple[str, ...]:
        """The cached logits z_F is made of at `alpha` (`richkd.cache.schema.stored_arrays` names what holds them
        in a top-k store)."""
        return weighted_logit_arrays(*self.logit_weights(alpha))


VARIANTS = {
    "none": Variant("cross-entropy only"),
    "L": Variant("logit loss on z_F = alpha z_T + (1 - alpha) z_C", logits=True),
    "F": Variant("CRD on the fused features", features=True),
    "LF": Variant("both", logits=True, features=True),
    # Controls from the same cache: what the teacher alone gives, softened as fusing softens it, and CLIP alone.
    "shrink": Variant("teacher-shrink control: z_F = alpha z_T, no CLIP", logits=True, clip_in_logits=False),
    "clip": Variant("CLIP-only control: z_F = z_C (alpha unused)", logits=True, teacher_in_logits=False),
}
