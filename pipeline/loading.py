"""A dataset's labelled views in batches, and a model evaluated over them."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from richkd.pipeline.data import ImageDataset, normalize
from richkd.pipeline.execution import autocast
from richkd.pipeline.metrics import ClassificationMeter
from richkd.pipeline.views import image_for_views, mix_params, mixed_label, mixing, rebuild_view, sample_view


class LabelledViews(Dataset):
    """index -> (uint8 view, label, index): the stored view `params[index]`, a fresh random view, or the centre.
    A mixed view (`--mix`) comes with its mixed label, a float vector over the classes; its partner is a dataset
    index."""

    def __init__(self, dataset: ImageDataset, policy, params: np.ndarray | None = None, seed: int = 0,
                 stream: int = 0, center: bool = False):
        self.dataset, self.policy, self.params = dataset, policy, params
        self.seed, self.stream, self.center = seed, stream, center

    def __len__(self) -> int:
        return len(self.dataset)

    def _image_and_params(self, index: int) -> tuple[torch.Tensor, np.ndarray]:
        image = image_for_views(self.dataset, self.policy, index)
        params = self.params[index] if self.params is not None else sample_view(
            self.policy, self.seed, self.stream, index, image)
        return image, params

    def __getitem__(self, index: int):
        label = int(self.dataset.labels[index])
        if self.center:
            return self.policy.center(image_for_views(self.dataset, self.policy, index)), label, index
        image, params = self._image_and_params(index)
        view = rebuild_view(self.policy, image, params, self._image_and_params)
        if mixing(self.policy) is not None:
            partner = int(mix_params(self.policy, params)[1])
            label = mixed_label(self.policy, params, label, int(self.dataset.labels[partner]),
                                len(self.dataset.class_names))
        return view, label, index


def data_loader(data: Dataset, batch_size: int, workers: int, device: torch.device, sampler=None) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0))


@torch.inference_mode()
def evaluate_model(model: nn.Module, loader: DataLoader, device: torch.device, mean, std,
                   meter: ClassificationMeter) -> ClassificationMeter:
    model.eval()
    for views, labels, _ in loader:
        x = normalize(views.to(device, non_blocking=True), mean, std)
        with autocast(device):
            logits, _ = model(x)
        meter.update(logits.float().cpu(), labels)
    return meter


def training_mask(num_samples: int, training: np.ndarray) -> np.ndarray:
    """True for the samples an epoch trains on."""
    mask = np.zeros(num_samples, dtype=bool)
    mask[training] = True
    return mask
