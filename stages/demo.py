"""`richkd demo`: write the built-in demo dataset (images and captions), deterministically and offline."""

from __future__ import annotations

from dataclasses import dataclass

from richkd.pipeline.config import option, require
from richkd.pipeline.demo import CLASS_NAMES, write_demo


@dataclass
class DemoConfig:
    out: str = option("data/demo", "Directory to write <split>/<class>/<index>.png and <split>/captions.json.",
                      "Output")
    train: int = option(4000, "Training images.", "Output")
    test: int = option(1000, "Test images.", "Output")
    seed: int = option(0, "Seed: the same seed writes the same images, byte for byte.", "Output")

    def validate(self) -> None:
        require(self.train >= 1 and self.test >= 1, "--train and --test must be at least 1")


def run(config: DemoConfig) -> dict:
    write_demo(config.out, config.train, config.test, config.seed)
    return {"out": config.out, "classes": list(CLASS_NAMES), "train": config.train, "test": config.test}
