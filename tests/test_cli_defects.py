"""The CLI as a hostile new user tries it, long prompts and file permissions: each test reproduces a defect a user
met and checks what happens now."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_model
from PIL import Image

from basinguard.batch.output import ManifestWriter
from basinguard.batch.prompts import read_prompts
from basinguard.cli import main as cli_main
from basinguard.errors import BasinguardError
from basinguard.runtime.errors import InputError, ModelFolderError
from basinguard.runtime.guidance import PolicyConfig, make_policy
from basinguard.runtime.model_folder import ModelFolder
from basinguard.runtime.pipeline import Pipeline, SamplingConfig
from basinguard.runtime.spec import ModelSpec
from basinguard.runtime.tokenizer import PromptTokenizer, PromptTruncatedWarning

SHIPPED = Path(__file__).resolve().parents[1] / "basinguard" / "models" / "shapes"
LONG = "a photo of " + "cat " * 80 + "purple elephant"  # 85 tokens on the tiny model; it takes 75


@pytest.fixture(scope="module")
def pipe(tiny_onnx_dir: Path) -> Pipeline:
    return Pipeline(tiny_onnx_dir, threads=1)


def generate_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--prompt", "a red cat", "--threads", "1", "--steps", "4",
            "--out", str(out), *extra]


def batch_args(model: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["batch", "--model", str(model), str(prompts), str(out), "--threads", "1", "--steps", "3",
            "--no-progress", *extra]


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "basinguard.cli", *args], capture_output=True, text=True, env=env,
                          **kwargs)


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------- resumed flags


def test_resumed_batch_with_another_detect_threshold_is_refused(tiny_onnx_dir, tmp_path, capsys):
    """Flags are decided with the threshold when an image is made; a restart with another threshold would count
    the old images' stale flags (all four scores exceed 0, yet 'flagged: 2' was reported)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\nthe blue dog on mars\n")
    out = tmp_path / "out"
    args = batch_args(tiny_onnx_dir, prompts, out, "--policy", "cfg")
    assert cli_main([*args, "--detect-threshold", "1000"]) == 0
    assert "flagged as memorized: 0" in capsys.readouterr().out
    assert all(e["flagged"] is False and e["detect_threshold"] == 1000 for e in manifest(out))
    for changed in (["--detect-threshold", "0"], []):
        assert cli_main([*args, *changed]) == 2
        err = capsys.readouterr().err
        assert "different detect_threshold" in err, err
    assert cli_main([*args, "--detect-threshold", "1000"]) == 0  # the same job resumes
    assert "2/2 done (0 this run, 2 already done)" in capsys.readouterr().out


def test_entries_written_before_thresholds_were_recorded_still_resume(tiny_onnx_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    out = tmp_path / "out"
    args = batch_args(tiny_onnx_dir, prompts, out, "--policy", "cfg", "--detect-threshold", "5")
    assert cli_main(args) == 0
    old = [{k: v for k, v in e.items() if k != "detect_threshold"} for e in manifest(out)]  # as written before
    (out / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in old))
    assert cli_main(args) == 0 and "1 already done" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ outputs over inputs


def test_an_output_that_is_an_input_is_refused(tiny_onnx_dir, tmp_path, capsys):
    size = 16 // ModelFolder.open(tiny_onnx_dir).vae_scale_factor
    latents = tmp_path / "L.npy"
    np.save(latents, np.zeros((1, 4, size, size), np.float32))
    before = latents.read_bytes()
    assert cli_main(generate_args(tiny_onnx_dir, latents, "--latents", str(latents))) == 2
    assert "--out or --trace" in capsys.readouterr().err and latents.read_bytes() == before
    calib = tmp_path / "c.json"
    calib.write_text('{"threshold": 1.0}')
    link = tmp_path / "link.json"  # the same file under another name
    link.symlink_to(calib)
    for trace in (calib, link):
        assert cli_main(generate_args(tiny_onnx_dir, tmp_path / "o.png", "--policy", "auto", "--trace", str(trace),
                                      "--detect-calibration", str(calib))) == 2
        assert "is the --detect-calibration file" in capsys.readouterr().err
    assert calib.read_text() == '{"threshold": 1.0}' and not (tmp_path / "o.png").exists()
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    assert cli_main(["detect", "--model", str(tiny_onnx_dir), "--calibrate", "--memorized", str(prompts),
                     "--normal", str(prompts), "--out", str(calib), "--detect-calibration", str(calib)]) == 2
    assert "is the --detect-calibration file" in capsys.readouterr().err
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.jsonl").write_text('{"prompt": "a red cat"}\n')  # the prompt file is where the manifest goes
    assert cli_main(batch_args(tiny_onnx_dir, out / "manifest.jsonl", out)) == 2
    assert "is the PROMPTS file" in capsys.readouterr().err
    assert (out / "manifest.jsonl").read_text() == '{"prompt": "a red cat"}\n'


