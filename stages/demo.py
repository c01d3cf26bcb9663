"""`richkd demo`: write a built-in dataset (images, captions and what each image shows), deterministically and
offline: the demo's shapes, or the study's patterned shapes with a shifted test split."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from richkd.pipeline.config import option, require
from richkd.pipeline.demo import PRESETS, SIDE, holds_only_a_demo, write_demo
from richkd.pipeline.errors import UserError
from richkd.pipeline.runtime import console


@dataclass
class DemoConfig:
    out: str = option("data/demo", "Directory to write <split>/<class>/<index>.png, <split>/captions.json and "
                      "<split>/attributes.json (and superclasses.json for a preset that has them).", "Output")
    preset: str = option(
        "shapes", "; ".join(f"{name}: {preset.description}" for name, preset in PRESETS.items()) + ".", "Output")
    train: int = option(1000, "Labelled training images.", "Output")
    test: int = option(2000, "Labelled test images.", "Output")
    shifted: int = option(0, "Labelled test images under distribution shift (the study preset: objects in colours "
                          "the train and test splits never show, the pool does).", "Output")
    pool: int = option(0, "Unlabelled images with captions (<out>/pool/unlabelled/), for training a CLIP on "
                       "more image-text pairs than there are labels.", "Output")
    side: int = option(SIDE, "Image side in pixels (objects scale with it).", "Output")
    seed: int = option(0, "Seed: the same seed writes the same images, byte for byte.", "Output")
    overwrite: bool = option(False, "Replace the demo already in --out (a folder holding anything else is never "
                             "replaced).", "Output")

    def validate(self) -> None:
        require(self.preset in PRESETS, f"--preset must be one of {', '.join(PRESETS)}, got '{self.preset}'")
        require(self.train >= 1 and self.test >= 1, "--train and --test must be at least 1")
        require(self.pool >= 0, f"--pool must be 0 or more, got {self.pool}")
        require(self.seed >= 0, f"--seed must be 0 or more, got {self.seed}")
        require(self.shifted >= 0, f"--shifted must be 0 or more, got {self.shifted}")
        require(not self.shifted or "shifted" in PRESETS[self.preset].splits,
                f"preset {self.preset} has no shifted split: use --preset study for one")
        require(self.side >= 8, f"--side must be at least 8 pixels, got {self.side}")


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
