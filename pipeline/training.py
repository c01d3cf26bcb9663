"""The training loop shared by `richkd train` and `richkd distill`.

Everything random is drawn from generators seeded by (seed, epoch, purpose), and a checkpoint after
every epoch holds all other state, so on the CPU a resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset

from richkd.pipeline.config import DataOptions, ExecutionOptions, option, require, to_dict
from richkd.pipeline.data import ImageDataset, normalize
from richkd.pipeline.distributed import Part, is_main_process, main_process_first, process_group, torchrun_part
from richkd.pipeline.errors import UserError, preview
from richkd.pipeline.loading import LabelledViews, data_loader, evaluate_model
from richkd.pipeline.metrics import ClassificationMeter, percent
from richkd.pipeline.models import create_model, read_checkpoint, remove_unfinished_checkpoints, save_checkpoint
from richkd.pipeline.normalization import NormalizeOptions
from richkd.pipeline.runtime import autocast, console, hide_progress_bars, progress_bar, resolve_device
from richkd.pipeline.seeding import ORDER, VALIDATION, restore_rng_states, rng_states, seeded_generator
from richkd.pipeline.shards import CenterViewStream, ShardSet

OPTIMIZERS = {
    "sgd": lambda params, o: torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay),
    "adamw": lambda params, o: torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay),
}
SCHEDULES = ("multistep", "cosine")
# Config fields that may change when a run is resumed (`out`: a run directory may be moved).
RESUMABLE_CHANGES = {"resume", "overwrite", "epochs", "num_workers", "device", "eval_batch_size", "jobs", "out"}


@dataclass
class TrainingOptions(DataOptions, NormalizeOptions, ExecutionOptions):
    """Options of every training run; `train` and `distill` add their own."""

    eval_split: str = option(
        "test", "Held-out split evaluated once, after the last epoch: reported, never used to choose a checkpoint.",
        "Data")
    val_fraction: float = option(
        0.1, "Share of the training split held out (drawn by --seed, listed in <out>/validation.json), evaluated "
        "after every epoch to choose best.pt; 0 trains on every sample and keeps no best.pt.", "Data")
    arch: str = option("resnet8x4", "Architecture: a zoo name, tv:<torchvision model> or timm:<model>.", "Model")
    epochs: int = option(240, "Training epochs.", "Optimisation")
    batch_size: int = option(64, "Training batch size.", "Optimisation")
    optimizer: str = option("sgd", "sgd (with momentum) or adamw.", "Optimisation")
    lr: float = option(0.05, "Base learning rate.", "Optimisation")
    momentum: float = option(0.9, "SGD momentum.", "Optimisation")
    weight_decay: float = option(5e-4, "Weight decay.", "Optimisation")
    schedule: str = option("multistep", "Learning-rate schedule: multistep or cosine.", "Optimisation")
    milestones: str = option(
        "0.625,0.75,0.875", "When multistep decays the learning rate: fractions of --epochs (0.625,0.75,0.875 is "
        "150,180,210 of 240) or whole epochs.", "Optimisation")
    lr_decay: float = option(0.1, "Multistep decay factor.", "Optimisation")
    warmup_epochs: int = option(0, "Epochs of linear learning-rate warmup.", "Optimisation")
    seed: int = option(0, "Seed of initialisation, validation samples, data order and every other random draw.",
                       "Run")
    seeds: str | None = option(
        None, "Train one run per seed, such as 0,1,2, each in <out>/seed-<seed> (instead of --seed).", "Run")
    jobs: int = option(
        1, "Seeds of --seeds trained at once, each in its own process with an equal share of torch's CPU threads "
        "(a small model trains faster on one thread a run than on every thread at once; a run's numbers depend on "
        "its thread count, so keep --jobs to reproduce it).", "Run")
    out: str = option("runs/model", "Run directory: checkpoints, metrics, resolved config.", "Run")
    resume: bool = option(False, "Continue the run in --out from its last checkpoint.", "Run")
    overwrite: bool = option(False, "Start over, replacing the run in --out.", "Run")
    eval_batch_size: int = option(256, "Batch size of the held-out evaluation.", "Execution")

    def validate(self) -> None:
        super().validate()
        require(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        require(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        processes = torchrun_part().count
        require(self.batch_size % processes == 0, f"--batch-size (the whole batch, split over the processes) must "
                f"be a multiple of the number of processes, {processes}; got {self.batch_size}")
        require(self.eval_batch_size >= 1, f"--eval-batch-size must be at least 1, got {self.eval_batch_size}")
        require(self.lr > 0, f"--lr must be positive, got {self.lr}")
        require(0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}")
        require(self.weight_decay >= 0, f"--weight-decay must be 0 or more, got {self.weight_decay}")
        require(self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}, "
                                              f"got '{self.optimizer}'")
        require(self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, got '{self.schedule}'")
        require(0 < self.lr_decay <= 1, f"--lr-decay must be in (0, 1], got {self.lr_decay}")
        require(0 <= self.warmup_epochs < self.epochs,
                f"--warmup-epochs must be in [0, epochs), got {self.warmup_epochs}")
        require(not (self.resume and self.overwrite), "--resume and --overwrite exclude each other")
        require(0 <= self.val_fraction < 1, f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        require(self.seed >= 0, f"--seed must be 0 or more, got {self.seed}")
        require(self.jobs >= 1, f"--jobs must be at least 1, got {self.jobs}")
        require(self.jobs == 1 or torchrun_part().count == 1,
                "--jobs runs seeds in processes of its own: under torchrun, leave it at 1")
        self.warn_about_milestones()
        self.seed_list()

    def seed_list(self) -> list[int]:
        """The seeds of --seeds, or just --seed."""
        if self.seeds is None:
            return [self.seed]
        try:
            seeds = [int(part) for part in str(self.seeds).split(",") if part.strip()]
        except ValueError:
            raise UserError(f"--seeds must be comma-separated seeds such as 0,1,2, got '{self.seeds}'") from None
        require(seeds and all(seed >= 0 for seed in seeds) and len(set(seeds)) == len(seeds),
                f"--seeds must be distinct seeds of 0 or more, got '{self.seeds}'")
        return seeds

    def interruption_advice(self) -> str:
        """What Ctrl-C keeps, and the command (`{command}`, as it was typed) that continues the run."""
        where = f"{self.out}/seed-*" if self.seeds is not None else self.out
        return (f"the checkpoint of the last finished epoch in {where} is kept; continue with: "
                "{command} --resume")

    def resumable_changes(self) -> set[str]:
        """Config fields that may change when this run is resumed."""
        return RESUMABLE_CHANGES

    def milestone_list(self) -> list[int]:
        """The epochs of --milestones; a fraction of --epochs rounds to an epoch, and is left out when the run is
        too short to hold it (a one-epoch run has no epoch to decay at)."""
        def epochs_of(part: str) -> list[int]:
            if "." not in part:
                return [int(part)]
            fraction = float(part)
            require(0 < fraction < 1, f"--milestones fractions must lie in (0, 1), got '{self.milestones}'")
            epoch = round(fraction * self.epochs)
            return [epoch] if 0 < epoch < self.epochs else []

        try:
            milestones = [epoch for part in str(self.milestones).split(",") if part.strip()
                          for epoch in epochs_of(part.strip())]
        except ValueError:
            raise UserError(f"--milestones must be comma-separated fractions of --epochs or epochs, "
                            f"got '{self.milestones}'") from None
        require(milestones == sorted(milestones) and all(m > 0 for m in milestones),
                f"--milestones must be increasing and positive, got '{self.milestones}'")
        return milestones

    def warn_about_milestones(self) -> None:
        """A multistep milestone at or after the last epoch never decays the learning rate: say so."""
        late = [m for m in self.milestone_list() if m >= self.epochs]
        if self.schedule == "multistep" and late:
            console.print(f"warning: --milestones {','.join(map(str, late))} at or after the last epoch "
                          f"({self.epochs}): the learning rate never decays there", soft_wrap=True)


def same_setting(now, saved) -> bool:
    """Equal, or two spellings of one path (`runs/a` and `./runs/a/`)."""
    if isinstance(now, str) and isinstance(saved, str):
        return now == saved or Path(now).resolve() == Path(saved).resolve()
    return now == saved


def learning_rate_factor(options: TrainingOptions) -> Callable[[int], float]:
    """Factor of the base learning rate at an epoch: warmup, then multistep decay or cosine. A function, not an
    object, so that LambdaLR keeps it out of checkpoints: a run resumed with another --epochs follows the
    schedule of its new length (the fractions of --milestones and the cosine both depend on it)."""
    milestones, decay = options.milestone_list(), options.lr_decay
    warmup, epochs = options.warmup_epochs, options.epochs

    def factor(epoch: int) -> float:
        warm = min(1.0, (epoch + 1) / warmup) if warmup else 1.0
        if options.schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        return warm * decay ** sum(epoch >= milestone for milestone in milestones)

    return factor


def seeded_model(arch: str, num_classes: int, seed: int) -> nn.Module:
    """A fresh model whose initial weights depend on `seed` alone."""
    torch.manual_seed(seed)
    return create_model(arch, num_classes)


# The best checkpoint before any epoch, or of a run that keeps no validation samples.
NO_BEST = {"epoch": None, "top1": None, "selected_on": None}

def run_per_seed(options: TrainingOptions, train_one: Callable[[TrainingOptions], dict]) -> dict:
    """`train_one(options)`, or with --seeds one run per seed in <out>/seed-<seed>: {"seed-<seed>": summary},
    --jobs of them at once."""
    if options.seeds is None:
        return train_one(options)
    runs = {seed: dataclasses.replace(options, seed=seed, seeds=None, out=str(Path(options.out) / f"seed-{seed}"))
            for seed in options.seed_list()}
    jobs = min(options.jobs, len(runs))
    if jobs == 1:
        return {f"seed-{seed}": train_one(run) for seed, run in runs.items()}
    threads = max(1, torch.get_num_threads() // jobs)
    # Forked, not spawned: a worker starts at once instead of importing torch again.
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"), initializer=start_seed_worker,
                             initargs=(threads,)) as pool:
        futures = {seed: pool.submit(train_one, run) for seed, run in runs.items()}
        return {f"seed-{seed}": future.result() for seed, future in futures.items()}


def start_seed_worker(threads: int) -> None:
    """A process training seeds beside others: its share of the threads, and no progress bar to share a terminal."""
    torch.set_num_threads(threads)
    hide_progress_bars()


def holdout_split(num_samples: int, options: TrainingOptions) -> tuple[np.ndarray, np.ndarray]:
    """(training samples, validation samples), sorted: --val-fraction of the split, drawn by --seed."""
    count = round(options.val_fraction * num_samples)
    require(count < num_samples, f"--val-fraction {options.val_fraction} leaves no training sample of {num_samples}")
    shuffled = np.random.default_rng((options.seed, VALIDATION)).permutation(num_samples)
    return np.sort(shuffled[count:]), np.sort(shuffled[:count])


def training_mask(num_samples: int, training: np.ndarray) -> np.ndarray:
    """True for the samples an epoch trains on."""
    mask = np.zeros(num_samples, dtype=bool)
    mask[training] = True
    return mask


class Objective(Protocol):
    """What a training run optimises, beyond the model (an nn.Module with these methods): its losses, extra
    modules and per-epoch data."""

    def epoch_data(self, epoch: int, part: Part) -> tuple[np.ndarray | None, np.ndarray] | IterableDataset:
        """(stored view params per sample or None for fresh random views, this process's part of the epoch's
        sample order: every process gets as many samples), or the epoch's own stream of (view, label, index,
        targets) with `check_epoch(samples seen)`."""

    def losses(self, logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
               indices: torch.Tensor, epoch: int, targets: dict | None = None) -> dict[str, torch.Tensor]:
        """Weighted loss terms of a batch, given its cached targets if the stream brought them; their sum
        is minimised."""

    def end_epoch(self) -> None: ...


def rank_share(order: np.ndarray, part: Part) -> np.ndarray:
    """Every `part.count`-th sample of `order`, from `part.index`; wrapped around so all parts are as long."""
    if part.count == 1:
        return order
    return np.resize(order, -(-len(order) // part.count) * part.count)[part.index::part.count]


class StudentStep(nn.Module):
    """The student and its objective as one module: the losses of a batch. DistributedDataParallel wraps it,
    so that the objective's own parameters (CRD's embeddings) are averaged over the processes too."""

    def __init__(self, model: nn.Module, objective: nn.Module, device: torch.device):
        super().__init__()
        self.model, self.objective, self.device = model, objective, device

    def forward(self, x: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                epoch: int, targets: dict | None = None) -> dict[str, torch.Tensor]:
        with autocast(self.device):
            logits, features = self.model(x)
        return self.objective.losses(logits.float(), features.float(), labels, indices, epoch, targets)


class Trainer:
    """Runs epochs of `objective` on `model`, evaluating, checkpointing and logging after each."""

    def __init__(self, options: TrainingOptions, model: nn.Module, objective: Objective,
                 dataset: ImageDataset | ShardSet, eval_dataset: ImageDataset | ShardSet, policy,
                 checkpoint_info: dict, validation: np.ndarray | None = None, announce: tuple[str, ...] = ()):
        """`dataset` is read by index, unless the objective streams it (then only its normalisation is used);
        its `validation` samples choose best.pt. `eval_dataset` is read by index, or streamed when it is a set of
        shards, once after the last epoch. The lines of `announce` are printed once the run directory is ready."""
        self.options, self.objective, self.announce = options, objective, announce
        self.dataset, self.eval_dataset, self.policy = dataset, eval_dataset, policy
        self.validation = np.zeros(0, dtype=np.int64) if validation is None else validation
        self.device = resolve_device(options.device)
        self.model = model.to(self.device)
        self.objective.to(self.device)
        # Channels-last convolutions are faster with cuDNN and with oneDNN on the CPU alike.
        self.model.to(memory_format=torch.channels_last)
        self.run_dir = Path(options.out)
        self.checkpoints = self.run_dir / "checkpoints"
        self.checkpoint_info = checkpoint_info
        self.step = StudentStep(self.model, self.objective, self.device)
        self.part = Part()
        parameters = [*self.model.parameters(), *self.objective.parameters()]
        self.optimizer = OPTIMIZERS[options.optimizer](parameters, options)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, learning_rate_factor(options))

    def checkpoint_payload(self, epoch: int, best: dict) -> dict:
        return {
            "epoch": epoch,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "objective": self.objective.state_dict(),
            "rng": rng_states(),
            "best": best,
            "config": to_dict(self.options),
            **self.checkpoint_info,
        }

    def restore(self) -> tuple[int, dict]:
        last = self.checkpoints / "last.pt"
        state, saved = read_checkpoint(last)
        for key, value in saved["config"].items():
            now = getattr(self.options, key, None)
            if key not in self.options.resumable_changes() and not same_setting(now, value):
                raise UserError(f"cannot resume {self.run_dir}: it was run with {key}={value!r}, now {now!r}")
        self.model.load_state_dict(state)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        # The learning rate of the next epoch under this run's schedule, which changes with --epochs.
        for group, base_lr, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                          self.scheduler.lr_lambdas):
            group["lr"] = base_lr * factor(self.scheduler.last_epoch)
        self.objective.load_state_dict(saved["objective"])
        restore_rng_states(saved["rng"])
        return saved["epoch"], saved["best"]

    def prepare_run_dir(self) -> tuple[int, dict]:
        """(first epoch, best so far): a fresh run, or where the last checkpoint left off."""
        if self.checkpoints.is_dir():
            remove_unfinished_checkpoints(self.checkpoints)
        has_run = (self.checkpoints / "last.pt").exists()
        if has_run and self.options.resume:
            return self.restore()
        if has_run and not self.options.overwrite:
            raise UserError(f"{self.run_dir} already holds a run: pass --resume to continue it or --overwrite")
        if self.options.resume:
            console.print(f"nothing to resume in {self.run_dir}: starting from epoch 0")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("last.pt", "best.pt"):
            (self.checkpoints / stale).unlink(missing_ok=True)
        return 0, NO_BEST

    def kept(self, epoch: int) -> str:
        """What a run stopped during `epoch` (counted from 0) leaves behind."""
        if epoch == 0:
            return "no epoch had ended, so there is no checkpoint"
        return f"{self.checkpoints / 'last.pt'} (epoch {epoch}) is kept"

    def epoch_loader(self, epoch: int) -> tuple[DataLoader, int, Callable[[int], None]]:
        """This process's batches of the epoch, how many samples they hold, and what checks the count."""
        data = self.objective.epoch_data(epoch, self.part)
        batch_size, workers = self.options.batch_size // self.part.count, self.options.num_workers
        if isinstance(data, IterableDataset):
            return data_loader(data, batch_size, workers, self.device), len(data), data.check_epoch
        params, order = data
        views = LabelledViews(self.dataset, self.policy, params, seed=self.options.seed, stream=epoch)
        loader = data_loader(views, batch_size, workers, self.device, sampler=order.tolist())
        return loader, len(order), lambda seen: None

    def train_epoch(self, epoch: int, step: nn.Module, progress, task) -> dict[str, float]:
        """One epoch of this process's part of the data; `step` is StudentStep, or its DDP wrapper."""
        loader, samples, check_epoch = self.epoch_loader(epoch)
        progress.update(task, total=samples)
        self.model.train()
        self.objective.train()
        totals: dict[str, float] = {}
        seen = 0
        try:
            for batch_number, (views_batch, labels, indices, *targets) in enumerate(loader, 1):
                x = normalize(views_batch.to(self.device, non_blocking=True), self.dataset.mean, self.dataset.std)
                labels = labels.to(self.device, non_blocking=True)
                losses = step(x.contiguous(memory_format=torch.channels_last), labels, indices, epoch, *targets)
                loss = sum(losses.values())
                if not torch.isfinite(loss):
                    raise UserError(f"training diverged in epoch {epoch + 1} at batch {batch_number} (samples "
                                    f"{preview(indices.tolist())}): the loss is {loss.item()}; {self.kept(epoch)}; "
                                    "lower --lr or check the loss weights")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                batch = len(labels)
                seen += batch
                for name, value in {"loss": loss, **{f"loss_{k}": v for k, v in losses.items()}}.items():
                    totals[name] = totals.get(name, 0.0) + value.item() * batch
                progress.advance(task, batch)
            check_epoch(seen)
        finally:
            self.objective.end_epoch()
        self.scheduler.step()
        return {name: total / seen for name, total in totals.items()}

    def evaluate(self, dataset: ImageDataset | ShardSet, samples: np.ndarray | None = None) -> dict[str, float]:
        """Metrics of the centre views of `dataset`, or of its `samples`."""
        views = (CenterViewStream(dataset, self.policy) if isinstance(dataset, ShardSet)
                 else LabelledViews(dataset, self.policy, center=True))
        sampler = None if samples is None else samples.tolist()
        loader = data_loader(views, self.options.eval_batch_size, self.options.num_workers, self.device, sampler)
        meter = evaluate_model(self.model, loader, self.device, dataset.mean, dataset.std, ClassificationMeter())
        return meter.result()

    def follow_run_dir(self) -> tuple[int, dict]:
        """What the first process's prepare_run_dir decided, for the others: continue from last.pt, or start."""
        if self.options.resume and (self.checkpoints / "last.pt").exists():
            return self.restore()
        return 0, NO_BEST

    def run(self) -> dict:
        """Train, alone or as one of torchrun's processes: each trains on its part of every batch, the
        gradients are averaged (DistributedDataParallel) and the first process evaluates, logs and saves."""
        with process_group(self.device) as part:
            self.part = part
            first_epoch, best = main_process_first(self.prepare_run_dir, self.follow_run_dir)
            step = self.step
            if part.count > 1:
                if self.device.type == "cuda":  # batch statistics over the whole batch, as in one process
                    step = nn.SyncBatchNorm.convert_sync_batchnorm(step)
                # The CRD memory is kept equal on every process by the objective itself, not broadcast.
                step = DistributedDataParallel(step, device_ids=[self.device.index] if self.device.index is not None
                                               else None, broadcast_buffers=False)
            if not is_main_process():
                with progress_bar("img", disable=True) as progress:
                    for epoch in range(first_epoch, self.options.epochs):
                        self.train_epoch(epoch, step, progress, progress.add_task("", total=None))
                return {}
            return self.run_epochs(step, first_epoch, best)

    def run_epochs(self, step: nn.Module, first_epoch: int, best: dict) -> dict:
        from dvclive import Live

        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.options), sort_keys=False))
        (self.run_dir / "run.json").write_text(json.dumps(self.checkpoint_info, indent=2))
        keys = getattr(self.dataset, "keys", None)
        (self.run_dir / "validation.json").write_text(json.dumps({
            "fraction": self.options.val_fraction, "seed": self.options.seed, "count": len(self.validation),
            "keys": [keys[i] for i in self.validation] if keys is not None else self.validation.tolist()}))
        for line in self.announce:
            console.print(line, soft_wrap=True)
        epoch_seconds = []
        with Live(str(self.run_dir / "dvclive"), resume=first_epoch > 0, save_dvc_exp=False, dvcyaml=None,
                  report=None) as live, progress_bar("img") as progress:
            if first_epoch == 0:
                live.log_params(to_dict(self.options))
            for epoch in range(first_epoch, self.options.epochs):
                lr = self.optimizer.param_groups[0]["lr"]
                task = progress.add_task(f"epoch {epoch + 1}/{self.options.epochs}", total=None)
                started = time.perf_counter()
                train_metrics = self.train_epoch(epoch, step, progress, task)
                epoch_seconds.append(time.perf_counter() - started)
                progress.remove_task(task)
                line = (f"seed {self.options.seed}, epoch {epoch + 1}/{self.options.epochs}: "
                        f"loss {train_metrics['loss']:.4f}")
                val_metrics = self.evaluate(self.dataset, self.validation) if len(self.validation) else None
                is_best = val_metrics is not None and (best["top1"] is None or val_metrics["top1"] > best["top1"])
                if is_best:
                    best = {"epoch": epoch + 1, "top1": val_metrics["top1"], "selected_on": "validation"}
                payload = self.checkpoint_payload(epoch + 1, best)
                # best.pt first: last.pt is where a resumed run starts, so a kill between the two
                # writes repeats this epoch, never leaves best.pt behind the best it records.
                if is_best:
                    save_checkpoint(self.model, self.checkpoints / "best.pt", **payload)
                save_checkpoint(self.model, self.checkpoints / "last.pt", **payload)
                live.step = epoch
                for name, value in train_metrics.items():
                    live.log_metric(f"train/{name}", value)
                if val_metrics is not None:
                    for name in ("top1", "top5", "nll", "ece"):
                        live.log_metric(f"validation/{name}", val_metrics[name])
                    line += f", validation top-1 {percent(val_metrics['top1'], 2)}"
                live.log_metric("lr", lr)
                live.log_metric("epoch_seconds", epoch_seconds[-1])
                live.next_step()
                console.print(f"{line} ({epoch_seconds[-1]:.1f} s)")
            # Reported, never selected on: the last epoch's model, once.
            held_out = self.evaluate(self.eval_dataset)
            for name in ("top1", "top5", "nll", "ece"):
                live.summary[f"{self.options.eval_split}/{name}"] = held_out[name]
            live.make_summary()
        console.print(f"seed {self.options.seed}, {self.options.eval_split} top-1 of the last epoch's model: "
                      f"{percent(held_out['top1'], 2)}")
        summary = {
            "epochs": self.options.epochs,
            "best": best,
            "last": {self.options.eval_split: held_out},
            "train_seconds_per_epoch": float(np.mean(epoch_seconds)) if epoch_seconds else None,
            "epoch_train_seconds": epoch_seconds,
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


class SupervisedObjective(nn.Module):
    """Cross-entropy on labels, with a fresh random view of every training sample each epoch."""

    def __init__(self, training: np.ndarray, num_samples: int, seed: int):
        super().__init__()
        self.trains_on, self.seed = training_mask(num_samples, training), seed

    def epoch_data(self, epoch: int, part: Part) -> tuple[None, np.ndarray]:
        order = torch.randperm(len(self.trains_on), generator=seeded_generator(self.seed, epoch, ORDER)).numpy()
        return None, rank_share(order[self.trains_on[order]], part)

    def losses(self, logits, features, labels, indices, epoch, targets=None) -> dict[str, torch.Tensor]:
        return {"ce": F.cross_entropy(logits, labels)}

    def end_epoch(self) -> None:
        pass
