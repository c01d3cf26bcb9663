"""`richkd demo`: write a built-in dataset (images, captions and what each image shows), deterministically and
offline: the demo's shapes, or the study's patterned shapes with a shifted test split."""

from __future__ import annotations

import shutil
from pathlib import Path

from richkd.pipeline.demo import PRESETS, holds_only_a_demo, write_demo
from richkd.pipeline.errors import UserError
from richkd.pipeline.runtime import console
from richkd.stages.options import DemoConfig


def run(config: DemoConfig) -> dict:
    out = Path(config.out)
    if out.is_dir() and any(out.iterdir()):  # new images beside old ones of other sizes would mix two demos
        if not config.overwrite:
            raise UserError(f"--out {out} is not empty: pass --overwrite to replace the demo there")
        if not holds_only_a_demo(out):
            raise UserError(f"--out {out} holds files that are not a richkd demo: not replacing them")
        shutil.rmtree(out)
    write_demo(config.out, config.train, config.test, config.pool, config.seed, config.side, config.preset,
               config.shifted)
    counts = ", ".join(f"{count:,} {split}" for split, count in
                       (("train", config.train), ("test", config.test), ("shifted", config.shifted),
                        ("pool", config.pool)) if count)
    console.print(f"{config.preset} demo written to {out}: {counts} images", soft_wrap=True)
    return {"out": config.out, "preset": config.preset, "classes": list(PRESETS[config.preset].class_names),
            "train": config.train, "test": config.test, "shifted": config.shifted, "pool": config.pool}
