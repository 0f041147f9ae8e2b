"""Guidance policies: small per-sample state machines that see d and return the CFG scale.

Names follow Jain et al. (CVPR 2025): `pre_scale` is the scale used inside the attraction basin
(0: no guidance; -opposite_scale: opposite guidance), `guidance_scale` is λ after the
transition, `transition_step` is the index of the first step at λ.

Every policy answers for a batch of N samples at once; every sample switches on its own, and says per step which
UNet predictions it needs (`Rows`): the unconditional one where its scale is 0, the conditional one where its scale
is 1 and no d is wanted (after the end of guidance), both otherwise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property
from numbers import Real

import numpy as np

from basinguard.errors import BasinguardError

POLICY_NAMES = ("cfg", "stp", "dtp", "og-stp", "og-dtp")
NO_TRANSITION = -1
# Far above any scale in use (SD: λ 1-20): beyond it the guided ε overflows float32 within a few steps, and the
# loop would stop on NaN, blamed on the model.
MAX_SCALE = 100.0


class PolicyError(BasinguardError, ValueError):
    """Policy parameters outside their allowed range."""


@dataclass(frozen=True)
class PolicyConfig:
    """What a user chooses; `make_policy` turns it into a fresh state machine per batch."""

    name: str = "cfg"
    guidance_scale: float = 7.5  # λ
    transition_t: int = 500  # τ for the static policies: λ applies once t <= τ
    pre_scale: float = 0.0  # s_pre for stp/dtp
    opposite_scale: float | None = None  # λ_og for og-*: s_pre = -λ_og; None: λ, as in Algorithm 1 (s = -λ·v_OG)
    # `auto`: detection-gated mitigation (Wen et al.): d at step 0 above the threshold → mitigation.
    detect_threshold: float | None = None
    mitigation: str = "og-dtp"
    # dtp/og-dtp: a sample whose d has shown no local minimum by the first step with t <= this switches there (a
    # fallback off by default, so Algorithm 1 is the default; without it such a sample never gets λ)
    latest_transition_t: int | None = None
    # Any policy: once t <= this, the conditional prediction alone (scale 1, one UNet row per image, d not measured),
    # as guidance limited to an interval (Kynkäänniemi et al., NeurIPS 2024); None: guidance to the last step.
    guidance_end_t: int | None = None

    def validate(self, num_train_timesteps: int = 1000) -> None:
        if self.name not in (*POLICY_NAMES, "auto"):
            raise PolicyError(f"unknown policy {self.name!r}; choose one of {', '.join((*POLICY_NAMES, 'auto'))}")
        for field in ("guidance_scale", "transition_t", "pre_scale", "opposite_scale", "detect_threshold",
                      "latest_transition_t", "guidance_end_t"):
            value = getattr(self, field)
            if not (isinstance(value, Real) and not isinstance(value, bool)) and not (
                    value is None and field in ("opposite_scale", "detect_threshold", "latest_transition_t",
                                                "guidance_end_t")):
                raise PolicyError(f"{field} must be a number (got {value!r})")
        # NaN fails every comparison below, so each check is written to fail for it.
        if not 0 <= self.guidance_scale <= MAX_SCALE:
            raise PolicyError(f"guidance scale must be in [0, {MAX_SCALE:g}] (got {self.guidance_scale}); "
                              "opposite guidance is chosen with an og-* policy and --opposite-scale")
        if not 0 <= self.transition_t <= num_train_timesteps:
            raise PolicyError(f"transition t must be in [0, {num_train_timesteps}] (got {self.transition_t})")
        if self.latest_transition_t is not None and not 0 <= self.latest_transition_t <= num_train_timesteps:
            raise PolicyError(f"latest transition t must be in [0, {num_train_timesteps}] "
                              f"(got {self.latest_transition_t})")
        if self.guidance_end_t is not None and not 0 <= self.guidance_end_t < num_train_timesteps:
            raise PolicyError(f"guidance end t must be in [0, {num_train_timesteps - 1}] (got {self.guidance_end_t}): "
                              "guidance stops once t <= it")
        static = self.mitigation if self.name == "auto" else self.name
        if (self.guidance_end_t is not None and static in ("stp", "og-stp")
                and self.guidance_end_t >= self.transition_t):
            raise PolicyError(f"guidance end t {self.guidance_end_t} is not below τ = {self.transition_t}: {static} "
                              "would end guidance before it starts")
        if not -MAX_SCALE <= self.pre_scale <= MAX_SCALE:
            raise PolicyError(f"pre-scale must be in [-{MAX_SCALE:g}, {MAX_SCALE:g}] (got {self.pre_scale})")
        if self.opposite_scale is not None and not 0 < self.opposite_scale <= MAX_SCALE:
            raise PolicyError(f"opposite scale must be in (0, {MAX_SCALE:g}] (got {self.opposite_scale})")
        if self.detect_threshold is not None and not np.isfinite(self.detect_threshold):  # any policy: it also flags
            raise PolicyError(f"detection threshold must be a finite number (got {self.detect_threshold})")
        if self.name == "auto":
            if self.detect_threshold is None:
                raise PolicyError("policy 'auto' needs a detection threshold (--detect-threshold, or "
                                  "--detect-calibration FILE from `basinguard detect --calibrate`)")
            if self.mitigation not in POLICY_NAMES or self.mitigation == "cfg":
                raise PolicyError(f"mitigation must be one of stp, dtp, og-stp, og-dtp (got {self.mitigation!r})")

    @property
    def opposite(self) -> float:
        """λ_og in effect: the one given, else λ (Algorithm 1 opposes with the scale it later guides with)."""
        return self.guidance_scale if self.opposite_scale is None else self.opposite_scale

    def parameters(self) -> dict:
        """What a trace records: only the parameters this policy uses, with λ_og as applied."""
        used = {"name", "guidance_scale"}
        if self.name in ("stp", "og-stp"):
            used.add("transition_t")
        if self.name in ("stp", "dtp"):
            used.add("pre_scale")
        if self.name.startswith("og-"):
            used.add("opposite_scale")
        if self.name in ("dtp", "og-dtp"):
            used.add("latest_transition_t")
        if self.name == "auto":
            used = set(asdict(self))
        if self.latest_transition_t is None:  # off: recorded as before the fallback existed, so old jobs resume
            used.discard("latest_transition_t")
        if self.guidance_end_t is None:  # likewise
            used.discard("guidance_end_t")
        else:
            used.add("guidance_end_t")
        return {k: v for k, v in (asdict(self) | {"opposite_scale": self.opposite}).items() if k in used}


# The policies each transition setting is used by (for auto: its mitigation's); a setting given where it is not
# used would be ignored without a word, so it is refused instead.
USED_BY = {"pre_scale": ("stp", "dtp"), "transition_t": ("stp", "og-stp"), "opposite_scale": ("og-stp", "og-dtp"),
           "latest_transition_t": ("dtp", "og-dtp")}
_OPPOSITE, _FROM_D = " (its pre-switch scale is -(opposite scale))", " (it finds its transition from d)"
_AT_TAU = " (it switches at τ, --transition-t)"
WHY_NOT = {("pre_scale", "og-stp"): _OPPOSITE, ("pre_scale", "og-dtp"): _OPPOSITE,
           ("transition_t", "dtp"): _FROM_D, ("transition_t", "og-dtp"): _FROM_D,
           ("latest_transition_t", "stp"): _AT_TAU, ("latest_transition_t", "og-stp"): _AT_TAU}


def setting_problem(setting: str, policy: str, mitigation: str, name: str) -> str | None:
    """Why `setting` (given as `name`: a flag or a field) would be ignored under `policy`, or None. `mitigation`
    applies to auto only; the others to the policies in USED_BY (for auto: to its mitigation). An unknown policy is
    not this check's to report (PolicyConfig.validate names it)."""
    if setting == "mitigation":
        return None if policy == "auto" or policy not in POLICY_NAMES else f"{name} applies to policy auto only, not {policy}"
    effective = mitigation if policy == "auto" else policy
    users = USED_BY[setting]
    if effective in users or effective not in POLICY_NAMES:
        return None
    how = "--mitigation" if name.startswith("--") else "the mitigation field"
    auto = f" (policy auto mitigates with {effective} here; choose its mitigation with {how})" * (policy == "auto")
    return f"{name} applies to {' and '.join(users)} only, not {effective}{WHY_NOT.get((setting, effective), '')}{auto}"


