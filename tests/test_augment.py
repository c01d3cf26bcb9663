"""Stored strong augmentation: each op replays exactly as torchvision's own transform applies it, a store built
with it is what its teacher gives on the replayed views, distills, and `inspect --verify-views` catches a store
whose view parameters were altered."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from conftest import write_cifar100
from torchvision.transforms import autoaugment

from richkd.cli import run_cli
from richkd.pipeline.augment import NO_OP, StrongAugment
from richkd.pipeline.views import mixed_label, policy_from_description

SIZE = 32


def image() -> torch.Tensor:
    """A uint8 view with structure (a gradient and a square), so that every op changes it."""
    rows, cols = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    pixels = torch.stack([rows * 7, cols * 5, (rows + cols) * 3]) % 256
    pixels[:, 8:20, 10:24] = torch.tensor([200, 30, 90])[:, None, None]
    return pixels.to(torch.uint8)


def torchvision_draws(name: str, seed: int) -> tuple[int, ...]:
    """The op slots torchvision's own transform draws from torch's generator at `seed` (as its forward does)."""
    transform = StrongAugment(name, 0.0, SIZE)._transform()
    space = StrongAugment(name, 0.0, SIZE)._space(transform)
    names = list(space)
    torch.manual_seed(seed)
    if name == "autoaugment":
        policy, probabilities, signs = transform.get_params(len(transform.policies))
        slots = [(names.index(op), -1 if magnitude_bin is None else magnitude_bin, 1 - int(signs[i]))
                 if probabilities[i] <= probability else NO_OP
                 for i, (op, probability, magnitude_bin) in enumerate(transform.policies[policy])]
        return sum(slots, ())
    op = int(torch.randint(len(names), (1,)))
    magnitudes, signed = space[names[op]]
    if name == "trivialaugment":
        magnitude_bin = int(torch.randint(len(magnitudes), (1,))) if magnitudes.ndim > 0 else -1
    else:
        magnitude_bin = transform.magnitude if magnitudes.ndim > 0 else -1
    negate = int(torch.randint(2, (1,))) if signed else 0
    return (op, magnitude_bin, negate, *NO_OP)


@pytest.mark.parametrize("name", ["randaugment", "trivialaugment", "autoaugment"])
def test_every_op_replays_as_torchvision_applies_it(name):
    """Seed torch, let torchvision's transform augment the view, read off what it drew, and replay that."""
    transforms = {"randaugment": lambda: autoaugment.RandAugment(num_ops=1),
                  "trivialaugment": autoaugment.TrivialAugmentWide, "autoaugment": autoaugment.AutoAugment}
    strong = StrongAugment(name, 0.0, SIZE)
    ops_seen, view = set(), image()
    for seed in range(400):
        params = torchvision_draws(name, seed)
        torch.manual_seed(seed)
        expected = transforms[name]()(view)
        assert torch.equal(strong.apply(view, params), expected), (name, seed, params)
        ops_seen.update(op for op in params[::3] if op >= 0)
    transform = strong._transform()
    names = list(strong._space(transform))
    if name == "autoaugment":  # its ImageNet policy uses some of the ops only
        assert ops_seen == {names.index(op) for policy in transform.policies for op, _, _ in policy}
    else:
        assert ops_seen == set(range(len(names)))  # every op, exactly


@pytest.mark.parametrize("name", ["randaugment", "trivialaugment", "autoaugment"])
def test_drawn_parameters_name_real_ops_and_replay_the_same_pixels_twice(name):
    strong = StrongAugment(name, 0.25, SIZE)
    rng, ops = np.random.default_rng(0), len(strong._space(strong._transform()))
    drawn = [strong.sample(rng) for _ in range(300)]
    assert {len(params) for params in drawn} == {len(strong.param_names)}
    slots = np.asarray([params[:6] for params in drawn]).reshape(-1, 3)
    assert ((slots[:, 0] >= -1) & (slots[:, 0] < ops)).all() and set(np.unique(slots[:, 2])) <= {0, 1}
    if name == "randaugment":  # both slots filled, RandAugment's fixed magnitude wherever an op has one
        assert (slots[:, 0] >= 0).all() and set(np.unique(slots[:, 1])) <= {-1, 9}
    for params in drawn[:60]:
        first, again = strong.apply(image(), params), strong.apply(image(), params)
        assert first.dtype == torch.uint8 and first.shape == image().shape and torch.equal(first, again)


