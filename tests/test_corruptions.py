"""The common corruptions: the published parameters, checked independently; determinism; damage that grows with
severity; the published CIFAR-10-C layout; `richkd evaluate --corruptions` and its report, end to end."""

from __future__ import annotations

import colorsys
import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from richkd.cli import run_cli
from richkd.pipeline.corruptions import (
    CORRUPTIONS,
    PublishedCorruptions,
    corrupt,
    parameter_set,
    parse_corruptions,
    parse_severities,
)
from richkd.pipeline.datasets import open_dataset
from richkd.pipeline.errors import UserError
from richkd.pipeline.models import read_checkpoint

RANDOM = {
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "glass_blur",
    "motion_blur",
    "snow",
    "frost",
    "fog",
    "elastic_transform",
}


def natural_images(count: int, side: int, seed: int = 0) -> torch.Tensor:
    """Smooth colour fields with a little texture, on 8-bit levels: closer to photographs than uniform noise."""
    generator = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(
        torch.rand(count, 3, 6, 6, generator=generator), size=(side, side), mode="bicubic", align_corners=False
    )
    texture = 0.06 * torch.randn(count, 3, side, side, generator=generator)
    return ((smooth + texture).clamp(0, 1) * 255).round() / 255


def grey(count: int, side: int, level: float = 0.5) -> torch.Tensor:
    """Flat images on the 8-bit level nearest `level` (so rounding the output leaves them as they are)."""
    return torch.full((count, 3, side, side), round(255 * level) / 255)


def damage(images: torch.Tensor, name: str, severity: int) -> float:
    return (corrupt(images, name, severity, seed=0) - images).abs().mean().item()


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_same_images_for_a_seed_whatever_the_batches(name):
    """An image's corruption depends on (seed, severity, its index) only: not on its batch or the batch order."""
    for side, severity, count in ((32, 1, 7), (32, 5, 7), (68, 5, 4)):
        images = natural_images(count, side, seed=side)
        indices = [100 + i for i in range(count)]
        whole = corrupt(images, name, severity, seed=3, indices=indices)
        assert whole.shape == images.shape and whole.dtype == torch.float32
        assert whole.min() >= 0 and whole.max() <= 1
        assert torch.equal(whole, (whole * 255).round() / 255), "not on 8-bit levels"
        order = [3, 2, 0]
        rest = [i for i in range(count) if i not in order]
        first = corrupt(images[order], name, severity, seed=3, indices=[indices[i] for i in order])
        second = corrupt(images[rest], name, severity, seed=3, indices=[indices[i] for i in rest])
        assert torch.equal(first, whole[order]) and torch.equal(second, whole[rest])
        other_seed = corrupt(images, name, severity, seed=4, indices=indices)
        assert torch.equal(other_seed, whole) == (name not in RANDOM), "seeds must matter exactly when random"
    as_double = corrupt(images.double(), name, 5, seed=3, indices=indices)
    assert as_double.dtype == torch.float64 and torch.allclose(as_double.float(), whole)


# Pixel damage grows at every step where the published parameters strengthen the corruption at every step.
# Elsewhere the published steps trade one thing against another (glass blur: blur against shuffling; frost:
# the image's weight against the frost's; motion blur: severities 3 and 4 differ by kernel taps of weight
# 0.002), so only severity 5 against 1 is checked. Elastic is left out: its published severity 1 is a large
# affine jitter, severity 5 a fine non-rigid field, and pixel damage falls with severity.
GROWING_CIFAR = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "zoom_blur",
    "snow",
    "fog",
    "brightness",
    "contrast",
    "pixelate",
    "jpeg_compression",
)
GROWING_IMAGENET = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "zoom_blur",
    "brightness",
    "contrast",
    "pixelate",
    "jpeg_compression",
)


@pytest.mark.parametrize("name", [name for name in CORRUPTIONS if name != "elastic_transform"])
def test_damage_grows_with_severity(name):
    images = natural_images(16, 32)
    cifar = [damage(images, name, severity) for severity in range(1, 6)]
    assert cifar[4] > cifar[0] > 0, cifar
    if name in GROWING_CIFAR:
        assert all(a < b for a, b in zip(cifar, cifar[1:])), cifar
    if name in GROWING_IMAGENET:
        large = natural_images(3, 68)
        imagenet = [damage(large, name, severity) for severity in range(1, 6)]
        assert all(a < b for a, b in zip(imagenet, imagenet[1:])), imagenet


