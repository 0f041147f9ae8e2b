"""The paper's experiments on the shipped model: copying, alignment, quality, detection.

    python benchmarks/memorization.py [--model DIR] [--seeds 8] [--out benchmarks/results/memorization]

Rows: cfg, stp over a τ grid, dtp, og-stp over a τ grid, og-dtp, and the prompt-level baselines of Somepalli et
al. (a random word / a random number inserted into the prompt, under cfg). Each row generates every
duplicated caption and a matched set of novel captions over `--seeds` seeds. Writes results.json,
results.md and figures (PNG). Similarity is top-1 over the whole training set (regenerated
deterministically by memorizing_data.py), as the paper does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes" / "shapes"))  # the shipped model's data
import memorizing_data as data  # noqa: E402

from basinguard.cli import SHIPPED_MODEL  # noqa: E402
from basinguard.demo import load_memorization  # noqa: E402
from basinguard.evaluation import (  # noqa: E402
    COPY_THRESHOLD,
    AttributeClassifier,
    EdgeDescriptor,
    attribute_alignment,
    colour_alignment,
    frechet_distance,
    mentioned_background,
    mentioned_labels,
    similarity_summary,
    top1_similarity,
)
from basinguard.runtime.detection import detection_scores, roc_auc, tpr_at_fpr  # noqa: E402
from basinguard.runtime.guidance import PolicyConfig  # noqa: E402
from basinguard.runtime.pipeline import Pipeline, SamplingConfig  # noqa: E402
from basinguard.runtime.spec import ModelSpec  # noqa: E402

TRAIN_SEED, N_VARIED = 0, 20000  # as recipes/shapes/train_memorizing_model.py
RANDOM_WORDS = ["lamp", "violin", "pebble", "tulip", "rocket", "spoon", "cloud", "anchor", "kettle", "zebra"]


def training_images() -> np.ndarray:
    samples = data.varied_samples(N_VARIED, seed=TRAIN_SEED) + data.duplicated_samples(20)
    return np.stack([data.render(s) for s in samples]).astype(np.float32) / 255


def descriptor_check(descriptor, train_desc: np.ndarray, train: np.ndarray, held_out: np.ndarray) -> dict:
    """Does the descriptor separate copies from non-copies on this data? Non-copies: held-out images of the
    varied generator (never trained on); copies: the duplicated training images. Both are degraded alike, as the
    VAE degrades generations (Gaussian blur σ 1.5 px, pixel noise σ 0.03), and scored against the whole set."""
    from basinguard.evaluation import gaussian_blur

    rng = np.random.default_rng(0)

    def degrade(x: np.ndarray) -> np.ndarray:
        return np.clip(gaussian_blur(x, 1.5) + rng.normal(0, 0.03, x.shape).astype(np.float32), 0, 1)

    non, _ = top1_similarity(descriptor(degrade(held_out)), train_desc)
    cop, _ = top1_similarity(descriptor(degrade(train[-20:])), train_desc)
    summary = {"non_copies": {q: float(np.percentile(non, p)) for q, p in (("p50", 50), ("p95", 95), ("p99", 99))}
               | {"max": float(non.max())}, "copies": {"min": float(cop.min()), "p50": float(np.median(cop))},
               "auc": roc_auc(cop, non), "non_copies_above_threshold": float((non > COPY_THRESHOLD).mean())}
    return summary


def perturb(caption: str, kind: str, rng: np.random.Generator) -> str:
    """Somepalli et al.'s prompt-level mitigations: insert a random word or number at a random place."""
    words = caption.split()
    token = str(rng.choice(RANDOM_WORDS)) if kind == "word" else str(int(rng.integers(0, 10000)))
    words.insert(int(rng.integers(0, len(words) + 1)), token)
    return " ".join(words)


