"""richkd: knowledge distillation from a conventional teacher and CLIP at once, from a cache of their outputs.

The Python API: `CachedTargets` serves a store's fused targets as a torch Dataset for any training loop, and the
losses `richkd distill` trains with are importable here too.
"""

from richkd.pipeline.fusion import fuse_logits
from richkd.pipeline.losses import FusedCRD, dkd_loss, kd_loss
from richkd.pipeline.targets import CachedTargets

__all__ = ["CachedTargets", "FusedCRD", "dkd_loss", "fuse_logits", "kd_loss"]
