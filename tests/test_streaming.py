"""Streaming tar shards: `distill --stream` reads shards and store front to back, every sample with its own row, and
`evaluate --stream` reads a split once."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from test_bad_input import assert_user_error, replace_flag
from test_parallel import BIN, torchrun
from test_shards import CIFAR_SHARDS, cifar_shards, png, write_shard  # noqa: F401 (a fixture)
from torch.utils.data import DataLoader

from richkd.cache.reader import CacheReader
from richkd.cache.schema import Layout
from richkd.cli import run_cli
from richkd.pipeline.datasets import open_dataset
from richkd.pipeline.errors import UserError
from richkd.pipeline.loading import LabelledViews
from richkd.pipeline.models import read_checkpoint
from richkd.pipeline.runtime import Part
from richkd.pipeline.shards import open_shard_set, scan_shards
from richkd.pipeline.streaming import LabelStream, ShardStream, epoch_shard_order
from richkd.pipeline.views import make_view_policy, policy_from_description
from richkd.stages.precompute import SampleViews, StreamedSampleViews

TARGETS = ("teacher/logits", "teacher/features", "clip/logits", "clip/image_embeds")


@pytest.fixture(scope="module")
def store(tiny_world, cifar_shards, tmp_path_factory) -> Path:  # noqa: F811
    """The CIFAR train split's 3 shards (16, 16 and 8 samples) precomputed in store shards of 8 rows."""
    out = tmp_path_factory.mktemp("stream") / "cache.zarr"
    args = replace_flag(tiny_world.precompute_args(out), "--dataset", "webdataset")
    args = replace_flag(replace_flag(args, "--data-root", str(cifar_shards / CIFAR_SHARDS["train"])),
                        "--shard-size", "8")
    assert run_cli(args) == 0
    return out


def epoch_stream(store: Path, urls: list[str], part: Part = Part(), workers: int = 0, buffer: int = 8,
                 epoch: int = 1) -> ShardStream:
    reader = CacheReader(str(store))
    return ShardStream(urls, 100, str(store), epoch % reader.layout.views, TARGETS, reader.key_index(),
                       policy_from_description(reader.attrs["views"]), part, workers, buffer, seed=0, epoch=epoch)


def train_urls(cifar_shards: Path) -> list[str]:  # noqa: F811
    return open_shard_set(str(cifar_shards / CIFAR_SHARDS["train"]), "train").urls


def test_a_streamed_epoch_reads_shards_and_store_in_one_pass(store, cifar_shards, monkeypatch):  # noqa: F811
    """Every sample once, with exactly the targets and pixels of its row, while each store chunk is read
    once, in the order of the tar shards streamed."""
    urls = train_urls(cifar_shards)
    epoch_order = [urls[2], urls[0], urls[1]]
    stream = epoch_stream(store, epoch_order)
    reads = []
    original_read = CacheReader.read
    monkeypatch.setattr(CacheReader, "read", lambda self, name, start, stop, view=None: (
        reads.append((name, start, stop)), original_read(self, name, start, stop, view))[1])
    samples = list(stream)
    monkeypatch.undo()

    rows = [row for _, _, row, _ in samples]
    assert sorted(rows) == list(range(40)) and len(stream) == 40
    assert rows != sorted(rows)  # shuffled within the buffer
    # Shard 2 holds rows 32-39, shard 0 rows 0-15, shard 1 rows 16-31: chunks of 8 rows, each read once, in turn.
    assert [start for name, start, _ in reads if name == "teacher/logits"] == [32, 0, 8, 16, 24]
    assert len(reads) == 5 * (2 + 1 + len(TARGETS))  # keys, labels, view params and the targets
    assert [row for _, _, row, _ in epoch_stream(store, epoch_order)] == rows  # the same every time

    reader = CacheReader(str(store))
    dataset = open_dataset("webdataset", str(cifar_shards / CIFAR_SHARDS["train"]))
    stored = {name: reader.read(name, 0, 40, view=1) for name in ("views/params", *TARGETS)}
    indexed = LabelledViews(dataset, stream.policy, stored["views/params"])
    for view, label, row, targets in samples:
        expected_view, expected_label, _ = indexed[row]
        assert torch.equal(view, expected_view) and label == expected_label == reader.read("labels", 0, 40)[row]
        for name in TARGETS:
            assert torch.equal(targets[name], torch.from_numpy(stored[name][row].astype(np.float32))), name


