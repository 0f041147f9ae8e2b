"""The README's picture: `basinguard demo`'s duplicated-caption section as one PNG.

    python benchmarks/demo_figure.py --out docs/images/demo.png [--seeds 6] [--threads 2]

Runs the demo (`basinguard.demo.run_demo`, its report kept in a temporary folder), then draws its image grids
for the duplicated training caption (the training image, then one row per policy, one image per seed) beside d
per step for seed 0 with each policy's transition step marked. Needs matplotlib (the `bench` or `test` extra).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from basinguard.cli import SHIPPED_MODEL
from basinguard.demo import COLOURS, DEMO_POLICIES, load_memorization, run_demo
from basinguard.runtime.pipeline import Pipeline


def seed0_traces(folder: Path, caption: str, threads: int | None) -> dict[str, dict]:
    """Seed 0's trace under each demo policy, at the demo's settings (the model's defaults; an image depends only on
    its prompt, seed and settings, so these are the demo's seed-0 generations)."""
    pipe = Pipeline(folder, threads=threads)
    return {name: pipe.generate([caption], seeds=[0], policy=name)[0].trace for name in DEMO_POLICIES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/images/demo.png", help="PNG to write (default: docs/images/demo.png)")
    ap.add_argument("--model", default=str(SHIPPED_MODEL), help="model folder with memorization/ (default: shipped)")
    ap.add_argument("--seeds", type=int, default=6, help="seeds per policy, as `basinguard demo --seeds`")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(args.model)
    rows, _, _ = load_memorization(folder)
    caption = rows[0]["caption"]  # the demo's duplicated caption
    with tempfile.TemporaryDirectory() as tmp:
        run_demo(folder, Path(tmp), seeds=args.seeds, threads=args.threads, log=lambda _: None)
        train = np.asarray(Image.open(Path(tmp) / "train_0.png"))
        grids = {name: np.asarray(Image.open(Path(tmp) / f"dup_{name}.png")) for name in DEMO_POLICIES}
    traces = seed0_traces(folder, caption, args.threads)

    fig = plt.figure(figsize=(11, 4.2))
    spec = fig.add_gridspec(len(DEMO_POLICIES), 4, width_ratios=[0.9, 0.45, 0.9 * args.seeds, 4.2], wspace=0.05)
    ax = fig.add_subplot(spec[:, 0])
    ax.imshow(train)
    ax.set_title("training image", fontsize=9)
    ax.axis("off")
    for i, name in enumerate(DEMO_POLICIES):
        ax = fig.add_subplot(spec[i, 2])
        ax.imshow(grids[name])
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9, color=COLOURS[name])
        if i == 0:
            ax.set_title(f"seeds 0–{args.seeds - 1}", fontsize=9)
    ax = fig.add_subplot(spec[:, 3])
    for name, trace in traces.items():
        gap = np.array([np.nan if v is None else v for v in trace["gap"]], float)
        ax.plot(gap, color=COLOURS[name], lw=1.3, label=name)
        step = trace["transition_step"]
        if step is not None and np.isfinite(gap[step]):
            ax.plot(step, gap[step], "o", color=COLOURS[name], ms=5)
    ax.set_xlabel("denoising step (t = T at step 0)")
    ax.set_ylabel("d = ‖ε(x_t, e_p) − ε(x_t, e_∅)‖₂")
    ax.yaxis.set_label_position("right")
    ax.yaxis.tick_right()
    ax.set_title("d per step, seed 0 (dot: transition step; stp measures no d before τ)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"“{caption}” (a duplicated training caption of the shipped model)", fontsize=10)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
