"""`richkd train`: supervised training of any zoo model on labels alone.

How users make a teacher for their own dataset, and the label-only baseline of a student. Each epoch
sees a fresh random view of every sample, drawn from (seed, epoch, sample) so a resumed run repeats it.
"""

from __future__ import annotations

from dataclasses import dataclass

from richkd.pipeline.config import option, require
from richkd.pipeline.data import open_dataset
from richkd.pipeline.training import SupervisedObjective, Trainer, TrainingOptions, seeded_model
from richkd.pipeline.views import describe_policy, make_view_policy


@dataclass
class TrainConfig(TrainingOptions):
    view_policy: str = option("auto", "auto, pad_crop (RandomCrop+flip, 32x32 data) or resized_crop.", "Data")
    image_size: int | None = option(
        None, "Side of each view (default: the images' side, or 224 for resized crops).", "Data")

    def validate(self) -> None:
        super().validate()
        require(self.image_size is None or self.image_size >= 1, f"--image-size must be positive, got {self.image_size}")


def run(config: TrainConfig) -> dict:
    dataset = open_dataset(config.dataset, config.data_root, config.split, config.download)
    eval_dataset = open_dataset(config.dataset, config.data_root, config.eval_split, config.download)
    policy = make_view_policy(config.view_policy, dataset.native_size, config.image_size)
    model = seeded_model(config.arch, len(dataset.class_names), config.seed)
    info = {"arch": config.arch, "num_classes": len(dataset.class_names), "kind": "train",
            "class_names": list(dataset.class_names), "view_policy": describe_policy(policy)}
    objective = SupervisedObjective(len(dataset), config.seed)
    return Trainer(config, model, objective, dataset, eval_dataset, policy, info).run()