def test_loader_workers_and_processes_split_the_shards(store, cifar_shards):  # noqa: F811
    urls = train_urls(cifar_shards)

    def rows(part: Part, workers: int) -> list[int]:
        loader = DataLoader(epoch_stream(store, urls, part, workers), batch_size=4, num_workers=workers)
        return [row for _, _, batch, _ in loader for row in batch.tolist()]

    assert sorted(rows(Part(), 2)) == list(range(40))  # two workers of one process: every sample once
    # Two processes get as many samples, ceil(40 / 2): process 0 streams shard 0 (rows 0-15), then shard 2 (32-39)
    # until it has 20; process 1 has only shard 1 (16-31) and starts it again.
    first, second = rows(Part(0, 2), 0), rows(Part(1, 2), 0)
    assert sorted(first) == [*range(16), *range(32, 36)]
    assert sorted(second) == sorted([*range(16, 32), *range(16, 20)])
    with pytest.raises(UserError, match="4 shards cannot be split over 5 processes"):
        epoch_stream(store, [*urls, urls[0]], Part(0, 5))


def test_every_process_checks_the_shards_it_streams(store, cifar_shards, tmp_path):  # noqa: F811
    """A shard rewritten with fewer samples, as a valid tar: under two processes each streams 20 samples, the
    changed shard's process by going round its shard again, so only the shard's own count can tell."""
    urls = train_urls(cifar_shards)

    def rewritten(name: str, members: slice) -> str:
        path = tmp_path / name
        with tarfile.open(urls[1]) as source, tarfile.open(path, "w") as target:
            for member in source.getmembers()[members]:  # a cls and an image member per sample
                target.addfile(member, source.extractfile(member))
        return str(path)

    short = rewritten("short.tar", slice(0, -4))
    assert len(list(epoch_stream(store, [urls[0], short, urls[2]], Part(0, 2)))) == 20  # shards 0 and 2: intact
    with pytest.raises(UserError, match=re.escape(f"shard {short} streamed 14 samples where the shard the cache "
                                                  f"{store} was precomputed from held 16: it has changed since")):
        list(epoch_stream(store, [urls[0], short, urls[2]], Part(1, 2)))
    late = rewritten("late.tar", slice(4, None))
    with pytest.raises(UserError, match=re.escape(f"shard {late} starts with sample '18', row 18 of the cache "
                                                  f"{store}, where no shard it was precomputed from starts")):
        list(epoch_stream(store, [urls[0], late, urls[2]], Part(1, 2)))


def test_distill_streams_from_a_pipe_and_resumes_bit_identical(store, cifar_shards, tmp_path, capsys):  # noqa: F811
    piped = "::".join(f"pipe:cat {url}" for url in train_urls(cifar_shards))  # no file is ever indexed
    distill = ["distill", "--dataset", "webdataset", "--data-root", piped, "--stream", "--val-fraction", "0",
               "--cache", str(store),
               "--arch", "resnet8", "--variant", "LF", "--nce-k", "8", "--batch-size", "8", "--num-workers", "2",
               "--shuffle-buffer", "16", "--eval-split", "train", "--device", "cpu"]
    assert run_cli([*distill, "--epochs", "2", "--out", str(tmp_path / "straight")]) == 0
    assert run_cli([*distill, "--epochs", "1", "--out", str(tmp_path / "resumed")]) == 0
    capsys.readouterr()
    assert_user_error([*replace_flag(distill, "--num-workers", "1"), "--epochs", "2", "--resume", "--out",
                       str(tmp_path / "resumed")], capsys, "it was run with num_workers=2, now 1")
    assert run_cli([*distill, "--epochs", "2", "--resume", "--out", str(tmp_path / "resumed")]) == 0
    straight, saved = read_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    resumed, _ = read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
    assert saved["epoch"] == 2 and saved["best"]["top1"] is None  # a stream holds no validation samples out


