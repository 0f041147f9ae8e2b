"""Deterministic captioned-image generator for the shipped memorizing model (numpy only).

Two parts, as in the paper's Scenario 3 (duplication):
- a large varied part: two or three shapes of known colour and kind, continuous size and position,
  on a plain or two-colour background split anywhere; captions describe a random subset of those
  attributes, so that an unspecified attribute varies and the unconditional model stays varied;
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
RADIUS = {"small": 4.5, "large": 7.5}  # the duplicated images' shapes
RADIUS_RANGE = (3.5, 8.0)  # varied shapes: any radius in this range, named "small" below SMALL_BELOW
SMALL_BELOW = 5.5
JITTER = 6.0  # varied shapes: centre within ± JITTER px of their position word's point
BACKGROUND_NAMED = 0.35  # fraction of varied captions that name the background
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
    radius: float = 0.0  # pixels; 0: the size word's radius


@dataclass
class Sample:
    caption: str
    shapes: list[Shape]
    background: tuple[str, ...]  # one colour, or two for a split background
    split: str = "none"  # "none" | "vertical" | "horizontal"
    duplicated: bool = False
    mentioned: list[tuple[str, str]] = field(default_factory=list)  # (colour, kind) named in the caption
    split_at: float = SIZE / 2  # pixels from the left (vertical) or top (horizontal)


def _shape_masks(sample: Sample) -> tuple[np.ndarray, list[np.ndarray]]:
    """The split mask (second background colour) and each shape's mask, in drawing order."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    if sample.split == "none":
        second = np.zeros((SIZE, SIZE), bool)
    else:
        second = (xx >= sample.split_at) if sample.split == "vertical" else (yy >= sample.split_at)
    masks = []
    for s in sample.shapes:
        cx, cy = POSITIONS[s.position]
        cx, cy, r = cx + s.dx, cy + s.dy, s.radius or RADIUS[s.size]
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
        masks.append(mask)
    return second, masks


def render(sample: Sample) -> np.ndarray:
    """The sample's image, uint8 (SIZE, SIZE, 3)."""
    second, masks = _shape_masks(sample)
    img = np.empty((SIZE, SIZE, 3), np.uint8)
    img[:] = COLOURS[sample.background[0]]
    if sample.split != "none":
        img[second] = COLOURS[sample.background[1]]
    for s, mask in zip(sample.shapes, masks):
        img[mask] = COLOURS[s.colour]
    return img


MIN_VISIBLE = 8  # pixels of a shape left uncovered for it to count as present in the labels


def visible_shapes(sample: Sample) -> list[Shape]:
    """The shapes of which at least MIN_VISIBLE pixels show: later shapes cover earlier ones."""
    _, masks = _shape_masks(sample)
    shown = []
    for k, (s, mask) in enumerate(zip(sample.shapes, masks)):
        covered = np.zeros_like(mask)
        for later in masks[k + 1 :]:
            covered |= later
        if (mask & ~covered).sum() >= MIN_VISIBLE:
            shown.append(s)
    return shown


def _shape_phrase(s: Shape, rng: np.random.Generator) -> str:
    words = ["a"]
    if rng.random() < 0.5:
        words.append(s.size)
    words += [s.colour, s.kind]
    if rng.random() < 0.6:
        words.append("in the center" if s.position == "center" else f"at the {s.position}")
    return " ".join(words)


def varied_sample(rng: np.random.Generator) -> Sample:
    """Two or three shapes, each somewhere in the region its position word names (± JITTER px), of any
    radius in RADIUS_RANGE, on a plain background or one split at any point. Continuous layout keeps
    the training set from covering the space of images densely: a new image of this kind has no
    near-duplicate among 20,000 training images, so a copy stands out against generic outputs."""
    n_shapes = 2 if rng.random() < 0.5 else 3
    split = "none" if rng.random() < 0.7 else str(rng.choice(["vertical", "horizontal"]))
    split_at = float(rng.uniform(SIZE * 0.3, SIZE * 0.7))
    background = tuple(rng.choice(COLOUR_NAMES, size=1 if split == "none" else 2, replace=False).tolist())
    positions = rng.choice(POSITION_NAMES, size=n_shapes, replace=False).tolist()
    shapes = []
    for pos in positions:
        colour = str(rng.choice([c for c in COLOUR_NAMES if c not in background]))
        radius = float(rng.uniform(*RADIUS_RANGE))
        shapes.append(
            Shape(
                kind=str(rng.choice(KINDS)), colour=colour, position=pos, size="small" if radius < SMALL_BELOW else "large",
                dx=float(rng.uniform(-JITTER, JITTER)), dy=float(rng.uniform(-JITTER, JITTER)), radius=radius,
            )
        )
    caption = " and ".join(_shape_phrase(s, rng) for s in shapes)
    # The background is named in a third of the captions: mostly it is left to vary, as real captions leave most
    # of an image unsaid. (Were it named always, its colour would pin most pixels of the conditional mean and
    # every caption would pull as hard as a memorized one at the first step.)
    if rng.random() < BACKGROUND_NAMED:
        caption += f", on a {' and '.join(background)} background"
    return Sample(caption, shapes, background, split, False, [(s.colour, s.kind) for s in shapes], split_at)


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
    """Multi-hot ground truth: (colour, kind) pairs visible, then background colours present."""
    y = np.zeros(len(COLOUR_NAMES) * len(KINDS) + len(COLOUR_NAMES), np.float32)
    for s in visible_shapes(sample):
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
