"""Shared fixtures: a tiny random Stable Diffusion pipeline built offline from configs, and its ONNX export.

torch, diffusers and transformers are imported inside the fixtures so that runtime-only test runs (numpy +
onnxruntime + tokenizers) can still collect this file.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Words of the tiny tokenizer's vocabulary; every other word falls apart into single characters.
TINY_WORDS = ("a", "an", "the", "of", "on", "in", "with", "and", "photo", "painting", "cat", "dog", "horse",
              "astronaut", "riding", "mars", "red", "blue", "green", "big", "small", "castle", "tree", "sky",
              "detailed", "portrait", "landscape", "city", "night", "sunset")


def _byte_chars() -> list[str]:
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    return list(bytes_to_unicode().values())


def copy_model(src: Path, dest: Path) -> Path:
    """The parts of a model folder that make images (the shipped one's memorization set stays behind)."""
    dest.mkdir()
    for part in ("text_encoder", "unet", "vae_decoder", "scheduler", "tokenizer"):
        shutil.copytree(src / part, dest / part)
    for name in ("basinguard.json", "model_index.json"):
        if (src / name).exists():
            shutil.copy2(src / name, dest / name)
    return dest


def write_tiny_clip_vocab(folder: Path, words: tuple[str, ...] = TINY_WORDS) -> tuple[Path, Path]:
    """vocab.json + merges.txt in CLIP's format: byte chars, byte chars + "</w>", one merge chain per word
    (left to right), then <|startoftext|> and <|endoftext|>. About 650 tokens, under the tiny model's 1000."""
    base = _byte_chars()
    tokens = base + [c + "</w>" for c in base]
    merges: list[str] = []
    for word in words:
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            merged = symbols[0] + symbols[1]
            if f"{symbols[0]} {symbols[1]}" not in merges:
                merges.append(f"{symbols[0]} {symbols[1]}")
                tokens.append(merged)
            symbols = [merged, *symbols[2:]]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def _perturb(module: object, scale: float = 0.05) -> None:
    """Add noise to every weight so that no output is trivially zero or constant (zero-initialised layers)."""
    import torch

    with torch.no_grad():
        for p in module.parameters():  # type: ignore[attr-defined]
            p.add_(scale * torch.randn_like(p))


def build_tiny_sd_pipeline(dest: Path) -> Path:
    """Write a tiny random StableDiffusionPipeline (safetensors) to `dest`; latents are half the image size."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, sample_size=16,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=32)
    vocab_path, merges_path = write_tiny_clip_vocab(dest.parent / f"{dest.name}-vocab")
    tokenizer = CLIPTokenizer(str(vocab_path), str(merges_path), model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    for module in (unet, vae, text_encoder):
        _perturb(module)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(dest, safe_serialization=True)
    return dest


@pytest.fixture(scope="session", autouse=True)
def _single_thread_torch() -> None:
    """The test machine has 2 cores shared with a background job."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """basinguard's user cache (model file hashes) in a temporary folder, not the tester's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("BASINGUARD_CACHE_DIR", str(tmp_path_factory.mktemp("user-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def ort_session() -> Callable[[Path], object]:
    """Opens an ONNX Runtime CPU session with one thread."""
    ort = pytest.importorskip("onnxruntime")

    def open_session(path: Path) -> object:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    return open_session


@pytest.fixture(scope="session")
def tiny_sd_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random diffusers StableDiffusionPipeline folder (safetensors weights, no safety checker)."""
    pytest.importorskip("diffusers")
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny_sd") / "pipeline")


@pytest.fixture(scope="session")
def tiny_onnx_dir(tiny_sd_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`tiny_sd_pipeline_dir` exported to ONNX (fp32, validated) by basinguard's exporter."""
    from basinguard.export.onnx_export import export_pipeline

    out = tmp_path_factory.mktemp("tiny_onnx") / "model"
    export_pipeline(tiny_sd_pipeline_dir, out)
    yield out


def build_tiny_switching_sd_pipeline(tiny: Path, dest: Path) -> Path:
    """The tiny pipeline at `tiny` with another UNet, one whose d = ‖ε_p − ε_∅‖ has local minima, at different steps
    for different samples. On the random tiny UNet d falls monotonically (its x grows over the steps and GroupNorm
    shrinks the prompt's share), so DTP never switches there. Here the resnets take the time embedding as scale and
    shift (`resnet_time_scale_shift`), amplified 6×, which modulates the prompt's effect per channel with t. Seed 2
    and 6× were found by a search over seeds and factors; tests/test_pipeline.py asserts the switches they give."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None)
    torch.manual_seed(2)
    unet = UNet2DConditionModel.from_config({**pipe.unet.config, "resnet_time_scale_shift": "scale_shift"})
    _perturb(unet)
    with torch.no_grad():
        unet.time_embedding.linear_2.weight.mul_(6.0)
    pipe.unet = unet
    pipe.save_pretrained(dest, safe_serialization=True)
    return dest


@pytest.fixture(scope="session")
def tiny_switching_sd_pipeline_dir(tiny_sd_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_sd_pipeline_dir` with a UNet whose d has minima (`build_tiny_switching_sd_pipeline`)."""
    return build_tiny_switching_sd_pipeline(tiny_sd_pipeline_dir, tmp_path_factory.mktemp("tiny_switching_sd") / "pipeline")


@pytest.fixture(scope="session")
def tiny_switching_onnx_dir(tiny_switching_sd_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_switching_sd_pipeline_dir` exported to ONNX by basinguard's exporter."""
    from basinguard.export.onnx_export import export_pipeline

    out = tmp_path_factory.mktemp("tiny_switching_onnx") / "model"
    export_pipeline(tiny_switching_sd_pipeline_dir, out)
    return out


def build_tiny_sdxl_pipeline(dest: Path) -> Path:
    """Write a tiny random StableDiffusionXLPipeline (safetensors) to `dest`, shaped as SDXL base is: two text
    encoders of different widths (32 and 48) whose penultimate states the UNet takes side by side (cross-attention
    80), the second with a projection (pooled text_embeds, 32) and a tokenizer padding with "!", time_ids
    micro-conditioning (6 x 8 + 32 = 80 added embedding inputs), Euler with "leading" spacing and steps_offset 1,
    force_zeros_for_empty_prompt, and a VAE with force_upcast. Latents are half the image size; sides are multiples
    of 4."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, sample_size=16,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=32, force_upcast=True,
        scaling_factor=0.13025)
    vocab_path, merges_path = write_tiny_clip_vocab(dest.parent / f"{dest.name}-vocab")
    tokenizer = CLIPTokenizer(str(vocab_path), str(merges_path), model_max_length=77)
    tokenizer_2 = CLIPTokenizer(str(vocab_path), str(merges_path), model_max_length=77, pad_token="!")
    common = {"vocab_size": 1000, "max_position_embeddings": 77, "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id}
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
        pad_token_id=tokenizer.pad_token_id, **common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=48, intermediate_size=53, num_hidden_layers=3, num_attention_heads=4, projection_dim=32,
        hidden_act="gelu", pad_token_id=tokenizer_2.pad_token_id, **common))
    for module in (vae, text_encoder, text_encoder_2):
        _perturb(module)
    # As tests/conftest.py's switching SD UNet: the resnets take the time embedding as scale and shift, amplified
    # 10x, so that d has local minima and DTP's samples switch at their own steps (seed 5 and 10x found by a small
    # search; tests/test_sdxl.py asserts the switches).
    torch.manual_seed(5)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=80, norm_num_groups=32, resnet_time_scale_shift="scale_shift")
    _perturb(unet)
    with torch.no_grad():
        unet.time_embedding.linear_2.weight.mul_(10.0)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1, interpolation_type="linear",
                                       num_train_timesteps=1000)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)
    pipe.save_pretrained(dest, safe_serialization=True)
    return dest


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random diffusers StableDiffusionXLPipeline folder (`build_tiny_sdxl_pipeline`)."""
    pytest.importorskip("diffusers")
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny_sdxl") / "pipeline")


@pytest.fixture(scope="session")
def tiny_sdxl_onnx_dir(tiny_sdxl_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_sdxl_pipeline_dir` exported to ONNX (fp32, validated) by basinguard's exporter."""
    from basinguard.export.onnx_export import export_pipeline

    out = tmp_path_factory.mktemp("tiny_sdxl_onnx") / "model"
    export_pipeline(tiny_sdxl_pipeline_dir, out, log=lambda _: None)
    return out
