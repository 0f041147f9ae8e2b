"""Text conditioning per model family, behind one interface chosen once when a model loads (`FAMILIES`).

A family says which sampling settings it takes and checks them (`resolve_settings`), how traces record them
(`record`), and loads its text encoder(s) into a `TextConditioner` that turns prompts into the UNet's
`Conditioning`. The loop, batch jobs and detection only see a `Conditioning`: they never ask the family.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

import numpy as np

from basinguard.engine import LoadedModel, load_model
from basinguard.model_format import ModelFolderError, read_json
from basinguard.runtime.errors import InputError
from basinguard.runtime.guidance import Rows
from basinguard.runtime.settings import FAMILY_SETTINGS, MICRO_CONDITIONING, SamplingConfig, family_record
from basinguard.runtime.timer import StageTimer
from basinguard.runtime.tokenizer import PromptTokenizer

if TYPE_CHECKING:
    from basinguard.runtime.model_folder import ModelFolder

MICRO_MAX = 16384  # pixels: the largest original/target side or crop offset SDXL's micro-conditioning accepts here


@dataclass(frozen=True)
class Conditioning:
    """Every UNet input besides (sample, timestep), batched [uncond; cond] at 2N: SD's encoder_hidden_states, SDXL's
    also text_embeds and time_ids. `uncond` holds the uncond halves at N as views made once, so the loop slices
    halves without knowing the model family; `rows` picks any rows of either half. The arrays are read-only:
    constant across the loop (an engine may keep them on the device between calls)."""

    pair: Mapping[str, np.ndarray]
    uncond: Mapping[str, np.ndarray]
    _picked: dict[bytes, Mapping[str, np.ndarray]] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, pair: Mapping[str, np.ndarray]) -> Conditioning:
        arrays = {name: np.ascontiguousarray(value) for name, value in pair.items()}
        n, odd = divmod(len(next(iter(arrays.values()))), 2)
        if odd or any(len(value) != 2 * n for value in arrays.values()):
            raise ValueError(f"conditioning must be batched [uncond; cond] at 2N (got {[v.shape for v in arrays.values()]})")
        for value in arrays.values():
            value.flags.writeable = False
        return cls(MappingProxyType(arrays), MappingProxyType({name: value[:n] for name, value in arrays.items()}))

    def rows(self, rows: Rows) -> Mapping[str, np.ndarray]:
        """The conditioning of the samples' uncond rows (in order), then of their cond rows, as `Rows` asks. Made
        once per pattern (a pattern changes only where a sample switches), read-only like the rest."""
        key = np.packbits(np.concatenate([rows.uncond, rows.cond])).tobytes()
        picked = self._picked.get(key)
        if picked is None:
            n = len(rows.uncond)
            index = np.concatenate([np.flatnonzero(rows.uncond), n + np.flatnonzero(rows.cond)])
            arrays = {name: value[index] for name, value in self.pair.items()}
            for value in arrays.values():
                value.flags.writeable = False
            if len(self._picked) > 64:  # many distinct patterns: start over rather than grow
                self._picked.clear()
            picked = self._picked[key] = MappingProxyType(arrays)
        return picked


class TextConditioner(Protocol):
    """A family's loaded text encoder(s)."""

    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str], sampling: SamplingConfig,
               uncond_kinds: Sequence[str]) -> Conditioning:
        """[e_∅; e_p] and whatever else the UNet takes, for N images at a resolved sampling; `uncond_kinds` says
        which e_∅ each image gets ("negative prompt", "empty prompt" or "zeros")."""
        ...


def hidden_state_outputs(model: LoadedModel, path: object) -> list[str]:
    """A text encoder's hidden_states.0 … .L outputs (optimum's names), in layer order: SDXL takes one of them."""
    layers = sorted(int(name.rsplit(".", 1)[1]) for name in model.outputs if re.fullmatch(r"hidden_states\.\d+", name))
    if len(layers) < 2:
        raise ModelFolderError(f"{path} has no hidden_states.K outputs (SDXL takes each text encoder's penultimate "
                               "layer); export the pipeline with `basinguard export` or optimum's exporter")
    return [f"hidden_states.{k}" for k in layers]


