"""The torch graphs we export (text encoder(s), UNet, VAE decoder): wrappers, example and check inputs.

SDXL (a UNet with addition_embed_type "text_time") adds a second text encoder (CLIPTextModelWithProjection) and
the UNet inputs text_embeds (its pooled, projected output) and time_ids (original size, crop top-left, target
size). Its text encoders output every layer's hidden states (hidden_states.0 … .L, optimum's names) beside their
first two outputs, since SDXL's pipeline takes the penultimate layer (or an earlier one with clip_skip).

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
from basinguard.model_format import model_family


class TextEncoderGraph(torch.nn.Module):
    """input_ids → the model's first two outputs as plain tensors (CLIPTextModel: last_hidden_state, pooler_output;
    CLIPTextModelWithProjection: text_embeds, last_hidden_state), then with `hidden_states` every layer's."""

    def __init__(self, model: torch.nn.Module, hidden_states: bool = False):
        super().__init__()
        self.model, self.hidden_states = model, hidden_states

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(input_ids=input_ids, output_hidden_states=self.hidden_states, return_dict=False)
        return (out[0], out[1], *(out[2] if self.hidden_states else ()))


class UNetGraph(torch.nn.Module):
    """(sample, timestep, encoder_hidden_states) → out_sample (the predicted noise or velocity)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class UNetXLGraph(torch.nn.Module):
    """SDXL: (sample, timestep, encoder_hidden_states, text_embeds, time_ids) → out_sample."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.model(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


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
    text_encoder_2: torch.nn.Module | None = None  # SDXL's CLIPTextModelWithProjection

    @property
    def family(self) -> str:
        """"sdxl" or "sd", by the runtime's rule, so an export and the folder it writes agree."""
        return model_family(self.unet.config)


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
    inputs = {
        "sample": torch.randn(batch, unet.config.in_channels, h, w, generator=gen),
        "timestep": torch.rand(batch, generator=gen) * models.num_train_timesteps,
        "encoder_hidden_states": torch.randn(batch, text.max_position_embeddings, unet.config.cross_attention_dim,
                                             generator=gen),
    }
    if models.text_encoder_2 is not None:  # SDXL: pooled text, and sizes and crops in pixels as time_ids
        inputs["text_embeds"] = torch.randn(batch, models.text_encoder_2.config.projection_dim, generator=gen)
        inputs["time_ids"] = torch.randint(0, 2049, (batch, 6), generator=gen).float()
    return inputs


_BATCH = {0: "batch_size"}
_IMAGE = {0: "batch_size", 2: "height", 3: "width"}


def _text_spec(models: TorchModels, fp16: bool, gen: torch.Generator, name: str = "text_encoder") -> GraphSpec:
    text = getattr(models, name)
    hidden = models.family == "sdxl"
    first = ("text_embeds", "last_hidden_state") if name == "text_encoder_2" else ("last_hidden_state", "pooler_output")
    outputs = (*first, *(f"hidden_states.{k}" for k in range(text.config.num_hidden_layers + 1) if hidden))
    return GraphSpec(name, TextEncoderGraph(text, hidden), {"input_ids": _text_ids(2, text, gen)}, outputs,
                     {"input_ids": _BATCH, **{output: _BATCH for output in outputs}},
                     models.folder / name / "config.json", half=fp16,
                     cases=[{"input_ids": _text_ids(b, text, gen)} for b in (2, 3)])


def _unet_spec(models: TorchModels, fp16: bool, gen: torch.Generator) -> GraphSpec:
    (h, w), m = _sample_size(models.unet.config), unet_size_multiple(models.unet)
    xl = models.text_encoder_2 is not None
    axes = {"sample": _IMAGE, "timestep": _BATCH, "encoder_hidden_states": _BATCH,
            **({"text_embeds": _BATCH, "time_ids": _BATCH} if xl else {}), "out_sample": _IMAGE}
    # time_ids stay float32 in a float16 graph, as the timestep: sizes in pixels are integers float16 would round
    return GraphSpec("unet", (UNetXLGraph if xl else UNetGraph)(models.unet), _unet_inputs(models, 2, h, w, gen),
                     ("out_sample",), axes, models.folder / "unet/config.json", half=fp16,
                     fixed_float32=("timestep", "time_ids") if xl else ("timestep",),
                     cases=[_unet_inputs(models, 2, h, w + m, gen), _unet_inputs(models, 3, h + m, w, gen)])


# The VAE decoder is traced at latents of at most this side: its graph is the same at every size (the axes are
# dynamic; validation on other sizes shows it), and at the native size the trace alone held ~5.7 GB of
# activations for SD 2.1-768-v (768x768 pixels, batch 2).
VAE_TRACE_SIDE = 32


def _vae_spec(models: TorchModels, gen: torch.Generator) -> GraphSpec:
    (h, w), m = _sample_size(models.unet.config), unet_size_multiple(models.unet)
    h, w = min(h, VAE_TRACE_SIDE), min(w, VAE_TRACE_SIDE)
    channels = models.vae.config.latent_channels
    return GraphSpec("vae_decoder", VaeDecoderGraph(models.vae),
                     {"latent_sample": torch.randn(2, channels, h, w, generator=gen)}, ("sample",),
                     {"latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"},
                      "sample": {0: "batch_size", 2: "image_height", 3: "image_width"}},
                     models.folder / "vae/config.json",  # float32 even for fp16: SD VAEs overflow in float16
                     cases=[{"latent_sample": torch.randn(3, channels, h, w + m, generator=gen)}])


def build_specs(models: TorchModels, fp16: bool) -> list[GraphSpec]:
    """The graphs (SD: three; SDXL: four), traced at batch 2 (batch 1 could be specialised into broadcasts) and the
    UNet's native latent size; validated at batch 2 and 3 on non-square latents."""
    text, unet = models.text_encoder.config, models.unet.config
    if (models.family == "sdxl") != (models.text_encoder_2 is not None):
        raise ExportError("an SDXL UNet (addition_embed_type 'text_time') needs text_encoder_2, and only it takes one"
                          if models.family == "sdxl" else
                          "the pipeline has a text_encoder_2 but its UNet is not conditioned on pooled text (SDXL's "
                          "addition_embed_type 'text_time')")
    widths = [text.hidden_size] + ([models.text_encoder_2.config.hidden_size] if models.text_encoder_2 else [])
    if unet.cross_attention_dim != sum(widths):
        raise ExportError(f"unet cross_attention_dim {unet.cross_attention_dim} does not match the text "
                          f"encoder{'s' if len(widths) > 1 else ''}' hidden_size {' + '.join(map(str, widths))}")
    if models.text_encoder_2 is not None:  # diffusers' _get_add_time_ids check: 6 time ids and the pooled text
        want = 6 * unet.addition_time_embed_dim + models.text_encoder_2.config.projection_dim
        if unet.projection_class_embeddings_input_dim != want:
            raise ExportError(f"unet projection_class_embeddings_input_dim {unet.projection_class_embeddings_input_dim}"
                              f" does not match 6 time ids x addition_time_embed_dim {unet.addition_time_embed_dim} + "
                              f"text_encoder_2 projection_dim {models.text_encoder_2.config.projection_dim}")
    gen = torch.Generator().manual_seed(0)
    texts = [_text_spec(models, fp16, gen)]
    if models.text_encoder_2 is not None:
        texts.append(_text_spec(models, fp16, gen, "text_encoder_2"))
    return [*texts, _unet_spec(models, fp16, gen), _vae_spec(models, gen)]


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
