"""The Python API: a store's fused targets in a plain training loop give richkd distill's step, bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from torch.utils.data import DataLoader

from richkd import CachedTargets, kd_loss
from richkd.cli import run_cli
from richkd.pipeline.errors import UserError
from richkd.pipeline.models import read_checkpoint
from richkd.pipeline.seeding import ORDER, seeded_generator, seeded_model

EXAMPLE = Path(__file__).parents[1] / "examples" / "train_timm.py"


@pytest.fixture(scope="module")
def store(tiny_world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("api") / "cache.zarr"
    assert run_cli(tiny_world.precompute_args(out)) == 0
    return out


def test_one_step_in_a_plain_loop_is_the_step_of_richkd_distill(tiny_world, store, tmp_path):
    run = tmp_path / "run"
    assert run_cli(["distill", "--dataset", "cifar100", "--data-root", str(tiny_world.data_root), "--cache", str(store),
                    "--variant", "L", "--alpha", "0.6", "--clip-scale", "clip", "--arch", "resnet8", "--epochs", "1",
                    "--batch-size", "40", "--val-fraction", "0", "--num-workers", "0", "--device", "cpu",
                    "--out", str(run)]) == 0

    targets = CachedTargets(str(store), "cifar100", str(tiny_world.data_root), variant="L", alpha=0.6,
                            clip_scale="clip")
    # distill's first epoch is one batch of the 40 samples: view 0, in the order of its seeded shuffle.
    order = torch.randperm(40, generator=seeded_generator(0, 0, ORDER)).tolist()
    batch = next(iter(DataLoader(targets, batch_size=40, sampler=order)))
    model = seeded_model("resnet8", 100, 0).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    logits, _ = model(batch["image"].contiguous(memory_format=torch.channels_last))
    loss = F.cross_entropy(logits, batch["label"]) + 3 * kd_loss(logits, batch["fused_logits"], 3.0)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    distilled, _ = read_checkpoint(run / "checkpoints" / "last.pt")
    for name, value in model.state_dict().items():
        assert torch.equal(value, distilled[name]), name
    logged = json.loads((run / "dvclive" / "metrics.json").read_text())["train"]
    assert logged["loss"] == pytest.approx(loss.item(), rel=1e-12)

    # The targets against the store read with zarr itself: z_F = 0.6 z_T + 0.4 exp(logit_scale) cosine.
    group = zarr.open_group(store, mode="r")
    scale = group.attrs["sources"]["clip"]["logit_scale"]
    expected = (0.6 * group["teacher/logits"][0].astype(np.float32)
                + 0.4 * (scale * group["clip/logits"][0].astype(np.float32)))
    np.testing.assert_allclose(batch["fused_logits"].numpy(), expected[order], rtol=1e-6, atol=1e-6)
    assert batch["row"].tolist() == order


def test_features_controls_and_views(tiny_world, store):
    group = zarr.open_group(store, mode="r")
    shrink = CachedTargets(str(store), "cifar100", str(tiny_world.data_root), variant="shrink", alpha=0.6,
                           features=True)
    shrink.set_epoch(3)  # view 3 mod 2
    item = shrink[5]
    assert torch.equal(item["fused_logits"], 0.6 * torch.from_numpy(group["teacher/logits"][1, 5].astype(np.float32)))
    for name in ("teacher/features", "clip/image_embeds"):
        assert torch.equal(item[name], torch.from_numpy(group[name][1, 5].astype(np.float32)))
    with pytest.raises(UserError, match="variant must be one with fused logits"):
        CachedTargets(str(store), "cifar100", str(tiny_world.data_root), variant="F")


def test_the_example_trains_a_timm_model(tiny_world, store, tmp_path):
    test_store = tmp_path / "test.zarr"
    assert run_cli(tiny_world.precompute_args(test_store, "--split", "test", "--views", "1",
                                              "--view-policy", "center")) == 0
    finished = subprocess.run(
        [sys.executable, str(EXAMPLE), "--store", str(store), "--test-store", str(test_store), "--dataset", "cifar100",
         "--data-root", str(tiny_world.data_root), "--model", "test_resnet", "--small-image-stem", "--epochs", "3",
         "--batch-size", "8",
         "--out", str(tmp_path / "student.pt")], capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    *epochs, held_out = finished.stdout.splitlines()
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    losses = [float(line.split("loss ")[1].split(",")[0]) for line in epochs]
    assert losses[-1] < losses[0], losses  # it learns: the 40 training images, at least
    assert held_out.startswith("test top-1: ") and held_out.endswith("% of 20 images (chance 1.0%)")
    saved = torch.load(tmp_path / "student.pt")
    assert saved["class_names"] == tiny_world.class_names and "fc.weight" in saved["model"]
