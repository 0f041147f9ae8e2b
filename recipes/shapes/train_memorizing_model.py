"""Train the small SD-architecture model that basinguard ships: it memorizes its duplicated images.

    python recipes/shapes/train_memorizing_model.py OUT_DIR --threads 2     # the shipped model: ~60 min on 2 cores

Writes a diffusers StableDiffusionPipeline folder (safetensors) to OUT_DIR. Seeded and
reproducible on CPU; phases are checkpointed under OUT_DIR/_work so a killed run resumes.
Needs the `export` extra (torch, diffusers, transformers).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memorizing_data as data  # noqa: E402

from basinguard.runtime.tokenizer import bytes_to_unicode  # noqa: E402

N_VARIED = 20000
N_DUPLICATED = 20
DUPLICATED_FRACTION = 0.045  # each duplicated image ~0.2 % of samples: copied under CFG, rarely reached unconditionally
MAX_TOKENS = 32


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges that spell every word, learnt greedily: the most frequent adjacent pair first,
    ties broken by the pair itself, so the result is the same on every run (tokenizers' trainer breaks
    ties by hash order)."""
    table = bytes_to_unicode()
    spelled = [[table[b] for b in w.encode()] for w in words]
    spelled = [s[:-1] + [s[-1] + "</w>"] for s in spelled]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for s in spelled:
            for pair in zip(s, s[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for k, s in enumerate(spelled):
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            spelled[k] = out


def write_clip_tokenizer(words: list[str], out: Path) -> None:
    """A CLIP-format BPE (vocab.json + merges.txt) learnt on the caption words.

    Base vocabulary as CLIP's (256 byte characters, each also with the end-of-word mark), then the
    merges that spell each caption word as one token; any other text still tokenizes, in pieces.
    """
    base = list(bytes_to_unicode().values())
    merges = learn_merges(words)
    vocab = base + [c + "</w>" for c in base]
    known = set(vocab)
    for a, b in merges:
        if a + b not in known:
            vocab.append(a + b)
            known.add(a + b)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=MAX_TOKENS)
    tok.save_pretrained(out)


def make_dataset(seed: int) -> tuple[list[data.Sample], np.ndarray]:
    samples = data.varied_samples(N_VARIED, seed=seed) + data.duplicated_samples(N_DUPLICATED)
    images = np.stack([data.render(s) for s in samples])
    return samples, images


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(images: torch.Tensor, steps: int, channels: tuple[int, ...], gen: torch.Generator, log) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32, layers_per_block=1,
        block_out_channels=channels, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    for step in range(steps):
        idx = torch.randint(0, len(images), (32,), generator=gen)
        x = images[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(rec, x) + F.l1_loss(rec, x) + 1e-4 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step} loss {loss.item():.4f} kl {kl.item():.3f}")
    return vae.eval()


@torch.no_grad()
def encode_all(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), 512):
        post = vae.encode(images[i : i + 512]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vae-steps", type=int, default=2500)
    ap.add_argument("--vae-channels", default="32,48,48",
                    help="VAE block widths (multiples of 16); (16,32,32) with 1200 steps blurred shape edges")
    ap.add_argument("--unet-steps", type=int, default=7000)
    ap.add_argument("--extra-steps", type=int, default=0,
                    help="after --unet-steps, continue from the checkpoint this long at a cosine-decayed lr from 2e-4")
    ap.add_argument("--caption-dropout", type=float, default=0.1,
                    help="fraction of training captions replaced by the empty prompt (the unconditional branch), as SD")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    work = args.out / "_work"
    work.mkdir(parents=True, exist_ok=True)
    logf = open(work / "train.log", "a")

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    samples, images_u8 = make_dataset(args.seed)
    images = to_tensor(images_u8)
    n_dup = N_DUPLICATED
    log(f"dataset: {len(samples)} images, {n_dup} duplicated")

    if not (args.out / "tokenizer" / "vocab.json").exists():  # a resumed run keeps the vocabulary it trained with
        write_clip_tokenizer(data.caption_vocabulary(), args.out / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(args.out / "tokenizer")
    ids = tokenizer([s.caption for s in samples] + [""], padding="max_length", max_length=MAX_TOKENS,
                    truncation=True, return_tensors="pt").input_ids
    empty_ids = ids[-1:]
    ids = ids[:-1]

    # Phase 1: VAE, then the latents of every training image (posterior mean and std), once.
    if (work / "vae").exists():
        vae = AutoencoderKL.from_pretrained(work / "vae").eval()
    else:
        t0 = time.time()
        vae = train_vae(images, args.vae_steps, tuple(int(c) for c in args.vae_channels.split(",")), gen, log)
        vae.save_pretrained(work / "vae")
        log(f"vae trained in {time.time() - t0:.0f} s")
    lat_mean, lat_std = encode_all(vae, images)
    scaling = float(1.0 / lat_mean.std())
    vae.register_to_config(scaling_factor=scaling)
    log(f"latents {tuple(lat_mean.shape[1:])}, scaling_factor {scaling:.4f}")

    # Phase 2: text encoder and UNet, jointly (no pretrained CLIP exists here).
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=16, cross_attention_dim=64, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )
    log(f"unet params {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M, "
        f"text encoder {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f} M")
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-2)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-4, total_steps=args.unet_steps, pct_start=0.03)
    ema = [p.detach().clone() for p in params]
    start = 0
    ckpt = work / "unet_ckpt.pt"
    if ckpt.exists():
        state = torch.load(ckpt)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        lr_sched.load_state_dict(state["lr_sched"])
        ema = state["ema"]
        gen.set_state(state["gen"])
        start = state["step"]
        log(f"resumed at step {start}")
    alphas_cumprod = scheduler.alphas_cumprod
    n_varied = len(samples) - n_dup
    t0 = time.time()
    total = args.unet_steps + args.extra_steps
    extra_lr = None
    for step in range(start, total):
        if step == args.unet_steps or (step == start and start >= args.unet_steps):
            for group in opt.param_groups:  # the extension: a fresh cosine decay from 2e-4, after the one-cycle run
                group["lr"] = group["initial_lr"] = 2e-4
            extra_lr = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda k: 0.5 * (1 + np.cos(np.pi * min(k, args.extra_steps) / max(args.extra_steps, 1))))
            for _ in range(step - args.unet_steps):
                extra_lr.step()
        b = args.batch
        is_dup = torch.rand(b, generator=gen) < DUPLICATED_FRACTION
        idx = torch.where(is_dup, n_varied + torch.randint(0, n_dup, (b,), generator=gen),
                          torch.randint(0, n_varied, (b,), generator=gen))
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * scaling
        batch_ids = ids[idx].clone()
        drop = torch.rand(b, generator=gen) < args.caption_dropout
        batch_ids[drop] = empty_ids
        t = torch.randint(0, 1000, (b,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        emb = text_encoder(batch_ids)[0]
        pred = unet(zt, t, encoder_hidden_states=emb).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        (lr_sched if extra_lr is None else extra_lr).step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        if step % 100 == 0 or step == total - 1:
            rate = (step + 1 - start) / (time.time() - t0)
            log(f"unet step {step} loss {loss.item():.4f} ({rate:.2f} steps/s)")
        if (step + 1) % 500 == 0:
            torch.save({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(), "opt": opt.state_dict(),
                        "lr_sched": lr_sched.state_dict(), "ema": ema, "gen": gen.get_state(), "step": step + 1},
                       ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").replace(ckpt)

    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(args.out, safe_serialization=True)
    mem = args.out / "memorization"
    (mem / "images").mkdir(parents=True, exist_ok=True)
    from PIL import Image

    with open(mem / "duplicated.jsonl", "w") as f:
        for k, s in enumerate(samples[n_varied:]):
            rel = f"images/duplicated_{k:02d}.png"
            Image.fromarray(images_u8[n_varied + k]).save(mem / rel)
            f.write(json.dumps({"caption": s.caption, "image": rel}) + "\n")
    # Non-duplicated comparison captions: fresh draws from the varied grammar, two shapes named,
    # not used in training (another seed), so they are novel prompts of the same style.
    others = [s.caption for s in data.varied_samples(400, seed=args.seed + 1) if len(s.mentioned) == 2]
    (mem / "other_captions.txt").write_text("\n".join(dict.fromkeys(others)) + "\n")
    log(f"saved pipeline to {args.out}")


if __name__ == "__main__":
    main()
