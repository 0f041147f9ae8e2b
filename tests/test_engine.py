"""The ONNX Runtime backend's shape-specialised sessions (`static_shapes`): same outputs as the dynamic
session, built once per set of input shapes at its first call (so outputs depend on the shapes only), bounded in
number, and built once when two threads meet a new shape. Its run-time
errors, and the model folder's configs it is loaded from: one-line errors naming the file, never tracebacks."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from basinguard.engine import ort as ort_backend
from basinguard.engine.base import EngineError
from basinguard.engine.ort import MAX_SPECIALISED, OrtModel
from basinguard.runtime.errors import ModelFolderError
from basinguard.runtime.model_folder import ModelFolder


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
        first = static.run(feed)["out_sample"]
        for _ in range(3):
            want = dynamic.run(feed)["out_sample"]
            got = static.run(feed)["out_sample"]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(got, first)  # the first call ran on the same session as the later ones
    # one session per batch size on top of the dynamic one, and its axes fixed to that batch's shapes
    assert len(static.sessions) == 3
    assert len(dynamic.sessions) == 1
    fixed = {tuple(i.shape) for i in static.sessions[1].get_inputs()}
    assert (2, 4, 8, 8) in fixed and all(isinstance(d, int) for shape in fixed for d in shape)


def test_static_shapes_are_bounded_and_each_shape_set_keeps_its_session(tiny_onnx_dir: Path) -> None:
    path = tiny_onnx_dir / "unet" / "model.onnx"
    model = OrtModel(path, threads=1, static_shapes=True)
    rng = np.random.default_rng(1)
    feeds = {batch: unet_inputs(model, batch, rng) for batch in range(1, MAX_SPECIALISED + 3)}
    first = {batch: model.run(feed)["out_sample"] for batch, feed in feeds.items()}
    assert len(model.sessions) == 1 + MAX_SPECIALISED
    kept = {i.shape[0] for s in model.sessions[1:] for i in s.get_inputs() if i.name == "sample"}
    assert kept == set(range(1, MAX_SPECIALISED + 1))  # the first shape sets seen; later ones run dynamic, always
    for batch, feed in reversed(feeds.items()):  # whatever ran since, each shape set runs where it first ran
        np.testing.assert_array_equal(model.run(feed)["out_sample"], first[batch])
    assert len(model.sessions) == 1 + MAX_SPECIALISED
    dynamic = OrtModel(path, threads=1)
    np.testing.assert_array_equal(dynamic.run(feeds[MAX_SPECIALISED + 2])["out_sample"], first[MAX_SPECIALISED + 2])


def test_two_threads_at_a_new_shape_build_one_session(tiny_onnx_dir: Path, monkeypatch) -> None:
    model = OrtModel(tiny_onnx_dir / "unet" / "model.onnx", threads=1, static_shapes=True)
    feed = unet_inputs(model, 2, np.random.default_rng(3))
    built, real = [], ort_backend.OrtModel._specialised
    monkeypatch.setattr(ort_backend.OrtModel, "_specialised", lambda self, f: built.append(1) or real(self, f))
    start = threading.Barrier(2)
    outputs = []

    def call() -> None:
        start.wait()
        outputs.append(model.run(feed)["out_sample"])

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1 and len(model.sessions) == 2
    np.testing.assert_array_equal(outputs[0], outputs[1])


@pytest.mark.parametrize("static_shapes", [False, True])
def test_run_time_errors_name_the_model_file_and_the_inputs(tiny_onnx_dir: Path, static_shapes: bool) -> None:
    """A folder mixing a 48-wide text encoder with a 32-wide UNet: ORT's InvalidArgument becomes an EngineError."""
    path = tiny_onnx_dir / "unet" / "model.onnx"
    model = OrtModel(path, threads=1, static_shapes=static_shapes)
    feed = unet_inputs(model, 1, np.random.default_rng(2))
    feed["encoder_hidden_states"] = np.zeros((1, 77, 48), np.float32)
    for _ in range(2):  # the shape-specialised session (built at the first call) too
        with pytest.raises(EngineError) as caught:
            model.run(feed)
        message = str(caught.value)
        assert str(path) in message and "encoder_hidden_states (1, 77, 48) float32" in message
        assert "invalid dimensions" in message.lower() and "\n" not in message
    assert len(model.sessions) == 1  # shapes that cannot run keep no specialised session


