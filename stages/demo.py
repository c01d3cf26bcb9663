"""`richkd demo`: write the built-in demo dataset (images and captions), deterministically and offline."""

from __future__ import annotations

from dataclasses import dataclass

from richkd.pipeline.config import option, require
from richkd.pipeline.demo import CLASS_NAMES, SIDE, write_demo


@dataclass
class DemoConfig:
    out: str = option("data/demo", "Directory to write <split>/<class>/<index>.png and <split>/captions.json.",
                      "Output")
    train: int = option(1000, "Labelled training images.", "Output")
    test: int = option(2000, "Labelled test images.", "Output")
    pool: int = option(0, "Unlabelled images with captions (<out>/pool/unlabelled/), for training a CLIP on "
                       "more image-text pairs than there are labels.", "Output")
    side: int = option(SIDE, "Image side in pixels (objects scale with it).", "Output")
    seed: int = option(0, "Seed: the same seed writes the same images, byte for byte.", "Output")

    def validate(self) -> None:
        require(self.train >= 1 and self.test >= 1, "--train and --test must be at least 1")
        require(self.pool >= 0, f"--pool must be 0 or more, got {self.pool}")
        require(self.side >= 8, f"--side must be at least 8 pixels, got {self.side}")


def run(config: DemoConfig) -> dict:
    write_demo(config.out, config.train, config.test, config.pool, config.seed, config.side)
    return {"out": config.out, "classes": list(CLASS_NAMES), "train": config.train, "test": config.test,
            "pool": config.pool}
