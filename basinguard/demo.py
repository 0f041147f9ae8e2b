"""`basinguard demo`: the method at work on the shipped model, as an HTML report.

A duplicated training caption and a novel caption, over several seeds, under cfg, stp, dtp and
og-dtp: image grids beside the training image, d per step with the transition marked, and a
metrics table (similarity to the training image, alignment, transition step, time per image).
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from basinguard.errors import BasinguardError
from basinguard.evaluation import (
    COPY_THRESHOLD,
    EdgeDescriptor,
    colour_alignment,
    mentioned_labels,
    top1_similarity,
)
from basinguard.runtime.pipeline import Generation, Pipeline

DEMO_POLICIES = ("cfg", "stp", "dtp", "og-dtp")
COLOURS = {"cfg": "#d62728", "stp": "#1f77b4", "dtp": "#2ca02c", "og-dtp": "#9467bd"}


def load_memorization(folder: Path) -> tuple[list[dict], np.ndarray, list[str]]:
    """The shipped model's duplicated captions with their training images, and novel captions."""
    mem = folder / "memorization"
    try:
        rows = [json.loads(line) for line in (mem / "duplicated.jsonl").read_text().splitlines() if line.strip()]
        images = np.stack([np.asarray(Image.open(mem / r["image"]).convert("RGB"), np.float32) / 255 for r in rows])
        others = [c for c in (mem / "other_captions.txt").read_text().splitlines() if c.strip()]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BasinguardError(f"{folder} has no usable memorization/ set (duplicated.jsonl with caption and image, "
                              f"other_captions.txt), which the demo needs: {exc}") from None
    if not rows or not others:
        raise BasinguardError(f"{mem}: duplicated.jsonl and other_captions.txt need at least one entry each")
    return rows, images, others


def svg_curves(series: list[tuple[str, list[float | None], str, int | None]], width: int = 420,
               height: int = 180) -> str:
    """A small line chart: (label, values per step, colour, transition step or None) per series."""
    values = [v for _, ys, _, _ in series for v in ys if v is not None]
    top = max(values) * 1.05 if values else 1.0
    steps = max(len(ys) for _, ys, _, _ in series)
    pad = 30

    def xy(i: int, v: float) -> str:
        return f"{pad + i * (width - pad - 5) / max(steps - 1, 1):.1f},{height - pad - v / top * (height - pad - 5):.1f}"

    parts = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" font-size="10">',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width}" y2="{height - pad}" stroke="#888"/>',
             f'<line x1="{pad}" y1="0" x2="{pad}" y2="{height - pad}" stroke="#888"/>',
             f'<text x="{pad}" y="{height - 8}">step 0</text><text x="{width - 60}" y="{height - 8}">step {steps - 1}</text>',
             f'<text x="2" y="10">{top:.2f}</text>']
    for label, ys, colour, transition in series:
        pts = " ".join(xy(i, v) for i, v in enumerate(ys) if v is not None)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.2" points="{pts}"><title>{html.escape(label)}</title></polyline>')
        if transition is not None and ys[transition] is not None:
            x, y = xy(transition, ys[transition]).split(",")
            parts.append(f'<circle cx="{x}" cy="{y}" r="3" fill="{colour}"/>')
    parts.append("</svg>")
    return "".join(parts)


