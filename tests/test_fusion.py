"""Fusion of any number of named sources: a student distils from three, a source of weight 0 changes nothing, the
fused targets are the sum the docs give, and a variant that needs what a logits-only source lacks is refused."""

from __future__ import annotations

import json
import re

import numpy as np
import open_clip
import pytest
import torch
import zarr
from conftest import TINY_CLIP
from test_bad_input import assert_user_error

from richkd import CachedTargets
from richkd.cache.reader import CacheReader
from richkd.cli import run_cli
from richkd.pipeline.config import build_config
from richkd.pipeline.errors import UserError
from richkd.pipeline.losses import kd_loss
from richkd.pipeline.models import read_checkpoint
from richkd.pipeline.runtime import Part
from richkd.stages.distill import DistillConfig, distill_objective

WEIGHTS = {"teacher": 0.5, "clip": 0.3, "clip_b16": 0.2}
FUSE = ",".join(f"{name}={weight}" for name, weight in WEIGHTS.items())


@pytest.fixture(scope="module")
def stores(tiny_world, tmp_path_factory):
    """The tiny world's teacher and CLIP with a second CLIP of other weights, `clip_b16`: written in one go, and
    added to a finished two-source store with its logits only."""
    root = tmp_path_factory.mktemp("fusion")
    torch.manual_seed(1)
    torch.save(open_clip.create_model(TINY_CLIP).state_dict(), root / "clip_b16.pt")
    second_clip = f"clip_b16=clip:{TINY_CLIP}@{root / 'clip_b16.pt'}"
    three, logits_only = root / "three.zarr", root / "logits_only.zarr"
    assert run_cli(tiny_world.precompute_args(three, "--source", second_clip)) == 0
    assert run_cli(tiny_world.precompute_args(logits_only)) == 0
    assert run_cli(tiny_world.precompute_args(logits_only, "--add-source", second_clip, "--outputs", "logits")) == 0
    return three, logits_only


def distill_args(tiny_world, store, out, *extra: str) -> list[str]:
    return ["distill", "--dataset", "cifar100", "--data-root", str(tiny_world.data_root), "--cache", str(store),
            "--arch", "resnet8", "--epochs", "2", "--batch-size", "8", "--lr", "0.05", "--nce-k", "8",
            "--val-fraction", "0", "--num-workers", "0", "--device", "cpu", "--out", str(out), *extra]


def stored(store, name: str, view: int) -> torch.Tensor:
    """A per-view array as zarr reads it, in float32."""
    return torch.from_numpy(zarr.open_group(store, mode="r")[name][view].astype(np.float32))


def test_a_student_distils_from_three_sources(tiny_world, stores, tmp_path):
    three, _ = stores
    run = tmp_path / "three"
    assert run_cli(distill_args(tiny_world, three, run, "--variant", "LF", "--fuse", FUSE,
                                "--clip-scale", "clip")) == 0
    model, saved = read_checkpoint(run / "checkpoints" / "last.pt")
    assert saved["epoch"] == 2
    assert all(torch.isfinite(value).all() for value in model.values() if value.is_floating_point())
    # CRD fuses the three sources' features, each through its own embedding.
    embeds = {key.split(".")[2] for key in saved["objective"] if key.startswith("crd.embeds.")}
    assert embeds == set(WEIGHTS)
    logged = json.loads((run / "dvclive" / "metrics.json").read_text())["train"]
    assert np.isfinite(logged["loss"])
    assert json.loads((run / "run.json").read_text())["cache"]["sources"]["clip_b16"]["model"] == TINY_CLIP

    # Its logit loss is KD on 0.5 z_T + 0.3 exp(logit_scale) s_C + 0.2 exp(logit_scale_b16) s_C16, read with zarr.
    reader = CacheReader(str(three))
    config = build_config(DistillConfig, "distill", overrides={"variant": "L", "fuse": FUSE, "clip_scale": "clip",
                                                                "cache": str(three)})
    objective = distill_objective(config, reader, None, 64, training_rows=np.arange(reader.layout.samples))
    assert objective.targets.names == ("teacher/logits", "clip/logits", "clip_b16/logits")
    _, order = objective.epoch_data(0, Part())
    rows = torch.from_numpy(order[:8])
    scales = {name: reader.source_records[name].get("logit_scale", 1.0) for name in WEIGHTS}
    expected = sum(weight * (scales[name] * stored(three, f"{name}/logits", 0)[rows])
                   for name, weight in WEIGHTS.items())
    student = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    terms = objective.losses(student, torch.zeros(8, 64), torch.zeros(8, dtype=torch.long), rows, epoch=0)
    torch.testing.assert_close(terms["logit"], 3.0 * kd_loss(student, expected, 3.0))


