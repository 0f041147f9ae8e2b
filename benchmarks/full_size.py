"""Full-size checkpoints on one machine (issue 17): SD 1.5, SD 2.1-768-v and SDXL base, exported, checked and timed.

    python benchmarks/full_size.py build  --model sd21-768v [--work /work/fullsize]
    python benchmarks/full_size.py export --model sd21-768v [--work ...]       # `basinguard export`, peak RSS
    python benchmarks/full_size.py check  --model sd21-768v [--steps 3]        # generate vs diffusers, peak RSS
    python benchmarks/full_size.py stages --model sd21-768v [--repeats 3]      # per stage: ours/diffusers/optimum
    python benchmarks/full_size.py policies --model sd21-768v [--steps 4]      # whole generations: cfg, stp, dtp
    python benchmarks/full_size.py all    --model sd21-768v                    # the four in order

Pipelines are built from the published configs in `full_size_configs.json` (beside this script) with random
weights (the classes' own initialisation, seed 0), CLIP's real BPE vocabulary (open_clip_torch's
bpe_simple_vocab_16e6.txt.gz, the file CLIP's vocab.json/merges.txt were made from), and no download.

Every section runs its models in a fresh subprocess, one model at a time, at `--threads` (default 2: torch
set_num_threads, ONNX Runtime intra_op_num_threads, one inter-op thread), and appends its result to
`--results` (default benchmarks/results/full_size.json) as soon as it is done, so a crash or a kill loses nothing
already written. Each record carries the date, versions, machine and the exact command. Peak RSS is the child's
(`resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` of a fresh process per measurement: the process's own VmHWM).

Goals (issue 17), as ratios within one run: UNet call at batch 2 ≥ 1.5x faster than diffusers-torch and ≥ 1.1x
faster than optimum's ORT session on the same ONNX file; whole generation dtp/cfg ≤ 1.01 and stp/cfg ≤ 0.8
(τ = 500: before it the UNet runs at batch N instead of 2N). Where one is missed, the printed table says by how
much and what the stage times show.

Too slow and too big for CI (minutes and gigabytes per model); CI keeps the tiny models.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = Path(__file__).with_name("full_size_configs.json")
DEFAULT_RESULTS = ROOT / "benchmarks/results/full_size.json"
MODELS = ("sd15", "sd21-768v", "sdxl")
PROMPT = "a photo of an astronaut riding a horse on mars"
GOALS = {"unet_vs_torch": 1.5, "unet_vs_optimum": 1.1, "dtp_over_cfg": 1.01, "stp_over_cfg": 0.8}


# ------------------------------------------------------------------------------------------------ build


def clip_vocab(folder: Path) -> tuple[Path, Path]:
    """vocab.json + merges.txt made from open_clip's BPE file as CLIP's tokenizer files were: 256 byte symbols,
    the same with "</w>", the first 48,894 merges, then <|startoftext|> and <|endoftext|> (49,408 tokens)."""
    from importlib.util import find_spec

    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    spec = find_spec("open_clip")  # located, not imported: open_clip's import needs torchvision
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs open_clip_torch for CLIP's BPE vocabulary: pip install open_clip_torch")
    bpe = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1: 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab, merges_file


def _save(module: Any, dest: Path) -> None:
    # 2 GB shards: safetensors serialises a shard in memory, so a whole SDXL UNet in one shard would double it.
    module.save_pretrained(dest, safe_serialization=True, max_shard_size="2GB")


def build(name: str, dest: Path) -> Path:
    """Write the pipeline `name` with random weights to `dest`, one component at a time (freed before the next)."""
    import diffusers
    import torch
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTokenizer

    cfg = json.loads(CONFIGS.read_text())[name]
    torch.manual_seed(0)
    tmp = dest.with_name(dest.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"_class_name": cfg["pipeline_class"], "_diffusers_version": diffusers.__version__}
    vocab, merges = clip_vocab(tmp / "_vocab")
    for tok in ("tokenizer", "tokenizer_2"):
        if tok in cfg:
            CLIPTokenizer(str(vocab), str(merges), **cfg[tok]).save_pretrained(tmp / tok)
            index[tok] = ["transformers", "CLIPTokenizer"]
    for enc in ("text_encoder", "text_encoder_2"):
        if enc in cfg:
            options = dict(cfg[enc])
            cls = getattr(transformers, options.pop("class"))
            if not (tmp / enc / "config.json").is_file():  # a build that was stopped resumes here
                _save(cls(transformers.CLIPTextConfig(**options)).eval(), tmp / enc)
            index[enc] = ["transformers", cls.__name__]
    for part, cls in (("vae", AutoencoderKL), ("unet", UNet2DConditionModel)):
        if not (tmp / part / "config.json").is_file():
            _save(cls(**cfg[part]).eval(), tmp / part)
        index[part] = ["diffusers", cls.__name__]
    scheduler_options = dict(cfg["scheduler"])
    scheduler_cls = getattr(diffusers, scheduler_options.pop("_class_name"))
    scheduler_cls.from_config(scheduler_options).save_pretrained(tmp / "scheduler")  # keeps the published keys
    index["scheduler"] = ["diffusers", scheduler_cls.__name__]
    if cfg["pipeline_class"] == "StableDiffusionPipeline":
        index |= {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    else:
        index |= {"force_zeros_for_empty_prompt": True}
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    for leftover in (tmp / "_vocab").iterdir():
        leftover.unlink()
    (tmp / "_vocab").rmdir()
    tmp.rename(dest)
    return dest


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=("build", "export", "check", "stages", "policies", "all"))
    parser.add_argument("--model", choices=MODELS, required=True)
    parser.add_argument("--work", type=Path, default=Path("/work/fullsize"), help="pipelines and exports go here")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    source = args.work / args.model
    if args.section == "build":
        if source.exists():
            raise SystemExit(f"{source} exists")
        build(args.model, source)
        print(f"wrote {source}")


if __name__ == "__main__":
    main()
