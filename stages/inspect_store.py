"""`richkd inspect STORE`: what a cache holds and how good its targets are, computed from the store alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

from richkd.cache.reader import CacheReader, block_name
from richkd.cache.schema import DONE, VIEW_PARAMS, read_done_flags
from richkd.pipeline.data import normalize
from richkd.pipeline.datasets import open_dataset
from richkd.pipeline.errors import UserError
from richkd.pipeline.execution import progress_bar, resolve_device
from richkd.pipeline.metrics import percent
from richkd.pipeline.models import file_sha256
from richkd.pipeline.runtime import print_json, results
from richkd.pipeline.targets import (
    ALPHAS,
    SWEEP_FUSIONS,
    best_weightings,
    describe_fused,
    describe_overlap,
    target_quality,
)
from richkd.pipeline.variants import describe_weights
from richkd.pipeline.views import augmentation_summary, image_for_views, policy_from_description, rebuild_view
from richkd.stages.options import VIEW_TOLERANCE
from richkd.stages.precompute import load_teacher


def array_summary(reader: CacheReader) -> list[dict]:
    summary = []
    for name in reader.specs:
        array = reader.array(name)
        summary.append({
            "name": name,
            "shape": list(array.shape),
            "dtype": "str" if array.dtype.kind == "T" else str(array.dtype),
            "chunks": list(array.chunks),
            "shards": list(array.shards) if array.shards else None,
            "bytes": int(array.nbytes),
            "bytes_stored": int(array.nbytes_stored()),
        })
    return summary


def verify(reader: CacheReader) -> tuple[int, list[str]]:
    """Read every chunk that should hold data; (blocks read, one line per damaged or missing block). A block
    whose progress flag is damaged is listed, and its data is not read: precompute computes it again. A block whose
    shard file is gone is named as missing (zarr would read it as the fill value)."""
    layout = reader.layout
    # Each flags array, and the per-view arrays whose blocks it flags.
    flagged: dict[str, list[str]] = {DONE: [VIEW_PARAMS]}
    for source in reader.sources.values():
        flagged.setdefault(source.done_flags, []).extend(source.per_view_arrays(layout.topk))
    reads, damaged = [], []
    for flags, names in flagged.items():
        done, damaged_flags = read_done_flags(reader.array(flags))
        damaged += [f"{flags} view {view} shard {shard} is damaged (its block is computed again by precompute)"
                    for view, shard in damaged_flags]
        reads += [(name, *layout.shard_range(s), v) for name in names for v in range(layout.views)
                  for s in range(layout.num_shards) if done[v, s]]
    per_view = {name for names in flagged.values() for name in names}
    for name, spec in reader.specs.items():
        if name in flagged or name in per_view:
            continue
        if len(spec.shape) == 1:
            reads += [(name, *layout.shard_range(s), None) for s in range(layout.num_shards)]
        else:
            reads.append((name, 0, spec.shape[0], None))
    with progress_bar("block") as progress:
        for name, start, stop, view in progress.track(reads, description="verifying"):
            missing = reader.missing_file(name, start, view)
            if missing:
                damaged.append(f"{block_name(name, start, stop, view)} is missing: its file {missing} does not exist")
                continue
            try:
                reader.read(name, start, stop, view)
            except UserError as error:
                damaged.append(str(error).removeprefix(f"cache {reader.url}: ").split(";")[0])
    return len(reads), damaged


def verify_views(reader: CacheReader, count: int, data_root: str | None, teacher_checkpoint: str | None,
                 device: str) -> dict:
    """Rebuild `count` stored views (spread over the store's samples and views) from the dataset, run the teacher
    on them and compare its logits with the stored ones: the largest absolute and relative differences."""
    attrs, layout = reader.attrs, reader.layout
    config = attrs["config"]
    checkpoint = teacher_checkpoint or config["teacher_checkpoint"]
    if not Path(checkpoint).is_file():
        raise UserError(f"the store's teacher checkpoint {checkpoint} does not exist: pass --teacher-checkpoint")
    if file_sha256(checkpoint) != reader.source_records["teacher"]["checkpoint_sha256"]:
        raise UserError(f"teacher checkpoint {checkpoint} is not the one the store was made with (its sha256 differs)")
    reader.require_complete(("teacher",))
    dataset = open_dataset(config["dataset"], data_root or config["data_root"], attrs["dataset"]["split"])
    rows = reader.rows_of(dataset)
    rows = np.arange(len(dataset)) if rows is None else rows
    teacher_record = reader.source_records["teacher"]
    teacher, _ = load_teacher(teacher_record["arch"], checkpoint, layout.classes, resolve_device(device))
    policy = policy_from_description(attrs["views"])
    transform = reader.teacher_input_transform
    index_of_row = np.argsort(rows)

    def partner(view: int):
        def image_and_params(row: int) -> tuple[torch.Tensor, np.ndarray]:
            index = int(index_of_row[row])
            return image_for_views(dataset, policy, index), reader.read("views/params", row, row + 1, view)[0]
        return image_and_params

    pairs = [(pair % layout.views, int(index)) for pair, index in
             enumerate(np.linspace(0, len(dataset) - 1, min(count, len(dataset) * layout.views)).round())]
    largest = {"absolute": 0.0, "relative": 0.0}
    with progress_bar("view") as progress, torch.inference_mode():
        for view, index in progress.track(pairs, description="rebuilding views"):
            row = int(rows[index])
            params = reader.read("views/params", row, row + 1, view)[0]
            pixels = rebuild_view(policy, image_for_views(dataset, policy, index), params, partner(view))
            logits, _ = teacher(normalize(pixels[None].to(next(teacher.parameters()).device), transform["mean"],
                                          transform["std"]))
            stored_logits = reader.dense_logits("teacher", row, row + 1, view)
            listed = torch.ones_like(stored_logits, dtype=torch.bool)
            if layout.topk:  # only the top-k logits are stored as the teacher gave them
                listed[:] = False
                listed[0, reader.read("teacher/topk_classes", row, row + 1, view)[0].astype(np.int64)] = True
            difference = (logits.float().cpu() - stored_logits)[listed].abs()
            largest["absolute"] = max(largest["absolute"], float(difference.max()))
            largest["relative"] = max(largest["relative"],
                                      float((difference / stored_logits[listed].abs().clamp(min=1)).max()))
    return {"store": reader.url, "views_rebuilt": len(pairs), "largest_difference": largest["absolute"],
            "largest_relative_difference": largest["relative"], "tolerance": VIEW_TOLERANCE,
            "ok": largest["relative"] <= VIEW_TOLERANCE}


def inspect_store(url: str, max_views: int | None = None) -> dict:
    reader = CacheReader(url)
    done = reader.done()
    attrs = reader.attrs
    return {
        "store": url,
        "provenance": {**reader.provenance(), **{key: attrs[key] for key in ("software", "created") if key in attrs},
                       # each source's kind, feature size and outputs beside its record
                       "sources": {name: {**source.describe(), **reader.source_records[name]}
                                   for name, source in reader.sources.items()}},
        "complete": bool(done.all()),
        "blocks_done": int(done.sum()),
        "blocks_total": int(done.size),
        "arrays": array_summary(reader),
        "quality": target_quality(reader, max_views),
    }


def size(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")




def print_report(report: dict, console: Console) -> None:
    p = report["provenance"]
    dataset, views = p["dataset"], p["views"]
    console.print(f"[bold]{report['store']}[/]")
    console.print(f"dataset   {dataset['name']} / {dataset['split']}: {dataset['num_samples']} samples, "
                  f"{len(dataset['class_names'])} classes")
    stored = augmentation_summary(policy_from_description(views))
    console.print(f"views     {views['count']} x {views['policy']} (size {views['size']}), seed {views['seed']}"
                  + (f"; then {', '.join(stored)}" if stored else ""), soft_wrap=True)
    for name, source in p["sources"].items():
        console.print(f"{name:<9} {describe_source(source)}", soft_wrap=True)
    layout = p["layout"]
    logits = (f"top-{layout['topk']} logits per source (the rest's mass exact at T = {layout['topk_temperature']:g})"
              if layout.get("topk") else "dense logits")
    console.print(f"precision {layout['precision']}, {logits}, created {p.get('created', '?')}, "
                  f"torch {p.get('software', {}).get('torch', '?')}", soft_wrap=True)
    state = "complete" if report["complete"] else "INCOMPLETE"
    console.print(f"blocks    {report['blocks_done']} of {report['blocks_total']} written ({state})")

    arrays = Table(title="arrays", title_justify="left")
    arrays.add_column("array", no_wrap=True)
    for column in ("shape", "dtype", "chunk"):
        arrays.add_column(column, no_wrap=True)
    for column in ("size", "on disk"):
        arrays.add_column(column, justify="right", no_wrap=True)

    def dims(values) -> str:
        return "x".join(map(str, values))

    for a in report["arrays"]:
        arrays.add_row(a["name"], dims(a["shape"]), a["dtype"], dims(a["chunks"]), size(a["bytes"]),
                       size(a["bytes_stored"]))
    console.print(arrays)
    layout = p["layout"]
    console.print(f"per-sample arrays: chunks of {min(layout['chunk_size'], layout['shard_size'])} samples, "
                  f"one shard file per block of {layout['shard_size']} samples of one view")

    quality = report["quality"]
    if not quality["samples_evaluated"]:
        console.print("no block is written yet: nothing to evaluate")
        return
    rates = ", ".join(f"{name} {percent(metrics['top1'], 2)} (NLL {metrics['nll']:.3f})"
                      for name, metrics in quality["sources"].items())
    console.print(f"top-1 over {quality['samples_evaluated']} (view, sample) pairs of {quality['views_evaluated']} "
                  f"views: {rates}; fused ({describe_fused(quality)}) {percent(quality['fused']['top1'], 2)} "
                  f"(NLL {quality['fused']['nll']:.3f})", soft_wrap=True)
    if "error_overlap" in quality:
        console.print(f"errors    {describe_overlap(quality['error_overlap'])}")
    console.print(alpha_table(quality["alpha_sweep"]) if "alpha_sweep" in quality
                  else weightings_table(quality["weight_sweep"]))


def describe_source(source: dict) -> str:
    """A source's kind, model and outputs, from its provenance: `clip ViT-L-14 (openai), 12 templates, ...`."""
    if source["kind"] == "clip":
        weights = source["pretrained"] or (source["checkpoint_sha256"] or "")[:16]
        model = (f"{source['model']} ({weights}), {len(source['templates'])} templates, "
                 f"logit_scale {source['logit_scale']:.2f}")
    else:
        model = f"{source['arch']}, checkpoint sha256 {source['checkpoint_sha256'][:16]}"
    return f"{source['kind']} {model}; stores {'logits only' if source['outputs'] == 'logits' else 'all outputs'}"


def alpha_table(sweep: list[dict]) -> Table:
    """The alpha sweep of a store of the teacher and CLIP: each alpha's top-1, NLL and ECE, by fusion."""
    table = Table(title="fused targets by alpha (z_F = alpha z_T + (1 - alpha) scale s_C; standardized: each z-scored)",
                  title_justify="left")
    table.add_column("alpha", justify="right")
    for name in SWEEP_FUSIONS:
        for metric in ("top-1", "NLL", "ECE"):
            table.add_column(f"{name} {metric}", justify="right")
    for alpha in ALPHAS:
        row = [f"{alpha:.1f}"]
        for name in SWEEP_FUSIONS:
            r = next(x for x in sweep if x["clip_scale"] == name and x["alpha"] == alpha)
            row += [percent(r["top1"], 2), f"{r['nll']:.3f}", percent(r["ece"], 2)]
        table.add_row(*row)
    return table


def weightings_table(sweep: list[dict]) -> Table:
    """The best weightings of the sources, by fusion, of a sweep over every weighting in steps of 0.1."""
    table = Table(title="best fused targets by weights (sum of weight x source, each CLIP at the fusion's scale; "
                  "standardized: each z-scored)", title_justify="left")
    for column in ("fusion", "weights", "top-1", "NLL", "ECE"):
        table.add_column(column, justify="left" if column in ("fusion", "weights") else "right")
    for row in best_weightings(sweep):
        table.add_row(row["clip_scale"], describe_weights({name: w for name, w in row["weights"].items() if w > 0}),
                      percent(row["top1"], 2), f"{row['nll']:.3f}", percent(row["ece"], 2))
    return table


def run(store: str, json_output: bool, views: int | None, verify_chunks: bool, verify_view_count: int | None,
        data_root: str | None, teacher_checkpoint: str | None, device: str) -> None:
    """`richkd inspect` (its flags are defined in `richkd.cli`)."""
    if verify_view_count is not None:
        checked = verify_views(CacheReader(store), verify_view_count, data_root, teacher_checkpoint, device)
        if json_output:
            print_json(checked)
        else:
            verdict = "within" if checked["ok"] else "ABOVE"
            results.print(f"{store}: {checked['views_rebuilt']} views rebuilt; the teacher's logits differ from the "
                          f"stored ones by at most {checked['largest_difference']:.2e} "
                          f"({checked['largest_relative_difference']:.2e} of a logit's size, {verdict} the "
                          f"tolerance {VIEW_TOLERANCE:g})", soft_wrap=True)
        if not checked["ok"]:
            raise typer.Exit(1)
        return
    if verify_chunks:
        checked, damaged = verify(CacheReader(store))
        if json_output:
            print_json({"store": store, "blocks_checked": checked, "damaged": damaged})
        else:
            results.print(f"{store}: {checked} blocks read, {len(damaged) or 'none'} damaged or missing")
            for line in damaged:
                results.print(f"  {line}", highlight=False)
        if damaged:
            raise typer.Exit(1)
        return
    report = inspect_store(store, views)
    if json_output:
        print_json(report)
    else:
        print_report(report, results)

