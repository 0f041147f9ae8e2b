"""One owner per concern: sampling settings (library → model → overrides, one validation), the model spec (the
folder read once, one tokenizer rule, a tokenizer that must fit its encoder), and what a job says about cut prompts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_model
from PIL import Image

from basinguard.batch import prompts as prompt_files
from basinguard.batch.output import output_lock
from basinguard.cli import SHIPPED_MODEL
from basinguard.cli import main as cli_main
from basinguard.errors import BasinguardError
from basinguard.model_format import ModelFolderError
from basinguard.runtime.guidance import PolicyConfig
from basinguard.runtime.pipeline import Pipeline, SamplingConfig
from basinguard.runtime.settings import sampling_from, with_overrides
from basinguard.runtime.spec import ModelSpec

LONG = " ".join(["red square and blue circle"] * 10)  # 50 words: more than the shipped encoder's 30 prompt tokens


def edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def shipped() -> Pipeline:
    return Pipeline(SHIPPED_MODEL, threads=1)


def test_the_api_applies_the_models_sampling_defaults(shipped):
    """As a diffusers pipeline applies its configs: generate() without settings runs the model's own sampling_defaults
    (the shipped model's: stp, τ 400, λ 7.5, DDIM), the same image as those settings written out by hand."""
    defaults = json.loads((SHIPPED_MODEL / "basinguard.json").read_text())["sampling_defaults"]
    assert defaults["policy"] == "stp" and defaults["transition_t"] == 400
    (ours,) = shipped.generate(["a red square"], seeds=[0], steps=6)
    by_hand = SamplingConfig(steps=6, scheduler="ddim", policy=PolicyConfig(
        "stp", guidance_scale=defaults["guidance_scale"], transition_t=defaults["transition_t"]))
    (explicit,) = shipped.generate(["a red square"], by_hand, seeds=[0])
    assert ours.trace["policy"] == {"name": "stp", "guidance_scale": 7.5, "transition_t": 400, "pre_scale": 0.0}
    assert ours.trace["scheduler"] == "ddim"
    np.testing.assert_array_equal(ours.pixels, explicit.pixels)
    # Explicit values win, and a library default fills what neither says.
    (dtp,) = shipped.generate(["a red square"], seeds=[0], steps=6, policy="dtp", guidance_scale=5.0)
    assert dtp.trace["policy"]["name"] == "dtp" and dtp.trace["policy"]["guidance_scale"] == 5.0


def test_the_api_and_the_cli_make_the_same_image_from_the_models_defaults(shipped, tmp_path):
    assert cli_main(["generate", "--prompt", "a red square", "--seed", "3", "--steps", "5", "--threads", "1",
                     "--out", str(tmp_path / "cli.png")]) == 0
    (api,) = shipped.generate(["a red square"], seeds=[3], steps=5)
    with Image.open(tmp_path / "cli.png") as image:
        np.testing.assert_array_equal(np.asarray(image), np.asarray(api.to_pil()))


def test_api_settings_are_checked_like_flags(shipped):
    with pytest.raises(BasinguardError, match="transition_t applies to stp and og-stp only, not dtp"):
        shipped.generate(["a red square"], seeds=[0], policy="dtp", transition_t=300)
    with pytest.raises(BasinguardError, match="unknown sampling setting 'guidance'"):
        shipped.generate(["a red square"], seeds=[0], guidance=3.0)
    with pytest.raises(BasinguardError, match="not both"):
        shipped.generate(["a red square"], SamplingConfig(), seeds=[0], steps=3)


def test_settings_merge_library_then_model_then_overrides():
    model = {"policy": "auto", "detect_threshold": 4.0, "guidance_scale": 5.0, "steps": 20}
    merged = sampling_from(model, {"steps": 7})
    assert (merged.steps, merged.policy.name, merged.policy.guidance_scale, merged.policy.detect_threshold,
            merged.policy.transition_t) == (7, "auto", 5.0, 4.0, 500)
    # The model's threshold is for its auto policy: under another policy it would flag every job, so it is dropped.
    assert sampling_from(model, {"policy": "dtp"}).policy.detect_threshold is None
    assert sampling_from(model, {"policy": "dtp", "detect_threshold": 2.0}).policy.detect_threshold == 2.0
    line = with_overrides(merged, {"policy": "stp", "transition_t": 300}, lambda name: f"field {name}")
    assert (line.policy.name, line.policy.transition_t, line.steps) == ("stp", 300, 7)
    with pytest.raises(BasinguardError, match="field pre_scale applies to stp and dtp only, not og-dtp"):
        with_overrides(merged, {"policy": "og-dtp", "pre_scale": 1.0}, lambda name: f"field {name}")


def test_one_tokenizer_rule_where_config_and_onnx_width_differ(tmp_path, capsys):
    """The tokenizer config states no length and the text encoder's config says 77, but its ONNX input is fixed at 32:
    the spec (which checks prompts before any model loads) and the pipeline (which encodes them) pad to 32 alike,
    so `--long-prompts error` refuses exactly the prompts the encoder would cut."""
    model = copy_model(SHIPPED_MODEL, tmp_path / "model")
    edit_json(model / "tokenizer/tokenizer_config.json", model_max_length=None)
    edit_json(model / "text_encoder/config.json", max_position_embeddings=77)
    spec = ModelSpec(model)
    assert spec.tokenizer.max_length == 32 == Pipeline(model, threads=1).tokenizer.max_length
    assert spec.tokenizer.truncation(LONG) is not None  # 50 words: cut at 30
    args = ["generate", "--model", str(model), "--threads", "1", "--steps", "2", "--out", str(tmp_path / "x.png")]
    assert cli_main([*args, "--prompt", LONG, "--long-prompts", "error"]) == 2
    assert "--prompt has 50 tokens; the text encoder takes at most 30" in capsys.readouterr().err
    assert cli_main([*args, "--prompt", "red square and blue circle", "--long-prompts", "error"]) == 0


@pytest.mark.parametrize("change, message", [
    ({"eos_token_id": 5}, "the tokenizer's eos token is id 760, the text encoder's eos_token_id is 5"),
    ({"bos_token_id": 3}, "the tokenizer's bos token is id 759, the text encoder's bos_token_id is 3"),
    ({"vocab_size": 700}, "the tokenizer has 761 ids, the text encoder's vocab_size is 700"),
])
def test_a_tokenizer_that_does_not_fit_its_encoder_is_refused_naming_both(tmp_path, change, message):
    model = copy_model(SHIPPED_MODEL, tmp_path / "model")
    edit_json(model / "text_encoder/config.json", **change)
    with pytest.raises(ModelFolderError, match=message) as refused:
        ModelSpec(model)
    assert str(model / "tokenizer") in str(refused.value) and str(model / "text_encoder/config.json") in str(
        refused.value)


def test_another_models_tokenizer_is_refused(tmp_path, tiny_onnx_dir):
    """The tokenizer folder of another model (the tiny test model's) in the shipped model: its special ids are not
    the ones the shipped text encoder was trained with, so the images would be wrong without a word."""
    model = copy_model(SHIPPED_MODEL, tmp_path / "model")
    shutil.rmtree(model / "tokenizer")
    shutil.copytree(tiny_onnx_dir / "tokenizer", model / "tokenizer")
    edit_json(model / "tokenizer/tokenizer_config.json", model_max_length=32)  # past the length check
    with pytest.raises(ModelFolderError, match="does not fit"):
        ModelSpec(model)


def test_the_legacy_clip_ids_are_not_the_tokenizers(tmp_path):
    """SD 1.x's text encoder config states bos/eos ids 0/2 whatever its tokenizer's (49406/49407): no refusal."""
    model = copy_model(SHIPPED_MODEL, tmp_path / "model")
    edit_json(model / "text_encoder/config.json", bos_token_id=0, eos_token_id=2)
    assert ModelSpec(model).tokenizer.eos_id == 760


def test_batch_names_cut_prompts_once_after_its_checks(tmp_path, capsys):
    """A job's cut prompts: one warning with a count and the first few, after the lock and same-job checks, and only
    for the images this run makes (not again on a resume with nothing left)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"{LONG} {k}" for k in range(5)) + "\na red square\n")
    out = tmp_path / "out"
    args = ["batch", str(prompts), str(out), "--threads", "1", "--steps", "2", "--no-progress"]
    with output_lock(out):  # another job holds OUT_DIR: the refusal alone
        assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "in use by another batch job" in err and "cut to the text encoder" not in err
    assert cli_main(args) == 0
    cut = [line for line in capsys.readouterr().err.splitlines() if "cut to the text encoder" in line]
    assert len(cut) == 1 and "5 prompt(s) cut" in cut[0] and "line 1:" in cut[0] and "and 2 more" in cut[0]
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sum(e["truncation"] is not None for e in manifest) == 5  # the details stay in the manifest
    assert cli_main(args) == 0  # resumed with nothing left
    assert "cut to the text encoder" not in capsys.readouterr().err


def test_generate_names_a_cut_negative_prompt_as_such(tmp_path, capsys):
    assert cli_main(["generate", "--prompt", "a red square", "--negative-prompt", LONG, "--threads", "1",
                     "--steps", "2", "--out", str(tmp_path / "x.png")]) == 0
    cut = [line for line in capsys.readouterr().err.splitlines() if "cut" in line or "dropped" in line]
    assert len(cut) == 1 and cut[0].startswith("basinguard generate: warning: negative prompt cut to the text "
                                               "encoder's length: ")


@pytest.mark.parametrize("value", [[512, 768], "512x768", "512,768", " 512 x 768 "])
def test_a_pair_field_reads_the_same_in_every_format(value):
    assert prompt_files._typed("original_size", value) == (512, 768)


@pytest.mark.parametrize("value", [[512], "512", "512x", [512, 7.5], "axb"])
def test_a_bad_pair_field_names_both_forms(value):
    with pytest.raises(ValueError, match=r"must be two integers, \[A, B\] or \"AxB\""):
        prompt_files._typed("original_size", value)
