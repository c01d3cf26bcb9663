"""End to end on the demo images: train a teacher, cache it with CLIP, distil every variant, evaluate.

Chance is 1/8. At the fixed seed a correct implementation reaches 35-60% after six epochs (the weakest,
F alone, about 35%), so 25% - twice chance - is cleared with a wide margin; a student that does not
learn stays near 12.5%.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_CLIP

from richkd.cli import run_cli
from richkd.pipeline.demo import write_demo
from richkd.pipeline.models import read_checkpoint

CHANCE = 1 / 8
OPTIMISATION = ["--batch-size", "32", "--schedule", "cosine", "--epochs", "6", "--num-workers", "0",
                "--device", "cpu"]
VARIANTS = {
    "none": ["--variant", "none"],
    "L": ["--variant", "L"],
    "F": ["--variant", "F"],
    "LF": ["--variant", "LF"],
    "kd": ["--variant", "L", "--alpha", "1"],
    "dkd": ["--variant", "L", "--logit-loss", "dkd", "--temperature", "4", "--dkd-warmup", "2"],
}


@pytest.fixture(scope="module")
def demo_cache(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_demo(root / "images", train=2000, test=400)
    data = ["--dataset", "demo", "--data-root", str(root / "images")]
    assert run_cli(["train", *data, *OPTIMISATION, "--arch", "wrn_16_1", "--lr", "0.05",
                    "--out", str(root / "teacher")]) == 0
    assert run_cli(["precompute", *data, "--teacher", "wrn_16_1",
                    "--teacher-checkpoint", str(root / "teacher" / "checkpoints" / "best.pt"),
                    "--clip", TINY_CLIP, "--clip-pretrained", str(tiny_world.clip_checkpoint), "--views", "2",
                    "--shard-size", "512", "--num-workers", "0", "--device", "cpu",
                    "--out", str(root / "cache.zarr")]) == 0
    return root, data


def test_teacher_learns(demo_cache):
    root, _ = demo_cache
    summary = json.loads((root / "teacher" / "summary.json").read_text())
    assert summary["best"]["top1"] > 4 * CHANCE and summary["best"]["selected_on"] == "validation"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_learns_from_the_cache(demo_cache, variant, capsys):
    root, data = demo_cache
    run = root / f"student_{variant}"
    assert run_cli(["distill", *data, *OPTIMISATION, *VARIANTS[variant], "--arch", "resnet8", "--lr", "0.1",
                    "--nce-k", "256", "--cache", str(root / "cache.zarr"), "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())

    capsys.readouterr()
    assert run_cli(["evaluate", *data, "--checkpoint", str(run / "checkpoints" / "last.pt"), "--json",
                    "--num-workers", "0", "--device", "cpu", "--output", str(run / "eval.json")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((run / "eval.json").read_text())
    assert report["top1"] > 2 * CHANCE, f"{variant} did not learn: {report['top1']:.3f}"
    assert report["top1"] == pytest.approx(summary["last"]["test"]["top1"])  # the same images, the same views
    assert report["count"] == 400 and len(report["per_class_accuracy"]) == 8
    assert 0 <= report["confidently_wrong"] <= 1 - report["top1"]

    logged = (run / "dvclive" / "plots" / "metrics" / "validation" / "top1.tsv").read_text().splitlines()
    assert len(logged) == 1 + 6
    run_info = json.loads((run / "run.json").read_text())
    assert run_info["cache"]["sources"]["teacher"]["arch"] == "wrn_16_1" and run_info["kind"] == "distill"


def test_report_compares_targets_and_students(demo_cache, tiny_world):
    from PIL import Image

    root, data = demo_cache
    test_cache = root / "test.zarr"
    assert run_cli(["precompute", *data, "--split", "test", "--views", "1", "--view-policy", "center",
                    "--teacher", "wrn_16_1", "--teacher-checkpoint", str(root / "teacher" / "checkpoints" / "best.pt"),
                    "--clip", TINY_CLIP, "--clip-pretrained", str(tiny_world.clip_checkpoint), "--num-workers", "0",
                    "--device", "cpu", "--out", str(test_cache)]) == 0
    evals = root / "evals"
    evals.mkdir()
    assert run_cli(["evaluate", *data, "--checkpoint", str(root / "teacher" / "checkpoints" / "best.pt"),
                    "--num-workers", "0", "--device", "cpu", "--output", str(evals / "teacher.json")]) == 0
    for variant in VARIANTS:
        (evals / f"{variant}.json").write_text((root / f"student_{variant}" / "eval.json").read_text())
    out = root / "report"
    assert run_cli(["report", "--evals", str(evals), "--runs", "teacher", "--runs", "none", "--runs", "LF",
                    "--test-cache", str(test_cache), "--out", str(out)]) == 0

    metrics = json.loads((out / "metrics.json").read_text())["splits"]["test"]["runs"]
    assert list(metrics) == ["teacher", "CLIP zero-shot (12 prompts)", "fused targets (alpha 0.7, raw)", "none", "LF"]
    teacher = json.loads((evals / "teacher.json").read_text())
    assert metrics["teacher"]["top1"] == {"mean": teacher["top1"], "ci95": None, "n_seeds": 1}
    # The centre-view test cache holds the same teacher: its fused targets at alpha 1 would be the teacher.
    assert metrics["fused targets (alpha 0.7, raw)"]["top1"]["mean"] == pytest.approx(teacher["top1"], abs=0.05)
    table = (out / "report.md").read_text()
    assert "| *teacher* |" in table and "| LF |" in table and f"{100 * teacher['top1']:.1f}%" in table
    for figure in ("accuracy", "reliability", "confidence", "alpha_sweep"):
        with Image.open(out / f"{figure}.png") as image:
            assert image.size[0] > 400 and image.size[1] > 200


def test_teacher_shrink_is_kd_on_the_shrunk_teacher_logits_exactly(demo_cache):
    """The control that separates CLIP's part of z_F from the softening that alpha < 1 brings on its own."""
    from richkd.cache.reader import CacheReader
    from richkd.pipeline.config import build_config
    from richkd.pipeline.losses import kd_loss
    from richkd.pipeline.runtime import Part
    from richkd.stages.distill import DistillConfig, distill_objective

    root, _ = demo_cache
    reader = CacheReader(str(root / "cache.zarr"))
    config = build_config(DistillConfig, "distill", overrides={
        "variant": "shrink", "alpha": 0.7, "temperature": 3.0, "cache": str(root / "cache.zarr")})
    objective = distill_objective(config, reader, None, 64, training_rows=np.arange(reader.layout.samples))
    assert objective.targets.names == ("teacher/logits",)  # CLIP is never read
    _, order = objective.epoch_data(0, Part())
    indices = torch.from_numpy(order[:32])
    labels = torch.from_numpy(objective.targets.labels[order[:32]])
    student = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    terms = objective.losses(student, torch.zeros(32, 64), labels, indices, epoch=0)
    teacher_logits = torch.from_numpy(reader.read("teacher/logits", 0, reader.layout.samples, 0)[order[:32]]).float()
    assert torch.equal(terms["logit"], 3.0 * kd_loss(student, 0.7 * teacher_logits, 3.0))
    assert set(terms) == {"ce", "logit"}