def save_grid(images: list[np.ndarray], path: Path, scale: int = 3) -> None:
    row = np.concatenate([np.pad(im, ((2, 2), (2, 2), (0, 0)), constant_values=1.0) for im in images], axis=1)
    img = Image.fromarray((row * 255).round().astype(np.uint8))
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def run_demo(folder: Path, out: Path, seeds: int = 6, provider: str = "cpu", threads: int | None = None,
             log=print) -> Path:
    if seeds < 1:
        raise BasinguardError(f"--seeds must be >= 1 (got {seeds})")
    pipe = Pipeline(folder, provider=provider, threads=threads)
    rows, train_images, others = load_memorization(pipe.folder.path)
    height, width = pipe.folder.default_image
    if train_images.shape[1:3] != (height, width):  # their descriptors are compared with the generated images'
        raise BasinguardError(f"{pipe.folder.path / 'memorization'}: its training images are {train_images.shape[1]}x"
                              f"{train_images.shape[2]} pixels but the model makes {height}x{width} ones (its native "
                              "size); the demo compares the two, so they must be the same size")
    descriptor = EdgeDescriptor()
    train_desc = descriptor(train_images)
    attributes_path = pipe.folder.path / "memorization" / "attributes.json"
    attributes = json.loads(attributes_path.read_text()) if attributes_path.exists() else None
    defaults = pipe.spec.sampling()  # the model's own settings; each demo policy replaces the name
    base = defaults.policy
    out.mkdir(parents=True, exist_ok=True)
    cases = [("duplicated training caption", rows[0]["caption"], 0), ("novel caption", others[0], None)]
    sections, table = [], []
    for title, caption, own in cases:
        if own is not None:
            save_grid([train_images[own]], out / "train_0.png")
        curves = []
        grids = []
        for name in DEMO_POLICIES:
            cfg = pipe.spec.sampling(policy=name)
            start = time.perf_counter()
            gens: list[Generation] = pipe.generate([caption] * seeds, cfg, seeds=list(range(seeds)))
            per_image = (time.perf_counter() - start) / seeds
            pixels = np.stack([g.pixels for g in gens])
            top1, _ = top1_similarity(descriptor(pixels), train_desc)
            own_sim = descriptor(pixels) @ train_desc[own] if own is not None else None
            align = None if attributes is None else colour_alignment(
                pixels, [mentioned_labels(caption, attributes["labels"])] * seeds, attributes["labels"], attributes["palette"])
            png = f"{'dup' if own is not None else 'novel'}_{name}.png"
            save_grid(list(pixels), out / png)
            grids.append(f"<tr><td>{name}</td><td><img src='{png}'></td></tr>")
            g0 = gens[0].trace
            curves.append((f"{name} seed 0", g0["gap"], COLOURS[name], g0["transition_step"]))
            ts = [g.trace["transition_step"] for g in gens if g.trace["transition_step"] is not None]
            table.append({"caption": title, "policy": name,
                          "top1_similarity_mean": float(top1.mean()),
                          "copies": f"{int((top1 > COPY_THRESHOLD).sum())}/{seeds}",
                          "own_training_image_similarity": None if own_sim is None else float(own_sim.mean()),
                          "alignment": None if align is None else float(align.mean()),
                          "mean_transition_step": float(np.mean(ts)) if ts else None,
                          "seconds_per_image": per_image})
            log(f"  {title:28s} {name:7s} top-1 similarity {top1.mean():.3f}  copies {table[-1]['copies']}")
        train_cell = "<img src='train_0.png'> training image" if own is not None else "no training image"
        sections.append(f"<h2>{html.escape(title)}: “{html.escape(caption)}”</h2><p>{train_cell}</p>"
                        f"<table>{''.join(grids)}</table><h3>d per step (seed 0); dot = transition step</h3>"
                        f"{svg_curves(curves)}")
    head = ["caption", "policy", "top1_similarity_mean", "own_training_image_similarity", "copies", "alignment", "mean_transition_step", "seconds_per_image"]
    cells = "".join("<tr>" + "".join(f"<td>{_fmt(r[h])}</td>" for h in head) + "</tr>" for r in table)
    report = out / "report.html"
    report.write_text(
        "<!doctype html><meta charset='utf-8'><title>basinguard demo</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}td{padding:2px 8px}</style>"
        f"<h1>basinguard demo</h1><p>Model: {html.escape(str(pipe.folder.path))}; {seeds} seeds per row; "
        f"λ={base.guidance_scale}, τ={base.transition_t}, λ_og={base.opposite}, {defaults.steps} steps. "
        f"Similarity: top-1 cosine similarity (edge descriptor) to the duplicated training images; "
        f"a copy scores above {COPY_THRESHOLD}.</p>"
        f"<table border=1 cellspacing=0><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr>{cells}</table>"
        + "".join(sections))
    (out / "metrics.json").write_text(json.dumps(table, indent=1))
    return report


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))