def test_streaming_refuses_other_samples(store, cifar_shards, tmp_path, capsys):  # noqa: F811
    urls = train_urls(cifar_shards)
    distill = ["distill", "--dataset", "webdataset", "--data-root", "::".join(urls), "--stream", "--val-fraction",
               "0", "--cache", str(store), "--arch", "resnet8", "--epochs", "1", "--num-workers", "0", "--nce-k", "8",
               "--device", "cpu", "--out", str(tmp_path / "run")]
    assert_user_error(replace_flag(distill, "--dataset", "cifar100"), capsys,
                      "--stream reads tar shards: it needs --dataset webdataset, not 'cifar100'")
    assert_user_error([*distill, "--split", "test"], capsys, "was built for another dataset (dataset.split: 'train'")
    assert_user_error([*distill, "--normalize", "dataset"], capsys,
                      "--normalize dataset measures images read by index, which streamed shards are not")
    assert_user_error(replace_flag(distill, "--data-root", "::".join(urls[:2])), capsys,
                      "the shards streamed 32 samples and the cache", "holds 40: it was precomputed from other shards")

    reader = CacheReader(str(store))
    stored_class = int(reader.read("labels", 0, 1)[0])
    other_class = (stored_class + 1) % 100
    for key, label, message in (("stranger", 0, "is not in the cache"),
                                ("0", other_class, f"has class {other_class}, the cache")):
        shard = tmp_path / f"{key}.tar"
        write_shard(shard, {"__key__": key, "cls": str(label).encode(), "png": png(32)})
        with pytest.raises(UserError, match=re.escape(f"sample '{key}' in {shard} {message}")):
            list(epoch_stream(store, [str(shard)]))
    resized = tmp_path / "resized.tar"  # the first shard's samples at 16 px: their stored crops would cut other pixels
    write_shard(resized, *({"__key__": str(row), "cls": str(label).encode(), "png": png(16)}
                           for row, label in enumerate(reader.read("labels", 0, 16).tolist())))
    with pytest.raises(UserError, match=re.escape(f"in {resized} is 16 x 16, where the cache {store} was "
                                                  "precomputed from 32 x 32 images: its stored views would be cut")):
        list(epoch_stream(store, [str(resized)]))
    (tmp_path / "not.tar").write_text("not a tar file")
    for shard, reason in ((str(tmp_path / "not.tar"), "truncated header"),
                          ("pipe:false", "the command exited with status 1")):
        with pytest.raises(UserError, match=re.escape(f"cannot read shard {shard}: {reason}")):
            list(epoch_stream(store, [shard]))
    empty = tmp_path / "empty.tar"
    write_shard(empty)
    with pytest.raises(UserError, match=re.escape(f"shard {empty} holds no samples, where every shard the cache "
                                                  f"{store} was precomputed from held some")):
        list(epoch_stream(store, [str(empty), urls[0]], Part(0, 2)))
    # A store that does not record its shards' sizes (one precomputed from CIFAR's files, say) finds the shard
    # empty only when a process went round its shards without a sample.
    unrecorded = tmp_path / "unrecorded.zarr"
    shutil.copytree(store, unrecorded)
    group = zarr.open_group(unrecorded, mode="r+")
    group.attrs["dataset"] = {key: value for key, value in group.attrs["dataset"].items() if key != "shard_sizes"}
    with pytest.raises(UserError, match=re.escape(f"the shards {empty} hold no samples")):
        list(epoch_stream(unrecorded, [str(empty), urls[0]], Part(0, 2)))
    # Nor does one that was precomputed from an empty shard among the others: an empty shard then loses nothing.
    group.attrs["dataset"] = {**group.attrs["dataset"], "shard_sizes": [16, 16, 0, 8]}
    with pytest.raises(UserError, match=re.escape(f"the shards {empty} hold no samples")):
        list(epoch_stream(unrecorded, [str(empty), urls[0]], Part(0, 2)))


def test_torchrun_processes_stream_shards_of_unequal_size(store, cifar_shards, tmp_path):  # noqa: F811
    """Shards of 16, 16 and 8 samples over 2 processes: each still runs as many batches, or DDP would hang."""
    command = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", str(BIN / "richkd"), "distill",
               "--dataset", "webdataset", "--data-root", "::".join(train_urls(cifar_shards)), "--stream",
               "--val-fraction", "0", "--cache", str(store), "--arch", "resnet8", "--variant", "LF", "--nce-k", "8",
               "--batch-size", "8", "--epochs", "2", "--num-workers", "1", "--eval-split", "train", "--device", "cpu",
               "--out", str(tmp_path / "run")]
    finished = torchrun(command)
    assert finished.stderr.count("epoch 2/2: loss") == 1  # logged by the first process only
    _, saved = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert saved["epoch"] == 2


