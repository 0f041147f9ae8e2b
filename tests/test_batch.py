"""`basinguard batch` on the tiny exported model: a real kill -9 and resume, packing, batch-invariance, the
auto policy, bad prompt lines, the OUT_DIR lock, and the Ray path (2 local workers)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from basinguard.batch.job import BatchJob, run_batch
from basinguard.batch.output import generate_batch
from basinguard.batch.prompts import derive_seed, pack, read_prompts
from basinguard.cli import main as cli_main
from basinguard.engine.fusion import FUSED_SUFFIX
from basinguard.runtime.guidance import PolicyConfig
from basinguard.runtime.model_folder import model_identity
from basinguard.runtime.pipeline import Pipeline, SamplingConfig
from basinguard.runtime.settings import sampling_from
from basinguard.runtime.spec import ModelSpec

STEPS = 20
WORDS = ["a red cat", "the blue dog on mars", "a green horse in the city", "an astronaut riding a horse",
         "a small castle with a tree", "a detailed portrait of a dog at night"]


@pytest.fixture(scope="module")
def pipe(tiny_onnx_dir: Path) -> Pipeline:
    return Pipeline(tiny_onnx_dir, threads=1)


def batch_args(model: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["batch", "--model", str(model), str(prompts), str(out), "--threads", "1", "--steps", str(STEPS),
            "--no-progress", *extra]


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        im.load()
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def assert_complete(out: Path, ids: list[str], ref: Path | None = None) -> list[dict]:
    """Every expected image once in the manifest, every PNG decodes (and matches `ref`), no temp files."""
    entries = manifest(out)
    got = [e["id"] for e in entries]
    assert sorted(got) == sorted(ids) and len(got) == len(set(got))
    assert not list(out.glob(".*.tmp")) and not list(out.glob("manifest.part-*"))
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{i}.png" for i in ids)
    for e in entries:
        img = pixels(out / e["file"])
        if ref is not None:
            assert np.abs(img - pixels(ref / e["file"])).max() <= 1, e["id"]
    return entries


KILL_LINES = 4
KILL_IMAGES = 3  # 12 images in all


@pytest.fixture(scope="module")
def kill_prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(WORDS[:KILL_LINES]) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(tiny_onnx_dir: Path, kill_prompts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The kill test's job run once without interruption."""
    out = tmp_path_factory.mktemp("reference")
    assert cli_main(batch_args(tiny_onnx_dir, kill_prompts, out, "--images-per-prompt", str(KILL_IMAGES),
                               "--batch-size", "2", "--seed", "7")) == 0
    return out


def kill_ids() -> list[str]:
    return [f"{line:06d}-{k:03d}" for line in range(1, KILL_LINES + 1) for k in range(KILL_IMAGES)]


