"""Distillation mechanics on the tiny CIFAR-100 world: resume, streaming reads, what is read, bad input."""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import write_cifar100
from test_bad_input import assert_user_error, replace_flag

from richkd.cache.locks import RunFolderLock
from richkd.cache.reader import CacheReader, StreamedView, block_shuffled_order
from richkd.cli import run_cli
from richkd.pipeline.models import read_checkpoint
from richkd.pipeline.training import drop_unfinished_log_writes

RICHKD = str(Path(sys.executable).parent / "richkd")
FAST = ["--num-workers", "0", "--device", "cpu", "--batch-size", "16", "--nce-k", "32", "--arch", "resnet8"]


@pytest.fixture(scope="module")
def world(tiny_world, tmp_path_factory):
    """400 training images, their cache (2 views, shards of 64) and the arguments of a distill run."""
    root = tmp_path_factory.mktemp("training")
    write_cifar100(root / "data", train=400, test=40, seed=3)
    args = tiny_world.precompute_args(root / "cache.zarr", "--shard-size", "64")
    args[args.index("--data-root") + 1] = str(root / "data")
    args[args.index("--clip") + 1] = f"local-dir:{tiny_world.clip_bundle}"
    assert run_cli(args) == 0
    distill = ["distill", "--data-root", str(root / "data"), "--cache", str(root / "cache.zarr"), *FAST]
    return root, distill


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    state, saved = read_checkpoint(run / "checkpoints" / "last.pt")
    return {**state, **{f"objective.{k}": v for k, v in saved["objective"].items()}}


