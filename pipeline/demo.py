"""The built-in datasets: small colour images of simple objects, with a caption per image, in two presets.

Generated deterministically from (seed, split, index), offline. Besides the labelled `train` and `test` splits
there is an unlabelled `pool` of captioned images, as in RichKD's setting: the teacher learns from a few labels,
CLIP from many more image-text pairs.

- `shapes` (the demo): eight kinds of object. Colour, size, position, background and noise vary independently
  of the class, so the class is in the shape alone. The caption names the object and some of its other
  attributes ("a photo of a small red kite in the top left").
- `study` (the paper's regime): 24 classes, each a pattern of a shape ("striped star"), grouped into superclasses
  by shape. The labelled splits show objects in five colours only; a `shifted` test split shows the same classes
  in five other colours, which the captioned pool shows too: captions name the pattern, the shape and often the
  colour, so a CLIP learns from them what the labels never show the teacher.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from richkd.pipeline.config import DEMO_PRESETS, DEMO_SIDE
from richkd.pipeline.data import ImageDataset, open_image_folder, register_dataset
from richkd.pipeline.errors import UserError
from richkd.pipeline.execution import progress_bar

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
SPLITS = {"train": 0, "test": 1, "pool": 2, "shifted": 3}
# The pool's images carry captions but no labels: one folder, so an image folder reader sees one class.
POOL_SPLIT, POOL_FOLDER = "pool", "unlabelled"
SUPERSAMPLE = 4


@dataclass
class DemoSample:
    image: np.ndarray  # uint8 (side, side, 3)
    label: int
    caption: str
    # What was drawn (shape, colour, background, size, ...), written beside the captions.
    attributes: dict = field(default_factory=dict)


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


def demo_sample(seed: int, split: str, index: int, side: int = DEMO_SIDE) -> DemoSample:
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
    # Since only the name is always there, matching captions to images needs the shape, not just the colours.
    caption = _caption(rng, name.replace("_", " "), [(size_name, 0.3), (colour_name, 0.3)],
                       _position_words(cx, cy, side), background_name, 0.15)
    return DemoSample(image, label, caption, {"shape": name, "colour": colour_name, "background": background_name,
                                              "size": size_name})


def _caption(rng: np.random.Generator, name: str, attributes: Sequence[tuple[str, float]], position: str,
             background: str, background_chance: float) -> str:
    """The object's name, and each attribute with its chance (and the position and background less often), as
    people caption pictures."""
    words = [word for word, chance in attributes if rng.random() < chance]
    noun = " ".join([*words, name])
    article = "an" if noun[0] in "aeiou" else "a"
    prefix = str(rng.choice(["", "a photo of ", "a picture of ", "an image of "]))
    tail = [part for part, chance in ((position, 0.2), (f"on a {background} background", background_chance))
            if rng.random() < chance]
    return " ".join([f"{prefix}{article} {noun}", *tail])


def _contrast(a, b) -> bool:
    return float(np.abs(np.array(a) - np.array(b)).sum()) > 150


# The study preset: shape x pattern classes, superclasses by shape, and colours split between the labelled
# splits and the shifted test split (the pool shows them all).
STUDY_SHAPES = ("ball", "box", "tent", "kite", "plus_sign", "star")
STUDY_PATTERNS = ("plain", "striped", "checked", "outlined")
STUDY_CLASS_NAMES = tuple(f"{pattern}_{shape}" for shape in STUDY_SHAPES for pattern in STUDY_PATTERNS)
LABELLED_COLOURS = ("red", "yellow", "blue", "white", "black")
SHIFTED_COLOURS = ("green", "orange", "purple", "cyan", "pink")
STUDY_COLOURS = {"train": LABELLED_COLOURS, "test": LABELLED_COLOURS, "shifted": SHIFTED_COLOURS,
                 POOL_SPLIT: LABELLED_COLOURS + SHIFTED_COLOURS}
# The study's random stream, apart from the shapes demo's of the same (seed, split, index).
STUDY_STREAM = 1


def study_sample(seed: int, split: str, index: int, side: int = DEMO_SIDE) -> DemoSample:
    """Sample `index` of `split` of the study preset. Classes take turns (index mod 24), so every split is balanced;
    the object's colour, and the distractor blob's, come from the split's colours alone."""
    rng = np.random.default_rng((seed, SPLITS[split], index, STUDY_STREAM))
    unit = side / 32
    label = index % len(STUDY_CLASS_NAMES)
    shape, pattern = STUDY_SHAPES[label // len(STUDY_PATTERNS)], STUDY_PATTERNS[label % len(STUDY_PATTERNS)]
    colours = STUDY_COLOURS[split]
    colour_name = str(rng.choice(colours))
    background_name = str(rng.choice([b for b in BACKGROUNDS if _contrast(BACKGROUNDS[b], COLOURS[colour_name])]))
    size_name = str(rng.choice(list(SIZES)))
    radius = rng.uniform(*SIZES[size_name]) * side * 1.15
    cx, cy = (rng.uniform(radius + unit, side - radius - unit) for _ in range(2))
    angle = rng.uniform(-0.4, 0.4)

    n = side * SUPERSAMPLE
    top = np.array(BACKGROUNDS[background_name])
    bottom = top * rng.uniform(0.6, 1.3)
    gradient = np.linspace(0, 1, n)[:, None, None]
    canvas = np.broadcast_to((top * (1 - gradient) + bottom * gradient).clip(0, 255), (n, n, 3)).astype(np.uint8)
    picture = Image.fromarray(np.ascontiguousarray(canvas))
    blob_colour = COLOURS[str(rng.choice(colours))]
    bx, by, br = rng.uniform(0, n), rng.uniform(0, n), rng.uniform(1.5, 3) * unit * SUPERSAMPLE
    ImageDraw.Draw(picture).ellipse([bx - br, by - br, bx + br, by + br], fill=blob_colour)
    colour = np.clip(np.array(COLOURS[colour_name]) + rng.normal(0, 12, 3), 0, 255)

    mask = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(mask)
    for kind, coords in _shape_polygons(shape, cx * SUPERSAMPLE, cy * SUPERSAMPLE, radius * SUPERSAMPLE, angle):
        (draw.polygon if kind == "polygon" else draw.ellipse)(coords, fill=255)
    if pattern == "outlined":  # the shape minus its erosion: an outline about a pixel wide
        width = max(2, int(1.2 * SUPERSAMPLE * side / 16))
        mask = Image.fromarray(np.asarray(mask) & ~np.asarray(mask.filter(ImageFilter.MinFilter(2 * width + 1))))
    inside = np.asarray(mask) > 127
    # Stripes and checks of another shade (darker; lighter for a dark colour), four pixels a period at 16 px, turned
    # with the object.
    y, x = np.mgrid[0:n, 0:n] / (SUPERSAMPLE * side / 8)
    along, across = x * math.cos(angle) - y * math.sin(angle), x * math.sin(angle) + y * math.cos(angle)
    patterned = {"striped": across // 1 % 2 == 1, "checked": (along // 1 + across // 1) % 2 == 1}.get(pattern, False)
    shade = colour * 0.25 if colour.mean() > 80 else colour + (255 - colour) * 0.5
    fill = np.where(np.asarray(patterned)[..., None], shade, colour)
    pixels = np.asarray(picture).astype(np.float32)
    pixels[inside] = np.broadcast_to(fill, (n, n, 3))[inside]
    small = Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).resize((side, side), Image.Resampling.LANCZOS)
    noisy = np.asarray(small, dtype=np.float32) + rng.normal(0, rng.uniform(3, 12), (side, side, 3))
    image = np.clip(noisy, 0, 255).astype(np.uint8)
    # The shape always, the pattern nearly always, the colour half the time ("a photo of a green striped star").
    caption = _caption(rng, shape.replace("_", " "), [(size_name, 0.3), (colour_name, 0.5), (pattern, 0.9)],
                       _position_words(cx, cy, side), background_name, 0.2)
    return DemoSample(image, label, caption, {"shape": shape, "pattern": pattern, "colour": colour_name,
                                              "background": background_name, "size": size_name})


@dataclass(frozen=True)
class Preset:
    """A built-in dataset: its classes, its labelled splits (the pool is every preset's) and how a sample is drawn."""

    class_names: tuple[str, ...]
    splits: tuple[str, ...]
    draw: Callable[[int, str, int, int], DemoSample]
    # Each class's superclass, written to <root>/superclasses.json.
    superclasses: dict[str, str] | None = None


PRESETS = {
    "shapes": Preset(CLASS_NAMES, DEMO_PRESETS["shapes"].labelled_splits, demo_sample),
    "study": Preset(STUDY_CLASS_NAMES, DEMO_PRESETS["study"].labelled_splits, study_sample,
                    {name: name.split("_", 1)[1] for name in STUDY_CLASS_NAMES}),
}
SUPERCLASSES_FILE = "superclasses.json"


def write_demo(root: str | Path, train: int, test: int, pool: int = 0, seed: int = 0, side: int = DEMO_SIDE,
               preset: str = "shapes", shifted: int = 0) -> None:
    """A preset as an image folder (`root/<split>/<class>/<index>.png`) with `root/<split>/captions.json` and
    `attributes.json` (what each image shows); the unlabelled pool's images are all in `root/pool/unlabelled/`.
    Each sample depends on its index alone, so the images are drawn by one process per core, the same files as by
    one."""
    root = Path(root)
    chosen = PRESETS[preset]
    counts = {"train": train, "test": test, "shifted": shifted, POOL_SPLIT: pool}
    with progress_bar("img") as progress, ProcessPoolExecutor(os.cpu_count() or 1) as pool_of_workers:
        task = progress.add_task(f"{preset} images", total=sum(counts.values()))
        for split, count in counts.items():
            if not count:
                continue
            for name in (POOL_FOLDER,) if split == POOL_SPLIT else chosen.class_names:
                (root / split / name).mkdir(parents=True, exist_ok=True)
            starts = range(0, count, DEMO_CHUNK)
            chunks = [(root, seed, split, range(start, min(start + DEMO_CHUNK, count)), side, preset)
                      for start in starts]
            captions, attributes = {}, {}
            for written in pool_of_workers.map(_write_samples, *zip(*chunks)):
                for key, (caption, drawn) in written.items():
                    captions[key], attributes[key] = caption, drawn
                progress.advance(task, len(written))
            (root / split / "captions.json").write_text(json.dumps(captions, indent=0))
            (root / split / "attributes.json").write_text(json.dumps(attributes, indent=0))
    if chosen.superclasses:
        (root / SUPERCLASSES_FILE).write_text(json.dumps(chosen.superclasses, indent=1))


def holds_only_a_demo(root: Path) -> bool:
    """Whether `root` holds nothing but what write_demo writes (its split folders, superclasses.json): a demo that
    may be replaced by another, when a user's own files must never be."""
    splits = {split for preset in PRESETS.values() for split in preset.splits} | {POOL_SPLIT}
    return all(child.name in splits if child.is_dir() else child.name == SUPERCLASSES_FILE for child in root.iterdir())


# Samples a worker draws and writes at a time.
DEMO_CHUNK = 500


def _write_samples(root: Path, seed: int, split: str, indices: range, side: int,
                   preset: str) -> dict[str, tuple[str, dict]]:
    """Draw and save samples `indices` of `split`: (caption, attributes) by key."""
    chosen = PRESETS[preset]
    written = {}
    for index in indices:
        sample = chosen.draw(seed, split, index, side)
        folder = POOL_FOLDER if split == POOL_SPLIT else chosen.class_names[sample.label]
        key = f"{folder}/{index:06d}.png"
        Image.fromarray(sample.image).save(root / split / key)
        written[key] = sample.caption, sample.attributes
    return written


@register_dataset("demo")
def open_demo(root: Path, split: str, download: bool) -> ImageDataset:
    """The demo as written by `richkd demo`: an image folder of square images of one side (its native size)."""
    splits = sorted(folder.name for folder in root.iterdir() if folder.is_dir()) if root.is_dir() else []
    if download or not splits:
        raise UserError(f"no demo data under {root}: generate it with `richkd demo --out {root}` "
                        "(it is generated, never downloaded)")
    if split not in splits:
        raise UserError(f"the demo under {root} has no split '{split}'; splits: {', '.join(splits)}")
    return dataclasses.replace(open_image_folder(root, split), name="demo", labelled=split != POOL_SPLIT)
