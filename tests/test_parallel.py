"""Several precompute processes writing one store, block locks, and stores at fsspec URLs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_bad_input import assert_user_error
from test_resume import assert_identical_stores, bundle_args

from richkd.cache.schema import PER_VIEW_ARRAYS
from richkd.pipeline.cli import run_cli

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
    assert f"part 0/2 of {out} written; the store has 3 of 6 blocks" in " ".join(capsys.readouterr().err.split())
    done = zarr.open_group(out, mode="r")["progress/done"][...]
    assert done.ravel().tolist() == [True, False, True, False, True, False]  # every second block, view-major
    assert run_cli([*args, "--part", "0/2"]) == 0  # a re-run finishes only what that part left
    assert f"continuing {out} (part 0/2): 3 of 3 blocks already done" in " ".join(capsys.readouterr().err.split())

    # Another process holds a block of part 1: the second writer refuses, and writes nothing.
    lock = write_lock(out, 0, 1, socket.gethostname(), os.getpid(), age=0)
    assert_user_error([*args, "--part", "1/2"], capsys,
                      f"block view 0 shard 1 of {out} is being written by process {os.getpid()} on "
                      f"{socket.gethostname()} (part 1/2); two precompute processes would write it")
    assert zarr.open_group(out, mode="r")["progress/done"][...].sum() == 3
    assert lock.exists() and not list((out / "locks").glob("1-*.json"))  # the refused run took no lock

    # A lock of a killed process is taken over: at once on this host, after --lock-timeout from another.
    ended = subprocess.Popen(["true"])
    ended.wait()
    write_lock(out, 0, 1, socket.gethostname(), ended.pid, age=0)
    write_lock(out, 1, 0, "elsewhere", 4242, age=100)
    assert_user_error([*args, "--part", "1/2", "--lock-timeout", "1000"], capsys,
                      "is being written by process 4242 on elsewhere (part 1/2)")
    assert run_cli([*args, "--part", "1/2", "--lock-timeout", "60"]) == 0
    assert f"cache complete: {out}" in " ".join(capsys.readouterr().err.split())
    assert not list((out / "locks").iterdir())
    assert_identical_stores(out, reference)
    assert run_cli(["inspect", str(out), "--verify"]) == 0


def test_torchrun_processes_write_one_store(tiny_world, reference, tmp_path):
    out = tmp_path / "cache.zarr"
    command = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", str(BIN / "richkd"),
               *bundle_args(tiny_world, tiny_world.data_root, out)]
    finished = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert_identical_stores(out, reference)
    # Each process wrote its own blocks, the writes landed in one store and no lock is left behind.
    assert not list((out / "locks").iterdir())
    assert f"cache complete: {out}" in " ".join(finished.stderr.split())


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
