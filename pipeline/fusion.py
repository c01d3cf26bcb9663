"""Fusing the teacher's logits with CLIP's zero-shot cosines: z_F = alpha * z_T + (1 - alpha) * scale * s_C."""

from __future__ import annotations

import torch

from richkd.pipeline.errors import UserError

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
    return value


def standardize(logits: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-sample z-score over classes, so sources of different spread weigh as alpha says."""
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True, unbiased=False)
    return (logits - mean) / (std + eps)


def fuse_logits(teacher_logits: torch.Tensor, clip_cosines: torch.Tensor, alpha: float, scale: float,
                standardized: bool = False) -> torch.Tensor:
    clip_logits = scale * clip_cosines
    if standardized:
        teacher_logits, clip_logits = standardize(teacher_logits), standardize(clip_logits)
    return alpha * teacher_logits + (1 - alpha) * clip_logits
