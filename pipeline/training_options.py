"""The options of every training run (`train` and `distill`), and their learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from richkd.pipeline.config import ExecutionOptions, NormalizeOptions, StreamOptions, option, require, require_positive
from richkd.pipeline.errors import UserError
from richkd.pipeline.runtime import torchrun_part, warn

# What --optimizer names (`richkd.pipeline.training.make_optimizer` builds them): this module stays free of torch,
# so that the command line reads the options at once.
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("multistep", "cosine")
# Config fields that may change when a run is resumed (`out`: a run directory may be moved).
RESUMABLE_CHANGES = {"resume", "overwrite", "epochs", "num_workers", "device", "eval_batch_size", "jobs", "out"}


@dataclass
class TrainingOptions(StreamOptions, NormalizeOptions, ExecutionOptions):
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
    shuffle_buffer: int = option(4096, "--stream: samples (encoded; distill: with their targets) in each loader's "
                                 "shuffle buffer.", "Streaming")

    def validate(self) -> None:
        super().validate()
        require(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        require(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        processes = torchrun_part().count
        require(self.batch_size % processes == 0, f"--batch-size (the whole batch, split over the processes) must "
                f"be a multiple of the number of processes, {processes}; got {self.batch_size}")
        require(self.eval_batch_size >= 1, f"--eval-batch-size must be at least 1, got {self.eval_batch_size}")
        require_positive(self.lr, "--lr")
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
        require(not self.stream or self.val_fraction == 0,
                "--stream reads every training sample in turn, none can be held out: pass --val-fraction 0 "
                "(no best.pt is then kept)")
        require(self.shuffle_buffer >= 1, f"--shuffle-buffer must be at least 1, got {self.shuffle_buffer}")
        require(self.seed >= 0, f"--seed must be 0 or more, got {self.seed}")
        require(self.seeds is None or self.seed == 0,  # 0 is --seed's default: it cannot be told from not given
                f"--seed {self.seed} and --seeds {self.seeds} exclude each other: --seeds trains one run per seed")
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
        """Config fields that may change when this run is resumed; not the loader workers of a stream, whose
        order depends on how many split its shards."""
        return RESUMABLE_CHANGES - {"num_workers"} if self.stream else RESUMABLE_CHANGES

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
            warn(f"--milestones {','.join(map(str, late))} at or after the last epoch ({self.epochs}): the learning "
                 "rate never decays there")



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


