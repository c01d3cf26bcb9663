"""The distillation losses: KD and DKD on fused logits, CRD on fused features.

All take the fused targets as plain tensors, so they are the same whether the targets come from the
cache or from teachers run online.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def kd_loss(student_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(z_F / T) || softmax(z_S / T)), averaged over the batch."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_target = F.log_softmax(target_logits / temperature, dim=1)
    return F.kl_div(log_student, log_target, reduction="batchmean", log_target=True) * temperature**2


def dkd_loss(student_logits: torch.Tensor, target_logits: torch.Tensor, labels: torch.Tensor,
             tckd_weight: float, nckd_weight: float, temperature: float) -> torch.Tensor:
    """Decoupled KD: target-class KD (binary: label vs rest) plus non-target-class KD (among the rest)."""
    label_mask = F.one_hot(labels, student_logits.shape[1]).bool()
    p_student = F.softmax(student_logits / temperature, dim=1)
    p_target = F.softmax(target_logits / temperature, dim=1)

    def binary(p: torch.Tensor) -> torch.Tensor:
        on_label = (p * label_mask).sum(dim=1, keepdim=True)
        return torch.cat([on_label, 1 - on_label], dim=1)

    b_student, b_target = binary(p_student), binary(p_target)
    tckd = (b_target * (b_target.log() - b_student.log())).sum(dim=1).mean() * temperature**2
    # Among non-target classes: push the label's logit far down so its probability vanishes.
    masked_student = F.log_softmax(student_logits / temperature - 1000.0 * label_mask, dim=1)
    masked_target = F.softmax(target_logits / temperature - 1000.0 * label_mask, dim=1)
    nckd = F.kl_div(masked_student, masked_target, reduction="batchmean") * temperature**2
    return tckd_weight * tckd + nckd_weight * nckd


class Embed(nn.Module):
    """Linear projection to the contrastive space, then L2 normalisation."""

    def __init__(self, in_dim: int, out_dim: int = 128):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x), dim=1)


class ContrastMemory(nn.Module):
    """CRD's two momentum memory banks (one per view) and the NCE scores of a batch against them."""

    def __init__(self, dim: int, num_data: int, nce_temperature: float = 0.07, momentum: float = 0.5,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.num_data, self.nce_temperature, self.momentum = num_data, nce_temperature, momentum
        bound = 1.0 / (dim / 3) ** 0.5
        for name in ("memory_v1", "memory_v2"):
            self.register_buffer(name, torch.rand(num_data, dim, generator=generator) * 2 * bound - bound)
        # Normalisation constants, fixed from the first batch as in CRD (negative: not set yet).
        self.register_buffer("Z_v1", torch.tensor(-1.0))
        self.register_buffer("Z_v2", torch.tensor(-1.0))

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, index: torch.Tensor,
                contrast_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (B, K+1) of each view against the other view's memory; column 0 is the positive."""
        with torch.no_grad():
            if self.Z_v1 < 0:
                self.Z_v1.fill_(mean_over_ranks(self._exp_scores(self.memory_v2, v1, contrast_index).mean())
                                * self.num_data)
            if self.Z_v2 < 0:
                self.Z_v2.fill_(mean_over_ranks(self._exp_scores(self.memory_v1, v2, contrast_index).mean())
                                * self.num_data)
        # exp(s / T) / Z in one exp: the scores are a million entries per batch at K = 16384.
        out_v2 = torch.exp(self._similarities(self.memory_v1, v2, contrast_index) / self.nce_temperature
                           - torch.log(self.Z_v2))
        out_v1 = torch.exp(self._similarities(self.memory_v2, v1, contrast_index) / self.nce_temperature
                           - torch.log(self.Z_v1))
        with torch.no_grad():
            self._update(self.memory_v1, v1, index)
            self._update(self.memory_v2, v2, index)
        return out_v1, out_v2

    def _exp_scores(self, memory: torch.Tensor, values: torch.Tensor, contrast_index: torch.Tensor) -> torch.Tensor:
        return torch.exp(self._similarities(memory, values, contrast_index) / self.nce_temperature)

    @staticmethod
    def _similarities(memory: torch.Tensor, values: torch.Tensor, contrast_index: torch.Tensor) -> torch.Tensor:
        """<memory[contrast_index[b, k]], values[b]> for every (b, k)."""
        batch, candidates = contrast_index.shape
        if memory.shape[0] < batch * candidates:
            # Scoring the whole bank reads it once; gathering would copy B x (K+1) rows of it. The copy
            # keeps what backward needs safe from the in-place memory update that follows.
            return (values @ memory.detach().clone().T).gather(1, contrast_index)
        rows = memory.detach()[contrast_index.reshape(-1)].view(batch, candidates, -1)
        return torch.bmm(rows, values.unsqueeze(2)).squeeze(2)

    def _update(self, memory: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> None:
        # Under DistributedDataParallel every rank applies every rank's batch, so the memories stay equal.
        values, index = gather_from_ranks(values.detach()), gather_from_ranks(index)
        mixed = memory[index] * self.momentum + values * (1 - self.momentum)
        memory.index_copy_(0, index, F.normalize(mixed, dim=1))


def mean_over_ranks(value: torch.Tensor) -> float:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value.item()


def gather_from_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The rows of every rank's `tensor`, rank by rank (each rank's batch has the same size)."""
    if not dist.is_initialized():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def contrast_loss(scores: torch.Tensor, num_data: int, eps: float = 1e-7) -> torch.Tensor:
    """NCE loss of CRD: the positive (column 0) against K noise samples drawn uniformly from the data."""
    batch, negatives = scores.shape[0], scores.shape[1] - 1
    noise = negatives / num_data
    positive, negative = scores[:, 0], scores[:, 1:]
    log_d1 = torch.log(positive / (positive + noise + eps))
    # sum of log(noise / (P_neg + noise + eps)), with the constant log(noise) taken out of the sum
    log_d0 = negative.numel() * math.log(noise) - torch.log(negative + (noise + eps)).sum()
    return -(log_d1.sum() + log_d0) / batch


def rename_source_embeddings(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Checkpoints of richkd before its stores named their sources hold the teacher's and CLIP's embeddings as
    `embed_teacher` and `embed_clip`: a run checkpointed then resumes with them as `embeds.teacher` and
    `embeds.clip`."""
    for source in ("teacher", "clip"):
        old, new = f"{prefix}embed_{source}.", f"{prefix}embeds.{source}."
        for key in [key for key in state_dict if key.startswith(old)]:
            state_dict[new + key.removeprefix(old)] = state_dict.pop(key)


class FusedCRD(nn.Module):
    """CRD between the student's embedding and the fused embedding of the sources' features of the same sample.

    f_F = normalize(sum over sources of weight * E_source(f_source)); loss = contrast(E_S(f_S)) + contrast(f_F). For
    the teacher and CLIP, f_F = normalize(lam * E_T(f_T) + (1 - lam) * E_C(f_C)).
    """

    def __init__(self, student_dim: int, source_dims: dict[str, int], weights: dict[str, float], num_data: int,
                 embed_dim: int = 128, nce_temperature: float = 0.07, momentum: float = 0.5,
                 generator: torch.Generator | None = None):
        """`source_dims`: each source's feature size; `weights`: each source's weight in f_F, in the order the
        embeddings are made (the teacher's, then CLIP's: their initial weights are drawn in that order)."""
        super().__init__()
        # Only the embeddings of sources with weight: a parameter without a gradient stops DistributedDataParallel.
        self.weights = {name: weight for name, weight in weights.items() if weight > 0}
        self.embed_student = Embed(student_dim, embed_dim)
        self.embeds = nn.ModuleDict({name: Embed(source_dims[name], embed_dim) for name in self.weights})
        self.memory = ContrastMemory(embed_dim, num_data, nce_temperature, momentum, generator)
        self.register_load_state_dict_pre_hook(rename_source_embeddings)

    def fused_embedding(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """f_F of each source's features by name (those of sources whose weight is zero need not be given)."""
        return F.normalize(sum(weight * self.embeds[name](features[name]) for name, weight in self.weights.items()),
                           dim=1)

    def forward(self, student_features: torch.Tensor, features: dict[str, torch.Tensor], index: torch.Tensor,
                contrast_index: torch.Tensor) -> torch.Tensor:
        student = self.embed_student(student_features)
        fused = self.fused_embedding(features)
        out_student, out_fused = self.memory(student, fused, index, contrast_index)
        num_data = self.memory.num_data
        return contrast_loss(out_student, num_data) + contrast_loss(out_fused, num_data)
