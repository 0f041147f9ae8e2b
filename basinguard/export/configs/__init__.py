"""The published configs of SD 1.5, SD 2.1-base, SD 2.1-768-v and SDXL base, shipped so that a single-file checkpoint
exports offline, and CLIP's tokenizer files made from CLIP's own BPE vocabulary.

`published.json` holds each pipeline's component configs in the diffusers layout (keys the classes default are
left out). `bpe_simple_vocab_16e6.txt.gz` is the BPE file OpenAI's CLIP (MIT licence) tokenizes with, as
open_clip_torch ships it; CLIP's vocab.json and merges.txt on the hubs were made from it, and `clip_vocab` makes
them the same way, so nothing is downloaded.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent
PUBLISHED = CONFIG_DIR / "published.json"
CLIP_BPE = CONFIG_DIR / "bpe_simple_vocab_16e6.txt.gz"
# What each shipped config is, for messages and the manifest.
DESCRIPTIONS = {"sd15": "SD 1.5", "sd21-base": "SD 2.1-base (512², epsilon)", "sd21-768v": "SD 2.1-768-v (v_prediction)",
                "sdxl": "SDXL base 1.0"}


def published_config(name: str) -> dict[str, Any]:
    """One pipeline's configs: pipeline_class, size, unet, vae, text_encoder(_2), tokenizer(_2), scheduler."""
    return json.loads(PUBLISHED.read_text(encoding="utf-8"))[name]


def clip_vocab(folder: Path) -> tuple[Path, Path]:
    """vocab.json + merges.txt made from CLIP's BPE file as CLIP's tokenizer files were: 256 byte symbols, the same
    with "</w>", the first 48,894 merges, then <|startoftext|> and <|endoftext|> (49,408 tokens)."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    merges = gzip.open(CLIP_BPE).read().decode("utf-8").split("\n")[1: 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab, merges_file


def write_config_folder(name: str, dest: Path, prediction_type: str | None = None) -> Path:
    """A diffusers pipeline folder without weights, from the published config `name`: model_index.json, each
    component's config.json, the tokenizers (CLIP's vocabulary) and the scheduler config; diffusers'
    `from_single_file(config=dest)` reads it offline. `prediction_type` overrides the scheduler's."""
    import diffusers
    import transformers
    from transformers import CLIPTokenizer

    cfg = published_config(name)
    dest.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"_class_name": cfg["pipeline_class"], "_diffusers_version": diffusers.__version__}
    vocab, merges = clip_vocab(dest / "_vocab")
    for tok in ("tokenizer", "tokenizer_2"):
        if tok in cfg:
            CLIPTokenizer(str(vocab), str(merges), **cfg[tok]).save_pretrained(dest / tok)
            index[tok] = ["transformers", "CLIPTokenizer"]
    for leftover in (vocab, merges):
        leftover.unlink()
    (dest / "_vocab").rmdir()
    for enc in ("text_encoder", "text_encoder_2"):
        if enc in cfg:
            options = dict(cfg[enc])
            cls_name = options.pop("class")
            config = transformers.CLIPTextConfig(**options)
            config.architectures = [cls_name]
            config.save_pretrained(dest / enc)
            index[enc] = ["transformers", cls_name]
    for part, cls_name in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL")):
        (dest / part).mkdir(exist_ok=True)
        config = {"_class_name": cls_name, "_diffusers_version": diffusers.__version__, **cfg[part]}
        (dest / part / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        index[part] = ["diffusers", cls_name]
    scheduler = {**cfg["scheduler"], "_diffusers_version": diffusers.__version__}
    if prediction_type is not None:
        scheduler["prediction_type"] = prediction_type
    (dest / "scheduler").mkdir(exist_ok=True)
    (dest / "scheduler/scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n", encoding="utf-8")
    index["scheduler"] = ["diffusers", scheduler["_class_name"]]
    if cfg["pipeline_class"] == "StableDiffusionPipeline":
        index |= {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    else:
        index |= {"force_zeros_for_empty_prompt": True}
    (dest / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return dest
