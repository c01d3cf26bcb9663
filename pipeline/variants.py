"""The distillation variants and the fusion weights they give the sources: what `--variant`, `--alpha`, `--fuse` and
`--clip-scale` mean, without torch, so that the command line reads them at once; `richkd.pipeline.fusion` fuses."""

from __future__ import annotations

import math
from dataclasses import dataclass

from richkd.pipeline.errors import UserError

# The paper's fusion weight of the teacher.
DEFAULT_ALPHA = 0.7
# Named CLIP scales: `raw` keeps cosines as they are (the reference code), `clip` uses the model's exp(logit_scale).
CLIP_SCALES = ("raw", "clip")
# The sources `--alpha` weighs, the two every store made by precompute holds.
TEACHER, CLIP = "teacher", "clip"


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


def parse_fuse(text: str, flag: str = "--fuse") -> dict[str, float]:
    """`teacher=0.5,clip=0.3,clip_b16=0.2` as {source: weight}, in the order given, checked by `require_weights`."""
    weights: dict[str, float] = {}
    for entry in text.split(","):
        name, _, value = (part.strip() for part in entry.partition("="))
        try:
            weight = float(value) if name else math.nan
        except ValueError:
            weight = math.nan
        if math.isnan(weight):
            raise UserError(f"{flag} must be SOURCE=WEIGHT pairs separated by commas, such as teacher=0.5,clip=0.5; "
                            f"got '{text}'")
        if name in weights:
            raise UserError(f"{flag} weighs source {name} twice: give each source once")
        weights[name] = weight
    require_weights(weights, flag)
    return weights


def require_weights(weights: dict[str, float], flag: str) -> None:
    """Refuse weights that are not finite numbers of 0 or more, at least one above 0."""
    for name, weight in weights.items():
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise UserError(f"{flag} weights must be finite numbers of 0 or more, got {name}={weight}")
    if not any(weight > 0 for weight in weights.values()):
        raise UserError(f"{flag} needs a source with a weight above 0, got {describe_weights(weights) or 'none'}")


def run_weights(variant: str, fuse: dict[str, float] | None, alpha: float) -> dict[str, float]:
    """The sources' weights a run of `variant` names: --fuse's, or alpha's two-source case {teacher: alpha, clip:
    1 - alpha} (the CLIP-only control's: clip alone, alpha unused)."""
    if fuse is not None:
        return dict(fuse)
    return {TEACHER: 0.0, CLIP: 1.0} if VARIANTS[variant].normalized else {TEACHER: alpha, CLIP: 1 - alpha}


def feature_weights(fuse: dict[str, float] | None, lam: float) -> dict[str, float]:
    """The sources' weights in CRD's fused embedding: {teacher: lam, clip: 1 - lam}, or the --fuse weights above 0
    scaled to sum 1."""
    if fuse is None:
        return {TEACHER: lam, CLIP: 1 - lam}
    total = sum(fuse.values())
    return {name: weight / total for name, weight in fuse.items() if weight > 0}


@dataclass(frozen=True)
class Variant:
    """What a run adds to cross-entropy: a logit loss on z_F, the weighted sum of the sources' logits, a feature
    loss, or both; which kinds of source z_F is made of."""

    description: str
    logits: bool = False
    features: bool = False
    kinds: tuple[str, ...] = ("classifier", "clip")
    normalized: bool = False  # the weights of the sources it keeps are scaled to sum 1

    def logit_weights(self, weights: dict[str, float], kinds: dict[str, str]) -> dict[str, float]:
        """Each source's weight in z_F, given the run's `weights` and each source's kind (`kinds`, in store order):
        0 for the sources of another kind, and for those `weights` does not name."""
        kept = {name: weights.get(name, 0.0) if kind in self.kinds else 0.0 for name, kind in kinds.items()}
        if not any(weight > 0 for weight in kept.values()):
            raise UserError(f"variant {self.name} fuses the {' and '.join(self.kinds)} sources, and none of them "
                            f"has a weight above 0 ({describe_weights(weights)})")
        if not self.normalized:
            return kept
        total = sum(kept.values())
        return {name: weight / total for name, weight in kept.items()}

    @property
    def name(self) -> str:
        return next(name for name, variant in VARIANTS.items() if variant is self)


def describe_weights(weights: dict[str, float]) -> str:
    """`teacher 0.7, clip 0.3`"""
    return ", ".join(f"{name} {weight:g}" for name, weight in weights.items())


VARIANTS = {
    "none": Variant("cross-entropy only"),
    "L": Variant("logit loss on z_F = alpha z_T + (1 - alpha) z_C, or the --fuse weights' sum", logits=True),
    "F": Variant("CRD on the fused features", features=True),
    "LF": Variant("both", logits=True, features=True),
    # Controls from the same cache: what the teachers alone give, softened as fusing softens them, and CLIP alone.
    "shrink": Variant("teacher-shrink control: z_F = alpha z_T, the classifier sources alone at their weights",
                      logits=True, kinds=("classifier",)),
    "clip": Variant("CLIP-only control: z_F = z_C, the CLIP sources alone, their weights scaled to sum 1 (alpha "
                    "unused)", logits=True, kinds=("clip",), normalized=True),
}
