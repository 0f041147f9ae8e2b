"""The model-folder format, the lowest floor of the package: where a model folder keeps its parts, how its JSON is
read, which family it is, and the input shapes its ONNX files declare. Used by the export (which writes the format),
the engine and the runtime (which read it); imports nothing of basinguard but its error base.

A model folder (ours, or one from optimum's exporter):
  basinguard.json                 our export record and `sampling_defaults` (absent in optimum's folders)
  model_index.json                the diffusers pipeline's own settings (force_zeros_for_empty_prompt)
  text_encoder/model.onnx         + config.json; SDXL also text_encoder_2/
  tokenizer/                      tokenizer.json or vocab.json + merges.txt; SDXL also tokenizer_2/
  unet/model.onnx                 + config.json
  vae_decoder/model.onnx          + config.json
  scheduler/scheduler_config.json
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from basinguard.errors import BasinguardError

MANIFEST = "basinguard.json"
REQUIRED = ("text_encoder/model.onnx", "unet/model.onnx", "vae_decoder/model.onnx", "tokenizer",
            "scheduler/scheduler_config.json")
SDXL_REQUIRED = ("text_encoder_2/model.onnx", "tokenizer_2")  # beside REQUIRED, for a UNet conditioned on text_time
_JSON_NAMES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


class ModelFolderError(BasinguardError, ValueError):
    """A model folder that is missing a part or holds a corrupt file; the message names the file."""


def read_json(path: Path) -> dict:
    """The JSON object in `path`; a ModelFolderError naming the file for anything else (missing, unreadable, a
    folder, not JSON, or JSON that is not an object)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFolderError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"corrupt JSON in {path}: {exc}") from None
    except OSError as exc:  # a folder in its place, no permission, an I/O error
        raise ModelFolderError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(value, dict):
        found = _JSON_NAMES.get(type(value), "another value")
        raise ModelFolderError(f"corrupt config {path}: expected a JSON object, found {found}")
    return value


def model_family(unet_config: Mapping[str, Any]) -> str:
    """"sdxl" for a UNet conditioned on pooled text and size ids (addition_embed_type "text_time", as diffusers
    configures SDXL: two text encoders, size micro-conditioning), else "sd" (SD 1.x/2.x). The one place that
    decides, for the export (torch's config) and the runtime."""
    return "sdxl" if unet_config.get("addition_embed_type") == "text_time" else "sd"


# ONNX is a protobuf: ModelProto.graph (7) → GraphProto.input (11) → ValueInfoProto{name (1), type (2)} →
# TypeProto.tensor_type (1) → shape (2) → dim (1) → {dim_value (1) | dim_param (2)}. Reading just these fields, and
# seeking past everything else (the weights), takes microseconds where `onnx.load` reads the whole file and costs
# a second and a half of imports.
_GRAPH, _INPUT = 7, 11


def _varint(f: IO[bytes]) -> int:
    shift = value = 0
    while True:
        byte = f.read(1)
        if not byte:
            raise EOFError
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7


def _fields(f: IO[bytes], end: int):
    """(field number, wire type, payload length or value) of each field up to byte `end`; the file is left at the
    payload of a length-delimited field and must be moved past it by the caller."""
    while f.tell() < end:
        key = _varint(f)
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, wire, _varint(f)
        elif wire == 2:
            yield number, wire, _varint(f)
        elif wire in (1, 5):
            f.seek(8 if wire == 1 else 4, 1)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _message(data: bytes) -> dict[int, list[Any]]:
    """A small message's fields by number: varints as ints, length-delimited as bytes."""
    import io

    f, out = io.BytesIO(data), {}
    for number, wire, value in _fields(f, len(data)):
        if wire == 2:
            value = f.read(value)
        out.setdefault(number, []).append(value)
    return out


def _shape(value_info: bytes) -> tuple[str, tuple[int | str | None, ...]]:
    info = _message(value_info)
    name = info.get(1, [b""])[0].decode()
    tensor = _message(_message(info.get(2, [b""])[0]).get(1, [b""])[0])
    dims = []
    for dim in _message(tensor.get(2, [b""])[0]).get(1, []):
        fields = _message(dim)
        dims.append(fields[1][0] if 1 in fields else fields[2][0].decode() if 2 in fields else None)
    return name, tuple(dims)


def onnx_input_shapes(path: Path) -> dict[str, tuple[int | str | None, ...]]:
    """The graph inputs an ONNX file declares: name → dims (an int for a fixed axis, a str or None for a dynamic
    one), read without loading the weights."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            for number, wire, length in _fields(f, size):
                if number != _GRAPH or wire != 2:
                    if wire == 2:
                        f.seek(length, 1)
                    continue
                shapes, end = {}, f.tell() + length
                for inner, inner_wire, inner_length in _fields(f, end):
                    if inner_wire != 2:
                        continue
                    if inner == _INPUT:
                        name, dims = _shape(f.read(inner_length))
                        shapes[name] = dims
                    else:
                        f.seek(inner_length, 1)
                return shapes
    except (EOFError, ValueError, IndexError, UnicodeDecodeError):
        pass
    except OSError as exc:
        raise ModelFolderError(f"cannot read {path}: {exc.strerror or exc}") from None
    raise ModelFolderError(f"{path} is not a readable ONNX model (no graph found)")


def is_exported_folder(path: Path) -> bool:
    """Whether `path` is a folder basinguard exported (its basinguard.json says so), not a diffusers source."""
    manifest = path / MANIFEST
    if not path.is_dir() or not manifest.is_file():
        return False
    try:
        return read_json(manifest).get("format") == "basinguard-onnx"
    except Exception:  # a corrupt manifest: not ours to read here; whoever opens the folder reports it
        return False
