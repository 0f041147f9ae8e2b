"""Test helper: write a diffusers pipeline as one checkpoint in the original (LDM/SGM) layout, the form A1111, ComfyUI
and the model hubs pass around, by inverting the key mapping of diffusers' `from_single_file`
(diffusers/loaders/single_file_utils.py: convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
convert_ldm_clip_checkpoint, convert_open_clip_checkpoint). The product has no key mapping of its own; tests check
that diffusers reads these files back into the same modules (`test_ldm_files_read_back_as_the_pipeline`).

Also LoRA files in kohya's naming, converted from a diffusers/PEFT LoRA state dict.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
          ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
UNET_LAYERS = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _resnet(rest: str) -> str:
    for ours, theirs in RESNET:
        if rest.startswith(ours + "."):
            return theirs + rest[len(ours):]
    raise KeyError(rest)


def _has_attentions(keys: list[str], prefix: str) -> bool:
    return any(k.startswith(prefix + "attentions.") for k in keys)


def unet_to_ldm(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict → `model.diffusion_model.*` keys."""
    per_block = config.layers_per_block
    assert isinstance(per_block, int), "one layers_per_block for every block"
    keys = list(state)
    out = {}
    for key, value in state.items():
        head = next((h for h in UNET_LAYERS if key.startswith(h + ".")), None)
        if head is not None:
            out[UNET_LAYERS[head] + key[len(head):]] = value
            continue
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = 1 + block * (per_block + 1) + j
            new = f"input_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * (per_block + 1)}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = block * (per_block + 1) + j
            new = f"output_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            block = int(m[1])
            slot = 2 if _has_attentions(keys, f"up_blocks.{block}.") else 1
            new = f"output_blocks.{block * (per_block + 1) + per_block}.{slot}.conv.{m[2]}"
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
        out[new] = value
    return {f"model.diffusion_model.{k}": v for k, v in out.items()}


def vae_to_ldm(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict → `first_stage_model.*` keys (attention projections as 1x1 convs)."""
    blocks = len(config.up_block_types)
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out")
        if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{attention[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and m[3] == "weight":
                value = value[:, :, None, None]
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"decoder.up.{blocks - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            new = f"decoder.up.{blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
        out[new] = value
    return {f"first_stage_model.{k}": v for k, v in out.items()}


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel(WithProjection) state dict → open_clip's names under `prefix` (SD 2.x's
    `cond_stage_model.model.`, SDXL's second encoder `conditioner.embedders.1.model.`): q, k and v stacked into
    in_proj, the projection transposed."""
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias"}
    inner = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in fixed:
            out[fixed[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            if m[2] == "q":
                parts = [state[f"text_model.encoder.layers.{m[1]}.self_attn.{p}_proj.{m[3]}"] for p in "qkv"]
                out[f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}"] = torch.cat(parts, 0)
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            out[f"transformer.resblocks.{m[1]}.{inner[m[2]]}.{m[3]}"] = value
        elif key != "text_model.embeddings.position_ids":
            raise KeyError(f"no open_clip name for {key}")
    return {prefix + k: v for k, v in out.items()}


def pipeline_to_ldm(pipe: Any) -> dict[str, torch.Tensor]:
    """An SD 1.x, SD 2.x or SDXL diffusers pipeline as one original-layout state dict. The text encoder is stored
    as SD 1.x (HF CLIP names) unless `pipe.text_encoder` is 1024 wide (SD 2.x's OpenCLIP ViT-H)."""
    ckpt = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config) | vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config)
    text = {k: v for k, v in pipe.text_encoder.state_dict().items() if not k.endswith("position_ids")}
    if getattr(pipe, "text_encoder_2", None) is not None:
        ckpt |= {f"conditioner.embedders.0.transformer.{k}": v for k, v in text.items()}
        ckpt |= open_clip_to_ldm(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model.")
    elif pipe.text_encoder.config.hidden_size == 1024:
        ckpt |= open_clip_to_ldm(text, "cond_stage_model.model.")
    else:
        ckpt |= {f"cond_stage_model.transformer.{k}": v for k, v in text.items()}
    return {k: v.detach().contiguous() for k, v in ckpt.items()}


def save_ldm_checkpoint(pipe: Any, dest: Path, dtype: torch.dtype | None = None) -> Path:
    """`pipeline_to_ldm(pipe)` as one .safetensors file (optionally cast, e.g. to float16 as hubs often ship)."""
    from safetensors.torch import save_file

    state = pipeline_to_ldm(pipe)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(dest))
    return dest


def peft_to_kohya(state: dict[str, torch.Tensor], alpha: float | None = None) -> dict[str, torch.Tensor]:
    """A diffusers/PEFT LoRA state dict (`unet.….lora_A.weight`, `text_encoder.….lora_B.weight`) in kohya's naming
    (`lora_unet_…​.lora_down.weight`, `lora_te_…`, `lora_te1_`/`lora_te2_` for SDXL's encoders) with an `.alpha` per
    module; alpha = rank (the default) keeps the update as it is, another alpha scales it by alpha / rank, and the
    up weights are divided by that so the file means the same update."""
    heads = {"unet.": "lora_unet_", "text_encoder.": "lora_te_", "text_encoder_2.": "lora_te2_"}
    two_encoders = any(k.startswith("text_encoder_2.") for k in state)
    if two_encoders:
        heads["text_encoder."] = "lora_te1_"
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        head = next(h for h in sorted(heads, key=len, reverse=True) if key.startswith(h))
        module, kind = re.match(r"(.*)\.(lora_A|lora_B)\.weight", key[len(head):]).groups()  # type: ignore[union-attr]
        name = heads[head] + module.replace(".", "_")
        rank = state[f"{head}{module}.lora_A.weight"].shape[0]
        scale = (alpha if alpha is not None else rank) / rank
        if kind == "lora_A":
            out[f"{name}.lora_down.weight"] = value.clone()
            out[f"{name}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
        else:
            out[f"{name}.lora_up.weight"] = (value / scale).clone()
    return out
