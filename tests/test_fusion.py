"""Attention fusion (basinguard.engine.fusion): the exported UNet's attentions become MultiHeadAttention nodes
and compute what the unfused graph computes; patterns it must not touch (a masked softmax) are left alone.
References: the unfused ONNX graph (itself checked against diffusers in test_export/test_pipeline) and a
NumPy softmax attention written out here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from basinguard.engine.fusion import fuse_attention, fused_model
from basinguard.engine.ort import OrtModel


def unet_feed(model: OrtModel, batch: int, size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    tokens, width = model.inputs["encoder_hidden_states"].shape[1:]
    return {"sample": rng.standard_normal((batch, 4, size, size), dtype=np.float32),
            "timestep": np.full(batch, 700.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, tokens, width), dtype=np.float32)}


def test_every_unet_attention_is_fused_and_outputs_agree(tiny_onnx_dir: Path) -> None:
    path = tiny_onnx_dir / "unet" / "model.onnx"
    original = onnx.load(str(path))
    softmaxes = sum(n.op_type == "Softmax" for n in original.graph.node)
    assert softmaxes > 0
    source, count = fused_model(path)
    assert count == softmaxes
    fused = onnx.load_from_string(source)
    ops = [n.op_type for n in fused.graph.node]
    assert "Softmax" not in ops and ops.count("MultiHeadAttention") == softmaxes
    assert len(ops) < len(original.graph.node)  # the reshapes, transposes and scale arithmetic are gone

    plain = OrtModel(path, threads=1, fuse_attention=False)
    fast = OrtModel(path, threads=1)
    static = OrtModel(path, threads=1, static_shapes=True)
    assert (plain.fused_attention, fast.fused_attention) == (0, softmaxes)
    rng = np.random.default_rng(0)
    for batch, size in ((2, 8), (3, 16)):  # dynamic batch and latent size
        feed = unet_feed(plain, batch, size, rng)
        want = plain.run(feed)["out_sample"]
        np.testing.assert_allclose(fast.run(feed)["out_sample"], want, rtol=1e-5, atol=1e-5)
        for _ in range(4):  # past SPECIALISE_AFTER: the shape-specialised session is built from the fused graph
            np.testing.assert_allclose(static.run(feed)["out_sample"], want, rtol=1e-5, atol=1e-5)
    assert len(static.sessions) == 3


MASK = np.array([0.0, 0.0, -1e9, 0.0], np.float32)  # the third key is hidden from every query


def attention_graph(scale: float | None, masked: bool, key_two_transposes: bool, heads: int = 2,
                    head_dim: int = 3) -> onnx.ModelProto:
    """q, k, v (B, S, C) → decomposed attention as exporters write it, with constant shapes and scales."""
    channels = heads * head_dim
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", channels]) for n in "qkv"]
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "s", channels])
    inits = [numpy_helper.from_array(np.array([0, -1, heads, head_dim], np.int64), "split"),
             numpy_helper.from_array(np.array([0, -1, channels], np.int64), "merge")]
    nodes = [helper.make_node("Reshape", [n, "split"], [n + "4"]) for n in "qkv"]
    nodes += [helper.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
              helper.make_node("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3])]
    if key_two_transposes:
        nodes += [helper.make_node("Transpose", ["k4"], ["kh"], perm=[0, 2, 1, 3]),
                  helper.make_node("Transpose", ["kh"], ["kt"], perm=[0, 1, 3, 2])]
    else:
        nodes.append(helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]))
    nodes.append(helper.make_node("MatMul", ["qh", "kt"], ["scores"]))
    logits = "scores"
    if scale is not None:
        inits.append(numpy_helper.from_array(np.array(scale, np.float32), "scale"))
        nodes.append(helper.make_node("Mul", ["scores", "scale"], ["scaled"]))
        logits = "scaled"
    if masked:
        inits.append(numpy_helper.from_array(MASK, "mask"))
        nodes.append(helper.make_node("Add", [logits, "mask"], ["masked"]))
        logits = "masked"
    nodes += [helper.make_node("Softmax", [logits], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "vh"], ["ctx"]),
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctx_t", "merge"], ["out"])]
    graph = helper.make_graph(nodes, "attention", io, [out], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def numpy_attention(q, k, v, heads: int, scale: float, mask: np.ndarray | float = 0.0) -> np.ndarray:
    b, s, c = q.shape
    split = [x.reshape(b, x.shape[1], heads, c // heads).transpose(0, 2, 1, 3) for x in (q, k, v)]
    logits = split[0] @ split[1].transpose(0, 1, 3, 2) * scale + mask
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return (probs @ split[2]).transpose(0, 2, 1, 3).reshape(b, s, c)


@pytest.mark.parametrize("scale, two_transposes", [(0.3, False), (None, True), (1.7, True)])
def test_constant_scales_and_key_layouts(tmp_path: Path, scale: float | None, two_transposes: bool) -> None:
    model = attention_graph(scale, masked=False, key_two_transposes=two_transposes)
    path = tmp_path / "attention.onnx"
    onnx.save(model, str(path))
    assert fuse_attention(onnx.load(str(path))) == 1
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 5, 6), dtype=np.float32) for _ in range(3))
    got = OrtModel(path, threads=1).run({"q": q, "k": k, "v": v})["out"]
    np.testing.assert_allclose(got, numpy_attention(q, k, v, 2, 1.0 if scale is None else scale), rtol=1e-5, atol=1e-6)


def test_masked_attention_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "masked.onnx"
    onnx.save(attention_graph(0.5, masked=True, key_two_transposes=False), str(path))
    model = OrtModel(path, threads=1)
    assert model.fused_attention == 0
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 4, 6), dtype=np.float32) for _ in range(3))
    want = numpy_attention(q, k, v, 2, 0.5, MASK)
    np.testing.assert_allclose(model.run({"q": q, "k": k, "v": v})["out"], want, rtol=1e-5, atol=1e-6)
    assert np.abs(want - numpy_attention(q, k, v, 2, 0.5)).max() > 1e-2  # the mask matters


def test_attention_whose_probabilities_are_read_elsewhere_is_left_alone(tmp_path: Path) -> None:
    """A Shape node (or any other) reading the softmax output: that output is needed, so nothing is fused."""
    model = attention_graph(0.3, masked=False, key_two_transposes=False)
    model.graph.node.append(helper.make_node("Shape", ["probs"], ["probs_shape"]))
    model.graph.output.append(helper.make_tensor_value_info("probs_shape", TensorProto.INT64, [4]))
    path = tmp_path / "read_elsewhere.onnx"
    onnx.save(model, str(path))
    loaded = OrtModel(path, threads=1)
    assert loaded.fused_attention == 0
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 4, 6), dtype=np.float32) for _ in range(3))
    out = loaded.run({"q": q, "k": k, "v": v})
    np.testing.assert_allclose(out["out"], numpy_attention(q, k, v, 2, 0.3), rtol=1e-5, atol=1e-6)
    assert out["probs_shape"].tolist() == [1, 2, 4, 4]


def test_external_data_model_is_fused_beside_it(tiny_onnx_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from basinguard.export import onnx_files

    monkeypatch.setattr(onnx_files, "_TWO_GIB", 0)  # weights in model.onnx_data, as SD's float32 UNet has them
    folder = tmp_path / "unet"
    folder.mkdir()
    onnx_files.save_checked(tiny_onnx_dir / "unet" / "model.onnx", folder / "model.onnx")
    assert (folder / "model.onnx_data").exists()
    source, count = fused_model(folder / "model.onnx")
    assert count > 0 and source == str(folder / "model.fused.onnx")
    assert (folder / "model.fused.onnx").stat().st_size < 200_000  # the graph only; the weights stay in one file
    plain = OrtModel(folder / "model.onnx", threads=1, fuse_attention=False)
    fast = OrtModel(folder / "model.onnx", threads=1)
    feed = unet_feed(plain, 2, 8, np.random.default_rng(3))
    np.testing.assert_allclose(fast.run(feed)["out_sample"], plain.run(feed)["out_sample"], rtol=1e-5, atol=1e-5)

    # a folder it cannot write to: nothing written, the model runs as it is
    (folder / "model.fused.onnx").unlink()

    def refuse(self: Path, data: bytes) -> int:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_bytes", refuse)
    assert fused_model(folder / "model.onnx") == (str(folder / "model.onnx"), 0)
    assert OrtModel(folder / "model.onnx", threads=1).run(feed)["out_sample"].shape == (2, 4, 8, 8)
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model.onnx_data"]


def test_vae_attention_is_fused_and_text_encoder_left_alone(tiny_onnx_dir: Path) -> None:
    """The VAE's mid-block attention (one head) is fused; CLIP's causal-masked attention is not touched."""
    vae_path = tiny_onnx_dir / "vae_decoder" / "model.onnx"
    plain = OrtModel(vae_path, threads=1, fuse_attention=False)
    fast = OrtModel(vae_path, threads=1)
    assert fast.fused_attention == sum(n.op_type == "Softmax" for n in onnx.load(str(vae_path)).graph.node) > 0
    z = np.random.default_rng(4).standard_normal((2, 4, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(fast.run({"latent_sample": z})["sample"], plain.run({"latent_sample": z})["sample"],
                               rtol=1e-5, atol=1e-5)
    assert OrtModel(tiny_onnx_dir / "text_encoder" / "model.onnx", threads=1).fused_attention == 0