def test_a_feature_loss_that_has_not_started_leaves_cross_entropy_training_unchanged(demo_cache, capsys):
    """Before --feature-start-epoch CRD only fills its memory: the student is bit-identical to the CE-only one.
    An --nce-k above the number of training samples is clamped, with a message."""
    root, data = demo_cache
    common = [*data, *OPTIMISATION[:4], "--epochs", "2", "--num-workers", "0", "--device", "cpu",
              "--arch", "resnet8", "--cache", str(root / "cache.zarr")]
    assert run_cli(["distill", *common, "--variant", "none", "--out", str(root / "ce_only")]) == 0
    capsys.readouterr()
    assert run_cli(["distill", *common, "--variant", "F", "--feature-start-epoch", "2", "--nce-k", "100000",
                    "--out", str(root / "f_later")]) == 0
    said = " ".join(capsys.readouterr().err.split())  # the console wraps its lines
    assert "--nce-k 100000 is not below the 1800 training samples: CRD draws 1799 negatives per sample" in said
    ce_only, _ = read_checkpoint(root / "ce_only" / "checkpoints" / "last.pt")
    f_later, _ = read_checkpoint(root / "f_later" / "checkpoints" / "last.pt")
    assert all(torch.equal(ce_only[key], f_later[key]) for key in ce_only)


def test_the_feature_loss_ramps_in_after_its_start():
    from richkd.pipeline.config import build_config
    from richkd.stages.distill import DistillConfig

    config = build_config(DistillConfig, "distill", overrides={"feature_start_epoch": 2, "feature_warmup_epochs": 4})
    assert [config.feature_schedule(epoch) for epoch in range(8)] == [0, 0, 0.25, 0.5, 0.75, 1, 1, 1]
    assert build_config(DistillConfig, "distill").feature_schedule(0) == 1
