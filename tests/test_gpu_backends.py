"""GPU backends: what is decided on the CPU is tested everywhere; what runs on a GPU is tested where one is.

CPU-side (always): profile ranges, ONNX hashing, plan keys, sidecar checks (stale / foreign / altered plans, hashes
from the memo), the rebuild decision, the fp16 conversion of an fp32 export, which plan covers a call, backend
selection and fallbacks, TensorRT's refusals as EngineErrors (fakes that raise where TensorRT raises), ORT provider
options, error messages, the CLI, and the GPU check (torch path with a tiny UNet, its incremental report). GPU-side (skipped without tensorrt + a CUDA device): building,
loading and running plans, dynamic and static, with CUDA graphs, against ONNX Runtime on CPU.
"""

from __future__ import annotations

import enum
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_clip_vocab

import basinguard.engine.cuda as cuda_module
import basinguard.engine.plans as plans
import basinguard.engine.tensorrt as trt_backend
from basinguard import files
from basinguard.cli import main as cli_main
from basinguard.cli import parse_hw
from basinguard.engine import load_model
from basinguard.engine.base import EngineError, TensorSpec
from basinguard.engine.ort import check_active, provider_list, trt_profile_options
from basinguard.engine.plans import (
    BuildSpec,
    EngineEnv,
    RoleProfile,
    build_failure,
    choose_backend,
    find_plans,
    input_profile,
    key_fields,
    merged_input_profile,
    onnx_digest,
    pick_profile,
    plan_key,
    plan_paths,
    role_profiles,
    store_plan,
    verify_plan,
)

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
ENV = EngineEnv("10.7.0", "NVIDIA H200", "9.0")


