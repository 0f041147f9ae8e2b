"""Parity of basinguard.runtime.schedulers with diffusers' schedulers (torch CPU, float32 steps).

Every parity case runs a whole trajectory: the same initial latents, and at each step the same random "model
output" fed to both; timesteps must be identical, and ``scale_model_input`` and ``step`` results must agree to
1e-5 of the reference's max abs value at every step. Euler ancestral gets the noise our per-image generators
draw: diffusers' ``randn_tensor`` is patched to return the draws of twin generators seeded alike.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from basinguard.runtime import schedulers
from basinguard.runtime.schedulers import (
    SCHEDULERS,
    InvalidConfig,
    check_config,
    make_scheduler,
    scheduler_name_for_config,
    step_noise,
)

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
    "dpm++2m-karras": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-karras": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
    "unipc-karras": "UniPCMultistepScheduler",
}
ALL_NAMES = sorted(SCHEDULERS)
# The wide cross products below cover the four first schedulers; the samplers added with Karras sigmas, Euler
# ancestral and UniPC have their own, narrower ones (test_parity_new_samplers), to keep the suite's time down.
NAMES = ["ddim", "dpm++2m", "euler", "pndm"]
NEW_NAMES = ["dpm++2m-karras", "euler-karras", "euler-a", "unipc", "unipc-karras"]
NOISE_SEEDS = (11, 12)  # euler-a: image k's step noise from step_noise([NOISE_SEEDS[k]])
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
    karras = {"use_karras_sigmas": name.endswith("-karras")} if name not in ("ddim", "pndm", "euler-a") else {}
    ref = getattr(diffusers, DIFFUSERS_CLASS[name]).from_config({**config, **karras})
    ref.set_timesteps(n)
    if name == "euler" and float(ref.timesteps[0]) == 0.0:
        # A one-step Euler schedule that starts at t = 0 ("linspace", or "leading" without steps_offset) lives
        # entirely at sigma(0) ~ 0.03, and diffusers' float32 cumprod gets sigma(0) wrong by 1.3e-5 (SD betas) up
        # to 2.6e-4 (cosine), relative. That table error, not the step, would break 1e-5, so for this case only
        # the reference accumulates diffusers' own (float32) betas in float64 before set_timesteps; Euler reads
        # nothing else derived from the cumprod, and its step arithmetic stays torch float32.
        ref.alphas_cumprod = torch.cumprod(1.0 - ref.betas.double(), dim=0)
        ref.set_timesteps(n)
    elif name in NEW_NAMES:
        # The same, always, for the samplers added later: Karras schedules end at the table's first sigma (~0.01
        # for linear betas, where float32 1 - ᾱ keeps 3 digits), and on the cosine schedule start at its last
        # (ᾱ ~ 1e-9 after betas capped at 0.999, whose float32 rounding alone moves ᾱ by 1e-4); diffusers' float32
        # table is off there by more than 1e-5. Cosine betas are GLIDE's formula, computed here in float64.
        betas = ref.betas.double()
        if config.get("beta_schedule") == "squaredcos_cap_v2":
            def alpha_bar(t: float) -> float:
                return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = torch.tensor([min(1 - alpha_bar((i + 1) / 1000) / alpha_bar(i / 1000), 0.999) for i in range(1000)],
                                 dtype=torch.float64)
        ref.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        ref.set_timesteps(n)
    return ref


def _assert_close(ours: np.ndarray, ref: Any, what: str) -> None:
    r = ref.double().numpy()
    err = np.abs(ours.astype(np.float64) - r).max() / np.abs(r).max()
    assert err <= RTOL, f"{what}: max relative difference {err:.3g} > {RTOL}"


def _assert_parity(name: str, config: dict[str, Any], n: int, seed: int = 0) -> None:
    import torch

    ref = _reference(name, config, n)
    ours = make_scheduler(config, n, name, noise=step_noise(NOISE_SEEDS, None))
    if name == "euler-a":  # diffusers gets the draws of twin generators (same seeds, same order: one per step)
        from diffusers.schedulers import scheduling_euler_ancestral_discrete as ancestral

        twins = step_noise(NOISE_SEEDS, None)
        mp = pytest.MonkeyPatch()
        mp.setattr(ancestral, "randn_tensor", lambda shape, **_: torch.from_numpy(
            np.stack([g.standard_normal(shape[1:], dtype=np.float32) for g in twins])))
    try:
        _compare_trajectories(name, ref, ours, seed)
    finally:
        if name == "euler-a":
            mp.undo()


def _compare_trajectories(name: str, ref: Any, ours: Any, seed: int) -> None:
    import torch

    if name == "euler-karras":
        # Fractional timesteps mapped from the Karras sigmas through the log-sigma table: ours is float64, diffusers'
        # float32, so they agree to ~1e-3 timestep units (the UNet input), not bit for bit; the sigmas, which the
        # step uses, are compared through the trajectory below.
        np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=0, atol=5e-3)
    else:
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
    sched = make_scheduler(config, n, name, noise=step_noise(range(shape[0]), None))
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


@pytest.mark.parametrize("name", ALL_NAMES)
def test_batch_rows_are_independent(name: str) -> None:
    # Row k of a batch is what it is alone; for euler-a with its own noise generator (seed k), whatever its row.
    config = {**SD15, "prediction_type": "v_prediction"}
    both = _trajectory(config, name, 10, (2, 4, 4, 4))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 4, 4), dtype=np.float32)
    sched = make_scheduler(config, 10, name)
    x = x * np.float32(sched.init_noise_sigma)
    rows = [x[k : k + 1] for k in range(2)]
    scheds = [make_scheduler(config, 10, name, noise=step_noise([k], None)) for k in range(2)]
    for i in range(len(sched.timesteps)):
        eps = rng.standard_normal((2, 4, 4, 4), dtype=np.float32)
        rows = [
            s.step(eps[k : k + 1], i, s.scale_model_input(r, i))
            for k, (s, r) in enumerate(zip(scheds, rows, strict=True))
        ]
    np.testing.assert_array_equal(both, np.concatenate(rows))


@pytest.mark.parametrize("name", ALL_NAMES)
def test_float64_in_float64_out(name: str) -> None:
    sched = make_scheduler(SD15, 5, name, noise=step_noise([0], None))
    x = np.ones((1, 4, 2, 2))
    assert sched.scale_model_input(x, 0).dtype == np.float64
    assert sched.step(x, 0, x).dtype == np.float64


# ----------------------------------------------------------------------------------------------- factory & errors


def test_name_for_config() -> None:
    for key, cls_name in DIFFUSERS_CLASS.items():
        # a folder's config that sets use_karras_sigmas runs (and is named) as the -karras sampler by default
        config = {**SD15, "_class_name": cls_name, "use_karras_sigmas": key.endswith("-karras")}
        assert scheduler_name_for_config(config) == key
        assert type(make_scheduler(config, 10)) is SCHEDULERS[key]
    karras_dpm = {**SD15, "_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}
    plain = make_scheduler({**karras_dpm, "use_karras_sigmas": False}, 10, "dpm++2m")
    # by name: the name decides, so "dpm++2m" on a Karras config runs without them, as its trace will say
    np.testing.assert_array_equal(make_scheduler(karras_dpm, 10, "dpm++2m").timesteps, plain.timesteps)
    assert not np.array_equal(make_scheduler(karras_dpm, 10).timesteps, plain.timesteps)
    # Euler ancestral has no Karras option in diffusers: the flag is ignored there, as from_config ignores it
    ancestral = {**SD15, "_class_name": "EulerAncestralDiscreteScheduler", "use_karras_sigmas": True}
    assert scheduler_name_for_config(ancestral) == "euler-a"
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
    with pytest.raises(ValueError, match=r"'lms'.*'ddim', 'dpm\+\+2m', 'dpm\+\+2m-karras', 'euler', 'euler-a'"):
        make_scheduler(SD15, 10, "lms")


# The step counts SD 1.5's config with "leading" spacing and steps_offset 1 runs, worked out by hand: DDIM and PNDM visit timestep
# (n - 1) * (1000 // n) + 1, which is 1000 only at n = 1000; DPM-Solver++ and UniPC lay out n + 1 points with
# stride 1000 // (n + 1), so at n = 999 two timesteps (1000 and 999) share the top sigma; Euler clamps (all run).
STEP_RANGE = {"ddim": 999, "pndm": 999, "dpm++2m": 998, "unipc": 998, "euler": 1000, "euler-a": 1000}


@pytest.mark.parametrize("name", sorted(STEP_RANGE))
def test_steps_out_of_range_states_the_real_range(name: str) -> None:
    top, config = STEP_RANGE[name], {**SD15, "timestep_spacing": "leading"}
    for n in (0, -1, top + 1, 1001):
        with pytest.raises(ValueError, match=rf"steps \(--steps\) must be in \[1, {top}\]") as info:
            make_scheduler(config, n, name)
        assert "steps_offset=0" not in str(info.value)  # no advice to edit a config through a flag that is not one
    make_scheduler(config, top, name)


def test_steps_holes_name_the_neighbours() -> None:
    # steps_offset 5: 500 steps visit (499 * 2) + 5 = 1003, while 498 and 501 stay inside [0, 999]
    config = {**SD15, "steps_offset": 5}
    with pytest.raises(ValueError, match=r"500 does not run.*timestep 1003.*498 or 501 steps do"):
        make_scheduler(config, 500, "ddim")
    with pytest.raises(ValueError, match=r"\[1, 995\]"):
        make_scheduler(config, 1000, "ddim")


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
        ("dpm++2m", "lambda_min_clipped", -5.1),
        ("dpm++2m", "final_sigmas_type", "denoise_to_zero"),
        ("unipc", "solver_order", 3),
        ("unipc", "solver_type", "bh1"),
        ("unipc", "predict_x0", False),
        ("unipc", "disable_corrector", [0]),
        ("euler-a", "rescale_betas_zero_snr", True),
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
    # Ignored means: the same schedule and the same step as without them, while the class that reads them refuses.
    x = np.random.default_rng(0).standard_normal((1, 4, 2, 2)).astype(np.float32)
    for extra, name, reader in (({"thresholding": True, "rescale_betas_zero_snr": True}, "pndm", "ddim"),
                                ({"thresholding": True, "skip_prk_steps": False}, "euler", "ddim")):
        given, plain = make_scheduler({**SD15, **extra}, 10, name), make_scheduler(SD15, 10, name)
        np.testing.assert_array_equal(given.timesteps, plain.timesteps)
        np.testing.assert_array_equal(given.step(x, 0, x), plain.step(x, 0, x))
        with pytest.raises(ValueError, match="thresholding=True is not supported"):
            make_scheduler({**SD15, **extra}, 10, reader)


@pytest.mark.parametrize("name", ["dpm++2m", "pndm", "unipc", "euler-a"])
def test_multistep_out_of_order_raises(name: str) -> None:
    x = np.zeros((1, 4, 2, 2), dtype=np.float32)
    with pytest.raises(RuntimeError, match="expected 0"):
        make_scheduler(SD15, 10, name, noise=step_noise([0], None)).step(x, 1, x)
    sched = make_scheduler(SD15, 10, name, noise=step_noise([0], None))
    sched.step(x, 0, x)
    with pytest.raises(RuntimeError, match="expected 1"):
        sched.step(x, 0, x)


def test_runtime_module_imports_only_numpy_and_stdlib() -> None:
    """Every module of the schedulers package: numpy, the standard library and the package's own modules."""
    for path in sorted(Path(schedulers.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        names = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
        names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        outside = {name.split(".")[0] for name in names if not name.startswith("basinguard.runtime.schedulers")}
        assert outside <= {"__future__", "collections", "hashlib", "math", "numbers", "numpy", "typing"}, (path, outside)


# ----------------------------------------------------------------------------------------------- new samplers


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", NEW_NAMES)
def test_parity_new_samplers(name: str, spacing: str) -> None:
    # Karras sigmas ignore the spacing for DPM++/UniPC (they span the train table) but not for Euler (they span the
    # spaced schedule's ends); each spacing runs anyway, as a config may set any.
    for prediction_type in ("epsilon", "v_prediction"):
        for n in (4, 20, 50):
            _assert_parity(name, {**SD15, "timestep_spacing": spacing, "prediction_type": prediction_type}, n)


NEW_VARIANTS: dict[str, dict[str, Any]] = {
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},  # DPM++ Karras truncates its timesteps here, UniPC rounds
    "linear_offset_0": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "steps_offset": 0},
    "final_sigma_min": {"final_sigmas_type": "sigma_min"},
    "karras_ends": {"sigma_min": 0.1, "sigma_max": 10.0},  # Karras' end points from the config
    "class_defaults": {"timestep_spacing": None},  # dropped below: each class's own default spacing
}


