"""A store's targets: epoch by epoch for `richkd distill`, as a torch Dataset for other training loops (the Python
API), and their quality against the labels.

    from richkd import CachedTargets, kd_loss
    targets = CachedTargets("cache/cifar100.zarr", "cifar100", "data", variant="L", alpha=0.7)
    for batch in DataLoader(targets, batch_size=64, shuffle=True):
        logits, _ = student(batch["image"])
        loss = F.cross_entropy(logits, batch["label"]) + 3 * kd_loss(logits, batch["fused_logits"], 3.0)

Item i is sample i of the dataset, found in the store by its key, so the dataset may list its samples in another
order (or format) than the store was precomputed from. `set_epoch(e)` selects stored view e mod V, as distill does.
"""

from __future__ import annotations

import functools
import itertools
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import Dataset

from richkd.cache.reader import CacheReader, as_tensor, block_shuffled_order, shard_share
from richkd.cache.schema import Source
from richkd.pipeline.config import CONFIDENCE_THRESHOLD, require
from richkd.pipeline.data import normalize
from richkd.pipeline.datasets import open_dataset
from richkd.pipeline.execution import progress_bar
from richkd.pipeline.fusion import (
    Fusion,
    fuse_logits,
    require_features,
    scaled_logits,
    source_scale,
    store_weights,
)
from richkd.pipeline.loading import training_mask
from richkd.pipeline.metrics import ClassificationMeter, percent
from richkd.pipeline.normalization import choose_normalization
from richkd.pipeline.runtime import Part
from richkd.pipeline.seeding import ORDER, seeded_generator
from richkd.pipeline.shards import ShardSet
from richkd.pipeline.streaming import ShardStream, epoch_shard_order
from richkd.pipeline.topk import as_dense
from richkd.pipeline.variants import (
    CLIP,
    CLIP_SCALES,
    DEFAULT_ALPHA,
    TEACHER,
    VARIANTS,
    describe_weights,
    require_weights,
    run_weights,
)
from richkd.pipeline.views import (
    ViewPolicy,
    image_for_views,
    mix_params,
    mixed_label,
    mixing,
    policy_from_description,
    rebuild_view,
    with_partner_indices,
)

# The weights of the teacher, alpha, at which `richkd inspect` and `report` evaluate the fused targets of a store of
# the teacher and CLIP.
ALPHAS = tuple(round(0.1 * step, 1) for step in range(11))


