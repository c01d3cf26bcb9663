"""Classification metrics accumulated batch by batch: top-1, top-5, NLL and expected calibration error."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ECE_BINS = 15
# Confidence at or above which a prediction counts as confident.
CONFIDENCE_THRESHOLD = 0.9


class ClassificationMeter:
    """Streams (logits, labels) batches; `result()` gives the metrics over everything seen.

    Confident-correct / confidently-wrong are the shares of all samples predicted with confidence at
    least `confidence_threshold` and right / wrong; per-class accuracy needs `num_classes`.
    """

    def __init__(self, bins: int = ECE_BINS, confidence_threshold: float = CONFIDENCE_THRESHOLD,
                 num_classes: int | None = None):
        self.bins = bins
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
        return {"top1": self.top1 / n, "top5": self.top5 / n, "nll": self.nll / n, "ece": self.ece(),
                "confident_correct": self.confident_correct / n, "confidently_wrong": self.confidently_wrong / n,
                "count": self.count}

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


def percent(value: float | None, digits: int = 1) -> str:
    """A share as a percentage for tables and messages; '-' where there is none."""
    return "-" if value is None else f"{100 * value:.{digits}f}%"