def test_an_erased_box_is_zeros_and_the_rest_untouched():
    strong = StrongAugment("none", 0.5, SIZE)
    rng = np.random.default_rng(0)
    boxes = [strong.sample(rng) for _ in range(200)]
    erased = [box for box in boxes if box[2]]
    assert 60 < len(erased) < 140  # about half
    for top, left, height, width in erased[:20]:
        expected = image().clone()
        expected[:, top:top + height, left:left + width] = 0
        assert torch.equal(strong.apply(image(), (top, left, height, width)), expected)


def test_a_store_with_stored_augmentation_is_verified_distilled_and_altering_it_is_caught(tiny_world, tmp_path,
                                                                                        capsys):
    out = tmp_path / "strong.zarr"
    assert run_cli(tiny_world.precompute_args(out, "--augment", "randaugment", "--random-erase", "0.5",
                                              "--dtype", "float32")) == 0
    group = zarr.open_group(out, mode="r")
    policy = policy_from_description(group.attrs["views"])
    assert policy.param_names == ("top", "left", "flip", "op0", "bin0", "negate0", "op1", "bin1", "negate1",
                                  "erase_top", "erase_left", "erase_height", "erase_width")
    params = group["views/params"][...]
    assert params.shape == (2, 40, 13) and (params[..., 3] >= 0).all() and (params[..., 11] > 0).any()
    capsys.readouterr()
    assert run_cli(["inspect", str(out), "--verify-views", "80", "--device", "cpu"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "80 views rebuilt; the teacher's logits differ from the stored ones by at most" in shown
    assert "within the tolerance 0.01" in shown

    run = tmp_path / "student"
    assert run_cli(["distill", "--dataset", "cifar100", "--data-root", str(tiny_world.data_root), "--cache", str(out),
                    "--arch", "resnet8", "--variant", "L", "--epochs", "1", "--batch-size", "8", "--device", "cpu",
                    "--num-workers", "0", "--out", str(run)]) == 0
    assert (run / "checkpoints" / "last.pt").is_file()

    altered = zarr.open_group(out, mode="r+")["views/params"]
    shifted = altered[0]
    shifted[:, 3] = (shifted[:, 3] + 1) % 14  # every first op of view 0 replaced by the next one
    altered[0] = shifted
    capsys.readouterr()
    assert run_cli(["inspect", str(out), "--verify-views", "80", "--device", "cpu"]) == 1
    assert "ABOVE the tolerance 0.01" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("flags, message", [
    (("--augment", "mixup"), "--augment must be one of none, randaugment, trivialaugment, autoaugment, got 'mixup'"),
    (("--random-erase", "1"), "--random-erase must be a probability in [0, 1), got 1.0"),
    (("--view-policy", "center", "--augment", "randaugment"),
     "--augment, --random-erase and --mix augment training views; the center policy has none"),
    (("--mix", "blend"), "--mix must be one of none, mixup, cutmix, both, got 'blend'"),
])
def test_bad_augmentation_options_are_refused(flags, message, tiny_world, tmp_path, capsys):
    assert run_cli(tiny_world.precompute_args(tmp_path / "s.zarr", *flags)) == 2
    assert f"error: {message}\n" in capsys.readouterr().err


def test_verify_views_needs_the_stores_own_teacher(tiny_world, tmp_path, capsys):
    out = tmp_path / "s.zarr"
    assert run_cli(tiny_world.precompute_args(out)) == 0
    missing = tmp_path / "gone.pth"
    assert run_cli(["inspect", str(out), "--verify-views", "4", "--teacher-checkpoint", str(missing)]) == 2
    assert (f"error: the store's teacher checkpoint {missing} does not exist: pass --teacher-checkpoint"
            in capsys.readouterr().err)
    other = tmp_path / "other.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), other)
    assert run_cli(["inspect", str(out), "--verify-views", "4", "--teacher-checkpoint", str(other)]) == 2
    assert (f"error: teacher checkpoint {other} is not the one the store was made with (its sha256 differs)"
            in capsys.readouterr().err)


def test_a_mixed_store_replays_its_partners_and_distills_with_mixed_labels(tiny_world, tmp_path, capsys):
    """--augment randaugment --mix cutmix: each stored view is the teacher's on the view mixed with its partner's,
    and a student distills from it (as the issue's recipe asks)."""
    out = tmp_path / "mixed.zarr"
    assert run_cli(tiny_world.precompute_args(out, "--augment", "randaugment", "--mix", "cutmix")) == 0
    group = zarr.open_group(out, mode="r")
    policy = policy_from_description(group.attrs["views"])
    params = group["views/params"][...]
    own = np.arange(40)
    assert params.shape == (2, 40, 16) and (params[..., 9] == 2).all()  # cutmix everywhere
    assert (params[..., 10] != own).all() and ((0 <= params[..., 10]) & (params[..., 10] < 40)).all()
    kept = params[..., 11].view(np.float32)
    np.testing.assert_allclose(kept, 1 - params[..., 14] * params[..., 15] / 32**2, rtol=1e-6)
    assert policy.param_names[-7:] == ("mix", "partner", "lambda_bits", "box_top", "box_left", "box_height",
                                       "box_width")
    capsys.readouterr()
    assert run_cli(["inspect", str(out), "--verify-views", "40", "--device", "cpu"]) == 0
    assert run_cli(["inspect", str(out)]) == 0
    assert "views 2 x pad_crop (size 32), seed 0; then randaugment, cutmix with another sample" in " ".join(
        capsys.readouterr().out.split())

    run = tmp_path / "student"
    distill = ["distill", "--dataset", "cifar100", "--data-root", str(tiny_world.data_root), "--cache", str(out),
               "--arch", "resnet8", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--num-workers", "0"]
    assert run_cli([*distill, "--variant", "L", "--out", str(run)]) == 0
    assert (run / "checkpoints" / "last.pt").is_file()
    assert run_cli([*distill, "--variant", "L", "--logit-loss", "dkd", "--out", str(tmp_path / "dkd")]) == 2
    assert ("error: --logit-loss dkd splits off the label's class, which a mixed view does not have one of: use kd "
            "with a store made with --mix") in capsys.readouterr().err

    # Without its partner's pixels the stored targets no longer match: the partner is part of the view.
    altered = zarr.open_group(out, mode="r+")["views/params"]
    moved = altered[1]
    moved[:, 10] = (moved[:, 10] + 1) % 40
    moved[moved[:, 10] == own, 10] = (own[moved[:, 10] == own] + 1) % 40
    altered[1] = moved
    assert run_cli(["inspect", str(out), "--verify-views", "40", "--device", "cpu"]) == 1


def test_mixed_labels_weigh_both_classes_by_lambda():
    policy = policy_from_description({"policy": "pad_crop", "size": 32, "padding": 4,
                                      "mix": {"kind": "mixup", "samples": 10, "size": 32}})
    params = np.asarray([0, 0, 0, 1, 3, np.float32(0.25).view(np.int32), 0, 0, 0, 0])
    label = mixed_label(policy, params, 2, 7, 10)
    assert label.tolist() == [0, 0, 0.25, 0, 0, 0, 0, 0.75, 0, 0]
    partner = torch.full((3, 32, 32), 200, dtype=torch.uint8)
    mixed = policy.mix.apply(torch.full((3, 32, 32), 100, dtype=torch.uint8), partner, params[-7:])
    assert (mixed == 175).all()  # 0.25 * 100 + 0.75 * 200


def test_a_mixed_store_cannot_be_streamed(tiny_world, tmp_path, capsys):
    out = tmp_path / "mixed.zarr"
    assert run_cli(tiny_world.precompute_args(out, "--mix", "mixup")) == 0
    capsys.readouterr()
    assert run_cli(["distill", "--dataset", "webdataset", "--data-root", str(tmp_path / "shards-{0000..0001}.tar"),
                    "--cache", str(out), "--stream", "--val-fraction", "0", "--device", "cpu"]) == 2
    assert ("the store mixes each view with another sample's, whose image a stream cannot fetch: distill it "
            "without --stream\n") in capsys.readouterr().err


def test_mixing_needs_two_samples(tmp_path, tiny_world, capsys):
    write_cifar100(tmp_path / "one", train=1, test=1)
    args = tiny_world.precompute_args(tmp_path / "s.zarr", "--mix", "cutmix")
    args[args.index("--data-root") + 1] = str(tmp_path / "one")
    assert run_cli(args) == 2
    assert "--mix needs at least two samples to mix, the split has 1\n" in capsys.readouterr().err


def test_label_only_training_draws_the_same_augmentation_afresh(tiny_world, tmp_path, capsys):
    """`richkd train --augment --mix`: the label-only baseline of a run distilled from an augmented store."""
    out = tmp_path / "ce"
    assert run_cli(["train", "--dataset", "cifar100", "--data-root", str(tiny_world.data_root), "--arch", "resnet8",
                    "--epochs", "1", "--batch-size", "8", "--num-workers", "0", "--device", "cpu", "--augment",
                    "trivialaugment", "--random-erase", "0.3", "--mix", "both", "--val-fraction", "0.1",
                    "--out", str(out)]) == 0
    assert "mixing partners are drawn from every sample, the validation share's included" in " ".join(
        capsys.readouterr().err.split())
    saved = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    policy = policy_from_description(saved["view_policy"])
    assert policy.augment.augment == "trivialaugment" and policy.mix.kind == "both" and policy.mix.samples == 40
