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
    # values in range too, named as the file's, not as flags the user never gave
    (lambda d: (d / "basinguard.json").write_text('{"sampling_defaults": {"steps": 0}}'),
     r"basinguard.json: sampling_defaults.steps must be >= 1, not 0"),
    (lambda d: (d / "basinguard.json").write_text('{"sampling_defaults": {"scheduler": "fast"}}'),
     r"basinguard.json: sampling_defaults.scheduler 'fast' is not one of ddim"),
    (lambda d: (d / "basinguard.json").write_text('{"sampling_defaults": {"guidance_scale": 1000}}'),
     r"basinguard.json: sampling_defaults: guidance scale must be in \[0, 100\]"),
    (lambda d: (d / "basinguard.json").write_text('{"sampling_defaults": {"policy": "auto", "mitigation": "cfg"}}'),
     r"basinguard.json: sampling_defaults: mitigation must be one of"),
    (lambda d: (d / "basinguard.json").write_text('{"sampling_defaults": {"policy": "fancy"}}'),
     r"basinguard.json: sampling_defaults: unknown policy 'fancy'"),
])
def test_corrupt_model_folder_configs_are_model_folder_errors_naming_the_file(tmp_path: Path, damage,
                                                                               message: str) -> None:
    folder = model_folder(tmp_path / "model")
    damage(folder)
    with pytest.raises(ModelFolderError, match=message):
        ModelFolder.open(folder)


def test_io_binding_keeps_read_only_inputs_on_the_device_and_matches_session_run(tiny_onnx_dir: Path,
                                                                                 monkeypatch) -> None:
    """The ORT CUDA path's IO binding, run on the CPU device: read-only arrays (the runtime's conditioning and
    cached timesteps) are uploaded once and found again by identity; writable ones are copied at every call; every
    output equals plain `session.run` on the same inputs, including after a read-only input is replaced or a
    writable one is changed in place."""
    import onnxruntime as ort

    path = tiny_onnx_dir / "unet" / "model.onnx"
    plain = OrtModel(path, threads=1)
    bound = OrtModel(path, threads=1, io_binding=True)
    assert bound._binding is not None and bound._binding.device == "cpu" and plain._binding is None
    uploads: list[tuple] = []
    real = ort.OrtValue.ortvalue_from_numpy
    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy", lambda value, *a: uploads.append(value.shape) or real(value, *a))
    rng = np.random.default_rng(3)
    feed = unet_inputs(plain, 4, rng)
    cond = feed["encoder_hidden_states"]
    cond.flags.writeable = False
    timesteps = []
    for t in (900.0, 700.0, 500.0):  # as UNetStage makes them: one read-only array per (batch, t)
        timesteps.append(np.full(4, t, np.float32))
        timesteps[-1].flags.writeable = False

    def check(inputs: dict[str, np.ndarray]) -> None:
        np.testing.assert_allclose(bound.run(inputs)["out_sample"], plain.run(inputs)["out_sample"], rtol=1e-5, atol=1e-6)

    for timestep in timesteps:
        feed["sample"] = rng.standard_normal((4, 4, 8, 8), dtype=np.float32)  # writable: the loop's x
        check({**feed, "timestep": timestep})
    assert sorted(uploads) == sorted([cond.shape, (4,), (4,), (4,)])  # the conditioning once, each timestep once
    check({**feed, "timestep": timesteps[0]})
    assert len(uploads) == 4  # seen before: nothing uploaded

    other = rng.standard_normal(cond.shape, dtype=np.float32)  # the next generation's conditioning
    other.flags.writeable = False
    check({**feed, "encoder_hidden_states": other, "timestep": timesteps[1]})
    assert uploads[4:] == [cond.shape]
    writable = cond.copy()
    check({**feed, "encoder_hidden_states": writable, "timestep": timesteps[1]})
    writable += 1.0  # changed in place: a writable array is never served from a device copy
    check({**feed, "encoder_hidden_states": writable, "timestep": timesteps[1]})
    assert len(uploads) == 5

    as_float64 = np.full(4, 300.0)  # cast by `conform`: cached under the caller's array all the same
    as_float64.flags.writeable = False
    check({**feed, "timestep": as_float64})
    check({**feed, "timestep": as_float64})
    assert uploads[5:] == [(4,)]


def test_io_binding_device_copies_are_bounded(tiny_onnx_dir: Path, monkeypatch) -> None:
    """Past RESIDENT_BYTES the least recently used device copies are dropped (a long batch job's conditionings),
    and results stay those of plain `session.run`."""
    monkeypatch.setattr(ort_backend, "RESIDENT_BYTES", 1)
    path = tiny_onnx_dir / "unet" / "model.onnx"
    plain, bound = OrtModel(path, threads=1), OrtModel(path, threads=1, io_binding=True)
    rng = np.random.default_rng(4)
    for _ in range(3):
        feed = unet_inputs(plain, 2, rng)
        for value in feed.values():
            value.flags.writeable = False
        np.testing.assert_allclose(bound.run(feed)["out_sample"], plain.run(feed)["out_sample"], rtol=1e-5, atol=1e-6)
        assert bound._binding is not None and len(bound._binding.resident) == 1
