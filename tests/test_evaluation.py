"""Caption parsing for the alignment metric, against the data generator's own ground truth."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from basinguard.evaluation import mentioned_background, mentioned_labels

ROOT = Path(__file__).resolve().parent.parent
LABELS = json.loads((ROOT / "basinguard/models/shapes/memorization/attributes.json").read_text())["labels"]
sys.path.insert(0, str(ROOT / "benchmarks"))
import memorizing_data as data  # noqa: E402


def test_named_shapes_and_background_match_the_generator() -> None:
    shapes = len(data.COLOUR_NAMES) * len(data.KINDS)
    samples = data.varied_samples(400, seed=5)
    named_background = 0
    for sample in samples:
        # shapes: the distinct (colour, kind) pairs the generator wrote into the caption, never a background label
        assert sorted(mentioned_labels(sample.caption, LABELS)) == sorted(set(data.mentioned_indices(sample))), sample.caption
        want = [shapes + data.COLOUR_NAMES.index(c) for c in sample.background] if "background" in sample.caption else []
        assert mentioned_background(sample.caption, LABELS) == want, sample.caption
        named_background += bool(want)
    two_colours = [s for s in samples if "background" in s.caption and len(s.background) == 2]
    assert named_background > 50 and two_colours  # both kinds of background caption were exercised
    assert mentioned_background("a red circle", LABELS) == []