def test_distill_runs_read_one_store_at_once(store, cifar_shards, tmp_path):  # noqa: F811
    """Three runs at the same time, by index and streamed: all finish, two alike end alike, the store is untouched."""
    def snapshot() -> dict[str, tuple[int, bytes]]:
        return {str(path.relative_to(store)): (path.stat().st_mtime_ns, path.read_bytes())
                for path in sorted(store.rglob("*")) if path.is_file()}

    before = snapshot()
    shards = "::".join(train_urls(cifar_shards))
    distill = [str(BIN / "richkd"), "distill", "--dataset", "webdataset", "--data-root", shards, "--cache", str(store),
               "--arch", "resnet8", "--variant", "LF", "--nce-k", "8", "--batch-size", "8", "--epochs", "2",
               "--num-workers", "0", "--eval-split", "train", "--device", "cpu"]
    runs = {name: [*distill, *extra, "--out", str(tmp_path / name)]
            for name, extra in (("a", ()), ("b", ()), ("streamed", ("--stream", "--val-fraction", "0")))}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    processes = {name: subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
                 for name, command in runs.items()}
    for name, process in processes.items():
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, (name, err[-2000:])
    a, _ = read_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    b, _ = read_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert snapshot() == before


def test_evaluate_streams_the_split_and_agrees_with_reading_it_by_index(
        store, cifar_shards, tiny_world, tmp_path, capsys):  # noqa: F811
    """`evaluate --stream` on the shards, on pipe: commands of them, and by index: the same metrics."""
    run = tmp_path / "student"
    assert run_cli(["distill", "--dataset", "webdataset", "--data-root", str(cifar_shards / CIFAR_SHARDS["train"]),
                    "--cache", str(store), "--arch", "resnet8", "--epochs", "1", "--batch-size", "8",
                    "--num-workers", "0", "--device", "cpu", "--eval-split", "train", "--out", str(run)]) == 0
    pattern = str(cifar_shards / CIFAR_SHARDS["test"])
    piped = "::".join(f"pipe:cat {url}" for url in open_shard_set(pattern, "test").urls)
    evaluate = ["evaluate", "--dataset", "webdataset", "--split", "test", "--checkpoint",
                str(run / "checkpoints" / "last.pt"), "--num-workers", "0", "--device", "cpu", "--json"]
    metrics = {}
    for name, extra in (("by index", ["--data-root", pattern]), ("streamed", ["--data-root", pattern, "--stream"]),
                        ("piped", ["--data-root", piped, "--stream"])):
        capsys.readouterr()
        assert run_cli([*evaluate, *extra]) == 0, name
        metrics[name] = json.loads(capsys.readouterr().out)
    assert metrics["by index"]["count"] == 20
    for name in ("streamed", "piped"):
        for key in ("count", "top1", "nll", "ece", "per_class_accuracy"):
            assert metrics[name][key] == pytest.approx(metrics["by index"][key], abs=1e-6), (name, key)
    assert_user_error([*evaluate, "--data-root", pattern, "--stream", "--corruptions", "all"], capsys,
                      "--stream reads each sample once, front to back, and corruptions are evaluated on samples by "
                      "index: evaluate them without --stream")
    assert_user_error([*replace_flag(evaluate, "--dataset", "cifar100"), "--data-root", pattern, "--stream"], capsys,
                      "--stream reads tar shards: it needs --dataset webdataset, not 'cifar100'")
    teacher = ["--checkpoint", str(tiny_world.teacher_checkpoint), "--arch", "resnet8"]  # mdistiller's: no classes
    assert_user_error([*evaluate, *teacher, "--data-root", piped, "--stream"], capsys,
                      "records no class names or normalisation, which pipe: shards cannot give: evaluate shards "
                      "that have their classes.txt beside them")
    reordered = tmp_path / "reordered"
    shutil.copytree(cifar_shards, reordered)
    names = (reordered / "classes.txt").read_text().splitlines()
    (reordered / "classes.txt").write_text("\n".join(reversed(names)) + "\n")
    assert_user_error([*evaluate, "--data-root", str(reordered / CIFAR_SHARDS["test"]), "--stream"], capsys,
                      "the shards' classes.txt lists other classes, or another order, than checkpoint")