def _constant(n: int, value: float | bool) -> np.ndarray:
    """One read-only array for every step. Right after a UNet call the CPU caches are cold and each numpy call
    costs 10-70 µs (measured on the shipped model), so the per-step policy work is kept to few calls."""
    out = np.full(n, value)
    out.flags.writeable = False
    return out


@dataclass(frozen=True)
class Rows:
    """Which UNet predictions each of N samples needs at a step: ε(x, e_∅) where `uncond`, ε(x, e_p) where `cond`.
    A sample with both gets ε_∅ + s·(ε_p − ε_∅) and its d measured; with the unconditional one alone, ε_∅ (its
    scale must be 0); with the conditional one alone, ε_p (its scale must be 1)."""

    uncond: np.ndarray  # bool (N,)
    cond: np.ndarray  # bool (N,)

    @classmethod
    def constant(cls, n: int, uncond: bool, cond: bool) -> Rows:
        return cls(_constant(n, uncond), _constant(n, cond))

    @cached_property
    def kind(self) -> str:
        """"both" (every sample both: batch 2N), "uncond" or "cond" (every sample one: batch N), else "mixed"."""
        u, c = bool(self.uncond.all()), bool(self.cond.all())
        if u and c:
            return "both"
        if u and not self.cond.any():
            return "uncond"
        if c and not self.uncond.any():
            return "cond"
        return "mixed"


