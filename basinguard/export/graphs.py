"""The three torch graphs we export (text encoder, UNet, VAE decoder): wrappers, example and check inputs.

Input and output names are optimum's (optimum-onnx 0.1.0, `optimum-cli export onnx --task text-to-image`), so
one runtime serves both exports. Where we differ from optimum:
- unet `timestep`: ours is float32 of shape (batch,), optimum's a float scalar of shape () (float16 in its
  fp16 export), which the UNet broadcasts to the batch. Ours carries one timestep per sample, as diffusers'
  UNet accepts, so batched requests at different steps share one call; the runtime's `conform` feeds either.
- text encoder `input_ids`: int64 for both; optimum's is (batch, sequence), ours (batch, 77): the sequence
  axis is fixed to max_position_embeddings, as the runtime always pads to it (and TensorRT profiles get one
  free axis fewer). The same holds for the unet's `encoder_hidden_states` (batch, 77, dim).
- fp16: ours keeps the VAE decoder and the unet `timestep` in float32; optimum converts everything.
- opset: ours defaults to 17, optimum-onnx 0.1.0 to 18.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch

from basinguard.export.errors import ExportError, first_line


class TextEncoderGraph(torch.nn.Module):
    """input_ids → (last_hidden_state, pooler_output) as plain tensors."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(input_ids=input_ids, return_dict=False)
        return out[0], out[1]


