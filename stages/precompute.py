"""`richkd precompute`: run the teacher and CLIP once over every view of every sample and cache their outputs.

Work is cut into (view, shard) blocks, the store's write unit. Blocks already marked done are never
recomputed, so an interrupted run continues where it stopped; batches never cross a block boundary,
so a resumed store is identical to one written in one go.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info
from torch.utils.data.dataloader import default_collate

from richkd.cache.locks import BlockLocks
from richkd.cache.schema import TOPK_ARRAYS, Layout
from richkd.cache.writer import CacheWriter
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
from richkd.pipeline.normalization import choose_normalization, normalized
from richkd.pipeline.prompts import zero_shot_classifier
from richkd.pipeline.runtime import Part, console, parse_part, warn
from richkd.pipeline.shards import decode_image, scan_shards, shard_starts, stream_shard, streamed_shard_set
from richkd.pipeline.topk import top_k_logits
from richkd.pipeline.views import (
    describe_policy,
    image_for_views,
    make_view_policy,
    policy_summary,
    rebuild_view,
    sample_view,
)
from richkd.stages.options import PrecomputeConfig


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
    """index -> every view of sample `index`, cut from one decode of its image: uint8 (V, 3, h, w) pixels, the
    (V, k) parameters, and the index."""

    def __init__(self, dataset: ImageDataset, policy, seed: int, views: int):
        self.dataset, self.policy, self.seed, self.views = dataset, policy, seed, views

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.views_of(index)

    def views_of(self, index: int, image: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The views of sample `index`, cut from `image` when it was streamed."""
        image = image_for_views(self.dataset, self.policy, index, image)
        params = [sample_view(self.policy, self.seed, view, index, image) for view in range(self.views)]
        views = [rebuild_view(self.policy, image, p, self._partner(view)) for view, p in enumerate(params)]
        return torch.stack(views), torch.from_numpy(np.stack(params)), index

    def _partner(self, view: int):
        """Sample i's image and the params of its view `view`, for mixing (a store row is a dataset index)."""
        def image_and_params(index: int) -> tuple[torch.Tensor, np.ndarray]:
            image = image_for_views(self.dataset, self.policy, index)
            return image, sample_view(self.policy, self.seed, view, index, image)
        return image_and_params


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


class Models:
    """The teacher and CLIP, and one batched forward pass of both on the same views."""

    def __init__(self, teacher, dataset: ImageDataset, clip, class_embeds: torch.Tensor, device: torch.device):
        self.teacher, self.dataset, self.clip, self.device = teacher, dataset, clip, device
        self.class_embeds = class_embeds.to(device)
        # Channels-last convolutions are faster with cuDNN and with oneDNN on the CPU alike.
        self.teacher.to(memory_format=torch.channels_last)
        self.clip.model.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, views: torch.Tensor) -> dict[str, torch.Tensor]:
        views = views.to(self.device, non_blocking=True)
        teacher_input = normalize(views, self.dataset.mean, self.dataset.std).contiguous(
            memory_format=torch.channels_last)
        clip_input = self.clip.preprocess(views).contiguous(memory_format=torch.channels_last)
        with autocast(self.device):
            teacher_logits, teacher_features = self.teacher(teacher_input)
            image_embeds = self.clip.encode_images(clip_input)
        image_embeds = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
        return {
            "teacher/logits": teacher_logits.float(),
            "teacher/features": teacher_features.float(),
            "clip/image_embeds": image_embeds,
            "clip/logits": image_embeds @ self.class_embeds.T,
        }


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