@dataclass
class SDText:
    """SD 1.x/2.x: the text encoder's last hidden state is encoder_hidden_states."""

    tokenizer: PromptTokenizer
    encoder: LoadedModel
    timer: StageTimer

    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str], sampling: SamplingConfig,
               uncond_kinds: Sequence[str]) -> Conditioning:
        outs = self.encoder.outputs
        output = "last_hidden_state" if "last_hidden_state" in outs else next(iter(outs))
        ids = self.tokenizer.encode([*negative_prompts, *prompts])
        with self.timer("text_encoder"):
            e = self.encoder.run({"input_ids": ids})[output]
        return Conditioning.of({"encoder_hidden_states": e.astype(np.float32, copy=False)})


@dataclass
class SDXLText:
    """SDXL's two tokenizers and text encoders, as diffusers' StableDiffusionXLPipeline.encode_prompt uses them
    (prompt_2 = prompt): encoder_hidden_states is both encoders' penultimate hidden states side by side (or earlier
    ones with clip_skip), text_embeds the second encoder's pooled, projected output."""

    tokenizers: tuple[PromptTokenizer, PromptTokenizer]
    encoders: tuple[LoadedModel, LoadedModel]
    hidden_layers: tuple[list[str], list[str]]  # each encoder's hidden-state outputs (`hidden_state_outputs`)
    timer: StageTimer

    def hidden_outputs(self, clip_skip: int | None = None) -> tuple[str, str]:
        """The outputs diffusers takes: hidden_states[-(clip_skip + 2)], the penultimate layer when clip_skip is unset
        ("2" because SDXL always indexes from the penultimate layer)."""
        back = 2 + (clip_skip or 0)
        return self.hidden_layers[0][-back], self.hidden_layers[1][-back]

    def _encode_texts(self, texts: Sequence[str], clip_skip: int | None = None,
                      skip_from: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(encoder_hidden_states, text_embeds) of `texts`, float32; clip_skip applies to rows from `skip_from` on, the
        prompts: diffusers' SDXL pipeline encodes negative prompts from the penultimate layer whatever clip_skip is."""
        hidden, out = [], {}
        outputs = zip(self.hidden_outputs(), self.hidden_outputs(clip_skip), strict=True)
        for tokenizer, encoder, (penultimate, skipped) in zip(self.tokenizers, self.encoders, outputs, strict=True):
            out = encoder.run({"input_ids": tokenizer.encode(list(texts))})
            states = out[penultimate]
            if skipped != penultimate:
                states = np.concatenate([states[:skip_from], out[skipped][skip_from:]])
            hidden.append(states.astype(np.float32, copy=False))
        return np.concatenate(hidden, axis=-1), out["text_embeds"].astype(np.float32, copy=False)

    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str], sampling: SamplingConfig,
               uncond_kinds: Sequence[str]) -> Conditioning:
        n = len(prompts)
        encoded = [k for k, kind in enumerate(uncond_kinds) if kind != "zeros"]
        with self.timer("text_encoder"):  # zero rows need no encoding
            hidden, pooled = self._encode_texts([negative_prompts[k] for k in encoded] + list(prompts),
                                                sampling.clip_skip, skip_from=len(encoded))
        pair_hidden = np.zeros((2 * n, *hidden.shape[1:]), np.float32)
        pair_pooled = np.zeros((2 * n, *pooled.shape[1:]), np.float32)
        pair_hidden[encoded], pair_pooled[encoded] = hidden[:len(encoded)], pooled[:len(encoded)]
        pair_hidden[n:], pair_pooled[n:] = hidden[len(encoded):], pooled[len(encoded):]
        # diffusers' _get_add_time_ids: original size + crop top-left + target size, the same for both halves
        time_ids = [*sampling.original_size, *sampling.crops_coords_top_left, *sampling.target_size]
        return Conditioning.of({"encoder_hidden_states": pair_hidden, "text_embeds": pair_pooled,
                                "time_ids": np.tile(np.array(time_ids, np.float32), (2 * n, 1))})


class Family:
    """What differs between model families, for everything before the UNet."""

    name = ""
    settings: tuple[str, ...] = ()  # the sampling settings (of FAMILY_SETTINGS) this family takes
    tokenizer_parts: tuple[tuple[str, str], ...] = (("tokenizer", "text_encoder"),)
    unet_inputs: tuple[str, ...] = ("sample", "timestep", "encoder_hidden_states")

    def resolve_settings(self, folder: ModelFolder, height: int, width: int,
                         sampling: SamplingConfig) -> dict[str, object]:
        """The family's settings checked and filled in; a setting this family does not take is refused."""
        given = [name for name in FAMILY_SETTINGS if name not in self.settings and getattr(sampling, name) is not None]
        if given and given[0] in MICRO_CONDITIONING:
            raise InputError(f"{given[0]} applies to SDXL models only; this model is SD (its UNet takes no time_ids)")
        if given:
            raise InputError(f"{given[0]} applies to SDXL models only here; this model is SD")
        return {}

    def record(self, sampling: SamplingConfig) -> dict[str, object]:
        """The family's settings as traces, manifests and calibrations record them."""
        return family_record(sampling, self.settings)

    def load_text(self, folder: ModelFolder, tokenizers: Sequence[PromptTokenizer], provider: str,
                  threads: int | None, timer: StageTimer) -> TextConditioner:
        encoder = load_model(folder.path / "text_encoder/model.onnx", provider, threads)
        return SDText(tokenizers[0], encoder, timer)