class UNetGraph(torch.nn.Module):
    """(sample, timestep, encoder_hidden_states) → out_sample (the predicted noise or velocity)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeDecoderGraph(torch.nn.Module):
    """latent_sample (already divided by the VAE's scaling_factor) → image in [-1, 1] (unclamped)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latent_sample, return_dict=False)[0]


@dataclass
class GraphSpec:
    """One ONNX model to write: its torch module (float32), names, axes and inputs."""

    name: str  # the folder in OUT
    module: torch.nn.Module
    example: dict[str, torch.Tensor]  # traced inputs, in input order
    outputs: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    config: Path  # the component's config.json, copied beside model.onnx
    half: bool = False  # export in float16
    cases: list[dict[str, torch.Tensor]] = field(default_factory=list)  # validation inputs
    fixed_float32: tuple[str, ...] = ()  # float inputs that stay float32 in a float16 graph

    def float_inputs(self) -> list[str]:
        return [k for k, v in self.example.items() if v.is_floating_point() and k not in self.fixed_float32]


@dataclass
class TorchModels:
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    folder: Path
    num_train_timesteps: int = 1000


def _sample_size(config: object) -> tuple[int, int]:
    size = getattr(config, "sample_size", 64)
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def unet_size_multiple(unet: torch.nn.Module) -> int:
    """Latent sides must be multiples of this: the UNet traces its upsampling for evenly divisible sizes."""
    return 2 ** (len(unet.config.block_out_channels) - 1)


def _text_ids(batch: int, text: torch.nn.Module, gen: torch.Generator) -> torch.Tensor:
    """Random ids with an end token at a random place per row, so the pooled output gathers a real position."""
    cfg = text.config
    ids = torch.randint(0, cfg.vocab_size, (batch, cfg.max_position_embeddings), generator=gen)
    if 0 <= cfg.eos_token_id < cfg.vocab_size:
        ids[ids == cfg.eos_token_id] = 0
        ends = torch.randint(1, cfg.max_position_embeddings, (batch,), generator=gen)
        ids[torch.arange(batch), ends] = cfg.eos_token_id
    return ids


def _unet_inputs(models: TorchModels, batch: int, h: int, w: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    unet, text = models.unet, models.text_encoder.config
    return {
        "sample": torch.randn(batch, unet.config.in_channels, h, w, generator=gen),
        "timestep": torch.rand(batch, generator=gen) * models.num_train_timesteps,
        "encoder_hidden_states": torch.randn(batch, text.max_position_embeddings, text.hidden_size, generator=gen),
    }


_BATCH = {0: "batch_size"}
_IMAGE = {0: "batch_size", 2: "height", 3: "width"}


def _text_spec(models: TorchModels, fp16: bool, gen: torch.Generator) -> GraphSpec:
    text = models.text_encoder
    return GraphSpec("text_encoder", TextEncoderGraph(text), {"input_ids": _text_ids(2, text, gen)},
                     ("last_hidden_state", "pooler_output"),
                     {"input_ids": _BATCH, "last_hidden_state": _BATCH, "pooler_output": _BATCH},
                     models.folder / "text_encoder/config.json", half=fp16,
                     cases=[{"input_ids": _text_ids(b, text, gen)} for b in (2, 3)])


def _unet_spec(models: TorchModels, fp16: bool, gen: torch.Generator) -> GraphSpec:
    (h, w), m = _sample_size(models.unet.config), unet_size_multiple(models.unet)
    return GraphSpec("unet", UNetGraph(models.unet), _unet_inputs(models, 2, h, w, gen), ("out_sample",),
                     {"sample": _IMAGE, "timestep": _BATCH, "encoder_hidden_states": _BATCH, "out_sample": _IMAGE},
                     models.folder / "unet/config.json", half=fp16, fixed_float32=("timestep",),
                     cases=[_unet_inputs(models, 2, h, w + m, gen), _unet_inputs(models, 3, h + m, w, gen)])


def _vae_spec(models: TorchModels, gen: torch.Generator) -> GraphSpec:
    (h, w), m = _sample_size(models.unet.config), unet_size_multiple(models.unet)
    channels = models.vae.config.latent_channels
    return GraphSpec("vae_decoder", VaeDecoderGraph(models.vae),
                     {"latent_sample": torch.randn(2, channels, h, w, generator=gen)}, ("sample",),
                     {"latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"},
                      "sample": {0: "batch_size", 2: "image_height", 3: "image_width"}},
                     models.folder / "vae/config.json",  # float32 even for fp16: SD VAEs overflow in float16
                     cases=[{"latent_sample": torch.randn(3, channels, h, w + m, generator=gen)}])


def build_specs(models: TorchModels, fp16: bool) -> list[GraphSpec]:
    """The three graphs, traced at batch 2 (batch 1 could be specialised into broadcasts) and the UNet's
    native latent size; validated at batch 2 and 3 on non-square latents."""
    text, unet = models.text_encoder.config, models.unet.config
    if unet.cross_attention_dim != text.hidden_size:
        raise ExportError(f"unet cross_attention_dim {unet.cross_attention_dim} does not match the text "
                          f"encoder's hidden_size {text.hidden_size}")
    gen = torch.Generator().manual_seed(0)
    return [_text_spec(models, fp16, gen), _unet_spec(models, fp16, gen), _vae_spec(models, gen)]


def half_inputs(spec: GraphSpec, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    floats = spec.float_inputs()
    return {k: v.half() if k in floats else v for k, v in inputs.items()}


def trace_to_onnx(spec: GraphSpec, path: Path, opset: int, half: bool) -> None:
    """torch.onnx.export with the TorchScript exporter (dynamo=False): robust for these models, dynamic axes work."""
    module = copy.deepcopy(spec.module).half() if half else spec.module
    example = half_inputs(spec, spec.example) if half else spec.example
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        # Tracer and constant-folding warnings are expected here (shape asserts become constants); validation
        # on other batch sizes and latent shapes is what shows the graph generalises.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module.eval(), tuple(example.values()), str(path), input_names=list(example),
                              output_names=list(spec.outputs), dynamic_axes=spec.dynamic_axes, opset_version=opset,
                              do_constant_folding=True, dynamo=False)
        except Exception as exc:  # torch raises many types here; all mean the same to the user
            raise ExportError(f"torch.onnx.export of {spec.name} failed at opset {opset}: {first_line(exc)}") from None


def pin_static_dims(spec: GraphSpec, path: Path) -> None:
    """Give output axes that are not dynamic their fixed size.

    The TorchScript exporter names some static axes after the op that made them (e.g. the text encoder's
    sequence axis becomes "LayerNormalizationlast_hidden_state_dim_1"); runtimes then see a free dimension.
    """
    model = onnx.load(str(path), load_external_data=False)
    declared = {name for axes in spec.dynamic_axes.values() for name in axes.values()}
    loose = [o for o in model.graph.output
             if any(d.dim_param and d.dim_param not in declared for d in o.type.tensor_type.shape.dim)]
    if not loose:
        return
    with torch.no_grad():
        outs = spec.module(**spec.example)
    shapes = dict(zip(spec.outputs, (o.shape for o in (outs if isinstance(outs, tuple) else (outs,))), strict=True))
    for output in loose:
        dynamic = spec.dynamic_axes.get(output.name, {})
        for axis, dim in enumerate(output.type.tensor_type.shape.dim):
            if axis not in dynamic:
                dim.dim_value = int(shapes[output.name][axis])  # clears dim_param (a oneof)
    onnx.save_model(model, str(path))