@pytest.mark.parametrize("name", NEW_NAMES)
def test_parity_new_sampler_variants(name: str) -> None:
    for variant, extra in NEW_VARIANTS.items():
        if variant == "cosine" and name in ("euler-a", "unipc-karras"):
            # The cosine table's top sigma is ~2e4 and these samplers' first step goes from it to ~12 (Karras,
            # ancestral): diffusers' float32 step cancels ~1e-4 of the result there; DPM++ Karras covers the table.
            continue
        config = {k: v for k, v in {**SD15, **extra}.items() if v is not None}
        for n in (1, 20):
            try:
                _assert_parity(name, {**config, "prediction_type": "v_prediction"}, n)
            except AssertionError as exc:
                raise AssertionError(f"{variant}, {n} steps: {exc}") from None


@pytest.mark.parametrize("name", ALL_NAMES)
def test_eps_gap_scale_is_alpha_at_the_step(name: str) -> None:
    # The ε gap is α_t times the v gap; α_t read from diffusers' own scheduler: √ᾱ at the timestep for DDIM/PNDM,
    # 1 / √(1 + σ²) at the step's sigma for the sigma-based ones (Euler's UNet input is x / √(1 + σ²)).
    ref = _reference(name, {**SD15, "prediction_type": "v_prediction"}, 20)
    ours = make_scheduler({**SD15, "prediction_type": "v_prediction"}, 20, name)
    if name in ("ddim", "pndm"):
        alpha = ref.alphas_cumprod.double().numpy()[ref.timesteps.numpy()] ** 0.5
    else:
        alpha = 1.0 / np.sqrt(1.0 + ref.sigmas.double().numpy()[: len(ref.timesteps)] ** 2)
    np.testing.assert_allclose(ours.eps_gap_scale, alpha, rtol=1e-5)
    assert alpha.min() < 0.2 and alpha.max() > 0.9  # a real range, not a constant
    np.testing.assert_array_equal(make_scheduler(SD15, 20, name).eps_gap_scale, np.ones(len(ours.timesteps)))


