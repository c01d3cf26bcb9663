"""`richkd distill`: train a student against fused targets read from the cache, with no teacher forward pass.

Epoch e replays view e mod V: the student sees the pixels the teacher and CLIP saw when the cache was
written, and its targets are those models' outputs on exactly those pixels.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from richkd.cache.reader import CacheReader
from richkd.pipeline.config import parse_size, require
from richkd.pipeline.data import require_labelled
from richkd.pipeline.datasets import open_dataset
from richkd.pipeline.fusion import Fusion, require_features, store_weights
from richkd.pipeline.losses import FusedCRD, dkd_loss, kd_loss
from richkd.pipeline.normalization import choose_normalization, normalized
from richkd.pipeline.runtime import Part, console
from richkd.pipeline.seeding import CRD_MEMORY, NEGATIVES, holdout_split, seeded_generator, seeded_model
from richkd.pipeline.shards import ShardSet, open_shard_set
from richkd.pipeline.streaming import ShardStream
from richkd.pipeline.targets import EpochTargets
from richkd.pipeline.topk import SparseLogits, as_dense, sparse_kd_loss
from richkd.pipeline.training import Trainer, run_per_seed
from richkd.pipeline.variants import feature_weights, run_weights
from richkd.pipeline.views import mixing, policy_from_description
from richkd.stages.options import DistillConfig, LossOptions


def kd_term(logits, fused, labels, options: LossOptions, epoch: int) -> torch.Tensor:
    if isinstance(fused, SparseLogits):
        return sparse_kd_loss(logits, fused, options.temperature)
    return kd_loss(logits, fused, options.temperature)


def dkd_term(logits, fused, labels, options: LossOptions, epoch: int) -> torch.Tensor:
    """DKD, its weight ramped in over --dkd-warmup epochs as in DKD's paper."""
    warmup = min((epoch + 1) / options.dkd_warmup, 1.0) if options.dkd_warmup else 1.0
    # DKD's split into the label and the rest needs every class: a sparse target is densified.
    return warmup * dkd_loss(logits, as_dense(fused), labels, options.dkd_alpha, options.dkd_beta,
                             options.temperature)


# The losses between the student's logits and the fused target, `loss(logits, fused, labels, options, epoch)`,
# each weighted by --logit-weight or its entry in LOGIT_LOSS_WEIGHTS: a new one is a function and two entries.
LOGIT_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor, LossOptions, int], torch.Tensor]] = {
    "kd": kd_term, "dkd": dkd_term}


def sample_negatives(labels: np.ndarray, pool: np.ndarray, pool_labels: np.ndarray, k: int,
                     rng: np.random.Generator) -> torch.Tensor:
    """k rows of `pool` per sample, drawn uniformly with replacement from those of other classes (CRD's 'exact')."""
    candidates = rng.integers(0, len(pool), (len(labels), k))
    clash = pool_labels[candidates] == labels[:, None]
    while clash.any():
        candidates[clash] = rng.integers(0, len(pool), int(clash.sum()))
        clash = pool_labels[candidates] == labels[:, None]
    return torch.from_numpy(pool[candidates])