def tiny_unet_onnx(path: Path, context_dim: int = 8) -> Path:
    """An ONNX 'UNet' with SD's input names and dynamic axes: out = 2 * sample + mean(e) + t / 1000."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("sample", f32, ["batch", 4, "height", "width"]),
              helper.make_tensor_value_info("timestep", f32, ["batch"]),
              helper.make_tensor_value_info("encoder_hidden_states", f32, ["batch", 77, context_dim])]
    output = helper.make_tensor_value_info("out_sample", f32, ["batch", 4, "height", "width"])
    inits = [helper.make_tensor("two", f32, [], [2.0]), helper.make_tensor("milli", f32, [], [1e-3]),
             helper.make_tensor("ax3", TensorProto.INT64, [1], [3]),
             helper.make_tensor("ax123", TensorProto.INT64, [3], [1, 2, 3])]
    nodes = [helper.make_node("Mul", ["sample", "two"], ["s2"]),
             helper.make_node("ReduceMean", ["encoder_hidden_states"], ["m"], axes=[1, 2], keepdims=1),
             helper.make_node("Unsqueeze", ["m", "ax3"], ["m4"]),
             helper.make_node("Unsqueeze", ["timestep", "ax123"], ["t4"]),
             helper.make_node("Mul", ["t4", "milli"], ["t4s"]),
             helper.make_node("Add", ["s2", "m4"], ["a"]),
             helper.make_node("Add", ["a", "t4s"], ["out_sample"])]
    model = helper.make_model(helper.make_graph(nodes, "tiny_unet", inputs, [output], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def tiny_reference(feed: dict[str, np.ndarray]) -> np.ndarray:
    mean = feed["encoder_hidden_states"].mean(axis=(1, 2)).reshape(-1, 1, 1, 1)
    return 2 * feed["sample"] + mean + feed["timestep"].reshape(-1, 1, 1, 1) / 1000


def fake_folder(root: Path) -> Path:
    """A model folder ModelFolder accepts (configs; tiny ONNX files), SD geometry: VAE factor 8, UNet /8."""
    for role in ("text_encoder", "unet", "vae_decoder"):
        tiny_unet_onnx(root / role / "model.onnx")
    write_tiny_clip_vocab(root / "tokenizer")  # the spec builds the tokenizer: its length is the text profile's
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"num_train_timesteps": 1000}))
    (root / "unet" / "config.json").write_text(json.dumps({"sample_size": 64, "block_out_channels": [1, 2, 3, 4]}))
    (root / "vae_decoder" / "config.json").write_text(json.dumps({"block_out_channels": [1, 2, 3, 4]}))
    return root


# ------------------------------------------------------------------------------------------------- profiles


def test_dynamic_profiles_span_batch_n_to_2n_and_the_size_range() -> None:
    spec = BuildSpec(batch=2, image=(512, 512), min_image=(256, 384), max_image=(768, 1024))
    (unet,) = role_profiles("unet", spec, vae_factor=8, native=512, multiple=64)
    assert unet.batch == (1, 4, 4)  # STP's uncond-only steps at N, guided at 2N, a batch job's tail: one engine
    assert unet.latent == ((32, 48), (64, 64), (96, 128))
    (text,) = role_profiles("text_encoder", spec, 8, 512, 64)
    assert text.batch == (1, 4, 4) and text.latent is None and text.seq_len == 77
    (vae,) = role_profiles("vae_decoder", spec, 8, 512, 64)
    assert vae.batch == (1, 2, 2) and vae.latent == unet.latent
    assert "batch 1..4 (opt 4)" in unet.describe() and "latent 32x48..96x128" in unet.describe()
    (from_n,) = role_profiles("unet", BuildSpec(batch=2, min_batch=2), 8, 512, 64)
    assert from_n.batch == (2, 4, 4)


def test_defaults_are_the_native_size_and_min_batch_can_go_lower() -> None:
    (wide,) = role_profiles("unet", BuildSpec(), 8, (512, 768), 64)  # a non-square native size: (h, w) kept
    assert wide.latent == ((64, 96),) * 3
    (unet,) = role_profiles("unet", BuildSpec(batch=3, min_batch=1), 8, 768, 64, seq_len=64)
    assert unet.batch == (1, 6, 6) and unet.latent == ((96, 96),) * 3 and unet.seq_len == 64


def test_static_profiles_one_fixed_shape_per_batch_size() -> None:
    spec = BuildSpec(batch=2, image=(512, 768), static=True)
    unet = role_profiles("unet", spec, 8, 512, 64)
    assert [p.batch for p in unet] == [(2, 2, 2), (4, 4, 4)]
    assert all(p.latent == ((64, 96),) * 3 for p in unet)
    assert [p.batch for p in role_profiles("unet", BuildSpec(batch=2, min_batch=1, static=True), 8, 512, 64)] == \
        [(1, 1, 1), (2, 2, 2), (4, 4, 4)]
    assert [p.batch for p in role_profiles("text_encoder", spec, 8, 512, 64)] == [(4, 4, 4)]
    assert [p.batch for p in role_profiles("vae_decoder", spec, 8, 512, 64)] == [(2, 2, 2)]


@pytest.mark.parametrize("spec, message", [
    (BuildSpec(batch=0), "batch must be >= 1"),
    (BuildSpec(batch=2, min_batch=5), "min batch must be in [1, 4]"),
    (BuildSpec(image=(500, 512)), "multiple of 64"),
    (BuildSpec(image=(512, 512), min_image=(768, 512)), "min <= opt <= max"),
    (BuildSpec(image=(512, 512), max_image=(768, 768), static=True), "static build takes one image size"),
    (BuildSpec(opt_level=7), "optimization level"),
])
def test_profile_validation_names_the_problem(spec: BuildSpec, message: str) -> None:
    with pytest.raises(EngineError, match=message.replace("[", r"\[").replace("]", r"\]")):
        role_profiles("unet", spec, 8, 512, 64)


def test_input_profiles_follow_the_onnx_inputs(tmp_path: Path, ort_session) -> None:
    """Shapes as ONNX Runtime reports them (named dynamic axes) and as TensorRT does (-1)."""
    session = ort_session(tiny_unet_onnx(tmp_path / "unet" / "model.onnx"))
    shapes = {i.name: tuple(i.shape) for i in session.get_inputs()}
    (rp,) = role_profiles("unet", BuildSpec(batch=1, min_image=(256, 256), max_image=(768, 512)), 8, 512, 64)
    assert input_profile("sample", shapes["sample"], rp) == ((1, 4, 32, 32), (2, 4, 64, 64), (2, 4, 96, 64))
    assert input_profile("timestep", shapes["timestep"], rp) == ((1,), (2,), (2,))
    assert input_profile("encoder_hidden_states", shapes["encoder_hidden_states"], rp) == \
        ((1, 77, 8), (2, 77, 8), (2, 77, 8))
    assert input_profile("encoder_hidden_states", (-1, -1, 768), rp) == ((1, 77, 768), (2, 77, 768), (2, 77, 768))
    assert input_profile("timestep", (), rp) is None and input_profile("timestep", (1,), rp) is None
    with pytest.raises(EngineError, match="axis 2 is dynamic"):
        input_profile("encoder_hidden_states", (-1, 77, -1), rp)
    text = RoleProfile((1, 2, 2), None, 77)
    assert input_profile("input_ids", ("batch", "sequence"), text) == ((1, 77), (2, 77), (2, 77))


def test_pick_profile_and_merged_profile_for_ort() -> None:
    static = [{"sample": ((2, 4, 64, 64),) * 3, "timestep": ((2,),) * 3},
              {"sample": ((4, 4, 64, 64),) * 3, "timestep": ((4,),) * 3}]
    assert pick_profile({"sample": (4, 4, 64, 64), "timestep": (4,)}, static) == 1
    assert pick_profile({"sample": (2, 4, 64, 64), "timestep": (2,)}, static) == 0
    assert pick_profile({"sample": (3, 4, 64, 64), "timestep": (3,)}, static) is None
    assert pick_profile({"sample": (2, 4, 64, 72), "timestep": (2,)}, static) is None
    merged = merged_input_profile(static)
    assert merged["sample"] == ((2, 4, 64, 64), (4, 4, 64, 64), (4, 4, 64, 64))
    options = trt_profile_options(merged)
    assert options["trt_profile_min_shapes"] == "sample:2x4x64x64,timestep:2"
    assert options["trt_profile_max_shapes"] == "sample:4x4x64x64,timestep:4"
    assert trt_profile_options(None) == {}
    with pytest.raises(EngineError, match="outside the TensorRT plan's profiles"):
        raise plans.out_of_profile("unet", {"sample": (3, 4, 64, 64)}, static, None)


# ---------------------------------------------------------------------------------------------- plan cache


def test_onnx_digest_covers_external_data_not_configs_and_is_memoised(tmp_path: Path, monkeypatch) -> None:
    model = tiny_unet_onnx(tmp_path / "unet" / "model.onnx")
    data = model.with_name("model.onnx_data")
    data.write_bytes(b"weights-1")
    config = model.with_name("config.json")
    config.write_text("{}")
    memo = tmp_path / "cache" / "digests.json"
    first = onnx_digest(model, memo)
    config.write_text('{"changed": true}')
    (model.parent / "trt_cache").mkdir()  # ORT's engine cache in a sub-folder is not part of the model
    (model.parent / "trt_cache" / "x.engine").write_bytes(b"1")
    calls = []
    real = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda p: calls.append(p) or real(p))
    assert onnx_digest(model, memo) == first and calls == []  # unchanged files: hashes come from the memo
    data.write_bytes(b"weights-22")
    assert onnx_digest(model, memo) != first and calls == [data]


def fields_for(onnx_sha: str = "a" * 64, env: EngineEnv = ENV, batch: int = 1, fp16: bool = True,
               tf32: bool = True) -> dict:
    spec = BuildSpec(batch=batch, fp16=fp16, tf32=tf32)
    return key_fields("unet", onnx_sha, env, role_profiles("unet", spec, 8, 512, 64),
                      plans.precision_for("unet", spec), spec)


def test_plan_key_changes_with_every_field() -> None:
    base = plan_key(fields_for())
    assert plan_key(fields_for()) == base
    assert plan_key(json.loads(json.dumps(fields_for()))) == base  # a sidecar round trip keeps the key
    others = [fields_for(onnx_sha="b" * 64), fields_for(env=EngineEnv("10.8.0", ENV.gpu, ENV.compute_capability)),
              fields_for(env=EngineEnv(ENV.tensorrt, "NVIDIA A100-SXM4-80GB", "8.0")),
              fields_for(env=EngineEnv(ENV.tensorrt, ENV.gpu, "9.1")), fields_for(batch=2), fields_for(fp16=False),
              fields_for(tf32=False)]
    keys = {plan_key(f) for f in others}
    assert base not in keys and len(keys) == len(others)
    assert plans.precision_for("vae_decoder", BuildSpec()) == {"fp16": False}
    assert plans.precision_for("vae_decoder", BuildSpec(vae_fp16=True)) == {"fp16": True}


def test_sidecar_checks_reject_stale_foreign_and_altered_plans(tmp_path: Path) -> None:
    fields = fields_for()
    record = store_plan(tmp_path, fields, b"plan-bytes", [{"sample": [[1], [2], [2]]}], tmp_path / "m.onnx")
    plan, sidecar = plan_paths(tmp_path, "unet", plan_key(fields))
    assert record.plan == plan and sidecar.is_file()
    assert verify_plan(sidecar, fields)[1] is None
    _, why = verify_plan(sidecar, fields_for(onnx_sha="b" * 64))
    assert "ONNX file changed" in why
    _, why = verify_plan(sidecar, fields_for(env=EngineEnv("10.8.0", ENV.gpu, ENV.compute_capability)))
    assert "built with TensorRT 10.7.0, this is TensorRT 10.8.0" in why
    _, why = verify_plan(sidecar, fields_for(env=EngineEnv(ENV.tensorrt, "NVIDIA L4", "8.9")))
    assert "built for NVIDIA H200 (compute 9.0), this is NVIDIA L4 (compute 8.9)" in why

    plan.write_bytes(b"plan-bytes-but-longer")  # altered after the build
    assert "truncated or altered" in verify_plan(sidecar, fields)[1]
    plan.write_bytes(b"plan-bytez")  # same size, other content
    assert "truncated or altered" in verify_plan(sidecar, fields)[1]
    plan.write_bytes(b"plan-bytes")
    edited = json.loads(sidecar.read_text()) | {"gpu": "NVIDIA L4"}  # a sidecar made to look like this machine's
    sidecar.write_text(json.dumps(edited))
    assert "do not match its key" in verify_plan(sidecar, fields)[1]
    sidecar.unlink()
    assert "no sidecar" in verify_plan(sidecar, fields)[1]


def test_find_plans_orders_static_then_newest_and_says_why_others_are_not(tmp_path: Path) -> None:
    sha = "c" * 64
    foreign = fields_for(sha, EngineEnv("10.0.1", "Tesla T4", "7.5"))
    store_plan(tmp_path, foreign, b"t4", [], tmp_path / "m.onnx")
    records, why = find_plans(tmp_path, "unet", sha, ENV)
    assert records == [] and len(why) == 1 and "TensorRT 10.0.1" in why[0] and "Tesla T4" in why[0]
    older = store_plan(tmp_path, fields_for(sha, batch=1), b"n1", [], tmp_path / "m.onnx")
    newer = store_plan(tmp_path, fields_for(sha, batch=2), b"n2", [{"sample": [[2], [4], [4]]}], tmp_path / "m.onnx")
    spec = BuildSpec(batch=1, static=True)
    static_fields = key_fields("unet", sha, ENV, role_profiles("unet", spec, 8, 512, 64), {"fp16": True}, spec)
    static = store_plan(tmp_path, static_fields, b"s1", [{"sample": [[1]] * 3}, {"sample": [[2]] * 3}], tmp_path / "m.onnx")
    static.sidecar["built_at"] = older.sidecar["built_at"]  # built first: still preferred (faster kernels)
    records, why = find_plans(tmp_path, "unet", sha, ENV)
    assert [r.plan for r in records] == [static.plan, newer.plan, older.plan]
    assert plans.newest_input_profiles(tmp_path, "unet", sha) == static.input_profiles
    assert find_plans(tmp_path, "unet", "d" * 64, ENV)[0] == []  # another ONNX file: nothing loads


def test_plan_hashes_come_from_the_memo_until_the_plan_changes(tmp_path: Path, monkeypatch) -> None:
    """Every load checks each plan's hash; a multi-GB plan is read again only when its size/mtime/inode change."""
    monkeypatch.setattr(plans, "digest_memo", lambda: None)  # no user cache: the memo beside the plans
    fields = fields_for()
    record = store_plan(tmp_path, fields, b"plan-bytes", [], tmp_path / "m.onnx")
    calls: list[Path] = []
    real = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda p: calls.append(p) or real(p))
    sidecar = record.plan.with_suffix(".json")
    assert verify_plan(sidecar, fields)[1] is None and calls == [record.plan]  # first check: hashed once
    assert (tmp_path / "digests.json").is_file()
    assert verify_plan(sidecar, fields)[1] is None and calls == [record.plan]  # then from the memo
    record.plan.write_bytes(b"plan-bytez")  # same size, new content (and mtime): hashed again, and rejected
    assert "truncated or altered" in verify_plan(sidecar, fields)[1] and calls == [record.plan] * 2


