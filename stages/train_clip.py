"""`richkd train-clip`: train (or fine-tune) an open_clip model contrastively on a dataset's images and captions.

Any dataset with a caption per image can supply its own vision-language teacher this way; the demo
uses it to make a tiny CLIP that knows its shapes from the captions alone, not from the labels. The
result is an open_clip `local-dir:` bundle that `richkd precompute --clip local-dir:DIR` loads. As `richkd train`
does, it ends every epoch with a checkpoint, which `--resume` continues from (on the CPU to the bundle an
uninterrupted run writes, byte for byte), in the bundle's `checkpoints/` folder, which the bundle loader does not read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import torch

from richkd.pipeline.clip import (
    DEFAULT_TEMPLATES,
    ClipTeacher,
    load_clip,
    open_clip_library,
    prompt_class_name,
)
from richkd.pipeline.config import ExecutionOptions, to_dict
from richkd.pipeline.data import read_captions, require_labelled
from richkd.pipeline.datasets import open_dataset
from richkd.pipeline.errors import UserError, preview
from richkd.pipeline.execution import progress_bar, resolve_device
from richkd.pipeline.loading import LabelledViews, data_loader
from richkd.pipeline.metrics import ClassificationMeter, percent
from richkd.pipeline.models import read_checkpoint, remove_unfinished_writes, save_checkpoint, written_atomically
from richkd.pipeline.prompts import zero_shot_classifier
from richkd.pipeline.runtime import console
from richkd.pipeline.seeding import ORDER, rng_states, seeded_generator
from richkd.pipeline.training import (
    continues_run,
    kept_on_failure,
    live_log,
    optimize,
    refuse_other_settings,
    restore_optimization,
)
from richkd.pipeline.views import make_view_policy
from richkd.stages.options import TrainClipConfig

BUNDLE_WEIGHTS = "open_clip_model.safetensors"
BUNDLE_CONFIG = "open_clip_config.json"
BUNDLE_METRICS = "metrics.json"
# The bundle's files in the order they are written: metrics.json last, so a bundle that has it is complete.
BUNDLE_FILES = (BUNDLE_WEIGHTS, BUNDLE_CONFIG, BUNDLE_METRICS)
# The run's checkpoints, in a folder of the bundle: the bundle loader and its sha256 read only the files beside it.
CHECKPOINTS = "checkpoints"
# Config fields that may change when a run is resumed: its length, and where and how it runs.
RESUMABLE_CHANGES = {"resume", "overwrite", "epochs", "out",
                     *(field.name for field in dataclasses.fields(ExecutionOptions))}


def zero_shot_top1(clip: ClipTeacher, loader, class_names: list[str], device: torch.device) -> float:
    class_embeds, _ = zero_shot_classifier(clip, [prompt_class_name(n) for n in class_names], list(DEFAULT_TEMPLATES),
                                           device)
    meter = ClassificationMeter()
    clip.model.eval()
    with torch.inference_mode():
        for views, labels, _ in loader:
            embeds = clip.encode_images(clip.preprocess(views.to(device)))
            meter.update((embeds.float() @ class_embeds.T).cpu(), labels)
    return meter.result()["top1"]


def continued_run(config: TrainClipConfig, out: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(model state, checkpoint entries) of the run in `out` that --resume continues, or None for a new run, for
    which `out` is emptied: a bundle or run there is replaced only with --overwrite, and anything else never."""
    checkpoints = out / CHECKPOINTS
    for folder in (out, checkpoints):
        remove_unfinished_writes(folder)
    held = {path.name for path in out.iterdir()} if out.is_dir() else set()
    strangers = sorted(held - {*BUNDLE_FILES, CHECKPOINTS})
    if strangers:
        raise UserError(f"--out {out} holds files that are not a train-clip bundle or run ({preview(strangers)}): "
                        "not replacing them")
    has_run, has_bundle = (checkpoints / "last.pt").exists(), bool(held & set(BUNDLE_FILES))
    if has_bundle and not has_run and not config.overwrite:
        raise UserError(f"{out} already holds a CLIP bundle, without the checkpoint to continue its run: "
                        "pass --overwrite to replace it")
    if continues_run(out, has_run, config.resume, config.overwrite, "a CLIP bundle" if has_bundle else "a run"):
        state, saved = read_checkpoint(checkpoints / "last.pt")
        refuse_other_settings(out, saved["config"], config, RESUMABLE_CHANGES)
        return state, saved
    shutil.rmtree(out, ignore_errors=True)
    return None


def finished_metrics(out: Path, epochs: int) -> dict | None:
    """The metrics of the bundle in `out`, if it is complete and of the run's `epochs` (not of a shorter run that
    this one continues)."""
    if not (out / BUNDLE_METRICS).exists():
        return None
    metrics = json.loads((out / BUNDLE_METRICS).read_text())
    return metrics if len(metrics["history"]) == epochs else None


def save_bundle(clip: ClipTeacher, model_config: dict, out: Path, metrics: dict) -> None:
    """The open_clip local-dir bundle in `out`, beside the run's checkpoints: each file replaced atomically, in the
    order of BUNDLE_FILES."""
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file

    advice = "the run's checkpoints are kept; free some space and continue the run with --resume"
    with written_atomically(out / BUNDLE_WEIGHTS, advice) as temporary:
        save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, temporary)
    with written_atomically(out / BUNDLE_CONFIG, advice) as temporary:
        save_config_for_hf(clip.model, temporary, model_config=model_config)
    with written_atomically(out / BUNDLE_METRICS, advice) as temporary:
        temporary.write_text(json.dumps(metrics, indent=2))


