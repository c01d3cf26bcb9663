"""The 15 common corruptions of CIFAR-10-C and ImageNet-C, on image tensors, deterministic for a seed.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and Perturbations"
(ICLR 2019): noise (gaussian, shot, impulse), blur (defocus, glass, motion, zoom), weather (snow, frost, fog,
brightness) and digital (contrast, elastic, pixelate, JPEG), each at severities 1 to 5.

`corrupt(images, name, severity, seed, indices)` takes float images in [0, 1], shape (N, 3, H, W), and uses
the benchmark's own severity parameters: those of `make_cifar_c.py` (CIFAR-10-C / CIFAR-100-C, made at
32 x 32) when the larger image side is at most `SMALL_IMAGE_SIDE` = 64 pixels, those of `make_imagenet_c.py`
(ImageNet-C, made at 224 x 224) above that (the bound at which views switch from pad-crops to resized
crops). Parameters that are lengths are used in pixels as published, whatever the image size.

Every random draw of an image comes from its own generator, seeded by (seed, corruption, severity, the
image's dataset index), and the float work is elementwise, per image or a depthwise convolution, so an
image's corruption does not depend on the batch it is in or the order of the batches. Results are rounded
to 8-bit levels, as the published data sets store them.

Where this differs from the original scripts (which need scikit-image, SciPy, OpenCV and ImageMagick):

- frost: the original blends a random crop of one of six photographs of frost (downscaled by 5 for
  CIFAR). Here the frost layer is procedural: a diamond-square haze plus scattered six-armed ice crystals
  with tapering arms, tinted ice blue, drawn from the image's generator and scale-free (the same texture at
  every image size). It is blended with the original weights, `keep * image + strength * frost`.
- motion blur (and the motion-blurred snow layer): ImageMagick's MotionBlurImage, reimplemented (a
  one-sided Gaussian kernel of width 2 * radius + 1 along the drawn angle, edge pixels repeated).
- glass blur: the original's sequential local pixel swaps, in the same scan order and with the same
  offsets in [-delta, delta), run for the whole batch at once: the same result, not an approximation.
- rounding: the original rounds to 8 bits after glass blur's first blur and snow's layer; these
  intermediate roundings are not reproduced, and the final rounding is to the nearest level where
  `np.uint8` truncates (a bias of half a level).
- the published ImageNet-C images were saved as JPEG (quality 85); images corrupted here are not re-encoded.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from richkd.pipeline.errors import UserError
from richkd.pipeline.views import SMALL_IMAGE_SIDE

CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
CATEGORIES = {
    "noise": CORRUPTIONS[0:3],
    "blur": CORRUPTIONS[3:7],
    "weather": CORRUPTIONS[7:11],
    "digital": CORRUPTIONS[11:15],
}
SEVERITIES = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class Corruption:
    """A corruption: `apply(images, parameter, generators)` and its parameter at each severity, per benchmark."""

    apply: Callable[[torch.Tensor, object, list[np.random.Generator]], torch.Tensor]
    cifar: tuple
    imagenet: tuple


REGISTRY: dict[str, Corruption] = {}


def corruption(name: str, cifar: Sequence, imagenet: Sequence):
    def register(apply):
        REGISTRY[name] = Corruption(apply, tuple(cifar), tuple(imagenet))
        return apply

    return register


def parameter_set(height: int, width: int) -> str:
    """`cifar` or `imagenet`: whose severity parameters images of this size get (small images CIFAR-10-C's)."""
    return "cifar" if max(height, width) <= SMALL_IMAGE_SIDE else "imagenet"


def parameter(name: str, severity: int, height: int, width: int):
    """The published parameter of `name` at `severity` for images of this size."""
    return getattr(REGISTRY[name], parameter_set(height, width))[severity - 1]


def valid_names() -> str:
    return f"all, {', '.join(CATEGORIES)}, {', '.join(CORRUPTIONS)}"


def parse_corruptions(text: str) -> list[str]:
    """`all`, category names and corruption names, comma-separated -> corruption names in the benchmark's order."""
    chosen: set[str] = set()
    for part in (part.strip() for part in str(text).split(",")):
        if part == "all":
            chosen.update(CORRUPTIONS)
        elif part in CATEGORIES:
            chosen.update(CATEGORIES[part])
        elif part in REGISTRY:
            chosen.add(part)
        else:
            raise UserError(f"unknown corruption '{part}' in --corruptions; valid: {valid_names()}")
    return [name for name in CORRUPTIONS if name in chosen]


def parse_severities(text: str) -> list[int]:
    """`1-5`, `1,3,5`, `2-4,5` -> sorted severities."""
    chosen: set[int] = set()
    for part in (part.strip() for part in str(text).split(",")):
        bounds = part.split("-")
        if len(bounds) > 2 or not all(bound.strip().isdigit() for bound in bounds):
            raise UserError(
                f"--severities must be a range or list of severities 1-5 such as 1-5 or 1,3,5, got '{text}'"
            )
        low, high = int(bounds[0]), int(bounds[-1])
        if not 1 <= low <= high <= 5:
            raise UserError(f"--severities must lie in 1-5 (low to high), got '{text}'")
        chosen.update(range(low, high + 1))
    return sorted(chosen)


def sample_generators(seed: int, name: str, severity: int, indices: Sequence[int]) -> list[np.random.Generator]:
    """One generator per image, from (seed, corruption, severity, index) alone."""
    code = CORRUPTIONS.index(name)
    return [np.random.default_rng((seed, code, severity, int(index))) for index in indices]


def corrupt(
    images: torch.Tensor, name: str, severity: int, seed: int = 0, indices: Sequence[int] | None = None
) -> torch.Tensor:
    """`images` (N, 3, H, W, floats in [0, 1]) under corruption `name` at `severity` (1-5).

    `indices` are the images' sample ids (default 0..N-1): image i's random draws depend only on
    (seed, name, severity, indices[i]).
    """
    if name not in REGISTRY:
        raise UserError(f"unknown corruption '{name}'; valid: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise UserError(f"corruption severity must be 1-5, got {severity}")
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"expected float images of shape (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    indices = range(len(images)) if indices is None else indices
    if len(indices) != len(images):
        raise ValueError(f"{len(indices)} indices for {len(images)} images")
    generators = sample_generators(seed, name, severity, indices)
    setting = parameter(name, severity, *images.shape[-2:])
    x = images.detach().to("cpu", torch.float32).clamp(0, 1)
    out = REGISTRY[name].apply(x, setting, generators)
    return out.clamp(0, 1).mul(255).round().div(255).contiguous().to(images.device, images.dtype)


# Building blocks: elementwise over the batch (so batch-independent), with taps and indices built once.


def stack(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).float()


def extend(positions: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Indices into an axis of `size` for positions past its ends: `nearest` repeats the edge pixel,
    `reflect` mirrors about the edge (d c b a | a b c d | d c b a, SciPy's `reflect`), `mirror` about the
    edge pixel (d c b | a b c d | c b a, OpenCV's default border)."""
    if mode == "nearest" or size == 1:
        return positions.clamp(0, size - 1)
    period = 2 * size if mode == "reflect" else 2 * size - 2
    folded = positions.remainder(period)
    return torch.where(folded >= size, period - 1 - folded if mode == "reflect" else period - folded, folded)


def filter_axis(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Output position o along `dim` is sum_k weight[o, k] * x[index[o, k]] (index, weight: (out, K))."""
    shape = [1] * x.ndim
    shape[dim] = -1
    out = x.index_select(dim, index[:, 0]) * weight[:, 0].view(shape)
    for k in range(1, index.shape[1]):
        out += x.index_select(dim, index[:, k]) * weight[:, k].view(shape)
    return out


def gaussian_taps(size: int, sigma: float, truncate: float, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """SciPy's gaussian_filter1d (radius int(truncate * sigma + 0.5)) as taps; sigma 0 is the identity."""
    radius = int(truncate * sigma + 0.5) if sigma > 0 else 0
    offsets = torch.arange(-radius, radius + 1)
    kernel = torch.exp(-0.5 * (offsets.double() / sigma) ** 2) if radius else torch.ones(1, dtype=torch.float64)
    index = extend(torch.arange(size)[:, None] + offsets, size, mode)
    return index, (kernel / kernel.sum()).float().expand(size, -1)


def to_planes(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (H, W, N * C): selecting rows or columns then copies contiguous runs, which is fast."""
    n, c, h, w = x.shape
    return x.permute(2, 3, 0, 1).reshape(h, w, n * c)


def from_planes(planes: torch.Tensor, n: int, c: int) -> torch.Tensor:
    h, w, _ = planes.shape
    return planes.reshape(h, w, n, c).permute(2, 3, 0, 1).contiguous()


def separable(x: torch.Tensor, row_taps, col_taps) -> torch.Tensor:
    """Every image filtered along its rows by `row_taps`, then along its columns by `col_taps` (see filter_axis)."""
    planes = filter_axis(filter_axis(to_planes(x), *row_taps, dim=0), *col_taps, dim=1)
    return from_planes(planes, *x.shape[:2])


def gaussian_blur(x: torch.Tensor, sigma: float, truncate: float = 4.0, mode: str = "nearest") -> torch.Tensor:
    """scikit-image's `gaussian` (defaults: mode nearest, truncate 4) of every image."""
    h, w = x.shape[-2:]
    return separable(x, gaussian_taps(h, sigma, truncate, mode), gaussian_taps(w, sigma, truncate, mode))


def gaussian_matrix(size: int, sigma: float, truncate: float, mode: str) -> np.ndarray:
    """The same filter as a dense (size, size) matrix, for wide kernels applied to one image's field."""
    index, weight = gaussian_taps(size, sigma, truncate, mode)
    rows = torch.arange(size)[:, None].expand_as(index)
    matrix = torch.zeros(size, size, dtype=torch.float64)
    matrix.index_put_((rows, index), weight.double(), accumulate=True)
    return matrix.numpy()


def zoom_taps(size: int, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The benchmark's `clipped_zoom` along one axis: crop the centre ceil(size / factor) pixels, zoom them
    by `factor` with linear interpolation (SciPy's zoom, order 1: corners aligned, output round(crop *
    factor)), keep the centre `size` pixels."""
    crop = math.ceil(size / factor)
    top = (size - crop) // 2
    zoomed = round(crop * factor)
    trim = (zoomed - size) // 2
    source = top + (torch.arange(size, dtype=torch.float64) + trim) * (crop - 1) / max(zoomed - 1, 1)
    lower = source.floor()
    fraction = (source - lower).float()
    lower = lower.long()
    index = torch.stack([lower, (lower + 1).clamp(max=size - 1)], dim=1)
    return index, torch.stack([1 - fraction, fraction], dim=1)


def clipped_zoom(planes: torch.Tensor, factor: float) -> torch.Tensor:
    """`zoom_taps` along both axes of (H, W, B) planes."""
    h, w, _ = planes.shape
    return filter_axis(filter_axis(planes, *zoom_taps(h, factor), dim=0), *zoom_taps(w, factor), dim=1)


@functools.lru_cache(maxsize=64)
def box_taps(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL's `resize(..., Image.BOX)` along one axis: each output pixel averages the input pixels whose
    centres fall in its box (support 0.5 output pixels, never less than one input pixel)."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 0.5 * filter_scale
    width = math.ceil(support) * 2 + 1
    index = torch.zeros(out_size, width, dtype=torch.long)
    weight = torch.zeros(out_size, width, dtype=torch.float64)
    for out in range(out_size):
        centre = (out + 0.5) * scale
        low = max(int(centre - support + 0.5), 0)
        high = min(int(centre + support + 0.5), in_size)
        positions = torch.arange(low, high)
        t = (positions + 0.5 - centre) / filter_scale
        taps = ((t > -0.5) & (t <= 0.5)).double()
        index[out, : len(positions)] = positions
        weight[out, : len(positions)] = taps / taps.sum()
    return index, weight.float()


def shifted_sum(x: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """sum_k weights[n, k] * x[n] shifted so that pixel (r, c) reads (r + rows[n, k], c + cols[n, k]), the
    edge pixels repeated beyond the border (weights, rows, cols: (N, K))."""
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w)
    out = torch.zeros_like(flat)
    for k in range(weights.shape[1]):
        r = (torch.arange(h)[None, :] + rows[:, k, None]).clamp(0, h - 1)
        q = (torch.arange(w)[None, :] + cols[:, k, None]).clamp(0, w - 1)
        index = (r[:, :, None] * w + q[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
        out += flat.gather(2, index) * weights[:, k, None, None]
    return out.reshape(n, c, h, w)


def motion_blur_batch(x: torch.Tensor, radius: float, sigma: float, angles: np.ndarray) -> torch.Tensor:
    """ImageMagick's MotionBlurImage: a one-sided Gaussian of width 2 ceil(radius) + 1 along each image's angle
    (degrees): pixel p reads p + (ceil(i cos a - 0.5), ceil(i sin a - 0.5)) with weight exp(-i^2 / 2 sigma^2)."""
    steps = np.arange(2 * math.ceil(radius) + 1)
    kernel = np.exp(-(steps**2) / (2 * sigma**2))
    radians = np.deg2rad(np.asarray(angles, dtype=np.float64))[:, None]
    cols = np.ceil(steps * np.cos(radians) - 0.5).astype(np.int64)
    rows = np.ceil(steps * np.sin(radians) - 0.5).astype(np.int64)
    weights = torch.from_numpy(np.broadcast_to(kernel / kernel.sum(), cols.shape).copy()).float()
    return shifted_sum(x, weights, torch.from_numpy(rows), torch.from_numpy(cols))


def sample_bilinear(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, mode: str) -> torch.Tensor:
    """x (N, C, H, W) read at float positions rows, cols (N, H', W'), linearly interpolated, the image extended
    past its borders by `mode` (see `extend`)."""
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w)
    top, left = rows.floor(), cols.floor()
    down, right = (rows - top)[:, None], (cols - left)[:, None]
    top, left = top.long(), left.long()
    above, below = extend(top, h, mode) * w, extend(top + 1, h, mode) * w
    before, after = extend(left, w, mode), extend(left + 1, w, mode)

    def at(row_offsets, cols):
        index = (row_offsets + cols).reshape(n, 1, -1).expand(n, c, -1)
        return flat.gather(2, index).reshape(n, c, *rows.shape[1:])

    upper = at(above, before) * (1 - right) + at(above, after) * right
    lower = at(below, before) * (1 - right) + at(below, after) * right
    return upper * (1 - down) + lower * down


def plasma_fractal(generators: list[np.random.Generator], size: int, decay: float) -> np.ndarray:
    """The benchmark's fog pattern, one per generator: a diamond-square height map on a torus (size a power of
    two), scaled to [0, 1] (N, size, size). Each midpoint is the mean of its four neighbours plus uniform noise
    of amplitude wibble^2, wibble starting at 100 and divided by `decay` at every halving of the step."""
    steps = [size >> level for level in range(size.bit_length() - 1)]
    noise = np.stack([g.uniform(-1, 1, 3 * sum((size // step) ** 2 for step in steps)) for g in generators])
    grid = np.zeros((len(generators), size, size))
    used, wibble = 0, 100.0

    def noisy_mean(total: np.ndarray) -> np.ndarray:
        nonlocal used
        cells = total[0].size
        draws = noise[:, used : used + cells].reshape(total.shape)
        used += cells
        return total / 4 + wibble**2 * draws

    for step in steps:
        half = step // 2
        corners = grid[:, 0::step, 0::step]
        around = corners + np.roll(corners, -1, axis=1)
        grid[:, half::step, half::step] = noisy_mean(around + np.roll(around, -1, axis=2))
        centres = grid[:, half::step, half::step]
        # Midpoints of horizontal edges: the centres above and below, the corners left and right.
        grid[:, 0::step, half::step] = noisy_mean(
            centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2)
        )
        # Midpoints of vertical edges: the centres left and right, the corners above and below.
        grid[:, half::step, 0::step] = noisy_mean(
            centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1)
        )
        wibble /= decay
    grid -= grid.min(axis=(1, 2), keepdims=True)
    return grid / grid.max(axis=(1, 2), keepdims=True)


def power_of_two(side: int) -> int:
    return 1 << max(side - 1, 1).bit_length()


# The corruptions, with the published parameters (CIFAR-10-C first, ImageNet-C second).


@corruption("gaussian_noise", cifar=(0.04, 0.06, 0.08, 0.09, 0.10), imagenet=(0.08, 0.12, 0.18, 0.26, 0.38))
def gaussian_noise(x, std, generators):
    return x + stack([g.normal(0.0, std, x.shape[1:]) for g in generators])


@corruption("shot_noise", cifar=(500, 250, 100, 75, 50), imagenet=(60, 25, 12, 5, 3))
def shot_noise(x, photons, generators):
    """Poisson noise: each value becomes Poisson(x * photons) / photons."""
    expected = x.double().numpy() * photons
    return stack([g.poisson(lam) for g, lam in zip(generators, expected)]) / photons


@corruption("impulse_noise", cifar=(0.01, 0.02, 0.03, 0.05, 0.07), imagenet=(0.03, 0.06, 0.09, 0.17, 0.27))
def impulse_noise(x, amount, generators):
    """Salt and pepper (scikit-image's `s&p`): each value independently becomes 0 or 1 (equally likely)
    with probability `amount`."""
    draws = stack([g.random((2, *x.shape[1:])) for g in generators])
    return torch.where(draws[:, 0] < amount, (draws[:, 1] < 0.5).float(), x)


def disk_kernel(radius: float, alias_blur: float) -> torch.Tensor:
    """The benchmark's defocus kernel: a normalised disk on a grid of half-width max(8, radius), smoothed by
    OpenCV's GaussianBlur (3 x 3 up to radius 8, else 5 x 5; sigma `alias_blur`; mirrored border)."""
    half = 8 if radius <= 8 else int(radius)
    grid = torch.arange(-half, half + 1, dtype=torch.float64)
    disk = ((grid[:, None] ** 2 + grid[None, :] ** 2) <= radius**2).double()
    disk /= disk.sum()
    blur = 3 if radius <= 8 else 5
    offsets = torch.arange(blur, dtype=torch.float64) - (blur - 1) / 2
    kernel = torch.exp(-(offsets**2) / (2 * alias_blur**2))
    kernel /= kernel.sum()
    index = extend(torch.arange(len(grid))[:, None] + torch.arange(blur) - blur // 2, len(grid), "mirror")
    weights = kernel.expand(len(grid), -1)
    smooth = filter_axis(filter_axis(disk, index, weights, 0), index, weights, 1)
    # Rows and columns that are zero everywhere add nothing: drop them (the kernel stays centred).
    live = torch.nonzero(smooth.abs().sum(0) > 0).flatten()
    margin = int(min(live.min(), len(grid) - 1 - live.max()))
    return smooth[margin : len(grid) - margin, margin : len(grid) - margin].float()


@corruption(
    "defocus_blur",
    cifar=((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    imagenet=((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
)
def defocus_blur(x, setting, generators):
    """Convolution with an anti-aliased disk, the border mirrored (OpenCV's filter2D)."""
    kernel = disk_kernel(*setting)
    half = kernel.shape[0] // 2
    _, c, h, w = x.shape
    rows = extend(torch.arange(-half, h + half), h, "mirror")
    cols = extend(torch.arange(-half, w + half), w, "mirror")
    padded = x.index_select(2, rows).index_select(3, cols)
    # A depthwise convolution computes each image on its own: the same result in any batch.
    return F.conv2d(padded, kernel.expand(c, 1, *kernel.shape).contiguous(), groups=c)


def local_shuffle(count: int, height: int, width: int, delta: int, offsets: np.ndarray) -> np.ndarray:
    """The glass-blur pixel swaps as a permutation of each image's pixels: scanning rows from height - delta
    down to delta + 1 and, within a row, columns from width - delta down to delta + 1, the pixel is swapped
    with the one at the drawn offset (offsets: (N, iterations, positions, (dx, dy)), each in [-delta, delta)).
    Swaps are sequential within an image and done for all images at once."""
    rows, cols = np.meshgrid(np.arange(height - delta, delta, -1), np.arange(width - delta, delta, -1), indexing="ij")
    positions = (rows * width + cols).ravel()
    partners = (rows.ravel() + offsets[..., 1]) * width + cols.ravel() + offsets[..., 0]
    order = np.tile(np.arange(height * width), (count, 1))
    images = np.arange(count)
    for swaps in partners.transpose(1, 2, 0):  # one iteration: (positions, N)
        for position, partner in zip(positions, swaps):
            held = order[:, position].copy()
            order[:, position] = order[images, partner]
            order[images, partner] = held
    return order


@corruption(
    "glass_blur",
    cifar=((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    imagenet=((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),
)
def glass_blur(x, setting, generators):
    """Gaussian blur, local pixel swaps (`iterations` passes), Gaussian blur again."""
    sigma, delta, iterations = setting
    n, c, h, w = x.shape
    x = gaussian_blur(x, sigma)
    positions = max(h - 2 * delta, 0) * max(w - 2 * delta, 0)
    offsets = np.stack([g.integers(-delta, delta, (iterations, positions, 2)) for g in generators])
    order = torch.from_numpy(local_shuffle(n, h, w, delta, offsets))
    x = x.reshape(n, c, h * w).gather(2, order[:, None].expand(n, c, h * w)).reshape(n, c, h, w)
    return gaussian_blur(x, sigma)


@corruption(
    "motion_blur",
    cifar=((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
    imagenet=((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
)
def motion_blur(x, setting, generators):
    """ImageMagick's motion blur (radius, sigma) at an angle drawn uniformly from [-45, 45) degrees."""
    return motion_blur_batch(x, *setting, np.array([g.uniform(-45, 45) for g in generators]))


@corruption(
    "zoom_blur",
    cifar=((1.06, 0.01), (1.11, 0.01), (1.16, 0.01), (1.21, 0.01), (1.26, 0.01)),
    imagenet=((1.11, 0.01), (1.16, 0.01), (1.21, 0.02), (1.26, 0.02), (1.31, 0.03)),
)
def zoom_blur(x, setting, generators):
    """The mean of the image and its centre zooms by each factor of np.arange(1, stop, step), float end
    effects included as published (1.06 is in the first list, 1.15 ends the third); the factor 1 adds the
    unzoomed image a second time, as in the original."""
    factors = np.arange(1, *setting)
    planes = to_planes(x)
    out = planes.clone()
    for factor in factors:
        out += clipped_zoom(planes, float(factor))
    return from_planes(out / (len(factors) + 1), *x.shape[:2])


@corruption(
    "snow",
    cifar=(
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ),
    imagenet=(
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
    ),
)
def snow(x, setting, generators):
    """A Gaussian snow layer (mean, std), zoomed, thresholded, motion-blurred at an angle in [-135, -45)
    degrees, added to the image (itself greyed and brightened by 1 - keep) twice, once turned by 180 degrees."""
    mean, std, zoom, threshold, radius, sigma, keep = setting
    n, _, h, w = x.shape
    layers, angles = [], []
    for g in generators:
        layers.append(g.normal(mean, std, (1, h, w)))
        angles.append(g.uniform(-135, -45))
    layer = from_planes(clipped_zoom(to_planes(stack(layers)), zoom), n, 1)
    layer = torch.where(layer < threshold, 0.0, layer).clamp(0, 1)
    layer = motion_blur_batch(layer, radius, sigma, np.array(angles))
    grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]) * 1.5 + 0.5
    x = keep * x + (1 - keep) * torch.maximum(x, grey)
    return x + layer + layer.flip(-2, -1)


# The frost substitute's look: crystals per image, arm length (share of the image side), tint, and the
# haze / crystal / base intensities (a mean near 0.5, the photographs' range).
FROST_CRYSTALS = 40
FROST_ARM = (0.04, 0.16)
FROST_TINT = (0.85, 0.93, 1.0)
FROST_BASE, FROST_HAZE, FROST_ICE = 0.15, 0.5, 0.8


def ice_crystals(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Six-armed ice crystals (three lines at 60 degrees through a random centre, arms tapering to their
    tips), one pixel wide, brightness in [0, 1], (H, W)."""
    side = max(height, width)
    count = rng.poisson(FROST_CRYSTALS)
    centres = rng.uniform(0, 1, (count, 1, 1, 2)) * (height, width)
    arms = rng.uniform(*FROST_ARM, (count, 1, 1)) * side
    turn = rng.uniform(0, np.pi / 3, (count, 1, 1)) + np.array([0, 1, 2])[None, :, None] * np.pi / 3
    brightness = rng.uniform(0.5, 1.0, (count, 1, 1))
    along = np.linspace(-1, 1, 2 * math.ceil(FROST_ARM[1] * side) + 1)[None, None, :]
    rows = np.rint(centres[..., 0] + along * arms * np.sin(turn)).astype(np.int64)
    cols = np.rint(centres[..., 1] + along * arms * np.cos(turn)).astype(np.int64)
    value = np.broadcast_to(brightness * (1 - np.abs(along)), rows.shape)
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    ice = np.zeros((height, width))
    np.maximum.at(ice, (rows[inside], cols[inside]), value[inside])
    return ice


@corruption(
    "frost",
    cifar=((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
    imagenet=((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)),
)
def frost(x, setting, generators):
    """keep * image + strength * frost, with the procedural frost layer standing in for the photographs."""
    keep, strength = setting
    _, _, h, w = x.shape
    haze = plasma_fractal(generators, power_of_two(max(h, w)), 2.0)[:, None, :h, :w]
    ice = np.stack([ice_crystals(g, h, w) for g in generators])[:, None]
    layer = torch.from_numpy(np.clip(FROST_BASE + FROST_HAZE * haze + FROST_ICE * ice, 0, 1)).float()
    layer = layer * torch.tensor(FROST_TINT).view(1, 3, 1, 1)
    # Crystals one pixel wide at 32 px are as wide as several at 224: soften in proportion to the side.
    layer = gaussian_blur(layer, max(h, w) / 128, mode="reflect")
    return keep * x + strength * layer


@corruption(
    "fog",
    cifar=((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
    imagenet=((1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)),
)
def fog(x, setting, generators):
    """Add strength * a plasma fractal (its decay per octave given), rescale by max / (max + strength)."""
    strength, decay = setting
    _, _, h, w = x.shape
    size = power_of_two(max(h, w))
    pattern = torch.from_numpy(plasma_fractal(generators, size, decay)[:, None, :h, :w]).float()
    peak = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x + strength * pattern) * peak / (peak + strength)


@corruption("brightness", cifar=(0.05, 0.1, 0.15, 0.2, 0.3), imagenet=(0.1, 0.2, 0.3, 0.4, 0.5))
def brightness(x, shift, generators):
    """HSV value + shift, clipped to 1, hue and saturation kept: every channel scales by the new value over
    the old (black pixels, of undefined hue, become grey at the new value)."""
    value = x.amax(dim=1, keepdim=True)
    raised = (value + shift).clamp(max=1)
    return torch.where(value > 0, x * raised / value.clamp(min=1e-12), raised)


@corruption("contrast", cifar=(0.75, 0.5, 0.4, 0.3, 0.15), imagenet=(0.4, 0.3, 0.2, 0.1, 0.05))
def contrast(x, factor, generators):
    """(x - mean) * factor + mean, the mean per image and channel."""
    mean = x.double().mean(dim=(2, 3), keepdim=True).float()
    return (x - mean) * factor + mean


@corruption(
    "elastic_transform",
    cifar=tuple(
        (32 * a, 32 * s, 32 * j)
        for a, s, j in ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))
    ),
    # "244 should have been 224", says the original; the published images use 244.
    imagenet=tuple(
        (244 * a, 244 * s, 244 * j)
        for a, s, j in ((2, 0.7, 0.1), (2, 0.08, 0.2), (0.05, 0.01, 0.02), (0.07, 0.01, 0.02), (0.12, 0.01, 0.02))
    ),
)
def elastic_transform(x, setting, generators):
    """A random affine warp (three control points moved by up to `jitter` pixels, mirrored border), then a
    displacement field: uniform noise in [-1, 1] smoothed by a Gaussian of `sigma` (reflected, truncated at 3
    sigma) times `alpha`, applied with linear interpolation and a reflected border."""
    alpha, sigma, jitter = setting
    n, _, h, w = x.shape
    centre = np.array([w // 2, h // 2], dtype=np.float64)  # (x, y)
    square = min(h, w) // 3
    anchors = np.stack([centre + square, centre + (square, -square), centre - square])
    smooth_rows, smooth_cols = gaussian_matrix(h, sigma, 3.0, "reflect"), gaussian_matrix(w, sigma, 3.0, "reflect")
    inverses, shifts, fields = [], [], []
    for g in generators:
        moved = anchors + g.uniform(-jitter, jitter, anchors.shape)
        # The affine map taking the anchors to their moved places, inverted: where each output pixel reads.
        forward = np.linalg.solve(np.hstack([anchors, np.ones((3, 1))]), moved).T  # (2, 3)
        inverse = np.linalg.inv(forward[:, :2])
        inverses.append(inverse)
        shifts.append(inverse @ forward[:, 2])
        dx = smooth_rows @ g.uniform(-1, 1, (h, w)) @ smooth_cols.T * alpha
        dy = smooth_rows @ g.uniform(-1, 1, (h, w)) @ smooth_cols.T * alpha
        fields.append(np.stack([dy, dx]))
    inverse, shift = torch.from_numpy(np.stack(inverses)), torch.from_numpy(np.stack(shifts))
    grid_rows, grid_cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    source = torch.einsum("nij,jhw->nihw", inverse, torch.stack([grid_cols, grid_rows])) - shift[:, :, None, None]
    x = sample_bilinear(x, source[:, 1].float(), source[:, 0].float(), "mirror")
    field = stack(fields)
    return sample_bilinear(x, grid_rows.float() + field[:, 0], grid_cols.float() + field[:, 1], "reflect")


@corruption("pixelate", cifar=(0.95, 0.9, 0.85, 0.75, 0.65), imagenet=(0.6, 0.5, 0.4, 0.3, 0.25))
def pixelate(x, factor, generators):
    """PIL box resize down to int(side * factor), then box resize back up."""
    _, _, h, w = x.shape
    small_h, small_w = int(h * factor), int(w * factor)
    small = separable(x, box_taps(h, small_h), box_taps(w, small_w))
    return separable(small, box_taps(small_h, h), box_taps(small_w, w))


@corruption("jpeg_compression", cifar=(80, 65, 58, 50, 40), imagenet=(25, 18, 15, 10, 7))
def jpeg_compression(x, quality, generators):
    """Save as JPEG at `quality` with PIL and read back, as the original does."""
    decoded = []
    for pixels in x.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
        decoded.append(np.asarray(Image.open(buffer).convert("RGB")))
    return torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).float() / 255


# The published CIFAR-10-C / CIFAR-100-C files.


def load_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {path}: {error}") from error


class PublishedCorruptions:
    """The published layout: `<root>/<corruption>.npy`, uint8 (5 N, H, W, 3), the split's N images at
    severity 1, then 2, ... 5, and `<root>/labels.npy`, the N labels five times over."""

    def __init__(self, root: str | Path, names: Sequence[str], labels: np.ndarray):
        root = Path(root)
        if not root.is_dir():
            raise UserError(
                f"corrupted images folder {root} does not exist (expected <corruption>.npy and "
                "labels.npy, as CIFAR-10-C / CIFAR-100-C are published)"
            )
        count = len(labels)
        if not (root / "labels.npy").is_file():
            raise UserError(f"no labels.npy in {root} (the published layout: <corruption>.npy and labels.npy)")
        stored = load_array(root / "labels.npy")
        if stored.shape != (5 * count,):
            raise UserError(
                f"{root / 'labels.npy'} holds {stored.shape[0] if stored.ndim else 0} labels; the "
                f"split has {count} images, so 5 x {count} = {5 * count} were expected"
            )
        wrong = np.flatnonzero(np.asarray(stored, dtype=np.int64).reshape(5, count) != labels[None])
        if len(wrong):
            raise UserError(
                f"{root / 'labels.npy'} does not match the split's labels (first at sample "
                f"{wrong[0] % count}, severity {wrong[0] // count + 1}): is it another data set?"
            )
        missing = [name for name in names if not (root / f"{name}.npy").is_file()]
        if missing:
            raise UserError(f"{root} has no {', '.join(f'{name}.npy' for name in missing)}")
        self.root, self.count, self.arrays = root, count, {}
        for name in names:
            array = load_array(root / f"{name}.npy")
            if array.dtype != np.uint8 or array.ndim != 4 or array.shape[0] != 5 * count or array.shape[3] != 3:
                raise UserError(
                    f"{root / f'{name}.npy'} is {array.dtype} {array.shape}; expected uint8 "
                    f"({5 * count}, H, W, 3): the split's {count} images at each of 5 severities"
                )
            self.arrays[name] = array
        shapes = {array.shape[1:3] for array in self.arrays.values()}
        if len(shapes) > 1:
            raise UserError(f"the arrays in {root} differ in image size: {sorted(shapes)}")
        self.image_size = shapes.pop() if shapes else None

    def images(self, name: str, severity: int, indices: Sequence[int]) -> torch.Tensor:
        """The images `indices` of corruption `name` at `severity` as floats in [0, 1], (B, 3, H, W)."""
        rows = (severity - 1) * self.count + np.asarray(indices, dtype=np.int64)
        pixels = np.ascontiguousarray(self.arrays[name][rows])
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().float().div(255)
