"""Resuming `richkd precompute` after the process is killed, and refusing to mix configurations."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import PER_VIEW_ARRAYS, STATIC_ARRAYS, write_cifar100
from test_bad_input import assert_user_error, replace_flag

from richkd.cli import run_cli
from richkd.pipeline.models import file_sha256, read_checkpoint

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


def finished_block_files(out: Path) -> dict[Path, tuple[int, bytes]]:
    """The shard files of the blocks marked done, with their modification times and contents."""
    files = shard_files(out)
    done = zarr.open_group(out, mode="r")["progress/done"][...]
    return {out / name / "c" / str(view) / str(shard) / "0": files[out / name / "c" / str(view) / str(shard) / "0"]
            for view, shard in np.argwhere(done) for name in PER_VIEW_ARRAYS}


def assert_identical_stores(a_path: Path, b_path: Path) -> None:
    a, b = zarr.open_group(a_path, mode="r"), zarr.open_group(b_path, mode="r")
    assert a["progress/done"][...].all()
    for name in (*PER_VIEW_ARRAYS, *STATIC_ARRAYS):
        assert np.array_equal(a[name][...], b[name][...]), name


def test_killed_at_random_points_resumes_to_an_identical_store(tiny_world, tmp_path, capsys):
    data_root = tmp_path / "data"
    write_cifar100(data_root, train=320, test=8, seed=1)  # 2 views x 20 shards = 40 blocks
    interrupted, reference = tmp_path / "interrupted.zarr", tmp_path / "reference.zarr"
    command = [RICHKD, *bundle_args(tiny_world, data_root, interrupted)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    rng = np.random.default_rng(2026)

    def run_and_kill(ready) -> None:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not ready() and process.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))  # anywhere inside a block, or between blocks
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()

    # The first kill lands while the models load or the store is created; the next ones while blocks are written.
    started = time.monotonic()
    run_and_kill(lambda: time.monotonic() - started > rng.uniform(0.5, 4.0))
    kept = {}
    for target in sorted(rng.choice(np.arange(2, 38), size=3, replace=False)):
        run_and_kill(lambda: done_count(interrupted) >= target)
        written = done_count(interrupted)
        assert written < 40
        kept.update(finished_block_files(interrupted))

    resumed = subprocess.run(command, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{written} of 40 blocks already done" in " ".join(resumed.stderr.split())
    after = shard_files(interrupted)
    for path, state in kept.items():  # a finished block is never written again
        assert after[path] == state, path

    assert run_cli(bundle_args(tiny_world, data_root, reference)) == 0
    assert_identical_stores(interrupted, reference)
    capsys.readouterr()
    assert run_cli(["inspect", str(interrupted), "--verify"]) == 0, capsys.readouterr().out


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


def test_a_store_of_another_teacher_names_both_checksums_whole_quoted(tiny_world, tmp_path, capsys):
    teacher = tmp_path / "teacher.pth"
    shutil.copy(tiny_world.teacher_checkpoint, teacher)
    args = replace_flag(tiny_world.precompute_args(tmp_path / "cache.zarr"), "--teacher-checkpoint", str(teacher))
    assert run_cli(args) == 0
    before = file_sha256(teacher)
    state, saved = read_checkpoint(teacher)
    torch.save({**saved, "model": {key: value + 1 for key, value in state.items()}}, teacher)  # retrained in place
    capsys.readouterr()
    assert_user_error(args, capsys, f"was made with another configuration (teacher.checkpoint_sha256: "
                      f"'{before[:54]}...' in the store, '{file_sha256(teacher)[:54]}...' now); pass --overwrite")


def test_a_folder_that_is_not_a_store_is_never_replaced(tiny_world, tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert run_cli(tiny_world.precompute_args(out, "--overwrite")) == 2
    assert "exists but is not a richkd cache store" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


# Saves an untrained model of architecture argv[1] as a checkpoint at argv[2]; prints a user error.
SAVE_CHECKPOINT = """
import sys
from richkd.pipeline.errors import UserError
from richkd.pipeline.models import create_model, save_checkpoint
try:
    save_checkpoint(create_model(sys.argv[1], 100), sys.argv[2], arch=sys.argv[1], num_classes=100)
except UserError as error:
    print(error)