class EpochTargets:
    """The cached arrays `names` of a run, epoch by epoch: epoch e reads stored view e mod V, its samples in an order
    drawn by (seed, e). A view that fits `memory_bytes` is read whole (the next one loaded ahead while this one
    trains), a larger one shard by shard; with `shards`, the targets come streamed beside the tar shards instead.

    `rows[i]` is the store row of dataset sample i (None: the same order); the epochs train on `training_rows`.
    """

    def __init__(self, reader: CacheReader, names: tuple[str, ...], rows: np.ndarray | None,
                 training_rows: np.ndarray, memory_bytes: int, seed: int, epochs: int, shards: ShardSet | None = None,
                 policy: ViewPolicy | None = None, workers: int = 0, shuffle_buffer: int = 1):
        self.reader, self.names, self.rows, self.training_rows = reader, names, rows, training_rows
        self.seed, self.epochs = seed, epochs
        self.shards, self.policy, self.workers, self.shuffle_buffer = shards, policy, workers, shuffle_buffer
        self.key_index = reader.key_index() if shards is not None else None
        self.sample_of_row = None if rows is None else np.argsort(rows)
        self.labels = reader.read("labels", 0, reader.layout.samples)  # by store row, as everything here
        self.trains_on = training_mask(reader.layout.samples, training_rows)
        views_held = min(2, reader.layout.views)  # the current view and the next one, loaded ahead
        self.in_memory = reader.fits_in_memory(names, memory_bytes // views_held)
        self.view_targets = None
        self.view: int | None = None
        self.reading = ThreadPoolExecutor(max_workers=1)
        self.next_view: tuple[int, Future] | None = None

    def _read_view(self, view: int, order: np.ndarray):
        return self.reader.open_view(view, self.names, order, self.in_memory)

    def _open_view(self, view: int, order: np.ndarray) -> None:
        """This epoch's targets: kept from the last epoch, loaded ahead during it, or read now."""
        if self.view_targets is not None and self.view == view:
            return
        if self.view_targets is not None:
            self.view_targets.close()
        if self.next_view is not None and self.next_view[0] == view:
            self.view_targets = self.next_view[1].result()
        else:
            self.view_targets = self._read_view(view, order)
        self.view, self.next_view = view, None

    def epoch_data(self, epoch: int, part: Part) -> tuple[np.ndarray, np.ndarray] | ShardStream:
        """(stored view params by dataset index, this process's dataset indices in the epoch's order), or the
        epoch's stream of (view, label, store row, targets)."""
        layout = self.reader.layout
        view = epoch % layout.views
        order_generator = seeded_generator(self.seed, epoch, ORDER)
        if self.shards is not None:
            urls = epoch_shard_order(self.shards.urls, self.seed, epoch)
            return ShardStream(urls, len(self.shards.class_names), self.reader.url, view, self.names, self.key_index,
                               self.policy, part, self.workers, self.shuffle_buffer, self.seed, epoch)
        if self.in_memory and part.count == 1:
            order = torch.randperm(layout.samples, generator=order_generator).numpy()
            order = order[self.trains_on[order]]
        else:  # shard by shard: read front to back, and each of several processes reads only its shards
            order = block_shuffled_order(layout, order_generator)
            order = shard_share(order[self.trains_on[order]], layout, part)
        if self.names:
            self._open_view(view, order)
            next_view = (epoch + 1) % layout.views
            if self.in_memory and next_view != view and epoch + 1 < self.epochs:
                self.next_view = (next_view, self.reading.submit(self._read_view, next_view, order))
        params = self.reader.read("views/params", 0, layout.samples, view)
        if self.rows is None:
            return params, order
        # The loader speaks dataset indices.
        return with_partner_indices(self.policy, params[self.rows], self.sample_of_row), self.sample_of_row[order]

    def store_rows(self, indices: torch.Tensor) -> torch.Tensor:
        """The store rows of a batch's dataset indices."""
        return indices if self.rows is None else torch.from_numpy(self.rows[indices.numpy()])

    def gather(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """This epoch's targets of these store rows."""
        return self.view_targets.gather(rows.numpy())

    def end_epoch(self) -> None:
        """A streamed view is read in one epoch's order only; a view in memory may serve the next epoch too."""
        if self.view_targets is not None and not self.in_memory:
            self.view_targets.close()
            self.view_targets = None


class CachedTargets(Dataset):
    """A store and the dataset split it was precomputed from. Each item is a dict:

    - `image`: the stored view of the sample, replayed to the pixels the teacher and CLIP saw, normalised as the
      store records the teacher's input (or as `normalize` says: see `richkd distill --help`), float (3, H, W);
    - `label`: its class id (a store made with `--mix`: its mixed label, lambda of its class and 1 - lambda of its
      partner's, a float vector over the classes); `row`: its store row (CRD's memory index);
    - `fused_logits`: z_F of `variant` (L: the sources' weighted sum, alpha z_T + (1 - alpha) z_C or as `fuse`
      weighs the store's sources by name; shrink: the classifier sources alone, alpha z_T; clip: the CLIP sources
      alone, their weights scaled to sum 1, z_C) with each CLIP's cosines times `clip_scale` (raw, clip: its own
      logit scale, or a number), each source z-scored first when `standardize`;
    - with `features`, each source's cached features by their array's name (`teacher/features`,
      `clip/image_embeds`, `<source>/image_embeds`): the teacher's and CLIP's, or with `fuse` those of the sources
      it gives a weight above 0.

    The arrays of the current view are held in memory (float16, as stored): samples x (classes + feature sizes).
    """

    def __init__(self, store: str, dataset: str, data_root: str, split: str = "train", *, variant: str = "L",
                 alpha: float = DEFAULT_ALPHA, fuse: dict[str, float] | None = None, clip_scale: str = "raw",
                 standardize: bool = False, features: bool = False, normalize: str = "auto"):
        require(variant in VARIANTS and VARIANTS[variant].logits,
                f"variant must be one with fused logits ({', '.join(n for n, v in VARIANTS.items() if v.logits)}), "
                f"got '{variant}'")
        require(0 <= alpha <= 1, f"alpha must be in [0, 1], got {alpha}")
        if fuse is not None:
            require_weights(fuse, "fuse")
        self.reader = CacheReader(store)
        self.fusion = Fusion.of(self.reader, variant, run_weights(variant, fuse, alpha), clip_scale, standardize,
                                "fuse")
        featured = []
        if features:  # the teacher's and CLIP's, whatever alpha, as before a store named its sources
            weights = {TEACHER: 1.0, CLIP: 1.0} if fuse is None else store_weights(self.reader, fuse, "fuse")
            featured = [name for name, weight in weights.items() if weight > 0]
        require_features(self.reader, featured, "CachedTargets(features=True)",
                         "pass features=False, or precompute with --outputs all")
        self.reader.require_complete(tuple(dict.fromkeys([*self.fusion.weights, *featured])))
        self.dataset = open_dataset(dataset, data_root, split)
        rows = self.reader.rows_of(self.dataset)
        self.rows = np.arange(len(self.dataset)) if rows is None else rows
        self.index_of_row = np.argsort(self.rows)
        self.policy = policy_from_description(self.reader.attrs["views"])
        self.normalization = choose_normalization(normalize, self.dataset,
                                                  self.reader.teacher_input_transform, f"the store {store}")
        self.features = tuple(self.reader.sources[name].features for name in featured)
        self.names = self.fusion.arrays + self.features
        self.view, self.arrays = None, {}
        self.set_epoch(0)

    @property
    def sources(self) -> dict[str, Source]:
        """The store's sources by name, in store order (each one's kind, feature size and outputs)."""
        return self.reader.sources

    @property
    def weights(self) -> dict[str, float]:
        """The weight of each source `fused_logits` is made of, by name."""
        return self.fusion.weights

    @property
    def class_names(self) -> list[str]:
        return list(self.dataset.class_names)

    def set_epoch(self, epoch: int) -> None:
        """Serve stored view `epoch` mod V from now on (call it before each epoch, as with a DistributedSampler)."""
        view = epoch % self.reader.layout.views
        if view != self.view:
            samples = self.reader.layout.samples
            self.arrays = {name: self.reader.read(name, 0, samples, view) for name in ("views/params", *self.names)}
            self.view = view

    def __len__(self) -> int:
        return len(self.dataset)

    def _partner(self, row: int) -> tuple[torch.Tensor, np.ndarray]:
        """A mixing partner's image and params of the current view, by store row."""
        return image_for_views(self.dataset, self.policy, int(self.index_of_row[row])), self.arrays["views/params"][row]

    def __getitem__(self, index: int) -> dict:
        row = int(self.rows[index])
        params = self.arrays["views/params"][row]
        view = rebuild_view(self.policy, image_for_views(self.dataset, self.policy, index), params, self._partner)
        image = normalize(view[None], self.normalization.mean, self.normalization.std)[0]
        cached = {name: as_tensor(self.arrays[name][row:row + 1]) for name in self.names}
        fused = as_dense(self.fusion.fuse(cached))[0]
        label = int(self.dataset.labels[index])
        if mixing(self.policy) is not None:
            partner = int(mix_params(self.policy, params)[1])
            label = mixed_label(self.policy, params, label, int(self.reader.read("labels", partner, partner + 1)[0]),
                                len(self.dataset.class_names))
        item = {"image": image, "label": label, "row": row, "fused_logits": fused}
        item.update({name: cached[name][0] for name in self.features})
        return item


# The sweep's name of the fusion that z-scores each source first (its CLIP scale cancels out).
STANDARDIZED = "standardized"
# The fusions the sweeps evaluate: each named CLIP scale (every CLIP at it), and every source z-scored.
SWEEP_FUSIONS = (*CLIP_SCALES, STANDARDIZED)
# The weight sweep of a store of other sources than the teacher and CLIP alone: every weighting of the sources in
# steps of 1 / SWEEP_STEPS that sums to 1.
SWEEP_STEPS = 10
# Where the teacher's and CLIP's errors fall, with how each is said.
ERROR_OVERLAP = {"both_right": "both right", "only_teacher_wrong": "only the teacher wrong",
                 "only_clip_wrong": "only CLIP wrong", "both_wrong": "both wrong"}


def sweep_fusions(reader: CacheReader) -> dict[str, tuple[dict[str, float], bool]]:
    """Each of SWEEP_FUSIONS as (each source's scale, standardized)."""
    return {**{name: ({source: source_scale(reader, source, name) for source in reader.sources}, False)
               for name in CLIP_SCALES},
            STANDARDIZED: (dict.fromkeys(reader.sources, 1.0), True)}


def simplex_weights(names: list[str], steps: int = SWEEP_STEPS) -> list[dict[str, float]]:
    """Every weighting of `names` in steps of 1 / `steps` that sums to 1."""
    weightings = []
    for bars in itertools.combinations(range(steps + len(names) - 1), len(names) - 1):
        edges = (-1, *bars, steps + len(names) - 1)
        counts = [right - left - 1 for left, right in itertools.pairwise(edges)]
        weightings.append({name: round(count / steps, 6) for name, count in zip(names, counts)})
    return weightings


def is_teacher_and_clip(reader: CacheReader) -> bool:
    """Whether the store holds the teacher and CLIP alone, whose fusion one weight, alpha, sweeps."""
    return set(reader.sources) == {TEACHER, CLIP}


def describe_overlap(overlap: dict[str, float]) -> str:
    """target_quality's error overlap as words: "both right 68.2%, only the teacher wrong 11.1%, ..."."""
    return ", ".join(f"{words} {percent(overlap[name])}" for name, words in ERROR_OVERLAP.items())


def describe_fused(quality: dict) -> str:
    """The fusion target_quality's `fused` row is of: "alpha 0.7, raw" or "teacher 0.5, clip 0.5, raw"."""
    weights = (f"alpha {quality['fused_alpha']}" if "fused_alpha" in quality
               else describe_weights({name: w for name, w in quality["fused_weights"].items() if w > 0}))
    return f"{weights}, {quality['fused_clip_scale']}"


def best_weightings(sweep: list[dict], count: int = 3) -> list[dict]:
    """The `count` best weightings of each fusion of a weight sweep, by top-1 then NLL."""
    best = []
    for name in SWEEP_FUSIONS:
        rows = [row for row in sweep if row["clip_scale"] == name]
        best += sorted(rows, key=lambda row: (-row["top1"], row["nll"]))[:count]
    return best


def target_quality(reader: CacheReader, max_views: int | None = None, alpha: float = DEFAULT_ALPHA,
                   clip_scale: str = "raw", standardized: bool = False,
                   confidence_threshold: float = CONFIDENCE_THRESHOLD,
                   superclasses: list[int] | None = None, fuse: dict[str, float] | None = None) -> dict:
    """Metrics of the cached targets against `labels`, over every written block: each source (a CLIP at its own
    scale, so that NLL and ECE mean something) under `sources`, the teacher and CLIP also by their names, the fused
    targets at (alpha or `fuse`, clip_scale, standardized), how the teacher's and CLIP's errors overlap (shares of
    the (view, sample) pairs), and a sweep of the weights: of alpha (`alpha_sweep`) for a store of the teacher and
    CLIP alone, else over every weighting in steps of 1 / SWEEP_STEPS (`weight_sweep`). With `superclasses` (each
    class's superclass number) the sources' and fused rows give their superclass share."""
    layout = reader.layout
    names = list(reader.sources)
    pair = is_teacher_and_clip(reader)
    fusions = sweep_fusions(reader)
    weights = store_weights(reader, run_weights("L", fuse, alpha), "--fuse")
    fused_scales = {name: source_scale(reader, name, clip_scale) for name in names}
    meter = functools.partial(ClassificationMeter, confidence_threshold=confidence_threshold,
                              num_classes=layout.classes, superclasses=superclasses)
    meters = {name: meter() for name in names}
    fused_meter = meter()
    points = ([{TEACHER: a, CLIP: 1 - a} for a in ALPHAS] if pair else simplex_weights(names))
    sweep = {(name, index): ClassificationMeter(confidence_threshold=confidence_threshold)
             for name in fusions for index in range(len(points))}
    overlap = dict.fromkeys(ERROR_OVERLAP, 0)
    labels_all = reader.read("labels", 0, layout.samples)
    done = reader.done()
    views = range(min(layout.views, max_views or layout.views))
    blocks = [(view, shard) for view in views for shard in range(layout.num_shards) if done[view, shard]]
    with progress_bar("block") as progress:
        for view, shard in progress.track(blocks, description="reading blocks"):
            start, stop = layout.shard_range(shard)
            labels = torch.from_numpy(labels_all[start:stop])
            logits = {name: reader.dense_logits(name, start, stop, view) for name in names}
            for name in names:
                meters[name].update(scaled_logits(logits[name], fusions["clip"][0][name]), labels)
            fused_meter.update(fuse_logits([(logits[name], weights[name], fused_scales[name]) for name in names],
                                           standardized), labels)
            for name, (scales, standardize_each) in fusions.items():
                # Each source scaled (and z-scored) once a block: fusing it at weight w is w times it, as fuse_logits.
                prepared = {source: scaled_logits(logits[source], scales[source], standardize_each)
                            for source in names}
                for index, point in enumerate(points):
                    sweep[name, index].update(fuse_logits([(prepared[source], point[source], 1.0)
                                                           for source in names]), labels)
            if TEACHER in logits and CLIP in logits:
                teacher_wrong, clip_wrong = logits[TEACHER].argmax(-1) != labels, logits[CLIP].argmax(-1) != labels
                for key, count in zip(ERROR_OVERLAP, (~teacher_wrong & ~clip_wrong, teacher_wrong & ~clip_wrong,
                                                      ~teacher_wrong & clip_wrong, teacher_wrong & clip_wrong)):
                    overlap[key] += int(count.sum())
    sweep_key = "alpha_sweep" if pair else "weight_sweep"
    if not blocks:
        return {"samples_evaluated": 0, "views_evaluated": len(views), sweep_key: []}
    evaluated = fused_meter.count
    sources = {name: {**meter.result(), "reliability": meter.reliability()} for name, meter in meters.items()}
    if pair:
        swept = [{"clip_scale": name, "alpha": points[index][TEACHER], **meter.result()}
                 for (name, index), meter in sweep.items()]
    else:
        swept = [{"clip_scale": name, "weights": points[index], **meter.result()}
                 for (name, index), meter in sweep.items()]
    return {
        "samples_evaluated": evaluated,
        "views_evaluated": len(views),
        **{name: sources[name] for name in (TEACHER, CLIP) if name in sources},
        "sources": sources,
        "fused": {**fused_meter.result(), "reliability": fused_meter.reliability()},
        **({"fused_alpha": alpha} if fuse is None else {}),
        "fused_weights": weights,
        "fused_clip_scale": STANDARDIZED if standardized else clip_scale,
        **({"error_overlap": {name: count / evaluated for name, count in overlap.items()}}
           if TEACHER in sources and CLIP in sources else {}),
        sweep_key: swept,
    }
