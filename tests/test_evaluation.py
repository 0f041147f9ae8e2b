"""The evaluation metrics behind the README's tables, each against an independent computation: caption parsing
against the data generator's own ground truth, the numbers against brute force, closed forms and hand computations."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from basinguard.evaluation import (
    AttributeClassifier,
    EdgeDescriptor,
    OnnxEmbedder,
    attribute_alignment,
    colour_alignment,
    frechet_distance,
    mentioned_background,
    mentioned_labels,
    similarity_summary,
    top1_similarity,
)

ROOT = Path(__file__).resolve().parent.parent
LABELS = json.loads((ROOT / "basinguard/models/shapes/memorization/attributes.json").read_text())["labels"]
sys.path.insert(0, str(ROOT / "recipes" / "shapes"))
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


# The metrics behind the README's tables, each against an independent computation.

def test_top1_similarity_is_the_brute_force_best_match() -> None:
    rng = np.random.default_rng(0)
    generated, reference = (_unit(rng.standard_normal((n, 6))) for n in (7, 11))
    reference[4] = generated[2]  # an exact copy: similarity 1 at index 4
    values, index = top1_similarity(generated, reference)
    for g in range(len(generated)):
        best, best_k = -np.inf, -1
        for k in range(len(reference)):
            s = float(sum(a * b for a, b in zip(generated[g], reference[k])))
            if s > best:
                best, best_k = s, k
        assert index[g] == best_k and values[g] == pytest.approx(best, abs=1e-12)
    assert index[2] == 4 and values[2] == pytest.approx(1.0)


def test_similarity_summary_by_hand() -> None:
    top1 = [0.1, 0.9, 0.3, 0.85, 0.8, 0.2, 0.95, 0.4, 0.5, 0.6, 0.7]  # 11 values
    got = similarity_summary(np.array(top1))
    ordered = sorted(top1)
    position = 0.95 * (len(top1) - 1)  # 9.5: halfway between the 10th and 11th smallest (linear, as numpy's default)
    p95 = ordered[9] + (position - 9) * (ordered[10] - ordered[9])
    assert got["sim95"] == pytest.approx(p95) == pytest.approx(0.925)
    assert got["sim_mean"] == pytest.approx(statistics.fmean(top1))
    assert got["sim_std"] == pytest.approx(statistics.pstdev(top1))
    assert got["copy_fraction"] == pytest.approx(3 / 11)  # 0.85, 0.9, 0.95 are above 0.8; 0.8 itself is not a copy
    assert similarity_summary(np.array(top1), threshold=0.5)["copy_fraction"] == pytest.approx(6 / 11)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _gaussian_samples(rng: np.random.Generator, mean: np.ndarray, cov: np.ndarray, n: int = 50) -> np.ndarray:
    """n samples whose sample mean and (n-1)-normalised covariance are exactly `mean` and `cov`."""
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance I
    return z @ np.linalg.cholesky(cov).T + mean


def test_frechet_distance_closed_forms() -> None:
    rng = np.random.default_rng(1)
    # Diagonal covariances commute: ‖μa − μb‖² + Σ (√σa − √σb)².
    var_a, var_b = np.array([1.0, 4.0, 0.25, 9.0]), np.array([2.0, 1.0, 0.25, 16.0])
    mu_a, mu_b = np.array([0.0, 1.0, -2.0, 3.0]), np.array([1.0, 1.0, 0.0, 0.5])
    a, b = _gaussian_samples(rng, mu_a, np.diag(var_a)), _gaussian_samples(rng, mu_b, np.diag(var_b))
    want = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-9)
    # 2×2, not commuting: tr √M = √(tr M + 2 √det M) for a 2×2 PSD M, with M similar to Σa Σb.
    cov_a, cov_b = np.array([[2.0, 0.8], [0.8, 1.0]]), np.array([[1.0, -0.5], [-0.5, 3.0]])
    assert not np.allclose(cov_a @ cov_b, cov_b @ cov_a)
    a, b = _gaussian_samples(rng, np.zeros(2), cov_a), _gaussian_samples(rng, np.ones(2), cov_b)
    tr_root = np.sqrt(np.trace(cov_a @ cov_b) + 2 * np.sqrt(np.linalg.det(cov_a) * np.linalg.det(cov_b)))
    want = 2.0 + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_root
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_matches_the_eigenvalues_of_the_covariance_product() -> None:
    """Any dimension: tr (Σa^½ Σb Σa^½)^½ = Σ √λ over the (real, non-negative) eigenvalues λ of Σa Σb."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal((200, 8)) @ rng.standard_normal((8, 8)) + 1.0
    b = rng.standard_normal((150, 8)) @ rng.standard_normal((8, 8))
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(cov_a @ cov_b)
    assert np.abs(eig.imag).max() < 1e-8 and eig.real.min() > 0
    want = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(eig.real).sum()
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-8)


def test_attribute_alignment_by_hand() -> None:
    probabilities = np.array([[0.9, 0.2, 0.6, 0.5],
                              [0.1, 0.8, 0.4, 0.7],
                              [0.3, 0.3, 0.3, 0.3]])
    mentioned = [[0, 1, 2], [3], []]
    got = attribute_alignment(probabilities, mentioned)
    # image 0: 0.9 and 0.6 found, 0.2 not; image 1: 0.7 found; image 2 names nothing: 1.0
    np.testing.assert_allclose(got, [2 / 3, 1.0, 1.0])
    np.testing.assert_allclose(attribute_alignment(probabilities, [[3], [2], [0]], threshold=0.45), [1.0, 0.0, 0.0])


