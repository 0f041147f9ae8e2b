"""Attention fusion (basinguard.engine.fusion): the exported UNet's attentions become MultiHeadAttention nodes
and compute what the unfused graph computes; patterns it must not touch (a masked softmax) are left alone.
References: the unfused ONNX graph (itself checked against diffusers in test_export/test_pipeline) and a
NumPy softmax attention written out here."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import basinguard.engine.fusion as fusion
from basinguard.engine.base import EngineError
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
    fused = onnx.load(source)  # the cached fused copy (in the user cache dir: the model holds its weights)
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
        for _ in range(2):  # the shape-specialised session (first call) is built from the fused graph
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
    # the graph only (~200 KB); the weights (3 MB) stay in one file
    assert (folder / "model.fused.onnx").stat().st_size < (folder / "model.onnx_data").stat().st_size // 10
    plain = OrtModel(folder / "model.onnx", threads=1, fuse_attention=False)
    fast = OrtModel(folder / "model.onnx", threads=1)
    feed = unet_feed(plain, 2, 8, np.random.default_rng(3))
    np.testing.assert_allclose(fast.run(feed)["out_sample"], plain.run(feed)["out_sample"], rtol=1e-5, atol=1e-5)

    # the fused cache is not part of the model: the TensorRT plan key (a hash of the model's files) ignores it
    from basinguard.engine.base import onnx_files as model_files
    from basinguard.engine.tensorrt import onnx_digest

    assert [p.name for p in model_files(folder / "model.onnx")] == ["model.onnx", "model.onnx_data"]
    without = onnx_digest(folder / "model.onnx")
    (folder / "model.fused.onnx").rename(folder / "elsewhere")
    assert onnx_digest(folder / "model.onnx") != without  # (any other file beside the model would count)
    (folder / "elsewhere").rename(folder / "model.fused.onnx")

    # a folder it cannot write to: nothing written, the model runs as it is
    (folder / "model.fused.onnx").unlink()

    def refuse(*args: object, **kwargs: object) -> tuple[int, str]:
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    assert fused_model(folder / "model.onnx") == (str(folder / "model.onnx"), 0)
    unfused = OrtModel(folder / "model.onnx", threads=1)
    assert unfused.fused_attention == 0
    np.testing.assert_array_equal(unfused.run(feed)["out_sample"], plain.run(feed)["out_sample"])
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


# ----------------------------------------------------------------------- what the fusion must leave alone


def qkv(seed: int, shape: tuple[int, ...] = (2, 5, 6), dtype: type = np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(shape).astype(dtype) for n in "qkv"}


def set_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for init in model.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(value, name))


def assert_left_alone(model: onnx.ModelProto, path: Path, feed: dict[str, np.ndarray]) -> None:
    """Not fused, and the file runs as its unfused graph does."""
    onnx.save(model, str(path))
    assert fused_model(path) == (str(path), 0)
    loaded = OrtModel(path, threads=1)
    assert loaded.fused_attention == 0
    want = OrtModel(path, threads=1, fuse_attention=False).run(feed)["out"]
    np.testing.assert_array_equal(loaded.run(feed)["out"], want)


@pytest.mark.parametrize("merge, out_shape", [
    ([-1, 6], ["n", 6]),  # (B·S, C): MultiHeadAttention's (B, S, C) would be another output
    ([2, -1, 6], ["b", "s", 6]),  # a constant batch: (B, S, C) only for B = 2
    ([0, -1, 3], ["b", "s", 3]),  # channels other than heads·head_dim: the sequence axis doubles
])
def test_merge_reshape_other_than_batch_seq_channels_is_left_alone(tmp_path: Path, merge: list[int],
                                                                   out_shape: list) -> None:
    model = attention_graph(0.3, masked=False, key_two_transposes=False)
    set_initializer(model, "merge", np.array(merge, np.int64))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape))
    assert_left_alone(model, tmp_path / "merge.onnx", qkv(1, (4, 5, 6)))


def test_split_reshape_whose_heads_times_head_dim_is_not_the_channels_is_left_alone(tmp_path: Path) -> None:
    """(B, -1, 2, 1) of a (B, S, 6) tensor: (B, 3·S, 2, 1), attention over 3·S positions of one channel each."""
    model = attention_graph(0.3, masked=False, key_two_transposes=False)
    set_initializer(model, "split", np.array([0, -1, 2, 1], np.int64))
    set_initializer(model, "merge", np.array([0, -1, 2], np.int64))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "s", 2]))
    assert_left_alone(model, tmp_path / "split.onnx", qkv(2))


@pytest.mark.parametrize("opset, fused", [(12, False), (13, True)])
def test_softmax_without_axis_follows_the_opsets_default(tmp_path: Path, opset: int, fused: bool) -> None:
    """No axis attribute: the last axis since opset 13, but axis 1 (over heads·S·S, flattened) before it."""
    model = attention_graph(0.3, masked=False, key_two_transposes=False)
    for node in model.graph.node:
        if node.op_type == "Softmax":
            del node.attribute[:]
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", opset))
    feed = qkv(3)
    if not fused:
        assert_left_alone(model, tmp_path / "opset.onnx", feed)
        return
    path = tmp_path / "opset.onnx"
    onnx.save(model, str(path))
    loaded = OrtModel(path, threads=1)
    assert loaded.fused_attention == 1
    np.testing.assert_allclose(loaded.run(feed)["out"], numpy_attention(*feed.values(), 2, 0.3), rtol=1e-5, atol=1e-6)


def test_float64_attention_is_left_alone(tmp_path: Path) -> None:
    """ORT's CPU MultiHeadAttention is float32 only: a float64 model fused would no longer load."""
    model = attention_graph(0.3, masked=False, key_two_transposes=False)
    for info in [*model.graph.input, *model.graph.output]:
        info.type.tensor_type.elem_type = TensorProto.DOUBLE
    set_initializer(model, "scale", np.array(0.3, np.float64))
    assert_left_alone(model, tmp_path / "f64.onnx", qkv(4, dtype=np.float64))