def test_the_size_threshold():
    assert parameter_set(32, 32) == parameter_set(64, 64) == parameter_set(64, 40) == "cifar"
    assert parameter_set(65, 65) == parameter_set(224, 224) == "imagenet"


@pytest.mark.parametrize("side, severity, std", [(32, 3, 0.08), (32, 5, 0.10), (72, 3, 0.18)])
def test_gaussian_noise_has_the_published_spread(side, severity, std):
    images = grey(8, side)
    noise = corrupt(images, "gaussian_noise", severity) - images
    clipped = math.erfc(0.5 / std / math.sqrt(2))  # share beyond 0 or 1, which clipping pulls in
    assert noise.mean().abs() < 0.003
    assert noise.std().item() == pytest.approx(std, rel=0.02 + clipped)


@pytest.mark.parametrize("side, severity, photons", [(32, 5, 50), (72, 1, 60)])
def test_shot_noise_is_poisson_with_the_published_photon_count(side, severity, photons):
    images = grey(8, side, 0.4)
    noisy = corrupt(images, "shot_noise", severity)
    assert noisy.mean().item() == pytest.approx(0.4, abs=0.004)
    assert noisy.var().item() == pytest.approx(0.4 / photons, rel=0.05)


@pytest.mark.parametrize("side, severity, amount", [(32, 1, 0.01), (32, 5, 0.07), (72, 5, 0.27)])
def test_impulse_noise_flips_the_published_share_to_black_or_white(side, severity, amount):
    images = grey(8, side)
    noisy = corrupt(images, "impulse_noise", severity)
    changed = noisy != images
    assert changed.float().mean().item() == pytest.approx(amount, rel=0.1)
    assert set(noisy[changed].unique().tolist()) == {0.0, 1.0}
    assert (noisy[changed] == 1).float().mean().item() == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("side, severity, shift", [(32, 3, 0.15), (72, 3, 0.3)])
def test_brightness_raises_hsv_value(side, severity, shift):
    images = natural_images(2, side)
    images[0, :, 0, 0] = 0  # black: no hue
    out = corrupt(images, "brightness", severity)
    for n, row, col in ((0, 0, 0), (0, 5, 7), (1, 20, 3), (1, side - 1, side - 1)):
        h, s, v = colorsys.rgb_to_hsv(*images[n, :, row, col].tolist())
        expected = colorsys.hsv_to_rgb(h, s, min(v + shift, 1.0))
        # One 8-bit level apart at most: float32 here, float64 in colorsys, rounding at .5 either way.
        assert out[n, :, row, col].tolist() == pytest.approx(list(expected), abs=0.5 / 255 + 1e-6)


@pytest.mark.parametrize("side, severity, factor", [(32, 1, 0.75), (32, 5, 0.15), (72, 4, 0.1)])
def test_contrast_scales_around_each_channels_mean(side, severity, factor):
    images = natural_images(2, side)
    pixels = images.double().numpy()
    mean = pixels.mean(axis=(2, 3), keepdims=True)
    expected = np.clip((pixels - mean) * factor + mean, 0, 1)
    np.testing.assert_allclose(corrupt(images, "contrast", severity).numpy(), expected, atol=0.5 / 255 + 1e-6)


@pytest.mark.parametrize("side, severity, quality", [(32, 2, 65), (32, 5, 40), (72, 1, 25)])
def test_jpeg_compression_is_what_pil_writes_at_the_published_quality(side, severity, quality):
    images = natural_images(2, side)
    out = corrupt(images, "jpeg_compression", severity)
    for image, result in zip(images, out):
        buffer = io.BytesIO()
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
            buffer, "JPEG", quality=quality
        )
        decoded = np.asarray(Image.open(buffer)).transpose(2, 0, 1)
        assert np.array_equal((result.numpy() * 255).round().astype(np.uint8), decoded)


@pytest.mark.parametrize("side, severity, factor", [(32, 3, 0.85), (32, 5, 0.65), (72, 2, 0.5)])
def test_pixelate_is_pils_box_resize_down_and_up(side, severity, factor):
    images = natural_images(2, side)
    out = corrupt(images, "pixelate", severity)
    small = int(side * factor)
    for image, result in zip(images, out):
        pil = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        pil = pil.resize((small, small), Image.BOX).resize((side, side), Image.BOX)
        expected = np.asarray(pil).transpose(2, 0, 1).astype(np.int64)
        # PIL rounds to 8 bits between its passes; one level apart at most.
        assert np.abs((result.numpy() * 255).round().astype(np.int64) - expected).max() <= 1


