"""`richkd evaluate`: accuracy and calibration of any checkpoint on any split, as the method's paper reports them.

With `--corruptions`, also its robustness: accuracy under the common corruptions of CIFAR-10-C / ImageNet-C
at each severity, made on the fly from the centre views or read from the published `.npy` files.

`--checkpoint` may be a glob pattern matching every seed of a run: the data and views are set up once (process
start-up is a large part of an evaluation), and each checkpoint is evaluated in turn, in seed order.
"""

from __future__ import annotations

import dataclasses
import glob
import json
from pathlib import Path

import numpy as np
import torch
from rich.table import Table
from torchvision.transforms.v2 import functional as TF

from richkd.pipeline.corruptions import (
    PublishedCorruptions,
    corrupt,
    parameter_set,
    parse_severities,
)
from richkd.pipeline.data import ImageDataset, require_labelled
from richkd.pipeline.datasets import open_dataset
from richkd.pipeline.errors import UserError
from richkd.pipeline.execution import autocast, progress_bar, resolve_device
from richkd.pipeline.loading import LabelledViews, data_loader, evaluate_model
from richkd.pipeline.metrics import ClassificationMeter, percent, read_superclasses
from richkd.pipeline.models import create_model, load_checkpoint, read_checkpoint
from richkd.pipeline.normalization import Normalization, choose_normalization
from richkd.pipeline.runtime import print_json, results
from richkd.pipeline.shards import CenterViewStream, ShardSet, open_shard_set, pipe_command, shard_urls
from richkd.pipeline.views import ViewPolicy, make_view_policy, policy_from_description
from richkd.stages.options import EvaluateConfig

# The uncorrupted images, evaluated with the corrupted ones.
CLEAN = ("clean", 0)


def run(config: EvaluateConfig) -> dict:
    device = resolve_device(config.device)
    checkpoints = find_checkpoints(config.checkpoint)
    names, published = config.corruption_names(), None
    if config.stream:
        dataset = streamed_split(config, checkpoints)
        policy = evaluation_policy(checkpoints, None, config.image_size)
        views = CenterViewStream(dataset, policy)
    else:
        dataset = open_dataset(config.dataset, config.data_root, config.split, config.download)
        require_labelled(dataset, "--split")
        policy = evaluation_policy(checkpoints, dataset.native_size, config.image_size)
        published = open_published(config.corrupted_root, names, dataset.labels, policy.size) if names else None
        dataset = in_checkpoint_class_order(dataset, checkpoints)
        views = LabelledViews(dataset, policy, center=True)
    loader = data_loader(views, config.batch_size, config.num_workers, device)
    superclasses = read_superclasses(config.superclasses, dataset.class_names) if config.superclasses else None
    results, models, normalizations = [], [], []
    for path, saved in checkpoints:
        normalization = choose_normalization(config.normalize, dataset, saved.get("normalization"),
                                             f"checkpoint {path}", binding=True)
        arch = saved.get("arch") or config.arch
        if config.arch is not None and arch != config.arch:
            raise UserError(f"checkpoint {path} is a {arch}, not a {config.arch}: leave --arch out for "
                            "checkpoints that record their architecture")
        if arch is None:
            raise UserError(f"checkpoint {path} does not record its architecture: pass --arch")
        model = create_model(arch, saved.get("num_classes") or len(dataset.class_names))
        load_checkpoint(model, path)
        model.to(device)
        meter = ClassificationMeter(confidence_threshold=config.confidence_threshold,
                                    num_classes=len(dataset.class_names), superclasses=superclasses)
        evaluate_model(model, loader, device, normalization.mean, normalization.std, meter)
        results.append({
            "checkpoint": path,
            "seed": checkpoint_seed(saved),
            "training": training_settings(saved),
            "arch": arch,
            "dataset": config.dataset,
            "split": config.split,
            "confidence_threshold": config.confidence_threshold,
            "normalization": normalization.describe(),
            **meter.result(),
            "per_class_accuracy": dict(zip(dataset.class_names, meter.per_class_accuracy())),
            "reliability": meter.reliability(),
        })
        models.append(model)
        normalizations.append(normalization)
    if names:
        for result, robustness in zip(results, evaluate_robustness(config, models, normalizations, views, device,
                                                                   policy.size, names, published)):
            result["robustness"] = robustness
    # One checkpoint keeps the format of a single evaluation, which `richkd report` also reads as one seed.
    report = results[0] if len(results) == 1 else {"seeds": results}
    if config.output:
        Path(config.output).parent.mkdir(parents=True, exist_ok=True)
        Path(config.output).write_text(json.dumps(report, indent=2))
    if config.json:
        print_json(report)
    else:
        for result in results:
            print_report(result)
            if "robustness" in result:
                print_robustness(result["robustness"])
    return report


def checkpoint_seed(saved: dict) -> int | None:
    """The seed a training run recorded in its checkpoint (None for checkpoints of other tools)."""
    config = saved.get("config")
    return config.get("seed") if isinstance(config, dict) else None


# What `richkd report` may pair runs by (e.g. each RichKD run with the teacher-shrink control of its alpha).
TRAINING_SETTINGS = ("variant", "alpha", "clip_scale", "standardize", "logit_loss", "epochs", "arch")


