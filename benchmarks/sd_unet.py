"""A Stable Diffusion UNet in plain PyTorch, for GPU benchmarks on machines without diffusers.

Built from a diffusers-style `UNet2DConditionModel` config dict (the SD1.x layout: ResNet blocks, spatial
transformers with self- and cross-attention, GEGLU feed-forward, conv projections) with diffusers' parameter
names, so a diffusers state dict loads into it strictly, and the same config gives the same parameter count
and FLOPs. Only what SD1.x uses is here: no class embeddings, no linear projections, no attention masks.
Random weights only matter for timing; tests/test_gpu_backends.py checks it against diffusers on a tiny config.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SD15_UNET_CONFIG = {  # runwayml/stable-diffusion-v1-5 unet/config.json, the fields that shape the network
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,  # SD1.x's historical name: the number of heads
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "act_fn": "silu",
    "downsample_padding": 1,
    "center_input_sample": False,
    "mid_block_scale_factor": 1,
}
SD15_UNET_PARAMETERS = 859_520_964  # diffusers' count for SD1.5's UNet


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b = x.shape[0]

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, L, H*D) → (B, H, L, D)
            return t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context)))
        return self.to_out[0](out.transpose(1, 2).reshape(b, -1, x.shape[-1]))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """diffusers' Transformer2DModel with conv projections (use_linear_projection False) and one block."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(channels, heads, context_dim)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            y = block(y, context)
        return self.proj_out(y.reshape(b, h, w, c).permute(0, 3, 1, 2)) + x


class Downsample(nn.Module):
    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Block(nn.Module):
    """A down or up block: ResNet blocks, each followed by a spatial transformer in cross-attention blocks."""

    def __init__(self, resnets: list[ResnetBlock], attentions: list[SpatialTransformer] | None,
                 down: Downsample | None = None, up: Upsample | None = None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if attentions is not None:
            self.attentions = nn.ModuleList(attentions)
        if down is not None:
            self.downsamplers = nn.ModuleList([down])
        if up is not None:
            self.upsamplers = nn.ModuleList([up])


class MidBlock(nn.Module):
    def __init__(self, channels: int, temb: int, heads: int, context_dim: int, groups: int, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, temb, groups, eps) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialTransformer(channels, heads, context_dim, groups)])

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


class TimestepEmbedding(nn.Module):
    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(cin, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class SDUNet(nn.Module):
    """UNet2DConditionModel's SD1.x forward: (sample, timestep, encoder_hidden_states) → predicted noise."""

    def __init__(self, config: dict):
        super().__init__()
        c = {**SD15_UNET_CONFIG, **config}
        ch = list(c["block_out_channels"])
        groups, eps, layers = c["norm_num_groups"], c["norm_eps"], c["layers_per_block"]
        heads, ctx = c["attention_head_dim"], c["cross_attention_dim"]
        temb = ch[0] * 4
        self.flip, self.shift, self.proj_dim = c["flip_sin_to_cos"], c["freq_shift"], ch[0]
        self.conv_in = nn.Conv2d(c["in_channels"], ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)

        down = []
        for i, kind in enumerate(c["down_block_types"]):
            cin, cout, last = ch[max(i - 1, 0)], ch[i], i == len(ch) - 1
            resnets = [ResnetBlock(cin if j == 0 else cout, cout, temb, groups, eps) for j in range(layers)]
            attn = [SpatialTransformer(cout, heads, ctx, groups) for _ in range(layers)] if "CrossAttn" in kind else None
            down.append(Block(resnets, attn, down=None if last else Downsample(cout, c["downsample_padding"])))
        self.down_blocks = nn.ModuleList(down)
        self.mid_block = MidBlock(ch[-1], temb, heads, ctx, groups, eps)

        rev = ch[::-1]
        up = []
        for i, kind in enumerate(c["up_block_types"]):
            prev, cout, cin, last = rev[max(i - 1, 0)], rev[i], rev[min(i + 1, len(rev) - 1)], i == len(rev) - 1
            resnets = []
            for j in range(layers + 1):
                skip = cin if j == layers else cout
                resnets.append(ResnetBlock((prev if j == 0 else cout) + skip, cout, temb, groups, eps))
            attn = [SpatialTransformer(cout, heads, ctx, groups) for _ in range(layers + 1)] if "CrossAttn" in kind else None
            up.append(Block(resnets, attn, up=None if last else Upsample(cout)))
        self.up_blocks = nn.ModuleList(up)
        self.conv_norm_out = nn.GroupNorm(groups, ch[0], eps=eps)
        self.conv_out = nn.Conv2d(ch[0], c["out_channels"], 3, padding=1)

    def time_features(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """Sinusoidal features of the timestep, (cos, sin) as SD1.x trains them (flip_sin_to_cos)."""
        t = t.reshape(-1).float().expand(n)  # one value for all, or one per sample (expand is then a no-op)
        half = self.proj_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - self.shift))
        args = t[:, None] * freqs[None]
        sin, cos = torch.sin(args), torch.cos(args)
        return torch.cat([cos, sin] if self.flip else [sin, cos], dim=-1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(timestep):  # a tensor stays a graph input when traced for ONNX
            timestep = torch.tensor(timestep, device=sample.device)
        temb = self.time_embedding(self.time_features(timestep, sample.shape[0]).to(sample.dtype))
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            for k, resnet in enumerate(block.resnets):
                x = resnet(x, temb)
                if hasattr(block, "attentions"):
                    x = block.attentions[k](x, encoder_hidden_states)
                skips.append(x)
            if hasattr(block, "downsamplers"):
                x = block.downsamplers[0](x)
                skips.append(x)
        x = self.mid_block(x, temb, encoder_hidden_states)
        for block in self.up_blocks:
            for k, resnet in enumerate(block.resnets):
                x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
                if hasattr(block, "attentions"):
                    x = block.attentions[k](x, encoder_hidden_states)
            if hasattr(block, "upsamplers"):
                x = block.upsamplers[0](x, tuple(skips[-1].shape[-2:]))  # the next skip's size (odd sides too)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def build_unet(config: dict, prefer_diffusers: bool = True) -> tuple[nn.Module, str]:
    """(module, which): diffusers' UNet2DConditionModel when importable, else SDUNet from the same config."""
    if prefer_diffusers:
        try:
            from diffusers import UNet2DConditionModel
        except Exception:  # not installed, or a dependency of it missing: fall back, the caller says so
            pass
        else:
            return UNet2DConditionModel(**config), "diffusers"
    return SDUNet(config), "basinguard benchmarks/sd_unet.py"
