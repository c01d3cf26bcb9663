"""`richkd pack` and the `webdataset` dataset: shards written reproducibly, read back sample for sample."""

from __future__ import annotations

import hashlib
import io
import pickle
import shutil
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import webdataset as wds
import zarr
from PIL import Image
from test_bad_input import assert_user_error, decompression_bomb_png, replace_flag
from torch.utils.data import DataLoader
from webdataset import TarWriter

from richkd.cli import run_cli
from richkd.pipeline.data import ImageDataset
from richkd.pipeline.datasets import open_dataset
from richkd.pipeline.demo import write_demo
from richkd.pipeline.errors import UserError
from richkd.pipeline.models import read_checkpoint
from richkd.pipeline.shards import stream_shard
from richkd.stages.pack import shard_key

# Per split, the shards `pack --samples-per-shard 16` writes (64 demo train images, 16 test; 40 CIFAR train, 20 test).
DEMO_SHARDS = {"train": "{split}-{000000..000003}.tar", "test": "{split}-000000.tar"}
CIFAR_SHARDS = {"train": "{split}-{000000..000002}.tar", "test": "{split}-{000000..000001}.tar"}


def pack(dataset: str, data_root: Path, out: Path, *extra: str) -> list[str]:
    return ["pack", "--dataset", dataset, "--data-root", str(data_root), "--out", str(out),
            "--samples-per-shard", "16", *extra]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The demo (64 train, 16 test images) and its shards in `shards/`."""
    root = tmp_path_factory.mktemp("demo")
    write_demo(root / "images", train=64, test=16)
    for split in ("train", "test"):
        assert run_cli(pack("demo", root / "images", root / "shards", "--split", split)) == 0
    return root


@pytest.fixture(scope="module")
def cifar_shards(tiny_world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cifar") / "shards"
    for split in ("train", "test"):
        assert run_cli(pack("cifar100", tiny_world.data_root, out, "--split", split)) == 0
    return out


def file_hashes(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def assert_same_samples(original: ImageDataset, packed: ImageDataset) -> None:
    assert packed.keys == [shard_key(key) for key in original.keys]
    assert np.array_equal(packed.labels, original.labels) and packed.class_names == original.class_names
    assert (packed.mean, packed.std, packed.native_size) == (original.mean, original.std, original.native_size)
    for index in range(len(original)):
        assert torch.equal(packed.image(index), original.image(index)), index


def test_pack_writes_the_same_bytes_every_time(demo, tiny_world, tmp_path, capsys):
    shards = demo / "shards"
    written = file_hashes(shards)
    assert sorted(written) == ["classes.txt", "normalization.json", "test-000000.tar", "train-000000.tar",
                               "train-000001.tar", "train-000002.tar", "train-000003.tar"]
    assert (shards / "classes.txt").read_text().splitlines() == open_dataset("demo", demo / "images").class_names

    assert run_cli(pack("demo", demo / "images", tmp_path / "again")) == 0
    assert capsys.readouterr().err.strip() == ("packed 64 samples into 4 shards: read them with --dataset webdataset "
                                               f"--data-root '{tmp_path}/again/train-{{000000..000003}}.tar'")
    assert file_hashes(tmp_path / "again") == {name: written[name] for name in file_hashes(tmp_path / "again")}
    assert_user_error(pack("demo", demo / "images", shards), capsys,
                      f"{shards} already holds shards of split 'train' (train-000000.tar, ...); pass --overwrite")
    assert run_cli(pack("demo", demo / "images", shards, "--overwrite")) == 0
    capsys.readouterr()
    assert file_hashes(shards) == written
    assert_user_error(pack("cifar100", tiny_world.data_root, shards, "--split", "test"), capsys,
                      f"{shards} holds the classes.txt of another dataset than cifar100; pack into another folder")

    with tarfile.open(shards / "train-000000.tar") as tar:
        members = tar.getmembers()
    assert [member.name for member in members[:2]] == [f"{members[0].name[:-4]}.cls", f"{members[0].name[:-4]}.png"]
    fields = {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members}
    assert fields == {(0, 0, 0, "richkd", "richkd", 0o444)}


def test_keys_map_to_webdataset_keys_one_to_one():
    assert shard_key("cat/0001.png") == "cat/0001%2Epng" and shard_key("17") == "17"
    keys = ["a.b", "a%2Eb", "a_b", "a%b", "x.y/z.png", "x%2Ey/z.png"]
    assert len({shard_key(key) for key in keys}) == len(keys)
    assert all("." not in shard_key(key) for key in keys)


def test_webdataset_reads_the_shards(demo):
    original = open_dataset("demo", demo / "images", "train")
    samples = list(wds.WebDataset(str(demo / "shards" / "train-{000000..000003}.tar"), shardshuffle=False))
    assert [sample["__key__"] for sample in samples] == [shard_key(key) for key in original.keys]
    assert [int(sample["cls"]) for sample in samples] == original.labels.tolist()
    image = np.asarray(Image.open(io.BytesIO(samples[5]["png"])))
    assert np.array_equal(image, original.image(5).permute(1, 2, 0).numpy())


@pytest.mark.parametrize("source", ["demo", "cifar100"])
def test_shards_give_the_dataset_sample_for_sample(source, demo, cifar_shards, tiny_world):
    root, folder, patterns = ((demo / "images", demo / "shards", DEMO_SHARDS) if source == "demo"
                              else (tiny_world.data_root, cifar_shards, CIFAR_SHARDS))
    for split, pattern in patterns.items():
        packed = open_dataset("webdataset", str(folder / pattern), split)
        assert packed.name == "webdataset" and packed.split == split
        assert_same_samples(open_dataset(source, root, split), packed)


def test_original_image_files_are_copied_as_they_are(demo, tmp_path):
    assert run_cli(pack("demo", demo / "images", tmp_path, "--format", "original")) == 0
    original = open_dataset("demo", demo / "images", "train")
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        first = tar.extractfile(tar.getmembers()[1]).read()
    assert first == (demo / "images" / "train" / original.keys[0]).read_bytes()
    assert_same_samples(original, open_dataset("webdataset", str(tmp_path / DEMO_SHARDS["train"]), "train"))


class Images(torch.utils.data.Dataset):
    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.dataset.image(index)


def test_loader_workers_and_fsspec_urls_read_the_same_images(demo):
    demo_train = open_dataset("demo", demo / "images", "train")
    original = torch.stack([demo_train.image(i) for i in range(len(demo_train))])
    packed = open_dataset("webdataset", str(demo / "shards" / DEMO_SHARDS["train"]), "train")
    assert torch.equal(packed.image(63), original[63])  # the parent has a shard open when the workers start
    assert torch.equal(pickle.loads(pickle.dumps(packed)).image(5), original[5])
    loader = DataLoader(Images(packed), batch_size=8, num_workers=2)
    assert torch.equal(torch.cat(list(loader)), original)

    memory = fsspec.filesystem("memory")
    try:
        for path in (demo / "shards").iterdir():
            memory.pipe_file(f"/richkd-shards/{path.name}", path.read_bytes())
        in_memory = open_dataset("webdataset", "memory://richkd-shards/" + DEMO_SHARDS["train"], "train")
        assert in_memory.keys == packed.keys and np.array_equal(in_memory.labels, packed.labels)
        assert torch.equal(torch.stack([in_memory.image(i) for i in range(64)]), original)
        file_url = open_dataset("webdataset", (demo / "shards").as_uri() + "/" + DEMO_SHARDS["test"], "test")
        assert len(file_url) == 16
    finally:
        memory.rm("/richkd-shards", recursive=True)


def test_precompute_on_shards_matches_precompute_on_the_cifar_files(tiny_world, cifar_shards, tmp_path):
    (tmp_path / "templates.txt").write_text("a photo of a {}\n")  # one template: the text encoding is not under test
    templates = ("--templates", str(tmp_path / "templates.txt"))
    assert run_cli(tiny_world.precompute_args(tmp_path / "cifar.zarr", *templates)) == 0
    args = replace_flag(tiny_world.precompute_args(tmp_path / "shards.zarr", *templates), "--dataset", "webdataset")
    assert run_cli(replace_flag(args, "--data-root", str(cifar_shards / CIFAR_SHARDS["train"]))) == 0
    cifar, shards = (zarr.open_group(tmp_path / name, mode="r") for name in ("cifar.zarr", "shards.zarr"))
    for name in ("teacher/logits", "teacher/features", "clip/logits", "clip/image_embeds", "views/params", "labels"):
        assert np.array_equal(cifar[name][...], shards[name][...]), name
    assert shards["keys"][...].tolist() == cifar["keys"][...].tolist() == [str(i) for i in range(40)]
    assert shards.attrs["dataset"]["name"] == "webdataset"

    # The same samples in another order: distillation finds each one's row by its key.
    reversed_shards = "::".join(str(cifar_shards / f"train-{shard:06d}.tar") for shard in (2, 1, 0))
    distill = ["distill", "--cache", str(tmp_path / "cifar.zarr"), "--arch", "resnet8", "--variant", "LF",
               "--nce-k", "8", "--epochs", "1", "--batch-size", "8", "--eval-split", "train", "--num-workers", "0",
               "--device", "cpu"]
    assert run_cli([*distill, "--data-root", str(tiny_world.data_root), "--out", str(tmp_path / "files")]) == 0
    assert run_cli([*distill, "--dataset", "webdataset", "--data-root", reversed_shards,
                    "--out", str(tmp_path / "reversed")]) == 0
    files, _ = read_checkpoint(tmp_path / "files" / "checkpoints" / "last.pt")
    reordered, _ = read_checkpoint(tmp_path / "reversed" / "checkpoints" / "last.pt")
    for name in files:
        assert torch.equal(files[name], reordered[name]), name


def write_shard(path: Path, *samples: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with TarWriter(str(path), encoder=False) as writer:
        for sample in samples:
            writer.write(sample)


def png(side: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_shards(tmp_path, capsys):
    def read(pattern: str, *extra: str) -> list[str]:
        return ["pack", "--dataset", "webdataset", "--data-root", pattern, "--out", str(tmp_path / "out"), *extra]

    good = {"__key__": "a", "cls": b"1", "png": png()}
    missing = tmp_path / "nowhere" / "{split}-{000000..000001}.tar"
    assert_user_error(read(str(missing)), capsys, f"no shards match {missing} for split 'train': "
                      f"{tmp_path}/nowhere/train-000000.tar does not exist")
    assert_user_error(read("pipe:curl -s http://example.com/train-{0..1}.tar"), capsys,
                      "pipe: URLs cannot be read by index; give the shards' paths or fsspec URLs")
    assert_user_error(read(str(missing), "--download"), capsys,
                      "dataset 'webdataset' cannot be downloaded; point --data-root at its shards")

    write_shard(tmp_path / "one" / "train-000000.tar", good)
    assert_user_error(read(str(tmp_path / "one" / "train-{000000..000002}.tar")), capsys,
                      f"2 of the 3 shards of {tmp_path}/one/train-{{000000..000002}}.tar do not exist, e.g. ")
    assert_user_error(read(str(tmp_path / "one" / "train-000000.tar")), capsys,
                      f"no class names for the shards: {tmp_path}/one/classes.txt does not exist",
                      "one class name per line, in class-id order")

    (tmp_path / "one" / "classes.txt").write_text("\n")
    assert_user_error(read(str(tmp_path / "one" / "train-000000.tar")), capsys,
                      f"class names file {tmp_path}/one/classes.txt is empty: one class name per line, "
                      "in class-id order")
    (tmp_path / "one" / "classes.txt").write_text("zero\none\nzero\n")
    assert_user_error(read(str(tmp_path / "one" / "train-000000.tar")), capsys,
                      f"class names file {tmp_path}/one/classes.txt names zero more than once: each class once")
    (tmp_path / "one" / "classes.txt").write_text("zero\none\n")
    (tmp_path / "one" / "normalization.json").write_text('{"mean": [0.5], "std": [0.2, 0.2, 0.2]}')
    assert_user_error(read(str(tmp_path / "one" / "train-000000.tar")), capsys,
                      f"normalization file {tmp_path}/one/normalization.json must hold "
                      '{"mean": [r, g, b], "std": [r, g, b]}')

    cases = {
        "no_cls": ([{"__key__": "b", "png": png()}], lambda shard: f"sample 'b' in {shard} has no cls member"),
        "no_image": ([{"__key__": "b", "cls": b"0", "txt": b"hi"}],
                     lambda shard: f"sample 'b' in {shard} has no image member (.png, .jpg, .webp, ...)"),
        "bad_cls": ([good, {"__key__": "b", "cls": b"2", "png": png()}],
                    lambda shard: f"sample 'b' in {shard}: cls '2' is not a class id of its 2 class names (0 to 1)"),
        "bad_image": ([{"__key__": "b", "cls": b"0", "png": b"not a png"}],
                      lambda shard: f"cannot read image b in {shard}: "),
        "bomb": ([{"__key__": "b", "cls": b"0", "png": decompression_bomb_png()}],
                 lambda shard: f"cannot read image b in {shard}: it has more than 178,956,970 pixels, PIL's "
                               "decompression-bomb limit; resize it"),
        "twice": ([good, {"__key__": "b", "cls": b"0", "png": png()}, good],
                  lambda shard: f"sample key 'a' occurs twice: in {shard} and in {shard}"),
    }
    for name, (samples, message) in cases.items():
        shard = tmp_path / name / "train-000000.tar"
        write_shard(shard, *samples)
        (shard.parent / "classes.txt").write_text("zero\none\n")
        assert_user_error(read(str(shard)), capsys, message(shard))
    (tmp_path / "no_tar").mkdir()
    (tmp_path / "no_tar" / "train-000000.tar").write_bytes(b"this is not a tar file")
    (tmp_path / "no_tar" / "classes.txt").write_text("zero\n")
    assert_user_error(read(str(tmp_path / "no_tar" / "train-000000.tar")), capsys,
                      f"cannot read shard {tmp_path}/no_tar/train-000000.tar: ")


def test_pack_option_errors(tiny_world, tmp_path, capsys):
    assert_user_error(["pack", "--samples-per-shard", "0"], capsys, "--samples-per-shard must be at least 1, got 0")
    assert_user_error(["pack", "--format", "jpeg"], capsys, "--format must be png or original, got 'jpeg'")
    assert_user_error(pack("cifar100", tiny_world.data_root, tmp_path, "--format", "original"), capsys,
                      "--format original copies image files, and dataset 'cifar100' is not made of image files")


def test_a_shard_cut_short_where_a_sample_ends_is_refused(tiny_world, cifar_shards, tmp_path, capsys):
    """A copy that stopped between two samples leaves a tar that reads as a shorter one: indexed or streamed, the
    missing end-of-archive block gives it away, so no store is made from 39 of the 40 samples."""
    shards = tmp_path / "shards"
    shutil.copytree(cifar_shards, shards)
    cut_shard = shards / "train-000001.tar"
    with tarfile.open(cut_shard) as tar:
        last_sample = tar.getmembers()[-2]  # the last sample's first member (its cls and image are the last two)
    assert last_sample.name.endswith(".cls") or last_sample.name.endswith(".png")
    cut_shard.write_bytes(cut_shard.read_bytes()[:last_sample.offset])
    message = (f"shard {cut_shard} ends after {last_sample.offset:,} bytes without tar's end-of-archive block: it "
               "was cut short (by a copy or download that did not finish?); write or copy it again")

    args = replace_flag(tiny_world.precompute_args(tmp_path / "cache.zarr"), "--dataset", "webdataset")
    assert_user_error(replace_flag(args, "--data-root", str(shards / CIFAR_SHARDS["train"])), capsys, message)
    assert not (tmp_path / "cache.zarr").exists()
    for url in (str(cut_shard), f"pipe:cat {cut_shard}"):
        with pytest.raises(UserError, match="without tar's end-of-archive block"):
            list(stream_shard(url, 100))
    assert len(list(stream_shard(str(shards / "train-000000.tar"), 100))) == 16
