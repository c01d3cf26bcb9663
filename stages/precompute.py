"""`richkd precompute`: run the teacher and CLIP once over every view of every sample and cache their outputs.

Work is cut into (view, shard) blocks, the store's write unit. Blocks already marked done are never
recomputed, so an interrupted run continues where it stopped; batches never cross a block boundary,
so a resumed store is identical to one written in one go.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info
from torch.utils.data.dataloader import default_collate

from richkd.cache.locks import BlockLocks
from richkd.cache.reader import CacheReader
from richkd.cache.schema import VIEW_PARAMS, Layout, Source, topk_arrays
from richkd.cache.writer import ADDITION, CacheWriter, store_to_add_to
from richkd.pipeline.clip import (
    DEFAULT_TEMPLATES,
    RANDOM_WEIGHTS,
    SCHEMAS,
    load_clip,
    prompt_class_name,
    read_class_names,
    read_templates,
)
from richkd.pipeline.config import (
    require,
    to_dict,
)
from richkd.pipeline.data import ImageDataset, normalize, require_labelled
from richkd.pipeline.datasets import open_dataset
from richkd.pipeline.distributed import barrier, is_main_process, main_process_first, process_group
from richkd.pipeline.errors import UserError
from richkd.pipeline.execution import autocast, progress_bar, resolve_device, software_versions
from richkd.pipeline.models import create_model, file_sha256, load_checkpoint
from richkd.pipeline.normalization import Normalization, choose_normalization, normalized
from richkd.pipeline.prompts import zero_shot_classifier
from richkd.pipeline.runtime import Part, console, parse_part, warn
from richkd.pipeline.shards import decode_image, scan_shards, shard_starts, stream_shard, streamed_shard_set
from richkd.pipeline.topk import top_k_logits
from richkd.pipeline.views import (
    describe_policy,
    image_for_views,
    make_view_policy,
    policy_from_description,
    policy_summary,
    rebuild_view,
    sample_view,
)
from richkd.stages.options import PrecomputeConfig, SourceSpec


@dataclass
class PrecomputeResult:
    store: str
    blocks_written: int
    images: int
    seconds: float  # the whole run, model loading and text encoding included
    loop_seconds: float  # from the first batch requested to the last block written

    @property
    def images_per_second(self) -> float:
        return self.images / self.loop_seconds if self.loop_seconds else 0.0


class SampleViews(Dataset):
    """store row -> every view of that sample, cut from one decode of its image: uint8 (V, 3, h, w) pixels, the
    (V, k) parameters, and the row. Row i is dataset index i, and its views' parameters are drawn from the seed."""

    def __init__(self, dataset: ImageDataset, policy, seed: int, views: int):
        self.dataset, self.policy, self.seed, self.views = dataset, policy, seed, views

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, row: int):
        return self.views_of(row)

    def views_of(self, row: int, image: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The views of store row `row`, cut from `image` when it was streamed."""
        image = image_for_views(self.dataset, self.policy, self.sample(row), image)
        params = [self.params(view, row, image) for view in range(self.views)]
        views = [rebuild_view(self.policy, image, p, self._partner(view)) for view, p in enumerate(params)]
        return torch.stack(views), torch.from_numpy(np.stack(params)), row

    def sample(self, row: int) -> int:
        """The dataset index of store row `row`."""
        return row

    def params(self, view: int, row: int, image: torch.Tensor) -> np.ndarray:
        return sample_view(self.policy, self.seed, view, row, image)

    def _partner(self, view: int):
        """A store row's image and the params of its view `view`, for mixing."""
        def image_and_params(row: int) -> tuple[torch.Tensor, np.ndarray]:
            image = image_for_views(self.dataset, self.policy, self.sample(row))
            return image, self.params(view, row, image)
        return image_and_params


class StoredViews(SampleViews):
    """The views a finished store holds, replayed from its stored parameters, of a dataset that lists the store's
    samples in the order `sample_of_row` (None: the store's). Each process reads one shard's parameters at a time."""

    def __init__(self, dataset: ImageDataset, policy, url: str, layout: Layout, sample_of_row: np.ndarray | None):
        super().__init__(dataset, policy, seed=0, views=layout.views)  # no seed: the parameters are read, not drawn
        self.url, self.layout, self.sample_of_row = url, layout, sample_of_row
        self.reader: CacheReader | None = None  # opened in the process that reads (a loader worker)
        self.shard, self.shard_params = -1, None

    def sample(self, row: int) -> int:
        return row if self.sample_of_row is None else int(self.sample_of_row[row])

    def views_of(self, row: int, image: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
        shard = row // self.layout.shard_size
        if shard != self.shard:
            if self.reader is None:
                self.reader = CacheReader(self.url)
            start, stop = self.layout.shard_range(shard)
            self.shard_params = [self.reader.read(VIEW_PARAMS, start, stop, view) for view in range(self.views)]
            self.shard = shard
        return super().views_of(row, image)

    def params(self, view: int, row: int, image: torch.Tensor) -> np.ndarray:
        start, stop = self.layout.shard_range(self.shard)
        if start <= row < stop:
            return self.shard_params[view][row - start]
        return self.reader.read(VIEW_PARAMS, row, row + 1, view)[0]  # a mixing partner in another shard


class ShardBatches(Sampler):
    """Batches of sample indices, each inside one shard, shard by shard (generated lazily). A batch always starts
    at the same sample whatever was written before, so a resumed store is identical to one written in one go."""

    def __init__(self, layout: Layout, shards: list[int], samples_per_batch: int):
        self.layout, self.shards, self.samples_per_batch = layout, shards, samples_per_batch

    def __iter__(self):
        for shard in self.shards:
            start, stop = self.layout.shard_range(shard)
            for first in range(start, stop, self.samples_per_batch):
                yield list(range(first, min(first + self.samples_per_batch, stop)))

    def __len__(self) -> int:
        sizes = (stop - start for start, stop in map(self.layout.shard_range, self.shards))
        return sum(-(-size // self.samples_per_batch) for size in sizes)


class StreamedSampleViews(IterableDataset):
    """The batches ShardBatches cuts from `shards`, their images streamed from the tar shards holding them (`urls`,
    whose samples fill the store's rows in order, as `views.dataset` was scanned from them); loader workers split
    the store shards."""

    def __init__(self, views: SampleViews, urls: list[str], layout: Layout, shards: list[int], samples_per_batch: int):
        self.views, self.urls, self.layout, self.shards = views, urls, layout, shards
        self.samples_per_batch = samples_per_batch
        self.starts = shard_starts(views.dataset.shard_sizes)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for shard in self.shards[worker::workers]:
            start, stop = self.layout.shard_range(shard)
            batch = []
            for row, image in self.images(start, stop):
                batch.append(self.views.views_of(row, image))
                if len(batch) == self.samples_per_batch or row == stop - 1:
                    yield default_collate(batch)
                    batch = []

    def images(self, start: int, stop: int):
        """(row, image) of rows `start` to `stop` - 1, each tar shard holding some of them read to its end (the
        samples outside the range are not decoded), and checked against what the scan found."""
        dataset = self.views.dataset
        for number in np.flatnonzero((self.starts[:-1] < stop) & (self.starts[1:] > start)):
            url, first, expected = self.urls[number], int(self.starts[number]), dataset.shard_sizes[number]
            count = 0
            for count, (key, label, encoded) in enumerate(stream_shard(url, len(dataset.class_names)), 1):
                row = first + count - 1
                if count > expected or (key, label) != (dataset.keys[row], dataset.labels[row]):
                    raise UserError(f"shard {url} changed while precompute read it: its sample {count} is now "
                                    f"'{key}' of class {label}; precompute again from shards that stay as they are")
                if start <= row < stop:
                    yield row, decode_image(encoded, f"{key} in {url}")
            if count != expected:
                raise UserError(f"shard {url} changed while precompute read it: it holds {count} samples, where it "
                                f"held {expected}; precompute again from shards that stay as they are")


def to_storage(name: str, values: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    """A model output as the store's dtype, refusing NaN and inf rather than caching them."""
    if not torch.isfinite(values).all():
        raise UserError(f"{name} has NaN or inf values: check the model and its checkpoint")
    with np.errstate(over="ignore"):  # overflow is reported below, as a user error
        stored = values.cpu().numpy().astype(dtype)
    if not np.isfinite(stored).all():
        raise UserError(f"{name} has values beyond the range of {dtype}: use --dtype float32")
    return stored


class ClassifierModel:
    """A conventional classifier source: its logits and pooled features on views fed as it was trained."""

    def __init__(self, source: Source, model: torch.nn.Module, normalization: Normalization, record: dict):
        self.source, self.model, self.normalization, self.record = source, model, normalization, record
        self.logit_scale = 1.0
        # Channels-last convolutions are faster with cuDNN and with oneDNN on the CPU alike.
        model.to(memory_format=torch.channels_last)

    def static_arrays(self) -> dict[str, np.ndarray]:
        return {}

    def __call__(self, views: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = normalize(views, self.normalization.mean, self.normalization.std).contiguous(
            memory_format=torch.channels_last)
        with autocast(device):
            logits, features = self.model(inputs)
        return logits.float(), features.float()


class ClipModel:
    """A CLIP source: the cosines of its L2-normalised image embeddings with its prompt-ensemble class embeddings."""

    def __init__(self, source: Source, clip, class_embeds: torch.Tensor, prompt_embeds: torch.Tensor, record: dict):
        self.source, self.clip, self.record = source, clip, record
        self.class_embeds, self.prompt_embeds = class_embeds, prompt_embeds
        self.logit_scale = clip.logit_scale
        clip.model.to(memory_format=torch.channels_last)

    def static_arrays(self) -> dict[str, np.ndarray]:
        return {self.source.class_embeds: self.class_embeds.cpu().numpy(),
                self.source.prompt_embeds: self.prompt_embeds.cpu().numpy()}

    def __call__(self, views: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.clip.preprocess(views).contiguous(memory_format=torch.channels_last)
        with autocast(device):
            image_embeds = self.clip.encode_images(inputs)
        image_embeds = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
        return image_embeds @ self.class_embeds.T, image_embeds  # the class embeddings were made on the device


class Models:
    """Every source a run writes, and one batched forward pass of all of them on the same views."""

    def __init__(self, sources: list[ClassifierModel | ClipModel], device: torch.device):
        self.sources, self.device = sources, device

    @torch.inference_mode()
    def __call__(self, views: torch.Tensor) -> dict[str, torch.Tensor]:
        views = views.to(self.device, non_blocking=True)
        outputs = {}
        for model in self.sources:
            logits, features = model(views, self.device)
            outputs[model.source.logits] = logits
            if model.source.features:
                outputs[model.source.features] = features
        return outputs


def load_teacher(arch: str, checkpoint: str, num_classes: int, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The teacher in eval mode, and what its checkpoint records besides the weights."""
    teacher = create_model(arch, num_classes)
    saved = load_checkpoint(teacher, checkpoint)
    return teacher.to(device).eval(), saved


def require_same_classes(trained: list[str] | None, class_names: list[str], checkpoint: str, split: str) -> None:
    """Refuse a teacher whose recorded classes are not the split's, in the same order: its logits would be stored
    under other class ids (a renamed class folder shifts them all)."""
    if trained is None or list(trained) == list(class_names):
        return
    differ = (i for i, (a, b) in enumerate(zip(trained, class_names)) if a != b)
    index = next(differ, min(len(trained), len(class_names)))
    there = f"'{trained[index]}'" if index < len(trained) else "absent"
    here = f"'{class_names[index]}'" if index < len(class_names) else "absent"
    raise UserError(f"{checkpoint} was trained on other classes than {split} (class {index} is {there} there and "
                    f"{here} here): its logits would be stored under the wrong classes")


@dataclass
class Job:
    """What one precompute run writes: the sources it runs, the views it feeds them, and how it opens its store (on
    the first process, then on the others)."""

    layout: Layout
    models: Models
    sample_views: SampleViews
    open_first: Callable[[], CacheWriter]
    open_then: Callable[[], CacheWriter]
    announce: tuple[str, ...]
    lock_scope: str = ""
    tar_urls: list[str] | None = None
    adds_sources: bool = False


def run(config: PrecomputeConfig) -> PrecomputeResult:
    started = time.perf_counter()
    device = resolve_device(config.device)
    job = added_sources_job(config, device) if config.add_source else new_store_job(config, device)
    layout = job.layout
    with process_group(device) as ranks:
        part = parse_part(config.part) if config.part else ranks
        writer = main_process_first(job.open_first, job.open_then)
        for line in job.announce:
            console.print(line, soft_wrap=True)
        done = writer.done()
        # A process owns whole shards: each image is decoded once, and all its views are cut from it.
        owned = [(view, shard) for view, shard in layout.blocks() if part.owns(shard)]
        pending = [(view, shard) for view, shard in owned if not done[view, shard]]
        if len(pending) < len(owned):
            console.print(f"continuing {config.out}{part_label(part)}: {len(owned) - len(pending)} of {len(owned)} "
                          "blocks already done")
        shards = sorted({shard for _, shard in pending})
        images = layout.views * sum(stop - start for start, stop in map(layout.shard_range, shards))
        samples_per_batch = max(1, config.batch_size // layout.views)
        if job.tar_urls is not None:
            batches = {"dataset": StreamedSampleViews(job.sample_views, job.tar_urls, layout, shards,
                                                      samples_per_batch), "batch_size": None}
        else:
            batches = {"dataset": job.sample_views, "batch_sampler": ShardBatches(layout, shards, samples_per_batch)}
        loader = DataLoader(**batches, num_workers=config.num_workers, pin_memory=device.type == "cuda")
        locks = BlockLocks(config.out, str(part), config.lock_timeout, job.lock_scope)
        try:
            with writer.full_disk_is_a_user_error():
                locks.claim(pending)
            loop_started = time.perf_counter()
            write_shards(writer, locks, set(pending), loader, job.models, images)
            loop_seconds = time.perf_counter() - loop_started
        finally:
            locks.close()
        barrier()
        main = is_main_process()  # asked while the process group still exists
        if job.adds_sources and main:
            # Commands adding other sources at the same time each rewrite the root attributes, and one may have
            # lost another's record: each records its sources again once its blocks are written.
            job.open_then()
    done = writer.done()
    unwritten = [(view, shard) for view, shard in owned if not done[view, shard]]
    if unwritten:
        raise RuntimeError(f"{len(unwritten)} blocks of {config.out} were not written")
    seconds = time.perf_counter() - started
    names = ", ".join(model.source.name for model in job.models.sources)
    if done.all():
        if main:
            console.print(f"cache complete: {config.out} ({layout.views} views x {layout.samples} samples; sources "
                          f"written: {names}; {seconds:.1f} s)")
    else:
        console.print(f"part {part} of {config.out} written; the store has {int(done.sum())} of {done.size} "
                      f"blocks of {names} ({seconds:.1f} s)")
    return PrecomputeResult(store=config.out, blocks_written=len(pending), images=images, seconds=seconds,
                            loop_seconds=loop_seconds)


def new_store_job(config: PrecomputeConfig, device: torch.device) -> Job:
    """A new store (or the unfinished one at --out): views drawn from the seed, the teacher, CLIP and --source's."""
    if config.stream:
        shard_set = streamed_shard_set(config.data_root, config.split, config.class_names)
        dataset = scan_shards(shard_set, config.split)
    else:
        dataset = open_dataset(config.dataset, config.data_root, config.split, config.download)
        require_labelled(dataset, "--split")
    policy = make_view_policy(config.view_policy, dataset.native_size, config.image_size, config.augment,
                              config.random_erase, config.mix, len(dataset))
    teacher = classifier_model("teacher", config.teacher, config.teacher_checkpoint, config.normalize, dataset,
                               config.outputs, device)
    # The dataset's record holds what the teacher is fed: students are fed the same by default.
    dataset = normalized(dataset, teacher.normalization)
    models = [teacher, clip_model("clip", config.clip, config.clip_pretrained, config, dataset, device)]
    models += [source_model(spec, config, dataset, device) for spec in config.source_specs()]
    require(config.topk < len(dataset.class_names),
            f"--topk {config.topk} is not below the dataset's {len(dataset.class_names)} classes: "
            "use --topk 0 to store every logit")
    layout = Layout(
        views=config.views,
        samples=len(dataset),
        classes=len(dataset.class_names),
        view_params=len(policy.param_names),
        shard_size=config.shard_size,
        chunk_size=min(1024, config.shard_size),
        precision=config.dtype,
        topk=config.topk,
        topk_temperature=config.topk_temperature,
    )
    sources = tuple(model.source for model in models)
    provenance = {
        "layout": layout.describe(),
        "dataset": dataset.describe(),
        "views": {**describe_policy(policy), "seed": config.seed, "count": config.views},
        "sources": {model.source.name: model.record for model in models},
        **run_record(config),
    }

    def open_first() -> CacheWriter:
        writer = CacheWriter.open(config.out, layout, provenance, sources, overwrite=config.overwrite)
        writer.write_static({"labels": dataset.labels, "keys": np.asarray(dataset.keys, dtype=str),
                             **static_arrays(models)})
        return writer

    return Job(layout, Models(models, device), SampleViews(dataset, policy, config.seed, layout.views), open_first,
               lambda: CacheWriter.open(config.out, layout, provenance, sources),
               (policy_summary(policy, dataset.native_size), teacher.normalization.summary()),
               tar_urls=shard_set.urls if config.stream else None)


def added_sources_job(config: PrecomputeConfig, device: torch.device) -> Job:
    """--add-source: the sources run on the views the finished store holds, replayed from its parameters."""
    store_to_add_to(config.out)
    reader = CacheReader(config.out)
    if not reader.done(sources=()).all():
        raise UserError(f"cache {config.out} is unfinished: finish it with its own precompute command before adding "
                        "sources to it")
    dataset = open_dataset(config.dataset, config.data_root, config.split, config.download)
    require_labelled(dataset, "--split")
    rows = reader.rows_of(dataset)
    policy = policy_from_description(reader.attrs["views"])
    specs = config.source_specs()
    models = [source_model(spec, config, dataset, device) for spec in specs]
    addition = {ADDITION: run_record(config)}
    records = {model.source.name: {**model.record, **addition} for model in models}
    sources = tuple(model.source for model in models)
    layout = reader.layout

    def open_writer() -> CacheWriter:
        writer = CacheWriter.add(config.out, sources, records)
        writer.write_static(static_arrays(models))
        return writer

    sample_views = StoredViews(dataset, policy, config.out, layout, None if rows is None else np.argsort(rows))
    return Job(layout, Models(models, device), sample_views, open_writer, lambda: CacheWriter.add(
        config.out, sources, records), (policy_summary(policy, dataset.native_size),),
        lock_scope="+".join(spec.name for spec in specs), adds_sources=True)


def run_record(config: PrecomputeConfig) -> dict:
    """The software, resolved configuration and time of a run."""
    return {"software": software_versions(), "config": to_dict(config),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def static_arrays(models: list[ClassifierModel | ClipModel]) -> dict[str, np.ndarray]:
    return {name: values for model in models for name, values in model.static_arrays().items()}


def source_model(spec: SourceSpec, config: PrecomputeConfig, dataset: ImageDataset,
                 device: torch.device) -> ClassifierModel | ClipModel:
    """The model of a source named by --source or --add-source; a classifier is fed as its checkpoint records."""
    if spec.kind == "classifier":
        return classifier_model(spec.name, spec.model, spec.weights, "auto", dataset, config.outputs, device)
    if spec.weights is None and not spec.model.startswith(SCHEMAS):
        raise UserError(f"source {spec.name}: give the weights of CLIP {spec.model}, as "
                        f"{spec.name}=clip:{spec.model}@TAG (an open_clip pretrained tag, a checkpoint file or random)")
    return clip_model(spec.name, spec.model, spec.weights, config, dataset, device)


def classifier_model(name: str, arch: str, checkpoint: str, normalize_spec: str, dataset: ImageDataset,
                     outputs: str, device: torch.device) -> ClassifierModel:
    label = "teacher checkpoint" if name == "teacher" else f"source {name}'s checkpoint"
    if not Path(checkpoint).is_file():
        raise UserError(f"{label} {checkpoint} does not exist")
    model, saved = load_teacher(arch, checkpoint, len(dataset.class_names), device)
    require_same_classes(saved.get("class_names"), dataset.class_names, f"{label} {checkpoint}",
                         f"{dataset.name} / {dataset.split}")
    normalization = choose_normalization(normalize_spec, dataset, saved.get("normalization"), f"{label} {checkpoint}",
                                         binding=True)
    source = Source(name, "classifier", model.feature_dim, outputs=outputs)
    return ClassifierModel(source, model, normalization, {
        **source.describe(), "arch": arch, "checkpoint_sha256": file_sha256(checkpoint),
        "feature_dim": model.feature_dim, "input_transform": normalization.describe()})


def clip_model(name: str, model_name: str, pretrained: str | None, config: PrecomputeConfig, dataset: ImageDataset,
               device: torch.device) -> ClipModel:
    clip = load_clip(model_name, pretrained, device)
    if pretrained == RANDOM_WEIGHTS and not model_name.startswith(SCHEMAS):
        warn(f"CLIP {model_name} has random weights, so its zero-shot targets carry no knowledge")
    templates = read_templates(config.templates) if config.templates else list(DEFAULT_TEMPLATES)
    if config.class_names:
        names = read_class_names(config.class_names, len(dataset.class_names))
    else:
        names = list(dataset.class_names)
    prompt_names = names if config.raw_class_names else [prompt_class_name(name) for name in names]
    class_embeds, prompt_embeds = zero_shot_classifier(clip, prompt_names, templates, device)
    source = Source(name, "clip", class_embeds.shape[-1], len(templates), config.outputs)
    return ClipModel(source, clip, class_embeds, prompt_embeds,
                     {**source.describe(), **clip.describe(), "templates": templates, "class_names": prompt_names})


def part_label(part: Part) -> str:
    return f" (part {part})" if part.count > 1 else ""


def write_shards(writer: CacheWriter, locks: BlockLocks, pending: set[tuple[int, int]], loader, models: Models,
                 images: int) -> None:
    """Fill each shard's buffers, every view of a batch of samples at a time, batches of a shard in row order; hand
    its `pending` blocks to a writer thread so that writing overlaps compute. A block already written is computed
    again (its shard's batches hold every view, the same as in one go) but not rewritten."""
    layout = writer.layout
    dtypes = {name: np.dtype(array.dtype) for name, array in writer.arrays.items()}
    scales = {model.source.logits: model.logit_scale for model in models.sources}
    writes: list[Future] = []
    # Shards being filled: one, or one per loader worker when workers stream shards of their own.
    buffers: dict[int, list[dict[str, list[np.ndarray]]]] = {}
    filled: dict[int, int] = {}
    with ThreadPoolExecutor(max_workers=1) as pool, progress_bar("img") as progress:
        task = progress.add_task("precompute", total=images)
        for views, params, rows in loader:  # (samples, V, 3, h, w), (samples, V, k), (samples,)
            shard = int(rows[0]) // layout.shard_size
            if shard not in buffers:
                buffers[shard] = [{name: [] for name in writer.per_view_arrays} for _ in range(layout.views)]
                filled[shard] = 0
            samples = len(views)
            outputs = stored_outputs(models(views.flatten(0, 1)), scales, layout)
            stored = {name: to_storage(name, values, dtypes[name]).reshape(samples, layout.views, -1)
                      for name, values in outputs.items()}  # one check and one copy to the host per array
            for view, buffer in enumerate(buffers[shard]):
                if VIEW_PARAMS in buffer:
                    buffer[VIEW_PARAMS].append(params[:, view].numpy())
                for name, values in stored.items():
                    buffer[name].append(values[:, view])
            filled[shard] += samples
            progress.advance(task, samples * layout.views)
            start, stop = layout.shard_range(shard)
            if filled[shard] == stop - start:
                for view, buffer in enumerate(buffers.pop(shard)):
                    if (view, shard) in pending:
                        block = {name: np.concatenate(parts) for name, parts in buffer.items()}
                        writes.append(pool.submit(write_and_release, writer, locks, view, shard, block))
                # At most two shards in memory waiting to be written; a failed write stops the run here.
                while len(writes) > layout.views:
                    writes.pop(0).result()
        for write in writes:
            write.result()


def stored_outputs(outputs: dict[str, torch.Tensor], logit_scales: dict[str, float],
                   layout: Layout) -> dict[str, torch.Tensor]:
    """The models' outputs as `layout` stores them: in a top-k store, each logit array (a key of `logit_scales`) as
    its top-k pair, the rest exact at the store's temperature for a classifier's logits (scale 1) and for a CLIP's
    cosines at its own scale (its zero-shot probabilities)."""
    if not layout.topk:
        return outputs
    stored = dict(outputs)
    for logits, scale in logit_scales.items():
        values, classes = topk_arrays(logits)
        stored[values], stored[classes] = top_k_logits(stored.pop(logits), layout.topk, layout.topk_temperature / scale)
    return stored


def write_and_release(writer: CacheWriter, locks: BlockLocks, view: int, shard: int,
                      block: dict[str, np.ndarray]) -> None:
    writer.write_block(view, shard, block)
    locks.release(view, shard)