@pytest.mark.parametrize("broken", ["unloadable graph", "error"])
def test_a_fused_graph_ort_cannot_load_falls_back_to_the_model_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                        broken: str) -> None:
    path = tmp_path / "attention.onnx"
    onnx.save(attention_graph(0.3, masked=False, key_two_transposes=False), str(path))

    def fused(_: Path) -> tuple[bytes, int]:
        if broken == "error":
            raise RuntimeError("a bug in the fusion")
        return b"not a model", 1

    monkeypatch.setattr(fusion, "fused_model", fused)
    loaded = OrtModel(path, threads=1, static_shapes=True)
    assert loaded.fused_attention == 0
    feed = qkv(5)
    for _ in range(2):  # the specialised session (first call) is built from the file too
        np.testing.assert_allclose(loaded.run(feed)["out"], numpy_attention(*feed.values(), 2, 0.3),
                                   rtol=1e-5, atol=1e-6)
    (tmp_path / "corrupt.onnx").write_bytes(b"not an onnx file")  # a file that is broken still says so
    with pytest.raises(EngineError, match="cannot load .*corrupt.onnx"):
        OrtModel(tmp_path / "corrupt.onnx", threads=1)


# ------------------------------------------------------------------------------------ the fused-file cache


def save_external(model: onnx.ModelProto, path: Path) -> None:
    """`path` with a (here unused) 4 KB weight in `<name>_data` beside it, the small shape and scale constants
    inline, as exporters write them (the data file is replaced: onnx appends to an existing one)."""
    model.graph.initializer.append(numpy_helper.from_array(np.ones(1024, np.float32), "weight"))
    path.with_name(path.name + "_data").unlink(missing_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + "_data", size_threshold=1024)


def test_cached_fused_graph_is_rebuilt_when_the_model_changes_whatever_the_timestamps(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Model A (2 heads of 3) is fused and cached; model B (3 heads of 2, same weights layout) is copied over it
    with older timestamps (cp -p, rsync -a, tar x): B must run as B, not through A's cached graph."""
    path, cache = tmp_path / "model.onnx", tmp_path / "model.fused.onnx"
    save_external(attention_graph(0.3, masked=False, key_two_transposes=False, heads=2, head_dim=3), path)
    assert fused_model(path) == (str(cache), 1)
    assert OrtModel(path, threads=1).fused_attention == 1
    built = cache.stat().st_mtime_ns

    save_external(attention_graph(0.3, masked=False, key_two_transposes=False, heads=3, head_dim=2), path)
    old = built - 3_600 * 10**9
    for f in (path, tmp_path / "model.onnx_data"):
        os.utime(f, ns=(old, old))
    feed = qkv(6)
    loaded = OrtModel(path, threads=1)
    assert loaded.fused_attention == 1
    np.testing.assert_allclose(loaded.run(feed)["out"], numpy_attention(*feed.values(), 3, 0.3), rtol=1e-5, atol=1e-6)
    assert fused_model(path) == (str(cache), 1)  # now current: reused as it is
    current = cache.read_bytes()
    assert fused_model(path) == (str(cache), 1) and cache.read_bytes() == current

    # another fusion code: rebuilt too
    monkeypatch.setattr(fusion, "FUSION_VERSION", fusion.FUSION_VERSION + 1)
    assert fused_model(path) == (str(cache), 1)
    props = {p.key: p.value for p in onnx.load(str(cache), load_external_data=False).metadata_props}
    assert f'"fusion": {fusion.FUSION_VERSION}' in props["basinguard.fusion.key"]

    # a damaged cache file is rebuilt, not loaded; written under a unique temporary name, none left behind
    cache.write_bytes(b"truncated")
    assert fused_model(path) == (str(cache), 1) and cache.read_bytes() != b"truncated"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.fused.onnx", "model.onnx", "model.onnx_data"]
    umask = os.umask(0)
    os.umask(umask)
    assert cache.stat().st_mode & 0o777 == 0o666 & ~umask  # readable as any file written there, not mkstemp's 0600