def test_a_source_of_weight_zero_changes_nothing(tiny_world, stores, tmp_path):
    """Neither read nor embedded: the run is the run without it, bit for bit, its logged metrics equal."""
    three, _ = stores
    runs = {"with": "teacher=0.7,clip=0.3,clip_b16=0", "without": "teacher=0.7,clip=0.3"}
    for name, fuse in runs.items():
        assert run_cli(distill_args(tiny_world, three, tmp_path / name, "--variant", "LF", "--fuse", fuse)) == 0
    (with_zero, saved_with), (without, saved_without) = (read_checkpoint(tmp_path / name / "checkpoints" / "last.pt")
                                                         for name in runs)
    assert with_zero.keys() == without.keys() and all(torch.equal(with_zero[k], without[k]) for k in without)
    assert saved_with["objective"].keys() == saved_without["objective"].keys()
    assert not any("clip_b16" in key for key in saved_with["objective"])
    assert all(torch.equal(saved_with["objective"][key], saved_without["objective"][key])
               for key in saved_without["objective"])
    logged_with, logged_without = (json.loads((tmp_path / name / "dvclive" / "metrics.json").read_text())
                                   for name in runs)
    del logged_with["epoch_seconds"], logged_without["epoch_seconds"]  # the clock's, not the run's
    assert logged_with == logged_without


@pytest.mark.parametrize("standardize", [False, True])
def test_two_source_targets_are_alpha_z_t_plus_the_rest_of_scaled_cosines(tiny_world, stores, standardize):
    """The teacher-and-CLIP fusion computed by hand from zarr's arrays, in the same operations: equal bit for bit."""
    three, _ = stores
    reader = CacheReader(str(three))
    config = build_config(DistillConfig, "distill", overrides={
        "variant": "L", "alpha": 0.6, "clip_scale": "clip", "standardize": standardize, "cache": str(three)})
    objective = distill_objective(config, reader, None, 64, training_rows=np.arange(reader.layout.samples))
    assert objective.targets.names == ("teacher/logits", "clip/logits")  # clip_b16 is never read
    objective.epoch_data(1, Part())  # view 1
    rows = torch.arange(reader.layout.samples)
    fused = objective.fusion.fuse(objective.targets.gather(rows))

    def z_score(z: torch.Tensor) -> torch.Tensor:
        return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True, unbiased=False) + 1e-6)

    teacher = stored(three, "teacher/logits", 1)
    clip = reader.source_records["clip"]["logit_scale"] * stored(three, "clip/logits", 1)
    if standardize:
        teacher, clip = z_score(teacher), z_score(clip)
    assert torch.equal(fused, 0.6 * teacher + (1 - 0.6) * clip)


def test_the_api_fuses_by_name_and_serves_the_weighted_sources_features(tiny_world, stores):
    three, _ = stores
    targets = CachedTargets(str(three), "cifar100", str(tiny_world.data_root), fuse=WEIGHTS, features=True)
    assert list(targets.sources) == ["teacher", "clip", "clip_b16"] and targets.sources["clip_b16"].kind == "clip"
    assert targets.weights == WEIGHTS
    item = targets[3]
    expected = sum(weight * stored(three, f"{name}/logits", 0)[3] for name, weight in WEIGHTS.items())
    torch.testing.assert_close(item["fused_logits"], expected)
    for name in ("teacher/features", "clip/image_embeds", "clip_b16/image_embeds"):
        assert torch.equal(item[name], stored(three, name, 0)[3])
    # The CLIP-only control: the CLIPs alone, their weights scaled to sum 1.
    clips = CachedTargets(str(three), "cifar100", str(tiny_world.data_root), variant="clip", fuse=WEIGHTS)
    assert clips.weights == pytest.approx({"clip": 0.6, "clip_b16": 0.4})
    with pytest.raises(UserError, match="fuse weighs clip_l14, which cache"):
        CachedTargets(str(three), "cifar100", str(tiny_world.data_root), fuse={"teacher": 1.0, "clip_l14": 0.5})


