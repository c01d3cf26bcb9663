"""The options of every stage command: one dataclass a stage, whose fields are its flags and `params.yaml` keys.

Nothing here imports torch, torchvision, numpy or zarr (`richkd --help` answers at once, and a command imports
only the code it runs); a check that needs the code behind an option imports it when the command runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from richkd.pipeline.config import (
    CONFIDENCE_THRESHOLD,
    DEMO_PRESETS,
    DEMO_SIDE,
    DataOptions,
    ExecutionOptions,
    NormalizeOptions,
    Options,
    StreamOptions,
    ViewOptions,
    option,
    parse_size,
    require,
    require_positive,
)
from richkd.pipeline.runtime import parse_part, torchrun_part
from richkd.pipeline.training_options import TrainingOptions
from richkd.pipeline.variants import CLIP, DEFAULT_ALPHA, TEACHER, VARIANTS, clip_scale_value, parse_fuse

# A source of a store: a conventional classifier (logits, pooled features) or a CLIP (zero-shot cosines over its
# prompt ensemble, image embeddings, class and prompt embeddings); what it stores per view, all or its logits alone.
SOURCE_KINDS = ("classifier", "clip")
OUTPUTS = ("all", "logits")
SOURCE_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")
# Names taken by the store's own arrays and groups.
RESERVED_NAMES = ("labels", "keys", "views", "progress", "sources")
# pack's image encodings.
PACK_FORMATS = ("png", "original")
# Each --logit-loss's weight unless --logit-weight is given: DKD carries its own alpha and beta, so it is weighted 1
# (as in DKD's paper).
LOGIT_LOSS_WEIGHTS = {"kd": 3.0, "dkd": 1.0}
# `inspect --verify-views`: the largest |stored - recomputed| teacher logit, relative to max(1, |logit|), a rebuilt
# view may show: float16 rounds to 5e-4 of a value, and a GPU's kernels differ from the CPU's by less than 1e-2; a
# view whose parameters do not rebuild its pixels differs by far more.
VIEW_TOLERANCE = 1e-2


@dataclass
class DemoConfig:
    out: str = option("data/demo", "Directory to write <split>/<class>/<index>.png, <split>/captions.json and "
                      "<split>/attributes.json (and superclasses.json for a preset that has them).", "Output")
    preset: str = option(
        "shapes", "; ".join(f"{name}: {preset.description}" for name, preset in DEMO_PRESETS.items()) + ".", "Output")
    train: int = option(1000, "Labelled training images.", "Output")
    test: int = option(2000, "Labelled test images.", "Output")
    shifted: int = option(0, "Labelled test images under distribution shift (the study preset: objects in colours "
                          "the train and test splits never show, the pool does).", "Output")
    pool: int = option(0, "Unlabelled images with captions (<out>/pool/unlabelled/), for training a CLIP on "
                       "more image-text pairs than there are labels.", "Output")
    side: int = option(DEMO_SIDE, "Image side in pixels (objects scale with it).", "Output")
    seed: int = option(0, "Seed: the same seed writes the same images, byte for byte.", "Output")
    overwrite: bool = option(False, "Replace the demo already in --out (a folder holding anything else is never "
                             "replaced).", "Output")

    def validate(self) -> None:
        require(self.preset in DEMO_PRESETS, f"--preset must be one of {', '.join(DEMO_PRESETS)}, got '{self.preset}'")
        require(self.train >= 1 and self.test >= 1, "--train and --test must be at least 1")
        require(self.pool >= 0, f"--pool must be 0 or more, got {self.pool}")
        require(self.seed >= 0, f"--seed must be 0 or more, got {self.seed}")
        require(self.shifted >= 0, f"--shifted must be 0 or more, got {self.shifted}")
        require(not self.shifted or "shifted" in DEMO_PRESETS[self.preset].labelled_splits,
                f"preset {self.preset} has no shifted split: use --preset study for one")
        require(self.side >= 8, f"--side must be at least 8 pixels, got {self.side}")


@dataclass
class PackConfig(DataOptions):
    out: str = option(
        "data/shards", "Folder (a path or fsspec URL) to write <split>-NNNNNN.tar shards, classes.txt and "
        "normalization.json into.", "Output")
    samples_per_shard: int = option(1000, "Samples per shard; the last shard holds the rest.", "Output")
    format: str = option(
        "png", "Image encoding: png (lossless, any dataset) or original (the image files' own bytes, for "
        "imagefolder and demo).", "Output")
    overwrite: bool = option(False, "Replace the split's shards already in --out.", "Output")

    def validate(self) -> None:
        super().validate()
        require(self.samples_per_shard >= 1, f"--samples-per-shard must be at least 1, got {self.samples_per_shard}")
        require(self.format in PACK_FORMATS, f"--format must be png or original, got '{self.format}'")


@dataclass
class TrainClipConfig(DataOptions, ExecutionOptions):
    dataset: str = option("demo", "Dataset name (it needs a caption per image).", "Data")
    data_root: str = option("data/demo", "Where the dataset is stored.", "Data")
    eval_split: str = option("test", "Split on which zero-shot accuracy is reported after every epoch.", "Data")
    captions: str | None = option(
        None, "JSON file mapping each sample key to its caption (default: <data-root>/<split>/captions.json).",
        "Data")
    model: str = option(
        "richkd-tiny", "open_clip model name to train (richkd-tiny: a small ResNet tower for 32 x 32 images).",
        "Model")
    pretrained: str = option("random", "Start from these weights (a tag or checkpoint file) or 'random'.", "Model")
    epochs: int = option(20, "Training epochs.", "Optimisation")
    batch_size: int = option(64, "Image-caption pairs per batch (the contrastive loss's negatives).",
                             "Optimisation")
    lr: float = option(1e-3, "AdamW learning rate (cosine schedule after warmup).", "Optimisation")
    weight_decay: float = option(0.1, "AdamW weight decay.", "Optimisation")
    warmup_epochs: int = option(1, "Epochs of linear warmup.", "Optimisation")
    seed: int = option(0, "Seed of initialisation and data order.", "Run")
    out: str = option(
        "models/clip", "Output open_clip bundle directory; its checkpoints/ folder holds the checkpoint of the last "
        "finished epoch, which --resume continues from (the bundle loader does not read it).", "Run")
    resume: bool = option(
        False, "Continue the run in --out from its last checkpoint (a finished run keeps its bundle as it is).", "Run")
    overwrite: bool = option(False, "Start over, replacing the bundle or run in --out (a folder holding anything else "
                             "is never replaced).", "Run")

    def validate(self) -> None:
        super().validate()
        require(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        require(self.batch_size >= 2, f"--batch-size must be at least 2 (a contrastive batch), got {self.batch_size}")
        require_positive(self.lr, "--lr")
        require(self.seed >= 0, f"--seed must be 0 or more, got {self.seed}")
        require(self.weight_decay >= 0, f"--weight-decay must be 0 or more, got {self.weight_decay}")
        require(0 <= self.warmup_epochs < self.epochs,
                f"--warmup-epochs must be in [0, epochs), got {self.warmup_epochs}")
        require(not (self.resume and self.overwrite), "--resume and --overwrite exclude each other")

    def interruption_advice(self) -> str:
        """What Ctrl-C keeps, and the command (`{command}`, as it was typed) that continues the run."""
        return f"the checkpoint of the last finished epoch in {self.out} is kept; continue with: {{command}} --resume"


@dataclass(frozen=True)
class SourceSpec:
    """A source named on the command line: NAME=KIND:MODEL[@WEIGHTS]."""

    name: str
    kind: str
    model: str
    weights: str | None

    @classmethod
    def parse(cls, text: str, flag: str) -> SourceSpec:
        name, _, described = text.partition("=")
        kind, _, model = described.partition(":")
        weights = None
        if "@" in model:
            model, _, weights = model.rpartition("@")
        require(bool(name) and kind in SOURCE_KINDS and bool(model) and weights != "",
                f"{flag} takes NAME=clip:MODEL[@WEIGHTS] or NAME=classifier:ARCH@CHECKPOINT, got '{text}'")
        require(kind == "clip" or weights is not None,
                f"{flag} {text}: a classifier needs its checkpoint, as {name}=classifier:{model}@CHECKPOINT")
        require(SOURCE_NAME.fullmatch(name) is not None and name not in RESERVED_NAMES,
                f"source name '{name}' must be lower-case letters, digits and _, starting with a letter (at most 40), "
                f"and none of {', '.join(RESERVED_NAMES)}")
        return cls(name, kind, model, weights)


class FuseWeights:
    """A command whose `fuse` option weighs the store's sources by name (distill, report)."""

    fuse: str | None

    @property
    def fuse_weights(self) -> dict[str, float] | None:
        """--fuse as {source: weight}, None without it."""
        return None if self.fuse is None else parse_fuse(self.fuse)


