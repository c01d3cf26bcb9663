"""richkd: knowledge distillation from a conventional teacher and CLIP at once, from a cache of their outputs.

The Python API: `CachedTargets` serves a store's fused targets as a torch Dataset for any training loop, and the
losses `richkd distill` trains with are importable here too. They are imported when first used, so that the
command line, which imports this package, starts without torch.
"""

import importlib

# Each public name, and the module that defines it.
EXPORTS = {
    "CachedTargets": "richkd.pipeline.targets",
    "FusedCRD": "richkd.pipeline.losses",
    "dkd_loss": "richkd.pipeline.losses",
    "fuse_logits": "richkd.pipeline.fusion",
    "kd_loss": "richkd.pipeline.losses",
}
__all__ = sorted(EXPORTS)


def __getattr__(name: str):
    if name not in EXPORTS:
        raise AttributeError(f"module 'richkd' has no attribute '{name}'")
    value = getattr(importlib.import_module(EXPORTS[name]), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *EXPORTS])