def test_euler_ancestral_noise_is_per_image_and_needed() -> None:
    x = np.ones((2, 4, 2, 2), np.float32)
    sched = make_scheduler(SD15, 10, "euler-a")  # without noise: can be checked, not stepped
    with pytest.raises(ValueError, match="one noise generator per image"):
        sched.step(x, 0, x)
    with pytest.raises(ValueError, match="one noise generator per image"):
        make_scheduler(SD15, 10, "euler-a", noise=step_noise([0], None)).step(x, 0, x)
    # seeds: image k's generator depends on its seed only; latents without seeds: on that image's x_T only
    a, b = step_noise([5, 6], None), step_noise([6], None)
    np.testing.assert_array_equal(a[1].standard_normal(8), b[0].standard_normal(8))
    x_t = np.random.default_rng(0).standard_normal((3, 4, 2, 2)).astype(np.float32)
    np.testing.assert_array_equal(step_noise(None, x_t)[2].standard_normal(8), step_noise(None, x_t[2:])[0].standard_normal(8))
    assert not np.array_equal(step_noise(None, x_t)[0].standard_normal(8), step_noise(None, x_t)[1].standard_normal(8))
    # the step noise is not the x_T stream of the same seed
    assert not np.array_equal(step_noise([5], None)[0].standard_normal(8), np.random.default_rng(5).standard_normal(8))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"trained_betas": [0.01] * 500}, "trained_betas has 500 values but num_train_timesteps is 1000"),
        ({"trained_betas": [0.01] * 999 + [1.5]}, r"trained_betas\[999\] is 1.5"),
        ({"steps_offset": -5}, r"steps_offset must be an integer in \[0, 999\], not -5"),
        ({"beta_start": 0.5, "beta_end": 2.0}, r"beta_start 0.5 and beta_end 2.0 give beta .* \(0, 1\)"),
        ({"beta_start": "x"}, "beta_start must be a number, not 'x'"),
        ({"use_karras_sigmas": "yes"}, "use_karras_sigmas must be true or false"),
        ({"num_train_timesteps": "1000"}, "num_train_timesteps must be an integer"),
        ({"sigma_max": -1}, "sigma_max must be a positive number"),
    ],
)
def test_malformed_configs_name_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidConfig, match=field):
        check_config({**SD15, **change})
    with pytest.raises(InvalidConfig, match=field.split()[0]):
        make_scheduler({**SD15, **change}, 10, "ddim")
    check_config(SD15)  # and the real config passes