def training_settings(saved: dict) -> dict:
    """The settings of the run that wrote the checkpoint, those it recorded of TRAINING_SETTINGS."""
    config = saved.get("config")
    return {key: config[key] for key in TRAINING_SETTINGS if key in config} if isinstance(config, dict) else {}


def find_checkpoints(pattern: str) -> list[tuple[str, dict]]:
    """(path, the checkpoint's entries besides its weights) of every checkpoint `pattern` matches, by seed."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise UserError(f"no checkpoint matches {pattern}")
    by_seed: dict[int | None, tuple[str, dict]] = {}
    for path in paths:
        saved = read_checkpoint(path)[1]
        seed = checkpoint_seed(saved)
        if seed in by_seed:
            which = "record no seed" if seed is None else f"have seed {seed}"
            raise UserError(f"checkpoints {by_seed[seed][0]} and {path} both {which}: evaluate each seed of a run once")
        by_seed[seed] = path, saved
    return [by_seed[seed] for seed in sorted(by_seed, key=lambda seed: (seed is None, seed or 0))]


def streamed_split(config: EvaluateConfig, checkpoints: list[tuple[str, dict]]) -> ShardSet:
    """The split's shards, to be read front to back: their class ids are the checkpoint's, which shards that can be
    opened (not `pipe:`) must list in the same order in their classes.txt."""
    (first, saved), *_ = checkpoints
    trained = saved.get("class_names")
    if any(pipe_command(url) for url in shard_urls(config.data_root, config.split)):
        if trained is None or "normalization" not in saved:
            raise UserError(f"checkpoint {first} records no class names or normalisation, which pipe: shards "
                            "cannot give: evaluate shards that have their classes.txt beside them")
        return open_shard_set(config.data_root, config.split, {"class_names": trained, **saved["normalization"]})
    shards = open_shard_set(config.data_root, config.split)
    if trained is not None and list(trained) != shards.class_names:
        raise UserError(f"the shards' classes.txt lists other classes, or another order, than checkpoint {first} "
                        "was trained on: evaluate without --stream, which renumbers them by name")
    return shards


def in_checkpoint_class_order(dataset: ImageDataset, checkpoints: list[tuple[str, dict]]) -> ImageDataset:
    """The split with its labels renumbered into the classes the checkpoints were trained on, matched by name
    (class folders that sort differently must not score 0%); unchanged for checkpoints that name no classes."""
    (first, saved), *others = checkpoints
    for path, other in others:
        if other.get("class_names") != saved.get("class_names"):
            raise UserError(f"checkpoints {first} and {path} were trained on different classes: evaluate them "
                            "separately")
    trained = saved.get("class_names")
    if trained is None or list(trained) == list(dataset.class_names):
        return dataset
    unknown = [name for name in dataset.class_names if name not in trained]
    if unknown:
        raise UserError(f"{dataset.name} / {dataset.split} has classes that checkpoint {first} was not trained on: "
                        f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    number = {name: index for index, name in enumerate(trained)}
    renumbered = np.array([number[name] for name in dataset.class_names], dtype=np.int64)
    return dataclasses.replace(dataset, class_names=list(trained), labels=renumbered[dataset.labels])


def evaluation_policy(checkpoints: list[tuple[str, dict]], native_size: int | None,
                      image_size: int | None) -> ViewPolicy:
    """The centre views every checkpoint is evaluated on: those it was trained on, the same for all of them."""
    (first, saved), *others = checkpoints
    for path, other in others:
        if other.get("view_policy") != saved.get("view_policy"):
            raise UserError(f"checkpoints {first} and {path} were trained on different views "
                            f"({saved.get('view_policy')} and {other.get('view_policy')}): evaluate them separately")
    if "view_policy" in saved:
        return policy_from_description(saved["view_policy"])
    return make_view_policy("auto", native_size, image_size)


def open_published(root: str | None, names: list[str], labels, side: int) -> PublishedCorruptions | None:
    """The published corrupted images in `root`, checked against the split and the view size (None: no root)."""
    if root is None:
        return None
    published = PublishedCorruptions(root, names, labels)
    if published.image_size != (side, side):
        height, width = published.image_size
        raise UserError(f"{root} holds {height} x {width} images; the model evaluates {side} x {side} views")
    return published


@torch.inference_mode()
def evaluate_robustness(config: EvaluateConfig, models: list, normalizations: list[Normalization],
                        views: LabelledViews, device, side: int, names: list[str],
                        published: PublishedCorruptions | None) -> list[dict]:
    """Per model (fed with its normalisation): top-1, NLL and ECE under every (corruption, severity), their means,
    and the drop from clean accuracy, the clean accuracy measured on the same images. Each corrupted batch is made
    once for all models."""
    dataset = views.dataset
    severities = parse_severities(config.severities)
    count = min(config.corruption_samples or len(dataset), len(dataset))
    samples = (np.arange(count) * len(dataset) // count).tolist()  # evenly spaced, so every class is in
    loader = data_loader(views, config.batch_size, config.num_workers, device, sampler=samples)
    settings = [(name, severity) for name in names for severity in severities]
    meters = [{setting: ClassificationMeter(num_classes=len(dataset.class_names)) for setting in [CLEAN, *settings]}
              for _ in models]
    for model in models:
        model.eval()
    with progress_bar("img") as progress:
        task = progress.add_task(f"{len(settings)} corruption settings", total=count * (len(settings) + 1))
        for batch, labels, indices in loader:
            clean = batch.float().div(255)
            for name, severity in [CLEAN, *settings]:
                if name == CLEAN[0]:
                    images = clean
                elif published is not None:
                    images = published.images(name, severity, indices.tolist())
                else:
                    images = corrupt(clean, name, severity, config.corruption_seed, indices.tolist())
                images = images.to(device, non_blocking=True)
                # Once per normalisation, not per model: the seeds of a run share theirs.
                inputs = {(n.mean, n.std): TF.normalize(images, list(n.mean), list(n.std)) for n in normalizations}
                for model, normalization, model_meters in zip(models, normalizations, meters):
                    x = inputs[normalization.mean, normalization.std]
                    with autocast(device):
                        logits, _ = model(x)
                    model_meters[(name, severity)].update(logits.float().cpu(), labels)
                progress.advance(task, len(labels))
    return [robustness_summary(config, {setting: meter.result() for setting, meter in model_meters.items()},
                               side, count, names, severities, published) for model_meters in meters]


def robustness_summary(config: EvaluateConfig, results: dict, side: int, count: int, names: list[str],
                       severities: list[int], published: PublishedCorruptions | None) -> dict:
    """One model's robustness entry from its metrics per (corruption, severity) and CLEAN."""
    settings = [(name, severity) for name in names for severity in severities]
    clean_top1 = results[CLEAN]["top1"]
    accuracy = {setting: results[setting]["top1"] for setting in settings}
    mean_accuracy = sum(accuracy.values()) / len(accuracy)
    return {
        "source": f"published files in {config.corrupted_root}" if published is not None else "generated",
        "parameters": "published files" if published is not None else parameter_set(side, side),
        "seed": None if published is not None else config.corruption_seed,
        "samples": count,
        "corruptions": names,
        "severities": severities,
        "clean_top1": clean_top1,
        "clean": {key: results[CLEAN][key] for key in ("top1", "nll", "ece")},
        "mean_corruption_accuracy": mean_accuracy,
        "relative_drop": (clean_top1 - mean_accuracy) / clean_top1 if clean_top1 > 0 else None,
        "corruption_mean_top1": {name: sum(accuracy[(name, s)] for s in severities) / len(severities)
                                 for name in names},
        "severity_mean_top1": {str(s): sum(accuracy[(name, s)] for name in names) / len(names)
                               for s in severities},
        "cells": {name: {str(s): {key: results[(name, s)][key] for key in ("top1", "nll", "ece")}
                         for s in severities} for name in names},
    }