class FakePlan:
    """What TensorRTPlans needs of an open plan: specs, run, close (a TensorRTModel needs a GPU)."""

    def __init__(self, plan: Path, name: str, graph: bool, opened: list):
        self.plan, self.graph, self.closed = plan, graph, False
        self.inputs = {"sample": TensorSpec("sample", np.dtype(np.float32), (None, 4, 8, 8))}
        self.outputs = {"out_sample": TensorSpec("out_sample", np.dtype(np.float32), (None, 4, 8, 8))}
        opened.append(self)

    def run(self, inputs: dict) -> dict:
        return {"out_sample": inputs["sample"] * 2, "plan": self.plan}

    def close(self) -> None:
        self.closed = True


def test_a_plan_that_covers_the_shapes_runs_them(tmp_path: Path) -> None:
    """A static batch-1 plan built after a dynamic batch-4 one (both kept, neither replaces the other); a batch-4 call runs on the
    dynamic plan, a batch-1 call on the static one, a batch-9 call names every plan's ranges."""
    sha = "e" * 64
    dynamic = store_plan(tmp_path, fields_for(sha, batch=4), b"d4", [{"sample": [[1, 4, 8, 8], [8, 4, 8, 8], [8, 4, 8, 8]]}],
                         tmp_path / "m.onnx")
    spec = BuildSpec(batch=1, static=True)
    static = store_plan(tmp_path, key_fields("unet", sha, ENV, role_profiles("unet", spec, 8, 512, 64), {"fp16": True}, spec),
                        b"s1", [{"sample": [[1, 4, 8, 8]] * 3}, {"sample": [[2, 4, 8, 8]] * 3}], tmp_path / "m.onnx")
    records, _ = find_plans(tmp_path, "unet", sha, ENV)
    opened: list[FakePlan] = []
    model = trt_backend.TensorRTPlans(records, "unet", cuda_graph=True,
                                      open_plan=lambda plan, name, graph: FakePlan(plan, name, graph, opened))
    x4, x1 = np.ones((4, 4, 8, 8), np.float32), np.ones((1, 4, 8, 8), np.float32)
    assert model.run({"sample": x4})["plan"] == dynamic.plan
    assert model.run({"sample": x1})["plan"] == static.plan
    assert [(o.plan, o.graph) for o in opened] == [(static.plan, True), (dynamic.plan, False)]  # graphs: static only
    with pytest.raises(EngineError, match=r"outside the TensorRT plan's profiles.*\(8, 4, 8, 8\).*2 plan\(s\)"):
        model.run({"sample": np.ones((9, 4, 8, 8), np.float32)})
    model.close()
    assert all(o.closed for o in opened)


def test_ort_tensorrt_profiles_come_from_this_models_plans_only(tmp_path: Path, monkeypatch) -> None:
    """A plan cache shared by model folders ($BASINGUARD_ENGINE_DIR): the newest unet sidecar there is another
    model's (another context width); ORT's TensorRT EP gets this model's profile, or none."""
    import onnxruntime as ort

    import basinguard.engine.ort as ort_backend

    shared = tmp_path / "engines"
    monkeypatch.setenv(plans.ENGINE_DIR_ENV, str(shared))
    monkeypatch.setattr(trt_backend, "native_problem", lambda: "tensorrt is not installed")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["TensorrtExecutionProvider", "CPUExecutionProvider"])
    made: list[dict | None] = []
    monkeypatch.setattr(ort_backend, "OrtModel", lambda path, provider, threads, trt_profile: made.append(trt_profile))
    ours = tiny_unet_onnx(tmp_path / "a" / "unet" / "model.onnx", context_dim=8)
    other = tiny_unet_onnx(tmp_path / "b" / "unet" / "model.onnx", context_dim=16)
    ehs = "encoder_hidden_states"
    mine = store_plan(shared, fields_for(onnx_digest(ours), batch=1), b"a", [{ehs: [[1, 77, 8], [2, 77, 8], [2, 77, 8]]}], ours)
    theirs = store_plan(shared, fields_for(onnx_digest(other), batch=2), b"b",
                        [{ehs: [[1, 77, 16], [4, 77, 16], [4, 77, 16]]}], other)
    assert theirs.sidecar["built_at"] >= mine.sidecar["built_at"]
    load_model(ours, "tensorrt")
    assert made[-1] == {ehs: ((1, 77, 8), (2, 77, 8), (2, 77, 8))}
    assert plans.newest_input_profiles(shared, "unet", onnx_digest(ours)) == mine.input_profiles
    mine.plan.with_suffix(".json").unlink()  # only the other model's plans: no profile rather than a wrong one
    load_model(ours, "tensorrt")
    assert made[-1] is None


def test_build_plan_reuses_valid_plans_and_rebuilds_stale_ones(tmp_path: Path, monkeypatch) -> None:
    """The cache decision is CPU-side; only TensorRT's serializer is replaced (it needs a GPU)."""
    model = tiny_unet_onnx(tmp_path / "onnx" / "unet" / "model.onnx")
    builds: list[str] = []
    sources: list[Path] = []

    def serialize(onnx_path, role, profiles, spec, timing_cache):
        builds.append(role)
        sources.append(onnx_path)
        return f"plan-{len(builds)}".encode(), [{"sample": [[1, 4, 64, 64], [2, 4, 64, 64], [2, 4, 64, 64]]}]

    monkeypatch.setattr(trt_backend, "_serialize", serialize)
    cache, spec = tmp_path / "cache", BuildSpec()
    profiles = role_profiles("unet", spec, 8, 512, 64)
    logs: list[str] = []
    first = trt_backend.build_plan(model, "unet", profiles, spec, cache, env=ENV, log=logs.append)
    again = trt_backend.build_plan(model, "unet", profiles, spec, cache, env=ENV, log=logs.append)
    assert builds == ["unet"] and again.plan == first.plan and "cached plan" in logs[-1]
    # fp16 from an fp32 export: built from a float16 copy with float32 IO, made once beside the plans
    assert sources[0] != model and sources[0].is_relative_to(cache / "fp16") and "converting" in logs[0]
    assert trt_backend.float_dtype(sources[0]) == "float16"
    other_gpu = trt_backend.build_plan(model, "unet", profiles, spec, cache, log=logs.append,
                                       env=EngineEnv(ENV.tensorrt, "NVIDIA L4", "8.9"))
    assert builds == ["unet"] * 2 and other_gpu.plan != first.plan  # foreign: its own key, its own file
    first.plan.write_bytes(b"corrupt")
    rebuilt = trt_backend.build_plan(model, "unet", profiles, spec, cache, env=ENV, log=logs.append)
    assert builds == ["unet"] * 3 and rebuilt.plan == first.plan and "truncated or altered" in logs[-3]
    model.with_name("model.onnx_data").write_bytes(b"new weights")  # the ONNX changed: new key, new plan
    changed = trt_backend.build_plan(model, "unet", profiles, spec, cache, env=ENV, log=logs.append)
    assert builds == ["unet"] * 4 and changed.plan != first.plan
    trt_backend.build_plan(model, "unet", profiles, spec, cache, env=ENV, force=True, log=logs.append)
    assert len(builds) == 5


