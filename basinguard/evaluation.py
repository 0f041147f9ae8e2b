"""Memorization metrics (numpy + onnxruntime): copy similarity, text alignment, Fréchet distance.

- Similarity: each generation's top-1 cosine similarity to a reference set (the training set) under
  an image descriptor, summarised as the paper does (95th percentile, mean ± std, fraction above
  the copy threshold). The default descriptor suits the shipped toy model; any ONNX image embedder
  (an exported SSCD for real SD models) plugs in through `OnnxEmbedder`.
- Alignment (stand-in for CLIP score): fraction of the caption's named shapes (`mentioned_labels`) an
  attribute classifier finds in the image (`attribute_alignment`); a named background (`mentioned_background`)
  is scored apart; `colour_alignment` is a model-free cross-check. Quality (stand-in for FID): Fréchet
  distance on that classifier's features.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

# EdgeDescriptor similarity above which a generation counts as a copy: held-out real images of the shipped model's
# data (never trained on, so never copies) score p99 0.76 against its training set, VAE-blurred copies >= 0.9
# (benchmarks/memorization.py, descriptor check).
COPY_THRESHOLD = 0.8


class Embedder(Protocol):
    def __call__(self, images: np.ndarray) -> np.ndarray:
        """float images (N, H, W, 3) in [0, 1] → L2-normalised descriptors (N, D)."""
        ...


def _normalise(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (N, H, W, C) images, edges replicated."""
    radius = max(1, int(3 * sigma + 0.5))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
    k /= k.sum()
    x = np.pad(x, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    h, w = x.shape[1] - 2 * radius, x.shape[2] - 2 * radius
    x = sum(k[i] * x[:, i : i + h] for i in range(len(k)))
    return sum(k[i] * x[:, :, i : i + w] for i in range(len(k)))


class EdgeDescriptor:
    """Colour edges: the per-channel image gradient after a Gaussian blur, 2×2-pooled, as one vector.

    A copy of a flat-colour image is the same layout of edges: where the colour fields meet and where each
    shape's outline lies. Edges ignore the large flat areas that unrelated images share (a plain background of
    the same colour), so a new arrangement of the same shapes scores low while a copy scores high; the blur
    forgives the VAE's soft edges and a pixel or two of displacement. `benchmarks/memorization.py` measures
    the separation on held-out images (docs/memorization.md, "Metrics").
    """

    def __init__(self, sigma: float = 1.0, pool: int = 2):
        self.sigma, self.pool = sigma, pool

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = gaussian_blur(np.asarray(images, np.float32), self.sigma)
        grad = np.concatenate([(x[:, :, 1:] - x[:, :, :-1])[:, :-1], (x[:, 1:] - x[:, :-1])[:, :, :-1]], axis=-1)
        n, h, w, c = grad.shape
        p = self.pool
        grad = grad[:, : h - h % p, : w - w % p].reshape(n, h // p, p, w // p, p, c).mean((2, 4))
        return _normalise(grad.reshape(n, -1))


class OnnxEmbedder:
    """Any ONNX image embedder (e.g. an exported SSCD): NCHW float input in [0, 1], resized by the caller."""

    def __init__(self, path: Path, mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                 threads: int | None = None):
        from basinguard.engine import load_model

        self.model = load_model(Path(path), threads=threads)
        self.input = next(iter(self.model.inputs))
        self.output = next(iter(self.model.outputs))
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = ((np.asarray(images, np.float32) - self.mean) / self.std).transpose(0, 3, 1, 2)
        return _normalise(self.model.run({self.input: x})[self.output].reshape(len(x), -1))


def top1_similarity(generated: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per generation: the highest cosine similarity to any reference descriptor, and its index."""
    sims = generated @ reference.T
    best = sims.argmax(1)
    return sims[np.arange(len(sims)), best], best


def similarity_summary(top1: np.ndarray, threshold: float = COPY_THRESHOLD) -> dict[str, float]:
    """As the paper's Tables 1 and 3: 95th percentile, mean ± std, fraction above the copy threshold."""
    top1 = np.asarray(top1, np.float64)
    return {"sim95": float(np.percentile(top1, 95)), "sim_mean": float(top1.mean()), "sim_std": float(top1.std()),
            "copy_fraction": float((top1 > threshold).mean())}


class AttributeClassifier:
    """The shipped model's attribute network (ONNX): logits over (colour, kind) pairs and backgrounds, and
    the feature vector the Fréchet distance is computed on."""

    def __init__(self, path: Path, threads: int | None = None):
        from basinguard.engine import load_model

        self.model = load_model(Path(path), threads=threads)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(images, np.float32).transpose(0, 3, 1, 2) * 2 - 1
        out = self.model.run({"image": x})
        return 1 / (1 + np.exp(-out["logits"])), out["features"]


BACKGROUND_LABEL = " background"  # attribute label names: "<colour> <kind>" for shapes, "<colour> background"


def _words(caption: str) -> str:
    return f" {' '.join(caption.lower().replace(',', ' ').split())} "


def mentioned_labels(caption: str, label_names: Sequence[str]) -> list[int]:
    """Indices of the shape labels (e.g. "red circle") the caption names word for word: what alignment scores.
    Background labels are left out (see `mentioned_background`): a caption's "red background" is not a shape."""
    words = _words(caption)
    return [i for i, name in enumerate(label_names) if not name.endswith(BACKGROUND_LABEL) and f" {name} " in words]


def mentioned_background(caption: str, label_names: Sequence[str]) -> list[int]:
    """Indices of the background-colour labels a caption's "on a X background" or "on a X and Y background" names."""
    match = re.search(r" on an? ((?:\w+ and )?\w+) background ", _words(caption))
    if match is None:
        return []
    names = [f"{colour}{BACKGROUND_LABEL}" for colour in match.group(1).split(" and ")]
    return [label_names.index(name) for name in names if name in label_names]


def attribute_alignment(probabilities: np.ndarray, mentioned: Sequence[Sequence[int]], threshold: float = 0.5) -> np.ndarray:
    """Per image: the fraction of the caption's named attributes (label indices) the classifier finds
    (probability above `threshold`); 1.0 for a caption that names none."""
    out = np.empty(len(probabilities))
    for k, labels in enumerate(mentioned):
        out[k] = float(np.mean(probabilities[k, list(labels)] > threshold)) if len(labels) else 1.0
    return out


def colour_alignment(images: np.ndarray, mentioned: Sequence[Sequence[int]], label_names: Sequence[str],
                     palette: dict[str, Sequence[int]], min_fraction: float = 0.02, max_distance: float = 60.0) -> np.ndarray:
    """Per image: the fraction of the caption's named shapes whose colour covers ≥ `min_fraction` of the image
    (RGB distance ≤ `max_distance` to the palette colour). Coarse — it does not check the shape's kind — but
    needs no learned model, so it cannot be fooled by one."""
    rgb = np.asarray(images, np.float32) * 255
    out = np.empty(len(rgb))
    for k, labels in enumerate(mentioned):
        colours = [label_names[i].split()[0] for i in labels]
        present = [(np.linalg.norm(rgb[k] - np.asarray(palette[c], np.float32), axis=-1) <= max_distance).mean()
                   >= min_fraction for c in colours]
        out[k] = float(np.mean(present)) if present else 1.0
    return out


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½), with symmetric square roots by eigh (numpy only)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)

    def sqrt_psd(m: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh((m + m.T) / 2)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    root_a = sqrt_psd(cov_a)
    cross = sqrt_psd(root_a @ cov_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(cross))