class GuidancePolicy:
    """Base: constant λ (plain CFG). Subclasses override `rows` and `scale` with their switch rule."""

    def __init__(self, n: int, guidance_scale: float, pre_scale: float = 0.0):
        self.n = n
        self.guidance_scale = guidance_scale
        self.pre_scale = pre_scale
        self.transition_step = np.zeros(n, np.int64)  # cfg: λ from the first step
        self._full_scale = _constant(n, guidance_scale)  # λ for every sample
        self._both = Rows.constant(n, True, True)

    def rows(self, step: int, t: float) -> Rows:
        """The predictions each sample needs at this step (`Rows`)."""
        return self._both

    def scale(self, step: int, t: float, d: np.ndarray | None) -> np.ndarray:
        return self._full_scale


class StaticTransition(GuidancePolicy):
    """STP / OG-STP: s_pre while t > τ, then λ. Every sample switches at the same step."""

    def __init__(self, n: int, guidance_scale: float, pre_scale: float, transition_t: float):
        super().__init__(n, guidance_scale, pre_scale)
        self.transition_t = transition_t
        self.transition_step = np.full(n, NO_TRANSITION, np.int64)
        self._pre = _constant(n, pre_scale)
        self._uncond = Rows.constant(n, True, False)

    def rows(self, step: int, t: float) -> Rows:
        # With s_pre = 0 the guided ε is ε_∅ alone before τ; d is then not measured.
        return self._both if t <= self.transition_t or self.pre_scale != 0 else self._uncond

    def scale(self, step: int, t: float, d: np.ndarray | None) -> np.ndarray:
        if t > self.transition_t:
            return self._pre
        if self.transition_step[0] == NO_TRANSITION:
            self.transition_step[:] = step
        return self._full_scale


class DynamicTransition(GuidancePolicy):
    """DTP / OG-DTP (Algorithm 1): s_pre until d's first local minimum d[i-2] > d[i-1] < d[i]; λ from step i on.
    With `latest_t`, a sample with no minimum yet switches at the first step with t <= latest_t."""

    def __init__(self, n: int, guidance_scale: float, pre_scale: float, latest_t: float | None = None):
        super().__init__(n, guidance_scale, pre_scale)
        self.latest_t = latest_t
        self.transition_step = np.full(n, NO_TRANSITION, np.int64)
        # Per-sample state as Python lists: a handful of floats per step is cheaper in plain Python than the ten
        # small numpy calls it took (88 -> 28 µs per step measured on the shipped model, CPU, after a UNet call).
        self._steps = [NO_TRANSITION] * n
        self._d1 = [-np.inf] * n  # d[i-1]; -inf as Algorithm 1 starts, so no minimum in the first two steps
        self._d2 = [-np.inf] * n  # d[i-2]

    def scale(self, step: int, t: float, d: np.ndarray | None) -> np.ndarray:
        assert d is not None, "DTP measures d at every step"
        if NO_TRANSITION not in self._steps:  # every sample has switched: nothing left to watch
            return self._full_scale
        d_now = d.tolist()
        steps, d1, d2 = self._steps, self._d1, self._d2
        late = self.latest_t is not None and t <= self.latest_t
        for k in range(self.n):
            if steps[k] == NO_TRANSITION and (late or d2[k] > d1[k] < d_now[k]):
                steps[k] = step
        self._d2, self._d1 = d1, d_now
        self.transition_step[:] = steps
        return np.array([self.pre_scale if s == NO_TRANSITION else self.guidance_scale for s in steps])


