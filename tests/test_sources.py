"""A store's sources: more than two written in one pass, sources added to a finished store, logits-only sources, and
stores of schema 1 (a teacher and a CLIP) read and distilled as before."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import zarr
from conftest import FIXTURES, TINY_CLIP, TINY_CLIP_CONFIG, write_cifar100
from test_bad_input import assert_user_error
from test_resume import RICHKD, bundle_args

from richkd.cache.reader import CacheReader
from richkd.cli import run_cli
from richkd.pipeline.errors import UserError
from richkd.pipeline.models import create_model
from richkd.stages import precompute
from richkd.stages.precompute import write_shards

SCHEMA_ONE = FIXTURES / "schema1"


@pytest.fixture(scope="module")
def other_models(tmp_path_factory) -> dict[str, str]:
    """A second tiny CLIP (an open_clip local-dir bundle) and a second resnet8, with other weights than the world's."""
    root = tmp_path_factory.mktemp("other_models")
    torch.manual_seed(1)
    bundle = root / "clip_b"
    bundle.mkdir()
    (bundle / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CONFIG}))
    model = open_clip.create_model(TINY_CLIP)
    torch.save(model.state_dict(), bundle / "open_clip_pytorch_model.bin")
    torch.manual_seed(1)
    checkpoint = root / "teacher_b.pth"
    torch.save({"model": create_model("resnet8", 100).state_dict()}, checkpoint)
    return {"clip_b": f"clip_b=clip:local-dir:{bundle}", "teacher_b": f"teacher_b=classifier:resnet8@{checkpoint}"}


def store_files(store: Path, names) -> dict[Path, tuple[int, bytes]]:
    """Every chunk file of the arrays `names`, with its modification time and bytes."""
    return {path: (path.stat().st_mtime_ns, path.read_bytes()) for name in names
            for path in (store / name / "c").rglob("*") if path.is_file()}


def assert_same_store(a: Path, b: Path) -> None:
    """Array for array, and source record for source record (when and how a source was added aside)."""
    first, second = CacheReader(str(a)), CacheReader(str(b))
    assert first.specs == second.specs
    for name in first.specs:
        assert np.array_equal(first.array(name)[...], second.array(name)[...]), name
    for name, record in first.source_records.items():
        assert {k: v for k, v in record.items() if k != "added"} == \
            {k: v for k, v in second.source_records[name].items() if k != "added"}, name


def test_sources_added_to_a_finished_store_equal_those_written_in_one_pass(tiny_world, other_models, tmp_path,
                                                                          capsys):
    """Views with stored augmentation and cutmix (whose partners' views are replayed from the store too); the
    addition killed mid-way, then finished in two parts; the store's own arrays never rewritten."""
    data_root = tmp_path / "data"
    write_cifar100(data_root, train=160, test=8, seed=3)  # 2 views x 10 shards
    views = ["--augment", "trivialaugment", "--mix", "cutmix"]
    one_pass, added = tmp_path / "one_pass.zarr", tmp_path / "added.zarr"
    sources = [other_models["clip_b"], other_models["teacher_b"]]
    assert run_cli([*bundle_args(tiny_world, data_root, one_pass), *views,
                    *(arg for source in sources for arg in ("--source", source))]) == 0
    assert run_cli([*bundle_args(tiny_world, data_root, added), *views]) == 0
    own = CacheReader(str(added)).specs
    before = store_files(added, own)

    add = [*bundle_args(tiny_world, data_root, added), *(arg for source in sources for arg in ("--add-source", source))]
    process = subprocess.Popen([RICHKD, *add], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    flags = added / "teacher_b" / "done" / "c"
    deadline = time.monotonic() + 120
    while process.poll() is None and sum(1 for path in flags.rglob("*") if path.is_file()) < 6:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    assert not CacheReader(str(added)).done(("clip_b", "teacher_b")).all()
    capsys.readouterr()
    for part in ("0/2", "1/2"):
        assert run_cli([*add, "--part", part]) == 0
    assert "blocks already done" in capsys.readouterr().err

    assert store_files(added, own) == before
    assert_same_store(one_pass, added)
    reader = CacheReader(str(added))
    assert list(reader.sources) == ["teacher", "clip", "clip_b", "teacher_b"]
    assert reader.source_records["clip_b"]["added"]["config"]["add_source"] == sources
    assert run_cli(["inspect", str(added), "--verify"]) == 0
    # A source of the same name and another model is refused; the same command again has nothing left to do.
    other = [*bundle_args(tiny_world, data_root, added), "--add-source",
             f"teacher_b=classifier:resnet8@{tiny_world.teacher_checkpoint}"]
    capsys.readouterr()
    assert_user_error(other, capsys, f"cache {added} holds a source teacher_b made otherwise "
                      "(teacher_b.checkpoint_sha256: '", "now): give the new one another name")


def test_a_schema_one_store_is_read_and_distilled_as_before_and_takes_new_sources(tiny_world, other_models, tmp_path,
                                                                                   capsys):
    """The store and students of tests/fixtures/schema1 were written by richkd at 14f5550 (make_store.py there)."""
    store = tmp_path / "store.zarr"
    shutil.copytree(SCHEMA_ONE / "store.zarr", store)
    reader = CacheReader(str(store))
    assert reader.attrs["schema_version"] == 1 and list(reader.sources) == ["teacher", "clip"]
    students = json.loads((SCHEMA_ONE / "students.json").read_text())
    for variant, digest in students.items():
        run = tmp_path / f"run_{variant}"
        assert run_cli(["distill", "--dataset", "cifar100", "--data-root", str(tiny_world.data_root), "--cache",
                        str(store), "--arch", "resnet8", "--variant", variant, "--epochs", "2", "--batch-size", "8",
                        "--nce-k", "16", "--num-workers", "0", "--device", "cpu", "--out", str(run)]) == 0
        weights = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]
        sha256 = hashlib.sha256()
        for key in sorted(weights):
            sha256.update(key.encode())
            sha256.update(weights[key].numpy().tobytes())
        assert sha256.hexdigest() == digest, variant

    capsys.readouterr()
    assert_user_error(tiny_world.precompute_args(store), capsys, f"cache {store} has schema version 1, written by an "
                      "earlier richkd: it is read as it is and --add-source adds sources to it, but it is not "
                      "continued")
    own = {path: data for path, data in store_files(store, CacheReader(str(store)).specs).items()}
    args = tiny_world.precompute_args(store, "--add-source", other_models["clip_b"], "--outputs", "logits")
    assert run_cli(args) == 0
    reader = CacheReader(str(store))
    assert reader.attrs["schema_version"] == 2 and list(reader.sources) == ["teacher", "clip", "clip_b"]
    assert reader.sources["teacher"].done_flags == "progress/done" and reader.sources["clip_b"].features is None
    assert store_files(store, [name for name in reader.specs if not name.startswith("clip_b/")]) == own
    assert run_cli(["inspect", str(store), "--verify"]) == 0


