"""`richkd evaluate`: accuracy and calibration of any checkpoint on any split, as the method's paper reports them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from richkd.pipeline.config import DataOptions, ExecutionOptions, option, require
from richkd.pipeline.data import open_dataset
from richkd.pipeline.errors import UserError
from richkd.pipeline.metrics import ClassificationMeter
from richkd.pipeline.models import create_model, load_checkpoint, read_checkpoint
from richkd.pipeline.runtime import resolve_device
from richkd.pipeline.training import LabelledViews, data_loader, evaluate_model
from richkd.pipeline.views import make_view_policy, policy_from_description


@dataclass
class EvaluateConfig(DataOptions, ExecutionOptions):
    checkpoint: str | None = option(None, "Checkpoint from train or distill, or a teacher checkpoint (required).",
                                    "Model")
    arch: str | None = option(None, "Architecture, for checkpoints that do not record it (e.g. mdistiller's).",
                              "Model")
    split: str = option("test", "Split to evaluate.", "Data")
    image_size: int | None = option(None, "Evaluation image side, for checkpoints that do not record it.", "Data")
    confidence_threshold: float = option(
        0.9, "Confidence at or above which a prediction counts as confident.", "Metrics")
    output: str | None = option(None, "Write the metrics to this JSON file.", "Output")
    json: bool = option(False, "Print the metrics as JSON instead of a table.", "Output")
    batch_size: int = option(256, "Images per forward pass.", "Execution")

    def validate(self) -> None:
        super().validate()
        require(self.checkpoint is not None, "--checkpoint is required")
        require(0 < self.confidence_threshold <= 1,
                f"--confidence-threshold must be in (0, 1], got {self.confidence_threshold}")
        require(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")


def run(config: EvaluateConfig) -> dict:
    device = resolve_device(config.device)
    dataset = open_dataset(config.dataset, config.data_root, config.split, config.download)
    _, saved = read_checkpoint(config.checkpoint)
    arch = saved.get("arch") or config.arch
    if arch is None:
        raise UserError(f"checkpoint {config.checkpoint} does not record its architecture: pass --arch")
    model = create_model(arch, len(dataset.class_names))
    load_checkpoint(model, config.checkpoint)
    model.to(device)
    if "view_policy" in saved:
        policy = policy_from_description(saved["view_policy"])
    else:
        policy = make_view_policy("auto", dataset.native_size, config.image_size)
    loader = data_loader(LabelledViews(dataset, policy, center=True), config.batch_size, config.num_workers, device)
    meter = ClassificationMeter(confidence_threshold=config.confidence_threshold,
                                num_classes=len(dataset.class_names))
    evaluate_model(model, loader, device, dataset.mean, dataset.std, meter)
    report = {
        "checkpoint": config.checkpoint,
        "arch": arch,
        "dataset": dataset.name,
        "split": dataset.split,
        "confidence_threshold": config.confidence_threshold,
        **meter.result(),
        "per_class_accuracy": dict(zip(dataset.class_names, meter.per_class_accuracy())),
        "reliability": meter.reliability(),
    }
    if config.output:
        Path(config.output).parent.mkdir(parents=True, exist_ok=True)
        Path(config.output).write_text(json.dumps(report, indent=2))
    if config.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return report


def print_report(report: dict) -> None:
    table = Table(title=f"{report['arch']} on {report['dataset']} / {report['split']} ({report['count']} images)",
                  title_justify="left")
    for column in ("top-1", "top-5", "NLL", "ECE", f"confident-correct (>= {report['confidence_threshold']})",
                   "confidently-wrong"):
        table.add_column(column, justify="right")
    table.add_row(*(f"{100 * report[key]:.2f}%" for key in ("top1", "top5")), f"{report['nll']:.4f}",
                  f"{100 * report['ece']:.2f}%",
                  *(f"{100 * report[key]:.2f}%" for key in ("confident_correct", "confidently_wrong")))
    Console().print(table)
    per_class = [(name, accuracy) for name, accuracy in report["per_class_accuracy"].items() if accuracy is not None]
    if per_class:
        worst = sorted(per_class, key=lambda item: item[1])[:5]
        Console().print("lowest per-class accuracy: " + ", ".join(f"{name} {100 * acc:.1f}%" for name, acc in worst))