def store_arrays(store: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store), mode="r")
    return {name: array[...] for name, array in group.members(max_depth=None) if isinstance(array, zarr.Array)}


def test_precompute_streams_the_shards_into_the_store_it_writes_by_index(
        store, cifar_shards, tiny_world, tmp_path, capsys):  # noqa: F811
    """`precompute --stream`, on pipe: commands with store shards that straddle the tar shards (12 rows against 16)
    and two loader workers, and in two parts: each writes the store that reading the shards by index writes."""
    by_index = store_arrays(store)
    urls = train_urls(cifar_shards)
    args = replace_flag(tiny_world.precompute_args(tmp_path / "unused.zarr"), "--dataset", "webdataset")
    piped = "::".join(f"pipe:cat {url}" for url in urls)
    stats = json.loads((cifar_shards / "normalization.json").read_text())
    straddling = tmp_path / "piped.zarr"
    assert run_cli([*replace_flag(replace_flag(replace_flag(replace_flag(
        args, "--data-root", piped), "--shard-size", "12"), "--num-workers", "2"), "--out", str(straddling)),
        "--stream", "--class-names", str(cifar_shards / "classes.txt"),  # pipe: shards have no folder for these
        "--normalize", ",".join(map(str, [*stats["mean"], *stats["std"]]))]) == 0
    streamed = store_arrays(straddling)
    assert streamed.keys() == by_index.keys()
    for flags in ("progress/done", "teacher/done", "clip/done"):
        assert streamed.pop(flags).all()  # 4 shards of 12 rows, not 5 of 8
    for name, values in streamed.items():
        assert np.array_equal(values, by_index[name]), name
    recorded, expected = (CacheReader(str(path)) for path in (straddling, store))
    assert recorded.teacher_input_transform == expected.teacher_input_transform
    for field in ("fingerprint", "class_names", "shard_sizes"):
        assert recorded.attrs["dataset"][field] == expected.attrs["dataset"][field], field

    parts = tmp_path / "parts.zarr"
    local = replace_flag(replace_flag(replace_flag(args, "--data-root", "::".join(urls)), "--shard-size", "8"),
                         "--out", str(parts))
    for part in ("0/2", "1/2"):
        assert run_cli([*local, "--stream", "--part", part]) == 0
    assert "cache complete" in capsys.readouterr().err
    for name, values in store_arrays(parts).items():
        assert np.array_equal(values, by_index[name]), name

    assert_user_error([*replace_flag(args, "--data-root", piped), "--stream"], capsys,
                      "pipe: shards have no folder to hold their classes.txt: pass --class-names, a file of the class "
                      "names, one per line in class-id order")
    assert_user_error([*local, "--stream", "--mix", "cutmix"], capsys,
                      "--mix takes each view's partner from another sample, whose image a stream cannot fetch: "
                      "run without --stream")


def test_a_shard_that_changes_while_precompute_streams_it_is_refused(cifar_shards, tmp_path):  # noqa: F811
    """The shards scanned, then one of them rewritten shorter, or with a sample of another class."""
    urls = train_urls(cifar_shards)
    dataset = scan_shards(open_shard_set("::".join(urls), "train"), "train")
    views = SampleViews(dataset, make_view_policy("auto", dataset.native_size, None), seed=0, views=2)
    layout = Layout(views=2, samples=40, classes=100, view_params=3, shard_size=16, chunk_size=16, precision="float16")
    with tarfile.open(urls[1]) as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar.getmembers()]
    short, relabelled = tmp_path / "short.tar", tmp_path / "relabelled.tar"
    write_members(short, members[:-2])  # its last sample gone
    write_members(relabelled, [(member, b"99" if member.name.endswith(".cls") else data) for member, data in members])
    for changed, message in ((short, f"shard {short} changed while precompute read it: it holds 15 samples, where it "
                                     "held 16; precompute again from shards that stay as they are"),
                             (relabelled, f"shard {relabelled} changed while precompute read it: its sample 1 is now "
                                          f"'{dataset.keys[16]}' of class 99; precompute again")):
        stream = StreamedSampleViews(views, [urls[0], str(changed), urls[2]], layout, [1], samples_per_batch=4)
        with pytest.raises(UserError, match=re.escape(message)):
            list(stream)
    batches = list(StreamedSampleViews(views, urls, layout, [1, 2], samples_per_batch=5))
    assert [batch[2].tolist() for batch in batches] == [
        [16, 17, 18, 19, 20], [21, 22, 23, 24, 25], [26, 27, 28, 29, 30], [31], [32, 33, 34, 35, 36], [37, 38, 39]]


