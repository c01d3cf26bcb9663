"""`richkd precompute` end to end on a CIFAR-100 folder in torchvision's format, read back with zarr itself."""

from __future__ import annotations

import json
import pickle

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import zarr
from conftest import TINY_CLIP

from richkd.cli import run_cli
from richkd.pipeline.models import create_model, load_checkpoint, read_checkpoint
from richkd.pipeline.normalization import given_normalization

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
TEMPLATES = ("a photo of a {}", "a sketch of a {}")


@pytest.fixture(scope="module")
def store(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("precompute") / "cache.zarr"
    templates = out.parent / "templates.txt"
    templates.write_text("# two templates\n" + "\n".join(TEMPLATES) + "\n")
    assert run_cli(tiny_world.precompute_args(out, "--dtype", "float32", "--templates", str(templates))) == 0
    return out


def raw_cifar(tiny_world, split="train"):
    with open(tiny_world.data_root / "cifar-100-python" / split, "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    return batch["data"].reshape(-1, 3, 32, 32), np.asarray(batch["fine_labels"])


def replay_by_hand(image: np.ndarray, top: int, left: int, flip: int) -> np.ndarray:
    """RandomCrop(32, padding=4) + flip, written with numpy: zero-pad, cut, mirror."""
    padded = np.pad(image, ((0, 0), (4, 4), (4, 4)))
    view = padded[:, top + 4: top + 36, left + 4: left + 36]
    return view[:, :, ::-1] if flip else view


def test_store_follows_the_schema(store, tiny_world):
    group = zarr.open_group(store, mode="r")
    expected = {
        "labels": ((40,), "int64"),
        "views/params": ((2, 40, 3), "int32"),
        "teacher/logits": ((2, 40, 100), "float32"),
        "teacher/features": ((2, 40, 64), "float32"),
        "clip/image_embeds": ((2, 40, 32), "float32"),
        "clip/logits": ((2, 40, 100), "float32"),
        "clip/class_embeds": ((100, 32), "float32"),
        "clip/prompt_embeds": ((100, 2, 32), "float32"),
        "progress/done": ((2, 3), "bool"),
        "teacher/done": ((2, 3), "bool"),
        "clip/done": ((2, 3), "bool"),
    }
    for name, (shape, dtype) in expected.items():
        assert group[name].shape == shape, name
        assert str(group[name].dtype) == dtype, name
    assert group["keys"][:].tolist() == [str(i) for i in range(40)]
    assert all(group[flags][...].all() for flags in ("progress/done", "teacher/done", "clip/done"))

    metadata = json.loads((store / "teacher" / "logits" / "zarr.json").read_text())
    sharding = metadata["codecs"][0]
    assert sharding["name"] == "sharding_indexed"
    assert metadata["chunk_grid"]["configuration"]["chunk_shape"] == [1, 16, 100]
    inner = [codec["name"] for codec in sharding["configuration"]["codecs"]]
    assert inner == ["bytes", "blosc", "crc32c"]
    assert sharding["configuration"]["codecs"][1]["configuration"]["cname"] == "zstd"

    attrs = group.attrs.asdict()
    assert attrs["format"] == "richkd-cache"
    assert attrs["dataset"]["name"] == "cifar100" and attrs["dataset"]["num_samples"] == 40
    assert attrs["dataset"]["class_names"] == tiny_world.class_names
    assert attrs["views"] == {"policy": "pad_crop", "param_names": ["top", "left", "flip"], "size": 32,
                              "padding": 4, "seed": 0, "count": 2}
    teacher, clip = attrs["sources"]["teacher"], attrs["sources"]["clip"]
    assert teacher["arch"] == "resnet8" and len(teacher["checkpoint_sha256"]) == 64 and teacher["kind"] == "classifier"
    assert clip["model"] == TINY_CLIP and clip["templates"] == list(TEMPLATES) and clip["kind"] == "clip"
    assert clip["class_names"][3] == "thing 03"  # underscores read as spaces in prompts
    assert attrs["layout"]["precision"] == "float32"
    assert {"torch", "zarr", "open_clip_torch"} <= set(attrs["software"])


def test_cached_outputs_are_the_models_outputs_on_the_replayed_pixels(store, tiny_world):
    """Recompute everything from the raw pickle and the stored view parameters, without richkd's data path."""
    group = zarr.open_group(store, mode="r")
    images, labels = raw_cifar(tiny_world)
    assert np.array_equal(group["labels"][:], labels)
    params = group["views/params"][...]
    assert params[..., :2].min() >= -4 and params[..., :2].max() <= 4 and set(np.unique(params[..., 2])) <= {0, 1}
    assert not np.array_equal(params[0], params[1])

    teacher = create_model("resnet8", 100)
    load_checkpoint(teacher, tiny_world.teacher_checkpoint)
    teacher.eval()
    clip = open_clip.create_model(TINY_CLIP, pretrained=str(tiny_world.clip_checkpoint)).eval()
    mean, std = torch.tensor(CIFAR100_MEAN)[:, None, None], torch.tensor(CIFAR100_STD)[:, None, None]
    clip_mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN)[:, None, None]
    clip_std = torch.tensor(open_clip.OPENAI_DATASET_STD)[:, None, None]
    for view in range(2):
        pixels = torch.from_numpy(np.stack([replay_by_hand(images[i], *params[view, i]) for i in range(40)]).copy())
        x = pixels.float() / 255
        with torch.no_grad():
            logits, features = teacher((x - mean) / std)
            clip_x = F.interpolate(x, size=(40, 40), mode="bicubic", antialias=True, align_corners=False)
            embeds = F.normalize(clip.encode_image((clip_x - clip_mean) / clip_std), dim=-1)
        np.testing.assert_allclose(group["teacher/logits"][view], logits.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(group["teacher/features"][view], features.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(group["clip/image_embeds"][view], embeds.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(group["clip/logits"][view], group["clip/image_embeds"][view]
                                   @ group["clip/class_embeds"][...].T, rtol=1e-5, atol=1e-6)


def test_class_embeddings_are_the_prompt_ensemble(store, tiny_world):
    group = zarr.open_group(store, mode="r")
    clip = open_clip.create_model(TINY_CLIP, pretrained=str(tiny_world.clip_checkpoint)).eval()
    tokenizer = open_clip.get_tokenizer(TINY_CLIP)
    names = [name.replace("_", " ") for name in tiny_world.class_names]
    with torch.no_grad():
        per_template = torch.stack([
            F.normalize(clip.encode_text(tokenizer([t.format(n) for n in names])), dim=-1) for t in TEMPLATES], dim=1)
    ensemble = F.normalize(per_template.mean(dim=1), dim=-1)
    np.testing.assert_allclose(group["clip/prompt_embeds"][...], per_template.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(group["clip/class_embeds"][...], ensemble.numpy(), rtol=1e-4, atol=1e-5)


def test_float16_is_the_default_and_matches_float32(store, tiny_world, tmp_path):
    out = tmp_path / "half.zarr"
    templates = store.parent / "templates.txt"
    assert run_cli(tiny_world.precompute_args(out, "--templates", str(templates))) == 0
    half, full = zarr.open_group(out, mode="r"), zarr.open_group(store, mode="r")
    for name in ("teacher/logits", "teacher/features", "clip/image_embeds", "clip/logits"):
        assert half[name].dtype == np.float16
        np.testing.assert_array_equal(half[name][...], full[name][...].astype(np.float16))
    assert np.array_equal(half["views/params"][...], full["views/params"][...])


def test_params_file_fills_the_config_and_flags_win(tiny_world, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("precompute:\n  views: 3\n  seed: 5\n  shard_size: 32\nother_stage:\n  alpha: 0.1\n")
    out = tmp_path / "cache.zarr"
    assert run_cli([*tiny_world.precompute_args(out), "--config", str(params), "--seed", "7"]) == 0
    attrs = zarr.open_group(out, mode="r").attrs.asdict()
    # precompute_args passes --views 2 and --shard-size 16 on the command line: flags beat the file.
    assert (attrs["views"]["count"], attrs["views"]["seed"], attrs["layout"]["shard_size"]) == (2, 7, 16)
    assert attrs["config"]["views"] == 2 and attrs["config"]["seed"] == 7

    bare = [arg for arg in tiny_world.precompute_args(out) if arg not in ("--views", "2")]
    assert run_cli([*bare, "--config", str(params), "--overwrite"]) == 0
    attrs = zarr.open_group(out, mode="r").attrs.asdict()
    assert (attrs["views"]["count"], attrs["views"]["seed"]) == (3, 5)


def test_class_names_file_and_raw_names(tiny_world, tmp_path):
    names = [f"Kind_{i}" for i in range(100)]
    names_file = tmp_path / "names.txt"
    names_file.write_text("\n".join(names))
    out = tmp_path / "cache.zarr"
    assert run_cli(tiny_world.precompute_args(out, "--class-names", str(names_file), "--raw-class-names")) == 0
    clip = zarr.open_group(out, mode="r").attrs["sources"]["clip"]
    assert clip["class_names"] == names
    assert clip["templates"][0] == "a photo of a {}" and len(clip["templates"]) == 12


def test_image_folder_with_resized_crops(tiny_world, tmp_path):
    """Images of several sizes: keys are relative paths and the stored boxes replay to the teacher's pixels."""
    from PIL import Image

    from richkd.pipeline.views import ResizedCrop

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for name in ("cat", "dog"):
        (root / "train" / name).mkdir(parents=True)
        for i in range(5):
            pixels = rng.integers(0, 256, (30 + 7 * i, 50 - 3 * i, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / name / f"{name}{i}.png")
    teacher = create_model("resnet8", 2)
    checkpoint = tmp_path / "teacher.pth"
    torch.save(teacher.state_dict(), checkpoint)
    args = tiny_world.precompute_args(tmp_path / "cache.zarr", "--image-size", "24", "--dtype", "float32")
    for flag, value in (("--dataset", "imagefolder"), ("--data-root", str(root)),
                        ("--teacher-checkpoint", str(checkpoint))):
        args[args.index(flag) + 1] = value
    assert run_cli(args) == 0

    group = zarr.open_group(tmp_path / "cache.zarr", mode="r")
    keys = group["keys"][:].tolist()
    assert keys == [f"{name}/{name}{i}.png" for name in ("cat", "dog") for i in range(5)]
    assert group["labels"][:].tolist() == [0] * 5 + [1] * 5
    assert group.attrs["views"]["policy"] == "resized_crop" and group.attrs["views"]["size"] == 24
    params = group["views/params"][...]
    assert params.shape == (2, 10, 5)

    teacher.eval()
    mean = torch.tensor((0.485, 0.456, 0.406))[:, None, None]
    std = torch.tensor((0.229, 0.224, 0.225))[:, None, None]
    policy = ResizedCrop(size=24)
    for view in range(2):
        views = []
        for i, key in enumerate(keys):
            image = torch.from_numpy(np.array(Image.open(root / "train" / key).convert("RGB"))).permute(2, 0, 1)
            top, left, height, width, _ = params[view, i]
            assert 0 <= top and top + height <= image.shape[1] and 0 <= left and left + width <= image.shape[2]
            views.append(policy.replay(image, params[view, i]))
        with torch.no_grad():
            logits, _ = teacher((torch.stack(views).float() / 255 - mean) / std)
        np.testing.assert_allclose(group["teacher/logits"][view], logits.numpy(), rtol=1e-5, atol=1e-5)


def test_cifar10_in_five_batch_files(tiny_world, tmp_path):
    from richkd.pipeline.data import write_cifar
    from richkd.pipeline.datasets import open_dataset

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (23, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 23)
    write_cifar(tmp_path, "cifar10", {"train": (images, labels), "test": (images[:4], labels[:4])},
                [f"c{i}" for i in range(10)])
    assert len(list((tmp_path / "cifar-10-batches-py").glob("data_batch_*"))) == 5
    train = open_dataset("cifar10", tmp_path, "train")
    assert len(train) == 23 and train.labels.tolist() == labels.tolist()
    assert torch.equal(train.image(7), torch.from_numpy(images[7]).permute(2, 0, 1))
    assert len(open_dataset("cifar10", tmp_path, "test")) == 4


def test_normalization_travels_from_the_teacher_checkpoint_to_the_store_student_and_evaluate(tiny_world, tmp_path,
                                                                                             capsys):
    """A teacher trained with `--normalize dataset`: every later stage feeds it, and by default its students, the
    statistics measured on its training images, and refuses to feed it others."""
    images, _ = raw_cifar(tiny_world)
    pixels = images.transpose(1, 0, 2, 3).reshape(3, -1) / 255
    common = ["--dataset", "cifar100", "--data-root", str(tiny_world.data_root), "--num-workers", "0",
              "--device", "cpu"]
    training = [*common, "--arch", "resnet8", "--epochs", "1", "--batch-size", "20", "--val-fraction", "0"]
    assert run_cli(["train", *training, "--normalize", "dataset", "--out", str(tmp_path / "teacher")]) == 0
    assert "normalization: measured on 40 images of train, mean (" in capsys.readouterr().err
    teacher_checkpoint = tmp_path / "teacher" / "checkpoints" / "last.pt"
    measured = read_checkpoint(teacher_checkpoint)[1]["normalization"]
    np.testing.assert_allclose(measured["mean"], pixels.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(measured["std"], pixels.std(axis=1), rtol=1e-12)

    args = tiny_world.precompute_args(tmp_path / "cache.zarr", "--dtype", "float32")
    args[args.index("--teacher-checkpoint") + 1] = str(teacher_checkpoint)
    assert run_cli([*args, "--normalize", "imagenet"]) == 2
    assert (f"error: teacher checkpoint {teacher_checkpoint} was trained on inputs normalised with mean "
            in " ".join(capsys.readouterr().err.split()))
    assert not (tmp_path / "cache.zarr").exists()
    assert run_cli(args) == 0
    group = zarr.open_group(tmp_path / "cache.zarr", mode="r")
    assert group.attrs["sources"]["teacher"]["input_transform"] == measured
    teacher = create_model("resnet8", 100)
    load_checkpoint(teacher, teacher_checkpoint)
    mean, std = (torch.tensor(measured[name], dtype=torch.float32)[:, None, None] for name in ("mean", "std"))
    params = group["views/params"][0]
    x = torch.from_numpy(np.stack([replay_by_hand(images[i], *params[i]) for i in range(40)]).copy()).float() / 255
    with torch.no_grad():
        logits, _ = teacher.eval()((x - mean) / std)
    np.testing.assert_allclose(group["teacher/logits"][0], logits.numpy(), rtol=1e-5, atol=1e-5)

    distill = ["distill", *training, "--cache", str(tmp_path / "cache.zarr"), "--nce-k", "16"]
    assert run_cli([*distill, "--out", str(tmp_path / "student")]) == 0
    student_checkpoint = tmp_path / "student" / "checkpoints" / "last.pt"
    assert read_checkpoint(student_checkpoint)[1]["normalization"] == measured
    assert run_cli([*distill, "--normalize", "clip", "--out", str(tmp_path / "clip_student")]) == 0
    assert read_checkpoint(tmp_path / "clip_student" / "checkpoints" / "last.pt")[1]["normalization"] == {
        "mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}

    evaluate = ["evaluate", *common, "--checkpoint", str(student_checkpoint), "--json"]
    capsys.readouterr()
    assert run_cli([*evaluate, "--normalize", "0.5,0.25"]) == 2
    assert "--normalize 0.5,0.25 gives mean (0.5, 0.5, 0.5), std (0.25, 0.25, 0.25)" in capsys.readouterr().err
    assert run_cli(evaluate) == 0
    assert json.loads(capsys.readouterr().out)["normalization"] == measured


@pytest.mark.parametrize("spec, message", [
    ("0.5", "--normalize must be auto, dataset, imagenet, clip or MEAN,STD numbers (2 or 6 of them), got '0.5'"),
    ("0.5,0", "--normalize 0.5,0: every std must be positive"),
    ("imagenett", "--normalize must be auto, dataset, imagenet, clip or MEAN,STD numbers"),
])
def test_bad_normalization_is_refused(tiny_world, tmp_path, capsys, spec, message):
    assert run_cli(tiny_world.precompute_args(tmp_path / "cache.zarr", "--normalize", spec)) == 2
    assert f"error: {message}" in capsys.readouterr().err


def test_six_numbers_are_a_mean_and_a_std_per_channel():
    given = given_normalization("0.1,0.2,0.3,0.4,0.5,6e-1")
    assert (given.mean, given.std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