@dataclass
class PrecomputeConfig(StreamOptions, NormalizeOptions, ViewOptions, ExecutionOptions):
    stream: bool = option(
        False, "Read the tar shards (--dataset webdataset) front to back instead of by index: once for the keys and "
        "labels, then each store shard's samples from the tar shards holding them, so that pipe: and object-store "
        "URLs work. pipe: shards take their class names from --class-names. A --shard-size that is a multiple of "
        "the tar shards' samples reads each tar shard once.", "Streaming")
    teacher: str = option(
        "resnet32x4", "Teacher architecture: a zoo name, tv:<torchvision model> or timm:<model>.", "Teachers")
    teacher_checkpoint: str | None = option(
        None, "Teacher weights: an mdistiller, plain or richkd checkpoint (required).", "Teachers")
    clip: str = option("ViT-L-14", "open_clip model name, hf-hub:ORG/REPO or local-dir:PATH.", "Teachers")
    clip_pretrained: str | None = option(
        "openai", "CLIP weights: an open_clip pretrained tag, a checkpoint file, or 'random' (untrained).",
        "Teachers")
    templates: str | None = option(
        None, "Prompt templates file, one per line with {} for the class name.", "Teachers")
    class_names: str | None = option(
        None, "Class names file for the prompts, one per line in class order; with --stream, also the names of "
        "pipe: shards' classes.", "Teachers")
    raw_class_names: bool = option(
        False, "Use class names as the dataset spells them (no '_' -> ' ').", "Teachers")
    views: int = option(8, "Augmented views per sample.", "Views")
    seed: int = option(0, "Seed of the view parameters.", "Views")
    out: str = option("cache/teachers.zarr", "The store to write (a path or fsspec URL).", "Store")
    dtype: str = option("float16", "Precision of stored logits and features: float16 or float32.", "Store")
    topk: int = option(
        0, "Store only the K largest logits of each source per view, with their class ids and one value "
        "for every other class (their mass spread evenly): about C/K times smaller logits (0: every logit).",
        "Store")
    topk_temperature: float = option(
        1.0, "With --topk: the temperature at which the other classes' total mass is kept exact; set it to the "
        "--temperature students distill at (at another T it is approximate).", "Store")
    shard_size: int = option(4096, "Samples per shard: the unit of writing, resuming and parallel work.", "Store")
    overwrite: bool = option(False, "Replace an existing store made with another configuration.", "Store")
    outputs: str = option(
        "all", "What each source written stores per view: all (logits and features) or logits (all the L, shrink "
        "and clip variants read: a fraction of the size; F and LF leave the source out of CRD).", "Store")
    source: list[str] = option(
        [], "More sources to write beside the teacher and CLIP, in one pass over the images: NAME=clip:MODEL[@WEIGHTS] "
        "(an open_clip model and its pretrained tag or checkpoint, prompted as --templates and --class-names say) or "
        "NAME=classifier:ARCH@CHECKPOINT. Repeat the flag for each.", "Sources")
    add_source: list[str] = option(
        [], "Add sources, given as --source gives them, to the finished store --out, for its stored views: the same "
        "crops, augmentation and mixing, replayed from the store; its other arrays are never rewritten. Resumable and "
        "split over --part and torchrun as any precompute; the teacher and CLIP flags are then unused.", "Sources")
    batch_size: int = option(
        256, "Images per forward pass: every view of batch-size / views samples (at least one sample).",
        "Execution")
    part: str | None = option(
        None, "Write only part i of n of the blocks (e.g. 0/4), for jobs on separate machines writing one store; "
        "under torchrun each process takes its rank's part.", "Parallel")
    lock_timeout: float = option(
        600.0, "Seconds without a heartbeat after which a lock on a block counts as left by a killed process "
        "(on the same host a lock whose process is gone is taken over at once).", "Parallel")

    def source_specs(self) -> list[SourceSpec]:
        """The sources of --source, or of --add-source."""
        flag = "--add-source" if self.add_source else "--source"
        return [SourceSpec.parse(text, flag) for text in self.add_source or self.source]

    def interruption_advice(self) -> str:
        """What Ctrl-C keeps, and the command (`{command}`, as it was typed) that continues the store."""
        return f"the finished blocks of {self.out} are kept; the same command computes the rest: {{command}}"

    def validate(self) -> None:
        super().validate()
        require(self.views >= 1, f"--views must be at least 1, got {self.views}")
        require(self.seed >= 0, f"--seed must be 0 or more, got {self.seed}")
        require(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        require(self.shard_size >= 1, f"--shard-size must be at least 1, got {self.shard_size}")
        require(self.topk >= 0, f"--topk must be 0 (dense) or positive, got {self.topk}")
        require_positive(self.topk_temperature, "--topk-temperature")
        from richkd.cache.schema import PRECISIONS  # with the store's code, which the command runs

        require(self.dtype in PRECISIONS, f"--dtype must be one of {', '.join(PRECISIONS)}, got '{self.dtype}'")
        require(self.outputs in OUTPUTS, f"--outputs must be all or logits, got '{self.outputs}'")
        require(self.teacher_checkpoint is not None or self.add_source, "--teacher-checkpoint is required")
        require(not (self.add_source and self.source), "--source writes sources into a new store and --add-source "
                "into a finished one: give one of them")
        require(not (self.add_source and self.stream), "--add-source reads the images by index: leave out --stream")
        require(not (self.add_source and self.overwrite), "--overwrite replaces a whole store, and --add-source keeps "
                "it: add a source made otherwise under another name")
        names = [spec.name for spec in self.source_specs()]
        repeated = next((name for name in names if names.count(name) > 1), None)
        require(repeated is None, f"source name {repeated} is given twice: each source needs a name of its own")
        taken = next((name for name in names if name in (TEACHER, CLIP) and not self.add_source), None)
        require(taken is None, f"--source {taken}: teacher and clip name precompute's own teacher and CLIP; give "
                "the source another name")
        require_positive(self.lock_timeout, "--lock-timeout")
        if self.part is not None:
            parse_part(self.part)
            require(torchrun_part().count == 1, "--part is for separate jobs; under torchrun the ranks share the work")
        require(not (self.overwrite and (self.part or torchrun_part().count > 1)),
                "--overwrite cannot be used by one of several processes writing a store: delete the store first")


@dataclass
class TrainConfig(TrainingOptions, ViewOptions):
    """Supervised training: the shared training options, and how each epoch's random views are made."""

    class_names: str | None = option(
        None, "--stream from pipe: shards: a file of their class names, one per line in class-id order (the "
        "classes.txt `richkd pack` wrote beside them).", "Streaming")


@dataclass
class LossOptions(Options):
    """The weights and settings of distill's losses: all that DistillObjective reads of a run's options."""

    logit_loss: str = option("kd", "Loss on fused logits: kd or dkd.", "Distillation")
    temperature: float = option(3.0, "Distillation temperature T.", "Distillation")
    ce_weight: float = option(1.0, "Weight of cross-entropy on labels.", "Loss weights")
    logit_weight: float | None = option(None, "Weight of the logit loss (default: 3 for kd, 1 for dkd).",
                                        "Loss weights")
    feature_weight: float = option(0.8, "Weight of the CRD feature loss.", "Loss weights")
    dkd_alpha: float = option(1.0, "DKD: weight of target-class KD.", "Loss weights")
    dkd_beta: float = option(8.0, "DKD: weight of non-target-class KD.", "Loss weights")
    dkd_warmup: int = option(20, "DKD: epochs over which its weight ramps up linearly.", "Loss weights")
    feature_start_epoch: int = option(
        0, "CRD: epochs before the feature loss counts (its memory bank fills meanwhile).", "CRD")
    feature_warmup_epochs: int = option(
        0, "CRD: epochs over which the feature loss's weight then ramps up linearly to --feature-weight.", "CRD")

    def validate(self) -> None:
        super().validate()
        require(self.logit_loss in LOGIT_LOSS_WEIGHTS,
                f"--logit-loss must be {' or '.join(LOGIT_LOSS_WEIGHTS)}, got '{self.logit_loss}'")
        require_positive(self.temperature, "--temperature")
        for name in ("ce_weight", "logit_weight", "feature_weight", "dkd_alpha", "dkd_beta"):
            value = getattr(self, name)
            require(value is None or value >= 0, f"--{name.replace('_', '-')} must be 0 or more, got {value}")
        require(self.dkd_warmup >= 0, f"--dkd-warmup must be 0 or more, got {self.dkd_warmup}")
        require(self.feature_start_epoch >= 0,
                f"--feature-start-epoch must be 0 or more, got {self.feature_start_epoch}")
        require(self.feature_warmup_epochs >= 0,
                f"--feature-warmup-epochs must be 0 or more, got {self.feature_warmup_epochs}")

    @property
    def logit_loss_weight(self) -> float:
        if self.logit_weight is not None:
            return self.logit_weight
        return LOGIT_LOSS_WEIGHTS[self.logit_loss]

    def feature_schedule(self, epoch: int) -> float:
        """Factor of the feature loss's weight in `epoch`: 0 before the start, then a linear ramp to 1."""
        if epoch < self.feature_start_epoch:
            return 0.0
        if not self.feature_warmup_epochs:
            return 1.0
        return min((epoch - self.feature_start_epoch + 1) / self.feature_warmup_epochs, 1.0)


@dataclass
class DistillConfig(LossOptions, TrainingOptions, FuseWeights):
    cache: str = option("cache/teachers.zarr", "The cache store written by `richkd precompute`.", "Cache")
    cache_memory: str = option(
        "4GiB", "Memory for cached targets: views that fit are read whole, larger ones streamed.", "Cache")
    variant: str = option(
        "LF", "; ".join(f"{name}: {variant.description}" for name, variant in VARIANTS.items()) + ".",
        "Distillation")
    alpha: float = option(DEFAULT_ALPHA, "Logit fusion weight: z_F = alpha z_T + (1 - alpha) z_C; 1 is plain KD.",
                          "Distillation")
    lam: float | None = option(None, "Feature fusion weight of the teacher (default: alpha).", "Distillation")
    fuse: str | None = option(
        None, "Weights of the store's sources by name, e.g. teacher=0.5,clip=0.3,clip_b16=0.2: z_F is their weighted "
        "sum, and CRD fuses their features at these weights scaled to sum 1 (replaces --alpha and --lam; a source "
        "of weight 0, or not named, is never read).", "Distillation")
    clip_scale: str = option(
        "raw", "CLIP logits z_C = scale * cosine: raw (1), clip (exp(logit_scale) of each CLIP's own) or a number.",
        "Distillation")
    standardize: bool = option(False, "z-score each sample's logits of every source before fusing.",
                               "Distillation")
    nce_k: int = option(16384, "CRD: negatives per sample (clamped below the number of training samples).", "CRD")
    nce_temperature: float = option(0.07, "CRD: NCE temperature.", "CRD")
    nce_momentum: float = option(0.5, "CRD: memory bank momentum.", "CRD")
    embed_dim: int = option(128, "CRD: dimension of the contrastive embedding.", "CRD")
    stream: bool = option(
        False, "Stream the training tar shards (--dataset webdataset) front to back, each sample's cache row read "
        "alongside, instead of reading both by index: sequential reads for shards and stores on slow or remote "
        "storage; `pipe:` URLs work. Precompute from the same shards, so that both run in the same order.",
        "Streaming")
    out: str = option("runs/student", "Run directory: checkpoints, metrics, resolved config.", "Run")

    def validate(self) -> None:
        super().validate()
        require(self.variant in VARIANTS, f"--variant must be one of {', '.join(VARIANTS)}, got '{self.variant}'")
        require(0 <= self.alpha <= 1, f"--alpha must be in [0, 1], got {self.alpha}")
        require(self.lam is None or 0 <= self.lam <= 1, f"--lam must be in [0, 1], got {self.lam}")
        if self.fuse is not None:
            parse_fuse(self.fuse)
            require(self.lam is None, "--lam weighs the teacher's features against CLIP's; with --fuse, CRD fuses "
                    "the sources' features at the --fuse weights: leave --lam out")
        require(self.nce_k >= 1, f"--nce-k must be at least 1, got {self.nce_k}")
        require_positive(self.nce_temperature, "--nce-temperature")
        require(0 <= self.nce_momentum < 1, f"--nce-momentum must be in [0, 1), got {self.nce_momentum}")
        require(self.embed_dim >= 1, f"--embed-dim must be at least 1, got {self.embed_dim}")
        clip_scale_value(self.clip_scale, logit_scale=1.0)  # checks the flag; the store supplies the real scale
        parse_size(self.cache_memory, "--cache-memory")

    @property
    def feature_lam(self) -> float:
        return self.alpha if self.lam is None else self.lam

    @property
    def uses_logits(self) -> bool:
        return VARIANTS[self.variant].logits and self.logit_loss_weight > 0

    @property
    def uses_features(self) -> bool:
        return VARIANTS[self.variant].features and self.feature_weight > 0

@dataclass
class EvaluateConfig(StreamOptions, NormalizeOptions, ExecutionOptions):
    checkpoint: str | None = option(
        None, "Checkpoint from train or distill, or a teacher checkpoint (required); or a glob pattern such as "
        "'runs/kd/seed-*/checkpoints/last.pt' to evaluate every seed of a run in one process.", "Model")
    arch: str | None = option(None, "Architecture, for checkpoints that do not record it (e.g. mdistiller's).",
                              "Model")
    split: str = option("test", "Split to evaluate.", "Data")
    stream: bool = option(
        False, "Read the split's tar shards (--dataset webdataset) front to back, each sample once, instead of by "
        "index, so that pipe: and object-store URLs work (class names and normalisation as the checkpoint records "
        "them, or from the shards' classes.txt and normalization.json).", "Streaming")
    image_size: int | None = option(None, "Evaluation image side, for checkpoints that do not record it.", "Data")
    confidence_threshold: float = option(
        CONFIDENCE_THRESHOLD, "Confidence at or above which a prediction counts as confident.", "Metrics")
    superclasses: str | None = option(
        None, "JSON file mapping each class name to its superclass's name (e.g. CIFAR-100's 20 coarse classes, or the "
        "study's shapes): adds the superclass share, the mean share of the probability off the true class that "
        "falls on the other classes of its superclass.", "Metrics")
    output: str | None = option(
        None, "Write the metrics to this JSON file (several checkpoints: {\"seeds\": [one result each]}).", "Output")
    json: bool = option(False, "Print the metrics as JSON instead of a table.", "Output")
    batch_size: int = option(256, "Images per forward pass.", "Execution")
    corruptions: str | None = option(
        None, "Also evaluate under common corruptions: all, a category (noise, blur, weather, digital) or a "
        "comma list of names such as gaussian_noise,fog (default with --corrupted-root: all).", "Robustness")
    severities: str = option("1-5", "Corruption severities, 1 to 5: a range or list such as 1-5 or 1,3,5.",
                             "Robustness")
    corruption_seed: int = option(
        0, "Seed of the corruptions' random draws (an image's draws depend on it and the image's index alone).",
        "Robustness")
    corrupted_root: str | None = option(
        None, "Read the corrupted images from the published CIFAR-10-C / CIFAR-100-C files in this folder "
        "(<corruption>.npy and labels.npy) instead of corrupting the centre views.", "Robustness")
    corruption_samples: int | None = option(
        None, "Evaluate the corruptions on this many images of the split, evenly spaced (default: all).",
        "Robustness")

    def validate(self) -> None:
        super().validate()
        require(self.checkpoint is not None, "--checkpoint is required")
        require(0 < self.confidence_threshold <= 1,
                f"--confidence-threshold must be in (0, 1], got {self.confidence_threshold}")
        require(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        require(self.image_size is None or self.image_size >= 1,
                f"--image-size must be positive, got {self.image_size}")
        require(self.corruption_seed >= 0, f"--corruption-seed must be 0 or more, got {self.corruption_seed}")
        require(self.corruption_samples is None or self.corruption_samples >= 1,
                f"--corruption-samples must be at least 1, got {self.corruption_samples}")
        corrupted = self.corruption_names()
        require(not (self.stream and corrupted), "--stream reads each sample once, front to back, and "
                "corruptions are evaluated on samples by index: evaluate them without --stream")
        from richkd.pipeline.corruptions import parse_severities  # with the code that corrupts, which the command runs

        parse_severities(self.severities)

    def corruption_names(self) -> list[str]:
        """The corruptions to evaluate: none unless --corruptions or --corrupted-root is given."""
        if self.corruptions is None and self.corrupted_root is None:
            return []
        from richkd.pipeline.corruptions import parse_corruptions

        return parse_corruptions(self.corruptions or "all")


@dataclass
class ReportConfig(FuseWeights):
    evals: list[str] = option(
        ["evals"], "Folders of `richkd evaluate --output` JSON files, one per run; each file goes to the tables of the "
        "split it records, so one folder a split (e.g. evals/test and evals/shifted).", "Inputs")
    runs: list[str] = option([], "Runs to show, in order (file names without .json; default: all).", "Inputs")
    test_cache: list[str] = option(
        [], "Caches of held-out splits (`precompute --split S --view-policy center`), one a split: that split's CLIP, "
        "fused-target and alpha-sweep rows and its error overlap.", "Inputs")
    superclasses: str | None = option(
        None, "JSON file mapping each class name to its superclass's name: the target rows' superclass share (the "
        "students' comes from `richkd evaluate --superclasses`).", "Inputs")
    alpha: float = option(DEFAULT_ALPHA, "alpha of the fused-target row.", "Targets")
    fuse: str | None = option(
        None, "Weights of the fused-target row by source, as distill --fuse takes them (replaces --alpha).",
        "Targets")
    clip_scale: str = option("raw", "CLIP scale of the fused-target row: raw, clip or a number.", "Targets")
    standardize: bool = option(False, "The fused-target row z-scores each source first (distill --standardize).",
                               "Targets")
    confidence_threshold: float = option(
        CONFIDENCE_THRESHOLD, "Confidence of a confident prediction, for the target rows.", "Targets")
    baselines: list[str] = option(
        ["kd", "teacher_shrink"], "Runs every student is compared with, seed by seed (those not in the report are "
        "skipped). A name may hold {setting} of the student's own training settings (variant, alpha, clip_scale, "
        "standardize, logit_loss, epochs, arch): shrink_{alpha} compares each student with run shrink_0.5 when its "
        "alpha is 0.5.", "Comparisons")
    pairs: list[str] = option(
        [], "More paired comparisons, each X-vs-B (e.g. ce_long-vs-ce): run X minus run B, seed by seed.",
        "Comparisons")
    shifted_split: str | None = option(
        None, "The split under distribution shift: with --label-only, check the preconditions of RichKD's regime "
        "(needs a --test-cache of this split and of the in-distribution one).", "Preconditions")
    label_only: str | None = option(
        None, "The run trained on labels alone with the students' architecture, which the teacher must beat by 3 "
        "points.", "Preconditions")
    require_preconditions: bool = option(
        False, "Exit with status 2, after writing the report, when a precondition is not met (a pipeline's gate "
        "before the students train).", "Preconditions")
    preconditions_only: bool = option(
        False, "Report only what the preconditions are measured on, the teacher, the targets and the --label-only "
        "run, without --runs, --baselines or --pairs: the report a pipeline can make before the other students "
        "exist.", "Preconditions")
    out: str = option("report", "Directory for report.md, metrics.json and the figures.", "Output")
    json: bool = option(False, "Print the splits' means, intervals and paired differences and the preconditions as "
                        "JSON (what metrics.json holds) instead of saying where the report is.", "Output")

    def validate(self) -> None:
        require(0 <= self.alpha <= 1, f"--alpha must be in [0, 1], got {self.alpha}")
        if self.fuse is not None:
            parse_fuse(self.fuse)
        clip_scale_value(self.clip_scale, logit_scale=1.0)
        require((self.shifted_split is None) == (self.label_only is None),
                "--shifted-split and --label-only go together: the preconditions need both")
        require(not (self.require_preconditions or self.preconditions_only) or self.shifted_split is not None,
                "--require-preconditions and --preconditions-only need --shifted-split and --label-only")