"""


def can_mount_a_small_disk() -> bool:
    probe = subprocess.run(["unshare", "--map-root-user", "--mount", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not can_mount_a_small_disk(), reason="needs user namespaces to mount a small tmpfs (unshare)")
def test_a_full_disk_fails_clearly_and_the_same_command_finishes_later(tiny_world, tmp_path):
    data_root = tmp_path / "data"
    write_cifar100(data_root, train=320, test=8, seed=1)
    reference = tmp_path / "reference.zarr"
    assert run_cli(bundle_args(tiny_world, data_root, reference)) == 0
    used = sum(path.stat().st_blocks * 512 for path in reference.rglob("*"))
    disk, store = tmp_path / "small_disk", tmp_path / "small_disk" / "cache.zarr"
    disk.mkdir()
    command = shlex.join([RICHKD, *bundle_args(tiny_world, data_root, store)])
    train = [RICHKD, "train", "--data-root", str(data_root), "--arch", "resnet8", "--epochs", "1", "--num-workers", "0",
             "--device", "cpu", "--out", str(disk / "train")]
    demo = [RICHKD, "demo", "--out", str(disk / "demo"), "--train", "8", "--test", "8"]
    # A tmpfs with room for about half the store, in a private mount namespace; the store is copied out
    # after each run because the mount ends with the namespace.
    size = used + (1 << 20)
    script = f"""
        mount -t tmpfs -o size={size} tmpfs {disk}
        head -c {size - used // 2} /dev/zero > {disk}/ballast
        status=0; {command} 2> {tmp_path}/first.err || status=$?; echo $status > {tmp_path}/first.status
        cp -a {store} {tmp_path}/after_first.zarr
        rm {disk}/ballast
        status=0; {command} 2> {tmp_path}/second.err || status=$?; echo $status > {tmp_path}/second.status
        cp -a {store} {tmp_path}/after_second.zarr
        {sys.executable} -c '{SAVE_CHECKPOINT}' resnet8 {disk}/run/last.pt
        head -c {size} /dev/zero > {disk}/ballast || true
        {sys.executable} -c '{SAVE_CHECKPOINT}' resnet32x4 {disk}/run/last.pt > {tmp_path}/checkpoint.out
        cp -a {disk}/run {tmp_path}/run
        status=0; {shlex.join(train)} 2> {tmp_path}/train.err || status=$?; echo $status > {tmp_path}/train.status
        status=0; {shlex.join(demo)} 2> {tmp_path}/demo.err || status=$?; echo $status > {tmp_path}/demo.status
    """
    subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-ec", script], check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})

    first_error = (tmp_path / "first.err").read_text().strip().splitlines()
    assert (tmp_path / "first.status").read_text().strip() == "2", first_error
    assert first_error[-1] == (
        f"error: no space left on the device writing {store}: the blocks already written are kept, "
        "and running the same command again finishes the rest")
    assert "Traceback" not in (tmp_path / "first.err").read_text()
    done = zarr.open_group(tmp_path / "after_first.zarr", mode="r")["progress/done"][...]
    assert 0 < done.sum() < done.size
    assert not list((tmp_path / "after_first.zarr").rglob("*.partial"))  # no half-written files left behind

    assert (tmp_path / "second.status").read_text().strip() == "0", (tmp_path / "second.err").read_text()
    assert f"{done.sum()} of {done.size} blocks already done" in " ".join((tmp_path / "second.err").read_text().split())
    assert_identical_stores(tmp_path / "after_second.zarr", reference)

    # A checkpoint that does not fit: a clear error, and the previous checkpoint is still there, whole.
    assert (tmp_path / "checkpoint.out").read_text().strip() == (
        f"no space left on the device writing {disk}/run/last.pt: the previous checkpoint there is intact; "
        "free some space and continue the run with --resume")
    _, saved = read_checkpoint(tmp_path / "run" / "last.pt")
    assert saved["arch"] == "resnet8"
    assert [path.name for path in (tmp_path / "run").iterdir()] == ["last.pt"]
    # Any other write of a training run on a full disk: one line, no traceback, and --resume goes on.
    assert (tmp_path / "train.status").read_text().strip() == "2"
    train_error = (tmp_path / "train.err").read_text()
    assert "Traceback" not in train_error
    assert " ".join(train_error.split()).startswith("error: no space left on the device")
    assert "free some space and continue the run with --resume" in " ".join(train_error.split())
    # Any other write on a full disk: one line, no traceback.
    assert (tmp_path / "demo.status").read_text().strip() == "2"
    demo_error = (tmp_path / "demo.err").read_text()
    assert "Traceback" not in demo_error
    assert " ".join(demo_error.split()).startswith("error: no space left on the device")
    assert "free some space and run the command again" in " ".join(demo_error.split())


def interrupt_when(command: list[str], ready) -> subprocess.CompletedProcess:
    """Run `command`, press Ctrl-C (SIGINT) once `ready()` holds, and wait for it to exit."""
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(command, process.returncode, stderr=stderr)


def test_ctrl_c_says_what_was_kept_and_the_command_that_continues(tiny_world, tmp_path):
    data_root = tmp_path / "data"
    write_cifar100(data_root, train=160, test=8, seed=1)
    run = tmp_path / "run"
    train = [RICHKD, "train", "--data-root", str(data_root), "--arch", "resnet8", "--epochs", "40", "--batch-size",
             "16", "--num-workers", "0", "--device", "cpu", "--out", str(run), "--overwrite"]
    interrupted = interrupt_when(train, lambda: (run / "checkpoints" / "last.pt").exists())
    assert interrupted.returncode == 130, interrupted.stderr
    last_line = " ".join(interrupted.stderr.strip().splitlines()[-1].split())
    resume = shlex.join(["richkd", *train[1:-1]]) + " --resume"  # --overwrite would discard what was kept
    assert last_line == f"interrupted: the checkpoint of the last finished epoch in {run} is kept; continue with: " \
                        f"{resume}", interrupted.stderr
    assert "Traceback" not in interrupted.stderr
    kept = read_checkpoint(run / "checkpoints" / "last.pt")[1]["epoch"]
    assert run_cli([*shlex.split(resume)[1:], "--epochs", str(kept + 1)]) == 0
    assert read_checkpoint(run / "checkpoints" / "last.pt")[1]["epoch"] == kept + 1

    store = tmp_path / "cache.zarr"
    precompute = [RICHKD, *bundle_args(tiny_world, data_root, store)]
    interrupted = interrupt_when(precompute, lambda: done_count(store) > 0)
    assert interrupted.returncode == 130, interrupted.stderr
    assert " ".join(interrupted.stderr.strip().splitlines()[-1].split()) == (
        f"interrupted: the finished blocks of {store} are kept; the same command computes the rest: "
        f"{shlex.join(['richkd', *precompute[1:]])}")
    assert run_cli(precompute[1:]) == 0


def test_a_damaged_progress_flag_is_named_and_its_block_computed_again(tiny_world, tmp_path, capsys):
    data_root = tmp_path / "data"
    write_cifar100(data_root, train=64, test=8, seed=1)
    store, reference = tmp_path / "damaged.zarr", tmp_path / "reference.zarr"
    assert run_cli(bundle_args(tiny_world, data_root, reference)) == 0
    shutil.copytree(reference, store)
    flag = store / "progress" / "done" / "c" / "1" / "2"  # view 1, shard 2
    damaged = bytearray(flag.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    flag.write_bytes(bytes(damaged))
    capsys.readouterr()

    assert run_cli(["inspect", str(store), "--verify"]) == 1
    assert "progress/done view 1 shard 2 is damaged (its block is computed again by precompute)" in \
        " ".join(capsys.readouterr().out.split())
    assert run_cli(["inspect", str(store)]) == 2
    assert (f"error: cache {store}: the progress flags of 1 blocks are damaged (view 1 shard 2); the same `richkd "
            "precompute` command computes those blocks again") in " ".join(capsys.readouterr().err.split())
    assert run_cli(bundle_args(tiny_world, data_root, store)) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"{store}: the progress flags of 1 blocks are damaged (view 1 shard 2): computing those blocks again" in err
    assert f"continuing {store}: " in err
    assert_identical_stores(store, reference)
    assert run_cli(["inspect", str(store), "--verify"]) == 0

    # Damaged metadata, and attributes that disagree with the arrays: one line each, never a traceback.
    delete = "; delete the store and run `richkd precompute` again"
    for damage, prefix, message in (
            ("zarr.json", "", ": its zarr.json is damaged (not valid JSON: "),
            ("teacher/logits/zarr.json", "cache ",
             ": the metadata of teacher/logits (teacher/logits/zarr.json) is damaged (not valid JSON: "),
            ("layout", "cache ", ": array labels has shape [64] where the store's layout says [65] "
                                 "(labels/zarr.json): the store was altered; delete it and run `richkd precompute` "
                                 "again")):
        altered = tmp_path / f"altered-{damage.replace('/', '-')}.zarr"
        shutil.copytree(reference, altered)
        if damage == "layout":
            group = zarr.open_group(altered, mode="r+")
            group.attrs["layout"] = {**group.attrs["layout"], "samples": 65}
        else:
            (altered / damage).write_text((altered / damage).read_text()[:100])
        capsys.readouterr()
        assert run_cli(["inspect", str(altered), "--verify"]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"error: {prefix}{altered}{message}" in err
        assert damage == "layout" or err.endswith(delete)
