"""`richkd train`: supervised training of any zoo model on labels alone.

How users make a teacher for their own dataset, and the label-only baseline of a student. Each epoch
sees a fresh random view of every sample, drawn from (seed, epoch, sample) so a resumed run repeats it.
"""

from __future__ import annotations

from dataclasses import dataclass

from richkd.pipeline.config import ViewOptions
from richkd.pipeline.datasets import open_dataset
from richkd.pipeline.normalization import choose_normalization, normalized
from richkd.pipeline.seeding import holdout_split, seeded_model
from richkd.pipeline.training import SupervisedObjective, Trainer, run_per_seed
from richkd.pipeline.training_options import TrainingOptions
from richkd.pipeline.views import describe_policy, make_view_policy, policy_summary


@dataclass
class TrainConfig(TrainingOptions, ViewOptions):
    """Supervised training: the shared training options, and how each epoch's random views are made."""


def run(config: TrainConfig) -> dict:
    return run_per_seed(config, train_one)


def train_one(config: TrainConfig) -> dict:
    dataset = open_dataset(config.dataset, config.data_root, config.split, config.download)
    normalization = choose_normalization(config.normalize, dataset)
    dataset = normalized(dataset, normalization)
    eval_dataset = normalized(open_dataset(config.dataset, config.data_root, config.eval_split, config.download),
                              normalization)
    policy = make_view_policy(config.view_policy, dataset.native_size, config.image_size, config.augment,
                              config.random_erase, config.mix, len(dataset))
    model = seeded_model(config.arch, len(dataset.class_names), config.seed)
    info = {"arch": config.arch, "num_classes": len(dataset.class_names), "kind": "train",
            "class_names": list(dataset.class_names), "view_policy": describe_policy(policy),
            "normalization": normalization.describe()}
    training, validation = holdout_split(len(dataset), config.val_fraction, config.seed)
    objective = SupervisedObjective(training, len(dataset), config.seed)
    return Trainer(config, model, objective, dataset, eval_dataset, policy, info, validation,
                   announce=(policy_summary(policy, dataset.native_size), normalization.summary())).run()
