"""Classification metrics accumulated batch by batch: top-1, top-5, NLL and expected calibration error."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ECE_BINS = 15


class ClassificationMeter:
    """Streams (logits, labels) batches; `result()` gives the metrics over everything seen."""

    def __init__(self, bins: int = ECE_BINS):
        self.bins = bins
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
                "count": self.count}