def rows_to_run(spec: ModelSpec, taus: list[int], og_taus: list[int], ends: list[int] = (),
                **common: object) -> list[tuple[str, SamplingConfig, str | None]]:
    """The benchmark's rows at the model's own sampling defaults (λ, λ_og, scheduler, steps) with `common`
    overrides; for each T of `ends`, cfg, stp (at the model's τ), dtp and og-dtp again with an end of guidance."""
    rows = [("cfg", spec.sampling(policy="cfg", **common), None)]
    rows += [(f"stp τ={t}", spec.sampling(policy="stp", transition_t=t, **common), None) for t in taus]
    rows.append(("dtp", spec.sampling(policy="dtp", **common), None))
    # opposite guidance leaves the basin sooner (the paper's claim), so its grid starts CFG earlier than stp's
    rows += [(f"og-stp τ={t}", spec.sampling(policy="og-stp", transition_t=t, **common), None) for t in og_taus]
    rows += [("og-dtp", spec.sampling(policy="og-dtp", **common), None),
             ("random word (cfg)", spec.sampling(policy="cfg", **common), "word"),
             ("random number (cfg)", spec.sampling(policy="cfg", **common), "number")]
    for end in ends:
        rows += [(f"{name} end={end}", spec.sampling(policy=name, guidance_end_t=end, **common), None)
                 for name in ("cfg", "stp", "dtp", "og-dtp")]
    return rows