def run(config: PrecomputeConfig) -> PrecomputeResult:
    started = time.perf_counter()
    device = resolve_device(config.device)
    if config.stream:
        shard_set = streamed_shard_set(config.data_root, config.split, config.class_names)
        dataset = scan_shards(shard_set, config.split)
    else:
        dataset = open_dataset(config.dataset, config.data_root, config.split, config.download)
        require_labelled(dataset, "--split")
    policy = make_view_policy(config.view_policy, dataset.native_size, config.image_size, config.augment,
                              config.random_erase, config.mix, len(dataset))
    if not Path(config.teacher_checkpoint).is_file():
        raise UserError(f"teacher checkpoint {config.teacher_checkpoint} does not exist")
    teacher, saved = load_teacher(config.teacher, config.teacher_checkpoint, len(dataset.class_names), device)
    require_same_classes(saved.get("class_names"), dataset.class_names,
                         f"teacher checkpoint {config.teacher_checkpoint}", f"{dataset.name} / {config.split}")
    normalization = choose_normalization(config.normalize, dataset, saved.get("normalization"),
                                         f"teacher checkpoint {config.teacher_checkpoint}", binding=True)
    dataset = normalized(dataset, normalization)
    clip = load_clip(config.clip, config.clip_pretrained, device)
    if config.clip_pretrained == RANDOM_WEIGHTS and not config.clip.startswith(SCHEMAS):
        warn(f"CLIP {config.clip} has random weights, so its zero-shot targets carry no knowledge")
    templates = read_templates(config.templates) if config.templates else list(DEFAULT_TEMPLATES)
    if config.class_names:
        names = read_class_names(config.class_names, len(dataset.class_names))
    else:
        names = list(dataset.class_names)
    prompt_names = names if config.raw_class_names else [prompt_class_name(name) for name in names]
    class_embeds, prompt_embeds = zero_shot_classifier(clip, prompt_names, templates, device)
    require(config.topk < len(dataset.class_names),
            f"--topk {config.topk} is not below the dataset's {len(dataset.class_names)} classes: "
            "use --topk 0 to store every logit")

    layout = Layout(
        views=config.views,
        samples=len(dataset),
        classes=len(dataset.class_names),
        teacher_dim=teacher.feature_dim,
        clip_dim=class_embeds.shape[-1],
        prompts=len(templates),
        view_params=len(policy.param_names),
        shard_size=config.shard_size,
        chunk_size=min(1024, config.shard_size),
        precision=config.dtype,
        topk=config.topk,
        topk_temperature=config.topk_temperature,
    )
    provenance = {
        "layout": layout.describe(),
        "dataset": dataset.describe(),
        "views": {**describe_policy(policy), "seed": config.seed, "count": config.views},
        "teacher": {
            "arch": config.teacher,
            "checkpoint_sha256": file_sha256(config.teacher_checkpoint),
            "feature_dim": teacher.feature_dim,
            "input_transform": normalization.describe(),
        },
        "clip": {**clip.describe(), "templates": templates, "class_names": prompt_names},
        "software": software_versions(),
        "config": to_dict(config),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with process_group(device) as ranks:
        part = parse_part(config.part) if config.part else ranks
        writer = main_process_first(
            lambda: open_writer(config, layout, provenance, dataset, class_embeds, prompt_embeds),
            lambda: CacheWriter.open(config.out, layout, provenance))
        for line in (policy_summary(policy, dataset.native_size), normalization.summary()):
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

        models = Models(teacher, dataset, clip, class_embeds, device)
        sample_views = SampleViews(dataset, policy, config.seed, layout.views)
        samples_per_batch = max(1, config.batch_size // layout.views)
        if config.stream:
            batches = {"dataset": StreamedSampleViews(sample_views, shard_set.urls, layout, shards, samples_per_batch),
                       "batch_size": None}
        else:
            batches = {"dataset": sample_views, "batch_sampler": ShardBatches(layout, shards, samples_per_batch)}
        loader = DataLoader(**batches, num_workers=config.num_workers, pin_memory=device.type == "cuda")
        locks = BlockLocks(config.out, str(part), config.lock_timeout)
        try:
            with writer.full_disk_is_a_user_error():
                locks.claim(pending)
            loop_started = time.perf_counter()
            write_shards(writer, locks, layout, set(pending), loader, models, images)
            loop_seconds = time.perf_counter() - loop_started
        finally:
            locks.close()
        barrier()
        main = is_main_process()  # asked while the process group still exists
    done = writer.done()
    unwritten = [(view, shard) for view, shard in owned if not done[view, shard]]
    if unwritten:
        raise RuntimeError(f"{len(unwritten)} blocks of {config.out} were not written")
    seconds = time.perf_counter() - started
    if done.all():
        if main:
            console.print(f"cache complete: {config.out} ({layout.views} views x {layout.samples} samples, "
                          f"{seconds:.1f} s)")
    else:
        console.print(f"part {part} of {config.out} written; the store has {int(done.sum())} of {done.size} "
                      f"blocks ({seconds:.1f} s)")
    return PrecomputeResult(store=config.out, blocks_written=len(pending), images=images, seconds=seconds,
                            loop_seconds=loop_seconds)


def open_writer(config: PrecomputeConfig, layout: Layout, provenance: dict, dataset: ImageDataset,
                class_embeds: torch.Tensor, prompt_embeds: torch.Tensor) -> CacheWriter:
    """The store, made or checked, with the arrays that do not depend on the view written."""
    writer = CacheWriter.open(config.out, layout, provenance, overwrite=config.overwrite)
    writer.write_static({
        "labels": dataset.labels,
        "keys": np.asarray(dataset.keys, dtype=str),
        "clip/class_embeds": class_embeds.cpu().numpy(),
        "clip/prompt_embeds": prompt_embeds.cpu().numpy(),
    })
    return writer


def part_label(part: Part) -> str:
    return f" (part {part})" if part.count > 1 else ""


def write_shards(writer: CacheWriter, locks: BlockLocks, layout: Layout, pending: set[tuple[int, int]], loader,
                 models: Models, images: int) -> None:
    """Fill each shard's buffers, every view of a batch of samples at a time, batches of a shard in row order; hand
    its `pending` blocks to a writer thread so that writing overlaps compute. A block already written is computed
    again (its shard's batches hold every view, the same as in one go) but not rewritten."""
    dtypes = {name: np.dtype(spec.dtype) for name, spec in layout.arrays().items() if spec.dtype != "str"}
    clip_logit_scale = models.clip.logit_scale
    writes: list[Future] = []
    # Shards being filled: one, or one per loader worker when workers stream shards of their own.
    buffers: dict[int, list[dict[str, list[np.ndarray]]]] = {}
    filled: dict[int, int] = {}
    with ThreadPoolExecutor(max_workers=1) as pool, progress_bar("img") as progress:
        task = progress.add_task("precompute", total=images)
        for views, params, rows in loader:  # (samples, V, 3, h, w), (samples, V, k), (samples,)
            shard = int(rows[0]) // layout.shard_size
            if shard not in buffers:
                buffers[shard] = [{name: [] for name in layout.per_view_arrays()} for _ in range(layout.views)]
                filled[shard] = 0
            samples = len(views)
            outputs = stored_outputs(models(views.flatten(0, 1)), layout, clip_logit_scale)
            stored = {name: to_storage(name, values, dtypes[name]).reshape(samples, layout.views, -1)
                      for name, values in outputs.items()}  # one check and one copy to the host per array
            for view, buffer in enumerate(buffers[shard]):
                buffer["views/params"].append(params[:, view].numpy())
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


def stored_outputs(outputs: dict[str, torch.Tensor], layout: Layout,
                   clip_logit_scale: float) -> dict[str, torch.Tensor]:
    """The models' outputs as `layout` stores them: in a top-k store, each logit array as its top-k pair, the rest
    exact at the store's temperature for the teacher's logits and for CLIP's cosines at CLIP's own scale (its
    zero-shot probabilities)."""
    if not layout.topk:
        return outputs
    stored = {name: values for name, values in outputs.items() if name not in TOPK_ARRAYS}
    scales = {"teacher/logits": 1.0, "clip/logits": clip_logit_scale}
    for name, (values_name, classes_name) in TOPK_ARRAYS.items():
        stored[values_name], stored[classes_name] = top_k_logits(outputs[name], layout.topk,
                                                                 layout.topk_temperature / scales[name])
    return stored


def write_and_release(writer: CacheWriter, locks: BlockLocks, view: int, shard: int,
                      block: dict[str, np.ndarray]) -> None:
    writer.write_block(view, shard, block)
    locks.release(view, shard)