def test_defocus_blur_spreads_a_point_as_the_published_kernel():
    # CIFAR severity 1: a disk of radius 0.3 (the centre alone), smoothed by a 3 x 3 Gaussian of sigma 0.4.
    point = torch.zeros(1, 3, 32, 32)
    point[..., 16, 16] = 1
    weights = [math.exp(-(d * d) / (2 * 0.4**2)) for d in (-1, 0, 1)]
    weights = [w / sum(weights) for w in weights]
    expected = torch.zeros(32, 32)
    expected[15:18, 15:18] = torch.tensor([[round(255 * a * b) / 255 for b in weights] for a in weights])
    assert torch.allclose(corrupt(point, "defocus_blur", 1)[0, 0], expected, atol=1e-6)
    # ImageNet severity 1: a disk of radius 3 (29 pixels), smoothing of sigma 0.1 leaving it as it is.
    point = torch.zeros(1, 3, 72, 72)
    point[..., 36, 36] = 1
    spread = corrupt(point, "defocus_blur", 1)[0, 0]
    rows, cols = torch.nonzero(spread, as_tuple=True)
    assert len(rows) == 29 and ((rows - 36) ** 2 + (cols - 36) ** 2 <= 9).all()
    assert torch.allclose(spread[rows, cols], torch.full((29,), round(255 / 29) / 255))


def test_names_and_severities_parse_or_fail_in_one_line():
    assert parse_corruptions("all") == list(CORRUPTIONS)
    assert parse_corruptions("fog, noise") == ["gaussian_noise", "shot_noise", "impulse_noise", "fog"]
    assert parse_severities("1-5") == [1, 2, 3, 4, 5] and parse_severities("5,1,3") == [1, 3, 5]
    assert parse_severities("2-3,5") == [2, 3, 5]
    with pytest.raises(UserError, match="unknown corruption 'smog'.*valid: all, noise, blur.*jpeg_compression"):
        parse_corruptions("fog,smog")
    for bad in ("0-5", "1-6", "4-2", "x", "", "1,"):
        with pytest.raises(UserError, match="--severities"):
            parse_severities(bad)


def write_published(root, labels: np.ndarray, names=("gaussian_noise", "fog"), images: np.ndarray | None = None):
    """A CIFAR-10-C folder in the published layout: each corruption's 5 x N images stacked by severity."""
    root.mkdir(parents=True, exist_ok=True)
    count = len(labels)
    np.save(root / "labels.npy", np.tile(labels, 5).astype(np.uint8))
    for code, name in enumerate(names):
        if images is None:  # pixel value = 40 * (severity - 1) + sample + code, to find each row
            rows = (40 * np.repeat(np.arange(5), count) + np.tile(np.arange(count), 5) + code).astype(np.uint8)
            stacked = np.broadcast_to(rows[:, None, None, None], (5 * count, 32, 32, 3))
        else:
            stacked = np.concatenate([images] * 5)
        np.save(root / f"{name}.npy", np.ascontiguousarray(stacked))


def test_published_layout_is_read_by_severity_and_index(tmp_path):
    labels = np.array([3, 1, 4, 1, 5, 9])
    write_published(tmp_path / "c", labels)
    published = PublishedCorruptions(tmp_path / "c", ["gaussian_noise", "fog"], labels)
    assert published.image_size == (32, 32)
    batch = published.images("fog", 4, [5, 0, 2])
    assert batch.shape == (3, 3, 32, 32)
    assert (batch[:, 0, 0, 0] * 255).round().tolist() == [40 * 3 + 5 + 1, 40 * 3 + 0 + 1, 40 * 3 + 2 + 1]
    assert (published.images("gaussian_noise", 1, [1]) * 255).round().unique().tolist() == [1.0]


@pytest.mark.parametrize(
    "damage_folder, fragments",
    [
        (lambda root, labels: write_published(root, labels[:-1]), ("holds 25 labels", "5 x 6 = 30")),
        (lambda root, labels: write_published(root, labels[::-1]), ("does not match the split's labels",)),
        (lambda root, labels: write_published(root, labels, names=("fog",)), ("has no gaussian_noise.npy",)),
        (lambda root, labels: root.mkdir(), ("no labels.npy in",)),
    ],
)
def test_published_layout_that_does_not_fit_is_refused(tmp_path, damage_folder, fragments):
    labels = np.array([3, 1, 4, 1, 5, 9])
    damage_folder(tmp_path / "c", labels)
    with pytest.raises(UserError) as error:
        PublishedCorruptions(tmp_path / "c", ["gaussian_noise", "fog"], labels)
    for fragment in fragments:
        assert fragment in str(error.value)