# ----------------------------------------------------------------------------------- settings not used


def test_detect_refuses_policy_settings_it_would_ignore(pipe, tmp_path, capsys):
    """detect scores along plain CFG: a policy and its settings changed nothing (the same scores), silently."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    common = ["detect", str(prompts), "--model", str(pipe.folder.path), "--threads", "1", "--steps", "3"]
    for flags in (["--policy", "stp", "--pre-scale", "0"], ["--policy", "dtp"], ["--transition-t", "300"],
                  ["--latest-transition-t", "300"]):
        assert cli_main([*common, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and flags[0] in err and "plain CFG" in err
    assert cli_main(common) == 0


def test_generate_refuses_a_seed_beside_latents(pipe, tmp_path, capsys):
    """The latents are x_T; a seed would be recorded in the trace without having made anything (the API refuses)."""
    size = 16 // pipe.folder.vae_scale_factor
    latents = tmp_path / "L.npy"
    np.save(latents, np.zeros((1, 4, size, size), np.float32))
    assert cli_main(generate_args(pipe.folder.path, tmp_path / "o.png", "--latents", str(latents), "--seed", "5")) == 2
    assert "give --seed or --latents, not both" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()
    with pytest.raises(BasinguardError, match="seeds or latents, not both"):
        pipe.generate(["x"], SamplingConfig(steps=2), seeds=[5], latents=np.load(latents))
    assert cli_main(generate_args(pipe.folder.path, tmp_path / "o.png", "--latents", str(latents))) == 0


# ------------------------------------------------------------------------------------------ model folders


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_a_huge_in_channels_is_refused_naming_the_file(tiny_onnx_dir, tmp_path, capsys):
    """{"in_channels": 1e9} asked numpy for 14.9 TiB of latents: a traceback, after the models loaded."""
    model = copy_model(tiny_onnx_dir, tmp_path / "model")
    edit_json(model / "unet/config.json", in_channels=1e9)
    assert cli_main(generate_args(model, tmp_path / "o.png")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(model / "unet/config.json") in err and "in_channels" in err, err


def test_a_vae_config_that_disagrees_with_its_decoder_is_refused(tiny_onnx_dir, tmp_path, capsys):
    """A VAE config whose scale factor is not the decoder's made a trace stating another size than the PNG's."""
    model = copy_model(tiny_onnx_dir, tmp_path / "model")
    blocks = json.loads((model / "vae_decoder/config.json").read_text())["block_out_channels"]
    edit_json(model / "vae_decoder/config.json", block_out_channels=[*blocks, blocks[-1]])  # factor 4, not 2
    out = tmp_path / "o.png"
    assert cli_main(generate_args(model, out, "--trace", str(tmp_path / "t.json"))) == 2
    err = capsys.readouterr().err
    assert str(model / "vae_decoder/config.json") in err and "scale factor of 4" in err, err
    assert not out.exists() and not (tmp_path / "t.json").exists()


def shipped_copy(tmp_path: Path) -> Path:
    """The shipped model, whose text encoder takes input_ids of a fixed length 32 (CLIP's is 77)."""
    return copy_model(SHIPPED, tmp_path / "shipped")


def test_the_tokenizer_pads_to_the_text_encoders_fixed_width(tmp_path, capsys):
    """Without tokenizer_config.json the tokenizer padded to CLIP's 77, which the shipped text encoder (32) does not
    take: ONNX Runtime failed after the models loaded. Now its width comes from the text encoder."""
    model = shipped_copy(tmp_path)
    (model / "tokenizer/tokenizer_config.json").unlink()
    assert PromptTokenizer.from_folder(model / "tokenizer").max_length == 77  # on its own: CLIP's default
    assert ModelSpec(model).tokenizer.max_length == 32  # text_encoder/config.json's max_position_embeddings
    (model / "text_encoder/config.json").unlink()  # then only the loaded ONNX input says it
    assert Pipeline(model, threads=1).tokenizer.max_length == 32
    assert cli_main(generate_args(model, tmp_path / "o.png", "--steps", "2")) == 0
    with Image.open(tmp_path / "o.png") as image:
        assert image.size[::-1] == ModelFolder.open(model).default_image


@pytest.mark.parametrize("length", [40, 20])
def test_a_tokenizer_length_the_text_encoder_cannot_take_is_refused_before_out_dir(tmp_path, capsys, length):
    model = shipped_copy(tmp_path)
    edit_json(model / "tokenizer/tokenizer_config.json", model_max_length=length)
    if length < 32:  # shorter than the fixed input: only the ONNX input tells; the config allows up to 32
        (model / "text_encoder/config.json").unlink()
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    out = tmp_path / "out"
    assert cli_main(batch_args(model, prompts, out)) == 2
    err = capsys.readouterr().err
    assert str(model / "tokenizer/tokenizer_config.json") in err and f"model_max_length {length}" in err, err
    assert not out.exists()  # no lock, no empty manifest left behind


# ------------------------------------------------------------------------------------------------ messages


def test_a_type_error_on_a_flag_is_one_line(tiny_onnx_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["generate", "--prompt", "x", "--steps", "ten"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--steps: invalid int value: 'ten'" in err and "basinguard generate --help" in err


def test_a_closed_pipe_ends_quietly(tiny_onnx_dir, tmp_path):
    """`basinguard detect … | head -1`: the reader closing its end is no error of ours."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\nthe blue dog\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "basinguard.cli", "detect", str(prompts), "--model",
                             str(tiny_onnx_dir), "--threads", "1", "--steps", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # as `head` does once it has its lines; here before any: every write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait() == 0 and err == "", err


def test_a_failed_write_names_its_file(tmp_path):
    """A full disk (here a file-size limit, the same failure of write(2)) named no path: 'cannot read or write: No
    space left on device'."""
    target = tmp_path / "o.png"
    code = ("import resource, signal, sys; from pathlib import Path; from basinguard.files import write_atomic\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
            "try:\n    write_atomic(Path(sys.argv[1]), b'x' * 5000)\n"
            "except OSError as exc:\n    print(exc.errno, exc.filename)\n")
    result = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, check=True)
    assert result.stdout.split() == [str(errno.EFBIG), str(target)]
    assert list(tmp_path.iterdir()) == []  # and no temporary file is left


def test_manifest_append_failures_name_the_manifest(tmp_path, monkeypatch):
    writer = ManifestWriter(tmp_path / "manifest.jsonl")

    def full_disk(fd: int, data: object) -> int:  # what write(2) does on a full disk: no file named
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError) as info:
        writer.append({"id": "x"})
    monkeypatch.undo()
    writer.close()
    assert info.value.filename == str(tmp_path / "manifest.jsonl") and info.value.errno == errno.ENOSPC


def test_generate_removes_the_temporary_files_a_kill_left(tiny_onnx_dir, tmp_path):
    out, trace = tmp_path / "o.png", tmp_path / "t.json"
    left = [tmp_path / ".o.png.k1ll3d00.tmp", tmp_path / ".t.json.abcdefgh.tmp"]
    others = [tmp_path / ".other.png.abcdefgh.tmp", tmp_path / ".o.png.notes"]  # not ours: kept
    for path in (*left, *others):
        path.write_bytes(b"half a file")
    assert cli_main(generate_args(tiny_onnx_dir, out, "--trace", str(trace), "--steps", "2")) == 0
    assert not any(p.exists() for p in left) and all(p.exists() for p in others)


# ------------------------------------------------------------------------------------- images that never switch


def test_images_that_never_switch_are_warned_about_and_counted(tiny_onnx_dir, tmp_path, capsys):
    """On the tiny model d falls monotonically: Algorithm 1 finds no minimum and og-dtp steers away at every step,
    which only the trace showed."""
    out = tmp_path / "o.png"
    assert cli_main(generate_args(tiny_onnx_dir, out, "--policy", "og-dtp", "--num-images", "2",
                                  "--trace", str(tmp_path / "t.json"))) == 0
    captured = capsys.readouterr()
    assert "never switched to guidance: 2 of 2" in captured.out
    assert "--latest-transition-t" in captured.err and captured.err.count("never switched") == 1
    assert json.loads((tmp_path / "t-0.json").read_text())["transition_step"] is None  # Algorithm 1 stays the default
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\nthe blue dog on mars\n")
    assert cli_main(batch_args(tiny_onnx_dir, prompts, tmp_path / "out", "--policy", "og-dtp")) == 0
    assert "never switched to guidance: 2 (d had no local minimum" in capsys.readouterr().out
    assert cli_main(batch_args(tiny_onnx_dir, prompts, tmp_path / "cfg", "--policy", "cfg")) == 0
    assert "never switched to guidance: 0\n" in capsys.readouterr().out


def test_the_never_switched_warning_does_not_advise_the_flag_already_given(tiny_onnx_dir, tmp_path, capsys):
    """With --latest-transition-t 0 and a schedule whose last t is 1 (DDIM, leading, steps_offset 1), the warning
    told the user to pass --latest-transition-t T, which they had."""
    trace = tmp_path / "t.json"
    assert cli_main(generate_args(tiny_onnx_dir, tmp_path / "o.png", "--policy", "dtp", "--latest-transition-t", "0",
                                  "--trace", str(trace))) == 0
    assert min(json.loads(trace.read_text())["timesteps"]) == 1  # so t never came down to 0
    err = capsys.readouterr().err
    assert "no step's t was <= --latest-transition-t 0" in err and "switches such images" not in err, err


@pytest.mark.parametrize("name", ["dtp", "og-dtp"])
def test_latest_transition_t_switches_where_no_minimum_came(pipe, name):
    sampling = SamplingConfig(steps=8, policy=PolicyConfig(name, guidance_scale=6.0, latest_transition_t=600))
    gens = pipe.generate(["a red cat", "the blue dog on mars"], sampling, seeds=[1, 2])
    timesteps = gens[0].trace["timesteps"]
    latest = next(i for i, t in enumerate(timesteps) if t <= 600)  # the rule by hand: the first step with t <= T
    pre = 0.0 if name == "dtp" else -6.0  # dtp's default pre-scale; og-dtp's -λ_og with λ_og = λ (Algorithm 1)
    for g in gens:
        gap = g.trace["gap"]
        assert not any(gap[i - 2] > gap[i - 1] < gap[i] for i in range(2, latest + 1))  # no minimum came first
        assert g.trace["transition_step"] == latest
        assert g.trace["scale"] == [pre] * latest + [6.0] * (len(timesteps) - latest)
        assert g.trace["policy"]["latest_transition_t"] == 600
    plain = pipe.generate(["a red cat"], SamplingConfig(steps=8, policy=PolicyConfig(name, guidance_scale=6.0)),
                          seeds=[1])[0]
    assert plain.trace["transition_step"] is None and "latest_transition_t" not in plain.trace["policy"]
    assert not np.array_equal(plain.pixels, gens[0].pixels)  # guidance did apply after the fallback switch


def test_a_minimum_before_the_latest_step_still_wins():
    """The fallback never moves a switch Algorithm 1 found: d with a minimum at step 2, and T reached at step 4."""
    policy = make_policy(PolicyConfig("dtp", guidance_scale=5.0, latest_transition_t=400), 2)
    d = [[3.0, 3.0], [2.0, 2.5], [2.5, 2.4], [2.0, 2.3], [1.0, 2.2]]
    for step, (t, d_t) in enumerate(zip([900, 700, 500, 450, 400], d, strict=True)):
        policy.scale(step, t, np.array(d_t))
    assert policy.transition_step.tolist() == [2, 4]


def test_latest_transition_t_is_refused_where_unused(tiny_onnx_dir, tmp_path, capsys):
    for flags in (["--policy", "stp"], ["--policy", "cfg"], ["--policy", "auto", "--detect-threshold", "1",
                                                            "--mitigation", "og-stp"]):
        assert cli_main(generate_args(tiny_onnx_dir, tmp_path / "o.png", *flags, "--latest-transition-t", "500")) == 2
        assert "--latest-transition-t applies to dtp and og-dtp only" in capsys.readouterr().err
    assert cli_main(generate_args(tiny_onnx_dir, tmp_path / "o.png", "--policy", "dtp",
                                  "--latest-transition-t", "5000")) == 2
    assert "latest transition t must be in [0, 1000]" in capsys.readouterr().err
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red cat", "policy": "stp", "latest_transition_t": 500}\n')
    assert cli_main(batch_args(tiny_onnx_dir, prompts, tmp_path / "out")) == 2
    assert "field latest_transition_t applies to dtp and og-dtp only" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- calibration


def test_calibrating_on_data_that_does_not_separate_warns(pipe, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\nthe blue dog on mars\n")
    out = tmp_path / "calib.json"
    assert cli_main(["detect", "--model", str(pipe.folder.path), "--threads", "1", "--steps", "3", "--calibrate",
                     "--memorized", str(prompts), "--normal", str(prompts), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert json.loads(out.read_text())["auc"] == 0.5 and "AUC 0.50" in captured.out
    assert "warning: AUC 0.50: these scores hardly separate" in captured.err


# ------------------------------------------------------------------------------------------- prompt files


def test_one_rule_for_prompt_text_in_every_format(pipe, tmp_path):
    sampling = SamplingConfig(steps=2)
    txt = tmp_path / "p.txt"
    txt.write_bytes("\ufeffa red cat\n  the blue\ufeff dog  \n\ufeff\n".encode())  # BOMs where files were joined
    csv = tmp_path / "p.csv"
    csv.write_text('prompt,negative_prompt\n"  a red cat  ", blurry \n')
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": " a red cat\\t", "negative_prompt": " blurry"}\n')
    assert [t.prompt for t in read_prompts(txt, pipe.spec, sampling).tasks] == ["a red cat", "the blue dog"]
    for path in (csv, jsonl):
        tasks = read_prompts(path, pipe.spec, sampling).tasks
        assert [(t.prompt, t.negative_prompt) for t in tasks] == [("a red cat", "blurry")], path


@pytest.mark.parametrize("cell", ["1_000", "\uff11\uff12", "inf"])
def test_csv_numbers_are_ascii_numbers_as_in_json(pipe, tmp_path, cell):
    csv = tmp_path / "p.csv"
    csv.write_text(f"prompt,seed,guidance_scale\na red cat,{cell},7\na red cat,3,{cell}\n", encoding="utf-8")
    parsed = read_prompts(csv, pipe.spec, SamplingConfig(steps=2))
    assert not parsed.tasks and [e.line for e in parsed.errors] == [2, 3]
    assert "field 'seed' must be an integer" in parsed.errors[0].message
    assert "field 'guidance_scale' must be a number" in parsed.errors[1].message
    good = tmp_path / "good.csv"
    good.write_text("prompt,seed,guidance_scale\na red cat, 12 ,-1.5e0\na red cat,+3,.5\n")
    assert [(t.seed, t.sampling.policy.guidance_scale) for t in read_prompts(good, pipe.spec, SamplingConfig(steps=2)).tasks
            if t.line == 3] == [(3, 0.5)]
    assert read_prompts(good, pipe.spec, SamplingConfig(steps=2)).errors[0].message.startswith("guidance scale must be")


def test_generate_refuses_an_empty_prompt_as_batch_does(tiny_onnx_dir, tmp_path, capsys):
    for prompt in ("", "  ", "\ufeff"):
        args = generate_args(tiny_onnx_dir, tmp_path / "o.png")
        args[args.index("--prompt") + 1] = prompt
        assert cli_main(args) == 2
        assert "--prompt is empty" in capsys.readouterr().err
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "  "}\n')
    assert cli_main(batch_args(tiny_onnx_dir, prompts, tmp_path / "out")) == 2
    assert "empty prompt" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- long prompts


@pytest.fixture(scope="module")
def reference(tiny_sd_pipeline_dir) -> dict:
    """LONG as transformers' CLIPTokenizer, which diffusers runs, sees it: its token count, and the words it cuts."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_sd_pipeline_dir / "tokenizer")
    ids = tok(LONG).input_ids[1:-1]
    return {"tokens": len(ids), "kept": tok.model_max_length - 2,
            "dropped": " ".join(tok.decode(ids[tok.model_max_length - 2:]).split())}


def test_a_long_prompt_is_cut_and_recorded_in_the_api(pipe, reference):
    with pytest.warns(PromptTruncatedWarning) as record:
        gen = pipe.generate([LONG], SamplingConfig(steps=2), seeds=[0])[0]
    assert len(record) == 1 and str(record[0].message).endswith(f"dropped: {reference['dropped']!r}")
    assert gen.trace["truncation"] == {"prompt": reference}
    assert pipe.generate(["a red cat"], SamplingConfig(steps=2), seeds=[0])[0].trace["truncation"] is None


def test_batch_cuts_long_prompts_as_generate_does(tiny_onnx_dir, tmp_path, capsys, reference):
    """Batch stopped a job over real captions ('prompt has 107 tokens; the text encoder takes at most …') where
    generate cut with a warning, as diffusers does."""
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"a red cat\n{LONG}\n")
    out = tmp_path / "out"
    assert cli_main(batch_args(tiny_onnx_dir, prompts, out, "--images-per-prompt", "2")) == 0
    captured = capsys.readouterr()
    assert captured.err.count("dropped") == 1 and "line 2: prompt cut to the text encoder's length" in captured.err
    assert "prompts cut to the text encoder's length: 1" in captured.out
    entries = {e["id"]: e for e in manifest(out)}
    assert entries["000001-000"]["truncation"] is None
    for k in (0, 1):
        assert entries[f"000002-00{k}"]["truncation"]["prompt"]["dropped"] == reference["dropped"]
    refused = tmp_path / "refused"
    assert cli_main(batch_args(tiny_onnx_dir, prompts, refused, "--long-prompts", "error")) == 2
    assert f"line 2: prompt has {reference['tokens']} tokens; the text encoder takes at most 75" in capsys.readouterr().err
    assert not refused.exists()


def test_generate_warns_once_and_can_refuse(tiny_onnx_dir, tmp_path, reference):
    args = ["generate", "--model", str(tiny_onnx_dir), "--prompt", LONG, "--threads", "1", "--steps", "2",
            "--num-images", "3", "--batch-size", "1", "--out", str(tmp_path / "o.png"), "--trace", str(tmp_path / "t.json")]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("dropped") == 1 and result.stderr.count("\n") == 1, result.stderr
    assert json.loads((tmp_path / "t-2.json").read_text())["truncation"]["prompt"]["dropped"] == reference["dropped"]
    result = run_cli(*args, "--long-prompts", "error")
    assert result.returncode == 2 and f"--prompt has {reference['tokens']} tokens" in result.stderr


def test_detect_scores_long_prompts_with_one_warning(pipe, tmp_path, capsys, reference):
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"{LONG}\na red cat\n")
    args = ["detect", str(prompts), "--model", str(pipe.folder.path), "--threads", "1", "--steps", "3"]
    assert cli_main(args) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 3 and captured.err.count("dropped") == 1
    assert cli_main([*args, "--long-prompts", "error", "--on-error", "skip"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2 and f"line 1: prompt has {reference['tokens']} tokens" in captured.err


def test_the_warning_for_a_huge_prompt_shows_its_start_and_a_count(pipe):
    huge = "a red cat " + "dog " * 30_000  # ~120 KB
    cut = pipe.tokenizer.truncation(huge)
    message = cut.describe(huge)
    assert len(message) < 300 and message.startswith("prompt 'a red cat dog")
    assert message.endswith(f"…' ({cut.tokens - 75} tokens in all)") and cut.tokens == 30_003
    assert cut.dropped == " ".join(["dog"] * (30_003 - 75))  # the record keeps every dropped word


# ---------------------------------------------------------------------------------------------- permissions


@pytest.fixture
def group_umask(monkeypatch):
    """A process whose umask is 002 (as many sites set for shared groups) from its start: basinguard.files reads it
    once, at import."""
    from basinguard import files

    old = os.umask(0o002)
    monkeypatch.setattr(files, "_UMASK", 0o002)
    yield 0o664
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_batch_files_get_what_the_umask_allows(tiny_onnx_dir, tmp_path, group_umask):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    out = tmp_path / "out"
    assert cli_main(batch_args(tiny_onnx_dir, prompts, out)) == 0
    assert {p.name: mode(p) for p in out.iterdir()} == {".lock": group_umask, "manifest.jsonl": group_umask,
                                                       "000001-000.png": group_umask}


def test_external_weights_get_what_the_umask_allows(tmp_path, monkeypatch, group_umask):
    """onnx writes model.onnx_data 0600 whatever the umask: a folder exported by one account could not be served by
    another. Here any model counts as over 2 GiB, so that a small one is saved with external weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from basinguard.export import onnx_files

    weight = numpy_helper.from_array(np.ones((4, 64), np.float32), "w")  # over onnx's 1 KiB for external data
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight])
    raw = tmp_path / "raw.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(raw))
    monkeypatch.setattr(onnx_files, "_TWO_GIB", 0)
    final = tmp_path / "unet" / "model.onnx"
    final.parent.mkdir()
    onnx_files.save_checked(raw, final)
    assert mode(final.parent / onnx_files.EXTERNAL_DATA) == mode(final) == group_umask


def test_a_job_whose_first_batch_fails_leaves_no_out_dir(tiny_onnx_dir, tmp_path, capsys):
    """A failure once the models are loaded (here the VAE's scale factor) left OUT_DIR with a lock and an empty
    manifest."""
    model = copy_model(tiny_onnx_dir, tmp_path / "model")
    blocks = json.loads((model / "vae_decoder/config.json").read_text())["block_out_channels"]
    edit_json(model / "vae_decoder/config.json", block_out_channels=[*blocks, blocks[-1]])
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    out = tmp_path / "new" / "out"
    assert cli_main(batch_args(model, prompts, out)) == 2
    assert "scale factor of 4" in capsys.readouterr().err and not (tmp_path / "new").exists()


# Config fields out of range: each was met by a user as an error blaming a flag not given ("height 200000 not
# allowed"), an empty range ("a multiple of 1048576 in [1048576, 4096]"), numpy warnings then "NaN ... export in
# fp32", a silent image (Karras from sigma 5 up to 1), or an error naming no file.
@pytest.mark.parametrize(("part", "changes", "field"), [
    ("unet/config.json", {"sample_size": 100_000}, "sample_size"),
    ("vae_decoder/config.json", {"block_out_channels": [32] * 20}, "block_out_channels"),
    ("unet/config.json", {"block_out_channels": [32] * 20}, "block_out_channels"),
    ("scheduler/scheduler_config.json", {"num_train_timesteps": 10**7}, "num_train_timesteps"),
    ("scheduler/scheduler_config.json", {"use_karras_sigmas": True, "sigma_min": 5.0, "sigma_max": 1.0}, "sigma_min"),
    ("scheduler/scheduler_config.json", {"prediction_type": "sample"}, "prediction_type"),
], ids=["sample_size", "vae-levels", "unet-levels", "alphas-underflow", "karras-ends", "prediction-type"])
def test_a_config_field_out_of_range_is_one_line_naming_file_and_field(tiny_onnx_dir, tmp_path, capsys, part, changes,
                                                                        field):
    model = copy_model(tiny_onnx_dir, tmp_path / "model")
    edit_json(model / part, **changes)
    out = tmp_path / "o.png"
    assert cli_main(generate_args(model, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(model / part) in err and field in err, err
    assert not out.exists()


def test_calibrate_refuses_lines_scored_at_other_settings_than_it_records(tiny_onnx_dir, tmp_path, capsys):
    """`detect --calibrate` scored a line's own steps (d at step 0 then sits at another t) but recorded the flags'
    steps, so `auto` at the line's steps was warned about and at the flags' was not: the calibration lied."""
    memorized, normal = tmp_path / "m.jsonl", tmp_path / "n.txt"
    normal.write_text("a big tree\ngreen sky\n")
    calibration = tmp_path / "c.json"
    args = ["detect", "--model", str(tiny_onnx_dir), "--threads", "1", "--steps", "3", "--calibrate",
            "--memorized", str(memorized), "--normal", str(normal), "--out", str(calibration)]
    memorized.write_text('{"prompt": "a red cat"}\n{"prompt": "a blue dog", "steps": 5}\n')
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{memorized} line 2" in err and "steps" in err and "steps 3" in err, err
    assert not calibration.exists()
    memorized.write_text('{"prompt": "a red cat"}\n{"prompt": "a blue dog", "steps": 3}\n')  # the flags' own value
    assert cli_main(args) == 0 and json.loads(calibration.read_text())["steps"] == 3


@pytest.mark.parametrize("threads", [0, -1, "2", 1.5, True])
def test_the_api_refuses_a_thread_count_the_cli_would(tiny_onnx_dir, threads):
    """`--threads` takes integers >= 1; Pipeline(threads=...) took 0 and -1 as ONNX Runtime's default without a word
    and failed on "2" with pybind's "incompatible function arguments"."""
    with pytest.raises(InputError, match=r"threads must be an integer >= 1"):
        Pipeline(tiny_onnx_dir, threads=threads)  # type: ignore[arg-type]


@pytest.mark.parametrize("folder", [123, None])
def test_the_api_refuses_a_model_folder_that_is_no_path(folder):
    with pytest.raises(ModelFolderError, match="a model folder is a path"):
        Pipeline(folder)  # type: ignore[arg-type]


def test_the_demo_refuses_training_images_of_another_size_than_the_model_makes(tiny_onnx_dir, tmp_path, capsys):
    """The shipped memorization set (32x32 images) beside a 16x16 model: the demo ran the whole model, then ended in
    numpy's "matmul: Input operand 1 has a mismatch in its core dimension" traceback."""
    model = copy_model(tiny_onnx_dir, tmp_path / "model")
    shutil.copytree(SHIPPED / "memorization", model / "memorization")
    out = tmp_path / "demo"
    assert cli_main(["demo", "--model", str(model), "--threads", "1", "--seeds", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "32x32" in err and "16x16" in err and str(model / "memorization") in err, err
    assert not out.exists()


def test_detect_refuses_a_negative_seed_in_one_line(pipe, tmp_path, capsys):
    """`detect --seed -1` ended in numpy's "expected non-negative integer" traceback (the step-noise generators
    were seeded before the latents' check); generate and batch refuse it in one line."""
    from basinguard.runtime.detection import detection_scores

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    assert cli_main(["detect", str(prompts), "--model", str(pipe.folder.path), "--threads", "1", "--steps", "2",
                     "--seed", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--seed must be an integer >= 0 (got -1)" in err, err
    with pytest.raises(InputError, match="seed -1 not allowed"):
        detection_scores(pipe, ["a red cat"], SamplingConfig(steps=2, scheduler="euler-a"), seeds=[-1])


@pytest.mark.parametrize(("extra", "message"), [
    (["--image-size", "100000"], "--image-size: height 100000 not allowed: must be a multiple of 4 in [4, 4096]"),
    (["--max-image-size", "8192x16"], "--max-image-size: height 8192 not allowed"),
    (["--models", "unet", "text_encoder_2"], "--models text_encoder_2: "),
])
def test_build_engines_refuses_what_the_folder_cannot_serve_before_any_builder(tiny_onnx_dir, capsys, extra, message):
    """A profile for sizes generate refuses, or a part the folder lacks (SDXL's text_encoder_2 on an SD folder),
    passed the checks and went on to the TensorRT build (here, without TensorRT: "tensorrt is not installed",
    which named neither problem)."""
    assert cli_main(["build-engines", str(tiny_onnx_dir), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_detect_prints_one_row_per_prompt_line_even_with_a_carriage_return(pipe, tmp_path, capsys):
    """Tabs and newlines in a prompt were escaped but a lone \\r was printed as it is, and a reader in text mode
    (Python's universal newlines, spreadsheets) saw the row broken in two."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red\rcat"}) + "\n" + json.dumps({"prompt": "a blue dog"}) + "\n")
    assert cli_main(["detect", str(prompts), "--model", str(pipe.folder.path), "--threads", "1", "--steps", "2"]) == 0
    rows = io.StringIO(capsys.readouterr().out, newline=None).read().splitlines()
    assert len(rows) == 3 and rows[1].endswith("\ta red\\rcat"), rows