class FakeBuilderConfig:
    """What polygraphy's CreateConfig sets flags on; TensorRT's builder config starts with TF32 set."""

    def __init__(self) -> None:
        self.flags = {"TF32"}

    def set_flag(self, flag: str) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag: str) -> None:
        self.flags.discard(flag)


@pytest.mark.parametrize("tf32", [True, False])
def test_builds_keep_tensorrt_tf32_unless_told_not_to(tmp_path: Path, monkeypatch, tf32: bool) -> None:
    """The CreateConfig our build passes to polygraphy, run through polygraphy's own flag code against a stand-in
    tensorrt module: TF32 stays set (TensorRT's default, which polygraphy clears unless tf32=True) for an fp32
    plan, and BuildSpec(tf32=False) clears it."""
    pytest.importorskip("polygraphy")
    import polygraphy.backend.trt as polygraphy_trt

    fake_trt = types.ModuleType("tensorrt")
    fake_trt.__version__ = "10.13.0.35"
    fake_trt.BuilderFlag = types.SimpleNamespace(TF32="TF32", FP16="FP16", BF16="BF16", FP8="FP8", INT8="INT8")
    fake_trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt)  # what polygraphy's lazy import returns
    monkeypatch.setattr(trt_backend, "_import_tensorrt", lambda: fake_trt)
    network = types.SimpleNamespace(num_inputs=0)  # an all-static graph: no profiles
    monkeypatch.setattr(polygraphy_trt, "NetworkFromOnnxPath", lambda path, strongly_typed: lambda: (None, network, None))
    configs: list = []
    monkeypatch.setattr(polygraphy_trt, "EngineBytesFromNetwork",
                        lambda network, config, save_timing_cache: configs.append(config) or (lambda: b"plan"))
    spec = BuildSpec(fp16=False, tf32=tf32)
    serialized, _ = trt_backend._serialize(tmp_path / "model.onnx", "vae_decoder",
                                           role_profiles("vae_decoder", spec, 8, 64, 64), spec, tmp_path / "timing.cache")
    (config,) = configs
    assert serialized == b"plan" and isinstance(config, polygraphy_trt.CreateConfig)
    builder_config = FakeBuilderConfig()
    config._configure_flags(None, None, builder_config)  # polygraphy 0.53's precision-flag step of CreateConfig
    assert builder_config.flags == ({"TF32"} if tf32 else set())


def test_fp16_conversion_keeps_float32_io_and_the_results(tmp_path: Path, ort_session) -> None:
    """An fp32 export built as an fp16 plan: converted by ONNX Runtime's float16 converter (weights in external
    data, as a full-size UNet's are), float32 inputs and outputs, nodes in an order onnx.checker (and TensorRT's
    parser) accepts, and outputs within float16 rounding of the float32 model's."""
    import onnx

    source = tiny_unet_onnx(tmp_path / "onnx" / "unet" / "model.onnx")
    model = onnx.load(str(source))
    for init in model.graph.initializer:  # the weights as raw bytes, which is what goes to external data
        if init.data_type == onnx.TensorProto.FLOAT:
            init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init), init.name))
    onnx.save(model, str(source), save_as_external_data=True, location="model.onnx_data", size_threshold=0)
    assert source.with_name("model.onnx_data").is_file() and trt_backend.float_dtype(source) == "float32"
    logs: list[str] = []
    half = trt_backend.fp16_onnx(source, tmp_path / "cache" / "fp16" / "unet", logs.append)
    assert trt_backend.float_dtype(half) == "float16" and len(logs) == 1
    assert trt_backend.fp16_onnx(source, tmp_path / "cache" / "fp16" / "unet", logs.append) == half and len(logs) == 1
    onnx.checker.check_model(str(half))
    session = ort_session(half)
    assert {i.type for i in session.get_inputs()} == {"tensor(float)"} == {o.type for o in session.get_outputs()}
    rng = np.random.default_rng(5)
    feed = {"sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32), "timestep": np.full(2, 500.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 8)).astype(np.float32)}
    got = session.run(None, feed)[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, tiny_reference(feed), rtol=2e-3, atol=2e-3)
    assert not np.array_equal(got, ort_session(source).run(None, feed)[0])  # really computed in float16


def test_build_engines_builds_the_models_the_folder_has(tmp_path: Path, monkeypatch) -> None:
    """SD folders have three models, SDXL ones also text_encoder_2 (profiled as the first text encoder: [e_∅; e_p]
    at 2N prompts); the geometry comes from the folder (`ModelSpec.engine_geometry`, not read by the engine)."""
    from basinguard.runtime.spec import ModelSpec

    folder = fake_folder(tmp_path / "model")
    built: list[tuple[str, list]] = []
    monkeypatch.setattr(trt_backend, "engine_env", lambda: ENV)
    monkeypatch.setattr(trt_backend, "_serialize", lambda onnx_path, role, profiles, spec, timing_cache: (
        built.append((role, [p.batch for p in profiles])) or b"plan", []))
    geometry = ModelSpec(folder).engine_geometry()
    assert (geometry.vae_factor, geometry.native, geometry.multiple, geometry.seq_len) == (8, (512, 512), 64, 77)
    spec = BuildSpec(batch=2, fp16=False)
    assert list(trt_backend.build_engines(folder, geometry, spec, log=lambda _: None)) == ["text_encoder", "unet", "vae_decoder"]
    tiny_unet_onnx(folder / "text_encoder_2" / "model.onnx")
    records = trt_backend.build_engines(folder, geometry, spec, log=lambda _: None)
    assert list(records) == ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]
    assert built == [("text_encoder", [(1, 4, 4)]), ("unet", [(1, 4, 4)]), ("vae_decoder", [(1, 2, 2)]),
                     ("text_encoder_2", [(1, 4, 4)])]  # the second run: the other three from the cache
    assert all(r.plan.parent == folder / "tensorrt" for r in records.values())


@pytest.mark.parametrize("stated", [None, 32])
def test_engine_geometry_profiles_the_length_the_runtime_pads_prompts_to(tmp_path: Path, stated: int | None) -> None:
    """The text encoders' TensorRT profile takes input_ids of the width the runtime's tokenizer gives them: the
    tokenizer's model_max_length, else the text encoder's max_position_embeddings (not CLIP's 77)."""
    import shutil

    from basinguard.cli import SHIPPED_MODEL
    from basinguard.runtime.spec import ModelSpec

    folder = fake_folder(tmp_path / "model")
    shutil.rmtree(folder / "tokenizer")
    shutil.copytree(SHIPPED_MODEL / "tokenizer", folder / "tokenizer")
    config = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())
    config.pop("model_max_length")
    if stated is not None:
        config["model_max_length"] = stated
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "text_encoder" / "config.json").write_text(json.dumps({"max_position_embeddings": 48}))
    padded = ModelSpec(folder).tokenizer.encode(["a photo"]).shape[1]
    assert padded == (48 if stated is None else stated)
    assert ModelSpec(folder).engine_geometry().seq_len == padded


# ---------------------------------------------------------------------------------------------- messages


