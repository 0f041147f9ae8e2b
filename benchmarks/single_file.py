"""A full-size SD 1.5 single-file checkpoint with two LoRAs, exported by `basinguard export`: wall time, peak RSS.

    python benchmarks/single_file.py build  [--work /work/fullsize]   # the checkpoint and two LoRAs
    python benchmarks/single_file.py export [--work /work/fullsize]   # basinguard export FILE --lora .. --lora ..

build: the random-weight SD 1.5 pipeline of benchmarks/full_size.py (published config, seed 0), written as one
float16 .safetensors file in the original (LDM) layout, as hub checkpoints are (tests/ldm_layout.py inverts
diffusers' key mapping; basinguard itself has none), and two random rank-16 LoRAs on every attention projection of
the UNet and the text encoder: one in diffusers/PEFT naming, one in kohya's (alpha 8).

export: `basinguard export sd15.safetensors OUT --lora peft.safetensors:0.8 --lora kohya.safetensors:0.5` (the
shipped SD 1.5 configs, fp32, validated), then `basinguard export` of the diffusers folder the file was written
from (`--folder-first`: in the other order), each in a fresh process at `--threads`: wall times, their ratio and peak RSS (wait4's ru_maxrss) appended to
`--results` (default benchmarks/results/single_file.json) with the date, versions and machine. Run it alone
(under the full-size lock): it takes a few GiB and minutes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))  # ldm_layout: the test helper that writes the original layout
from full_size import _basinguard, _threads_env, append_record, build, run_measured  # noqa: E402

DEFAULT_RESULTS = ROOT / "benchmarks/results/single_file.json"
RANK = 16
LORAS = (("peft", 0.8), ("kohya", 0.5))


def _paths(work: Path) -> dict[str, Path]:
    return {"pipeline": work / "sd15", "checkpoint": work / "single-file/sd15.safetensors",
            "peft": work / "single-file/lora-peft.safetensors", "kohya": work / "single-file/lora-kohya.safetensors",
            "out": work / "single-file/onnx"}


def build_files(work: Path, threads: int) -> None:
    import torch
    from diffusers import StableDiffusionPipeline
    from ldm_layout import peft_to_kohya, save_ldm_checkpoint
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    torch.set_num_threads(threads)
    paths = _paths(work)
    if not paths["pipeline"].is_dir():
        build("sd15", paths["pipeline"])
    pipe = StableDiffusionPipeline.from_pretrained(paths["pipeline"], safety_checker=None)
    save_ldm_checkpoint(pipe, paths["checkpoint"], dtype=torch.float16)
    for k, (name, _) in enumerate(LORAS):
        torch.manual_seed(100 + k)
        pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=False,
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name=name)
        pipe.text_encoder.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=False,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]),
                                      adapter_name=name)
        state = {f"unet.{k2}": v for k2, v in get_peft_model_state_dict(pipe.unet, adapter_name=name).items()}
        state |= {f"text_encoder.{k2}": v
                  for k2, v in get_peft_model_state_dict(pipe.text_encoder, adapter_name=name).items()}
        state = {key: 0.01 * v.contiguous() for key, v in state.items()}  # small updates, as trained LoRAs are
        save_file(peft_to_kohya(state, alpha=8.0) if name == "kohya" else state, str(paths[name]))
    print(f"wrote {paths['checkpoint']} ({paths['checkpoint'].stat().st_size / 2**30:.2f} GiB) and two LoRAs")


def export(work: Path, threads: int, results: Path, folder_first: bool = False) -> None:
    """The single file with both LoRAs, then the diffusers folder it was written from (same weights, no LoRA), one
    after the other in the same conditions: the ratio of the two is the result on a loaded machine."""
    paths = _paths(work)
    single = [*_basinguard(), "export", str(paths["checkpoint"]), str(paths["out"])]
    for name, weight in LORAS:
        single += ["--lora", f"{paths[name]}:{weight}"]
    folder = [*_basinguard(), "export", str(paths["pipeline"]), str(paths["out"])]
    runs = {}
    order = [("single_file_2_loras", single), ("diffusers_folder", folder)]
    for label, command in order[::-1] if folder_first else order:
        shutil.rmtree(paths["out"], ignore_errors=True)
        runs[label] = run_measured(command, _threads_env(threads), work / f"single-file/export-{label}.log")
        print(label, runs[label])
    shutil.rmtree(paths["out"], ignore_errors=True)
    ratio = round(runs["single_file_2_loras"]["wall_s"] / runs["diffusers_folder"]["wall_s"], 2)
    append_record(results, {"section": "single_file_export", "model": "sd15 single file (float16 on disk) + 2 LoRAs",
                             "threads": threads, "checkpoint_gib": round(paths["checkpoint"].stat().st_size / 2**30, 2),
                             "order": list(runs), "runs": runs, "wall_ratio_single_over_folder": ratio})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=("build", "export"))
    parser.add_argument("--work", type=Path, default=Path("/work/fullsize"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--folder-first", action="store_true", help="export: the folder first (drift check)")
    args = parser.parse_args()
    if args.section == "build":
        build_files(args.work, args.threads)
    else:
        export(args.work, args.threads, args.results, args.folder_first)


if __name__ == "__main__":
    main()
