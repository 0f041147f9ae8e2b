"""Train the attribute classifier that scores alignment and quality for the shipped model.

    python recipes/shapes/train_attribute_classifier.py DIFFUSERS_DIR OUT.onnx [--threads 2]

A small CNN over 32×32 images predicting the generator's labels: which (colour, kind) shapes and
which background colours are present. It trains on rendered images passed through the model's own
VAE (encode → decode), half of the time, so it judges generations in the domain they come from.
Exported to ONNX with outputs `logits` and `features` (the penultimate layer, for the Fréchet
distance). Needs the `export` extra.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memorizing_data as data  # noqa: E402

N_LABELS = len(data.COLOUR_NAMES) * len(data.KINDS) + len(data.COLOUR_NAMES)


class AttributeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.SiLU()]

        self.body = nn.Sequential(
            *block(3, 32), *block(32, 32), nn.MaxPool2d(2),
            *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
            *block(64, 96), *block(96, 96), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(384, 64), nn.SiLU(),
        )
        self.head = nn.Linear(64, N_LABELS)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(image)
        return self.head(features), features


def rendered(samples: list[data.Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.stack([data.render(s) for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = torch.from_numpy(np.stack([data.attribute_labels(s) for s in samples]))
    return x, y


@torch.no_grad()
def through_vae(vae, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.decode(vae.encode(x[i : i + 500]).latent_dist.mean).sample.clamp(-1, 1)
                      for i in range(0, len(x), 500)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="diffusers pipeline folder (its vae/ is used)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3000)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(args.model / "vae").eval()
    train = data.varied_samples(12000, seed=7) + data.duplicated_samples(20)
    held = data.varied_samples(1000, seed=8)
    x, y = rendered(train)
    x = torch.cat([x, through_vae(vae, x)])
    y = torch.cat([y, y])
    xh, yh = rendered(held)
    xh_vae = through_vae(vae, xh)
    net = AttributeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.steps)
    g = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        # pixel noise as generations carry it; the VAE half already has their soft edges
        logits, _ = net(x[idx] + 0.04 * torch.randn(x[idx].shape, generator=g))
        loss = F.binary_cross_entropy_with_logits(logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    net.eval()
    report = {}
    with torch.no_grad():
        n_shape = len(data.COLOUR_NAMES) * len(data.KINDS)
        for name, xs in (("clean", xh), ("through VAE", xh_vae)):
            pred = (net(xs)[0] > 0).float()
            named = [data.mentioned_indices(s) for s in held]
            visible = yh[:, :n_shape]
            # what alignment asks: is each shape the caption names (and is visible) found?
            hits = [pred[k, i].item() for k, idx in enumerate(named) for i in idx if visible[k, i] > 0]
            absent = pred[:, :n_shape][visible == 0]
            report[name] = {"named_shape_recall": float(np.mean(hits)), "absent_shape_false_positive_rate":
                            float(absent.mean().item()), "background_accuracy": float(
                                (pred[:, n_shape:] == yh[:, n_shape:]).float().mean().item()),
                            "exact_label_accuracy": float((pred == yh).all(1).float().mean().item())}
            print(f"held-out {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in report[name].items()))
    args.out.with_suffix(".eval.json").write_text(json.dumps(report, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(net, (xh[:2],), str(args.out), input_names=["image"], output_names=["logits", "features"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}},
                      opset_version=17, dynamo=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