@pytest.mark.parametrize("message", [
    "[defaultAllocator.cpp::allocate::19] Error Code 1: Cuda Runtime (out of memory)",
    "Requested amount of GPU memory (17179869184 bytes) could not be allocated. There may not be enough free memory",
    "Error Code 2: OutOfMemory (no further information)",
    "std::bad_alloc",
])
def test_out_of_memory_builds_say_so_and_suggest_a_smaller_profile(message: str) -> None:
    profiles = role_profiles("unet", BuildSpec(batch=4, max_image=(1024, 1024), image=(512, 512)), 8, 512, 64)
    err = build_failure("unet", ["some warning", message], profiles)
    assert "ran out of GPU memory" in str(err) and "--batch" in str(err) and "--max-image-size" in str(err)
    assert "batch 1..8" in str(err)


def test_other_build_failures_quote_tensorrt() -> None:
    err = build_failure("vae_decoder", ["a", "b", "c", "Unsupported operator XYZ"], [RoleProfile((1, 1, 1), None, 77)])
    assert "could not build the vae_decoder plan" in str(err) and "Unsupported operator XYZ" in str(err)
    assert "no error message" in str(build_failure("unet", [], []))


def test_choose_backend() -> None:
    assert choose_backend(None, None, ort_tensorrt=False) == "native"
    assert choose_backend(None, None, ort_tensorrt=True) == "native"
    assert choose_backend("tensorrt is not installed", None, ort_tensorrt=True) == "ort"
    assert choose_backend(None, "no valid TensorRT plan", ort_tensorrt=True) == "ort"
    with pytest.raises(EngineError) as err:
        choose_backend(f"tensorrt is not installed; {trt_backend.INSTALL_HINT}", None, ort_tensorrt=False)
    assert "basinguard[tensorrt-cu12]" in str(err.value) and "basinguard[tensorrt-cu13]" in str(err.value)
    assert "onnxruntime-gpu" in str(err.value) and "onnxruntime-gpu" in str(err.value)
    with pytest.raises(EngineError, match="build-engines"):
        choose_backend(None, "no valid TensorRT plan for unet; build them with `basinguard build-engines X`", False)


# ---------------------------------------------------------------------------------------------- selection


def _no_tensorrt_here() -> bool:
    import onnxruntime as ort

    return trt_backend.native_problem() is not None and "TensorrtExecutionProvider" not in ort.get_available_providers()


@pytest.mark.skipif(not _no_tensorrt_here(), reason="this machine has a TensorRT backend")
def test_provider_tensorrt_without_any_backend_names_what_to_install(tmp_path: Path) -> None:
    model = tiny_unet_onnx(tmp_path / "unet" / "model.onnx")
    with pytest.raises(EngineError) as err:
        load_model(model, "tensorrt")
    text = str(err.value)
    assert "basinguard[tensorrt-cu12]" in text and "onnxruntime-gpu" in text and "TensorrtExecutionProvider" in text