class DistillObjective(nn.Module):
    """Cross-entropy, a logit loss on the fused logits and CRD on the fused features, of targets read by `targets`:
    the losses only, with the weights of `losses`; `fusion` makes z_F of the cached logits (None: no logit loss)
    and `crd` contrasts the features with `nce_k` negatives of other classes per sample (None: no feature loss)."""

    def __init__(self, losses: LossOptions, targets: EpochTargets, fusion: Fusion | None, crd: FusedCRD | None,
                 nce_k: int, seed: int, feature_arrays: dict[str, str] | None = None):
        """`feature_arrays`: the cached features of each source CRD fuses, by source."""
        super().__init__()
        self.options, self.targets, self.fusion, self.crd = losses, targets, fusion, crd
        self.feature_arrays = feature_arrays or {}
        self.nce_k, self.seed = nce_k, seed
        self.training_labels = targets.labels[targets.training_rows]
        self.negatives: np.random.Generator | None = None

    def epoch_data(self, epoch: int, part: Part) -> tuple[np.ndarray, np.ndarray] | ShardStream:
        self.negatives = np.random.default_rng((self.seed, epoch, NEGATIVES, *([part.index] * (part.count > 1))))
        return self.targets.epoch_data(epoch, part)

    def losses(self, logits, features, labels, indices, epoch, targets=None) -> dict[str, torch.Tensor]:
        options = self.options
        rows = self.targets.store_rows(indices)
        terms = {"ce": options.ce_weight * F.cross_entropy(logits, labels)}
        if self.fusion is None and self.crd is None:
            return terms
        device = logits.device
        if targets is None:
            targets = self.targets.gather(rows)
        targets = {name: values.to(device, non_blocking=True) for name, values in targets.items()}
        if self.fusion is not None:
            terms["logit"] = options.logit_loss_weight * LOGIT_LOSSES[options.logit_loss](
                logits, self.fusion.fuse(targets), labels, options, epoch)
        if self.crd is not None:
            negatives = sample_negatives(self.targets.labels[rows.numpy()], self.targets.training_rows,
                                         self.training_labels, self.nce_k, self.negatives)
            contrast_index = torch.cat([rows[:, None], negatives], dim=1).to(device)
            source_features = {name: targets[self.feature_arrays[name]] for name in self.crd.weights}
            terms["feature"] = options.feature_weight * options.feature_schedule(epoch) * self.crd(
                features, source_features, rows.to(device), contrast_index)
        return terms

    def end_epoch(self) -> None:
        self.targets.end_epoch()


def logit_fusion(config: DistillConfig, reader: CacheReader) -> Fusion | None:
    """How `config`'s run fuses `reader`'s logits into z_F; None without a logit loss."""
    if not config.uses_logits:
        return None
    weights = run_weights(config.variant, config.fuse_weights, config.alpha)
    return Fusion.of(reader, config.variant, weights, config.clip_scale, config.standardize)


def crd_weights(config: DistillConfig, reader: CacheReader, announce: bool = False) -> dict[str, float]:
    """Each source's weight in CRD's fused embedding, in store order: the weighted sources that store features (the
    others are left out, said when `announce`); empty without a feature loss. None of them storing features is an
    error."""
    if not config.uses_features:
        return {}
    weights = store_weights(reader, feature_weights(config.fuse_weights, config.feature_lam))
    weighted = [name for name, weight in weights.items() if weight > 0]
    featured = {name: weights[name] for name in weighted if reader.sources[name].features}
    if not featured:
        require_features(reader, weighted, f"variant {config.variant}",
                         "use variant L, or precompute with --outputs all")
    if announce and len(featured) < len(weighted):
        logits_only = [name for name in weighted if name not in featured]
        console.print(f"CRD fuses the features of {', '.join(featured)}: {', '.join(logits_only)} "
                      f"{'stores' if len(logits_only) == 1 else 'store'} logits only (precompute --outputs logits)")
    return featured


def cached_arrays(fusion: Fusion | None, crd_sources: dict[str, float], reader: CacheReader) -> tuple[str, ...]:
    """The per-view arrays a run of `fusion` (`logit_fusion`) and CRD over `crd_sources` (`crd_weights`) reads from
    `reader`'s store, as the store holds them: z_F's logits (a top-k store's pairs), then the features CRD fuses;
    nothing a zero weight makes irrelevant."""
    return (fusion.arrays if fusion is not None else ()) + tuple(reader.sources[name].features for name in crd_sources)


