"""Start-up: a whole `basinguard generate` of a few steps on the shipped model, cold against warm.

cold: an empty user cache (BASINGUARD_CACHE_DIR), as on a first run: the attention fusion imports `onnx` (with
ml_dtypes, most of the cost), rewrites the UNet and VAE graphs and caches them. Before the cache existed every run
paid this. warm: the cache a cold run left: the fused graphs are opened as they are, and `onnx` is never imported.
Each run is a fresh process (`python -c` calling the CLI's main, then saying whether `onnx` was imported); the two
kinds alternate round by round, so that the machine's drift hits both alike. Wall times are the child's whole life.

    python benchmarks/start_up.py --rounds 5 --steps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = ("import sys; from basinguard.cli import main\n"
         "rc = main(['generate', '--prompt', 'a red square', '--steps', sys.argv[1], '--threads', '1', '--out', "
         "sys.argv[2]])\n"
         "print('onnx imported:', 'onnx' in sys.modules); sys.exit(rc)\n")


def run(cache: Path, steps: int, out: Path) -> tuple[float, bool]:
    env = {**os.environ, "BASINGUARD_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", CHILD, str(steps), str(out)], capture_output=True, text=True,
                            env=env, check=True)
    wall = time.perf_counter() - start
    return wall, result.stdout.strip().endswith("onnx imported: True")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="timed runs of each kind, alternated")
    parser.add_argument("--steps", type=int, default=3, help="denoising steps of each generate")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch_dir = Path(scratch)
        warm_cache = scratch_dir / "warm-cache"
        run(warm_cache, args.steps, scratch_dir / "x.png")  # leaves the cache the warm runs read
        times: dict[str, list[float]] = {"cold": [], "warm": []}
        imported: dict[str, set[bool]] = {"cold": set(), "warm": set()}
        for k in range(args.rounds):
            order = ("cold", "warm") if k % 2 == 0 else ("warm", "cold")
            for kind in order:
                cache = warm_cache if kind == "warm" else scratch_dir / f"cold-cache-{k}"
                wall, onnx_imported = run(cache, args.steps, scratch_dir / "x.png")
                times[kind].append(wall)
                imported[kind].add(onnx_imported)
    cold, warm = statistics.median(times["cold"]), statistics.median(times["warm"])
    print(f"generate --steps {args.steps} on the shipped model, {args.rounds} rounds, medians:")
    for kind, median in (("cold", cold), ("warm", warm)):
        said = "yes" if imported[kind] == {True} else "no" if imported[kind] == {False} else "sometimes"
        runs = " ".join(f"{t:.2f}" for t in times[kind])
        print(f"  {kind}: {median:.2f} s  (runs: {runs})  onnx imported: {said}")
    print(f"  cold / warm: {cold / warm:.2f}x; warm saves {cold - warm:.2f} s a run")


if __name__ == "__main__":
    main()
