"""Several precompute processes writing one store, block locks, and stores at fsspec URLs."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import zarr
from conftest import PER_VIEW_ARRAYS, write_cifar100
from test_bad_input import assert_user_error
from test_resume import assert_identical_stores, bundle_args

from richkd.cache.locks import BlockLocks
from richkd.cache.reader import open_existing_group, shard_share
from richkd.cache.schema import Layout
from richkd.cli import run_cli
from richkd.pipeline.distributed import main_process_first
from richkd.pipeline.errors import UserError
from richkd.pipeline.models import read_checkpoint
from richkd.pipeline.runtime import Part
from richkd.pipeline.seeding import seeded_model

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def reference(tiny_world, tmp_path_factory):
    """The store one process writes: 2 views x 3 shards."""
    out = tmp_path_factory.mktemp("reference") / "cache.zarr"
    assert run_cli(bundle_args(tiny_world, tiny_world.data_root, out)) == 0
    return out


def write_lock(store: Path, view: int, shard: int, host: str, pid: int, age: float) -> Path:
    lock = store / "locks" / f"{view}-{shard}.json"
    lock.parent.mkdir(exist_ok=True)
    lock.write_text(json.dumps({"host": host, "pid": pid, "holder": "1/2", "heartbeat": time.time() - age}))
    return lock


def test_parts_written_separately_make_the_same_store(tiny_world, reference, tmp_path, capsys):
    out = tmp_path / "cache.zarr"
    args = bundle_args(tiny_world, tiny_world.data_root, out)
    assert run_cli([*args, "--part", "0/2"]) == 0
    assert f"part 0/2 of {out} written; the store has 4 of 6 blocks" in " ".join(capsys.readouterr().err.split())
    done = zarr.open_group(out, mode="r")["progress/done"][...]
    assert done.tolist() == [[True, False, True], [True, False, True]]  # every view of every second shard
    assert run_cli([*args, "--part", "0/2"]) == 0  # a re-run finishes only what that part left
    assert f"continuing {out} (part 0/2): 4 of 4 blocks already done" in " ".join(capsys.readouterr().err.split())

    # Another process holds a block of part 1: the second writer refuses, and writes nothing.
    lock = write_lock(out, 0, 1, socket.gethostname(), os.getpid(), age=0)
    assert_user_error([*args, "--part", "1/2"], capsys,
                      f"block view 0 shard 1 of {out} is being written by process {os.getpid()} on "
                      f"{socket.gethostname()} (part 1/2); two precompute processes would write it")
    assert zarr.open_group(out, mode="r")["progress/done"][...].sum() == 4
    assert lock.exists() and not list((out / "locks").glob("1-*.json"))  # the refused run took no lock

    # A lock of a killed process is taken over: at once on this host, after --lock-timeout from another.
    ended = subprocess.Popen(["true"])
    ended.wait()
    write_lock(out, 0, 1, socket.gethostname(), ended.pid, age=0)
    write_lock(out, 1, 1, "elsewhere", 4242, age=100)
    assert_user_error([*args, "--part", "1/2", "--lock-timeout", "1000"], capsys,
                      "is being written by process 4242 on elsewhere (part 1/2)")
    assert run_cli([*args, "--part", "1/2", "--lock-timeout", "60"]) == 0
    assert f"cache complete: {out}" in " ".join(capsys.readouterr().err.split())
    assert not list((out / "locks").iterdir())
    assert_identical_stores(out, reference)
    assert run_cli(["inspect", str(out), "--verify"]) == 0


def test_a_lock_that_cannot_be_read_is_taken_over_unless_it_is_being_written(tiny_world, reference, tmp_path, capsys,
                                                                              monkeypatch):
    """A full disk left a claimed lock empty, and the same command then refused for --lock-timeout (600 s) though
    no process held it: a lock whose record cannot be written is removed, and one that cannot be read is taken over
    once older than its creator takes to write it (a lock just created is empty for a moment)."""
    out = tmp_path / "cache.zarr"
    args = bundle_args(tiny_world, tiny_world.data_root, out)

    def full_disk(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as disk:
        disk.setattr(BlockLocks, "record", full_disk)  # the disk fills up as a claimed lock's record is written
        assert_user_error(args, capsys, f"no space left on the device writing {out}: the blocks already written are "
                          "kept, and running the same command again finishes the rest")
    assert not list((out / "locks").iterdir())

    empty, damaged = out / "locks" / "0-1.json", out / "locks" / "1-2.json"  # as a killed process may leave them
    empty.write_bytes(b"")
    damaged.write_text('{"host": "')
    assert_user_error(args, capsys, f"block view 0 shard 1 of {out} is being written by another process")
    for lock in (empty, damaged):
        os.utime(lock, (time.time() - 30,) * 2)
    assert run_cli(args) == 0
    assert not list((out / "locks").iterdir())
    assert_identical_stores(out, reference)


def test_a_new_store_is_never_seen_half_made(tiny_world, reference, tmp_path, monkeypatch):
    """Two precomputes started at once into a new store: about one try in four, the second found the folder the first
    had made before its metadata, and said it "exists but is not a richkd cache store". What a second process opening
    the store sees as the first writes the store's metadata must be nothing yet, or the store; and of two processes
    making it at once, one does, the other continuing it."""
    out, made_meanwhile = tmp_path / "cache.zarr", tmp_path / "made_meanwhile.zarr"
    seen = []
    write_file = zarr.storage._local._put  # how zarr writes every file of a local store

    def look_as_another_process(path, value, exclusive=False):
        if path.name == "zarr.json" and not seen:  # the store's own metadata is the first file written
            try:
                seen.append(open_existing_group(str(out)))
            except UserError as error:
                seen.append(str(error))
        return write_file(path, value, exclusive)

    with monkeypatch.context() as patched:
        patched.setattr(zarr.storage._local, "_put", look_as_another_process)
        assert run_cli(bundle_args(tiny_world, tiny_world.data_root, out)) == 0
    assert seen == [None]
    assert_identical_stores(out, reference)

    def make_it_first_as_another_process(path, value, exclusive=False):
        if path.name == "zarr.json" and not made_meanwhile.exists():
            metadata = json.loads(value.to_bytes())
            metadata["attributes"]["created"] = "by another process"
            made_meanwhile.mkdir()
            (made_meanwhile / "zarr.json").write_text(json.dumps(metadata))
        return write_file(path, value, exclusive)

    with monkeypatch.context() as patched:
        patched.setattr(zarr.storage._local, "_put", make_it_first_as_another_process)
        assert run_cli(bundle_args(tiny_world, tiny_world.data_root, made_meanwhile)) == 0
    assert zarr.open_group(made_meanwhile, mode="r").attrs["created"] == "by another process"
    assert_identical_stores(made_meanwhile, reference)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache.zarr", "made_meanwhile.zarr"]  # nothing beside


def test_torchrun_processes_write_one_store(tiny_world, reference, tmp_path):
    out = tmp_path / "cache.zarr"
    command = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", str(BIN / "richkd"),
               *bundle_args(tiny_world, tiny_world.data_root, out)]
    finished = torchrun(command)
    assert_identical_stores(out, reference)
    # Each process wrote its own blocks, the writes landed in one store and no lock is left behind.
    assert not list((out / "locks").iterdir())
    assert " ".join(finished.stderr.split()).count(f"cache complete: {out}") == 1  # said by the first process
    # The same CLIP added under another name by two processes, on the stored views: the same outputs as the store's.
    assert torchrun([*command, "--add-source", f"clip_again=clip:local-dir:{tiny_world.clip_bundle}"]).returncode == 0
    store = zarr.open_group(out, mode="r")
    for array in ("logits", "image_embeds", "class_embeds", "prompt_embeds", "done"):
        assert np.array_equal(store[f"clip_again/{array}"][...], store[f"clip/{array}"][...]), array
    assert not list((out / "locks" / "clip_again").iterdir())


def test_parts_refuse_what_would_harm_the_others(tiny_world, tmp_path, capsys, monkeypatch):
    args = bundle_args(tiny_world, tiny_world.data_root, tmp_path / "cache.zarr")
    with monkeypatch.context() as torchrun:
        torchrun.setenv("RANK", "0")
        torchrun.setenv("WORLD_SIZE", "2")
        assert_user_error([*args, "--part", "0/2"], capsys,
                          "--part is for separate jobs; under torchrun the ranks share the work")
    assert_user_error([*args, "--part", "2/2"], capsys, "--part must be i/n with 0 <= i < n (e.g. 0/4), got '2/2'")
    assert_user_error([*args, "--part", "0/2", "--overwrite"], capsys,
                      "--overwrite cannot be used by one of several processes writing a store: delete the store first")
    assert_user_error([*args, "--lock-timeout", "0"], capsys, "--lock-timeout must be positive, got 0.0")


def test_a_store_in_memory(tiny_world, reference, tmp_path, capsys):
    url = f"memory://{tmp_path.name}/cache.zarr"
    assert run_cli(bundle_args(tiny_world, tiny_world.data_root, url)) == 0
    stored, expected = zarr.open_group(url, mode="r"), zarr.open_group(reference, mode="r")
    for name in PER_VIEW_ARRAYS:
        assert np.array_equal(stored[name][...], expected[name][...]), name
    assert run_cli(["inspect", url, "--verify"]) == 0
    capsys.readouterr()
    assert run_cli(["distill", "--data-root", str(tiny_world.data_root), "--cache", url, "--arch", "resnet8",
                    "--epochs", "1", "--nce-k", "16", "--num-workers", "0", "--device", "cpu",
                    "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_a_torchrun_distill_step_has_the_gradients_of_one_process(tiny_world, tmp_path):
    """2 processes x 32 samples against 1 process x 64: one SGD step from the same start, the same weights.

    ConvNeXt normalises each sample by itself (LayerNorm): with batch norm on the CPU each process would
    normalise its own half of the batch.
    """
    write_cifar100(tmp_path / "data", train=64, test=8, seed=5)
    cache = tmp_path / "cache.zarr"
    precompute = bundle_args(tiny_world, tmp_path / "data", cache)
    assert run_cli([*precompute[:precompute.index("--views")], "--views", "1", "--shard-size", "32",
                    *precompute[precompute.index("--batch-size"):]]) == 0
    distill = ["distill", "--data-root", str(tmp_path / "data"), "--cache", str(cache), "--arch", "timm:convnext_atto",
               "--variant", "L", "--epochs", "1", "--batch-size", "64", "--lr", "0.5", "--num-workers", "0",
               "--device", "cpu"]
    assert run_cli([*distill, "--out", str(tmp_path / "one")]) == 0
    command = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", str(BIN / "richkd"), *distill,
               "--out", str(tmp_path / "two")]
    assert torchrun(command).returncode == 0

    one, _ = read_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    two, saved = read_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")
    start = seeded_model("timm:convnext_atto", 100, 0).state_dict()
    moved = [name for name in one if one[name].is_floating_point() and not torch.equal(one[name], start[name])]
    assert len(moved) > 50  # the step changed the weights
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)
    assert saved["epoch"] == 1
    logged = (tmp_path / "two" / "dvclive" / "metrics.json").read_text()
    assert "top1" in logged  # the first process evaluated and logged

    # The feature loss under DDP, with one source's embedding left out of the fused one (its weight is 0): every
    # parameter gets a gradient, or DDP stops at the second step.
    for variant, lam in (("LF", "1"), ("F", "0")):
        fused = [*command[:-1], str(tmp_path / f"{variant}-{lam}"), "--variant", variant, "--lam", lam, "--nce-k", "16",
                 "--batch-size", "16"]
        assert torchrun(fused).returncode == 0
        objective = read_checkpoint(tmp_path / f"{variant}-{lam}" / "checkpoints" / "last.pt")[1]["objective"]
        unused = "crd.embeds.clip" if lam == "1" else "crd.embeds.teacher"
        assert not any(name.startswith(unused) for name in objective), variant

    # Resuming under torchrun ends where an uninterrupted torchrun run ends.
    assert torchrun([*command[:-1], str(tmp_path / "two"), "--epochs", "2", "--resume"]).returncode == 0
    assert torchrun([*command[:-1], str(tmp_path / "straight"), "--epochs", "2"]).returncode == 0
    resumed, _ = read_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")
    straight, _ = read_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name


def fail_on_the_first_process(rank: int, folder: str) -> None:
    """Rank 0 makes a programming error where it should make a store for both ranks; each notes what it got."""
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        main_process_first(lambda: {}["store"], lambda: "opened")
    except Exception as error:
        Path(folder, f"rank-{rank}").write_text(f"{type(error).__name__}: {error}")
    finally:
        dist.destroy_process_group()


def test_any_failure_of_the_first_process_reaches_the_others(tmp_path):
    processes = torch.multiprocessing.spawn(fail_on_the_first_process, args=(str(tmp_path),), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not processes.join(timeout=1):
        if time.monotonic() > deadline:  # a rank waiting for ever is the failure under test
            for process in processes.processes:
                process.kill()
            pytest.fail("a process still waits for the first one")
    assert (tmp_path / "rank-0").read_text() == "KeyError: 'store'"
    assert (tmp_path / "rank-1").read_text() == "RuntimeError: the first process failed: KeyError: 'store'"


def torchrun(command: list[str]) -> subprocess.CompletedProcess:
    finished = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return finished


def test_distributed_training_refuses_what_it_cannot_split(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert_user_error(["distill", "--batch-size", "66"], capsys, "--batch-size (the whole batch, split over the "
                      "processes) must be a multiple of the number of processes, 4; got 66")
    layout = Layout(views=1, samples=100, classes=10, view_params=5, shard_size=40, chunk_size=40, precision="float16")
    with pytest.raises(UserError, match="the cache has 3 shards, fewer than the 4 processes: precompute it with a "
                       "smaller --shard-size"):
        shard_share(np.arange(100), layout, Part(0, 4))
    shares = [shard_share(np.arange(100), layout, Part(index, 2)) for index in range(2)]
    assert shares[0].tolist() == [*range(0, 40), *range(80, 100)]  # shards 0 and 2
    assert shares[1].tolist() == [*range(40, 80), *range(40, 60)]  # shard 1, wrapped to the same length
