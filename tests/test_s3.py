"""Shards and stores on S3: the real s3fs client against moto's S3 server on localhost (no network).

The same commands as on local files: indexed shards read by byte ranges, a store written in two parts with
their lock files created by S3 conditional writes, streamed distillation from both.
"""

from __future__ import annotations

import logging

import fsspec
import numpy as np
import pytest
import s3fs
import zarr
from moto import server as moto_server
from test_bad_input import replace_flag
from test_shards import CIFAR_SHARDS, cifar_shards  # noqa: F401 (a fixture)
from test_streaming import store  # noqa: F401 (a fixture)

from richkd.cli import run_cli
from richkd.pipeline.models import read_checkpoint

BUCKET = "s3://richkd"


@pytest.fixture(scope="module")
def s3():
    """An S3 endpoint with an empty bucket; every S3 client of this process and its children uses it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                            ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_ENDPOINT_URL", f"http://{host}:{port}")):
            patch.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()
        filesystem = fsspec.filesystem("s3")
        filesystem.mkdir(BUCKET)
        yield filesystem
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_a_store_on_s3_written_in_parts_and_streamed_from(s3, tiny_world, cifar_shards, store, tmp_path):  # noqa: F811
    s3.put(f"{cifar_shards}/", f"{BUCKET}/shards/", recursive=True)
    shards = f"{BUCKET}/shards/{CIFAR_SHARDS['train']}"
    cache = f"{BUCKET}/cache.zarr"
    precompute = replace_flag(tiny_world.precompute_args(cache), "--dataset", "webdataset")  # as `store` was made
    precompute = replace_flag(replace_flag(precompute, "--data-root", shards), "--shard-size", "8")
    for part in ("0/2", "1/2"):
        assert run_cli([*precompute, "--part", part]) == 0
    assert s3.glob(f"{cache}/locks/*") == []  # every lock removed once its block was done
    on_s3, local = zarr.open_group(cache, mode="r"), zarr.open_group(store, mode="r")
    for name in ("teacher/logits", "teacher/features", "clip/logits", "clip/image_embeds", "views/params", "labels",
                 "keys", "progress/done"):
        assert np.array_equal(on_s3[name][...], local[name][...]), name
    assert run_cli(["inspect", cache, "--verify"]) == 0

    distill = ["distill", "--dataset", "webdataset", "--data-root", shards, "--cache", cache, "--arch", "resnet8",
               "--variant", "LF", "--nce-k", "8", "--batch-size", "8", "--epochs", "1", "--num-workers", "1",
               "--eval-split", "train", "--device", "cpu"]
    for mode in ((), ("--stream", "--val-fraction", "0")):
        assert run_cli([*distill, *mode, "--out", str(tmp_path / f"run{len(mode)}")]) == 0
        _, saved = read_checkpoint(tmp_path / f"run{len(mode)}" / "checkpoints" / "last.pt")
        assert saved["epoch"] == 1