def evaluate_args(world, *extra: str) -> list[str]:
    return [
        "evaluate",
        "--dataset",
        "cifar100",
        "--data-root",
        str(world.data_root),
        "--checkpoint",
        str(world.teacher_checkpoint),
        "--arch",
        world.teacher_arch,
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--batch-size",
        "32",
        *extra,
    ]


def test_evaluate_reports_every_corruption_and_severity_and_the_report_shows_them(tiny_world, tmp_path, capsys):
    output = tmp_path / "evals" / "teacher.json"
    assert (
        run_cli(
            evaluate_args(tiny_world, "--corruptions", "all", "--severities", "1-5", "--json", "--output", str(output))
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(output.read_text())
    robustness = report["robustness"]
    assert robustness["corruptions"] == list(CORRUPTIONS) and robustness["severities"] == [1, 2, 3, 4, 5]
    assert robustness["samples"] == report["count"] == 20 and robustness["parameters"] == "cifar"
    cells = [robustness["cells"][name][str(s)] for name in CORRUPTIONS for s in range(1, 6)]
    assert len(cells) == 75 and all(set(cell) == {"top1", "nll", "ece"} for cell in cells)
    assert all(0 <= cell["top1"] <= 1 and cell["nll"] > 0 for cell in cells)
    assert robustness["clean_top1"] == report["top1"]
    mean = sum(cell["top1"] for cell in cells) / 75
    assert robustness["mean_corruption_accuracy"] == pytest.approx(mean)
    clean = robustness["clean_top1"]
    assert robustness["relative_drop"] == (pytest.approx((clean - mean) / clean) if clean else None)
    assert robustness["corruption_mean_top1"]["fog"] == pytest.approx(
        sum(robustness["cells"]["fog"][str(s)]["top1"] for s in range(1, 6)) / 5
    )

    # A student next to the teacher: the report's robustness table and figure.
    student = dict(report, robustness=dict(robustness, clean_top1=0.5, mean_corruption_accuracy=0.4, relative_drop=0.2))
    (output.parent / "student.json").write_text(json.dumps(student))
    out = tmp_path / "report"
    assert run_cli(["report", "--evals", str(output.parent), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "## Robustness" in text and "| top-1 | teacher | student |" in text
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert lines["| **mean corruption accuracy**"].endswith(" | **40.0%** |")
    assert lines["| relative drop"].endswith(" | 20.0% |")
    assert lines["| clean"].startswith(f"| clean | {100 * clean:.1f}% |")
    assert "![robustness](robustness.png)" in text
    runs = json.loads((out / "metrics.json").read_text())["splits"]["test"]["runs"]
    assert runs["student"]["mean_corruption_accuracy"] == {"mean": 0.4, "ci95": None, "n_seeds": 1}
    with Image.open(out / "robustness.png") as figure:
        assert figure.size[0] > 800 and figure.size[1] > 400


def test_checkpoints_evaluated_together_score_as_each_alone(tiny_world, tmp_path, capsys):
    """The corrupted images are made once for all checkpoints of a glob: each checkpoint's cells are still its own."""
    state, saved = read_checkpoint(tiny_world.teacher_checkpoint)
    for seed, scale in ((0, 1.0), (1, 0.5)):
        path = tmp_path / "runs" / f"seed-{seed}" / "last.pt"
        path.parent.mkdir(parents=True)
        torch.save({**saved, "model": {key: value * scale if value.is_floating_point() else value
                                       for key, value in state.items()},
                    "config": {**saved.get("config", {}), "seed": seed}}, path)
    robust = ["--corruptions", "fog,jpeg_compression,shot_noise", "--severities", "1,5", "--json"]
    together_args = evaluate_args(tiny_world, *robust)
    together_args[together_args.index("--checkpoint") + 1] = str(tmp_path / "runs" / "seed-*" / "last.pt")
    assert run_cli(together_args) == 0
    together = json.loads(capsys.readouterr().out)["seeds"]
    for seed in (0, 1):
        alone_args = evaluate_args(tiny_world, *robust)
        alone_args[alone_args.index("--checkpoint") + 1] = str(tmp_path / "runs" / f"seed-{seed}" / "last.pt")
        assert run_cli(alone_args) == 0
        assert together[seed]["robustness"] == json.loads(capsys.readouterr().out)["robustness"]
    assert together[0]["robustness"]["cells"] != together[1]["robustness"]["cells"]


def test_evaluate_reads_the_published_files(tiny_world, tmp_path, capsys):
    """Published files holding the clean test images: every cell is the clean accuracy and NLL, so the rows read
    are those of the samples evaluated, on a subset too."""
    test = open_dataset("cifar100", tiny_world.data_root, "test")
    clean = np.stack([test.image(i).permute(1, 2, 0).numpy() for i in range(len(test))])
    write_published(tmp_path / "CIFAR-100-C", test.labels, names=("fog", "contrast"), images=clean)
    assert (
        run_cli(
            evaluate_args(
                tiny_world,
                "--corrupted-root",
                str(tmp_path / "CIFAR-100-C"),
                "--corruptions",
                "fog,contrast",
                "--severities",
                "2,4",
                "--corruption-samples",
                "7",
                "--json",
            )
        )
        == 0
    )
    robustness = json.loads(capsys.readouterr().out)["robustness"]
    assert robustness["samples"] == 7 and robustness["source"].startswith("published files in")
    assert set(robustness["cells"]) == {"fog", "contrast"} and set(robustness["cells"]["fog"]) == {"2", "4"}
    for cells in robustness["cells"].values():
        for cell in cells.values():
            assert cell == robustness["clean"]
    assert robustness["relative_drop"] in (0.0, None)


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (("--corruptions", "fog,smog"), ("unknown corruption 'smog'", "valid: all, noise", "elastic_transform")),
        (("--corruptions", "fog", "--severities", "0-3"), ("--severities must lie in 1-5",)),
        (("--corruptions", "fog", "--corruption-seed", "-1"), ("--corruption-seed must be 0 or more",)),
        (("--corrupted-root", "/nowhere/CIFAR-100-C"), ("/nowhere/CIFAR-100-C does not exist",)),
        (("--corruptions", "fog", "--severities", "high"),
         ("--severities must be a range or list of severities 1-5 such as 1-5 or 1,3,5, got 'high'",)),
        (("--corruptions", "fog", "--corruption-samples", "0"), ("--corruption-samples must be at least 1, got 0",)),
    ],
)
def test_bad_robustness_options_fail_in_one_line(tiny_world, capsys, extra, fragments):
    capsys.readouterr()
    assert run_cli(evaluate_args(tiny_world, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, err


def test_published_files_of_another_split_are_refused(tiny_world, tmp_path, capsys):
    write_published(tmp_path / "c", np.zeros(10, dtype=np.int64), names=("fog",))
    capsys.readouterr()
    assert run_cli(evaluate_args(tiny_world, "--corrupted-root", str(tmp_path / "c"), "--corruptions", "fog")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds 50 labels; the split has 20 images" in err, err


def test_corrupting_with_an_unknown_name_or_severity_fails():
    images = torch.zeros(1, 3, 8, 8)
    with pytest.raises(UserError, match="unknown corruption 'smog'; valid: gaussian_noise"):
        corrupt(images, "smog", 1)
    with pytest.raises(UserError, match="corruption severity must be 1-5, got 6"):
        corrupt(images, "fog", 6)


def test_published_arrays_of_another_shape_are_refused(tiny_world, tmp_path, capsys):
    labels = np.array([3, 1, 4, 1, 5, 9])
    write_published(tmp_path / "c", labels, names=("fog",))
    np.save(tmp_path / "c" / "fog.npy", np.zeros((30, 32, 32, 3), np.float32))
    with pytest.raises(UserError) as error:
        PublishedCorruptions(tmp_path / "c", ["fog"], labels)
    assert "is float32 (30, 32, 32, 3); expected uint8 (30, H, W, 3): the split's 6 images at each of 5 severities" \
        in str(error.value)
    np.save(tmp_path / "c" / "fog.npy", np.zeros((30, 16, 16, 3), np.uint8))
    np.save(tmp_path / "c" / "gaussian_noise.npy", np.zeros((30, 32, 32, 3), np.uint8))
    with pytest.raises(UserError, match=f"the arrays in {tmp_path / 'c'} differ in image size"):
        PublishedCorruptions(tmp_path / "c", ["fog", "gaussian_noise"], labels)

    write_published(tmp_path / "world", open_dataset("cifar100", tiny_world.data_root, "test").labels, names=("fog",))
    np.save(tmp_path / "world" / "fog.npy", np.zeros((100, 16, 16, 3), np.uint8))
    capsys.readouterr()
    assert run_cli(evaluate_args(tiny_world, "--corrupted-root", str(tmp_path / "world"), "--corruptions", "fog")) == 2
    assert "holds 16 x 16 images; the model evaluates 32 x 32 views" in capsys.readouterr().err
