"""Guidance policies against the paper's rules, written here as plain scalar loops."""

from __future__ import annotations

import numpy as np
import pytest

from basinguard.runtime.guidance import PolicyConfig, PolicyError, make_policy


def algorithm1_scales(d: list[float], lam: float, s_pre: float) -> list[float]:
    """Algorithm 1 of Jain et al. for one sample, literally: d_{T+2} = d_{T+1} = -inf; s switches to λ
    at the first t with d_{t+2} > d_{t+1} < d_t, for good."""
    d_prev2, d_prev1, s, out = -np.inf, -np.inf, s_pre, []
    for d_t in d:
        if d_prev2 > d_prev1 and d_prev1 < d_t:
            s = lam
        out.append(s)
        d_prev2, d_prev1 = d_prev1, d_t
    return out


def run(policy, timesteps, d):
    return np.stack([policy.scale(i, t, d[i]) for i, t in enumerate(timesteps)])


def test_dtp_matches_algorithm1_per_sample():
    rng = np.random.default_rng(0)
    steps, n = 30, 16
    # Noisy decreasing-then-rising curves: minima at different steps per sample, some with none.
    d = np.abs(rng.normal(size=(steps, n)).cumsum(0)) + 0.1
    d[:, 0] = np.linspace(10, 1, steps)  # monotone: never switches
    policy = make_policy(PolicyConfig("dtp", guidance_scale=7.5, pre_scale=0.0), n)
    got = run(policy, np.arange(999, 0, -1000 // steps)[:steps], d)
    for k in range(n):
        want = algorithm1_scales(list(d[:, k]), 7.5, 0.0)
        np.testing.assert_array_equal(got[:, k], want)
        switched = [i for i, s in enumerate(want) if s == 7.5]
        assert policy.transition_step[k] == (switched[0] if switched else -1)
    assert policy.transition_step[0] == -1
    assert len(set(policy.transition_step[1:].tolist())) > 3  # samples switched at different steps


def test_og_policies_default_to_algorithm1_as_printed():
    """Algorithm 1 with v_OG = 1, literally: s = -λ·v_OG before the switch, and d_t the *squared* norm (line 4).
    The loop records the plain norm (Wen et al.; the authors' code): squaring keeps the order, so the same steps."""
    rng = np.random.default_rng(1)
    steps, n, lam = 25, 12, 7.5
    d = np.abs(rng.normal(size=(steps, n)).cumsum(0)) + 0.1
    dtp = make_policy(PolicyConfig("og-dtp", guidance_scale=lam), n)  # no opposite scale given
    got = run(dtp, np.arange(980, 0, -40)[:steps], d)
    for k in range(n):
        np.testing.assert_array_equal(got[:, k], algorithm1_scales(list(d[:, k] ** 2), lam, -lam * 1))
    assert PolicyConfig("og-dtp", guidance_scale=lam).parameters()["opposite_scale"] == lam  # traces say what ran
    stp = make_policy(PolicyConfig("og-stp", guidance_scale=5.0, transition_t=500), 1)
    assert stp.scale(0, 900, np.ones(1)).tolist() == [-5.0]
    given = PolicyConfig("og-dtp", guidance_scale=lam, opposite_scale=2.0)  # Eq. 5 allows any s > 0
    assert make_policy(given, 1).scale(0, 900, np.ones(1)).tolist() == [-2.0]


def test_dtp_hand_computed():
    d = np.array([[5.0], [4.0], [3.0], [3.5], [1.0], [2.0]])
    policy = make_policy(PolicyConfig("og-dtp", guidance_scale=4.0, opposite_scale=2.0), 1)
    got = run(policy, [900, 700, 500, 300, 200, 100], d)[:, 0]
    # first local minimum: d[1]=4 > d[2]=3 < d[3]=3.5 → λ from step 3 on, even though d falls again.
    np.testing.assert_array_equal(got, [-2.0, -2.0, -2.0, 4.0, 4.0, 4.0])
    assert policy.transition_step.tolist() == [3]


def test_stp_switches_at_tau_and_skips_cond_only_when_pre_scale_is_zero():
    timesteps = np.array([981, 781, 581, 501, 500, 301, 1])
    stp = make_policy(PolicyConfig("stp", guidance_scale=7.5, transition_t=500), 3)
    assert [stp.rows(i, t).kind for i, t in enumerate(timesteps)] == ["uncond"] * 4 + ["both"] * 3
    got = np.stack([stp.scale(i, t, None if t > 500 else np.ones(3)) for i, t in enumerate(timesteps)])
    np.testing.assert_array_equal(got[:, 0], [0, 0, 0, 0, 7.5, 7.5, 7.5])
    assert stp.transition_step.tolist() == [4, 4, 4]
    og = make_policy(PolicyConfig("og-stp", guidance_scale=7.5, transition_t=500, opposite_scale=3.0), 2)
    assert all(og.rows(i, t).kind == "both" for i, t in enumerate(timesteps))
    assert og.scale(0, 981, np.ones(2)).tolist() == [-3.0, -3.0]
    nonzero_pre = make_policy(PolicyConfig("stp", transition_t=500, pre_scale=1.5), 1)
    assert nonzero_pre.rows(0, 981).kind == "both"


def test_cfg_is_constant_and_auto_gates_per_sample():
    cfg = make_policy(PolicyConfig("cfg", guidance_scale=3.0), 2)
    assert cfg.scale(0, 999, np.ones(2)).tolist() == [3.0, 3.0]
    auto = make_policy(PolicyConfig("auto", guidance_scale=3.0, detect_threshold=1.0, mitigation="dtp"), 3)
    d = np.array([[2.0, 0.5, 1.5], [1.0, 0.4, 1.2], [1.5, 0.3, 1.0]])
    got = run(auto, [900, 500, 100], d)
    np.testing.assert_array_equal(auto.flagged, [True, False, True])
    np.testing.assert_array_equal(auto.score, d[0])
    np.testing.assert_array_equal(got[:, 1], [3.0, 3.0, 3.0])  # not flagged: plain CFG
    np.testing.assert_array_equal(got[:, 0], algorithm1_scales(list(d[:, 0]), 3.0, 0.0))
    np.testing.assert_array_equal(got[:, 2], algorithm1_scales(list(d[:, 2]), 3.0, 0.0))
    assert auto.transition_step.tolist() == [2, 0, -1]


@pytest.mark.parametrize(
    "config, message",
    [
        (PolicyConfig("nope"), "unknown policy"),
        (PolicyConfig("cfg", guidance_scale=-1.0), r"guidance scale must be in \[0, 100\]"),
        (PolicyConfig("cfg", guidance_scale=float("nan")), r"guidance scale must be in \[0, 100\] \(got nan\)"),
        (PolicyConfig("stp", pre_scale=-101.0), r"pre-scale must be in \[-100, 100\]"),
        (PolicyConfig("auto", detect_threshold=float("inf")), "detection threshold must be a finite number"),
        (PolicyConfig("stp", transition_t=1001), r"transition t must be in \[0, 1000\]"),
        (PolicyConfig("og-dtp", opposite_scale=0.0), r"opposite scale must be in \(0, 100\]"),
        (PolicyConfig("auto"), "needs a detection threshold"),
        (PolicyConfig("auto", detect_threshold=1.0, mitigation="cfg"), "mitigation must be one of"),
    ],
)
def test_bad_parameters_are_named(config, message):
    with pytest.raises(PolicyError, match=message):
        make_policy(config, 1)


def test_trace_parameters_name_only_what_the_policy_uses():
    assert PolicyConfig("og-dtp", opposite_scale=2.0).parameters() == {
        "name": "og-dtp", "guidance_scale": 7.5, "opposite_scale": 2.0}
    assert set(PolicyConfig("stp").parameters()) == {"name", "guidance_scale", "transition_t", "pre_scale"}
