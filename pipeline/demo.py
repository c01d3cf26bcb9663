"""The built-in demo dataset: small colour images of simple objects, with a caption per image.

Generated deterministically from (seed, split, index), offline. Colour, size, position, background
and noise vary independently of the class, so the class is in the shape alone. The caption names the
object and some of its other attributes ("a photo of a small red kite in the top left"), which is
what a vision-language model trained on the captions learns from.

Besides the labelled `train` and `test` splits there is an unlabelled `pool` of captioned images, as
in RichKD's setting: the teacher learns from a few labels, CLIP from many more image-text pairs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from richkd.pipeline.data import ImageDataset, open_image_folder, register_dataset
from richkd.pipeline.errors import UserError
from richkd.pipeline.runtime import progress_bar

CLASS_NAMES = ("ball", "box", "tent", "kite", "plus_sign", "star", "ring", "moon")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "orange": (240, 140, 30), "purple": (140, 60, 190), "pink": (240, 130, 190), "cyan": (60, 200, 220),
    "white": (245, 245, 245), "black": (20, 20, 20),
}
BACKGROUNDS = {
    "dark blue": (20, 30, 80), "grey": (128, 128, 128), "light grey": (200, 200, 200), "brown": (110, 70, 40),
    "dark green": (20, 70, 30), "beige": (225, 210, 170), "dark": (35, 35, 35), "sky blue": (140, 190, 235),
}
# Object radii as shares of the image side.
SIZES = {"small": (0.22, 0.28), "medium": (0.28, 0.34), "large": (0.34, 0.40)}
SPLITS = {"train": 0, "test": 1, "pool": 2}
# The pool's images carry captions but no labels: one folder, so an image folder reader sees one class.
POOL_SPLIT, POOL_FOLDER = "pool", "unlabelled"
SIDE = 16
SUPERSAMPLE = 4


@dataclass
class DemoSample:
    image: np.ndarray  # uint8 (side, side, 3)
    label: int
    caption: str


def _shape_polygons(name: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[str, list]]:
    """Drawing instructions (kind, coordinates) of one object, in supersampled pixels."""
    def polygon(points):
        cos, sin = math.cos(angle), math.sin(angle)
        return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in points]

    if name == "ball":
        return [("ellipse", [cx - r, cy - r, cx + r, cy + r])]
    if name == "ring":
        return [("ring", [cx - r, cy - r, cx + r, cy + r])]
    if name == "moon":
        return [("moon", [cx - r, cy - r, cx + r, cy + r])]
    if name == "box":
        return [("polygon", polygon([(-r, -r), (r, -r), (r, r), (-r, r)]))]
    if name == "tent":
        return [("polygon", polygon([(0, -r), (r, r * 0.8), (-r, r * 0.8)]))]
    if name == "kite":
        return [("polygon", polygon([(0, -r), (r * 0.65, 0), (0, r), (-r * 0.65, 0)]))]
    if name == "plus_sign":
        w = r * 0.35
        return [("polygon", polygon([(-w, -r), (w, -r), (w, r), (-w, r)])),
                ("polygon", polygon([(-r, -w), (r, -w), (r, w), (-r, w)]))]
    if name == "star":
        points = [(r * (1 if k % 2 == 0 else 0.45) * math.sin(k * math.pi / 5),
                   -r * (1 if k % 2 == 0 else 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
        return [("polygon", polygon(points))]
    raise KeyError(name)


def _position_words(cx: float, cy: float, side: int) -> str:
    third = side / 3
    row = ("top", "", "bottom")[min(int(cy // third), 2)]
    column = ("left", "", "right")[min(int(cx // third), 2)]
    if row and column:
        return f"in the {row} {column}"
    if row:
        return f"at the {row}"
    return f"on the {column}" if column else "in the centre"


def demo_sample(seed: int, split: str, index: int, side: int = SIDE) -> DemoSample:
    """Sample `index` of `split`: the same pixels and caption on every machine."""
    rng = np.random.default_rng((seed, SPLITS[split], index))
    unit = side / 32  # geometry is drawn in a 32-pixel image's units
    label = int(rng.integers(len(CLASS_NAMES)))
    name = CLASS_NAMES[label]
    colour_name = str(rng.choice(list(COLOURS)))
    background_name = str(rng.choice([b for b in BACKGROUNDS if _contrast(BACKGROUNDS[b], COLOURS[colour_name])]))
    size_name = str(rng.choice(list(SIZES)))
    radius = rng.uniform(*SIZES[size_name]) * side
    cx, cy = (rng.uniform(radius + unit, side - radius - unit) for _ in range(2))
    angle = rng.uniform(-0.4, 0.4)

    scale = SUPERSAMPLE
    top, bottom = np.array(BACKGROUNDS[background_name]), np.array(BACKGROUNDS[background_name]) * rng.uniform(0.6, 1.3)
    gradient = np.linspace(0, 1, side * scale)[:, None, None]
    canvas = (top * (1 - gradient) + bottom * gradient).clip(0, 255)
    canvas = np.broadcast_to(canvas, (side * scale, side * scale, 3)).astype(np.uint8)
    picture = Image.fromarray(np.ascontiguousarray(canvas))
    draw = ImageDraw.Draw(picture)
    # A faint distractor blob of another colour, so colour patches alone do not give the object away.
    blob_colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    bx, by, br = rng.uniform(0, side) * scale, rng.uniform(0, side) * scale, rng.uniform(1.5, 3) * unit * scale
    draw.ellipse([bx - br, by - br, bx + br, by + br], fill=blob_colour)
    colour = tuple(int(c) for c in np.clip(np.array(COLOURS[colour_name]) + rng.normal(0, 12, 3), 0, 255))
    background = tuple(int(c) for c in canvas[int(cy * scale), int(cx * scale)])
    for kind, coords in _shape_polygons(name, cx * scale, cy * scale, radius * scale, angle):
        if kind == "polygon":
            draw.polygon(coords, fill=colour)
        elif kind == "ellipse":
            draw.ellipse(coords, fill=colour)
        elif kind == "ring":
            draw.ellipse(coords, outline=colour, width=max(2, int(radius * scale * 0.35)))
        else:  # moon: a disc with an offset disc of background colour cut out of it
            draw.ellipse(coords, fill=colour)
            shift = radius * scale * 0.55
            x0, y0, x1, y1 = coords
            draw.ellipse([x0 + shift, y0 - shift * 0.3, x1 + shift, y1 - shift * 0.3], fill=background)
    small = picture.resize((side, side), Image.Resampling.LANCZOS)
    noisy = np.asarray(small, dtype=np.float32) + rng.normal(0, rng.uniform(3, 15), (side, side, 3))
    image = np.clip(noisy, 0, 255).astype(np.uint8)
    caption = _caption(rng, name.replace("_", " "), size_name, colour_name, _position_words(cx, cy, side),
                       background_name)
    return DemoSample(image, label, caption)


def _caption(rng: np.random.Generator, name: str, size: str, colour: str, position: str, background: str) -> str:
    """The object's name, and each other attribute only some of the time, as people caption pictures.

    Since only the name is always there, matching captions to images needs the shape, not just the colours.
    """
    words = [word for word, keep in ((size, rng.random() < 0.3), (colour, rng.random() < 0.3)) if keep]
    noun = " ".join([*words, name])
    article = "an" if noun[0] in "aeiou" else "a"
    prefix = str(rng.choice(["", "a photo of ", "a picture of ", "an image of "]))
    tail = [part for part, keep in ((position, rng.random() < 0.2), (f"on a {background} background",
                                                                      rng.random() < 0.15)) if keep]
    return " ".join([f"{prefix}{article} {noun}", *tail])


def _contrast(a, b) -> bool:
    return float(np.abs(np.array(a) - np.array(b)).sum()) > 150


def write_demo(root: str | Path, train: int, test: int, pool: int = 0, seed: int = 0, side: int = SIDE) -> None:
    """The demo as an image folder (`root/<split>/<class>/<index>.png`) with `root/<split>/captions.json`;
    the unlabelled pool's images are all in `root/pool/unlabelled/`. Each sample depends on its index alone,
    so the images are drawn by one process per core, the same files as by one."""
    root = Path(root)
    with progress_bar("img") as progress, ProcessPoolExecutor(os.cpu_count() or 1) as pool_of_workers:
        task = progress.add_task("demo images", total=train + test + pool)
        for split, count in (("train", train), ("test", test), (POOL_SPLIT, pool)):
            if not count:
                continue
            for name in (POOL_FOLDER,) if split == POOL_SPLIT else CLASS_NAMES:
                (root / split / name).mkdir(parents=True, exist_ok=True)
            starts = range(0, count, DEMO_CHUNK)
            chunks = [(root, seed, split, range(start, min(start + DEMO_CHUNK, count)), side) for start in starts]
            captions = {}
            for written in pool_of_workers.map(_write_samples, *zip(*chunks)):
                captions.update(written)
                progress.advance(task, len(written))
            (root / split / "captions.json").write_text(json.dumps(captions, indent=0))


# Samples a worker draws and writes at a time.
DEMO_CHUNK = 500


def _write_samples(root: Path, seed: int, split: str, indices: range, side: int) -> dict[str, str]:
    """Draw and save samples `indices` of `split`; their captions by key."""
    captions = {}
    for index in indices:
        sample = demo_sample(seed, split, index, side)
        folder = POOL_FOLDER if split == POOL_SPLIT else CLASS_NAMES[sample.label]
        key = f"{folder}/{index:06d}.png"
        Image.fromarray(sample.image).save(root / split / key)
        captions[key] = sample.caption
    return captions


@register_dataset("demo")
def open_demo(root: Path, split: str, download: bool) -> ImageDataset:
    """The demo as written by `richkd demo`: an image folder of square images of one side (its native size)."""
    if download or not (root / split).is_dir():
        raise UserError(f"no demo data under {root}: generate it with `richkd demo --out {root}` "
                        "(it is generated, never downloaded)")
    return dataclasses.replace(open_image_folder(root, split), name="demo")