def test_a_logits_only_store_holds_no_features(tiny_world, tmp_path):
    store = tmp_path / "logits.zarr"
    assert run_cli(tiny_world.precompute_args(store, "--outputs", "logits", "--topk", "5")) == 0
    names = {str(path.parent.relative_to(store)) for path in store.rglob("zarr.json")
             if json.loads(path.read_text())["node_type"] == "array"}
    assert names == {"labels", "keys", "views/params", "progress/done", "teacher/topk_logits", "teacher/topk_classes",
                     "teacher/done", "clip/topk_logits", "clip/topk_classes", "clip/class_embeds",
                     "clip/prompt_embeds", "clip/done"}
    assert {source.features for source in CacheReader(str(store)).sources.values()} == {None}


@pytest.mark.parametrize(("extra", "message"), [
    (["--source", "clip_b=clip"], "--source takes NAME=clip:MODEL[@WEIGHTS] or NAME=classifier:ARCH@CHECKPOINT, got "
                                  "'clip_b=clip'"),
    (["--source", "t2=classifier:resnet8"], "--source t2=classifier:resnet8: a classifier needs its checkpoint, as "
                                            "t2=classifier:resnet8@CHECKPOINT"),
    (["--source", "Big=clip:ViT-B-16@openai"], "source name 'Big' must be lower-case letters, digits and _"),
    (["--source", "clip=clip:ViT-B-16@openai"], "--source clip: teacher and clip name precompute's own teacher and "
                                                "CLIP; give the source another name"),
    (["--source", "b=clip:ViT-B-16@openai", "--source", "b=clip:ViT-B-32@openai"], "source name b is given twice"),
    (["--source", "b=clip:ViT-B-16@openai", "--add-source", "c=clip:ViT-B-16@openai"],
     "--source writes sources into a new store and --add-source into a finished one: give one of them"),
    (["--add-source", "b=clip:ViT-B-16@openai", "--stream", "--dataset", "webdataset"],
     "--add-source reads the images by index: leave out --stream"),
    (["--outputs", "some"], "--outputs must be all or logits, got 'some'"),
    (["--add-source", "b=clip:ViT-B-16@openai", "--overwrite"], "--overwrite replaces a whole store, and --add-source "
                                                                "keeps it: add a source made otherwise under another "
                                                                "name"),
    (["--source", f"b=clip:{TINY_CLIP}"], "source b: give the weights of CLIP richkd-test-tiny, as "
                                          "b=clip:richkd-test-tiny@TAG"),
    (["--source", "b=classifier:resnet8@missing.pth"], "source b's checkpoint missing.pth does not exist"),
])
def test_bad_sources_are_refused(tiny_world, tmp_path, capsys, extra, message):
    assert_user_error(tiny_world.precompute_args(tmp_path / "cache.zarr", *extra), capsys, message)


def test_sources_are_added_only_to_a_finished_store(tiny_world, tmp_path, capsys, monkeypatch):
    store = tmp_path / "cache.zarr"
    add = ["--add-source", f"b=clip:{TINY_CLIP}@{tiny_world.clip_checkpoint}"]
    assert_user_error(tiny_world.precompute_args(store, *add), capsys, f"no cache store at {store} to add sources to: "
                      "precompute it first")
    assert run_cli(tiny_world.precompute_args(store)) == 0
    with pytest.raises(UserError, match=f"cache {store} has no source 'b'; it holds teacher, clip"):
        CacheReader(str(store)).source("b")
    capsys.readouterr()
    assert_user_error(tiny_world.precompute_args(store, "--source", add[1]), capsys, f"cache {store} has no source b: "
                      "add it to the finished store with --add-source")

    # Another command adding another source at the same time rewrites the root attributes without this one's record:
    # the record is written again once the blocks are.
    def write_shards_then_lose_the_record(*args):
        write_shards(*args)
        group = zarr.open_group(store, mode="r+")
        group.attrs["sources"] = {name: record for name, record in group.attrs["sources"].items() if name != "b"}

    monkeypatch.setattr(precompute, "write_shards", write_shards_then_lose_the_record)
    assert run_cli(tiny_world.precompute_args(store, *add)) == 0
    assert list(CacheReader(str(store)).sources) == ["teacher", "clip", "b"]
    monkeypatch.undo()
    zarr.open_group(store, mode="r+")["progress/done"][1, 2] = False
    capsys.readouterr()
    assert_user_error(tiny_world.precompute_args(store, *add), capsys, f"cache {store} is unfinished: finish it with "
                      "its own precompute command before adding sources to it")
