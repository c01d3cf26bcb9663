"""The training loop shared by `richkd train` and `richkd distill`.

Everything random is drawn from generators seeded by (seed, epoch, purpose), and a checkpoint after
every epoch holds all other state, so on the CPU a resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset

from richkd.cache.locks import RunFolderLock
from richkd.pipeline.config import to_dict
from richkd.pipeline.data import ImageDataset, normalize
from richkd.pipeline.distributed import is_main_process, main_process_first, process_group
from richkd.pipeline.errors import UserError, out_of_space_is_a_user_error, preview
from richkd.pipeline.execution import autocast, hide_progress_bars, progress_bar, resolve_device
from richkd.pipeline.loading import LabelledViews, data_loader, evaluate_model, training_mask
from richkd.pipeline.metrics import ClassificationMeter, percent
from richkd.pipeline.models import read_checkpoint, remove_unfinished_writes, save_checkpoint
from richkd.pipeline.runtime import Part, console
from richkd.pipeline.seeding import ORDER, restore_rng_states, rng_states, seeded_generator
from richkd.pipeline.shards import CenterViewStream, ShardSet
from richkd.pipeline.training_options import TrainingOptions, learning_rate_factor
from richkd.pipeline.views import mixing


def same_setting(now, saved) -> bool:
    """Equal, or two spellings of one path (`runs/a` and `./runs/a/`)."""
    if isinstance(now, str) and isinstance(saved, str):
        return now == saved or Path(now).resolve() == Path(saved).resolve()
    return now == saved


def continues_run(run_dir: Path, has_run: bool, resume: bool, overwrite: bool, held: str = "a run") -> bool:
    """Whether to continue the run in `run_dir` (--resume) rather than start one; the run or other result it holds
    (`held`) is replaced only with --overwrite."""
    if has_run and resume:
        return True
    if has_run and not overwrite:
        raise UserError(f"{run_dir} already holds {held}: pass --resume to continue it or --overwrite")
    if resume:
        console.print(f"nothing to resume in {run_dir}: starting from epoch 0")
    return False


def refuse_other_settings(run_dir: Path, saved: dict, options, resumable: set[str]) -> None:
    """A run continues with the settings it was run with (`saved`), but for the `resumable` ones."""
    for key, value in saved.items():
        now = getattr(options, key, None)
        if key not in resumable and not same_setting(now, value):
            raise UserError(f"cannot resume {run_dir}: it was run with {key}={value!r}, now {now!r}")


def restore_optimization(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                         saved: dict) -> None:
    """The optimiser, the schedule's position and the global RNG states of a checkpoint."""
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    # The learning rate of the schedule's next step under this run's length, which changes with --epochs.
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(scheduler.last_epoch)
    restore_rng_states(saved["rng"])


def kept_on_failure(last: Path, epoch: int) -> str:
    """What a run that stopped during `epoch` (counted from 0) leaves behind: its checkpoint `last`, if any."""
    if epoch == 0:
        return "no epoch had ended, so there is no checkpoint"
    return f"{last} (epoch {epoch}) is kept"


# The best checkpoint before any epoch, or of a run that keeps no validation samples.
NO_BEST = {"epoch": None, "top1": None, "selected_on": None}

# Taken by a run's dvclive log to end: a lock shared by the seed processes of --jobs, set in each as it starts.
LIVE_END = {"lock": threading.Lock()}

# Seconds without a heartbeat after which a run folder's lock counts as left by a killed process on another host;
# on the same host a lock whose process is gone is taken over at once.
RUN_LOCK_TIMEOUT = 600.0
# prctl's option for the signal a process gets when its parent dies (linux/prctl.h).
PR_SET_PDEATHSIG = 1
# How often a seed process without prctl looks whether its parent is still there, in seconds.
PARENT_POLL_SECONDS = 1.0


def uses_dvc(folder: Path) -> bool:
    """Whether `folder` is in a DVC repository, or a DVC pipeline runs this process."""
    return "DVC_ROOT" in os.environ or any((parent / ".dvc").is_dir() for parent in (folder, *folder.parents))


def live_log(directory: Path, resume: bool = False):
    """dvclive's Live, logging to `directory`. Inside a DVC repository every Live ends by removing one signal file of
    the repository after checking that it exists, so seed processes ending together race and the loser fails (seen
    with --jobs 2 under `dvc repro`): their ends take turns. Outside one, it only writes `directory`: dvclive would
    run `dvc init` in the Git repository around it, and a user's repository is not richkd's to change."""
    from dvclive import Live  # imported here: dvclive is slow to import, and only runs that log need it

    class TurnTakingLive(Live):
        def _init_dvc(self) -> None:
            if uses_dvc(Path.cwd()):
                super()._init_dvc()
            else:  # what dvclive itself sets up outside any Git repository
                self._dvc_file = self._init_dvc_file()

        def end(self) -> None:
            with LIVE_END["lock"]:
                super().end()

    if resume:
        drop_unfinished_log_writes(directory)
    return TurnTakingLive(str(directory), resume=resume, save_dvc_exp=False, dvcyaml=None, report=None)