def test_what_a_logits_only_source_lacks_is_refused(tiny_world, stores, tmp_path, capsys):
    _, logits_only = stores
    # CRD fuses the features of the sources that have them.
    assert run_cli(distill_args(tiny_world, logits_only, tmp_path / "f", "--variant", "F", "--fuse", FUSE)) == 0
    assert ("CRD fuses the features of teacher, clip: clip_b16 stores logits only (precompute --outputs logits)"
            in " ".join(capsys.readouterr().err.split()))
    # A store of logits alone: none has features, the teacher's are what CRD at alpha weighs first.
    logits_alone = tmp_path / "logits_alone.zarr"
    assert run_cli(tiny_world.precompute_args(logits_alone, "--outputs", "logits")) == 0
    capsys.readouterr()
    assert_user_error(distill_args(tiny_world, logits_alone, tmp_path / "alone", "--variant", "LF"), capsys,
                      "variant LF needs the features of teacher, but cache",
                      "stores its logits only (precompute --outputs logits): use variant L, or precompute with "
                      "--outputs all")
    with pytest.raises(UserError, match=re.escape("CachedTargets(features=True) needs the features of clip_b16")):
        CachedTargets(str(logits_only), "cifar100", str(tiny_world.data_root), fuse=WEIGHTS, features=True)
    # Its logits fuse; the features of the sources that have them serve CRD.
    assert run_cli(distill_args(tiny_world, logits_only, tmp_path / "l", "--variant", "L", "--fuse", FUSE)) == 0
    assert run_cli(distill_args(tiny_world, logits_only, tmp_path / "lf", "--variant", "LF",
                                "--fuse", "teacher=0.7,clip=0.3,clip_b16=0")) == 0
    capsys.readouterr()
    assert_user_error(distill_args(tiny_world, logits_only, tmp_path / "x", "--fuse", "teacher=0.7,clip_l14=0.3"),
                      capsys, "--fuse weighs clip_l14, which cache", "; its sources: teacher, clip, clip_b16")
    assert_user_error(distill_args(tiny_world, logits_only, tmp_path / "s", "--variant", "shrink",
                                   "--fuse", "clip=0.3,clip_b16=0.2"), capsys,
                      "variant shrink fuses the classifier sources, and none of them has a weight above 0 "
                      "(teacher 0, clip 0.3, clip_b16 0.2)")


def test_inspect_and_report_name_every_source_and_sweep_their_weights(stores, tmp_path, capsys):
    three, _ = stores
    assert run_cli(["inspect", str(three), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    quality = report["quality"]
    assert list(quality["sources"]) == list(WEIGHTS) and "alpha_sweep" not in quality
    assert len(quality["weight_sweep"]) == 3 * 66  # three fusions x every weighting in steps of 0.1
    group = zarr.open_group(three, mode="r")
    labels = np.tile(group["labels"][:], 2)
    logits = {name: group[f"{name}/logits"][...].astype(np.float32).reshape(80, 100) for name in WEIGHTS}
    for name in WEIGHTS:
        assert quality["sources"][name]["top1"] == pytest.approx(np.mean(logits[name].argmax(1) == labels))
    row = next(r for r in quality["weight_sweep"]
               if r["clip_scale"] == "raw" and r["weights"] == {"teacher": 0.2, "clip": 0.3, "clip_b16": 0.5})
    fused = 0.2 * logits["teacher"] + 0.3 * logits["clip"] + 0.5 * logits["clip_b16"]
    assert row["top1"] == pytest.approx(np.mean(fused.argmax(1) == labels))
    assert report["provenance"]["sources"]["clip_b16"]["outputs"] == "all"

    assert run_cli(["inspect", str(three)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"clip_b16 clip {TINY_CLIP}" in out and "best fused targets by weights" in out

    evals = tmp_path / "evals"
    evals.mkdir()
    (evals / "teacher.json").write_text(json.dumps({"split": "train", "top1": 0.5, "top5": 0.7, "nll": 2.0, "ece": 0.1,
                                                    "confident_correct": 0.2, "confidently_wrong": 0.1}))
    assert run_cli(["report", "--evals", str(evals), "--test-cache", str(three), "--fuse", FUSE,
                    "--out", str(tmp_path / "report")]) == 0
    runs = json.loads((tmp_path / "report" / "metrics.json").read_text())["splits"]["train"]["runs"]
    assert list(runs) == ["teacher", "CLIP zero-shot (12 prompts)", "clip_b16 zero-shot (12 prompts)",
                          "fused targets (teacher 0.5, clip 0.3, clip_b16 0.2, raw)"]
    assert "Fused targets by weights" in (tmp_path / "report" / "report.md").read_text()
