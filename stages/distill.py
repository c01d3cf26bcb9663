"""`richkd distill`: train a student against fused targets read from the cache, with no teacher forward pass.

Epoch e replays view e mod V: the student sees the pixels the teacher and CLIP saw when the cache was
written, and its targets are those models' outputs on exactly those pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from richkd.cache.reader import CacheReader
from richkd.pipeline.config import Options, option, parse_size, require, require_positive
from richkd.pipeline.datasets import open_dataset
from richkd.pipeline.distributed import Part
from richkd.pipeline.fusion import DEFAULT_ALPHA, VARIANTS, Fusion, clip_scale_value
from richkd.pipeline.losses import FusedCRD, dkd_loss, kd_loss
from richkd.pipeline.normalization import choose_normalization, normalized
from richkd.pipeline.runtime import console
from richkd.pipeline.seeding import CRD_MEMORY, NEGATIVES, holdout_split, seeded_generator, seeded_model
from richkd.pipeline.shards import ShardSet, open_shard_set
from richkd.pipeline.streaming import ShardStream
from richkd.pipeline.targets import EpochTargets
from richkd.pipeline.topk import SparseLogits, as_dense, sparse_kd_loss
from richkd.pipeline.training import Trainer, run_per_seed
from richkd.pipeline.training_options import TrainingOptions
from richkd.pipeline.views import mixing, policy_from_description


@dataclass
class LossOptions(Options):
    """The weights and settings of distill's losses: all that DistillObjective reads of a run's options."""

    logit_loss: str = option("kd", "Loss on fused logits: kd or dkd.", "Distillation")
    temperature: float = option(3.0, "Distillation temperature T.", "Distillation")
    ce_weight: float = option(1.0, "Weight of cross-entropy on labels.", "Loss weights")
    logit_weight: float | None = option(None, "Weight of the logit loss (default: 3 for kd, 1 for dkd).",
                                        "Loss weights")
    feature_weight: float = option(0.8, "Weight of the CRD feature loss.", "Loss weights")
    dkd_alpha: float = option(1.0, "DKD: weight of target-class KD.", "Loss weights")
    dkd_beta: float = option(8.0, "DKD: weight of non-target-class KD.", "Loss weights")
    dkd_warmup: int = option(20, "DKD: epochs over which its weight ramps up linearly.", "Loss weights")
    feature_start_epoch: int = option(
        0, "CRD: epochs before the feature loss counts (its memory bank fills meanwhile).", "CRD")
    feature_warmup_epochs: int = option(
        0, "CRD: epochs over which the feature loss's weight then ramps up linearly to --feature-weight.", "CRD")

    def validate(self) -> None:
        super().validate()
        require(self.logit_loss in LOGIT_LOSSES,
                f"--logit-loss must be {' or '.join(LOGIT_LOSSES)}, got '{self.logit_loss}'")
        require_positive(self.temperature, "--temperature")
        for name in ("ce_weight", "logit_weight", "feature_weight", "dkd_alpha", "dkd_beta"):
            value = getattr(self, name)
            require(value is None or value >= 0, f"--{name.replace('_', '-')} must be 0 or more, got {value}")
        require(self.dkd_warmup >= 0, f"--dkd-warmup must be 0 or more, got {self.dkd_warmup}")
        require(self.feature_start_epoch >= 0,
                f"--feature-start-epoch must be 0 or more, got {self.feature_start_epoch}")
        require(self.feature_warmup_epochs >= 0,
                f"--feature-warmup-epochs must be 0 or more, got {self.feature_warmup_epochs}")

    @property
    def logit_loss_weight(self) -> float:
        if self.logit_weight is not None:
            return self.logit_weight
        return LOGIT_LOSSES[self.logit_loss].default_weight

    def feature_schedule(self, epoch: int) -> float:
        """Factor of the feature loss's weight in `epoch`: 0 before the start, then a linear ramp to 1."""
        if epoch < self.feature_start_epoch:
            return 0.0
        if not self.feature_warmup_epochs:
            return 1.0
        return min((epoch - self.feature_start_epoch + 1) / self.feature_warmup_epochs, 1.0)


