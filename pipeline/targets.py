"""The Python API to a store: its fused targets as a torch Dataset, for training loops other than `richkd distill`.

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
from richkd.pipeline.data import normalize, open_dataset
from richkd.pipeline.fusion import VARIANTS, clip_scale_value, fuse_logits
from richkd.pipeline.normalization import choose_normalization
from richkd.pipeline.views import image_for_views, policy_from_description

FEATURE_ARRAYS = ("teacher/features", "clip/image_embeds")


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
                 alpha: float = 0.7, clip_scale: str = "raw", standardize: bool = False, features: bool = False,
                 normalize: str = "auto"):
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
        self.teacher_weight, self.clip_weight = VARIANTS[variant].logit_weights(alpha)
        self.scale = clip_scale_value(clip_scale, self.reader.attrs["clip"]["logit_scale"])
        self.standardize = standardize
        self.names = (("teacher/logits",) * (self.teacher_weight > 0) + ("clip/logits",) * (self.clip_weight > 0)
                      + FEATURE_ARRAYS * features)
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
        fused = fuse_logits(cached.get("teacher/logits"), cached.get("clip/logits"), self.teacher_weight, self.scale,
                            self.standardize, self.clip_weight)[0]
        item = {"image": image, "label": int(self.dataset.labels[index]), "row": row, "fused_logits": fused}
        item.update({name: cached[name][0] for name in FEATURE_ARRAYS if name in cached})
        return item