def print_report(report: dict) -> None:
    seed = "" if report["seed"] is None else f" seed {report['seed']}"
    table = Table(title=f"{report['arch']}{seed} on {report['dataset']} / {report['split']} ({report['count']} images)",
                  title_justify="left")
    shares = ("superclass_share",) if "superclass_share" in report else ()
    for column in ("top-1", "top-5", "NLL", "ECE", f"confident-correct (>= {report['confidence_threshold']})",
                   "confidently-wrong", *(["superclass share"] if shares else [])):
        table.add_column(column, justify="right")
    table.add_row(*(percent(report[key], 2) for key in ("top1", "top5")), f"{report['nll']:.4f}",
                  percent(report['ece'], 2),
                  *(percent(report[key], 2) for key in ("confident_correct", "confidently_wrong", *shares)))
    results.print(table)
    per_class = [(name, accuracy) for name, accuracy in report["per_class_accuracy"].items() if accuracy is not None]
    if per_class:
        worst = sorted(per_class, key=lambda item: item[1])[:5]
        results.print("lowest per-class accuracy: " + ", ".join(f"{name} {percent(acc)}" for name, acc in worst))


def print_robustness(robustness: dict) -> None:
    severities = robustness["severities"]
    drop = robustness["relative_drop"]
    title = (f"top-1 under corruptions ({robustness['source']}, {robustness['samples']} images): "
             f"clean {percent(robustness['clean_top1'], 2)}, "
             f"mean corruption accuracy {percent(robustness['mean_corruption_accuracy'], 2)}, "
             f"relative drop {'n/a' if drop is None else percent(drop)}")
    table = Table(title=title, title_justify="left")
    table.add_column("corruption \\ severity")
    for severity in severities:
        table.add_column(str(severity), justify="right")
    table.add_column("mean", justify="right", style="bold")
    for name, cells in robustness["cells"].items():
        table.add_row(name, *(percent(cells[str(s)]['top1']) for s in severities),
                      percent(robustness['corruption_mean_top1'][name]))
    table.add_row("mean", *(percent(robustness['severity_mean_top1'][str(s)]) for s in severities),
                  percent(robustness['mean_corruption_accuracy']), style="bold")
    results.print(table)
