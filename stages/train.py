"""`richkd train`: supervised training of any zoo model on labels alone.

How users make a teacher for their own dataset, and the label-only baseline of a student. Each epoch
sees a fresh random view of every sample, drawn from (seed, epoch, sample) so a resumed run repeats it.
With --stream the tar shards are read once for their keys and labels, then front to back every epoch.
"""

from __future__ import annotations

from richkd.pipeline.data import require_labelled
from richkd.pipeline.datasets import open_dataset
from richkd.pipeline.normalization import choose_normalization, normalized
from richkd.pipeline.runtime import Part
from richkd.pipeline.seeding import holdout_split, seeded_model
from richkd.pipeline.shards import scan_shards, shard_starts, streamed_shard_set
from richkd.pipeline.streaming import LabelStream, epoch_shard_order
from richkd.pipeline.training import SupervisedObjective, Trainer, run_per_seed
from richkd.pipeline.views import describe_policy, make_view_policy, policy_summary
from richkd.stages.options import TrainConfig


def run(config: TrainConfig) -> dict:
    return run_per_seed(config, train_one)


def train_one(config: TrainConfig) -> dict:
    if config.stream:
        shards = streamed_shard_set(config.data_root, config.split, config.class_names)
        dataset = scan_shards(shards, config.split)
        eval_dataset = streamed_shard_set(config.data_root, config.eval_split, config.class_names)
    else:
        dataset = open_dataset(config.dataset, config.data_root, config.split, config.download)
        eval_dataset = open_dataset(config.dataset, config.data_root, config.eval_split, config.download)
        require_labelled(dataset, "--split")
        require_labelled(eval_dataset, "--eval-split")
    normalization = choose_normalization(config.normalize, dataset)
    dataset, eval_dataset = normalized(dataset, normalization), normalized(eval_dataset, normalization)
    policy = make_view_policy(config.view_policy, dataset.native_size, config.image_size, config.augment,
                              config.random_erase, config.mix, len(dataset))
    model = seeded_model(config.arch, len(dataset.class_names), config.seed)
    info = {"arch": config.arch, "num_classes": len(dataset.class_names), "kind": "train",
            "class_names": list(dataset.class_names), "view_policy": describe_policy(policy),
            "normalization": normalization.describe()}
    training, validation = holdout_split(len(dataset), config.val_fraction, config.seed)
    stream = None
    if config.stream:
        first_rows = dict(zip(shards.urls, shard_starts(dataset.shard_sizes)[:-1].tolist()))

        def stream(epoch: int, part: Part) -> LabelStream:
            return LabelStream(epoch_shard_order(shards.urls, config.seed, epoch), dataset, first_rows, policy, part,
                               config.num_workers, config.shuffle_buffer, config.seed, epoch)
    objective = SupervisedObjective(training, len(dataset), config.seed, stream)
    return Trainer(config, model, objective, dataset, eval_dataset, policy, info, validation,
                   announce=(policy_summary(policy, dataset.native_size), normalization.summary())).run()
