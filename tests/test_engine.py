"""The ONNX Runtime backend's shape-specialised sessions (`static_shapes`): same outputs as the dynamic
session, built once per set of input shapes after SPECIALISE_AFTER calls, and bounded in number."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from basinguard.engine.ort import MAX_SPECIALISED, SPECIALISE_AFTER, OrtModel


def unet_inputs(model: OrtModel, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    tokens, width = model.inputs["encoder_hidden_states"].shape[1:]
    return {"sample": rng.standard_normal((batch, 4, 8, 8), dtype=np.float32),
            "timestep": np.full(batch, 500.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, tokens, width), dtype=np.float32)}


def test_static_shapes_match_dynamic_session(tiny_onnx_dir: Path) -> None:
    path = tiny_onnx_dir / "unet" / "model.onnx"
    dynamic = OrtModel(path, threads=1)
    static = OrtModel(path, threads=1, static_shapes=True)
    rng = np.random.default_rng(0)
    for batch in (2, 4):
        feed = unet_inputs(dynamic, batch, rng)
        for _ in range(SPECIALISE_AFTER + 2):
            want = dynamic.run(feed)["out_sample"]
            got = static.run(feed)["out_sample"]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # one session per batch size on top of the dynamic one, and its axes fixed to that batch's shapes
    assert len(static.sessions) == 3
    assert len(dynamic.sessions) == 1
    fixed = {tuple(i.shape) for i in static.sessions[1].get_inputs()}
    assert (2, 4, 8, 8) in fixed and all(isinstance(d, int) for shape in fixed for d in shape)


def test_static_shapes_are_bounded(tiny_onnx_dir: Path) -> None:
    model = OrtModel(tiny_onnx_dir / "unet" / "model.onnx", threads=1, static_shapes=True)
    rng = np.random.default_rng(1)
    for batch in range(1, MAX_SPECIALISED + 3):
        feed = unet_inputs(model, batch, rng)
        for _ in range(SPECIALISE_AFTER):
            model.run(feed)
    assert len(model.sessions) == 1 + MAX_SPECIALISED  # later shapes run on the dynamic session