@dataclass
class DistillConfig(LossOptions, TrainingOptions):
    cache: str = option("cache/teachers.zarr", "The cache store written by `richkd precompute`.", "Cache")
    cache_memory: str = option(
        "4GiB", "Memory for cached targets: views that fit are read whole, larger ones streamed.", "Cache")
    variant: str = option(
        "LF", "; ".join(f"{name}: {variant.description}" for name, variant in VARIANTS.items()) + ".",
        "Distillation")
    alpha: float = option(DEFAULT_ALPHA, "Logit fusion weight: z_F = alpha z_T + (1 - alpha) z_C; 1 is plain KD.",
                          "Distillation")
    lam: float | None = option(None, "Feature fusion weight of the teacher (default: alpha).", "Distillation")
    clip_scale: str = option(
        "raw", "CLIP logits z_C = scale * cosine: raw (1), clip (exp(logit_scale)) or a number.", "Distillation")
    standardize: bool = option(False, "z-score each sample's teacher and CLIP logits before fusing.",
                               "Distillation")
    nce_k: int = option(16384, "CRD: negatives per sample (clamped below the number of training samples).", "CRD")
    nce_temperature: float = option(0.07, "CRD: NCE temperature.", "CRD")
    nce_momentum: float = option(0.5, "CRD: memory bank momentum.", "CRD")
    embed_dim: int = option(128, "CRD: dimension of the contrastive embedding.", "CRD")
    stream: bool = option(
        False, "Stream the training tar shards (--dataset webdataset) front to back, each sample's cache row read "
        "alongside, instead of reading both by index: sequential reads for shards and stores on slow or remote "
        "storage; `pipe:` URLs work. Precompute from the same shards, so that both run in the same order.",
        "Streaming")
    out: str = option("runs/student", "Run directory: checkpoints, metrics, resolved config.", "Run")

    def validate(self) -> None:
        super().validate()
        require(self.variant in VARIANTS, f"--variant must be one of {', '.join(VARIANTS)}, got '{self.variant}'")
        require(0 <= self.alpha <= 1, f"--alpha must be in [0, 1], got {self.alpha}")
        require(self.lam is None or 0 <= self.lam <= 1, f"--lam must be in [0, 1], got {self.lam}")
        require(self.nce_k >= 1, f"--nce-k must be at least 1, got {self.nce_k}")
        require_positive(self.nce_temperature, "--nce-temperature")
        require(0 <= self.nce_momentum < 1, f"--nce-momentum must be in [0, 1), got {self.nce_momentum}")
        require(self.embed_dim >= 1, f"--embed-dim must be at least 1, got {self.embed_dim}")
        clip_scale_value(self.clip_scale, logit_scale=1.0)  # checks the flag; the store supplies the real scale
        parse_size(self.cache_memory, "--cache-memory")

    @property
    def feature_lam(self) -> float:
        return self.alpha if self.lam is None else self.lam

    @property
    def uses_logits(self) -> bool:
        return VARIANTS[self.variant].logits and self.logit_loss_weight > 0

    @property
    def uses_features(self) -> bool:
        return VARIANTS[self.variant].features and self.feature_weight > 0

    def cached_arrays(self, topk: int = 0) -> tuple[str, ...]:
        """The per-view arrays this run reads from a store of `topk`: nothing a zero weight makes irrelevant."""
        names = VARIANTS[self.variant].logit_arrays(self.alpha, topk) if self.uses_logits else ()
        if self.uses_features:
            names += ("teacher/features",) * (self.feature_lam > 0) + ("clip/image_embeds",) * (self.feature_lam < 1)
        return names


@dataclass(frozen=True)
class LogitLoss:
    """A loss between the student's logits and the fused target: `compute(logits, fused, labels, options, epoch)`,
    weighted by --logit-weight, `default_weight` unless given. A new one is a function and a registry entry."""

    compute: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, LossOptions, int], torch.Tensor]
    default_weight: float


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