def make_optimizer(parameters, options: TrainingOptions) -> torch.optim.Optimizer:
    """The optimizer --optimizer names, at the run's learning rate and weight decay."""
    if options.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=options.lr, weight_decay=options.weight_decay)
    return torch.optim.SGD(parameters, lr=options.lr, momentum=options.momentum, weight_decay=options.weight_decay)


def drop_unfinished_log_writes(directory: Path) -> None:
    """Undo what a write of dvclive's that a full disk or a kill cut short left in `directory`: a metrics.json that
    is no JSON (resuming would fail on it; it only holds the latest values, written again at the next step), and a
    last row without its line end (the next row would be glued to it), or a table without its header line."""
    latest = directory / "metrics.json"
    try:
        json.loads(latest.read_bytes())
    except FileNotFoundError:
        pass
    except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
        latest.unlink()
    for table in (directory / "plots" / "metrics").rglob("*.tsv"):
        rows = table.read_bytes()
        whole_rows = rows[:rows.rfind(b"\n") + 1]
        if not whole_rows:  # dvclive writes the header of a table that does not exist
            table.unlink()
        elif whole_rows != rows:
            table.write_bytes(whole_rows)


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
    fork = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(jobs, mp_context=fork, initializer=start_seed_worker,
                             initargs=(threads, fork.Lock(), os.getpid())) as pool:
        futures = {seed: pool.submit(train_one, run) for seed, run in runs.items()}
        return {f"seed-{seed}": future.result() for seed, future in futures.items()}


def start_seed_worker(threads: int, live_end, parent: int) -> None:
    """A process training seeds beside others: it ends with its `parent`, has its share of the threads, no progress
    bar to share a terminal, and the lock its dvclive log ends under."""
    die_with_parent(parent)
    torch.set_num_threads(threads)
    hide_progress_bars()
    LIVE_END["lock"] = live_end


