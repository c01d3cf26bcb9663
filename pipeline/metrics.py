"""Classification metrics accumulated batch by batch: top-1, top-5, NLL, expected calibration error, and with a
superclass of each class the share of the non-target probability that falls on the true class's superclass."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from richkd.pipeline.config import CONFIDENCE_THRESHOLD
from richkd.pipeline.errors import UserError, read_json

ECE_BINS = 15
# Confidence at or above which a prediction counts as confident.


class ClassificationMeter:
    """Streams (logits, labels) batches; `result()` gives the metrics over everything seen.

    Confident-correct / confidently-wrong are the shares of all samples predicted with confidence at
    least `confidence_threshold` and right / wrong; per-class accuracy needs `num_classes`. With `superclasses`
    (each class's superclass number), the superclass share is the mean over samples of the probability on the
    other classes of the true class's superclass, as a share of all the probability off the true class.
    """

    def __init__(self, bins: int = ECE_BINS, confidence_threshold: float = CONFIDENCE_THRESHOLD,
                 num_classes: int | None = None, superclasses: Sequence[int] | None = None):
        self.bins = bins
        self.superclasses = None if superclasses is None else torch.as_tensor(superclasses, dtype=torch.long)
        self.superclass_share_sum = 0.0
        self.confidence_threshold = confidence_threshold
        self.confident_correct = 0
        self.confidently_wrong = 0
        self.class_total = torch.zeros(num_classes or 0, dtype=torch.long)
        self.class_correct = torch.zeros(num_classes or 0, dtype=torch.long)
        self.count = 0
        self.top1 = 0
        self.top5 = 0
        self.nll = 0.0
        self.bin_count = torch.zeros(bins, dtype=torch.float64)
        self.bin_confidence = torch.zeros(bins, dtype=torch.float64)
        self.bin_correct = torch.zeros(bins, dtype=torch.float64)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.float()
        log_probs = F.log_softmax(logits, dim=-1)
        confidence, predicted = log_probs.exp().max(dim=-1)
        correct = predicted == labels
        k = min(5, logits.shape[-1])
        self.top1 += int(correct.sum())
        self.top5 += int((logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1).sum())
        self.nll += float(F.nll_loss(log_probs, labels, reduction="sum"))
        self.count += len(labels)
        confident = confidence >= self.confidence_threshold
        self.confident_correct += int((confident & correct).sum())
        self.confidently_wrong += int((confident & ~correct).sum())
        if len(self.class_total):
            self.class_total += torch.bincount(labels, minlength=len(self.class_total))
            self.class_correct += torch.bincount(labels[correct], minlength=len(self.class_total))
        if self.superclasses is not None:
            self.superclass_share_sum += float(superclass_share(logits, labels, self.superclasses).sum())
        # Equal-width confidence bins (lower, upper]; a confidence of exactly 0 cannot occur.
        bin_index = (confidence.double() * self.bins).ceil().long().clamp(1, self.bins) - 1
        self.bin_count += torch.bincount(bin_index, minlength=self.bins).double()
        self.bin_confidence += torch.bincount(bin_index, weights=confidence.double(), minlength=self.bins)
        self.bin_correct += torch.bincount(bin_index, weights=correct.double(), minlength=self.bins)

    def ece(self) -> float:
        gap = (self.bin_correct - self.bin_confidence).abs()
        return float(gap.sum() / max(self.count, 1))

    def result(self) -> dict[str, float]:
        n = max(self.count, 1)
        result = {"top1": self.top1 / n, "top5": self.top5 / n, "nll": self.nll / n, "ece": self.ece(),
                  "confident_correct": self.confident_correct / n, "confidently_wrong": self.confidently_wrong / n,
                  "count": self.count}
        if self.superclasses is not None:
            result["superclass_share"] = self.superclass_share_sum / n
        return result

    def reliability(self) -> dict[str, list]:
        """Per confidence bin: sample count, accuracy and mean confidence (None for an empty bin)."""
        count = self.bin_count.tolist()
        return {
            "bin_upper_edges": [(b + 1) / self.bins for b in range(self.bins)],
            "count": [int(c) for c in count],
            "accuracy": [k / c if c else None for k, c in zip(self.bin_correct.tolist(), count)],
            "confidence": [k / c if c else None for k, c in zip(self.bin_confidence.tolist(), count)],
        }

    def per_class_accuracy(self) -> list[float | None]:
        """Accuracy of each class (None for a class with no samples)."""
        return [correct / total if total else None
                for correct, total in zip(self.class_correct.tolist(), self.class_total.tolist())]


def superclass_share(logits: torch.Tensor, labels: torch.Tensor, superclasses: torch.Tensor) -> torch.Tensor:
    """Per sample: the softmax over the classes other than its label, summed over those of its label's superclass.

    Taken as a softmax of the non-target logits (not as p_c / (1 - p_label)), so that it stays exact when the label's
    probability rounds to 1."""
    logits = logits.double()
    other = torch.ones_like(logits, dtype=torch.bool)
    other[torch.arange(len(labels)), labels] = False
    same = (superclasses[None, :] == superclasses[labels][:, None]) & other
    log_other = torch.logsumexp(logits.masked_fill(~other, -torch.inf), dim=-1)
    return torch.logsumexp(logits.masked_fill(~same, -torch.inf), dim=-1).sub(log_other).exp()


def read_superclasses(path: str | Path, class_names: Sequence[str]) -> list[int]:
    """Each class's superclass number, from a JSON file mapping every class name to its superclass's name
    (numbered in sorted order of the names)."""
    mapping = read_json(path, "superclasses file")
    if not isinstance(mapping, dict) or not all(isinstance(value, str) for value in mapping.values()):
        raise UserError(f"superclasses file {path} must map each class name to its superclass's name")
    missing = [name for name in class_names if name not in mapping]
    if missing:
        raise UserError(f"superclasses file {path} names no superclass for {len(missing)} of the "
                        f"{len(class_names)} classes (e.g. {missing[0]})")
    number = {name: index for index, name in enumerate(sorted({mapping[name] for name in class_names}))}
    return [number[mapping[name]] for name in class_names]


def percent(value: float | None, digits: int = 1) -> str:
    """A share as a percentage for tables and messages; '-' where there is none."""
    return "-" if value is None else f"{100 * value:.{digits}f}%"