def generate_set(pipe: Pipeline, captions: list[str], seeds: int, sampling: SamplingConfig, batch: int = 64):
    """Every caption × seed; returns pixels (M, H, W, 3), traces, seconds per image."""
    prompts = [c for c in captions for _ in range(seeds)]
    seed_list = [s for _ in captions for s in range(seeds)]
    pixels, traces = [], []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        gens = pipe.generate(prompts[i : i + batch], sampling, seeds=seed_list[i : i + batch])
        pixels += [g.pixels for g in gens]
        traces += [g.trace for g in gens]
    return np.stack(pixels), traces, (time.perf_counter() - start) / len(prompts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=SHIPPED_MODEL)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--taus", default="800,700,600,500,400,300", help="stp's τ grid")
    ap.add_argument("--og-taus", default="700,600,500", help="og-stp's τ grid (λ_og: the model's opposite_scale)")
    ap.add_argument("--guidance-scale", type=float, default=None, help="override the model's λ")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/memorization"))
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--guidance-ends", default="", metavar="T,T,...", help="rows of cfg, stp (the model's τ), dtp and "
                    "og-dtp with an end of guidance at each T (--guidance-end-t)")
    ap.add_argument("--rows", default=None, help="run only the rows with these comma-separated labels (e.g. "
                    "'cfg,dtp,cfg end=200'), and neither the d curves nor detection (default: every row and both)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline(args.model, threads=args.threads)
    sampling = pipe.spec.sampling(policy="cfg", guidance_scale=args.guidance_scale)  # the model's, λ as given
    defaults = {"steps": sampling.steps, "scheduler": sampling.scheduler, "guidance_scale": sampling.policy.guidance_scale,
                "opposite_scale": sampling.policy.opposite_scale}  # as the results record them
    dup_rows, _, others = load_memorization(pipe.folder.path)
    dup_captions = [r["caption"] for r in dup_rows]
    novel_captions = others[: len(dup_captions)]
    descriptor = EdgeDescriptor()
    train = training_images()
    train_desc = descriptor(train)
    classifier = AttributeClassifier(pipe.folder.path / "memorization/attributes.onnx", threads=args.threads)
    attributes = json.loads((pipe.folder.path / "memorization/attributes.json").read_text())
    label_names = attributes["labels"]
    held_out = np.stack([data.render(s) for s in data.varied_samples(2000, seed=99)]).astype(np.float32) / 255
    _, held_features = classifier(held_out)
    check = descriptor_check(descriptor, train_desc, train, held_out)
    print(f"descriptor check: held-out non-copies p50 {check['non_copies']['p50']:.3f} p95 "
          f"{check['non_copies']['p95']:.3f} p99 {check['non_copies']['p99']:.3f}; degraded copies min "
          f"{check['copies']['min']:.3f}; AUC {check['auc']:.3f}", flush=True)
    rng = np.random.default_rng(0)
    generate_set(pipe, dup_captions[:1], 2, sampling)  # warm-up: the first row's time must not carry session start-up

    results = []
    examples: dict[str, np.ndarray] = {}
    gap_curves: dict[str, dict[str, np.ndarray]] = {}
    rows = rows_to_run(pipe.spec, [int(t) for t in args.taus.split(",")], [int(t) for t in args.og_taus.split(",")],
                       [int(t) for t in args.guidance_ends.split(",") if t], guidance_scale=args.guidance_scale)
    if args.rows is not None:
        wanted = [label.strip() for label in args.rows.split(",")]
        unknown = sorted(set(wanted) - {label for label, _, _ in rows})
        if unknown:
            raise SystemExit(f"--rows: no row {unknown[0]!r}; rows: {', '.join(label for label, _, _ in rows)}")
        rows = [row for row in rows if row[0] in wanted]
    for label, row_sampling, prompt_kind in rows:
        row = {"row": label, "policy": row_sampling.policy.parameters(), "prompt_change": prompt_kind}
        for part, captions in (("duplicated", dup_captions), ("novel", novel_captions)):
            prompts = [perturb(c, prompt_kind, rng) for c in captions] if prompt_kind else captions
            pixels, traces, per_image = generate_set(pipe, prompts, args.seeds, row_sampling)
            top1, _ = top1_similarity(descriptor(pixels), train_desc)
            mentioned = [mentioned_labels(c, label_names) for c in captions for _ in range(args.seeds)]
            probs, feats = classifier(pixels)
            align = attribute_alignment(probs, mentioned)
            colour = colour_alignment(pixels, mentioned, label_names, attributes["palette"])
            # The background a caption names (a third of the varied captions, no poster caption), scored apart from
            # the shapes: the layout is fixed early, where the mitigations hold CFG back.
            background = [mentioned_background(c, label_names) for c in captions for _ in range(args.seeds)]
            with_background = [k for k, labels in enumerate(background) if labels]
            ts = [t["transition_step"] for t in traces]
            non_copy = top1 <= COPY_THRESHOLD
            row[part] = {**similarity_summary(top1), "alignment": float(align.mean()),
                         # a copy of a poster shows its caption's shapes by construction: the alignment of the
                         # generations that do not copy separates that from what a mitigation costs
                         "alignment_non_copies": float(align[non_copy].mean()) if non_copy.any() else None,
                         "colour_alignment": float(colour.mean()),
                         "background_alignment": float(attribute_alignment(
                             probs[with_background], [background[k] for k in with_background]).mean())
                         if with_background else None,
                         "background_named": len(with_background),
                         "frechet": frechet_distance(feats, held_features),
                         "mean_transition_step": float(np.mean([t for t in ts if t is not None])) if any(
                             t is not None for t in ts) else None,
                         "never_switched": int(sum(t is None for t in ts)), "seconds_per_image": per_image}
            if part == "duplicated":
                examples[label] = pixels[:: args.seeds][:6]
        results.append(row)
        d, n = row["duplicated"], row["novel"]
        print(f"{label:22s} dup sim95 {d['sim95']:.3f} mean {d['sim_mean']:.3f} copies {d['copy_fraction']:.2f} "
              f"align {d['alignment']:.2f} FD {d['frechet']:.1f} | novel sim95 {n['sim95']:.3f} align {n['alignment']:.2f} "
              f"FD {n['frechet']:.1f} | {d['seconds_per_image'] * 1000:.1f} ms/img", flush=True)

    # d per step under zero CFG, opposite guidance and CFG (paper Figs. 2, 3, 6, 9).
    lam, og = defaults.get("guidance_scale", 7.5), defaults.get("opposite_scale")
    curves = () if args.rows is not None else (("zero CFG", PolicyConfig("cfg", guidance_scale=0.0)),
                         ("opposite guidance", PolicyConfig("og-stp", guidance_scale=lam, transition_t=0, opposite_scale=og)),
                         ("CFG", PolicyConfig("cfg", guidance_scale=lam)))
    for name, policy in curves:
        gap_curves[name] = {}
        for part, captions in (("duplicated", dup_captions), ("novel", novel_captions)):
            _, traces, _ = generate_set(pipe, captions, args.seeds, replace(sampling, policy=policy))
            gap_curves[name][part] = np.array([t["gap"] for t in traces], np.float64)

    # Detection (Wen et al.): scored by the product's own `detection_scores` (what `basinguard detect` and `auto`
    # use: plain CFG at λ, the first step(s), mean over seeds), duplicated captions against every varied caption the
    # model folder lists, so that TPR at 1 % FPR rests on more than a handful of negatives.
    detection = []
    combos = () if args.rows is not None else ((1, 1), (1, 4), (5, 4), (1, args.seeds))
    for steps, seeds in dict.fromkeys((st, min(se, args.seeds)) for st, se in combos):
        at_lambda = replace(sampling, policy=PolicyConfig("cfg", guidance_scale=lam))
        pos, neg = (detection_scores(pipe, captions, at_lambda, list(range(seeds)), steps=steps, batch_size=16)
                    for captions in (dup_captions, others))
        detection.append({"steps": steps, "seeds": seeds, "n_duplicated": len(pos), "n_varied": len(neg),
                          "auc": roc_auc(pos, neg), "tpr_at_1pct_fpr": tpr_at_fpr(pos, neg, 0.01),
                          "false_positives_allowed": int(np.floor(0.01 * len(neg) + 1e-9))})
        print(f"detection {steps} step(s) x {seeds} seed(s): AUC {detection[-1]['auc']:.3f} "
              f"TPR@1%FPR {detection[-1]['tpr_at_1pct_fpr']:.2f} ({len(pos)} vs {len(neg)} captions)", flush=True)

    meta = {"model": str(args.model), "seeds": args.seeds, "duplicated_captions": len(dup_captions),
            "novel_captions": len(novel_captions), "sampling": {**defaults}, "copy_threshold": COPY_THRESHOLD,
            "descriptor": "EdgeDescriptor (blurred colour gradients, 2x2-pooled, cosine)", "date": time.strftime("%Y-%m-%d")}
    classifier_eval = pipe.folder.path / "memorization/attributes.eval.json"
    if classifier_eval.exists():
        meta["classifier_held_out"] = json.loads(classifier_eval.read_text())
    meta["descriptor_check"] = check
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": results, "detection": detection,
                                                       "gap_mean": {k: {p: v.mean(0).tolist() for p, v in c.items()}
                                                                    for k, c in gap_curves.items()}}, indent=1))
    (args.out / "results.md").write_text(markdown(results, detection, meta))
    if not args.no_figures:
        figures(args.out, results, examples, gap_curves, dup_rows, pipe.folder.path)
    print(f"wrote {args.out}/results.json, results.md")


