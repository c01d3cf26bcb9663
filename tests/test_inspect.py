"""`richkd inspect`: provenance, sizes and target quality, checked against numpy on the raw arrays."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr
from test_bad_input import assert_user_error

from richkd.cli import run_cli


@pytest.fixture(scope="module")
def store(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "cache.zarr"
    assert run_cli(tiny_world.precompute_args(out)) == 0
    return out


def nll_and_ece(logits: np.ndarray, labels: np.ndarray, bins: int = 15) -> tuple[float, float]:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    nll = -log_probs[np.arange(len(labels)), labels].mean()
    probs = np.exp(log_probs)
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return nll, ece


def test_json_report_matches_numpy(store, capsys):
    assert run_cli(["inspect", str(store), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    group = zarr.open_group(store, mode="r")
    labels = np.tile(group["labels"][:], 2)
    teacher = group["teacher/logits"][...].astype(np.float32).reshape(80, 100)
    cosines = group["clip/logits"][...].astype(np.float32).reshape(80, 100)
    logit_scale = group.attrs["sources"]["clip"]["logit_scale"]

    assert report["complete"] and report["blocks_done"] == report["blocks_total"] == 6
    quality = report["quality"]
    assert quality["samples_evaluated"] == 80
    assert quality["teacher"]["top1"] == pytest.approx(np.mean(teacher.argmax(1) == labels))
    assert quality["clip"]["top1"] == pytest.approx(np.mean(cosines.argmax(1) == labels))
    assert quality["fused"]["top1"] == pytest.approx(np.mean((0.7 * teacher + 0.3 * cosines).argmax(1) == labels))
    nll, _ = nll_and_ece(logit_scale * cosines, labels)
    assert quality["clip"]["nll"] == pytest.approx(nll, rel=1e-4)
    assert sum(quality["teacher"]["reliability"]["count"]) == 80
    rows = {(row["clip_scale"], row["alpha"]): row for row in quality["alpha_sweep"]}
    assert len(rows) == 33

    def z_scored(logits: np.ndarray) -> np.ndarray:
        return (logits - logits.mean(1, keepdims=True)) / (logits.std(1, keepdims=True) + 1e-6)

    for scale_name, fuse in (("raw", lambda a: a * teacher + (1 - a) * cosines),
                             ("clip", lambda a: a * teacher + (1 - a) * logit_scale * cosines),
                             ("standardized", lambda a: a * z_scored(teacher) + (1 - a) * z_scored(cosines))):
        for alpha in (0.0, 0.3, 1.0):
            fused = fuse(alpha)
            nll, ece = nll_and_ece(fused, labels)
            row = rows[(scale_name, alpha)]
            assert row["top1"] == pytest.approx(np.mean(fused.argmax(1) == labels))
            assert row["nll"] == pytest.approx(nll, rel=1e-4)
            assert row["ece"] == pytest.approx(ece, abs=1e-5)

    teacher_wrong, clip_wrong = teacher.argmax(1) != labels, cosines.argmax(1) != labels
    assert quality["error_overlap"] == pytest.approx({
        "both_right": np.mean(~teacher_wrong & ~clip_wrong), "only_teacher_wrong": np.mean(teacher_wrong & ~clip_wrong),
        "only_clip_wrong": np.mean(~teacher_wrong & clip_wrong), "both_wrong": np.mean(teacher_wrong & clip_wrong)})

    arrays = {a["name"]: a for a in report["arrays"]}
    assert arrays["teacher/logits"]["shape"] == [2, 40, 100] and arrays["teacher/logits"]["dtype"] == "float16"
    assert 0 < arrays["teacher/logits"]["bytes_stored"]
    assert report["provenance"]["sources"]["teacher"]["arch"] == "resnet8"


def test_table_report_and_incomplete_store(store, tmp_path, capsys):
    import shutil

    partial = tmp_path / "partial.zarr"
    shutil.copytree(store, partial)
    zarr.open_group(partial, mode="r+")["progress/done"][1, 2] = False
    assert run_cli(["inspect", str(partial)]) == 0
    out = capsys.readouterr().out
    assert "5 of 6 written (INCOMPLETE)" in out
    assert "fused targets by alpha" in out and "teacher/logits" in out
    assert "top-1 over 72 (view, sample) pairs" in " ".join(out.split())


def test_inspect_refuses_what_is_not_a_store(tmp_path, capsys):
    assert run_cli(["inspect", str(tmp_path / "missing.zarr")]) == 2
    assert "no cache store at" in capsys.readouterr().err


def damage(store, name: str, view: int, shard: int, how: str) -> None:
    shard_file = store / name / "c" / str(view) / str(shard) / "0"
    data = bytearray(shard_file.read_bytes())
    if how == "flip":
        data[len(data) // 3] ^= 0xFF
        shard_file.write_bytes(bytes(data))
    elif how == "truncate":
        shard_file.write_bytes(bytes(data[: len(data) // 2]))
    else:
        shard_file.unlink()


def test_verify_lists_every_damaged_block(store, tmp_path, capsys):
    import shutil

    assert run_cli(["inspect", str(store), "--verify"]) == 0
    assert "none damaged or missing" in " ".join(capsys.readouterr().out.split())

    broken = tmp_path / "broken.zarr"
    shutil.copytree(store, broken)
    damage(broken, "teacher/logits", 1, 1, "flip")
    damage(broken, "clip/image_embeds", 0, 2, "truncate")
    damage(broken, "views/params", 1, 0, "delete")
    assert run_cli(["inspect", str(broken), "--verify", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["blocks_checked"] == 6 * 5 + 3 * 2 + 2
    damaged = sorted(report["damaged"])
    assert len(damaged) == 3
    assert damaged[0].startswith("clip/image_embeds view 0 rows 32-39 is ")  # damaged or truncated: the index goes
    assert damaged[1].startswith("teacher/logits view 1 rows 16-31 is damaged (Stored and computed checksum")
    assert damaged[2] == "views/params view 1 rows 0-15 is missing: its file views/params/c/1/0/0 does not exist"
    # Reading the damaged store for numbers fails, naming the array and the rows, instead of giving zeros.
    assert run_cli(["inspect", str(broken)]) == 2
    assert "clip" not in (err := capsys.readouterr().err) and "teacher/logits view 1 rows 16-31 is damaged" in err


def test_verify_checks_the_arrays_metadata_and_names_missing_shard_files(store, tmp_path, capsys):
    """A fill value richkd never writes with let a deleted shard file read as zeros: every array's metadata is checked
    against the schema, and a written block whose shard file is gone is listed as missing."""
    altered = tmp_path / "altered.zarr"
    shutil.copytree(store, altered)
    damage(altered, "teacher/logits", 0, 1, "delete")
    metadata = altered / "teacher" / "logits" / "zarr.json"
    schema = json.loads(metadata.read_text())
    big_endian = json.loads(json.dumps(schema).replace('"little"', '"big"', 1))  # the chunks' own bytes codec
    for altered_schema, shown in (
            ({**schema, "fill_value": 0}, 'fill_value 0 where the store\'s layout says "NaN"'),
            ({**schema, "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1, 8, 100]}}},
             "chunk_grid.configuration.chunk_shape [1,8,100] where the store's layout says [1,16,100]"),
            (big_endian, 'codecs.0.configuration.codecs.0.configuration.endian "big" where the store\'s layout says '
                         '"little"')):
        metadata.write_text(json.dumps(altered_schema))
        assert_user_error(["inspect", str(altered), "--verify"], capsys, f"cache {altered}: array teacher/logits has "
                          f"{shown} (teacher/logits/zarr.json): the store was altered; delete it and run `richkd "
                          "precompute` again")
    metadata.write_text(json.dumps(schema))
    assert run_cli(["inspect", str(altered), "--verify", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["damaged"] == [
        "teacher/logits view 0 rows 16-31 is missing: its file teacher/logits/c/0/1/0 does not exist"]


def test_a_wrong_data_type_in_an_arrays_metadata_is_one_line_for_every_command(tiny_world, store, tmp_path, capsys):
    """zarr cannot parse float32's NaN fill value as an int16: inspect, --verify, distill and precompute said so in a
    traceback."""
    altered = tmp_path / "altered.zarr"
    shutil.copytree(store, altered)
    metadata = altered / "teacher" / "logits" / "zarr.json"
    metadata.write_text(metadata.read_text().replace('"float16"', '"int16"'))
    distill = ["distill", "--data-root", str(tiny_world.data_root), "--cache", str(altered), "--arch", "resnet8",
               "--epochs", "1", "--num-workers", "0", "--device", "cpu", "--out", str(tmp_path / "run")]
    for args in (["inspect", str(altered)], ["inspect", str(altered), "--verify"], distill,
                 tiny_world.precompute_args(altered)):
        assert_user_error(args, capsys, f"cache {altered}: array teacher/logits has data_type \"int16\" where the "
                          "store's layout says \"float16\" (teacher/logits/zarr.json): the store was altered")
