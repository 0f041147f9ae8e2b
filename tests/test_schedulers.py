"""Parity of basinguard.runtime.schedulers with diffusers' schedulers (torch CPU, float32 steps).

Every parity case runs a whole trajectory: the same initial latents, and at each step the same random "model
output" fed to both; timesteps must be identical, and ``scale_model_input`` and ``step`` results must agree to
1e-5 of the reference's max abs value at every step.
"""

from __future__ import annotations

import ast
import inspect
from typing import Any

import numpy as np
import pytest

from basinguard.runtime import schedulers
from basinguard.runtime.schedulers import SCHEDULERS, make_scheduler, scheduler_name_for_config

# Stable Diffusion 1.5's scheduler_config.json, verbatim.
SD15: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
DIFFUSERS_CLASS = {
    "ddim": "DDIMScheduler",
    "dpm++2m": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "pndm": "PNDMScheduler",
}
NAMES = sorted(SCHEDULERS)
SPACINGS = ("leading", "trailing", "linspace")
STEPS = (1, 2, 10, 50)
SHAPE = (2, 4, 8, 8)  # a batch of two, to cover N > 1
RTOL = 1e-5
# diffusers 0.36 calls np.array(tensor, copy=False) paths that numpy 2 flags; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _reference(name: str, config: dict[str, Any], n: int) -> Any:
    """diffusers' scheduler for ``name`` after ``set_timesteps(n)``, built with ``from_config(config)``."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.set_num_threads(1)
    diffusers.utils.logging.set_verbosity_error()  # from_config warns about keys meant for other classes
    ref = getattr(diffusers, DIFFUSERS_CLASS[name]).from_config(config)
    ref.set_timesteps(n)
    if name == "euler" and float(ref.timesteps[0]) == 0.0:
        # A one-step Euler schedule that starts at t = 0 ("linspace", or "leading" without steps_offset) lives
        # entirely at sigma(0) ~ 0.03, and diffusers' float32 cumprod gets sigma(0) wrong by 1.3e-5 (SD betas) up
        # to 2.6e-4 (cosine), relative. That table error, not the step, would break 1e-5, so for this case only
        # the reference accumulates diffusers' own (float32) betas in float64 before set_timesteps; Euler reads
        # nothing else derived from the cumprod, and its step arithmetic stays torch float32.
        ref.alphas_cumprod = torch.cumprod(1.0 - ref.betas.double(), dim=0)
        ref.set_timesteps(n)
    return ref


def _assert_close(ours: np.ndarray, ref: Any, what: str) -> None:
    r = ref.double().numpy()
    err = np.abs(ours.astype(np.float64) - r).max() / np.abs(r).max()
    assert err <= RTOL, f"{what}: max relative difference {err:.3g} > {RTOL}"


def _assert_parity(name: str, config: dict[str, Any], n: int, seed: int = 0) -> None:
    import torch

    ref = _reference(name, config, n)
    ours = make_scheduler(config, n, name)

    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    assert ours.timesteps.dtype == ref.timesteps.numpy().dtype
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-5)

    rng = np.random.default_rng(seed)
    x_ref = torch.from_numpy(rng.standard_normal(SHAPE, dtype=np.float32)) * ref.init_noise_sigma
    x_ours = x_ref.numpy().copy()  # identical start, so every difference below comes from the steps
    for i, t in enumerate(ref.timesteps):
        eps = rng.standard_normal(SHAPE, dtype=np.float32)
        _assert_close(ours.scale_model_input(x_ours, i), ref.scale_model_input(x_ref, t), f"scale_model_input {i}")
        x_ref = ref.step(torch.from_numpy(eps), t, x_ref).prev_sample
        x_ours = ours.step(eps, i, x_ours)
        assert x_ours.dtype == np.float32 and x_ours.shape == SHAPE
        _assert_close(x_ours, x_ref, f"step {i} (t={float(t)})")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", NAMES)
def test_parity_sd15(name: str, spacing: str, n: int, prediction_type: str) -> None:
    _assert_parity(name, {**SD15, "timestep_spacing": spacing, "prediction_type": prediction_type}, n)


_SD_BETAS = (np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2).tolist()
VARIANTS: dict[str, dict[str, Any]] = {
    "steps_offset_0": {"steps_offset": 0},
    "linear": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
    "trained_betas": {"trained_betas": _SD_BETAS, "beta_schedule": "linear"},
    "clip_sample": {"clip_sample": True, "clip_sample_range": 1.5},  # DDIM only; others ignore it
    "set_alpha_to_one": {"set_alpha_to_one": True},  # DDIM and PNDM
}


@pytest.mark.parametrize("n", (1, 10, 50))
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity_config_variants(variant: str, name: str, spacing: str, n: int) -> None:
    _assert_parity(name, {**SD15, **VARIANTS[variant], "timestep_spacing": spacing}, n)


@pytest.mark.parametrize("n", (1, 10, 50))
def test_parity_ddim_clip_with_v_prediction(n: int) -> None:
    # The one DDIM path where the clipped x0 and a sample-dependent ε̂ (v-prediction) meet.
    _assert_parity("ddim", {**SD15, "clip_sample": True, "prediction_type": "v_prediction"}, n)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("name", NAMES)
def test_parity_class_defaults(name: str, n: int) -> None:
    # No spacing/offset/clip keys: each class falls back to its own defaults (DDIM clips, spacings differ).
    config = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "skip_prk_steps": True}
    _assert_parity(name, config, n)


@pytest.mark.parametrize("n", (1, 2, 10, 14, 15, 50))
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_parity_dpm_lower_order_final(lower_order_final: bool, final_sigmas_type: str, spacing: str, n: int) -> None:
    config = {**SD15, "timestep_spacing": spacing, "lower_order_final": lower_order_final}
    _assert_parity("dpm++2m", {**config, "final_sigmas_type": final_sigmas_type}, n)


@pytest.mark.parametrize("n", (10, 50))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_parity_dpm_euler_at_final(prediction_type: str, n: int) -> None:
    config = {**SD15, "euler_at_final": True, "final_sigmas_type": "sigma_min", "prediction_type": prediction_type}
    _assert_parity("dpm++2m", config, n)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_parity_euler_final_sigma_min(spacing: str, n: int) -> None:
    _assert_parity("euler", {**SD15, "timestep_spacing": spacing, "final_sigmas_type": "sigma_min"}, n)


def _trajectory(config: dict[str, Any], name: str, n: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    sched = make_scheduler(config, n, name)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(sched.init_noise_sigma)
    for i in range(len(sched.timesteps)):
        x = sched.step(rng.standard_normal(shape, dtype=np.float32), i, sched.scale_model_input(x, i))
    return x


def test_dpm_lower_order_final_only_matters_with_sigma_min() -> None:
    # diffusers forces a first-order last step whenever final_sigmas_type == "zero", so for 2M the flag is a no-op
    # there; with "sigma_min" and fewer than 15 steps it decides the order of the last step.
    def run(final: str, lof: bool) -> np.ndarray:
        return _trajectory({**SD15, "final_sigmas_type": final, "lower_order_final": lof}, "dpm++2m", 10)

    np.testing.assert_array_equal(run("zero", True), run("zero", False))
    assert not np.allclose(run("sigma_min", True), run("sigma_min", False))


@pytest.mark.parametrize("n", (1, 2, 3, 7, 25, 333, 999, 1000))
@pytest.mark.parametrize("steps_offset", (0, 1))
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", NAMES)
def test_timesteps_match(name: str, spacing: str, steps_offset: int, n: int) -> None:
    config = {**SD15, "timestep_spacing": spacing, "steps_offset": steps_offset}
    ref = _reference(name, config, n)
    ts = ref.timesteps.numpy()
    clamped = np.minimum(ts, 999)  # DPM++ and Euler look sigmas up with np.interp, which clamps
    if (name in ("ddim", "pndm") and ts.max() >= 1000) or (name == "dpm++2m" and np.any(np.diff(clamped) >= 0)):
        # "leading" + steps_offset=1 at n=1000 puts t=1000 past diffusers' own alphas_cumprod (its step would
        # IndexError); DPM++'s leading layout repeats a sigma at n=999 (offset 1) and n=1000 (stride 1000 // 1001
        # = 0), where its second-order update divides by zero. We refuse these up front.
        with pytest.raises(ValueError, match="timestep"):
            make_scheduler(config, n, name)
        return
    ours = make_scheduler(config, n, name)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    assert ours.timesteps.dtype == ref.timesteps.numpy().dtype
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_batch_rows_are_independent(name: str) -> None:
    config = {**SD15, "prediction_type": "v_prediction"}
    both = _trajectory(config, name, 10, (2, 4, 4, 4))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 4, 4), dtype=np.float32)
    sched = make_scheduler(config, 10, name)
    x = x * np.float32(sched.init_noise_sigma)
    rows = [x[k : k + 1] for k in range(2)]
    scheds = [make_scheduler(config, 10, name) for _ in range(2)]
    for i in range(len(sched.timesteps)):
        eps = rng.standard_normal((2, 4, 4, 4), dtype=np.float32)
        rows = [
            s.step(eps[k : k + 1], i, s.scale_model_input(r, i))
            for k, (s, r) in enumerate(zip(scheds, rows, strict=True))
        ]
    np.testing.assert_array_equal(both, np.concatenate(rows))


@pytest.mark.parametrize("name", NAMES)
def test_float64_in_float64_out(name: str) -> None:
    sched = make_scheduler(SD15, 5, name)
    x = np.ones((1, 4, 2, 2))
    assert sched.scale_model_input(x, 0).dtype == np.float64
    assert sched.step(x, 0, x).dtype == np.float64


# ----------------------------------------------------------------------------------------------- factory & errors


def test_name_for_config() -> None:
    for key, cls_name in DIFFUSERS_CLASS.items():
        assert scheduler_name_for_config({**SD15, "_class_name": cls_name}) == key
        assert type(make_scheduler({**SD15, "_class_name": cls_name}, 10)) is SCHEDULERS[key]
    with pytest.raises(ValueError, match="LMSDiscreteScheduler"):
        scheduler_name_for_config({**SD15, "_class_name": "LMSDiscreteScheduler"})
    with pytest.raises(ValueError, match="None"):
        scheduler_name_for_config({})


def test_make_scheduler_by_name_overrides_class() -> None:
    assert type(make_scheduler(SD15, 10)).__name__ == "PNDMScheduler"
    assert type(make_scheduler(SD15, 10, "euler")).__name__ == "EulerDiscreteScheduler"


def test_pndm_by_name_from_another_class_means_sd_plms() -> None:
    # A DDIM config has no skip_prk_steps; "pndm" by name runs PLMS as SD's own PNDM config (skip_prk_steps=True).
    ddim = {k: v for k, v in SD15.items() if k != "skip_prk_steps"} | {"_class_name": "DDIMScheduler"}
    switched = make_scheduler(ddim, 10, "pndm")
    own = make_scheduler({**ddim, "_class_name": "PNDMScheduler", "skip_prk_steps": True}, 10)
    np.testing.assert_array_equal(switched.timesteps, own.timesteps)
    x = np.ones((1, 4, 2, 2), np.float32)
    np.testing.assert_array_equal(switched.step(x, 0, x), own.step(x, 0, x))
    with pytest.raises(ValueError, match="skip_prk_steps=False"):  # a PNDM config asking for PRK is still refused
        make_scheduler({**ddim, "_class_name": "PNDMScheduler", "skip_prk_steps": False}, 10, "pndm")


def test_unknown_name_lists_allowed() -> None:
    with pytest.raises(ValueError, match=r"'lms'.*'ddim', 'dpm\+\+2m', 'euler', 'pndm'"):
        make_scheduler(SD15, 10, "lms")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", (0, -1, 1001))
def test_steps_out_of_range(name: str, n: int) -> None:
    with pytest.raises(ValueError, match=r"\[1, 1000\]"):
        make_scheduler(SD15, n, name)


def test_steps_range_follows_num_train_timesteps() -> None:
    config = {**SD15, "num_train_timesteps": 500, "steps_offset": 0}
    assert make_scheduler(config, 500, "ddim").timesteps[0] == 499
    with pytest.raises(ValueError, match=r"\[1, 500\]"):
        make_scheduler(config, 501, "ddim")
    with pytest.raises(ValueError, match="integer"):
        make_scheduler(SD15, 2.5, "ddim")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "key", "value"),
    [
        ("ddim", "thresholding", True),
        ("ddim", "prediction_type", "sample"),
        ("ddim", "rescale_betas_zero_snr", True),
        ("dpm++2m", "algorithm_type", "sde-dpmsolver++"),
        ("dpm++2m", "solver_order", 3),
        ("dpm++2m", "solver_type", "heun"),
        ("dpm++2m", "use_karras_sigmas", True),
        ("dpm++2m", "lambda_min_clipped", -5.1),
        ("dpm++2m", "final_sigmas_type", "denoise_to_zero"),
        ("euler", "use_karras_sigmas", True),
        ("euler", "interpolation_type", "log_linear"),
        ("euler", "timestep_type", "continuous"),
        ("pndm", "skip_prk_steps", False),
        ("pndm", "beta_schedule", "exponential"),
        ("euler", "timestep_spacing", "random"),
    ],
)
def test_unsupported_options_are_named(name: str, key: str, value: Any) -> None:
    with pytest.raises(ValueError, match=key if key != "beta_schedule" else "exponential"):
        make_scheduler({**SD15, key: value}, 10, name)


def test_options_of_other_classes_are_ignored() -> None:
    # from_config semantics: DDIM's thresholding means nothing to Euler, PNDM's skip_prk_steps nothing to DDIM.
    make_scheduler({**SD15, "thresholding": True, "rescale_betas_zero_snr": True}, 10, "pndm")
    make_scheduler({**SD15, "thresholding": True, "skip_prk_steps": False}, 10, "euler")


@pytest.mark.parametrize("name", ["dpm++2m", "pndm"])
def test_multistep_out_of_order_raises(name: str) -> None:
    x = np.zeros((1, 4, 2, 2), dtype=np.float32)
    with pytest.raises(RuntimeError, match="expected 0"):
        make_scheduler(SD15, 10, name).step(x, 1, x)
    sched = make_scheduler(SD15, 10, name)
    sched.step(x, 0, x)
    with pytest.raises(RuntimeError, match="expected 1"):
        sched.step(x, 0, x)


def test_runtime_module_imports_only_numpy_and_stdlib() -> None:
    tree = ast.parse(inspect.getsource(schedulers))
    roots = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    roots |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert roots <= {"__future__", "collections", "math", "numbers", "numpy", "typing"}, roots