# -------------------------------------------------------------------------------------------- model folder


def model_folder(root: Path, unet_config: dict | None = None) -> Path:
    """The files ModelFolder.open reads (placeholder models: it does not load them)."""
    for part in ("text_encoder", "unet", "vae_decoder"):
        (root / part).mkdir(parents=True)
        (root / part / "model.onnx").write_bytes(b"")
    (root / "tokenizer").mkdir()
    (root / "scheduler").mkdir()
    (root / "scheduler/scheduler_config.json").write_text(json.dumps({"num_train_timesteps": 1000}))
    unet = {"sample_size": 8, "block_out_channels": [32, 64], "in_channels": 4} | (unet_config or {})
    (root / "unet/config.json").write_text(json.dumps(unet))
    (root / "vae_decoder/config.json").write_text(json.dumps({"block_out_channels": [32, 64]}))
    return root


def test_model_folder_reads_sample_size_as_an_integer_or_height_and_width(tmp_path: Path) -> None:
    square = ModelFolder.open(model_folder(tmp_path / "square"))
    assert (square.default_size, square.default_image, square.size_multiple) == (16, (16, 16), 4)
    wide = ModelFolder.open(model_folder(tmp_path / "wide", {"sample_size": [8, 12]}))
    assert (wide.default_size, wide.default_image) == (16, (16, 24))
    assert ModelFolder.open(model_folder(tmp_path / "listed", {"sample_size": [8, 8]})).default_size == 16


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "unet/config.json").write_text("[]"), r"unet/config.json: expected a JSON object, found an array"),
    (lambda d: (d / "basinguard.json").write_text("null"), r"basinguard.json: expected a JSON object, found null"),
    (lambda d: (d / "vae_decoder/config.json").write_text('"text"'), r"vae_decoder/config.json: .* found a string"),
    (lambda d: ((d / "scheduler/scheduler_config.json").unlink(), (d / "scheduler/scheduler_config.json").mkdir()),
     r"cannot read .*scheduler/scheduler_config.json"),
    (lambda d: (d / "unet/config.json").write_bytes(b"\xff\xfe{"), r"corrupt JSON in .*unet/config.json"),
    (lambda d: (d / "unet/config.json").write_text('{"sample_size": [8]}'), r"unet/config.json: sample_size must be"),
    (lambda d: (d / "unet/config.json").write_text('{"sample_size": "64"}'), r"unet/config.json: sample_size must be"),
    (lambda d: (d / "unet/config.json").write_text('{"sample_size": [0, 8]}'), r"sample_size must be a positive"),
    (lambda d: (d / "unet/config.json").write_text('{"block_out_channels": 3}'), r"unet/config.json: block_out_chan"),
    (lambda d: (d / "unet/config.json").write_text('{"in_channels": "4"}'), r"unet/config.json: in_channels must"),
    (lambda d: (d / "scheduler/scheduler_config.json").write_text('{"num_train_timesteps": null}'),
     r"scheduler_config.json: num_train_timesteps must"),
    (lambda d: (d / "basinguard.json").write_text('{"sampling_defaults": []}'), r"basinguard.json: sampling_defaults"),
    (lambda d: (d / "vae_decoder/config.json").write_text('{"block_out_channels": [32], "scaling_factor": "x"}'),
     r"vae_decoder/config.json: scaling_factor must be a finite number other than 0, not 'x'"),
    (lambda d: (d / "basinguard.json").write_text('{"sampling_defaults": {"guidance_scale": "7"}}'),
     r"sampling_defaults.guidance_scale must be a number, not '7'"),
    (lambda d: (d / "basinguard.json").write_text('{"sampling_defaults": {"steps": 3.5}}'),
     r"sampling_defaults.steps must be an integer"),
    (lambda d: (d / "basinguard.json").write_text('{"sampling_defaults": {"policy": 3, "scheduler": null}}'),
     r"sampling_defaults.policy must be text"),  # (a null scheduler is allowed: the model's own)
])
def test_corrupt_model_folder_configs_are_model_folder_errors_naming_the_file(tmp_path: Path, damage,
                                                                               message: str) -> None:
    folder = model_folder(tmp_path / "model")
    damage(folder)
    with pytest.raises(ModelFolderError, match=message):
        ModelFolder.open(folder)