def distill_objective(config: DistillConfig, reader: CacheReader, rows: np.ndarray | None, student_dim: int,
                      training_rows: np.ndarray, shards: ShardSet | None = None, policy=None) -> DistillObjective:
    """The objective of `config`'s run on `reader`'s targets; `rows`, `training_rows`, `shards` and `policy` as
    EpochTargets takes them."""
    layout = reader.layout
    fusion, features = logit_fusion(config, reader), crd_weights(config, reader, announce=True)
    targets = EpochTargets(reader, cached_arrays(fusion, features, reader), rows, training_rows,
                           parse_size(config.cache_memory), config.seed, config.epochs, shards, policy,
                           config.num_workers, config.shuffle_buffer)
    if fusion is not None and layout.topk and config.temperature != layout.topk_temperature:
        console.print(f"the store holds the top {layout.topk} logits, the other classes' mass kept exact at "
                      f"T = {layout.topk_temperature:g}: at --temperature {config.temperature:g} it is approximate "
                      "(benchmarks/topk_targets.py measures how much)", soft_wrap=True)
    crd, nce_k = None, config.nce_k
    if features:
        training_labels = targets.labels[training_rows]
        require(len(np.unique(training_labels)) > 1, "CRD needs at least two classes to draw negatives from")
        # Negatives are the other training samples: more of them than there are only repeats the same rows.
        if nce_k >= len(training_rows):
            nce_k = len(training_rows) - 1
            console.print(f"--nce-k {config.nce_k} is not below the {len(training_rows)} training samples: "
                          f"CRD draws {nce_k} negatives per sample")
        crd = FusedCRD(student_dim, {name: reader.sources[name].dim for name in features}, features,
                       num_data=layout.samples, embed_dim=config.embed_dim, nce_temperature=config.nce_temperature,
                       momentum=config.nce_momentum, generator=seeded_generator(config.seed, 0, CRD_MEMORY))
    return DistillObjective(config, targets, fusion, crd, nce_k, config.seed,
                            {name: reader.sources[name].features for name in features})


def run(config: DistillConfig) -> dict:
    return run_per_seed(config, distill_one)


def distill_one(config: DistillConfig) -> dict:
    reader = CacheReader(config.cache)
    fusion, features = logit_fusion(config, reader), crd_weights(config, reader)
    # Only what the run reads: a source being added to the store meanwhile may be unfinished.
    reader.require_complete(tuple(dict.fromkeys([*(fusion.weights if fusion else ()), *features])))
    policy = policy_from_description(reader.attrs["views"])
    if mixing(policy) is not None:
        require(not config.stream, "the store mixes each view with another sample's, whose image a stream cannot "
                "fetch: distill it without --stream")
        require(not (config.uses_logits and config.logit_loss == "dkd"), "--logit-loss dkd splits off the label's "
                "class, which a mixed view does not have one of: use kd with a store made with --mix")
    if config.stream:  # nothing is indexed: both splits are read front to back
        reader.require_dataset(split=config.split)
        recorded = reader.attrs["dataset"]
        dataset = shards = open_shard_set(config.data_root, config.split, recorded)
        rows = None  # each streamed sample is found in the store by its key
        eval_dataset = open_shard_set(config.data_root, config.eval_split, recorded)
    else:
        dataset, shards = open_dataset(config.dataset, config.data_root, config.split, config.download), None
        eval_dataset = open_dataset(config.dataset, config.data_root, config.eval_split, config.download)
        require_labelled(dataset, "--split")
        require_labelled(eval_dataset, "--eval-split")
        rows = reader.rows_of(dataset)
    # The student may be fed another normalisation than the teacher was; by default it is the teacher's.
    normalization = choose_normalization(config.normalize, dataset, reader.teacher_input_transform,
                                         f"the store {config.cache}")
    dataset, eval_dataset = normalized(dataset, normalization), normalized(eval_dataset, normalization)
    model = seeded_model(config.arch, len(dataset.class_names), config.seed)
    # Held out by store row: the same samples whatever order the dataset lists them in.
    training_rows, validation_rows = holdout_split(reader.layout.samples, config.val_fraction, config.seed)
    objective = distill_objective(config, reader, rows, model.feature_dim, training_rows, shards, policy)
    validation = validation_rows if rows is None else np.sort(objective.targets.sample_of_row[validation_rows])
    info = {"arch": config.arch, "num_classes": len(dataset.class_names), "kind": "distill",
            "class_names": list(dataset.class_names), "view_policy": reader.attrs["views"],
            "normalization": normalization.describe(),
            "cache": reader.provenance()}
    return Trainer(config, model, objective, dataset, eval_dataset, policy, info, validation,
                   announce=(normalization.summary(),)).run()
