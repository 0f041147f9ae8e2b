"""Detection scores against full generations' traces, and AUC / TPR@FPR / calibration against brute force."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from basinguard.cli import main as cli_main
from basinguard.errors import BasinguardError
from basinguard.runtime.detection import (
    calibrate,
    detection_scores,
    load_calibration,
    roc_auc,
    threshold_at_fpr,
    tpr_at_fpr,
)
from basinguard.runtime.guidance import PolicyConfig
from basinguard.runtime.pipeline import Pipeline, SamplingConfig

PROMPTS = ["a red cat", "the blue dog on mars", "a green horse in the city", "an astronaut riding a horse",
           "a small castle with a tree", "a detailed portrait of a dog at night", "a sunset", "a big tree"]


def pairwise_auc(pos, neg) -> float:
    """Every (positive, negative) pair: 1 when the positive scores higher, ½ on a tie."""
    wins = [1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg]
    return sum(wins) / len(wins)


def best_tpr(pos, neg, fpr) -> float:
    """Highest TPR over every threshold (each score, and below all) whose FPR (score > t) is ≤ fpr."""
    best = 0.0
    for t in [-np.inf, *pos, *neg]:
        if np.mean([n > t for n in neg]) <= fpr:
            best = max(best, float(np.mean([p > t for p in pos])))
    return best


def test_auc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        pos = rng.integers(0, 8, rng.integers(1, 30)).astype(float)  # small integer range: many ties
        neg = rng.integers(0, 6, rng.integers(1, 30)).astype(float)
        assert roc_auc(pos, neg) == pytest.approx(pairwise_auc(pos, neg), abs=1e-12)
    assert roc_auc([3, 4], [1, 2]) == 1.0 and roc_auc([1, 2], [3, 4]) == 0.0 and roc_auc([2, 2], [2]) == 0.5
    assert roc_auc([1, 3], [2]) == 0.5  # one pair won, one lost
    for pos, neg, which in (([], [1.0], "positive"), ([np.nan], [1.0], "positive"), ([1.0], [np.inf], "negative")):
        with pytest.raises(ValueError, match=f"{which} scores must be a non-empty set of finite numbers"):
            roc_auc(pos, neg)


def test_tpr_at_fpr_hand_computed_and_brute_force():
    neg, pos = np.arange(100.0), [50.5, 99.5, 200.0]
    # 1 % of 100 negatives: one false positive allowed → the threshold is 98 (only 99 lies above it).
    assert threshold_at_fpr(neg, 0.01) == 98.0
    assert tpr_at_fpr(pos, neg, 0.01) == pytest.approx(2 / 3)
    assert threshold_at_fpr(neg[:50], 0.01) == 49.0  # fewer than 100 negatives: no false positive allowed
    assert threshold_at_fpr(np.arange(100.0), 0.29) == 70.0  # 29 allowed despite 0.29 * 100 = 28.999…
    rng = np.random.default_rng(1)
    for _ in range(30):
        pos = rng.normal(1, 1, rng.integers(1, 40)).round(1)
        neg = rng.normal(0, 1, rng.integers(1, 250)).round(1)
        for fpr in (0.0, 0.01, 0.05, 0.3):
            assert tpr_at_fpr(pos, neg, fpr) == pytest.approx(best_tpr(pos, neg, fpr)), (len(neg), fpr)


def test_calibrate_keeps_fpr_within_target():
    rng = np.random.default_rng(2)
    pos, neg = rng.normal(3, 1, 150), rng.normal(0, 1, 400)
    c = calibrate(pos, neg, fpr=0.01)
    assert c["fpr"] <= 0.01 and np.mean(neg > c["threshold"]) == c["fpr"]
    assert c["tpr"] == np.mean(pos > c["threshold"]) and c["auc"] == pytest.approx(pairwise_auc(pos, neg))
    assert np.mean(neg > np.nextafter(c["threshold"], -np.inf)) > 0.01  # the lowest threshold that does it
    assert (c["n_memorized"], c["n_normal"], c["target_fpr"]) == (150, 400, 0.01)


@pytest.fixture(scope="module")
def pipe(tiny_onnx_dir: Path) -> Pipeline:
    return Pipeline(tiny_onnx_dir, threads=1)


def test_scores_equal_d_of_full_generations_and_run_only_those_steps(pipe):
    sampling = SamplingConfig(steps=6, policy=PolicyConfig("og-dtp", guidance_scale=5.0))  # scored on CFG anyway
    cfg = SamplingConfig(steps=6, policy=PolicyConfig("cfg", guidance_scale=5.0))
    prompts, seeds = PROMPTS[:3], [4, 9]
    traces = {(p, s): np.array(pipe.generate([p], cfg, seeds=[s])[0].trace["gap"]) for p in prompts for s in seeds}
    pipe.timer.reset()
    one = detection_scores(pipe, prompts, sampling, seeds[:1], steps=1)
    assert pipe.timer.calls["unet"] == 1 and pipe.timer.calls.get("vae", 0) == 0  # one step, no image
    np.testing.assert_allclose(one, [traces[p, seeds[0]][0] for p in prompts], rtol=1e-4)
    pipe.timer.reset()
    three = detection_scores(pipe, prompts, sampling, seeds, steps=3, batch_size=4)  # 6 pairs: chunks of 4 and 2
    assert pipe.timer.calls["unet"] == 2 * 3
    want = [np.mean([traces[p, s][:3] for s in seeds]) for p in prompts]
    np.testing.assert_allclose(three, want, rtol=1e-4)


def test_score_uses_each_line_negative_prompt_as_auto_does(pipe, tmp_path, capsys):
    sampling = SamplingConfig(steps=4, policy=PolicyConfig("cfg", guidance_scale=5.0))
    negative = PROMPTS[4]
    auto = SamplingConfig(steps=4, policy=PolicyConfig("auto", guidance_scale=5.0, detect_threshold=0.0))
    gated = pipe.generate([PROMPTS[0]], auto, seeds=[0], negative_prompts=[negative])[0].trace["detection_score"]
    score = detection_scores(pipe, [PROMPTS[0]], sampling, [0], negative_prompts=[negative])
    plain = detection_scores(pipe, [PROMPTS[0]], sampling, [0])
    np.testing.assert_allclose(score, [gated], rtol=1e-5)
    assert abs(plain[0] - gated) > 1e-3 * gated  # the negative prompt does change d
    lines = tmp_path / "p.jsonl"
    lines.write_text(json.dumps({"prompt": PROMPTS[0], "negative_prompt": negative}) + "\n"
                     + json.dumps({"prompt": PROMPTS[0]}) + "\n")
    assert cli_main(["detect", str(lines), "--model", str(pipe.folder.path), "--threads", "1", "--steps", "4"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()[1:]]
    np.testing.assert_allclose([float(r[1]) for r in rows], [gated, plain[0]], rtol=1e-4)
    # A line's own detect_threshold flags it, as auto would gate it in batch; a line without one uses the flag's.
    lines.write_text(json.dumps({"prompt": PROMPTS[0], "detect_threshold": plain[0] / 2}) + "\n"
                     + json.dumps({"prompt": PROMPTS[0]}) + "\n")
    assert cli_main(["detect", str(lines), "--model", str(pipe.folder.path), "--threads", "1", "--steps", "4",
                     "--detect-threshold", str(plain[0] * 2)]) == 0
    assert [line.split("\t")[2] for line in capsys.readouterr().out.splitlines()[1:]] == ["yes", "no"]


def test_cli_detect_prints_scores_and_calibrates(pipe, tmp_path, capsys):
    model = str(pipe.folder.path)
    common = ["--model", model, "--threads", "1", "--steps", "4"]
    mem, normal = tmp_path / "mem.txt", tmp_path / "normal.jsonl"
    mem.write_text("\n".join(PROMPTS[:3]) + "\n")
    normal.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[3:]))
    assert cli_main(["detect", str(mem), *common, "--seeds", "2", "--detect-steps", "2"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == ["line", "score", "prompt"] and [r[2] for r in rows[1:]] == PROMPTS[:3]
    want = detection_scores(pipe, PROMPTS[:3], SamplingConfig(steps=4), [0, 1], steps=2)
    np.testing.assert_allclose([float(r[1]) for r in rows[1:]], want, rtol=1e-4)

    calib = tmp_path / "calib.json"
    assert cli_main(["detect", "--calibrate", "--memorized", str(mem), "--normal", str(normal), "--out", str(calib),
                     *common]) == 0
    assert "AUC" in capsys.readouterr().out
    c = json.loads(calib.read_text())
    pos = detection_scores(pipe, PROMPTS[:3], SamplingConfig(steps=4), [0])
    neg = detection_scores(pipe, PROMPTS[3:], SamplingConfig(steps=4), [0])
    assert c["threshold"] == pytest.approx(neg.max(), rel=1e-5)  # 5 normal prompts: no false positive allowed
    assert c["auc"] == pytest.approx(pairwise_auc(pos, neg)) and c["fpr"] == 0.0
    assert c["tpr"] == pytest.approx(np.mean(pos > c["threshold"]))
    assert (c["detect_steps"], c["seeds"], c["steps"]) == (1, 1, 4) and load_calibration(calib) == c

    # The file's threshold flags prompts in detect and gates --policy auto in batch.
    assert cli_main(["detect", str(normal), *common, "--detect-calibration", str(calib)]) == 0
    flags = [line.split("\t")[2] for line in capsys.readouterr().out.splitlines()[1:]]
    assert flags.count("yes") == 0 and len(flags) == 5
    out = tmp_path / "batch"
    assert cli_main(["batch", str(mem), str(out), *common, "--policy", "auto", "--detect-calibration", str(calib),
                     "--no-progress", "--seed", "3"]) == 0
    entries = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert all(e["policy"]["detect_threshold"] == c["threshold"] for e in entries)
    assert [e["flagged"] for e in entries] == [e["detection_score"] > c["threshold"] for e in entries]
    assert "warning" not in capsys.readouterr().err  # same model, size, steps and scheduler
    # detect scores along plain CFG whatever the policy: a policy flag would change nothing, so it is refused
    assert cli_main(["detect", str(mem), *common, "--policy", "stp", "--detect-threshold", str(c["threshold"])]) == 2
    assert "--policy: detect scores d along plain CFG" in capsys.readouterr().err
    assert cli_main(["detect", str(mem), *common, "--detect-threshold", str(c["threshold"])]) == 0
    assert [line.split("\t")[2] for line in capsys.readouterr().out.splitlines()[1:]] == [
        "yes" if p > c["threshold"] else "no" for p in pos]
    # generate takes the file too, for --policy auto
    assert cli_main(["generate", "--prompt", PROMPTS[0], *common, "--policy", "auto", "--detect-calibration", str(calib),
                     "--out", str(tmp_path / "g.png"), "--trace", str(tmp_path / "g.json")]) == 0
    g = json.loads((tmp_path / "g.json").read_text())
    assert g["policy"]["detect_threshold"] == c["threshold"] and "warning" not in capsys.readouterr().err

    # A threshold calibrated under other settings or on another model's files is used, with a warning naming why.
    assert (c["height"], c["width"]) == pipe.folder.default_image
    height, width = pipe.folder.default_image
    shifted = dict(c, steps=5, width=width + 8, model={"path": "/elsewhere", "id": "0" * 16})
    calib.write_text(json.dumps(shifted))
    assert cli_main(["batch", str(mem), str(tmp_path / "batch2"), *common, "--policy", "auto", "--detect-calibration",
                     str(calib), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "steps 5 (here 4)" in err and f"width {width + 8} (here {width})" in err and "model /elsewhere" in err
    assert "height" not in err and "scheduler" not in err and "every line" in err
    calib.write_text(json.dumps(dict(c, model={"path": "/edited", "id": ["not", "an", "id"]})))
    assert cli_main(["detect", str(mem), *common, "--detect-calibration", str(calib)]) == 0
    assert "model /edited (other model files)" in capsys.readouterr().err

    # A line's own steps differ from the calibration's even where the job's flags match it: that line is named.
    calib.write_text(json.dumps(c))
    lines = tmp_path / "lines.jsonl"
    lines.write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n" + json.dumps({"prompt": PROMPTS[1], "steps": 3}) + "\n")
    assert cli_main(["batch", str(lines), str(tmp_path / "batch3"), *common, "--policy", "auto",
                     "--detect-calibration", str(calib), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "steps 4 (here 3), for line 2:" in err and "line 1" not in err, err
    # detect warns the same way (it flags with the file's threshold), for the lines it scores
    assert cli_main(["detect", str(lines), *common, "--detect-calibration", str(calib)]) == 0
    assert "basinguard detect: warning" in capsys.readouterr().err
    # A negative prompt takes e_∅'s place in d: a line with one, against a calibration made without, is named.
    assert c["negative_prompts"] is False
    lines.write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n" +
                     json.dumps({"prompt": PROMPTS[1], "negative_prompt": "blurry"}) + "\n")
    assert cli_main(["detect", str(lines), *common, "--detect-calibration", str(calib)]) == 0
    err = capsys.readouterr().err
    assert "no negative prompt (here one), for line 2:" in err and "line 1" not in err, err
    assert cli_main(["generate", "--prompt", PROMPTS[0], "--negative-prompt", "blurry", *common, "--policy", "auto",
                     "--detect-calibration", str(calib), "--out", str(tmp_path / "n.png")]) == 0
    assert "no negative prompt (here one)" in capsys.readouterr().err
    mixed = tmp_path / "mixed.jsonl"  # calibrated on lines with and without: neither kind is warned about
    mixed.write_text(json.dumps({"prompt": PROMPTS[3], "negative_prompt": "blurry"}) + "\n" + json.dumps({"prompt": PROMPTS[4]}) + "\n")
    calib_mixed = tmp_path / "calib-mixed.json"
    assert cli_main(["detect", "--calibrate", "--memorized", str(mem), "--normal", str(mixed), "--out",
                     str(calib_mixed), *common]) == 0
    assert json.loads(calib_mixed.read_text())["negative_prompts"] == "some"
    capsys.readouterr()
    assert cli_main(["detect", str(lines), *common, "--detect-calibration", str(calib_mixed)]) == 0
    assert "negative" not in capsys.readouterr().err

    # A calibration over 2 steps x 2 seeds serves detect at 2 steps; other step counts and auto are refused.
    calib2 = tmp_path / "calib2.json"
    assert cli_main(["detect", "--calibrate", "--memorized", str(mem), "--normal", str(normal), "--out", str(calib2),
                     *common, "--detect-steps", "2", "--seeds", "2"]) == 0
    capsys.readouterr()
    assert cli_main(["detect", str(mem), *common, "--detect-steps", "2", "--seeds", "2",
                     "--detect-calibration", str(calib2)]) == 0
    captured = capsys.readouterr()
    rows = [line.split("\t") for line in captured.out.splitlines()[1:]]
    threshold2 = json.loads(calib2.read_text())["threshold"]
    assert [r[2] for r in rows] == ["yes" if float(r[1]) > threshold2 else "no" for r in rows]
    assert "warning" not in captured.err
    # past step 0 the trajectory is CFG's at λ: a 2-step calibration at another λ is warned about
    assert cli_main(["detect", str(mem), *common, "--detect-steps", "2", "--seeds", "2", "--guidance-scale", "3",
                     "--detect-calibration", str(calib2)]) == 0
    assert f"guidance_scale {c['guidance_scale']} (here 3.0)" in capsys.readouterr().err
    bare = tmp_path / "bare.json"  # a hand-written file: a threshold and nothing else
    bare.write_text('{"threshold": 1.5}')
    assert cli_main(["detect", str(mem), *common, "--seeds", "2", "--detect-calibration", str(bare)]) == 0
    assert "averaged 1 seeds per prompt, these scores 2" in capsys.readouterr().err
    for argv, message in ((["detect", str(mem), *common, "--detect-calibration", str(calib2)], "--detect-steps 2; score"),
                          (["batch", str(mem), str(tmp_path / "b4"), *common, "--policy", "auto",
                            "--detect-calibration", str(calib2)], "gates on d at step 0"),
                          (["detect", str(mem), *common, "--fpr", "0.5"], "--fpr applies to --calibrate only"),
                          (["batch", str(mem), str(tmp_path / "b5"), *common, "--ray-workers", "2"],
                           "--ray-workers applies to --ray only")):
        assert cli_main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_calibration_file_errors(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text('{"auc": 0.9}')
    with pytest.raises(BasinguardError, match=re.escape(f"calibration file {bad} has no finite 'threshold'")):
        load_calibration(bad)
    bad.write_text('{"threshold": 3.0, "detect_steps": 5}')
    with pytest.raises(BasinguardError, match=re.escape(f"calibration file {bad} was made with --detect-steps 5, but "
                                                        "--policy auto gates on d at step 0; calibrate with --detect-steps 1")):
        load_calibration(bad)