def markdown(results: list[dict], detection: list[dict], meta: dict) -> str:
    check = meta["descriptor_check"]
    lines = [f"Shipped model, {meta['seeds']} seeds × {meta['duplicated_captions']} duplicated and "
             f"{meta['novel_captions']} novel captions per row ({meta['date']}). Similarity = top-1 cosine similarity to "
             f"the whole training set (20,020 images) under the edge descriptor (copy: > {meta['copy_threshold']}); "
             "alignment = fraction of the caption's named shapes the attribute classifier finds (colour align: the "
             "model-free cross-check, named colours present); novel bg = fraction of the named background colours "
             "found, over the novel captions that name one (scored apart from the shapes); FD = Fréchet distance on the "
             "classifier's features vs held-out real images. Mean transition step: over the generations that switched "
             "(never: how many did not).", "",
             f"Descriptor check: held-out real images (non-copies) score p50 {check['non_copies']['p50']:.3f}, p95 "
             f"{check['non_copies']['p95']:.3f}, p99 {check['non_copies']['p99']:.3f} against the training set, the "
             f"duplicated images (copies) ≥ {check['copies']['min']:.3f}, both blurred (σ 1.5 px) and noised like VAE "
             f"outputs; AUC {check['auc']:.3f}; "
             f"{100 * check['non_copies_above_threshold']:.1f} % of non-copies above the threshold.", ""]
    if "classifier_held_out" in meta:
        c = meta["classifier_held_out"]["through VAE"]
        lines += [f"Attribute classifier on held-out images through the VAE: named-shape recall {c['named_shape_recall']:.3f}, "
                  f"false positives on absent shapes {c['absent_shape_false_positive_rate']:.3f}.", ""]
    lines += ["| row | dup sim95 | dup sim mean ± std | dup copies | dup align | dup align (non-copies) | dup colour align | "
              "dup FD | novel sim95 | novel align | novel bg | novel FD | mean transition step (dup; never) | ms / image |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        d, n = r["duplicated"], r["novel"]
        mts = "—" if d["mean_transition_step"] is None else f"{d['mean_transition_step']:.1f}; {d['never_switched']}"
        nbg = "—" if n.get("background_alignment") is None else f"{n['background_alignment']:.2f}"
        anc = "—" if d["alignment_non_copies"] is None else f"{d['alignment_non_copies']:.2f}"
        lines.append(f"| {r['row']} | {d['sim95']:.3f} | {d['sim_mean']:.3f} ± {d['sim_std']:.3f} | {d['copy_fraction']:.2f} | "
                     f"{d['alignment']:.2f} | {anc} | {d['colour_alignment']:.2f} | {d['frechet']:.1f} | {n['sim95']:.3f} | {n['alignment']:.2f} | {nbg} | {n['frechet']:.1f} | "
                     f"{mts} | {d['seconds_per_image'] * 1000:.1f} |")
    cfg = next(r for r in results if r["row"] == "cfg")
    floor = check["non_copies"]["p95"]
    lines += ["", "Goal: a mitigation cuts the duplicated captions' sim95 by ≥ 40 % with alignment ≥ 90 % of cfg's, "
              "and novel captions are not hurt (their alignment ≥ 90 % of cfg's). Floor: held-out real images, which copy "
              f"nothing, have sim95 {floor:.3f} under this descriptor, so no generator that stops copying can go below "
              f"about that: the largest cut this data allows from cfg's {cfg['duplicated']['sim95']:.3f} is "
              f"{100 * (1 - floor / cfg['duplicated']['sim95']):.0f} %.", "",
              "| row | dup sim95 cut | dup align / cfg | novel align / cfg | novel FD / cfg | goal |", "|---|---|---|---|---|---|"]
    for r in results:
        if r["prompt_change"] or r["row"] == "cfg":
            continue
        cut = 1 - r["duplicated"]["sim95"] / cfg["duplicated"]["sim95"]
        da = r["duplicated"]["alignment"] / cfg["duplicated"]["alignment"]
        na = r["novel"]["alignment"] / cfg["novel"]["alignment"]
        nf = r["novel"]["frechet"] / cfg["novel"]["frechet"]
        ok = cut >= 0.4 and da >= 0.9 and na >= 0.9
        lines.append(f"| {r['row']} | {100 * cut:.0f} % | {da:.2f} | {na:.2f} | {nf:.2f} | {'met' if ok else 'missed'} |")
    if detection:
        x = detection[0]
        lines += ["", f"Detection (`detection_scores`, as `basinguard detect`: plain CFG at λ): {x['n_duplicated']} "
                  f"duplicated captions against {x['n_varied']} varied captions (every one the model folder lists); "
                  f"1 % FPR allows {x['false_positives_allowed']} of them above the threshold."]
    lines += ["", "| detection score | AUC | TPR at 1 % FPR |", "|---|---|---|"]
    lines += [f"| d at first {x['steps']} step(s), mean of {x['seeds']} seed(s) | {x['auc']:.3f} | {x['tpr_at_1pct_fpr']:.2f} |"
              for x in detection]
    return "\n".join(lines) + "\n"


def figures(out: Path, results, examples, gap_curves, dup_rows, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5), sharey=True)
    for ax, (name, parts) in zip(axes, gap_curves.items()):
        for part, colour in (("duplicated", "tab:red"), ("novel", "tab:blue")):
            m, s = parts[part].mean(0), parts[part].std(0)
            ax.plot(m, color=colour, label=part)
            ax.fill_between(range(len(m)), m - s, m + s, color=colour, alpha=0.2)
        ax.set_title(f"d per step under {name}")
        ax.set_xlabel("step")
    axes[0].set_ylabel("d = ‖ε_p − ε_∅‖")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "gap_curves.png", dpi=110)

    stp = [(int(r["row"].split("=")[1]), r["duplicated"]["sim95"], r["duplicated"]["alignment"]) for r in results
           if r["row"].startswith("stp")]
    cfg = next(r for r in results if r["row"] == "cfg")["duplicated"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([1000] + [t for t, _, _ in stp], [cfg["sim95"]] + [s for _, s, _ in stp], "o-", label="sim95 (duplicated)")
    ax.plot([1000] + [t for t, _, _ in stp], [cfg["alignment"]] + [a for _, _, a in stp], "s--", label="alignment")
    ax.set_xlabel("τ: CFG starts once t ≤ τ (1000 = plain CFG)")
    ax.invert_xaxis()
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "cfg_start.png", dpi=110)

    from PIL import Image

    train = [np.asarray(Image.open(folder / "memorization" / r["image"]).convert("RGB"), np.float32) / 255
             for r in dup_rows[:6]]
    names = ["training image"] + list(examples)
    fig, axes = plt.subplots(len(names), 6, figsize=(6 * 1.1, len(names) * 1.15))
    for i, name in enumerate(names):
        imgs = train if i == 0 else examples[name]
        for j in range(6):
            axes[i, j].imshow(imgs[j])
            axes[i, j].axis("off")
        axes[i, 0].text(-40, 16, name, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "methods.png", dpi=110, bbox_inches="tight")
    plt.close("all")


if __name__ == "__main__":
    main()