def test_killed_distill_resumes_bit_identical(world, tmp_path):
    root, distill = world
    args = [*distill, "--epochs", "4", "--variant", "LF", "--milestones", "2,3"]
    assert run_cli([*args, "--out", str(tmp_path / "straight")]) == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([RICHKD, *args, "--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "last.pt").exists() and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.3)  # into the second epoch
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    _, saved = read_checkpoint(killed / "checkpoints" / "last.pt")
    assert 1 <= saved["epoch"] < 4

    assert run_cli([*args, "--out", str(killed), "--resume"]) == 0
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(killed)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    logged = (killed / "dvclive" / "plots" / "metrics" / "validation" / "top1.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in logged[1:]] == ["0", "1", "2", "3"]


# Runs richkd, but SIGKILLs itself half-way through writing the last.pt of epoch 2.
DIE_WHILE_SAVING = """
import builtins, io, os, signal, sys
from richkd.cli import main
ordinary_open, last_checkpoints = builtins.open, []
class HalfThenDie(io.FileIO):
    def write(self, data):
        data = memoryview(data).cast("B")
        super().write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
def open_dying_in_epoch_2(file, mode="r", *args, **kwargs):
    if ".last.pt." in str(file) and "w" in mode:
        last_checkpoints.append(file)
        if len(last_checkpoints) == 2:
            return io.BufferedWriter(HalfThenDie(file, "wb"))
    return ordinary_open(file, mode, *args, **kwargs)
builtins.open = open_dying_in_epoch_2
sys.argv[0] = "richkd"
main()
"""


def test_a_checkpoint_killed_mid_write_leaves_the_previous_one(world, tmp_path):
    _, distill = world
    args = [*distill, "--epochs", "3", "--variant", "L"]
    assert run_cli([*args, "--out", str(tmp_path / "straight")]) == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    died = subprocess.run([sys.executable, "-c", DIE_WHILE_SAVING, *args, "--out", str(killed)], env=env,
                          capture_output=True, text=True)
    assert died.returncode == -signal.SIGKILL, died.stderr
    unfinished = list((killed / "checkpoints").glob(".last.pt.*.tmp"))
    assert len(unfinished) == 1 and unfinished[0].stat().st_size > 0
    _, saved = read_checkpoint(killed / "checkpoints" / "last.pt")  # intact, and still epoch 1
    assert saved["epoch"] == 1

    assert run_cli([*args, "--out", str(killed), "--resume"]) == 0
    assert not list((killed / "checkpoints").glob(".*.tmp"))
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(killed)
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    _, last = read_checkpoint(killed / "checkpoints" / "last.pt")
    _, best = read_checkpoint(killed / "checkpoints" / "best.pt")
    assert best["epoch"] == last["best"]["epoch"]


def flip_a_bit_of(path: Path, tensor: torch.Tensor) -> None:
    """Flip one bit where the checkpoint at `path` stores the bytes of `tensor`: a fault of a disk or a copy."""
    data = bytearray(path.read_bytes())
    where = data.find(tensor.numpy().tobytes())
    assert where >= 0
    data[where] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_refused_by_every_reader(tiny_world, tmp_path, capsys):
    """train and distill resume alike (Trainer.restore), evaluate and precompute load alike (load_checkpoint)."""
    run = tmp_path / "run"
    train = ["train", "--data-root", str(tiny_world.data_root), "--arch", "resnet8", "--batch-size", "16",
             "--num-workers", "0", "--device", "cpu", "--out", str(run)]
    assert run_cli([*train, "--epochs", "1"]) == 0
    last, best = run / "checkpoints" / "last.pt", run / "checkpoints" / "best.pt"
    flip_a_bit_of(last, read_checkpoint(last)[0]["fc.bias"])
    capsys.readouterr()
    assert_user_error([*train, "--epochs", "2", "--resume"], capsys,
                      f"checkpoint {last} is damaged (its contents do not match the crc32c checksum saved with them): "
                      f"start the run again with --overwrite, or copy {best} over it and --resume from that epoch")
    evaluate = ["evaluate", "--data-root", str(tiny_world.data_root), "--checkpoint", str(last), "--num-workers", "0",
                "--device", "cpu"]
    assert_user_error(evaluate, capsys, f"checkpoint {last} is damaged (its contents do not match the crc32c "
                      "checksum saved with them): restore it from a copy, or train it again")
    shutil.copy(best, last)  # as the advice says
    assert run_cli([*train, "--epochs", "2", "--resume"]) == 0
    assert read_checkpoint(last)[1]["epoch"] == 2

    # The training state is checked as the weights are: a flipped bit in the optimizer's momentum.
    momentum = read_checkpoint(last)[1]["optimizer"]["state"]
    flip_a_bit_of(last, momentum[len(momentum) - 1]["momentum_buffer"])  # the classifier bias's
    capsys.readouterr()
    assert_user_error([*train, "--epochs", "3", "--resume"], capsys, f"checkpoint {last} is damaged")
    best.unlink()
    error = assert_user_error([*train, "--epochs", "3", "--resume"], capsys, f"checkpoint {last} is damaged")
    assert error.endswith("start the run again with --overwrite")  # no best.pt to go back to


class FileOnAFullDisk(io.FileIO):
    """A file being written on a disk with `room` bytes left: a write past it is cut short, the next one fails."""

    room = 0

    def write(self, data) -> int:
        if FileOnAFullDisk.room == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
        written = super().write(memoryview(data).cast("B")[:FileOnAFullDisk.room])
        FileOnAFullDisk.room -= written
        return written


def fill_the_disk(monkeypatch, folder: Path, files_that_fit: int, room: int) -> list:
    """Make the disk fill while a file in `folder` is written, once `files_that_fit` were written there: `room` bytes
    more fit. Returns the files opened there for writing, as they are."""
    opened = []
    ordinary_open = builtins.open

    def open_on_a_filling_disk(file, mode="r", *args, **kwargs):
        if not isinstance(file, (str, os.PathLike)) or Path(file).parent != folder or "w" not in mode:
            return ordinary_open(file, mode, *args, **kwargs)
        opened.append(file)
        FileOnAFullDisk.room = 1 << 40 if len(opened) <= files_that_fit else room
        written = io.BufferedWriter(FileOnAFullDisk(file, "wb"))
        return written if "b" in mode else io.TextIOWrapper(written, encoding=kwargs.get("encoding"))

    monkeypatch.setattr(builtins, "open", open_on_a_filling_disk)
    return opened


def test_a_disk_that_fills_during_training_is_one_line_and_resume_finishes(tiny_world, tmp_path, capsys,
                                                                            monkeypatch):
    """The disk fills while epoch 2's checkpoint is written (train and distill write it alike), then while the
    resumed run logs it: each time the full-disk line and exit 2, and --resume finishes the run."""
    run = tmp_path / "run"
    train = ["train", "--data-root", str(tiny_world.data_root), "--arch", "resnet8", "--batch-size", "16",
             "--num-workers", "0", "--device", "cpu", "--val-fraction", "0", "--epochs", "2", "--out", str(run)]
    checkpoints = run / "checkpoints"
    opened = fill_the_disk(monkeypatch, checkpoints, files_that_fit=1, room=1000)
    assert run_cli(train) == 2
    monkeypatch.undo()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[-2].startswith("seed 0, epoch 1/2: ")  # the first epoch ended and was saved
    assert " ".join(err[-1].split()) == (
        f"error: no space left on the device writing {checkpoints / 'last.pt'}: the previous checkpoint there is "
        "intact; free some space and continue the run with --resume")
    assert len(opened) == 2
    assert read_checkpoint(checkpoints / "last.pt")[1]["epoch"] == 1
    assert [path.name for path in checkpoints.iterdir()] == ["last.pt"]  # the unfinished one removed

    fill_the_disk(monkeypatch, run / "dvclive", files_that_fit=0, room=0)
    assert run_cli([*train, "--resume"]) == 2
    monkeypatch.undo()
    assert " ".join(capsys.readouterr().err.splitlines()[-1].split()) == (
        f"error: no space left on the device writing {run}: its finished epochs are kept; free some space and "
        "continue the run with --resume")
    assert run_cli([*train, "--resume"]) == 0
    assert read_checkpoint(checkpoints / "last.pt")[1]["epoch"] == 2
    assert (run / "summary.json").exists()


def test_resuming_drops_what_a_log_write_cut_short_left(tmp_path):
    log = tmp_path / "dvclive"
    tables = log / "plots" / "metrics"
    (tables / "train").mkdir(parents=True)
    (log / "metrics.json").write_text('{"step": 1, "train": {"lo')
    (tables / "lr.tsv").write_text("step\tlr\n0\t0.05\n1\t0.0")
    (tables / "train" / "loss.tsv").write_text("step\tloss\n0\t4.6\n")
    (tables / "epoch_seconds.tsv").write_text("ste")
    drop_unfinished_log_writes(log)
    assert not (log / "metrics.json").exists() and not (tables / "epoch_seconds.tsv").exists()
    assert (tables / "lr.tsv").read_text() == "step\tlr\n0\t0.05\n"
    assert (tables / "train" / "loss.tsv").read_text() == "step\tloss\n0\t4.6\n"


def children_of(pid: int) -> set[int]:
    """The processes whose parent is `pid`."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except OSError:  # ended meanwhile
            continue
        if parent == pid:
            children.add(int(stat.parent.name))
    return children


def is_running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie left for its parent to reap."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the seed processes in /proc")
def test_seed_processes_end_with_their_killed_parent(world, tmp_path):
    _, distill = world
    run = tmp_path / "run"
    command = [RICHKD, *distill, "--variant", "L", "--seeds", "0,1", "--jobs", "2", "--epochs", "100",
               "--out", str(run)]
    with open(tmp_path / "stderr", "w") as stderr:
        parent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"})
    workers = set()
    try:
        deadline = time.monotonic() + 120
        while not all((run / f"seed-{seed}" / "config.yaml").exists() for seed in (0, 1)):  # both are training
            assert parent.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr").read_text()
            time.sleep(0.05)
        workers = children_of(parent.pid)
        assert len(workers) >= 2
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while any(map(is_running, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in workers if is_running(pid)], "seed processes outlived their parent"
    finally:
        parent.kill()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for seed in (0, 1):  # the locks the killed seed processes left, zombies or reaped, are taken over at once
        with RunFolderLock(str(run / f"seed-{seed}"), timeout=600):
            pass


# Forks a process that must die with this one, on a system without prctl (its C library lacks it, as macOS's does),
# and one whose parent ended before it could watch: prints their pids, then waits to be killed.
WATCHED_CHILDREN = """
import os, time
from richkd.pipeline import training
class LibraryWithoutPrctl:
    def __init__(self, *args, **kwargs):
        pass
training.ctypes.CDLL = LibraryWithoutPrctl
pids = []
for parent in (os.getpid(), -1):
    pid = os.fork()
    if pid == 0:
        training.die_with_parent(parent)
        time.sleep(60)
        os._exit(0)
    pids.append(pid)
print(*pids, flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the processes in /proc")
def test_without_prctl_a_seed_process_watches_its_parent():
    parent = subprocess.Popen([sys.executable, "-c", WATCHED_CHILDREN], stdout=subprocess.PIPE, text=True)
    watching, orphaned = map(int, parent.stdout.readline().split())
    try:
        deadline = time.monotonic() + 5
        while is_running(orphaned) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not is_running(orphaned), "a seed process whose parent was already gone went on"
        assert is_running(watching)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while is_running(watching) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not is_running(watching), "a seed process without prctl outlived its parent"
    finally:
        parent.kill()
        for pid in (watching, orphaned):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def hold_the_lock_of(folder: Path, pid: int) -> Path:
    """The lock that live training process `pid` of this host holds on run folder `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "lock.json"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "holder": "training",
                                "heartbeat": time.time()}))
    return lock


def test_a_run_folder_has_one_writer_at_a_time(tiny_world, world, tmp_path, capsys):
    run = tmp_path / "run"
    train = ["train", "--data-root", str(tiny_world.data_root), "--arch", "resnet8", "--batch-size", "16",
             "--num-workers", "0", "--device", "cpu", "--epochs", "1", "--out", str(run)]
    _, distill = world
    seeded = tmp_path / "seeded"
    holder = subprocess.Popen(["sleep", "60"])  # a live process of this host
    try:
        lock = hold_the_lock_of(run, holder.pid)
        assert_user_error(train, capsys, f"run folder {run} is in use: process {holder.pid} on "
                          f"{socket.gethostname()} is training in it; two runs would write the same checkpoints: "
                          "wait for that one to finish, or stop it and continue with --resume")
        assert_user_error([*train, "--resume"], capsys, f"run folder {run} is in use: process {holder.pid}")
        assert not (run / "checkpoints").exists()
        for seed in (0, 1):  # with --seeds, each seed's folder, in the seed processes of --jobs too
            hold_the_lock_of(seeded / f"seed-{seed}", holder.pid)
        assert_user_error([*distill, "--variant", "L", "--epochs", "1", "--seeds", "0,1", "--jobs", "2",
                           "--out", str(seeded)], capsys, f"run folder {seeded / 'seed-0'} is in use: process "
                          f"{holder.pid} on {socket.gethostname()} is training in it")
    finally:
        holder.kill()
        holder.wait()
    # The lock of a process that is gone is taken over, and a run that ends gives its lock back.
    assert run_cli(train) == 0
    assert not lock.exists()


def test_a_run_is_not_replaced_or_resumed_with_other_settings(world, tmp_path, capsys):
    _, distill = world
    run = ["--out", str(tmp_path / "run"), "--epochs", "1", "--variant", "L"]
    assert run_cli([*distill, *run]) == 0
    capsys.readouterr()
    assert run_cli([*distill, *run]) == 2
    assert "already holds a run: pass --resume to continue it or --overwrite" in capsys.readouterr().err
    assert run_cli([*distill, *run, "--resume", "--alpha", "0.5"]) == 2
    assert "it was run with alpha=0.7, now 0.5" in capsys.readouterr().err
    # The same paths spelled otherwise, and the run directory moved: the same run.
    cache = distill[distill.index("--cache") + 1]
    respelled = [*distill[:distill.index("--cache")], "--cache", f"{cache}/", *distill[distill.index("--cache") + 2:]]
    shutil.move(tmp_path / "run", tmp_path / "moved")
    assert run_cli([*respelled, *run[2:], "--out", f"{tmp_path}/./moved/", "--resume", "--epochs", "2"]) == 0
    assert read_checkpoint(tmp_path / "moved" / "checkpoints" / "last.pt")[1]["epoch"] == 2
    # Resumed once finished: nothing to train, and the summary with its timings stands.
    summary = (tmp_path / "moved" / "summary.json").read_bytes()
    assert len(json.loads(summary)["epoch_train_seconds"]) == 1
    capsys.readouterr()
    assert run_cli([*respelled, *run[2:], "--out", f"{tmp_path}/moved", "--resume", "--epochs", "2"]) == 0
    assert (tmp_path / "moved" / "summary.json").read_bytes() == summary
    assert f"seed 0: trained already (2 epochs), {tmp_path}/moved/summary.json stands" in capsys.readouterr().err
    assert run_cli([*distill, *run, "--overwrite", "--alpha", "0.5"]) == 0


def test_streamed_view_reads_shard_by_shard_with_bounded_memory(world):
    root, _ = world
    reader = CacheReader(str(root / "cache.zarr"))
    names = ("teacher/logits", "clip/image_embeds")
    order = block_shuffled_order(reader.layout, torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(400))
    shards = order // 64
    assert (np.diff(shards) != 0).sum() == reader.layout.num_shards - 1  # one shard after another

    streamed = reader.open_view(1, names, order, in_memory=False)
    whole = reader.open_view(1, names, order, in_memory=True)
    assert isinstance(streamed, StreamedView)
    for first in range(0, 400, 48):  # batches that straddle shard boundaries
        batch = order[first:first + 48]
        expected, got = whole.gather(batch), streamed.gather(batch)
        for name in names:
            assert torch.equal(expected[name], got[name])
        assert len(streamed.loaded) <= 2 and streamed.queue.qsize() <= 2
    streamed.close()


def test_streaming_distill_run(world, tmp_path):
    _, distill = world
    run = tmp_path / "streamed"
    assert run_cli([*distill, "--out", str(run), "--epochs", "2", "--cache-memory", "1KiB"]) == 0
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2


def test_logit_only_run_never_reads_feature_arrays(world, tmp_path, capsys):
    root, distill = world
    store = tmp_path / "cache.zarr"
    shutil.copytree(root / "cache.zarr", store)
    for name in ("teacher/features", "clip/image_embeds"):
        for shard_file in (store / name / "c").rglob("*"):
            if shard_file.is_file():
                shard_file.write_bytes(b"garbage")
    args = [*distill, "--cache", str(store), "--epochs", "1"]
    assert run_cli([*args, "--variant", "L", "--out", str(tmp_path / "logits")]) == 0
    capsys.readouterr()
    # The damage is found, named and refused, not trained on.
    assert run_cli([*args, "--variant", "F", "--out", str(tmp_path / "features")]) == 2
    err = capsys.readouterr().err
    assert "teacher/features view 0 rows 0-399 is missing or truncated" in err or "is damaged" in err
    assert "richkd inspect --verify" in err
    streamed = [*args, "--variant", "F", "--cache-memory", "1KiB", "--out", str(tmp_path / "streamed")]
    assert run_cli(streamed) == 2  # found by the background reader, raised when the block is needed
    assert "teacher/features view 0 rows" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--alpha", "1.5"], "--alpha must be in [0, 1], got 1.5"),
    (["--temperature", "0"], "--temperature must be positive, got 0.0"),
    (["--variant", "XL"], "--variant must be one of none, L, F, LF"),
    (["--clip-scale", "huge"], "--clip-scale must be raw, clip or a positive number"),
    (["--cache-memory", "lots"], "--cache-memory must be a size such as 4GiB"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_bad_distill_flags(world, tmp_path, capsys, flags, message):
    _, distill = world
    assert run_cli([*distill, "--out", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cache_of_another_dataset_split_or_class_list_or_incomplete(tiny_world, world, tmp_path, capsys):
    root, distill = world
    other = tmp_path / "other"
    write_cifar100(other, train=400, test=40, seed=4)
    args = list(distill)
    args[args.index("--data-root") + 1] = str(other)
    assert run_cli([*args, "--out", str(tmp_path / "run")]) == 2
    assert "was built for another dataset (dataset.fingerprint" in capsys.readouterr().err

    renamed = tmp_path / "renamed"  # the same images and labels under another class list
    shutil.copytree(root / "data", renamed)
    meta = renamed / "cifar-100-python" / "meta"
    names = pickle.loads(meta.read_bytes())
    names["fine_label_names"][0] = "aardvark"
    meta.write_bytes(pickle.dumps(names))
    args[args.index("--data-root") + 1] = str(renamed)
    assert run_cli([*args, "--out", str(tmp_path / "run")]) == 2
    assert "was built for another dataset (dataset.class_names: [" in capsys.readouterr().err

    test_split = tmp_path / "test_split.zarr"
    precompute = tiny_world.precompute_args(test_split, "--split", "test", "--views", "1")
    precompute[precompute.index("--data-root") + 1] = str(root / "data")
    assert run_cli(precompute) == 0
    args = list(distill)
    args[args.index("--cache") + 1] = str(test_split)
    assert run_cli([*args, "--out", str(tmp_path / "run")]) == 2
    assert "was built for another dataset (dataset.split: 'test' in the store, 'train' now)" in capsys.readouterr().err

    args[args.index("--cache") + 1] = str(tmp_path / "nothing.zarr")
    assert run_cli([*args, "--out", str(tmp_path / "run")]) == 2
    assert f"no cache store at {tmp_path / 'nothing.zarr'}" in capsys.readouterr().err

    partial = tmp_path / "partial.zarr"
    shutil.copytree(root / "cache.zarr", partial)
    zarr.open_group(partial, mode="r+")["progress/done"][0, 3] = False
    args = list(distill)
    args[args.index("--cache") + 1] = str(partial)
    assert run_cli([*args, "--out", str(tmp_path / "run")]) == 2
    assert "is incomplete: 1 of 14 blocks are not written" in capsys.readouterr().err


def test_evaluate_a_teacher_checkpoint_needs_its_architecture(tiny_world, tmp_path, capsys):
    args = ["evaluate", "--data-root", str(tiny_world.data_root), "--checkpoint", str(tiny_world.teacher_checkpoint),
            "--num-workers", "0", "--device", "cpu", "--json"]
    assert run_cli(args) == 2
    assert "does not record its architecture: pass --arch" in capsys.readouterr().err
    assert run_cli([*args, "--arch", "resnet8"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == 20 and report["arch"] == "resnet8"
    # A checkpoint that records its architecture is evaluated as that, never as another --arch.
    recorded = tmp_path / "recorded.pt"
    state, _ = read_checkpoint(tiny_world.teacher_checkpoint)
    torch.save({"model": state, "arch": "resnet8"}, recorded)
    args = replace_flag(args, "--checkpoint", str(recorded))
    assert_user_error([*args, "--arch", "resnet20"], capsys, f"checkpoint {recorded} is a resnet8, not a resnet20: "
                      "leave --arch out for checkpoints that record their architecture")


def test_milestones_are_fractions_of_the_epochs_and_a_late_one_is_a_warning(capsys, monkeypatch):
    from richkd.pipeline.training_options import TrainingOptions, learning_rate_factor

    paper = TrainingOptions(epochs=240, schedule="multistep")
    paper.validate()
    assert paper.milestone_list() == [150, 180, 210]
    factor = learning_rate_factor(paper)
    assert [factor(epoch) for epoch in (149, 150, 179, 180, 210)] == pytest.approx([1, 0.1, 0.1, 0.01, 0.001])
    assert TrainingOptions(epochs=10, schedule="multistep").milestone_list() == [6, 8, 9]
    assert TrainingOptions(epochs=1, schedule="multistep").milestone_list() == []  # no epoch to decay at
    assert capsys.readouterr().err == ""
    late = TrainingOptions(epochs=10, schedule="multistep", milestones="5,150,180")
    late.validate()
    assert capsys.readouterr().err == \
        "warning: --milestones 150,180 at or after the last epoch (10): the learning rate never decays there\n"
    # Under torchrun every process checks the options; the warning is printed once, by the first.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    late.validate()
    assert capsys.readouterr().err == ""


def test_training_in_a_users_git_repository_leaves_it_as_it_was(tiny_world, tmp_path, monkeypatch):
    """dvclive alone would `dvc init` a Git repository that does not use DVC and stage its files in the index."""
    repo = tmp_path / "project"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=user", "-c", "user.email=user@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "notes.txt").write_text("mine\n")
    subprocess.run([*git, "add", "notes.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "mine"], check=True)
    monkeypatch.chdir(repo)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert run_cli(["train", "--data-root", str(tiny_world.data_root), "--arch", "resnet8", "--epochs", "1",
                    "--batch-size", "8", "--num-workers", "0", "--device", "cpu", "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "dvclive" / "metrics.json").exists()
    assert sorted(path.name for path in repo.iterdir()) == [".git", "notes.txt"]
    status = subprocess.run([*git, "status", "--porcelain"], check=True, capture_output=True, text=True).stdout
    assert status == ""