class DetectionGated(GuidancePolicy):
    """`auto`: score = d at step 0; flagged samples follow the mitigation policy, the rest plain CFG."""

    def __init__(self, n: int, mitigation: GuidancePolicy, threshold: float):
        super().__init__(n, mitigation.guidance_scale)
        self.mitigation = mitigation
        self.threshold = threshold
        self.score = np.full(n, np.nan)
        self.flagged = np.zeros(n, bool)

    def rows(self, step: int, t: float) -> Rows:
        """Step 0 scores every sample (both rows); then a flagged sample needs what its mitigation needs, the rest
        both (CFG), so a batch of clean and flagged prompts pays per image."""
        if step == 0:
            return self._both
        mitigation = self.mitigation.rows(step, t)
        if mitigation.kind == "both":
            return self._both
        return Rows(np.where(self.flagged, mitigation.uncond, True), np.where(self.flagged, mitigation.cond, True))

    def scale(self, step: int, t: float, d: np.ndarray | None) -> np.ndarray:
        assert d is not None or step > 0, "detection measures d at the first step"
        if d is None:  # every sample flagged, and its mitigation runs the unconditional branch alone
            d = np.full(self.n, np.nan)
        if step == 0:
            self.score = d.astype(np.float64)
            self.flagged = self.score > self.threshold  # NaN (not measured) flags nothing
        mitigated = self.mitigation.scale(step, t, d)
        self.transition_step = np.where(self.flagged, self.mitigation.transition_step, 0)
        return np.where(self.flagged, mitigated, self.guidance_scale)


class GuidanceEnd(GuidancePolicy):
    """An end to guidance: once t <= `end_t` every sample takes the conditional prediction alone (scale 1, one UNet
    row each, d not measured); before, the wrapped policy decides."""

    def __init__(self, policy: GuidancePolicy, end_t: float):
        super().__init__(policy.n, policy.guidance_scale, policy.pre_scale)
        self.policy, self.end_t = policy, end_t
        self._cond = Rows.constant(policy.n, False, True)
        self._one = _constant(policy.n, 1.0)

    @property  # type: ignore[override]
    def transition_step(self) -> np.ndarray:
        return self.policy.transition_step

    @transition_step.setter
    def transition_step(self, value: np.ndarray) -> None:  # the base class's initial value; the policy's counts
        pass

    @property
    def score(self) -> np.ndarray | None:
        return getattr(self.policy, "score", None)

    def rows(self, step: int, t: float) -> Rows:
        return self._cond if t <= self.end_t else self.policy.rows(step, t)

    def scale(self, step: int, t: float, d: np.ndarray | None) -> np.ndarray:
        return self._one if t <= self.end_t else self.policy.scale(step, t, d)


def make_policy(config: PolicyConfig, n: int, num_train_timesteps: int = 1000) -> GuidancePolicy:
    """A fresh per-batch state machine for N samples."""
    config.validate(num_train_timesteps)
    name = config.mitigation if config.name == "auto" else config.name
    pre = -config.opposite if name.startswith("og-") else config.pre_scale
    policy: GuidancePolicy
    if name == "cfg":
        policy = GuidancePolicy(n, config.guidance_scale)
    elif name in ("stp", "og-stp"):
        policy = StaticTransition(n, config.guidance_scale, pre, config.transition_t)
    else:
        policy = DynamicTransition(n, config.guidance_scale, pre, config.latest_transition_t)
    if config.name == "auto":
        assert config.detect_threshold is not None
        policy = DetectionGated(n, policy, config.detect_threshold)
    if config.guidance_end_t is not None:
        policy = GuidanceEnd(policy, config.guidance_end_t)
    return policy