def test_colour_alignment_by_hand() -> None:
    labels = ["red circle", "blue square", "green cross", "red background"]
    palette = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 180, 60)}
    rgb = np.full((2, 10, 10, 3), 128.0)
    rgb[0, :3] = (220 + 30, 40 + 30, 40)  # 30 % of image 0 within 42.4 of red
    rgb[0, 5, 5] = palette["blue"]  # 1 % blue: under min_fraction 2 %
    rgb[0, 6, :4] = (40 + 50, 180 + 40, 60)  # 4 % at distance 64.0 from green: too far
    rgb[1, 9, :2] = palette["blue"]  # 2 % blue: exactly min_fraction counts
    images = (rgb / 255).astype(np.float32)
    mentioned = [[0, 1, 2], [1]]
    np.testing.assert_allclose(colour_alignment(images, mentioned, labels, palette), [1 / 3, 1.0])
    np.testing.assert_allclose(colour_alignment(images, [[], [0]], labels, palette), [1.0, 0.0])  # none named: 1.0
    np.testing.assert_allclose(colour_alignment(images, mentioned, labels, palette, max_distance=65.0), [2 / 3, 1.0])


def test_onnx_embedder_runs_the_model_on_normalised_nchw_input(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    weight = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["pixels", "w"], ["emb"], strides=[2, 2])], "embedder",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["n", 3, 6, 4])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["n", 4, 3, 2])],
        [numpy_helper.from_array(weight, "w")])
    path = tmp_path / "embedder.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    images = rng.random((2, 6, 4, 3), dtype=np.float32)  # (N, H, W, 3) in [0, 1]
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    got = OnnxEmbedder(path, mean=mean, std=std, threads=1)(images)
    want = np.zeros((2, 4, 3, 2))
    for n, o, i, j in np.ndindex(want.shape):  # the 2×2 stride-2 convolution, one output at a time
        for c, di, dj in np.ndindex(3, 2, 2):
            pixel = (images[n, 2 * i + di, 2 * j + dj, c] - mean[c]) / std[c]
            want[n, o, i, j] += weight[o, c, di, dj] * pixel
    want = want.reshape(2, -1)
    np.testing.assert_allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)
    assert OnnxEmbedder(path, threads=1).mean.tolist() == pytest.approx([0.485, 0.456, 0.406])  # ImageNet's


def test_attribute_classifier_feeds_minus_one_to_one_nchw_and_returns_sigmoid_probabilities(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    weight = rng.standard_normal((3 * 2 * 4, 5)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["features"]), helper.make_node("MatMul", ["features", "w"], ["logits"])],
        "classifier", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, 2, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 5]),
         helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", 24])],
        [numpy_helper.from_array(weight, "w")])
    path = tmp_path / "attributes.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    images = rng.random((3, 2, 4, 3), dtype=np.float32)  # (N, H, W, 3) in [0, 1]
    probabilities, features = AttributeClassifier(path, threads=1)(images)
    for n in range(3):
        x = [2 * images[n, i, j, c] - 1 for c in range(3) for i in range(2) for j in range(4)]  # C, H, W order
        np.testing.assert_allclose(features[n], x, atol=1e-6)
        logits = np.array(x) @ weight
        np.testing.assert_allclose(probabilities[n], [1 / (1 + np.exp(-v)) for v in logits], atol=1e-6)


def test_edge_descriptor_matches_a_2d_convolution_reference() -> None:
    """EdgeDescriptor against the same definition written independently in torch: a 2D Gaussian kernel (σ, cut at
    3σ as scipy's default), replicated edges, forward differences, p×p average pooling (odd sizes: the last row and
    column dropped), L2 norm. Compared as cosine similarities, which is what the descriptor is used for."""
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional

    def reference(images: np.ndarray, sigma: float, pool: int) -> np.ndarray:
        x = torch.from_numpy(images).double().permute(0, 3, 1, 2)
        radius = int(3 * sigma + 0.5)
        g = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / sigma) ** 2)
        kernel = torch.outer(g, g) / torch.outer(g, g).sum()
        x = functional.conv2d(functional.pad(x, (radius,) * 4, mode="replicate"),
                              kernel.expand(3, 1, -1, -1).contiguous(), groups=3)
        dx, dy = x[:, :, :-1, 1:] - x[:, :, :-1, :-1], x[:, :, 1:, :-1] - x[:, :, :-1, :-1]
        v = functional.avg_pool2d(torch.cat([dx, dy], 1), pool).flatten(1)
        return functional.normalize(v, dim=1).numpy()

    rng = np.random.default_rng(4)
    images = rng.random((5, 15, 12, 3), dtype=np.float32)
    images[3] = images[2]
    images[3, :, :7] += 0.3  # a new edge where the field changes
    for sigma, pool in ((1.0, 2), (1.5, 3)):
        got = EdgeDescriptor(sigma, pool)(images)
        want = reference(images, sigma, pool)
        assert got.shape == want.shape
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(got @ got.T, want @ want.T, atol=1e-5)
    # Flat areas do not count: the same image on a brighter background (a constant added) has the same descriptor.
    descriptor = EdgeDescriptor()
    np.testing.assert_allclose(descriptor(images[:1] + 0.2), descriptor(images[:1]), atol=1e-5)
