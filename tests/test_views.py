"""View parameters: sampled once per (seed, view, sample), and replayed to the same pixels anywhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from PIL import ExifTags, Image
from test_bad_input import assert_user_error, replace_flag

from richkd import CachedTargets
from richkd.cli import run_cli
from richkd.pipeline.datasets import open_dataset
from richkd.pipeline.errors import UserError
from richkd.pipeline.models import create_model, read_checkpoint
from richkd.pipeline.shards import decode_image
from richkd.pipeline.views import (
    PadCrop,
    ResizedCrop,
    describe_policy,
    make_view_policy,
    policy_from_description,
    sample_view,
)


def test_parameters_depend_only_on_seed_view_and_sample():
    policy = PadCrop(size=32)
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    first = [sample_view(policy, 0, 1, i, image) for i in range(200)]
    again = [sample_view(policy, 0, 1, i, image) for i in reversed(range(200))][::-1]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    other_view = [sample_view(policy, 0, 2, i, image) for i in range(200)]
    other_seed = [sample_view(policy, 1, 1, i, image) for i in range(200)]
    assert not np.array_equal(first, other_view) and not np.array_equal(first, other_seed)
    params = np.stack(first)
    # RandomCrop(32, padding=4): every offset in [-4, 4] occurs, and both flips, about half each.
    assert set(params[:, 0]) == set(range(-4, 5)) and set(params[:, 1]) == set(range(-4, 5))
    assert 70 < params[:, 2].sum() < 130


def test_pad_crop_replay_is_zero_padding_then_crop_then_flip():
    rng = np.random.default_rng(0)
    image = rng.integers(1, 256, (3, 32, 32), dtype=np.uint8)
    padded = np.pad(image, ((0, 0), (4, 4), (4, 4)))
    policy = PadCrop(size=32)
    for top in range(-4, 5):
        for left in (-4, 0, 3):
            for flip in (0, 1):
                expected = padded[:, top + 4: top + 36, left + 4: left + 36]
                expected = expected[:, :, ::-1] if flip else expected
                replayed = policy.replay(torch.from_numpy(image), (top, left, flip))
                assert replayed.dtype == torch.uint8
                assert np.array_equal(replayed.numpy(), expected)


def test_resized_crop_boxes_follow_random_resized_crop():
    policy = ResizedCrop(size=24)
    image = torch.zeros(3, 60, 90, dtype=torch.uint8)
    boxes = np.stack([sample_view(policy, 3, 0, i, image) for i in range(500)])
    top, left, height, width, flip = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= 60).all() and (left + width <= 90).all()
    area = height * width / (60 * 90)
    assert area.min() >= 0.07 and area.max() <= 1.0 and area.min() < 0.2 and area.max() > 0.8
    aspect = width / height
    assert aspect.min() >= 0.7 and aspect.max() <= 1.4
    assert set(flip) == {0, 1}


def test_resized_crop_replay_is_crop_then_antialiased_resize():
    rng = np.random.default_rng(1)
    image = torch.from_numpy(rng.integers(0, 256, (3, 50, 70), dtype=np.uint8))
    replayed = ResizedCrop(size=24).replay(image, (5, 9, 30, 40, 1))
    crop = image[:, 5:35, 9:49].float()[None]
    expected = F.interpolate(crop, size=(24, 24), mode="bilinear", antialias=True, align_corners=False)
    expected = expected.round().clamp(0, 255)[0].flip(-1)
    assert replayed.shape == (3, 24, 24)
    assert (replayed.float() - expected).abs().max() <= 1  # uint8 kernels round once, floats at the end


def test_policy_choice_and_round_trip():
    assert make_view_policy("auto", 32, None) == PadCrop(size=32)
    assert make_view_policy("auto", None, None) == ResizedCrop(size=224)
    assert make_view_policy("resized_crop", 32, 64) == ResizedCrop(size=64)
    for policy in (PadCrop(size=32), ResizedCrop(size=96)):
        description = {**describe_policy(policy), "seed": 0, "count": 4}
        assert policy_from_description(description) == policy


def write_folder(root, sides: list[int]) -> None:
    rng = np.random.default_rng(0)
    for index, side in enumerate(sides):
        folder = root / "train" / ("cat" if index % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{index:03d}.png")


def test_an_image_folder_of_small_images_is_pad_cropped_at_its_own_size(tmp_path, capsys):
    write_folder(tmp_path / "small", [32] * 40)
    train = ["train", "--dataset", "imagefolder", "--eval-split", "train", "--arch", "resnet8", "--epochs", "1",
             "--batch-size", "16", "--num-workers", "0", "--device", "cpu"]
    assert run_cli([*train, "--data-root", str(tmp_path / "small"), "--out", str(tmp_path / "run")]) == 0
    assert "views: pad-crop to 32 px, padding 4, and flips (the images are 32 x 32)" in capsys.readouterr().err
    policy = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")[1]["view_policy"]
    assert (policy["policy"], policy["size"], policy["padding"]) == ("pad_crop", 32, 4)

    write_folder(tmp_path / "mixed", [32, 40, 48] * 4)
    assert open_dataset("imagefolder", tmp_path / "mixed", "train").native_size is None
    # One odd image that the sample of sizes misses would be pad-cropped at another scale: it is refused when it
    # is read, with what to do; resized crops take it as it is.
    write_folder(tmp_path / "odd", [32] * 38 + [40, 32])  # dog/038.png, the last path: not in the sample
    odd = [*train, "--data-root", str(tmp_path / "odd")]
    assert run_cli([*odd, "--out", str(tmp_path / "odd_run")]) == 2
    assert ("error: image dog/038.png of the train split is 40 x 40 where the images sampled are 32 x 32, the side "
            "pad_crop views are cut at: give every image one size, or pass --view-policy resized_crop"
            ) in " ".join(capsys.readouterr().err.split())
    resized = ["--view-policy", "resized_crop", "--image-size", "32", "--out", str(tmp_path / "resized")]
    assert run_cli([*odd, *resized]) == 0


def test_a_store_refuses_images_of_another_size_than_its_views_were_cut_from(tiny_world, tmp_path, capsys):
    """The same keys and labels at 32 px as a store precomputed at 16 px: each stored crop would cut other pixels."""
    write_folder(tmp_path / "small", [16] * 8)
    write_folder(tmp_path / "large", [32] * 8)
    teacher = tmp_path / "teacher.pth"
    torch.save(create_model("resnet8", 2).state_dict(), teacher)
    store = tmp_path / "cache.zarr"
    precompute = tiny_world.precompute_args(store, "--views", "1")
    for flag, value in (("--dataset", "imagefolder"), ("--data-root", str(tmp_path / "small")),
                        ("--teacher-checkpoint", str(teacher))):
        precompute = replace_flag(precompute, flag, value)
    assert run_cli(precompute) == 0
    capsys.readouterr()

    assert_user_error(["distill", "--dataset", "imagefolder", "--data-root", str(tmp_path / "large"), "--cache",
                       str(store), "--eval-split", "train", "--arch", "resnet8", "--epochs", "1", "--num-workers", "0",
                       "--device", "cpu", "--out", str(tmp_path / "run")], capsys,
                      f"cache {store} was precomputed from 16 x 16 images, and the train split given has 32 x 32 "
                      "images: its stored views would be cut from other pixels; give it the images it was "
                      "precomputed from, or precompute again from these")
    with pytest.raises(UserError, match="was precomputed from 16 x 16 images, and the train split given has 32 x 32"):
        CachedTargets(str(store), "imagefolder", str(tmp_path / "large"))
    assert len(CachedTargets(str(store), "imagefolder", str(tmp_path / "small"))) == 8
    # A store made before stores recorded the side (schema 1) is read unchecked.
    group = zarr.open_group(store, mode="r+")
    group.attrs["dataset"] = {key: value for key, value in group.attrs["dataset"].items() if key != "image_size"}
    assert len(CachedTargets(str(store), "imagefolder", str(tmp_path / "large"))) == 8


def test_images_are_read_turned_by_their_exif_orientation(tmp_path, capsys):
    """A photo stored on its side with an EXIF orientation is learnt upright, and a size error gives the size a
    viewer shows: 30 x 40 for one stored 40 wide and 30 high with orientation 6 (turn 90 degrees clockwise)."""
    write_folder(tmp_path / "odd", [32] * 40)
    (tmp_path / "odd" / "train" / "dog" / "038.png").unlink()  # the last path: not in the sample of sizes
    on_its_side = tmp_path / "odd" / "train" / "dog" / "038.jpg"
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    Image.new("RGB", (40, 30), "red").save(on_its_side, exif=exif)
    dataset = open_dataset("imagefolder", tmp_path / "odd", "train")
    assert dataset.image(dataset.keys.index("dog/038.jpg")).shape == (3, 40, 30)
    assert decode_image(on_its_side.read_bytes(), "038.jpg").shape == (3, 40, 30)  # as read from a shard
    assert run_cli(["train", "--dataset", "imagefolder", "--data-root", str(tmp_path / "odd"), "--eval-split", "train",
                    "--arch", "resnet8", "--epochs", "1", "--batch-size", "16", "--num-workers", "0", "--device", "cpu",
                    "--out", str(tmp_path / "run")]) == 2
    assert "error: image dog/038.jpg of the train split is 30 x 40 where the images sampled are 32 x 32" in \
        " ".join(capsys.readouterr().err.split())
