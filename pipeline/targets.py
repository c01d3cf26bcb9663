"""A store's targets: as a torch Dataset for training loops other than `richkd distill` (the Python API), and their
quality against the labels.

    from richkd import CachedTargets, kd_loss
    targets = CachedTargets("cache/cifar100.zarr", "cifar100", "data", variant="L", alpha=0.7)
    for batch in DataLoader(targets, batch_size=64, shuffle=True):
        logits, _ = student(batch["image"])
        loss = F.cross_entropy(logits, batch["label"]) + 3 * kd_loss(logits, batch["fused_logits"], 3.0)

Item i is sample i of the dataset, found in the store by its key, so the dataset may list its samples in another
order (or format) than the store was precomputed from. `set_epoch(e)` selects stored view e mod V, as distill does.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from richkd.cache.reader import CacheReader
from richkd.pipeline.config import require
from richkd.pipeline.data import normalize
from richkd.pipeline.datasets import open_dataset
from richkd.pipeline.fusion import CLIP_SCALES, DEFAULT_ALPHA, VARIANTS, Fusion, clip_scale_value, fuse_logits
from richkd.pipeline.metrics import CONFIDENCE_THRESHOLD, ClassificationMeter
from richkd.pipeline.normalization import choose_normalization
from richkd.pipeline.runtime import progress_bar
from richkd.pipeline.views import image_for_views, policy_from_description

FEATURE_ARRAYS = ("teacher/features", "clip/image_embeds")
# The fusion weights `richkd inspect` and `report` evaluate the fused targets at.
ALPHAS = tuple(round(0.1 * step, 1) for step in range(11))


class CachedTargets(Dataset):
    """A store and the dataset split it was precomputed from. Each item is a dict:

    - `image`: the stored view of the sample, replayed to the pixels the teacher and CLIP saw, normalised as the
      store records the teacher's input (or as `normalize` says: see `richkd distill --help`), float (3, H, W);
    - `label`: its class id; `row`: its store row (CRD's memory index);
    - `fused_logits`: z_F of `variant` (L: alpha z_T + (1 - alpha) z_C, shrink: alpha z_T, clip: z_C) with CLIP's
      cosines times `clip_scale` (raw, clip or a number), each source z-scored first when `standardize`;
    - with `features`, the cached `teacher/features` and `clip/image_embeds`.

    The arrays of the current view are held in memory (float16, as stored): samples x (classes + feature sizes).
    """

    def __init__(self, store: str, dataset: str, data_root: str, split: str = "train", *, variant: str = "L",
                 alpha: float = DEFAULT_ALPHA, clip_scale: str = "raw", standardize: bool = False,
                 features: bool = False, normalize: str = "auto"):
        require(variant in VARIANTS and VARIANTS[variant].logits,
                f"variant must be one with fused logits ({', '.join(n for n, v in VARIANTS.items() if v.logits)}), "
                f"got '{variant}'")
        require(0 <= alpha <= 1, f"alpha must be in [0, 1], got {alpha}")
        self.reader = CacheReader(store)
        self.reader.require_complete()
        self.dataset = open_dataset(dataset, data_root, split)
        rows = self.reader.rows_of(self.dataset)
        self.rows = np.arange(len(self.dataset)) if rows is None else rows
        self.policy = policy_from_description(self.reader.attrs["views"])
        self.normalization = choose_normalization(normalize, self.dataset,
                                                  self.reader.attrs["teacher"]["input_transform"], f"the store {store}")
        self.fusion = Fusion.of(variant, alpha, clip_scale, self.reader.attrs["clip"]["logit_scale"], standardize)
        self.names = self.fusion.arrays + FEATURE_ARRAYS * features
        self.view, self.arrays = None, {}
        self.set_epoch(0)

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

    def __getitem__(self, index: int) -> dict:
        row = int(self.rows[index])
        view = self.policy.replay(image_for_views(self.dataset, self.policy, index), self.arrays["views/params"][row])
        image = normalize(view[None], self.normalization.mean, self.normalization.std)[0]
        cached = {name: torch.from_numpy(self.arrays[name][row:row + 1].astype(np.float32)) for name in self.names}
        fused = self.fusion.fuse(cached)[0]
        item = {"image": image, "label": int(self.dataset.labels[index]), "row": row, "fused_logits": fused}
        item.update({name: cached[name][0] for name in FEATURE_ARRAYS if name in cached})
        return item


def target_quality(reader: CacheReader, max_views: int | None = None, alpha: float = DEFAULT_ALPHA,
                   clip_scale: str = "raw", confidence_threshold: float = CONFIDENCE_THRESHOLD) -> dict:
    """Metrics of the cached targets against `labels`, over every written block: the teacher, CLIP (at its own
    scale, so that NLL and ECE mean something), the fused targets at (alpha, clip_scale), and the alpha sweep."""
    layout = reader.layout
    logit_scale = reader.attrs["clip"]["logit_scale"]
    scales = {name: clip_scale_value(name, logit_scale) for name in CLIP_SCALES}
    fused_scale = clip_scale_value(clip_scale, logit_scale)
    num_classes = layout.classes
    meters = {name: ClassificationMeter(confidence_threshold=confidence_threshold, num_classes=num_classes)
              for name in ("teacher", "clip", "fused")}
    sweep = {(name, a): ClassificationMeter(confidence_threshold=confidence_threshold)
             for name in scales for a in ALPHAS}
    labels_all = reader.read("labels", 0, layout.samples)
    done = reader.done()
    views = range(min(layout.views, max_views or layout.views))
    blocks = [(view, shard) for view in views for shard in range(layout.num_shards) if done[view, shard]]
    with progress_bar("block") as progress:
        for view, shard in progress.track(blocks, description="reading blocks"):
            start, stop = layout.shard_range(shard)
            labels = torch.from_numpy(labels_all[start:stop])
            z_teacher = torch.from_numpy(reader.read("teacher/logits", start, stop, view).astype(np.float32))
            s_clip = torch.from_numpy(reader.read("clip/logits", start, stop, view).astype(np.float32))
            meters["teacher"].update(z_teacher, labels)
            meters["clip"].update(scales["clip"] * s_clip, labels)
            meters["fused"].update(fuse_logits(z_teacher, s_clip, alpha, fused_scale), labels)
            for (name, a), meter in sweep.items():
                meter.update(fuse_logits(z_teacher, s_clip, a, scales[name]), labels)
    if not blocks:
        return {"samples_evaluated": 0, "views_evaluated": len(views), "alpha_sweep": []}
    return {
        "samples_evaluated": meters["teacher"].count,
        "views_evaluated": len(views),
        **{name: {**meter.result(), "reliability": meter.reliability()} for name, meter in meters.items()},
        "fused_alpha": alpha,
        "fused_clip_scale": clip_scale,
        "alpha_sweep": [{"clip_scale": name, "alpha": a, **meter.result()} for (name, a), meter in sweep.items()],
    }