# DKD carries its own alpha and beta, so it is weighted 1 unless told otherwise (as in DKD's paper).
LOGIT_LOSSES = {"kd": LogitLoss(kd_term, 3.0), "dkd": LogitLoss(dkd_term, 1.0)}


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
                 nce_k: int, seed: int):
        super().__init__()
        self.options, self.targets, self.fusion, self.crd = losses, targets, fusion, crd
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
            terms["logit"] = options.logit_loss_weight * LOGIT_LOSSES[options.logit_loss].compute(
                logits, self.fusion.fuse(targets), labels, options, epoch)
        if self.crd is not None:
            negatives = sample_negatives(self.targets.labels[rows.numpy()], self.targets.training_rows,
                                         self.training_labels, self.nce_k, self.negatives)
            contrast_index = torch.cat([rows[:, None], negatives], dim=1).to(device)
            terms["feature"] = options.feature_weight * options.feature_schedule(epoch) * self.crd(
                features, targets.get("teacher/features"), targets.get("clip/image_embeds"), rows.to(device),
                contrast_index)
        return terms

    def end_epoch(self) -> None:
        self.targets.end_epoch()


def distill_objective(config: DistillConfig, reader: CacheReader, rows: np.ndarray | None, student_dim: int,
                      training_rows: np.ndarray, shards: ShardSet | None = None, policy=None) -> DistillObjective:
    """The objective of `config`'s run on `reader`'s targets; `rows`, `training_rows`, `shards` and `policy` as
    EpochTargets takes them."""
    layout = reader.layout
    targets = EpochTargets(reader, config.cached_arrays(layout.topk), rows, training_rows,
                           parse_size(config.cache_memory), config.seed, config.epochs, shards, policy,
                           config.num_workers, config.shuffle_buffer)
    fusion = (Fusion.of(config.variant, config.alpha, config.clip_scale, reader.attrs["clip"]["logit_scale"],
                        config.standardize, layout.topk, layout.classes) if config.uses_logits else None)
    if fusion is not None and layout.topk and config.temperature != layout.topk_temperature:
        console.print(f"the store holds the top {layout.topk} logits, the other classes' mass kept exact at "
                      f"T = {layout.topk_temperature:g}: at --temperature {config.temperature:g} it is approximate "
                      "(benchmarks/topk_targets.py measures how much)", soft_wrap=True)
    crd, nce_k = None, config.nce_k
    if config.uses_features:
        training_labels = targets.labels[training_rows]
        require(len(np.unique(training_labels)) > 1, "CRD needs at least two classes to draw negatives from")
        # Negatives are the other training samples: more of them than there are only repeats the same rows.
        if nce_k >= len(training_rows):
            nce_k = len(training_rows) - 1
            console.print(f"--nce-k {config.nce_k} is not below the {len(training_rows)} training samples: "
                          f"CRD draws {nce_k} negatives per sample")
        crd = FusedCRD(student_dim, layout.teacher_dim, layout.clip_dim, num_data=layout.samples,
                       lam=config.feature_lam, embed_dim=config.embed_dim, nce_temperature=config.nce_temperature,
                       momentum=config.nce_momentum, generator=seeded_generator(config.seed, 0, CRD_MEMORY))
    return DistillObjective(config, targets, fusion, crd, nce_k, config.seed)


def run(config: DistillConfig) -> dict:
    return run_per_seed(config, distill_one)


def distill_one(config: DistillConfig) -> dict:
    reader = CacheReader(config.cache)
    reader.require_complete()
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
        rows = reader.rows_of(dataset)
        eval_dataset = open_dataset(config.dataset, config.data_root, config.eval_split, config.download)
    # The student may be fed another normalisation than the teacher was; by default it is the teacher's.
    normalization = choose_normalization(config.normalize, dataset, reader.attrs["teacher"]["input_transform"],
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
            "cache": {key: reader.attrs[key] for key in ("dataset", "views", "teacher", "clip", "layout")}}
    return Trainer(config, model, objective, dataset, eval_dataset, policy, info, validation,
                   announce=(normalization.summary(),)).run()
