"""Deterministic captioned-image generator for the shipped memorizing model (numpy only).

Two parts, as in the paper's Scenario 3 (duplication):
- a large varied part: one or two shapes of known colour, kind, size and position on a plain
  or two-colour background; captions describe a random subset of those attributes, so that an
  unspecified attribute varies and the unconditional model stays varied;
- a small duplicated part: a few dozen fixed images, each with its own caption, seen hundreds of
  times in training. Their identity is global (two colour fields, two large shapes at fixed
  places) while the caption names only the two shapes, so a generation can follow the caption
  without copying the image.

Every image carries its attributes: the ground truth for the alignment classifier.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SIZE = 32
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOUR_NAMES = list(COLOURS)
KINDS = ["circle", "square", "triangle", "cross"]
POSITIONS: dict[str, tuple[float, float]] = {  # (x, y) centre in pixels
    "left": (8.5, 16.0),
    "right": (23.5, 16.0),
    "top": (16.0, 8.5),
    "bottom": (16.0, 23.5),
    "center": (16.0, 16.0),
}
POSITION_NAMES = list(POSITIONS)
RADIUS = {"small": 4.5, "large": 7.5}
TITLE_ADJECTIVES = [
    "silent", "golden", "hidden", "electric", "frozen", "wild", "ancient", "velvet", "broken",
    "distant", "lunar", "crimson", "quiet", "savage", "gentle", "hollow", "radiant", "secret",
    "wandering", "iron", "paper", "glass", "burning", "sleeping",
]
TITLE_NOUNS = [
    "harbor", "garden", "empire", "river", "lantern", "kingdom", "orchard", "voyage", "mirror",
    "temple", "meadow", "tower", "island", "canyon", "forest", "citadel", "valley", "comet",
    "desert", "bridge", "castle", "glacier", "market", "station",
]


@dataclass
class Shape:
    kind: str
    colour: str
    position: str
    size: str
    dx: float = 0.0
    dy: float = 0.0


@dataclass
class Sample:
    caption: str
    shapes: list[Shape]
    background: tuple[str, ...]  # one colour, or two for a split background
    split: str = "none"  # "none" | "vertical" | "horizontal"
    duplicated: bool = False
    mentioned: list[tuple[str, str]] = field(default_factory=list)  # (colour, kind) named in the caption


def render(sample: Sample) -> np.ndarray:
    """The sample's image, uint8 (SIZE, SIZE, 3)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:] = COLOURS[sample.background[0]]
    if sample.split != "none":
        second = (xx >= SIZE / 2) if sample.split == "vertical" else (yy >= SIZE / 2)
        img[second] = COLOURS[sample.background[1]]
    for s in sample.shapes:
        cx, cy = POSITIONS[s.position]
        cx, cy, r = cx + s.dx, cy + s.dy, RADIUS[s.size]
        ax, ay = xx - cx, yy - cy
        if s.kind == "circle":
            mask = ax**2 + ay**2 <= r**2
        elif s.kind == "square":
            mask = (np.abs(ax) <= r * 0.85) & (np.abs(ay) <= r * 0.85)
        elif s.kind == "triangle":  # apex up
            mask = (ay <= r * 0.8) & (ay >= -r) & (np.abs(ax) <= (ay + r) * 0.6)
        else:  # cross
            w = r * 0.35
            mask = ((np.abs(ax) <= w) & (np.abs(ay) <= r)) | ((np.abs(ay) <= w) & (np.abs(ax) <= r))
        img[mask] = COLOURS[s.colour]
    return img.astype(np.uint8)


def _shape_phrase(s: Shape, rng: np.random.Generator) -> str:
    words = ["a"]
    if rng.random() < 0.5:
        words.append(s.size)
    words += [s.colour, s.kind]
    if rng.random() < 0.6:
        words.append("in the center" if s.position == "center" else f"at the {s.position}")
    return " ".join(words)


