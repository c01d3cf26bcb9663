"""Sparse top-k targets: `precompute --topk` stores each source's K largest logits and the rest as documented, and
fusing and the KD loss on that sparse form equal their dense computation on the rebuilt logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from richkd.cache.reader import CacheReader
from richkd.cache.schema import Source
from richkd.cli import run_cli
from richkd.pipeline.fusion import Fusion, fuse_logits, standardize
from richkd.pipeline.losses import kd_loss
from richkd.pipeline.topk import SparseLogits, sparse_kd_loss, top_k_logits
from richkd.pipeline.variants import VARIANTS, run_weights

K, T_REST = 5, 2.0


@pytest.fixture(scope="module")
def stores(tiny_world, tmp_path_factory):
    """The same precompute twice, dense and with --topk 5, in float32."""
    root = tmp_path_factory.mktemp("topk")
    dense, sparse = root / "dense.zarr", root / "top5.zarr"
    assert run_cli(tiny_world.precompute_args(dense, "--dtype", "float32")) == 0
    assert run_cli(tiny_world.precompute_args(sparse, "--dtype", "float32", "--topk", str(K),
                                              "--topk-temperature", str(T_REST))) == 0
    return dense, sparse


def rest_by_hand(z: np.ndarray, top: np.ndarray, temperature: float) -> np.ndarray:
    """T log(mean over the other classes of exp(z / T)), in float64 with numpy."""
    others = np.ones_like(z, dtype=bool)
    np.put_along_axis(others, top, False, axis=1)
    scaled = np.where(others, z.astype(np.float64) / temperature, -np.inf)
    peak = scaled.max(axis=1, keepdims=True)
    mean = np.exp(scaled - peak).sum(axis=1, keepdims=True) / others.sum(axis=1, keepdims=True)
    return temperature * (peak + np.log(mean))[:, 0]


def test_a_top_k_store_holds_the_dense_stores_top_k_and_the_rest_spread_evenly(stores):
    dense, sparse = (zarr.open_group(path, mode="r") for path in stores)
    assert "teacher/logits" not in sparse and "clip/logits" not in sparse
    assert sparse["teacher/topk_classes"].dtype == np.int16
    reader = CacheReader(str(stores[1]))
    assert (reader.layout.topk, reader.layout.topk_temperature) == (K, T_REST)
    # CLIP's cosines keep the mass of its own zero-shot probabilities, softmax(exp(logit_scale) s / T).
    for source, scale in (("teacher", 1.0), ("clip", reader.source_records["clip"]["logit_scale"])):
        temperature = T_REST / scale
        z = dense[f"{source}/logits"][...]  # (V, N, C)
        values, classes = sparse[f"{source}/topk_logits"][...], sparse[f"{source}/topk_classes"][...]
        for view in range(z.shape[0]):
            top = np.argsort(-z[view], axis=1, kind="stable")[:, :K]
            np.testing.assert_array_equal(np.sort(classes[view], axis=1), np.sort(top, axis=1))
            np.testing.assert_array_equal(values[view, :, :K], np.take_along_axis(z[view], classes[view], axis=1))
            np.testing.assert_allclose(values[view, :, K], rest_by_hand(z[view], top, temperature), rtol=1e-5,
                                       atol=1e-6)
            # Rebuilt, softmax at T keeps every top-k probability and the others' total mass.
            rebuilt = reader.dense_logits(source, 0, z.shape[1], view).double()
            p_rebuilt, p_dense = (torch.softmax(x / temperature, dim=1)
                                  for x in (rebuilt, torch.from_numpy(z[view]).double()))
            rows = np.arange(z.shape[1])[:, None]
            np.testing.assert_allclose(p_rebuilt[rows, top], p_dense[rows, top], rtol=1e-5, atol=1e-7)
    # A dense store records its layout as before top-k existed, so that older stores can still be continued.
    assert dense.attrs["layout"].keys() == sparse.attrs["layout"].keys() - {"topk", "topk_temperature"}


def test_a_top_k_store_distills_and_inspects(stores, tiny_world, tmp_path, capsys):
    sparse = str(stores[1])
    run = tmp_path / "student"
    assert run_cli(["distill", "--dataset", "cifar100", "--data-root", str(tiny_world.data_root), "--cache", sparse,
                    "--arch", "resnet8", "--variant", "LF", "--epochs", "1", "--batch-size", "8", "--nce-k", "8",
                    "--temperature", "4", "--device", "cpu", "--num-workers", "0", "--out", str(run)]) == 0
    assert ("the store holds the top 5 logits, the other classes' mass kept exact at T = 2: at --temperature 4"
            in capsys.readouterr().err)
    assert (run / "checkpoints" / "last.pt").is_file()
    assert run_cli(["inspect", sparse, "--verify"]) == 0
    assert "50 blocks read, none damaged" in capsys.readouterr().out  # 7 per-view arrays x 6 blocks + 8 others
    assert run_cli(["inspect", sparse]) == 0
    shown = capsys.readouterr().out
    assert "top-5 logits per source (the rest's mass exact at T = 2)" in shown and "teacher/topk_classes" in shown
    # Its views rebuild to the stored top-k logits, which are the teacher's own (float32: to rounding).
    assert run_cli(["inspect", sparse, "--verify-views", "20", "--json", "--device", "cpu"]) == 0
    checked = json.loads(capsys.readouterr().out)
    assert checked["views_rebuilt"] == 20 and checked["largest_difference"] < 1e-4


@pytest.mark.parametrize("flags, message", [
    (("--topk", "100"), "--topk 100 is not below the dataset's 100 classes: use --topk 0 to store every logit"),
    (("--topk", "-1"), "--topk must be 0 (dense) or positive, got -1"),
    (("--topk", "3", "--topk-temperature", "0"), "--topk-temperature must be positive, got 0.0"),
])
def test_bad_top_k_options_are_refused(flags, message, tiny_world, tmp_path, capsys):
    assert run_cli(tiny_world.precompute_args(tmp_path / "s.zarr", *flags)) == 2
    assert f"error: {message}\n" in capsys.readouterr().err
    assert not (tmp_path / "s.zarr").exists()


def sparse_sources(batch: int = 6, classes: int = 30, k: int = 4) -> dict[str, SparseLogits]:
    """A teacher and two CLIPs whose top-k overlap in some rows (each CLIP shares the teacher's best class half the
    time, in other rows)."""
    generator = torch.Generator().manual_seed(0)
    teacher = 3 * torch.randn(batch, classes, generator=generator)
    clip = 0.1 * torch.randn(batch, classes, generator=generator)
    clip[::2] += 0.5 * torch.nn.functional.one_hot(teacher[::2].argmax(dim=1), classes)
    clip_b16 = 0.1 * torch.randn(batch, classes, generator=generator)
    clip_b16[:3] += 0.5 * torch.nn.functional.one_hot(teacher[:3].argmax(dim=1), classes)
    return {name: SparseLogits.from_stored(*top_k_logits(z, k, 1.0), classes)
            for name, z in (("teacher", teacher), ("clip", clip), ("clip_b16", clip_b16))}


SOURCES = {"teacher": Source("teacher", "classifier", 8), "clip": Source("clip", "clip", 8, 1),
           "clip_b16": Source("clip_b16", "clip", 8, 1)}
SCALES = {"teacher": 1.0, "clip": 30.0, "clip_b16": 50.0}


@pytest.mark.parametrize("standardized", [False, True])
@pytest.mark.parametrize("variant", ["L", "shrink", "clip"])
@pytest.mark.parametrize("fuse", [None, {"teacher": 0.5, "clip": 0.3, "clip_b16": 0.2}])
def test_sparse_fusion_and_kd_equal_the_dense_computation(variant, standardized, fuse):
    """Over the union of the sources' listed classes, two sources (alpha) or three (--fuse)."""
    sources = sparse_sources()
    teacher, clip = sources["teacher"], sources["clip"]
    assert (teacher.classes[::2, :1] == clip.classes[::2, :1]).all()  # the overlap the union must count once
    weights = VARIANTS[variant].logit_weights(run_weights(variant, fuse, 0.7),
                                              {name: source.kind for name, source in SOURCES.items()})
    fusion = Fusion(tuple((SOURCES[name], weight, SCALES[name]) for name, weight in weights.items() if weight > 0),
                    standardized, topk=4, classes=30)
    stored = {}
    for name, logits in sources.items():
        stored |= {f"{name}/topk_logits": torch.cat([logits.values, logits.rest], dim=1),
                   f"{name}/topk_classes": logits.classes}
    fused = fusion.fuse(stored)
    dense = fuse_logits([(sources[name].dense(), weight, SCALES[name]) for name, weight in weights.items()],
                        standardized)
    torch.testing.assert_close(fused.dense(), dense)
    student = torch.randn(6, 30, generator=torch.Generator().manual_seed(1), requires_grad=True)
    sparse_loss = sparse_kd_loss(student, fused, 3.0)
    (sparse_grad,) = torch.autograd.grad(sparse_loss, student)
    dense_loss = kd_loss(student, dense, 3.0)
    (dense_grad,) = torch.autograd.grad(dense_loss, student)
    torch.testing.assert_close(sparse_loss, dense_loss)
    torch.testing.assert_close(sparse_grad, dense_grad)


def test_sparse_standardize_is_the_dense_z_score():
    teacher = sparse_sources()["teacher"]
    torch.testing.assert_close(teacher.standardized().dense(), standardize(teacher.dense()))