def die_with_parent(parent: int) -> None:
    """End this process (SIGKILL) when `parent` ends: a seed process outliving a killed `richkd` would go on
    training, then hang, and keep a --resume out of its run folder. The kernel sends the signal where prctl exists
    (Linux); elsewhere a thread watches for the parent to go."""
    # The kernel signals when the thread that forked this process ends: ProcessPoolExecutor forks from the thread
    # that submits, the main one, which ends with the parent.
    try:
        death_signal_set = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) == 0
    except AttributeError:  # no prctl
        death_signal_set = False
    if not death_signal_set:
        threading.Thread(target=watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # the parent ended before the signal was set up
        os.kill(os.getpid(), signal.SIGKILL)


def watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os.kill(os.getpid(), signal.SIGKILL)


def optimize(loader: Iterable, batch_losses: Callable[..., dict[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
             progress, task, epoch: int, kept: str, after_step: Callable[[], None] = lambda: None
             ) -> tuple[dict[str, float], int]:
    """One optimiser step per batch (views, labels, indices, ...) of `loader` on the sum of `batch_losses(*batch)`,
    then `after_step()`: the epoch's loss totals (each term, and their sum as `loss`), weighted by batch size, and
    the samples seen. A loss that is not finite stops the run, naming the epoch, the batch, its samples and what
    is `kept`."""
    totals: dict[str, float] = {}
    seen = 0
    for batch_number, batch in enumerate(loader, 1):
        losses = batch_losses(*batch)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise UserError(f"training diverged in epoch {epoch + 1} at batch {batch_number} (samples "
                            f"{preview(batch[2].tolist())}): the loss is {loss.item()}; {kept}; "
                            "lower --lr or check the loss weights")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        after_step()
        size = len(batch[1])
        seen += size
        for name, value in {"loss": loss, **{f"loss_{k}": v for k, v in losses.items()}}.items():
            totals[name] = totals.get(name, 0.0) + value.item() * size
        progress.advance(task, size)
    return totals, seen


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
        self.dataset, self.eval_dataset, self.policy = dataset, eval_dataset, policy
        self.validation = np.zeros(0, dtype=np.int64) if validation is None else validation
        if mixing(policy) is not None and len(self.validation):
            # Partners are drawn from every sample (a store's, before any run chose its validation share).
            announce += ("mixing partners are drawn from every sample, the validation share's included: best.pt "
                         "is chosen on images training has seen mixed in (--val-fraction 0 keeps no best.pt)",)
        self.options, self.objective, self.announce = options, objective, announce
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
        self.optimizer = make_optimizer(parameters, options)
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
        last, best = self.checkpoints / "last.pt", self.checkpoints / "best.pt"
        if_damaged = "start the run again with --overwrite"
        if best.exists():  # the whole state of an earlier epoch
            if_damaged += f", or copy {best} over it and --resume from that epoch"
        state, saved = read_checkpoint(last, if_damaged)
        refuse_other_settings(self.run_dir, saved["config"], self.options, self.options.resumable_changes())
        self.model.load_state_dict(state)
        restore_optimization(self.optimizer, self.scheduler, saved)
        self.objective.load_state_dict(saved["objective"])
        return saved["epoch"], saved["best"]

    def prepare_run_dir(self, held: contextlib.ExitStack) -> tuple[int, dict]:
        """(first epoch, best so far): a fresh run, or where the last checkpoint left off. The run folder is locked
        first, for as long as `held` is open: nothing in it changes while another process trains there."""
        held.enter_context(RunFolderLock(str(self.run_dir), RUN_LOCK_TIMEOUT))
        remove_unfinished_writes(self.checkpoints)
        if continues_run(self.run_dir, (self.checkpoints / "last.pt").exists(), self.options.resume,
                         self.options.overwrite):
            return self.restore()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("last.pt", "best.pt"):
            (self.checkpoints / stale).unlink(missing_ok=True)
        return 0, NO_BEST

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

        def batch_losses(views_batch, labels, indices, *targets) -> dict[str, torch.Tensor]:
            x = normalize(views_batch.to(self.device, non_blocking=True), self.dataset.mean, self.dataset.std)
            labels = labels.to(self.device, non_blocking=True)
            return step(x.contiguous(memory_format=torch.channels_last), labels, indices, epoch, *targets)

        try:
            totals, seen = optimize(loader, batch_losses, self.optimizer, progress, task, epoch,
                                    kept_on_failure(self.checkpoints / "last.pt", epoch))
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
        # A full disk while writing the run's files (its lock, log, summary.json, ...): --resume continues it.
        with (out_of_space_is_a_user_error(str(self.run_dir), "its finished epochs are kept; free some space and "
                                           "continue the run with --resume"),
              process_group(self.device) as part, contextlib.ExitStack() as held):
            self.part = part
            first_epoch, best = main_process_first(lambda: self.prepare_run_dir(held), self.follow_run_dir)
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
        summary_path = self.run_dir / "summary.json"
        if first_epoch >= self.options.epochs and summary_path.exists():  # resumed after its last epoch
            console.print(f"seed {self.options.seed}: trained already ({self.options.epochs} epochs), "
                          f"{summary_path} stands", soft_wrap=True)
            return json.loads(summary_path.read_text())
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.options), sort_keys=False))
        (self.run_dir / "run.json").write_text(json.dumps(self.checkpoint_info, indent=2))
        keys = getattr(self.dataset, "keys", None)
        (self.run_dir / "validation.json").write_text(json.dumps({
            "fraction": self.options.val_fraction, "seed": self.options.seed, "count": len(self.validation),
            "keys": [keys[i] for i in self.validation] if keys is not None else self.validation.tolist()}))
        for line in self.announce:
            console.print(line, soft_wrap=True)
        epoch_seconds = []
        # No live.log_params: the resolved config is config.yaml, and dvclive parses its params.yaml again at every
        # step (30 ms, as long as a small epoch).
        with live_log(self.run_dir / "dvclive", first_epoch > 0) as live, progress_bar("img") as progress:
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
        summary_path.write_text(json.dumps(summary, indent=2))
        return summary


class SupervisedObjective(nn.Module):
    """Cross-entropy on labels, with a fresh random view of every training sample each epoch: read by index, or
    streamed by `stream(epoch, part)`."""

    def __init__(self, training: np.ndarray, num_samples: int, seed: int,
                 stream: Callable[[int, Part], IterableDataset] | None = None):
        super().__init__()
        self.trains_on, self.seed, self.stream = training_mask(num_samples, training), seed, stream

    def epoch_data(self, epoch: int, part: Part) -> tuple[None, np.ndarray] | IterableDataset:
        if self.stream is not None:
            return self.stream(epoch, part)
        order = torch.randperm(len(self.trains_on), generator=seeded_generator(self.seed, epoch, ORDER)).numpy()
        return None, rank_share(order[self.trains_on[order]], part)

    def losses(self, logits, features, labels, indices, epoch, targets=None) -> dict[str, torch.Tensor]:
        return {"ce": F.cross_entropy(logits, labels)}

    def end_epoch(self) -> None:
        pass
