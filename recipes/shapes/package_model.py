"""Package the trained model into basinguard/models/shapes: ONNX export, diffusers source, memorization files.

    python recipes/shapes/package_model.py build/shapes-model [--defaults '{"guidance_scale": 5, ...}']

Layout of the shipped folder (what `--model` defaults to):
  text_encoder/ unet/ vae_decoder/ tokenizer/ scheduler/ model_index.json basinguard.json   the ONNX model
  diffusers/                  the diffusers pipeline it was exported from (safetensors)
  memorization/               duplicated.jsonl, images/, other_captions.txt, attributes.onnx, attributes.json
`sampling_defaults` in basinguard.json carry the settings chosen by measurement (docs/memorization.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memorizing_data as data  # noqa: E402

from basinguard.cli import SHIPPED_MODEL  # noqa: E402
from basinguard.export.onnx_export import export_pipeline  # noqa: E402

# chosen by `benchmarks/memorization.py` (docs/memorization.md): stp at τ = 400 copies least while keeping the most alignment
SHIPPED_DEFAULTS = {"policy": "stp", "mitigation": "stp", "guidance_scale": 7.5, "opposite_scale": 2.0,
                    "transition_t": 400, "scheduler": "ddim", "steps": 50}


def label_names() -> list[str]:
    """Names of the attribute classifier's outputs, in its order (memorizing_data.attribute_labels)."""
    shapes = [f"{c} {k}" for c in data.COLOUR_NAMES for k in data.KINDS]
    return shapes + [f"{c} background" for c in data.COLOUR_NAMES]


def set_defaults(folder: Path, defaults: dict) -> None:
    manifest_path = folder / "basinguard.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["sampling_defaults"] = {**manifest.get("sampling_defaults", {}), **defaults}
    manifest_path.write_text(json.dumps(manifest, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trained", type=Path, help="diffusers folder written by train_memorizing_model.py")
    ap.add_argument("--out", type=Path, default=SHIPPED_MODEL)
    ap.add_argument("--defaults", default=json.dumps(SHIPPED_DEFAULTS),
                    help="JSON sampling defaults to record (default: the shipped model's, chosen by measurement, docs/memorization.md)")
    ap.add_argument("--skip-classifier", action="store_true")
    args = ap.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    export_pipeline(args.trained, args.out)
    ignore = shutil.ignore_patterns("_work", "memorization")
    shutil.copytree(args.trained, args.out / "diffusers", ignore=ignore)
    shutil.copytree(args.trained / "memorization", args.out / "memorization")
    (args.out / "memorization" / "attributes.json").write_text(
        json.dumps({"labels": label_names(), "palette": data.COLOURS}))
    if not args.skip_classifier:
        subprocess.run([sys.executable, str(Path(__file__).parent / "train_attribute_classifier.py"), str(args.trained),
                        str(args.out / "memorization" / "attributes.onnx")], check=True)
    set_defaults(args.out, json.loads(args.defaults))
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"packaged {args.out}: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