def varied_sample(rng: np.random.Generator) -> Sample:
    n_shapes = 1 if rng.random() < 0.5 else 2
    split = "none" if rng.random() < 0.7 else str(rng.choice(["vertical", "horizontal"]))
    background = tuple(rng.choice(COLOUR_NAMES, size=1 if split == "none" else 2, replace=False).tolist())
    positions = rng.choice(POSITION_NAMES, size=n_shapes, replace=False).tolist()
    shapes = []
    for pos in positions:
        colour = str(rng.choice([c for c in COLOUR_NAMES if c not in background]))
        shapes.append(
            Shape(
                kind=str(rng.choice(KINDS)), colour=colour, position=pos,
                size=str(rng.choice(list(RADIUS))), dx=float(rng.uniform(-2, 2)), dy=float(rng.uniform(-2, 2)),
            )
        )
    caption = " and ".join(_shape_phrase(s, rng) for s in shapes)
    if rng.random() < 0.7:
        caption += f", on a {' and '.join(background)} background"
    return Sample(caption, shapes, background, split, False, [(s.colour, s.kind) for s in shapes])


def duplicated_samples(count: int, seed: int = 1234) -> list[Sample]:
    """The fixed duplicated set: distinct titles, global identity, captions naming only the shapes."""
    rng = np.random.default_rng(seed)
    titles: set[str] = set()
    samples = []
    while len(samples) < count:
        title = f"{rng.choice(TITLE_ADJECTIVES)} {rng.choice(TITLE_NOUNS)}"
        if title in titles:
            continue
        titles.add(title)
        split = str(rng.choice(["vertical", "horizontal"]))
        background = tuple(rng.choice(COLOUR_NAMES, size=2, replace=False).tolist())
        pair = ("left", "right") if rng.random() < 0.5 else ("top", "bottom")
        free = [c for c in COLOUR_NAMES if c not in background]
        colours = rng.choice(free, size=2, replace=False).tolist()
        kinds = rng.choice(KINDS, size=2, replace=False).tolist()
        shapes = [Shape(k, c, p, "large") for k, c, p in zip(kinds, colours, pair)]
        caption = f"the {title} poster, a {colours[0]} {kinds[0]} and a {colours[1]} {kinds[1]}"
        samples.append(Sample(caption, shapes, background, split, True, [(s.colour, s.kind) for s in shapes]))
    return samples


def varied_samples(count: int, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    return [varied_sample(rng) for _ in range(count)]


def attribute_labels(sample: Sample) -> np.ndarray:
    """Multi-hot ground truth: (colour, kind) pairs present, then background colours present."""
    y = np.zeros(len(COLOUR_NAMES) * len(KINDS) + len(COLOUR_NAMES), np.float32)
    for s in sample.shapes:
        y[COLOUR_NAMES.index(s.colour) * len(KINDS) + KINDS.index(s.kind)] = 1
    for c in sample.background:
        y[len(COLOUR_NAMES) * len(KINDS) + COLOUR_NAMES.index(c)] = 1
    return y


def mentioned_indices(sample: Sample) -> list[int]:
    """Label indices of the (colour, kind) pairs the caption names: what alignment checks."""
    return [COLOUR_NAMES.index(c) * len(KINDS) + KINDS.index(k) for c, k in sample.mentioned]


def parse_caption(caption: str) -> list[int]:
    """Label indices of the (colour, kind) pairs named in any caption of this generator's grammar."""
    words = caption.replace(",", " ").split()
    found = []
    for i, w in enumerate(words[1:], start=1):
        if w in KINDS and words[i - 1] in COLOURS:
            found.append(COLOUR_NAMES.index(words[i - 1]) * len(KINDS) + KINDS.index(w))
    return found


def caption_vocabulary() -> list[str]:
    words = set(COLOUR_NAMES + KINDS + POSITION_NAMES + list(RADIUS) + TITLE_ADJECTIVES + TITLE_NOUNS)
    words |= {"a", "and", "at", "the", "in", "on", "background", "poster", ","}
    return sorted(words)
