"""Resuming `richkd precompute` after the process is killed, and refusing to mix configurations."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zarr
from conftest import write_cifar100

from richkd.cache.schema import PER_VIEW_ARRAYS, STATIC_ARRAYS
from richkd.pipeline.cli import run_cli

RICHKD = str(Path(sys.executable).parent / "richkd")


def bundle_args(world, data_root: Path, out: Path) -> list[str]:
    """Arguments that a separate process can run: CLIP as an open_clip local-dir bundle."""
    args = world.precompute_args(out, "--batch-size", "4")
    args[args.index("--data-root") + 1] = str(data_root)
    args[args.index("--clip") + 1] = f"local-dir:{world.clip_bundle}"
    args[args.index("--clip-pretrained") + 1] = "random"  # ignored with local-dir
    return args


def done_count(out: Path) -> int:
    done_chunks = out / "progress" / "done" / "c"
    return sum(1 for _ in done_chunks.rglob("*") if _.is_file()) if done_chunks.exists() else 0


def shard_files(out: Path) -> dict[Path, tuple[int, bytes]]:
    files = {}
    for name in PER_VIEW_ARRAYS:
        for path in (out / name / "c").rglob("*"):
            if path.is_file():
                files[path] = (path.stat().st_mtime_ns, path.read_bytes())
    return files


def test_killed_run_resumes_to_an_identical_store(tiny_world, tmp_path):
    data_root = tmp_path / "data"
    write_cifar100(data_root, train=320, test=8, seed=1)  # 2 views x 20 shards = 40 blocks
    interrupted, reference = tmp_path / "interrupted.zarr", tmp_path / "reference.zarr"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    process = subprocess.Popen([RICHKD, *bundle_args(tiny_world, data_root, interrupted)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while done_count(interrupted) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    written = done_count(interrupted)
    assert 3 <= written < 40
    group = zarr.open_group(interrupted, mode="r")
    assert not group["progress/done"][...].all()
    before = {path: state for path, state in shard_files(interrupted).items()}
    finished_blocks = np.argwhere(group["progress/done"][...])

    resumed = subprocess.run([RICHKD, *bundle_args(tiny_world, data_root, interrupted)], env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{written} of 40 blocks already done" in " ".join(resumed.stderr.split())
    after = shard_files(interrupted)
    for view, shard in finished_blocks:  # finished blocks were not rewritten
        for name in PER_VIEW_ARRAYS:
            path = interrupted / name / "c" / str(view) / str(shard) / "0"
            assert after[path] == before[path], path

    assert run_cli(bundle_args(tiny_world, data_root, reference)) == 0
    a, b = zarr.open_group(interrupted, mode="r"), zarr.open_group(reference, mode="r")
    assert a["progress/done"][...].all()
    for name in (*PER_VIEW_ARRAYS, *STATIC_ARRAYS):
        assert np.array_equal(a[name][...], b[name][...]), name


def test_a_store_of_another_configuration_is_refused_unless_overwritten(tiny_world, tmp_path, capsys):
    out = tmp_path / "cache.zarr"
    assert run_cli(tiny_world.precompute_args(out)) == 0
    capsys.readouterr()
    assert run_cli(tiny_world.precompute_args(out, "--seed", "1")) == 2
    message = capsys.readouterr().err.strip()
    assert "another configuration (views.seed: 0 in the store, 1 now)" in message and "--overwrite" in message
    assert zarr.open_group(out, mode="r").attrs["views"]["seed"] == 0

    assert run_cli(tiny_world.precompute_args(out, "--seed", "1", "--overwrite")) == 0
    assert zarr.open_group(out, mode="r").attrs["views"]["seed"] == 1

    before = shard_files(out)
    assert run_cli(tiny_world.precompute_args(out, "--seed", "1")) == 0  # complete: nothing left to do
    assert shard_files(out) == before


def test_a_folder_that_is_not_a_store_is_never_replaced(tiny_world, tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert run_cli(tiny_world.precompute_args(out, "--overwrite")) == 2
    assert "exists but is not a richkd cache store" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"