def write_members(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def test_train_streams_from_a_pipe_with_the_views_of_reading_by_index_and_resumes_bit_identical(
        cifar_shards, tmp_path, capsys):  # noqa: F811
    """`train --stream` gives each streamed sample the random view training by index gives it, reads pipe:
    commands, resumes bit-identical, and refuses shards that changed after it first read them."""
    urls = train_urls(cifar_shards)
    dataset = scan_shards(open_shard_set("::".join(urls), "train"), "train")
    policy = make_view_policy("auto", dataset.native_size, None)
    first_rows = {url: 16 * number for number, url in enumerate(urls)}
    stream = LabelStream(epoch_shard_order(urls, 0, 3), dataset, first_rows, policy, Part(), 0, 8, seed=0, epoch=3)
    samples = list(stream)
    stream.check_epoch(len(samples))
    indexed = LabelledViews(open_dataset("webdataset", str(cifar_shards / CIFAR_SHARDS["train"])), policy, seed=0,
                            stream=3)
    assert sorted(row for _, _, row in samples) == list(range(40))
    for view, label, row in samples:
        expected_view, expected_label, _ = indexed[row]
        assert torch.equal(view, expected_view) and label == expected_label, row

    with tarfile.open(urls[1]) as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar.getmembers()]
    relabelled, short = tmp_path / "relabelled.tar", tmp_path / "short.tar"
    write_members(relabelled, [(member, b"99" if member.name.endswith(".cls") else data) for member, data in members])
    write_members(short, members[:-2])
    changed = {url: first_rows[urls[1]] for url in (str(relabelled), str(short))}
    with pytest.raises(UserError, match=re.escape(
            f"shard {relabelled} changed since it was first read: sample '{dataset.keys[16]}' of class 99 is not "
            "where it was; train again from shards that stay as they are")):
        list(LabelStream([str(relabelled)], dataset, changed, policy, Part(), 0, 8, seed=0, epoch=1))
    shortened = LabelStream([urls[0], str(short), urls[2]], dataset, {**first_rows, **changed}, policy, Part(), 0, 8,
                            seed=0, epoch=1)
    with pytest.raises(UserError, match=re.escape(
            "the shards streamed 39 samples where they held 40 when first read: they have changed since; train again "
            "from shards that stay as they are")):
        shortened.check_epoch(len(list(shortened)))

    stats = json.loads((cifar_shards / "normalization.json").read_text())
    train = ["train", "--dataset", "webdataset", "--data-root", "::".join(f"pipe:cat {url}" for url in urls),
             "--stream", "--class-names", str(cifar_shards / "classes.txt"), "--val-fraction", "0",
             "--normalize", ",".join(map(str, [*stats["mean"], *stats["std"]])), "--arch", "resnet8",
             "--batch-size", "8", "--num-workers", "2", "--shuffle-buffer", "16", "--eval-split", "train",
             "--device", "cpu"]
    assert run_cli([*train, "--epochs", "2", "--out", str(tmp_path / "straight")]) == 0
    assert run_cli([*train, "--epochs", "1", "--out", str(tmp_path / "resumed")]) == 0
    assert run_cli([*train, "--epochs", "2", "--resume", "--out", str(tmp_path / "resumed")]) == 0
    straight, saved = read_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    resumed, _ = read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
    assert saved["epoch"] == 2 and saved["class_names"] == dataset.class_names
    capsys.readouterr()
    assert_user_error([*train, "--mix", "mixup", "--epochs", "1", "--out", str(tmp_path / "mixed")], capsys,
                      "--mix takes each view's partner from another sample, whose image a stream cannot fetch")