def test_selection_prefers_a_valid_native_plan_then_ort_tensorrt(tmp_path: Path, monkeypatch) -> None:
    """load_tensorrt's plumbing with the GPU-side classes recorded instead of run."""
    import onnxruntime as ort

    import basinguard.engine.ort as ort_backend

    folder = tmp_path / "model"
    model = tiny_unet_onnx(folder / "unet" / "model.onnx")
    made: list[tuple] = []
    monkeypatch.setattr(trt_backend, "native_problem", lambda: None)
    monkeypatch.setattr(trt_backend, "engine_env", lambda: ENV)
    monkeypatch.setattr(trt_backend, "TensorRTModel", lambda plan, name, cuda_graph: made.append(
        ("native", plan, cuda_graph)) or FakePlan(plan, name, cuda_graph, []))
    monkeypatch.setattr(ort_backend, "OrtModel", lambda path, provider, threads, trt_profile: made.append(
        ("ort", provider, trt_profile)))
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["TensorrtExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.delenv(plans.ENGINE_DIR_ENV, raising=False)
    cache = folder / "tensorrt"

    with pytest.warns(UserWarning, match="no valid TensorRT plan for unet"):
        load_model(model, "tensorrt")
    assert made[-1] == ("ort", "tensorrt", None)

    sha = onnx_digest(model)
    spec = BuildSpec(static=True)
    fields = key_fields("unet", sha, ENV, role_profiles("unet", spec, 8, 512, 64), {"fp16": True}, spec)
    profiles = [{"sample": [[1, 4, 64, 64]] * 3}, {"sample": [[2, 4, 64, 64]] * 3}]
    record = store_plan(cache, fields, b"plan", profiles, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(model, "tensorrt")
    assert made[-1] == ("native", record.plan, False)
    monkeypatch.setenv(trt_backend.CUDA_GRAPH_ENV, "1")
    load_model(model, "tensorrt")
    assert made[-1] == ("native", record.plan, True)

    monkeypatch.setattr(trt_backend, "engine_env", lambda: EngineEnv(ENV.tensorrt, "NVIDIA L4", "8.9"))
    with pytest.warns(UserWarning, match="NVIDIA L4"):  # a foreign plan is never loaded
        load_model(model, "tensorrt")
    assert made[-1] == ("ort", "tensorrt", {"sample": ((1, 4, 64, 64), (2, 4, 64, 64), (2, 4, 64, 64))})


def test_ort_provider_options(monkeypatch, tmp_path: Path) -> None:
    import onnxruntime as ort

    assert provider_list("cpu") == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(EngineError, match=r"needs CUDAExecutionProvider.*lacks.*basinguard\[gpu-cu12\]"):
            provider_list("cuda")
    with pytest.raises(EngineError, match="unknown provider"):
        provider_list("rocm")
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    name, cuda = provider_list("cuda")[0]
    assert name == "CUDAExecutionProvider" and cuda["cudnn_conv_algo_search"] == "HEURISTIC"
    (name, opts), (cuda_name, _), cpu = provider_list("tensorrt", tmp_path, fp16=False,
                                                      trt_profile={"sample": ((1, 4, 8, 8), (2, 4, 8, 8), (2, 4, 8, 8))})
    assert (name, cuda_name, cpu) == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert opts["trt_fp16_enable"] is False and opts["trt_engine_cache_path"] == str(tmp_path)
    assert opts["trt_profile_opt_shapes"] == "sample:2x4x8x8" and opts["trt_timing_cache_enable"] is True


def test_a_silent_fallback_to_cpu_is_an_error() -> None:
    check_active("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    check_active("cpu", ["CPUExecutionProvider"])
    with pytest.raises(EngineError, match="could not start CUDAExecutionProvider and fell back to CPU.*cuDNN"):
        check_active("cuda", ["CPUExecutionProvider"])
    with pytest.raises(EngineError, match="could not start TensorrtExecutionProvider.*TensorRT's libraries"):
        check_active("tensorrt", ["CUDAExecutionProvider", "CPUExecutionProvider"])


def _fake_cudart(driver: int, runtime: int) -> types.SimpleNamespace:
    """cuda-python's runtime module as it answers without a usable driver: cudaGetDevice fails with
    cudaErrorInsufficientDriver; cudaDriverGetVersion gives 0 when there is no driver at all."""

    class Error(enum.Enum):
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2
        cudaErrorInsufficientDriver = 35

    return types.SimpleNamespace(
        cudaError_t=Error, cudaGetDevice=lambda: (Error.cudaErrorInsufficientDriver, None),
        cudaGetErrorString=lambda err: (Error.cudaSuccess, b"CUDA driver version is insufficient for CUDA runtime version"),
        cudaDriverGetVersion=lambda: (Error.cudaSuccess, driver), cudaRuntimeGetVersion=lambda: (Error.cudaSuccess, runtime))


def test_insufficient_driver_tells_no_driver_from_an_old_one(monkeypatch) -> None:
    monkeypatch.setattr(cuda_module, "import_cudart", lambda: _fake_cudart(driver=0, runtime=13000))
    with pytest.raises(EngineError) as none:
        trt_backend.cuda_device()
    assert "cudaErrorInsufficientDriver" in str(none.value) and "no NVIDIA driver is installed" in str(none.value)
    assert "newer" not in str(none.value) and "too old" not in str(none.value)
    monkeypatch.setattr(cuda_module, "import_cudart", lambda: _fake_cudart(driver=12040, runtime=13000))
    with pytest.raises(EngineError, match=r"this NVIDIA driver supports CUDA up to 12\.4, the installed CUDA packages "
                                          r"are CUDA 13\.0: .*basinguard\[tensorrt-cu12\]"):
        trt_backend.cuda_device()


def test_polygraphy_cuda_errors_without_a_driver_say_so(monkeypatch) -> None:
    """polygraphy's own cudart calls report a missing driver as "CUDA Error: 35" (cudaErrorInsufficientDriver),
    e.g. when TrtRunner.activate() makes its stream: the model's error adds what it means here."""
    from polygraphy.exception import PolygraphyException

    monkeypatch.setattr(cuda_module, "import_cudart", lambda: _fake_cudart(driver=0, runtime=13000))
    model = object.__new__(trt_backend.TensorRTModel)
    model.name, model.plan_path, model._closed = "unet", Path("unet-abc.plan"), True

    def activate() -> None:
        raise PolygraphyException("CUDA Error: 35. To figure out what this means, refer to https://docs.nvidia.com/cuda")

    with pytest.raises(EngineError, match=r"unet: TensorRT failed on unet-abc.plan: CUDA Error: 35\..*; no NVIDIA driver"):
        model._call(activate)


def test_no_driver_here_is_named_as_such() -> None:
    """The real cuda-python on a machine without an NVIDIA driver: CUDA says cudaErrorInsufficientDriver, and the
    message must not send the user after a newer driver."""
    runtime = pytest.importorskip("cuda.bindings.runtime")
    if runtime.cudaDriverGetVersion()[1] != 0:
        pytest.skip("an NVIDIA driver is installed here")
    with pytest.raises(EngineError) as err:
        trt_backend.cuda_device()
    assert "cudaErrorInsufficientDriver" in str(err.value) and "no NVIDIA driver is installed" in str(err.value)
    assert "newer" not in str(err.value)


def _wheel_cudart(major: int) -> Path | None:
    """libcudart.so.<major> as pip's record of the nvidia-cuda-runtime wheel lists it (independent of the code's
    own search), or None when that wheel is not installed."""
    dist = {13: "nvidia-cuda-runtime", 12: "nvidia-cuda-runtime-cu12"}[major]
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    return next((Path(f.locate()).resolve() for f in files if f.name == f"libcudart.so.{major}"), None)


def test_polygraphy_loads_libcudart_from_the_cuda_13_wheel(tmp_path: Path) -> None:
    """tensorrt-cu13's CUDA runtime wheel puts libcudart.so.13 in nvidia/cu13/lib, where polygraphy 0.53 does not
    look (it then loads whatever "libcudart.so" the loader finds, or raises OSError without a CUDA toolkit).
    With a TensorRT cu13 install (its wheel's metadata, planted here), polygraphy's CUDA wrapper must load the
    wheel's library, and the process's LD_LIBRARY_PATH must be as before. Fresh processes: polygraphy loads the
    library once per process."""
    pytest.importorskip("polygraphy")
    wheel = _wheel_cudart(13)
    if wheel is None:
        pytest.skip("nvidia-cuda-runtime 13 is not installed (the test extra installs it)")
    assert wheel.parent.parts[-3:] == ("nvidia", "cu13", "lib")
    meta = tmp_path / "site" / "tensorrt_cu13_libs-10.13.3.9.dist-info"  # what pip leaves for tensorrt-cu13
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: tensorrt_cu13_libs\nVersion: 10.13.3.9\n")
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"), str(Path(trt_backend.__file__).parents[2])])

    def loaded(code: str) -> list[str]:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert run.returncode == 0 or "OSError" in run.stderr, run.stderr[-2000:]
        return run.stdout.split()

    report = ("import ctypes, os; v = ctypes.c_int(); h = w.handle; h.cudaRuntimeGetVersion(ctypes.byref(v)); "
              "print(os.path.realpath(h._name), v.value, os.environ.get('LD_LIBRARY_PATH', '-'))")
    alone = loaded("from polygraphy import cuda; w = cuda.wrapper(); " + report)
    assert not alone or Path(alone[0]) != wheel  # the cause: polygraphy's own search misses the cu13 wheel
    ours = loaded("import basinguard.engine.tensorrt as t; w = t.polygraphy_cuda(); " + report)
    assert ours == [str(wheel), ours[1], "-"] and ours[1].startswith("13")  # a CUDA 13.x runtime, LD_LIBRARY_PATH unset


def test_without_a_driver_the_runners_stream_fails_as_one_error(tmp_path: Path) -> None:
    """The real chain on a machine without an NVIDIA driver: polygraphy's wrapper on the cu13 wheel's libcudart
    makes the stream TrtRunner.activate() makes, CUDA refuses it (error 35), and the model's error says that there
    is no driver (cuda-python asked) rather than that it is too old."""
    pytest.importorskip("polygraphy")
    runtime = pytest.importorskip("cuda.bindings.runtime")
    if _wheel_cudart(13) is None:
        pytest.skip("nvidia-cuda-runtime 13 is not installed (the test extra installs it)")
    if runtime.cudaDriverGetVersion()[1] != 0:
        pytest.skip("an NVIDIA driver is installed here")
    meta = tmp_path / "site" / "tensorrt_cu13_libs-10.13.3.9.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: tensorrt_cu13_libs\nVersion: 10.13.3.9\n")
    code = ("import pathlib, basinguard.engine.tensorrt as t; from polygraphy import cuda\n"
            "m = object.__new__(t.TensorRTModel); m.name, m.plan_path, m._closed = 'unet', pathlib.Path('u.plan'), True\n"
            "m._call(t.polygraphy_cuda)\n"
            "try:\n    m._call(cuda.Stream)\nexcept t.EngineError as exc:\n    print(exc)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(Path(trt_backend.__file__).parents[2])])}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    message = run.stdout.splitlines()[-1]  # after polygraphy's own notices
    assert message.startswith("unet: TensorRT failed on u.plan: [!] CUDA Error: 35."), message
    assert message.count("CUDA Error: 35") == 1 and "no NVIDIA driver is installed" in message
    assert "too old" not in message


def test_a_missing_cuda_runtime_is_one_engine_error(monkeypatch) -> None:
    """polygraphy's last resort, ctypes.CDLL("libcudart.so"), raises OSError where no CUDA runtime is found."""
    pytest.importorskip("polygraphy")
    import polygraphy.cuda

    def no_cudart() -> None:
        raise OSError("libcudart.so: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(polygraphy.cuda, "wrapper", no_cudart)
    with pytest.raises(EngineError, match=r"cannot load the CUDA runtime library libcudart \(libcudart.so: cannot open.*"
                                          r"basinguard\[tensorrt-cu13\].*LD_LIBRARY_PATH"):
        trt_backend.polygraphy_cuda()
    model = object.__new__(trt_backend.TensorRTModel)
    model.name, model.plan_path, model._closed = "unet", Path("unet-abc.plan"), True
    with pytest.raises(EngineError, match=r"^unet: cannot load the CUDA runtime library libcudart"):
        model._call(no_cudart)  # raised from inside TrtRunner.activate(), as polygraphy makes its stream


def test_cuda_runtime_errors_are_engine_errors_without_a_gpu() -> None:
    pytest.importorskip("cuda.bindings.runtime")
    cuda = trt_backend.Cuda()
    try:
        cuda.device()
    except trt_backend.CudaError as exc:
        assert str(exc).startswith("CUDA cudaGetDevice failed: cudaError") and not exc.out_of_memory
    else:
        pytest.skip("a CUDA device is present")


def test_tensorrt_refusals_are_engine_errors() -> None:
    """Fakes behave as TensorRT's bindings do: set_optimization_profile_async raises RuntimeError for some refusals
    and returns False for others; set_input_shape returns False for a shape outside the profile.
    Neither is a traceback here. Stub objects: no TensorRT or GPU needed."""

    class Context:
        def __init__(self) -> None:
            self.memory: tuple = ()

        def set_device_memory(self, memory: int, size: int) -> None:
            self.memory = (memory, size)

        def set_optimization_profile_async(self, profile: int, stream: int) -> bool:
            if profile == 2:
                raise RuntimeError("Error in set optimization profile async: profile index out of range")
            return profile < 2  # TensorRT's other refusals: False

        def set_input_shape(self, name: str, shape: tuple) -> bool:
            return shape[0] <= 2

    class Engine:
        def create_execution_context(self, strategy: object) -> Context:
            return Context()

    runner = object.__new__(trt_backend._GraphRunner)  # the constructor allocates GPU memory
    runner.trt = type("trt", (), {"ExecutionContextAllocationStrategy": type("S", (), {"USER_MANAGED": 1})})
    runner.engine, runner.name, runner.contexts, runner.slots = Engine(), "unet", {}, {}
    runner.memory, runner.memory_size, runner.handle, runner.stream = 4096, 1 << 20, 7, None
    runner.inputs, runner.outputs = {}, {}
    runner.cuda = lambda what, result: result
    runner.cuda.rt = type("rt", (), {"cudaStreamSynchronize": staticmethod(lambda stream: None)})
    context = runner._context(1)
    assert context.memory == (4096, 1 << 20)  # every context on the one shared activation block
    with pytest.raises(EngineError, match="could not select optimization profile 2: Error in set optimization"):
        runner._context(2)
    with pytest.raises(EngineError, match="could not select optimization profile 3$"):
        runner._context(3)
    assert set(runner.contexts) == {1}
    with pytest.raises(EngineError, match=r"rejected shape \(4, 4\) for input 'sample'"):
        runner._slot(((4, 4),), {"sample": np.zeros((4, 4), np.float32)}, 1)


def test_polygraphy_failures_are_engine_errors() -> None:
    """TrtRunner's calls raise polygraphy's exception (G_LOGGER.critical) or TensorRT's RuntimeError; the model
    turns both into one EngineError naming the plan."""
    from polygraphy.exception import PolygraphyException

    model = object.__new__(trt_backend.TensorRTModel)
    model.name, model.plan_path = "unet", Path("unet-abc.plan")

    def fail(kind: type) -> None:
        raise kind("`execute_async_v3()` failed. Please see the logging output above for details.")

    for kind in (PolygraphyException, RuntimeError):
        with pytest.raises(EngineError, match=r"unet: TensorRT failed on unet-abc.plan: `execute_async_v3\(\)` failed"):
            model._call(fail, kind)
    model._closed = True


def test_tensorrt_model_switches_profiles_only_when_needed_and_owns_its_outputs() -> None:
    """TensorRTModel over a fake TrtRunner with polygraphy's calling conventions: set_profile(index), and infer()
    returning host arrays it reuses at the next call. A static plan with profiles at batch 2 and 4 (STP's N and
    2N): the profile is switched when the batch changes, not at every call; a returned array is not overwritten
    by the next call; a batch no profile holds is refused before TensorRT sees it."""

    class Runner:
        def __init__(self) -> None:
            self.profiles: list[int] = []
            self.buffer = np.zeros(0, np.float32)

        def set_profile(self, index: int) -> None:
            self.profiles.append(index)

        def infer(self, feed_dict: dict, check_inputs: bool = True) -> dict:
            self.buffer = np.resize(self.buffer, feed_dict["sample"].shape)
            np.multiply(feed_dict["sample"], 2, out=self.buffer)
            return {"out_sample": self.buffer}

    model = object.__new__(trt_backend.TensorRTModel)
    model.name, model.plan_path, model._graphs, model._closed, model._profile = "unet", Path("u.plan"), None, False, 0
    model._runner = runner = Runner()
    spec = TensorSpec("sample", np.dtype(np.float32), (None, 4))
    model.inputs, model.outputs = {"sample": spec}, {"out_sample": spec}
    model._profiles = [{"sample": ((2, 4), (2, 4), (2, 4))}, {"sample": ((4, 4), (4, 4), (4, 4))}]
    first = model.run({"sample": np.ones((2, 4), np.float32)})["out_sample"]
    model.run({"sample": np.ones((2, 4), np.float32)})
    guided = model.run({"sample": np.full((4, 4), 3.0, np.float32)})["out_sample"]
    model.run({"sample": np.ones((4, 4), np.float64)})  # cast to the plan's float32 on the way
    model.run({"sample": np.ones((2, 4), np.float32)})
    assert runner.profiles == [1, 0]  # profile 0 is active at start: switched at 2 -> 4 and back
    np.testing.assert_array_equal(first, np.full((2, 4), 2.0))
    np.testing.assert_array_equal(guided, np.full((4, 4), 6.0))
    with pytest.raises(EngineError, match=r"input shapes \(sample \(3, 4\)\) are outside the TensorRT plan's profiles"):
        model.run({"sample": np.ones((3, 4), np.float32)})
    assert runner.profiles == [1, 0]
    model._closed = True


def test_bf16_tensors_are_a_clear_error() -> None:
    """trt.nptype raises TypeError for bfloat16 (numpy has none): one EngineError naming the tensor."""

    class DataType:
        BF16 = "DataType.BF16"

    def nptype(dtype: str) -> type:
        if dtype == DataType.BF16:
            raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
        return np.float32

    class Engine:
        num_io_tensors = 1

        def get_tensor_name(self, i: int) -> str:
            return "sample"

        def get_tensor_dtype(self, name: str) -> str:
            return DataType.BF16

    trt = type("trt", (), {"nptype": staticmethod(nptype)})
    with pytest.raises(EngineError, match="tensor 'sample' is DataType.BF16, which numpy cannot hold"):
        trt_backend._io_specs(trt, Engine(), Path("unet.plan"))


# --------------------------------------------------------------------------------------------------- CLI


def test_parse_hw() -> None:
    assert parse_hw("512") == (512, 512) and parse_hw("512x768") == (512, 768)
    import argparse

    for bad in ("x", "512x", "0", "1x2x3"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_hw(bad)


def test_cli_build_engines_validates_then_names_the_missing_package(tmp_path: Path, capsys) -> None:
    folder = fake_folder(tmp_path / "model")
    assert cli_main(["build-engines", str(folder), "--image-size", "500"]) == 2
    assert "multiple of 64" in capsys.readouterr().err
    if trt_backend.native_problem() is None:
        pytest.skip("tensorrt is installed here")
    assert cli_main(["build-engines", str(folder), "--batch", "2", "--static"]) == 2
    assert "basinguard[tensorrt-cu12]" in capsys.readouterr().err
    assert not (folder / "tensorrt").exists()


def test_cli_export_tensorrt_fails_before_exporting(tmp_path: Path, capsys) -> None:
    pytest.importorskip("torch")
    if trt_backend.native_problem() is None:
        pytest.skip("tensorrt is installed here")
    assert cli_main(["export", str(tmp_path / "missing-src"), str(tmp_path / "out"), "--tensorrt"]) == 2
    assert "--tensorrt: tensorrt is not installed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ benchmark adapter (torch)


def test_sd_unet_matches_diffusers_and_sd15_size() -> None:
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    sys.path.insert(0, str(BENCH))
    from sd_unet import SD15_UNET_CONFIG, SD15_UNET_PARAMETERS, SDUNet

    config = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = SDUNet(config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # same names and shapes
    x, t, e = torch.randn(2, 4, 8, 12), torch.tensor([500.0, 20.0]), torch.randn(2, 7, 32)
    with torch.no_grad():
        assert torch.allclose(ref(x, t, e).sample, ours(x, t, e), atol=1e-4)
    with torch.device("meta"):
        assert sum(p.numel() for p in SDUNet(SD15_UNET_CONFIG).parameters()) == SD15_UNET_PARAMETERS


def test_gpu_check_runs_the_torch_path_on_cpu(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    sys.path.insert(0, str(BENCH))
    import gpu_check

    report = tmp_path / "report.json"
    rc = gpu_check.main(["--device", "cpu", "--tiny", "--unet", "own", "--skip-shipped", "--steps", "3",
                         "--work", str(tmp_path / "work"), "--json", str(report)])
    data = json.loads(report.read_text())
    assert rc == 0, data
    assert data["settings"]["batch"] == 4  # the default N: the UNet timed at N = 4 and 2N = 8
    runs = data["sections"]["sd"]["runs"]["torch eager"]
    assert set(gpu_check.POLICIES) <= set(runs)
    assert runs["stp"]["batch_n_steps"] > 0 and runs["cfg"]["batch_n_steps"] == 0
    assert all(runs[p]["finite"] and runs[p]["d2h_ms_per_call"] >= 0 for p in gpu_check.POLICIES)
    assert [c["ok"] for c in data["checks"]] == [True]  # torch eager vs ORT-CPU on the exported tiny UNet
    assert {s["what"] for s in data["skipped"]} >= {"ORT-CUDA", "TensorRT"}
    assert data["finished"] is True


def test_gpu_check_keeps_what_it_measured_when_stopped(tmp_path: Path, monkeypatch) -> None:
    """The report is written after every check, skip and section: a run killed by its time limit (here: a section
    that never returns) leaves its JSON, unfinished; a build that cannot finish in the time left is not started."""
    sys.path.insert(0, str(BENCH))
    import gpu_check

    def stopped_section(r, *args) -> dict:
        r.check("first check", np.ones(3), np.ones(3), "fp32")
        raise KeyboardInterrupt  # as the shell's timeout stops the process: nothing after this runs

    monkeypatch.setattr(gpu_check, "sd_section", stopped_section)
    monkeypatch.setattr(gpu_check, "environment", lambda r, device: {"can_torch": True})
    report = tmp_path / "report.json"
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--device", "cpu", "--skip-shipped", "--json", str(report), "--work", str(tmp_path / "w")])
    data = json.loads(report.read_text())
    assert data["finished"] is False and [c["what"] for c in data["checks"]] == ["first check"]
    assert data["environment"] == {"can_torch": True}
    r = gpu_check.Report(budget_s=60, json_path=report)
    assert not r.afford("TensorRT build (UNet)", gpu_check.BUILD_S["sd15"])
    assert "needs ~420 s" in json.loads(report.read_text())["skipped"][0]["why"]


FAKE_PYTHON = """#!/usr/bin/env bash
# A stand-in interpreter for gpu_check.sh: numpy, onnxruntime and tokenizers import, diffusers and onnx do not; pip
# takes a second and fails; gpu_check.py only records its arguments. Every call is logged with its start time.
echo "$(date +%s.%N) $*" >> "$FAKE_LOG"
case "$*" in
  "-c import numpy"|"-c import onnxruntime"|"-c import tokenizers") exit 0 ;;
  "-c import "*) exit 1 ;;
  "-m pip install"*) sleep 1; exit 1 ;;
  *) exit 0 ;;
esac
"""


@pytest.mark.parametrize("budget", [124, 200])
def test_gpu_check_sh_counts_its_pip_attempts_in_its_budget(tmp_path: Path, budget: int) -> None:
    """gpu_check.sh's whole run fits its budget: pip attempts are made only with time to spare (none when only
    gpu_check.py's share is left) and what they take comes off the budget gpu_check.py is given."""
    if shutil.which("timeout") is None:
        pytest.skip("needs coreutils' timeout")
    fake, log = tmp_path / "python", tmp_path / "calls.log"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "FAKE_LOG": str(log), "GPU_CHECK_BUDGET_S": str(budget),
           "PATH": os.environ.get("PATH", "")}
    run = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    calls = [line.split(" ", 1) for line in log.read_text().splitlines()]
    pips = [args for _, args in calls if args.startswith("-m pip install")]
    (check,) = [(float(t), args.split()) for t, args in calls if "gpu_check.py" in args]
    given = float(check[1][check[1].index("--budget-s") + 1])
    taken = check[0] - float(calls[0][0])  # what the shell spent before starting gpu_check.py (pip, mostly)
    if budget == 124:
        assert pips == [] and "no time left" in run.stderr
    else:
        assert len(pips) == 2  # diffusers and onnx
    assert given <= budget - 30 - int(taken)  # 10 s for the hard timeout, 20 s between it and the soft stop


# ---------------------------------------------------------------------------------------- GPU (TensorRT)


def _gpu_ready() -> bool:
    if trt_backend.native_problem() is not None:
        return False
    try:
        trt_backend.engine_env()
    except EngineError:
        return False
    return True


gpu = pytest.mark.skipif(not _gpu_ready(), reason="needs tensorrt, polygraphy, cuda-python and a CUDA device")


@gpu
def test_dynamic_plan_runs_batch_n_and_2n_and_matches_ort(tmp_path: Path, ort_session) -> None:
    model = tiny_unet_onnx(tmp_path / "onnx" / "unet" / "model.onnx")
    spec = BuildSpec(batch=2, image=(64, 64), min_image=(64, 64), max_image=(128, 128), fp16=False)
    profiles = role_profiles("unet", spec, 8, 64, 64)
    record = trt_backend.build_plan(model, "unet", profiles, spec, tmp_path / "cache")
    logs: list[str] = []
    assert trt_backend.build_plan(model, "unet", profiles, spec, tmp_path / "cache", log=logs.append).plan == record.plan
    assert "cached plan" in logs[0]
    m = trt_backend.TensorRTModel(record.plan, "unet")
    session = ort_session(model)
    rng = np.random.default_rng(0)
    for batch, hw in ((2, 8), (4, 8), (2, 16), (4, 8)):
        feed = {"sample": rng.standard_normal((batch, 4, hw, hw)).astype(np.float32),
                "timestep": np.full(batch, 500.0, np.float32),
                "encoder_hidden_states": rng.standard_normal((batch, 77, 8)).astype(np.float32)}
        got = m.run(feed)["out_sample"]
        np.testing.assert_allclose(got, session.run(None, feed)[0], atol=1e-3)
        np.testing.assert_allclose(got, tiny_reference(feed), atol=1e-3)
    with pytest.raises(EngineError, match="outside the TensorRT plan's profiles"):
        m.run({"sample": np.zeros((5, 4, 8, 8), np.float32), "timestep": np.zeros(5, np.float32),
               "encoder_hidden_states": np.zeros((5, 77, 8), np.float32)})
    m.close()


@gpu
def test_static_plan_with_cuda_graphs(tmp_path: Path) -> None:
    model = tiny_unet_onnx(tmp_path / "onnx" / "unet" / "model.onnx")
    spec = BuildSpec(batch=1, image=(64, 64), static=True)
    record = trt_backend.build_plan(model, "unet", role_profiles("unet", spec, 8, 64, 64), spec, tmp_path / "cache")
    with pytest.raises(EngineError, match="static plan"):
        dynamic = BuildSpec(batch=1, image=(64, 64))
        plan = trt_backend.build_plan(model, "unet", role_profiles("unet", dynamic, 8, 64, 64), dynamic, tmp_path / "cache")
        trt_backend.TensorRTModel(plan.plan, "unet", cuda_graph=True)
    m = trt_backend.TensorRTModel(record.plan, "unet", cuda_graph=True)
    rng = np.random.default_rng(1)
    for _ in range(3):  # first run per batch size plain, then captured, then replayed
        for batch in (1, 2):
            feed = {"sample": rng.standard_normal((batch, 4, 8, 8)).astype(np.float32),
                    "timestep": np.full(batch, 10.0, np.float32),
                    "encoder_hidden_states": rng.standard_normal((batch, 77, 8)).astype(np.float32)}
            np.testing.assert_allclose(m.run(feed)["out_sample"], tiny_reference(feed), atol=1e-2)
    assert m._graphs is not None and all(slot.graph_exec is not None for slot in m._graphs.slots.values())
    m.close()