def run(config: TrainClipConfig) -> dict:
    device = resolve_device(config.device)
    dataset = open_dataset(config.dataset, config.data_root, config.split, config.download)
    eval_dataset = open_dataset(config.dataset, config.data_root, config.eval_split, config.download)
    require_labelled(eval_dataset, "--eval-split")
    captions = read_captions(config.captions or Path(config.data_root) / config.split / "captions.json", dataset.keys)
    torch.manual_seed(config.seed)
    clip = load_clip(config.model, config.pretrained, device)
    open_clip = open_clip_library()
    model_config = open_clip.get_model_config(config.model)
    tokens = clip.tokenizer(captions)
    # Each image as precompute shows it to CLIP: its centre view at the dataset's own size, resized to CLIP's input
    # by clip.preprocess (a view cut at CLIP's smaller size would be a patch of the image, not the image).
    policy = make_view_policy("auto", dataset.native_size, None)
    # Captions name positions ("on the left"), so images are shown as they are: no crops, no flips.
    train_views = LabelledViews(dataset, policy, center=True)
    eval_loader = data_loader(LabelledViews(eval_dataset, policy, center=True), config.batch_size,
                              config.num_workers, device)
    # As open_clip's training does: no decay on gains, biases and the temperature, which decay would pull to 0.
    def decays(name: str, parameter: torch.Tensor) -> bool:
        return parameter.ndim >= 2 and not any(part in name for part in ("bn", "ln", "bias", "logit_scale"))

    named = list(clip.model.named_parameters())
    groups = [{"params": [p for n, p in named if decays(n, p)], "weight_decay": config.weight_decay},
              {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    steps_per_epoch = math.ceil(len(dataset) / config.batch_size)
    warmup, total = config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch

    def lr_factor(step: int) -> float:
        """Linear warmup, then cosine decay, per step."""
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    loss_fn = open_clip.ClipLoss()

    def contrastive_loss(views, labels, indices) -> dict[str, torch.Tensor]:
        images = clip.preprocess(views.to(device))
        image_features, text_features, logit_scale = clip.model(images, tokens[indices].to(device))[:3]
        return {"contrastive": loss_fn(image_features, text_features, logit_scale)}

    def after_step() -> None:
        schedule.step()
        with torch.no_grad():  # CLIP's clamp: keep the learned temperature below 100
            clip.model.logit_scale.clamp_(0, math.log(100))

    out = Path(config.out)
    last = out / CHECKPOINTS / "last.pt"
    first_epoch, history = 0, []
    continued = continued_run(config, out)
    if continued is not None:
        state, saved = continued
        first_epoch, history = saved["epoch"], saved["history"]
        metrics = finished_metrics(out, first_epoch) if first_epoch >= config.epochs else None
        if metrics is not None:
            console.print(f"trained already ({first_epoch} epochs), the bundle {out} stands", soft_wrap=True)
            return metrics
        clip.model.load_state_dict(state)
        restore_optimization(optimizer, schedule, saved)
    # The config is in the bundle's metrics.json, not dvclive's params.yaml (which dvclive parses at every step).
    with live_log(out.with_name(out.name + "_dvclive"), first_epoch > 0) as live, progress_bar("img") as progress:
        for epoch in range(first_epoch, config.epochs):
            # The epoch's order depends on the seed and the epoch alone, so a resumed run reads what this one would.
            order = torch.randperm(len(dataset), generator=seeded_generator(config.seed, epoch, ORDER)).tolist()
            loader = data_loader(train_views, config.batch_size, config.num_workers, device, sampler=order)
            task = progress.add_task(f"clip epoch {epoch + 1}/{config.epochs}", total=len(dataset))
            clip.model.train()
            totals, seen = optimize(loader, contrastive_loss, optimizer, progress, task, epoch,
                                    kept_on_failure(last, epoch), after_step)
            progress.remove_task(task)
            top1 = zero_shot_top1(clip, eval_loader, eval_dataset.class_names, device)
            history.append({"epoch": epoch + 1, "loss": totals["loss"] / seen, "zero_shot_top1": top1})
            save_checkpoint(clip.model, last, epoch=epoch + 1, optimizer=optimizer.state_dict(),
                            scheduler=schedule.state_dict(), rng=rng_states(), history=history, config=to_dict(config))
            live.step = epoch
            live.log_metric("train/loss", history[-1]["loss"])
            live.log_metric(f"{config.eval_split}/zero_shot_top1", top1)
            live.next_step()
            console.print(f"clip epoch {epoch + 1}/{config.epochs}: loss {history[-1]['loss']:.4f}, "
                          f"{config.eval_split} zero-shot top-1 {percent(top1, 2)}")
    metrics = {"zero_shot_top1": history[-1]["zero_shot_top1"], "split": config.eval_split, "history": history,
               "config": to_dict(config)}
    save_bundle(clip, model_config, out, metrics)
    return metrics