class SDFamily(Family):
    name = "sd"


class SDXLFamily(Family):
    name = "sdxl"
    settings = FAMILY_SETTINGS
    tokenizer_parts = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    unet_inputs = (*Family.unet_inputs, "text_embeds", "time_ids")

    def resolve_settings(self, folder: ModelFolder, height: int, width: int,
                         sampling: SamplingConfig) -> dict[str, object]:
        """SDXL's size micro-conditioning checked and filled with diffusers' defaults (original and target size: the
        image's (height, width); crop top-left: (0, 0)), and clip_skip checked (0 is recorded as unset: the same
        layer, so resume and calibration agree)."""
        defaults = {"original_size": (height, width), "crops_coords_top_left": (0, 0), "target_size": (height, width)}
        out: dict[str, object] = {}
        for name in MICRO_CONDITIONING:
            value = getattr(sampling, name)
            value = defaults[name] if value is None else value
            low = 0 if name == "crops_coords_top_left" else 1
            pair = tuple(value) if isinstance(value, tuple | list | np.ndarray) else ()  # a str is no pair
            if len(pair) != 2 or not all(isinstance(v, Integral) and not isinstance(v, bool) and low <= v <= MICRO_MAX
                                         for v in pair):
                what = "(top, left)" if low == 0 else "(height, width)"
                raise InputError(f"{name} {value!r} not allowed: must be {what}, integers in [{low}, {MICRO_MAX}] "
                                 "pixels")
            out[name] = (int(pair[0]), int(pair[1]))
        clip_skip = sampling.clip_skip
        if clip_skip is not None:
            layers = min(_layers(folder, part) for part in ("text_encoder", "text_encoder_2"))
            if isinstance(clip_skip, bool) or not isinstance(clip_skip, Integral) or not 0 <= clip_skip <= layers - 1:
                raise InputError(f"clip_skip {clip_skip!r} not allowed: must be an integer in [0, {layers - 1}] for "
                                 f"this model (layers skipped back from the penultimate one of {layers})")
        out["clip_skip"] = clip_skip or None
        return out

    def load_text(self, folder: ModelFolder, tokenizers: Sequence[PromptTokenizer], provider: str,
                  threads: int | None, timer: StageTimer) -> TextConditioner:
        paths = (folder.path / "text_encoder/model.onnx", folder.path / "text_encoder_2/model.onnx")
        encoders = (load_model(paths[0], provider, threads), load_model(paths[1], provider, threads))
        if "text_embeds" not in encoders[1].outputs:
            raise ModelFolderError(f"{paths[1]} has no text_embeds output (SDXL's second text encoder is a "
                                   "CLIPTextModelWithProjection)")
        hidden = (hidden_state_outputs(encoders[0], paths[0]), hidden_state_outputs(encoders[1], paths[1]))
        for part, layers in zip(("text_encoder", "text_encoder_2"), hidden, strict=True):
            config = folder.path / part / "config.json"  # clip_skip's range comes from it (`resolve_settings`)
            stated = read_json(config).get("num_hidden_layers") if config.is_file() else None
            if stated is not None and stated != len(layers) - 1:
                raise ModelFolderError(f"corrupt config {config}: num_hidden_layers is {stated!r}, but "
                                       f"{part}/model.onnx has {len(layers) - 1} layers (hidden_states.0 to "
                                       f".{len(layers) - 1})")
        return SDXLText((tokenizers[0], tokenizers[1]), encoders, hidden, timer)


def _layers(folder: ModelFolder, part: str) -> int:
    path = folder.path / part / "config.json"
    value = read_json(path).get("num_hidden_layers")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelFolderError(f"corrupt config {path}: num_hidden_layers must be a positive integer, not {value!r}")
    return value


FAMILIES: dict[str, Family] = {"sd": SDFamily(), "sdxl": SDXLFamily()}