def test_kill_9_then_resume_makes_every_image_once(tiny_onnx_dir, kill_prompts, reference, tmp_path):
    out = tmp_path / "out"
    argv = batch_args(tiny_onnx_dir, kill_prompts, out, "--images-per-prompt", str(KILL_IMAGES), "--batch-size", "2",
                      "--seed", "7")
    proc = subprocess.Popen([sys.executable, "-m", "basinguard.cli", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    mf = out / "manifest.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if mf.exists() and mf.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.002)
    still_running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert still_running, f"the job finished before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.stderr.close()
    before = mf.read_text().splitlines()
    assert 3 <= len(before) < len(kill_ids())
    # What a kill in the middle of an append and of a PNG write leave behind:
    with open(mf, "a") as f:
        f.write('{"id": "000004-002", "file": "000004-0')
    (out / f".{json.loads(before[0])['id']}.png.tmp").write_bytes(b"\x89PNG half")  # not rewritten on resume

    assert cli_main(argv) == 0
    entries = assert_complete(out, kill_ids(), ref=reference)
    assert [json.dumps(e) for e in entries[: len(before)]] == [json.dumps(json.loads(x)) for x in before]  # kept
    # A third run finds nothing to do and leaves the manifest as it is.
    text = mf.read_text()
    assert cli_main(argv) == 0
    assert mf.read_text() == text


def test_reference_manifest_fields(tiny_onnx_dir, reference):
    entries = assert_complete(reference, kill_ids())
    e = entries[0]
    assert e["prompt"] == WORDS[int(e["id"][:6]) - 1] and e["negative_prompt"] == ""
    assert e["seed"] == derive_seed(7, e["line"], e["index"])
    assert e["policy"]["name"] == "cfg" and e["engine"] == "cpu"
    assert len(e["gap"]) == STEPS and e["detection_score"] == e["gap"][0]
    assert e["transition_step"] == 0 and e["flagged"] is None
    assert {"unet", "text_encoder", "vae"} <= set(e["timings"]) and e["batch"] == 2
    assert e["model"]["path"] == str(tiny_onnx_dir.resolve()) and len(e["model"]["id"]) == 16
    assert len({x["seed"] for x in entries}) == len(entries)


def test_seed_derivation_is_the_documented_formula():
    digest = hashlib.sha256(b"basinguard-batch:7:3:2").digest()
    assert derive_seed(7, 3, 2) == int.from_bytes(digest[:8], "big") >> 11 < 2**53


def test_packing_fills_every_unet_call_but_the_tail(pipe, tmp_path, monkeypatch):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": w, "num_images": 3}) + "\n" for w in WORDS[:5]))  # 15 images
    sizes: list[int] = []
    real_run = pipe.unet.model.run

    def counting_run(inputs):
        sizes.append(len(inputs["sample"]))
        return real_run(inputs)

    monkeypatch.setattr(pipe.unet.model, "run", counting_run)
    summary = run_batch(BatchJob(prompts, tmp_path / "out", SamplingConfig(steps=4), batch_size=4, progress=False),
                        pipe)
    assert summary.generated == 15 and summary.total == 15
    assert sizes == [8] * (3 * 4) + [6] * 4  # batches 4, 4, 4, 3 at 2N each


@pytest.fixture(scope="module")
def switching_pipe(tiny_switching_onnx_dir: Path) -> Pipeline:
    """The tiny model whose d has local minima (conftest): DTP switches there, at each sample's own step."""
    return Pipeline(tiny_switching_onnx_dir, threads=1)


def test_batched_images_equal_each_image_alone(switching_pipe, tmp_path):
    """Packed across prompt lines, samples that switch at different steps (og-dtp on the switching model: found
    [18, never, 2, 2] and [4, 18]) make the images, traces and PNGs each makes alone."""
    pipe = switching_pipe
    prompts = tmp_path / "p.jsonl"
    lines = [{"prompt": WORDS[0], "seed": 11, "num_images": 2}, {"prompt": WORDS[1], "num_images": 3},
             {"prompt": WORDS[2], "negative_prompt": "a blue sky", "seed": 5}]
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    sampling = SamplingConfig(steps=STEPS, policy=PolicyConfig("og-dtp", guidance_scale=5.0, opposite_scale=2.0))
    tasks = read_prompts(prompts, pipe.spec, sampling, base_seed=3).tasks
    batches = pack(tasks, 4)
    assert [len(b) for b in batches] == [4, 2] and len({t.line for t in batches[0]}) == 2  # across prompt lines
    out = tmp_path / "out"
    run_batch(BatchJob(prompts, out, sampling, batch_size=4, seed=3, progress=False), pipe)
    for batch in batches:
        gens, _ = generate_batch(pipe, batch)
        switched = [g.trace["transition_step"] for g in gens]
        assert len(set(switched)) > 1, switched  # one batch, several transition steps
        for task, gen in zip(batch, gens, strict=True):
            alone = pipe.generate([task.prompt], sampling, seeds=[task.seed], negative_prompts=[task.negative_prompt])[0]
            assert gen.trace["transition_step"] == alone.trace["transition_step"]
            assert np.abs(gen.pixels - alone.pixels).max() <= 1e-4
            np.testing.assert_allclose(gen.trace["gap"], alone.trace["gap"], rtol=1e-4)
            assert np.abs(pixels(out / task.file) - np.asarray(alone.to_pil(), np.int16)).max() <= 1
            with Image.open(out / task.file) as im:  # the PNG carries its own trace
                embedded = json.loads(im.text["basinguard"])
            assert (embedded["prompt"], embedded["seed"], embedded["negative_prompt"]) == (
                task.prompt, task.seed, task.negative_prompt)
    assert tasks[0].seed == 11 and tasks[1].seed == 12 and tasks[2].seed == derive_seed(3, 2, 0)


def test_auto_flags_exactly_the_prompt_above_the_threshold(tiny_switching_onnx_dir, tmp_path):
    """On the tiny model whose d has minima (conftest), with seed 1: the flagged prompt's og-dtp switches at its own
    step inside the batch, its neighbour keeps plain CFG, and each PNG is the image its policy makes alone."""
    pipe = Pipeline(tiny_switching_onnx_dir, threads=1)
    cfg = SamplingConfig(steps=STEPS, policy=PolicyConfig("cfg", guidance_scale=6.0))
    alone = {w: pipe.generate([w], cfg, seeds=[1])[0] for w in WORDS}
    d0 = {w: g.trace["gap"][0] for w, g in alone.items()}
    low, high = min(d0, key=d0.get), max(d0, key=d0.get)
    assert d0[high] > d0[low] * 1.01
    threshold = (d0[low] + d0[high]) / 2
    prompts = tmp_path / "p.csv"
    prompts.write_text(f"prompt,seed\n{low},1\n\"{high}\",1\n")
    out = tmp_path / "out"
    rc = cli_main(["batch", "--model", str(pipe.folder.path), str(prompts), str(out), "--threads", "1", "--steps",
                   str(STEPS), "--policy", "auto", "--guidance-scale", "6", "--opposite-scale", "2", "--detect-threshold",
                   str(threshold), "--batch-size", "2", "--no-progress"])
    assert rc == 0
    entries = {e["prompt"]: e for e in manifest(out)}
    plain, mitigated = entries[low], entries[high]
    assert mitigated["flagged"] is True and plain["flagged"] is False
    assert mitigated["detection_score"] == pytest.approx(d0[high], rel=1e-4)
    assert plain["detection_score"] == pytest.approx(d0[low], rel=1e-4)
    assert plain["scale"] == [6.0] * STEPS and plain["transition_step"] == 0
    # og-dtp switches at the first local minimum of its own d (Algorithm 1's rule, by hand); this case has one
    gap = mitigated["gap"]
    ts = next((i for i in range(2, STEPS) if gap[i - 2] > gap[i - 1] < gap[i]), None)
    assert ts is not None and mitigated["transition_step"] == ts
    assert mitigated["scale"] == [-2.0] * ts + [6.0] * (STEPS - ts)  # -opposite_scale, then λ
    assert mitigated["policy"]["name"] == "auto" and mitigated["policy"]["mitigation"] == "og-dtp"
    og_dtp = pipe.generate([high], SamplingConfig(steps=STEPS, policy=PolicyConfig("og-dtp", guidance_scale=6.0,
                                                                                   opposite_scale=2.0)), seeds=[1])[0]
    assert og_dtp.trace["transition_step"] == ts
    for entry, image in ((plain, alone[low]), (mitigated, og_dtp)):
        assert np.abs(pixels(out / entry["file"]) - np.asarray(image.to_pil(), np.int16)).max() <= 1
    assert np.abs(pixels(out / mitigated["file"]) - np.asarray(alone[high].to_pil(), np.int16)).mean() > 2  # not CFG's


BAD_LINES = [
    '{"prompt": "a red cat", "seed": 1}',  # 1 good
    '{"prompt": "a dog", ',  # 2 invalid JSON
    "",  # 3 blank: ignored
    '{"negative_prompt": "x"}',  # 4 missing prompt
    json.dumps({"prompt": "x" * 100}),  # 5 over-long: 100 single-character tokens (with --long-prompts error)
    '{"prompt": "a cat", "seed": -3}',  # 6 bad value
    '{"prompt": "a cat", "policy": "magic"}',  # 7 bad policy
    '{"prompt": "a cat", "promt": "typo"}',  # 8 unknown field
    '{"prompt": "a cat", "num_images": "2"}',  # 9 wrong type: a number in quotes is text in JSON
    '{"prompt": "the blue dog", "num_images": 2, "steps": 3}',  # 10 good, own settings
    '{"prompt": "a cat", "seed": 1, "seed": 2}',  # 11 a field twice (json would keep the last one silently)
]


def test_bad_lines_stop_or_skip_with_line_numbers(tiny_onnx_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(BAD_LINES) + "\n")
    out = tmp_path / "out"
    refuse_long = ("--long-prompts", "error")
    assert cli_main(batch_args(tiny_onnx_dir, prompts, out, *refuse_long)) == 2  # --on-error stop is the default
    err = capsys.readouterr().err
    assert "line 2: invalid JSON" in err and "nothing generated" in err
    for n in (4, 5, 6, 7, 8, 9, 11):
        assert f"line {n}:" in err
    assert "line 1:" not in err and "line 3:" not in err and "line 10:" not in err
    assert not list(out.glob("*.png"))

    assert cli_main(batch_args(tiny_onnx_dir, prompts, out, "--on-error", "skip", *refuse_long)) == 0
    stdout = capsys.readouterr().out
    assert "skipped lines: 8" in stdout
    for n, what in ((2, "invalid JSON"), (4, "missing field 'prompt'"), (5, "100 tokens"), (6, "seed must be >= 0"),
                    (7, "unknown policy"), (8, "unknown field 'promt'"), (9, "must be an integer"),
                    (11, "field 'seed' given twice")):
        assert any(line.strip().startswith(f"line {n}:") and what in line for line in stdout.splitlines()), (n, what)
    entries = assert_complete(out, ["000001-000", "000010-000", "000010-001"])
    assert {e["id"]: e["steps"] for e in entries} == {"000001-000": STEPS, "000010-000": 3, "000010-001": 3}


def test_csv_and_txt_errors_name_their_lines(tiny_onnx_dir, tmp_path):
    csv_file = tmp_path / "p.csv"
    csv_file.write_text('prompt,seed,guidance_scale\na red cat,1,7\n"a dog\non mars",2,x\n,3,1\n')
    spec = ModelSpec(tiny_onnx_dir)
    parsed = read_prompts(csv_file, spec, SamplingConfig(steps=2))
    assert [t.line for t in parsed.tasks] == [2]
    assert [(e.line, "guidance_scale" in e.message) for e in parsed.errors] == [(3, True), (5, False)]
    txt = tmp_path / "p.txt"
    txt.write_bytes(b"a cat\n\n" + b"z" * 90 + b"\n\xff\xfe bad\n  a dog  \n")
    parsed = read_prompts(txt, spec, SamplingConfig(steps=2), long_prompts="error")
    assert [(t.line, t.prompt) for t in parsed.tasks] == [(1, "a cat"), (5, "a dog")]
    assert [e.line for e in parsed.errors] == [3, 4]
    txt.write_bytes(b"a cat\ra dog\r\na cow\n")  # old-Mac, Windows and Unix line ends
    parsed = read_prompts(txt, spec, SamplingConfig(steps=2))
    assert [(t.line, t.prompt) for t in parsed.tasks] == [(1, "a cat"), (2, "a dog"), (3, "a cow")]


def test_each_bad_line_is_reported_even_when_an_earlier_one_had_the_same_values(tiny_onnx_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join([
        '{"prompt": "a red cat"}',
        '{"prompt": "a blue dog", "steps": 0}',
        '{"prompt": "a green horse", "steps": 0}',  # the same bad settings as line 2: must fail too
        '{"prompt": "a castle", "scheduler": "nope"}',
        '{"prompt": "a tree", "scheduler": "nope"}',
        '{"prompt": "a dog", "policy": "og-stp", "pre_scale": 3}',  # og-* takes -opposite_scale, as the CLI says
        '{"prompt": "a dog", "policy": "cfg", "pre_scale": 1}',  # cfg has no transition
        '{"prompt": "a dog", "policy": "auto", "detect_threshold": 1, "mitigation": "og-dtp", "pre_scale": 3}',
        '{"prompt": "bad \\ud800 x"}',  # a lone surrogate escape: valid JSON, not writable as UTF-8
        '{"prompt": "a dog", "policy": "dtp", "transition_t": 300}',  # dtp finds its transition from d
        '{"prompt": "a dog", "policy": "stp", "opposite_scale": 2}',  # only og-* take it
        '{"prompt": "a dog", "policy": "stp", "mitigation": "og-dtp"}',  # only auto takes it
        '{"prompt": "a dog", "policy": "og-stp", "transition_t": 300, "opposite_scale": 2}',  # good
        '{"prompt": "a dog", "policy": "stp", "detect_threshold": 0.5}',  # stp (s_pre 0) measures no d at step 0
        '{"prompt": "a dog", "policy": "dtp", "detect_threshold": 0.5}',  # good: dtp measures d at every step
    ]) + "\n")
    out = tmp_path / "out"
    assert cli_main(batch_args(tiny_onnx_dir, prompts, out, "--on-error", "skip")) == 0
    stdout = capsys.readouterr().out
    assert "skipped lines: 12" in stdout
    for n, what in ((2, "steps (--steps) must be in [1, "), (3, "steps (--steps) must be in [1, "), (4, "unknown scheduler"),
                    (5, "unknown scheduler"), (6, "not og-stp"), (7, "not cfg"), (8, "not og-dtp"),
                    (9, "not valid Unicode"), (10, "field transition_t applies to stp and og-stp only, not dtp"),
                    (11, "field opposite_scale applies to og-stp and og-dtp only, not stp"),
                    (12, "field mitigation applies to policy auto only, not stp"),
                    (14, "a detection threshold flags images by d at step 0, which stp with pre-scale 0")):
        assert any(line.strip().startswith(f"line {n}:") and what in line for line in stdout.splitlines()), (n, what)
    assert_complete(out, ["000001-000", "000013-000", "000015-000"])
    assert {e["id"]: e for e in manifest(out)}["000015-000"]["flagged"] is not None  # dtp's image was scored


def test_job_level_problems_are_one_line_before_out_dir_is_touched(tiny_onnx_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na blue dog\n")
    out = tmp_path / "out"
    for flags, message in ((["--guidance-scale", "-1"], "job settings: guidance scale must be in [0, 100]"),
                           (["--policy", "stp", "--detect-threshold", "0.5"], "every line (2): a detection threshold "
                            "flags images by d at step 0, which stp with pre-scale 0 does not measure"),
                           (["--policy", "cfg", "--detect-threshold", "nan"],
                            "job settings: detection threshold must be a finite number (got nan)"),
                           (["--policy", "stp", "--transition-t", "5000"], "job settings: transition t must be in [0, 1000]")):
        assert cli_main(batch_args(tiny_onnx_dir, prompts, out, "--on-error", "skip", *flags)) == 2, flags
        err = capsys.readouterr().err
        assert message in err and "line 1" not in err, err
        assert not out.exists()
    # auto without a threshold: lines may carry their own, so the lines are checked; when every line fails for
    # that one reason it is said once, not once per line
    assert cli_main(batch_args(tiny_onnx_dir, prompts, tmp_path / "auto", "--policy", "auto", "--on-error", "skip")) == 2
    err = capsys.readouterr().err
    assert "every line (2): policy 'auto' needs a detection threshold" in err and "line 1" not in err, err
    assert not (tmp_path / "auto").exists()  # a job refused for its prompts leaves no OUT_DIR behind
    assert cli_main(batch_args(tiny_onnx_dir, tmp_path / "missing.txt", out)) == 2
    assert "prompt file" in capsys.readouterr().err and not out.exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert cli_main(batch_args(tiny_onnx_dir, empty, out)) == 2
    assert "has no usable prompt lines" in capsys.readouterr().err and not out.exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a cat"}\n{"prompt": "a dog", "seed": -1}\n')
    assert cli_main(batch_args(tiny_onnx_dir, bad, out)) == 2  # --on-error stop
    assert "line 2: seed must be >= 0" in capsys.readouterr().err and not out.exists()
    unclosed = tmp_path / "p.csv"  # an unclosed quote would otherwise swallow the rest of the file into one prompt
    unclosed.write_text('prompt,seed\na red cat,1\n"a yellow star,4\na red star,5\n')
    assert cli_main(batch_args(tiny_onnx_dir, unclosed, tmp_path / "out2", "--on-error", "skip")) == 2
    assert "malformed CSV" in capsys.readouterr().err
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert cli_main(batch_args(tiny_onnx_dir, prompts, a_file)) == 2
    assert f"cannot use OUT_DIR {a_file}" in capsys.readouterr().err


def finished_job(model: Path, tmp_path: Path, lines: str) -> tuple[Path, Path, list[str]]:
    """A 3-step job over `lines`, run to the end: (prompt file, OUT_DIR, its arguments)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text(lines)
    out = tmp_path / "out"
    args = batch_args(model, prompts, out, "--steps", "3")
    assert cli_main(args) == 0
    return prompts, out, args


def test_resume_refuses_another_scheduler_or_model(tiny_onnx_dir, tmp_path, capsys):
    prompts, out, args = finished_job(tiny_onnx_dir, tmp_path, "a red cat\n")
    assert cli_main(args) == 0 and "1/1 done (0 this run, 1 already done)" in capsys.readouterr().out
    assert cli_main([*args, "--scheduler", "euler"]) == 2
    assert "different scheduler" in capsys.readouterr().err
    other = tmp_path / "other_model"
    shutil.copytree(tiny_onnx_dir, other, copy_function=shutil.copyfile)  # a copy (new file times) is the same model
    assert cli_main(batch_args(other, prompts, out, "--steps", "3")) == 0
    unet = other / "unet/model.onnx"
    os.utime(unet, ns=(unet.stat().st_atime_ns, unet.stat().st_mtime_ns + 10**9))  # touched: still the same
    assert cli_main(batch_args(other, prompts, out, "--steps", "3")) == 0
    reexported = onnx.load(unet)  # same graph, other bytes (as a re-export writes): another model
    reexported.doc_string = "exported again"
    onnx.save(reexported, unet)
    assert cli_main(batch_args(other, prompts, out, "--steps", "3")) == 2
    assert "different model" in capsys.readouterr().err
    more = tmp_path / "more.txt"  # no image id in common: still one OUT_DIR, one model
    more.write_text("\na blue dog\n")
    assert cli_main(batch_args(other, more, out, "--steps", "3")) == 2
    assert "different model" in capsys.readouterr().err
    assert_complete(out, ["000001-000"])
    mf = out / "manifest.jsonl"
    entry = json.loads(mf.read_text())
    mf.write_text(json.dumps({**entry, "file": None}) + "\n")  # a hand-edited entry: named, not a traceback
    assert cli_main(args) == 2
    assert "line 1 is corrupt" in capsys.readouterr().err


def test_auto_job_whose_lines_carry_their_thresholds(tiny_onnx_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red cat", "detect_threshold": 0}\n{"prompt": "a blue dog"}\n')
    out = tmp_path / "out"
    assert cli_main(batch_args(tiny_onnx_dir, prompts, out, "--steps", "3", "--policy", "auto", "--on-error", "skip")) == 0
    stdout = capsys.readouterr().out
    assert "skipped lines: 1" in stdout and "line 2: policy 'auto' needs a detection threshold" in stdout
    (entry,) = assert_complete(out, ["000001-000"])
    assert entry["flagged"] is True  # d > 0 at the first step: the line's own threshold gated it


def test_model_identity_ignores_caches_written_beside_the_model(tiny_onnx_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_onnx_dir, model)
    before = model_identity(model)["id"]
    (model / "unet" / f"model{FUSED_SUFFIX}").write_bytes(b"a CPU load's fused graph")  # not part of the model
    (model / "unet" / ".model.onnx.tmp").write_bytes(b"")
    assert model_identity(model)["id"] == before
    moved = tmp_path / "moved"
    model.rename(moved)  # the content is the model, not where it lies or when it was written
    os.utime(moved / "unet" / "model.onnx", ns=(0, 10**18))
    assert model_identity(moved)["id"] == before
    config = moved / "vae_decoder" / "config.json"  # a config is part of the model
    config.write_text(config.read_text() + " ")
    assert model_identity(moved)["id"] != before
    weights = moved / "unet" / "model.onnx"  # so is every byte of the ONNX file, whatever its size and time
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    changed = model_identity(moved)["id"]
    assert changed != before
    for part in ("tokenizer", "scheduler"):  # the tokenizer and the scheduler make the images too
        config = next(f for f in sorted((moved / part).iterdir()) if f.suffix in (".json", ".txt"))
        config.write_text(config.read_text() + " ")
        assert model_identity(moved)["id"] != changed
        changed = model_identity(moved)["id"]


def test_model_identity_memo_is_used_and_never_trusted_blindly(tiny_onnx_dir, tmp_path, monkeypatch):
    from basinguard import files

    model = tmp_path / "model"
    shutil.copytree(tiny_onnx_dir, model)
    hashed: list[Path] = []
    real = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda p: hashed.append(Path(p)) or real(p))
    monkeypatch.setenv("BASINGUARD_CACHE_DIR", str(tmp_path / "cache"))
    want = model_identity(model)["id"]
    assert len(hashed) > 3
    hashed.clear()
    assert model_identity(model)["id"] == want and hashed == []  # unchanged files: hashes from the memo
    memo = tmp_path / "cache" / "file-digests.json"
    entries = json.loads(memo.read_text())
    unet = str((model / "unet" / "model.onnx").resolve())
    for damaged in ({**entries[unet], "sha256": None}, {"stamp": entries[unet]["stamp"]}, "junk"):
        memo.write_text(json.dumps({**entries, unet: damaged}))
        assert model_identity(model)["id"] == want  # a damaged entry is hashed again, not believed
    memo.write_text("{not json")
    assert model_identity(model)["id"] == want
    memo.write_text(json.dumps({"/no\u0000such/file": {"stamp": [1], "sha256": "0" * 64}, "/" + "x" * 300: {}}))
    assert model_identity(model)["id"] == want  # keys that cannot even be checked are dropped, not fatal
    assert unet in json.loads(memo.read_text())
    # Content changed, size and mtime put back (as cp -p or tar would): the ctime still tells.
    weights = model / "unet" / "model.onnx"
    stat, data = weights.stat(), bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size and model_identity(model)["id"] != want


def test_model_identity_without_a_usable_cache(tiny_onnx_dir, tmp_path, monkeypatch):
    from basinguard import files

    want = model_identity(tiny_onnx_dir)["id"]
    for name in ("BASINGUARD_CACHE_DIR", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))))
    assert files.user_cache_dir() is None and model_identity(tiny_onnx_dir)["id"] == want  # a container user
    monkeypatch.setenv("BASINGUARD_CACHE_DIR", str(tmp_path / "a-file"))
    (tmp_path / "a-file").write_text("")  # a cache that cannot be made: hashing still works, said once
    with pytest.warns(UserWarning, match="cannot write the file-hash cache"):
        assert model_identity(tiny_onnx_dir)["id"] == want
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model_identity(tiny_onnx_dir)["id"] == want


def test_jobs_recorded_with_the_former_file_time_ids_still_resume(tiny_onnx_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_onnx_dir, model)
    prompts, out, _ = finished_job(model, tmp_path, "a red cat\n")
    args = batch_args(model, prompts, out, "--steps", "3")

    def former_id() -> str:  # what basinguard recorded before content ids, restated here
        h = hashlib.sha256((model / "basinguard.json").read_bytes() if (model / "basinguard.json").is_file() else b"")
        for part in ("text_encoder", "unet", "vae_decoder"):
            names = sorted(f.name for f in (model / part).iterdir() if f.is_file() and not f.name.startswith(".")
                           and f.suffix != ".json" and f.name != f"model{FUSED_SUFFIX}" and f.name != "model.onnx")
            for name in ["model.onnx", *names, *sorted(f.name for f in (model / part).glob("*.json"))]:
                st = (model / part / name).stat()
                h.update(f"{part}/{name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    manifest = out / "manifest.jsonl"
    entry = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**entry, "model": {**entry["model"], "id": former_id()}}) + "\n")
    assert cli_main(args) == 0 and "1 already done" in capsys.readouterr().out
    for other in ("0" * 16, ["a", "list"], None):  # hand-edited ids: another model, one line, no traceback
        manifest.write_text(json.dumps({**entry, "model": {**entry["model"], "id": other}}) + "\n")
        assert cli_main(args) == 2 and "different model" in capsys.readouterr().err


def test_a_deleted_png_is_made_again_and_listed_once(tiny_onnx_dir, tmp_path, capsys):
    _, out, args = finished_job(tiny_onnx_dir, tmp_path, "a red cat\na blue dog\n")
    before = pixels(out / "000002-000.png")
    (out / "000002-000.png").unlink()
    (out / ".notes.tmp").write_text("the user's own file")
    lines = (out / "manifest.jsonl").read_text()
    assert cli_main([*args, "--seed", "99"]) == 2  # another job: refused, and the manifest left as it was
    assert "different seed" in capsys.readouterr().err and (out / "manifest.jsonl").read_text() == lines
    assert cli_main(args) == 0
    captured = capsys.readouterr()
    assert "have no PNG any more" in captured.err and "2/2 done (1 this run, 1 already done)" in captured.out
    (out / ".notes.tmp").unlink()  # still there: the job removes only its own temporary files
    assert_complete(out, ["000001-000", "000002-000"])  # each id once in the manifest
    assert np.abs(pixels(out / "000002-000.png") - before).max() <= 1  # the same image, made again


def test_second_job_on_the_same_out_dir_is_refused(tiny_onnx_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(out / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'4242'); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cli_main(batch_args(tiny_onnx_dir, prompts, out)) == 2
        err = capsys.readouterr().err
        assert "in use by another batch job" in err and str(out) in err
    finally:
        holder.kill()  # like a kill -9: the kernel releases its lock
        holder.wait()
        holder.stdout.close()
    assert cli_main(batch_args(tiny_onnx_dir, prompts, out)) == 0
    assert_complete(out, ["000001-000"])
    # The same OUT_DIR with another job's settings is refused rather than mixed.
    assert cli_main(batch_args(tiny_onnx_dir, prompts, out, "--seed", "99")) == 2
    assert "different seed" in capsys.readouterr().err


def test_a_killed_jobs_worker_still_writing_is_waited_for(tmp_path, capsys, monkeypatch):
    """A Ray worker outlives its killed driver by seconds; the next job must not read OUT_DIR before it stops, or
    the worker's last image would be missing from what the new job counts as done."""
    from basinguard.batch import output as batch
    from basinguard.batch.output import prepare_output

    out = tmp_path / "out"
    out.mkdir()
    go = tmp_path / "go"  # the worker writes once the job is seen waiting: no race with a loaded machine's clock
    worker = subprocess.Popen([sys.executable, "-c", (
        "import json, os, sys, time\n"
        "from pathlib import Path\n"
        "from basinguard.batch.output import hold_worker_lock\n"
        f"out, go = Path({str(out)!r}), Path({str(go)!r})\n"
        "hold_worker_lock(out, 0); print('locked', flush=True)\n"
        "deadline = time.monotonic() + 60\n"
        "while not go.exists() and time.monotonic() < deadline: time.sleep(0.01)\n"
        "(out / '000001-000.png').write_bytes(b'png')\n"
        "with open(out / 'manifest.part-0.jsonl', 'a') as f:\n"
        "    f.write(json.dumps({'id': '000001-000', 'file': '000001-000.png', 'line': 1, 'index': 0}) + '\\n')\n")],
        stdout=subprocess.PIPE, text=True)
    lock_held = batch.lock_held
    seen_held: list[bool] = []

    def lock_held_then_release(path: Path) -> bool:
        held = lock_held(path)
        seen_held.append(held)
        if held:
            go.touch()  # the job found the worker's lock held: now let the worker finish its image
        return held

    monkeypatch.setattr(batch, "lock_held", lock_held_then_release)
    try:
        assert worker.stdout.readline().strip() == "locked"
        done, lost = prepare_output(out)  # waits for the worker's lock, then merges its shard
    finally:
        go.touch()
        worker.wait()
        worker.stdout.close()
    assert seen_held[:1] == [True] and not seen_held[-1]  # it did wait, and stopped waiting once the lock was free
    assert list(done) == ["000001-000"] and not lost
    assert "waiting for the workers of an earlier job" in capsys.readouterr().err
    done, _ = prepare_output(out)  # nobody holds it now: no wait, no message
    assert list(done) == ["000001-000"] and "waiting" not in capsys.readouterr().err


def start_isolated_ray(ray, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh local Ray instance of 2 CPUs for this test: address "local" never joins a cluster already running on
    the host (which `ray.init()` would, as it would RAY_ADDRESS's), whose resources and state are not the test's."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)


def test_ray_resources_and_errors_are_one_line(tiny_onnx_dir, tmp_path, capsys, monkeypatch):
    from basinguard.batch.ray_executor import BatchWorker, check_resources, worker_slots
    from basinguard.errors import BasinguardError, first_line

    # Ray places each actor on one node: slots count per node (3 + 3 CPUs hold two 2-CPU workers, not three).
    nodes = [{"Alive": True, "Resources": {"CPU": 3.0}}, {"Alive": True, "Resources": {"CPU": 3.0, "GPU": 1.0}},
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]
    assert worker_slots(nodes, 2, "cpu") == 2 and worker_slots(nodes, 1, "cpu") == 6
    assert worker_slots(nodes, 1, "cuda") == 1 and worker_slots(nodes, 4, "cpu") == 0
    check_resources(2, 2, 2, "cpu")  # fits
    for args, message in (((3, 2, 2, "cpu"), "3 Ray worker(s) of 2 CPU(s) each (--threads 2): the cluster's nodes "
                                             "hold 2 such workers now"),
                          ((1, 0, 1, "cuda"), "1 Ray worker(s) of 1 CPU(s) and one GPU each (--threads 1): the "
                                              "cluster's nodes hold 0")):
        with pytest.raises(BasinguardError, match=re.escape(message)):
            check_resources(*args)
    # A worker that cannot start keeps its error for its first call (Ray would report only "the actor died").
    broken = BatchWorker(str(tmp_path / "no-model"), "cpu", 1, str(tmp_path), 0, {})
    with pytest.raises(BasinguardError, match="no-model"):
        broken.run([])
    broken.close()
    assert first_line(RuntimeError("\x1b[36mray::BatchWorker.run()\x1b[39m (pid=1)\n  File ...")) == (
        "ray::BatchWorker.run() (pid=1)")

    ray = pytest.importorskip("ray")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na blue dog\n")
    out = tmp_path / "out"
    (out / "000002-000.png").mkdir(parents=True)  # the worker cannot write this image
    start_isolated_ray(ray, monkeypatch)
    try:
        assert cli_main(batch_args(tiny_onnx_dir, prompts, out, "--ray", "--ray-workers", "2", "--threads", "2")) == 2
        assert "2 Ray worker(s) of 2 CPU(s) each (--threads 2): the cluster's nodes hold 1" in capsys.readouterr().err
        assert cli_main(batch_args(tiny_onnx_dir, prompts, out, "--ray", "--ray-workers", "1")) == 2
    finally:
        ray.shutdown()
    err = capsys.readouterr().err.strip()
    assert err.startswith("basinguard batch: error: cannot read or write") and "Is a directory" in err, err
    assert len(err.splitlines()) == 1 and "\x1b[" not in err  # as a local job reports it: no remote traceback


def test_a_job_that_fails_before_writing_leaves_no_out_dir(tiny_onnx_dir, tmp_path):
    from basinguard.engine import EngineError

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    out = tmp_path / "new" / "out"

    def no_gpu():
        raise EngineError("CUDAExecutionProvider is not available")

    with pytest.raises(EngineError):
        run_batch(BatchJob(prompts, out, SamplingConfig(steps=2), progress=False), no_gpu, ModelSpec(tiny_onnx_dir))
    assert not (tmp_path / "new").exists()  # nor the parent it made for it
    out.mkdir(parents=True)  # an OUT_DIR the user made is left where it is
    with pytest.raises(EngineError):
        run_batch(BatchJob(prompts, out, SamplingConfig(steps=2), progress=False), no_gpu, ModelSpec(tiny_onnx_dir))
    assert out.is_dir()


def test_ray_two_workers_merge_shards_exactly_once(tiny_onnx_dir, kill_prompts, reference, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    out = tmp_path / "out"
    out.mkdir()
    # A killed earlier run: two images in the manifest, three in a shard, one shard line cut mid-write.
    ref_entries = manifest(reference)
    lines = {e["id"]: json.dumps(e) + "\n" for e in ref_entries}
    kept = sorted(lines)[:5]
    for i in kept:
        shutil.copy(reference / f"{i}.png", out / f"{i}.png")
    (out / "manifest.jsonl").write_text("".join(lines[i] for i in kept[:2]))
    (out / "manifest.part-1.jsonl").write_text("".join(lines[i] for i in kept[1:5]) + lines[sorted(lines)[6]][:40])
    start_isolated_ray(ray, monkeypatch)
    try:
        argv = batch_args(tiny_onnx_dir, kill_prompts, out, "--images-per-prompt", str(KILL_IMAGES),
                          "--batch-size", "2", "--seed", "7", "--ray", "--ray-workers", "2")
        assert cli_main(argv) == 0
    finally:
        ray.shutdown()
    entries = assert_complete(out, kill_ids(), ref=reference)
    by_id = {e["id"]: e for e in entries}
    for i in kept:  # not made again
        assert json.dumps(by_id[i]) == lines[i].strip()
    new = [e for e in entries if e["id"] not in kept]
    assert {e["shard"] for e in new} == {0, 1} and len(new) == len(kill_ids()) - len(kept)
    assert os.path.exists(out / ".lock") and sorted(p.name for p in out.glob(".worker-*.lock")) == [
        ".worker-0.lock", ".worker-1.lock"]


def test_resume_on_another_engine_warns(tiny_onnx_dir, tmp_path, capsys):
    prompts, out, args = finished_job(tiny_onnx_dir, tmp_path, "a red cat\n")
    capsys.readouterr()
    assert cli_main(args) == 0 and "warning" not in capsys.readouterr().err  # same engine: nothing to say
    entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert {e["engine"] for e in entries} == {"cpu"}
    (out / "manifest.jsonl").write_text("".join(json.dumps(dict(e, engine="ort-tensorrt")) + "\n" for e in entries))
    prompts.write_text("a red cat\na blue dog\n")
    assert cli_main(args) == 0
    assert "has images made on ort-tensorrt; this run uses cpu" in capsys.readouterr().err


def test_a_line_may_leave_the_jobs_auto_gate(tiny_onnx_dir, tmp_path, capsys):
    """Under a job's auto + threshold, a line with its own stp opts out of the gate (its images are not flagged);
    a line that sets its own threshold under stp (s_pre 0, no d at step 0) is refused."""

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red cat"}) + "\n" + json.dumps({"prompt": "a dog", "policy": "stp"})
                       + "\n" + json.dumps({"prompt": "a cow", "policy": "stp", "detect_threshold": 0.1}) + "\n")
    out = tmp_path / "out"
    assert cli_main(batch_args(tiny_onnx_dir, prompts, out, "--policy", "auto", "--detect-threshold", "0.5",
                               "--on-error", "skip")) == 0
    assert "line 3: a detection threshold flags images by d at step 0" in capsys.readouterr().out
    by_line = {e["line"]: e for e in manifest(out)}
    assert set(by_line) == {1, 2} and by_line[1]["flagged"] is not None and by_line[2]["flagged"] is None
    assert by_line[2]["policy"]["name"] == "stp"
    # A model's default threshold belongs to its default auto policy, not to a policy the user picks.
    defaults = {"policy": "stp", "detect_threshold": 1.0}
    assert sampling_from(defaults, {}).policy.detect_threshold is None
    assert sampling_from({**defaults, "policy": "auto"}, {}).policy.detect_threshold == 1.0
