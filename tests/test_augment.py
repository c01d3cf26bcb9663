"""Stored strong augmentation: each op replays exactly as torchvision's own transform applies it, a store built
with it is what its teacher gives on the replayed views, distills, and `inspect --verify-views` catches a store
whose view parameters were altered."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from torchvision.transforms import autoaugment

from richkd.cli import run_cli
from richkd.pipeline.augment import NO_OP, StrongAugment
from richkd.pipeline.views import policy_from_description

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
     "--augment and --random-erase augment training views; the center policy has none"),
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
