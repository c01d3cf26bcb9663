"""Fusing the sources' cached logits: z_F = sum over sources of weight * scale * z, a CLIP's cosines scaled by its
`--clip-scale` (z_F = alpha z_T + (1 - alpha) scale s_C for the two sources teacher and clip)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from richkd.cache.reader import CacheReader
from richkd.cache.schema import Source, stored_arrays, topk_arrays
from richkd.pipeline.errors import UserError
from richkd.pipeline.topk import SparseLogits, weighted_sum
from richkd.pipeline.variants import VARIANTS, clip_scale_value


def standardize(logits: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-sample z-score over classes, so sources of different spread weigh as their weights say."""
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True, unbiased=False)
    return (logits - mean) / (std + eps)


def scaled_logits(logits: torch.Tensor, scale: float, standardized: bool = False) -> torch.Tensor:
    """A source's logits as they enter z_F: times `scale`, then z-scored when `standardized`."""
    scaled = logits if scale == 1 else scale * logits
    return standardize(scaled) if standardized else scaled


def fuse_logits(sources: Sequence[tuple[torch.Tensor | None, float, float]],
                standardized: bool = False) -> torch.Tensor:
    """z_F = sum of weight * (scale * z) over the sources' (logits z, weight, scale), each z-scored after scaling
    when `standardized`; a source whose weight is zero may be None (it is then never read from the cache)."""
    return sum(weight * scaled_logits(logits, scale, standardized) for logits, weight, scale in sources if weight > 0)


def store_weights(reader: CacheReader, weights: dict[str, float], flag: str = "--fuse") -> dict[str, float]:
    """`weights` over every source of the store, in store order (0 for those it does not name); a name the store
    does not hold is an error."""
    unknown = [name for name in weights if name not in reader.sources]
    if unknown:
        raise UserError(f"{flag} weighs {', '.join(unknown)}, which cache {reader.url} does not hold; its sources: "
                        f"{', '.join(reader.sources)}")
    return {name: weights.get(name, 0.0) for name in reader.sources}


def require_features(reader: CacheReader, sources: Iterable[str], needer: str, advice: str) -> None:
    """Refuse, as `needer` with `advice`, a source of `sources` whose features the store does not hold."""
    for name in sources:
        if reader.sources[name].features is None:
            raise UserError(f"{needer} needs the features of {name}, but cache {reader.url} stores its logits only "
                            f"(precompute --outputs logits): {advice}")


def source_scale(reader: CacheReader, name: str, clip_scale: str) -> float:
    """The factor of source `name`'s logits: a CLIP's cosines at `clip_scale` of its own logit scale, else 1."""
    if reader.sources[name].kind != "clip":
        return 1.0
    return clip_scale_value(clip_scale, reader.source_records[name]["logit_scale"])


@dataclass(frozen=True)
class Fusion:
    """How a run fuses the cached logits: z_F = sum of weight * scale * z over `sources`, (source, weight, scale) in
    store order, none of weight 0. In a top-k store (`topk` > 0, of `classes` classes) the sources are sparse, and so
    is z_F, listed at the union of the sources' listed classes."""

    sources: tuple[tuple[Source, float, float], ...]
    standardize: bool = False
    topk: int = 0
    classes: int = 0

    @classmethod
    def of(cls, reader: CacheReader, variant: str, weights: dict[str, float], clip_scale: str,
           standardize: bool = False, flag: str = "--fuse") -> Fusion:
        """The fusion of `variant` over `reader`'s sources at the run's `weights` (`variants.run_weights`, given by
        `flag`), each CLIP's cosines scaled by `clip_scale` of its own logit scale."""
        kinds = {name: source.kind for name, source in reader.sources.items()}
        fused = VARIANTS[variant].logit_weights(store_weights(reader, weights, flag), kinds)
        layout = reader.layout
        return cls(tuple((reader.sources[name], weight, source_scale(reader, name, clip_scale))
                         for name, weight in fused.items() if weight > 0), standardize, layout.topk, layout.classes)

    @property
    def weights(self) -> dict[str, float]:
        """Each fused source's weight, by name."""
        return {source.name: weight for source, weight, _ in self.sources}

    @property
    def arrays(self) -> tuple[str, ...]:
        """The cached arrays it reads."""
        return stored_arrays(tuple(source.logits for source, _, _ in self.sources), self.topk)

    def fuse(self, targets: dict[str, torch.Tensor]) -> torch.Tensor | SparseLogits:
        """z_F of a batch of cached targets (those of `arrays`)."""
        if not self.topk:
            return fuse_logits([(targets[source.logits], weight, scale) for source, weight, scale in self.sources],
                               self.standardize)
        parts = []
        for source, weight, scale in self.sources:
            logits = SparseLogits.from_stored(*(targets[array] for array in topk_arrays(source.logits)),
                                              self.classes).scaled(scale)
            parts.append((weight, logits.standardized() if self.standardize else logits))
        return weighted_sum(parts)
