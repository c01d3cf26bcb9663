"""`richkd inspect STORE`: what a cache holds and how good its targets are, computed from the store alone."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from richkd.cache.reader import CacheReader
from richkd.cache.schema import DONE, read_done_flags
from richkd.pipeline.errors import UserError
from richkd.pipeline.fusion import CLIP_SCALES
from richkd.pipeline.metrics import percent
from richkd.pipeline.runtime import print_json, progress_bar, results
from richkd.pipeline.targets import ALPHAS, target_quality


def array_summary(reader: CacheReader) -> list[dict]:
    summary = []
    for name in reader.layout.arrays():
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
    whose progress flag is damaged is listed, and its data is not read: precompute computes it again."""
    layout = reader.layout
    done, damaged_flags = read_done_flags(reader.array(DONE))
    reads = []
    for name, spec in layout.arrays().items():
        if name == DONE:
            continue
        if name in layout.per_view_arrays():
            reads += [(name, *layout.shard_range(s), v) for v in range(layout.views) for s in range(layout.num_shards)
                      if done[v, s]]
        elif len(spec.shape) == 1:
            reads += [(name, *layout.shard_range(s), None) for s in range(layout.num_shards)]
        else:
            reads.append((name, 0, spec.shape[0], None))
    damaged = [f"{DONE} view {view} shard {shard} is damaged (its block is computed again by precompute)"
               for view, shard in damaged_flags]
    with progress_bar("block") as progress:
        for name, start, stop, view in progress.track(reads, description="verifying"):
            try:
                reader.read(name, start, stop, view)
            except UserError as error:
                damaged.append(str(error).removeprefix(f"cache {reader.url}: ").split(";")[0])
    return len(reads), damaged


def inspect_store(url: str, max_views: int | None = None) -> dict:
    reader = CacheReader(url)
    done = reader.done()
    attrs = reader.attrs
    return {
        "store": url,
        "provenance": {key: attrs[key] for key in ("dataset", "views", "teacher", "clip", "layout", "software",
                                                   "created") if key in attrs},
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
    dataset, views, teacher, clip = p["dataset"], p["views"], p["teacher"], p["clip"]
    console.print(f"[bold]{report['store']}[/]")
    console.print(f"dataset   {dataset['name']} / {dataset['split']}: {dataset['num_samples']} samples, "
                  f"{len(dataset['class_names'])} classes")
    console.print(f"views     {views['count']} x {views['policy']} (size {views['size']}), seed {views['seed']}")
    console.print(f"teacher   {teacher['arch']}, checkpoint sha256 {teacher['checkpoint_sha256'][:16]}")
    weights = clip["pretrained"] or (clip["checkpoint_sha256"] or "")[:16]
    console.print(f"clip      {clip['model']} ({weights}), {len(clip['templates'])} templates, "
                  f"logit_scale {clip['logit_scale']:.2f}")
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
    console.print(f"top-1 over {quality['samples_evaluated']} (view, sample) pairs of {quality['views_evaluated']} "
                  f"views: teacher {percent(quality['teacher']['top1'], 2)}, "
                  f"CLIP {percent(quality['clip']['top1'], 2)}, "
                  f"fused (alpha {quality['fused_alpha']}, {quality['fused_clip_scale']}) "
                  f"{percent(quality['fused']['top1'], 2)}")
    sweep = Table(title="fused targets by alpha (z_F = alpha z_T + (1 - alpha) scale s_C)", title_justify="left")
    sweep.add_column("alpha", justify="right")
    for name in CLIP_SCALES:
        for metric in ("top-1", "NLL", "ECE"):
            sweep.add_column(f"{name} {metric}", justify="right")
    for alpha in ALPHAS:
        row = [f"{alpha:.1f}"]
        for name in CLIP_SCALES:
            r = next(x for x in quality["alpha_sweep"] if x["clip_scale"] == name and x["alpha"] == alpha)
            row += [percent(r["top1"], 2), f"{r['nll']:.3f}", percent(r["ece"], 2)]
        sweep.add_row(*row)
    console.print(sweep)


def command(
    store: Annotated[str, typer.Argument(help="The cache store (a path or fsspec URL).")],
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    views: Annotated[int | None, typer.Option(help="Only evaluate the first N views (default: all).", min=1)] = None,
    verify_chunks: Annotated[bool, typer.Option(
        "--verify", help="Read every written chunk, check its checksum, and list every damaged or missing "
        "block (exit status 1 if there is one).")] = False,
) -> None:
    """Show a cache's provenance, arrays and completeness, and the accuracy of its targets."""
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

