"""Sparse top-k targets, as `richkd precompute --topk K` stores them, fused and distilled without densifying.

A source's logits z over C classes (the teacher's logits, CLIP's cosines) are stored per (sample, view) as its K
largest values with their class ids, and one value r shared by every other class:

    r = T log( mean_{j not in the top K} exp(z_j / T) ),   T = the store's --topk-temperature

so that softmax(z / T) keeps each top-K probability exactly and spreads the remaining mass evenly over the other
C - K classes (ml-dr's rule for its stored top-k probabilities). CLIP's cosines are taken at CLIP's own scale
exp(logit_scale), i.e. T / exp(logit_scale) in cosine units, so that its zero-shot probabilities keep their mass.
At another temperature or scale the rest is approximate; `benchmarks/topk_targets.py` measures how much.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def top_k_logits(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C) logits -> (B, K + 1) values (the K largest, then the rest r) and (B, K) class ids."""
    values, classes = logits.topk(k, dim=1)
    others = logits.double().scatter(1, classes, -math.inf) / temperature
    rest = temperature * (torch.logsumexp(others, dim=1, keepdim=True) - math.log(logits.shape[1] - k))
    return torch.cat([values, rest.to(values.dtype)], dim=1), classes


@dataclass(frozen=True)
class SparseLogits:
    """A batch of logits given at a few classes per sample; every other class has the value `rest`.

    A class may be listed twice (two fused sources both list it, with the same value); `listed` is False for the
    repeats, so that each class counts once.
    """

    classes: torch.Tensor  # (B, M) int64
    values: torch.Tensor  # (B, M) float
    rest: torch.Tensor  # (B, 1) float
    listed: torch.Tensor  # (B, M) bool
    num_classes: int

    @classmethod
    def from_stored(cls, values_and_rest: torch.Tensor, classes: torch.Tensor, num_classes: int) -> SparseLogits:
        """From a store's (B, K + 1) values (top K, then the rest) and (B, K) class ids."""
        classes = classes.long()
        return cls(classes, values_and_rest[:, :-1].float(), values_and_rest[:, -1:].float(),
                   torch.ones_like(classes, dtype=torch.bool), num_classes)

    def dense(self) -> torch.Tensor:
        """(B, C) logits."""
        full = self.rest.expand(-1, self.num_classes).clone()
        return full.scatter_(1, self.classes, self.values)

    @property
    def unlisted(self) -> torch.Tensor:
        """(B, 1) how many classes have the value `rest`."""
        return self.num_classes - self.listed.sum(dim=1, keepdim=True)

    def at(self, classes: torch.Tensor) -> torch.Tensor:
        """(B, Q) the values at the class ids `classes` (B, Q)."""
        match = (classes[:, :, None] == self.classes[:, None, :]) & self.listed[:, None, :]
        listed_value = (match * self.values[:, None, :]).sum(dim=2)
        return torch.where(match.any(dim=2), listed_value, self.rest)

    def scaled(self, factor: float) -> SparseLogits:
        return SparseLogits(self.classes, factor * self.values, factor * self.rest, self.listed, self.num_classes)

    def standardized(self, eps: float = 1e-6) -> SparseLogits:
        """Per-sample z-score over all C classes, as `fusion.standardize` does to dense logits."""
        listed, unlisted = self.listed, self.unlisted
        mean = ((self.values * listed).sum(dim=1, keepdim=True) + unlisted * self.rest) / self.num_classes
        squares = (((self.values - mean) ** 2) * listed).sum(dim=1, keepdim=True) + unlisted * (self.rest - mean) ** 2
        std = (squares / self.num_classes).sqrt() + eps
        return SparseLogits(self.classes, (self.values - mean) / std, (self.rest - mean) / std, listed,
                            self.num_classes)


def as_dense(logits: torch.Tensor | SparseLogits) -> torch.Tensor:
    """(B, C) logits, whichever form `logits` comes in."""
    return logits.dense() if isinstance(logits, SparseLogits) else logits


def weighted_sum(parts: list[tuple[float, SparseLogits]]) -> SparseLogits:
    """sum_i weight_i * logits_i, listed at every class any part lists."""
    if len(parts) == 1:
        weight, logits = parts[0]
        return logits.scaled(weight)
    classes = torch.cat([logits.classes for _, logits in parts], dim=1)
    values = sum(weight * logits.at(classes) for weight, logits in parts)
    rest = sum(weight * logits.rest for weight, logits in parts)
    listed = torch.cat([logits.listed for _, logits in parts], dim=1)
    earlier = torch.ones(classes.shape[1], classes.shape[1], dtype=torch.bool, device=classes.device).tril(-1)
    repeat = ((classes[:, :, None] == classes[:, None, :]) & listed[:, None, :] & earlier).any(dim=2)
    return SparseLogits(classes, values, rest, listed & ~repeat, parts[0][1].num_classes)


def sparse_kd_loss(student_logits: torch.Tensor, target: SparseLogits, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(z_F / T) || softmax(z_S / T)) with z_F sparse: the KL over the listed classes plus, in one
    term, over all the others (which share one probability), batch-averaged; `kd_loss` of `target.dense()`."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    listed, unlisted = target.listed, target.unlisted
    values = torch.where(listed, target.values / temperature, -math.inf)
    rest = target.rest / temperature
    log_rest_mass = rest + torch.log(unlisted.to(rest.dtype))  # -inf when every class is listed
    log_norm = torch.logsumexp(torch.cat([values, log_rest_mass], dim=1), dim=1, keepdim=True)
    log_listed, log_rest = values - log_norm, rest - log_norm
    student_listed = log_student.gather(1, target.classes)
    listed_kl = torch.where(listed, log_listed.exp() * (log_listed - student_listed), 0.0).sum(dim=1)
    student_unlisted = log_student.sum(dim=1, keepdim=True) - (student_listed * listed).sum(dim=1, keepdim=True)
    rest_kl = log_rest.exp() * (unlisted * log_rest - student_unlisted)
    rest_kl = torch.where(unlisted > 0, rest_kl, 0.0).squeeze(1)
    return (listed_kl + rest_kl).mean() * temperature**2
