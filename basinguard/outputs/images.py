"""Image files and what they carry: PNG, JPEG or WebP, with the trace, A1111's parameters, an XMP packet marking the
image as made by a generative model, and optionally a C2PA manifest.

Where each is written
  PNG          trace: compressed text chunk `basinguard` (JSON); parameters: text chunk `parameters`;
               XMP: iTXt chunk `XML:com.adobe.xmp`.
  JPEG, WebP   trace: XMP property basinguard:trace (JSON); parameters: EXIF UserComment as webui writes it
               (piexif's "UNICODE\\0" + UTF-16 big-endian); XMP: the APP1 segment (JPEG) or XMP chunk (WebP).
  C2PA, when a signer is given, last, so that its hash covers everything above.
`provenance=False` keeps only the trace.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from basinguard.files import write_atomic
from basinguard.outputs.errors import OutputError
from basinguard.outputs.parameters import a1111_parameters
from basinguard.outputs.xmp import PNG_XMP_KEY, software_version, xmp_packet

if TYPE_CHECKING:
    import PIL.Image

    from basinguard.outputs.c2pa_signing import C2paSigner

PNG_TRACE_KEY = "basinguard"
PNG_PARAMETERS_KEY = "parameters"  # webui's key
SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
DEFAULT_QUALITY = 90
EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
UNICODE_PREFIX = b"UNICODE\x00"  # EXIF 2.3's character code for UserComment (then UCS-2/UTF-16)
JPEG_XMP_LIMIT = 65502 - len(b"http://ns.adobe.com/xap/1.0/\x00")  # one APP1 segment


@dataclass(frozen=True)
class ImageOptions:
    """How images are written. `model_name`/`model_hash` name the model in the parameters (`Model`, `Model hash`)."""

    provenance: bool = True  # parameters + XMP (IPTC digital source type, AI system); False: the trace alone
    provenance_prompt: bool = False  # the prompt in XMP too (prompts can be private: off unless asked)
    quality: int | None = None  # JPEG and WebP; None: DEFAULT_QUALITY
    model_name: str | None = None
    model_hash: str | None = None
    signer: C2paSigner | None = None  # a C2PA manifest on each image

    def __post_init__(self) -> None:
        if self.quality is not None and not (isinstance(self.quality, int) and 1 <= self.quality <= 100):
            raise OutputError(f"--quality must be an integer in [1, 100] (got {self.quality!r})")


def options_from_flags(suffixes: set[str], identity: Callable[[], dict] | None, *, quality: int | None = None,
                       provenance: bool = True, provenance_prompt: bool = False, c2pa_cert: str | None = None,
                       c2pa_key: str | None = None, c2pa_tsa: str | None = None) -> ImageOptions:
    """ImageOptions from the command line's flags, checked together, and the C2PA credentials opened, before any
    model loads. `suffixes`: the image files' (".npy": raw pixels, which carry no metadata); `identity`: the
    model's (`ModelSpec.identity`), asked for only where the parameters name the model."""
    from basinguard.outputs.c2pa_signing import C2paSigner

    lossy = {".jpg", ".jpeg", ".webp"}
    if quality is not None and not suffixes <= lossy:
        raise OutputError(f"--quality applies to .jpg and .webp images, not {', '.join(sorted(suffixes - lossy))}")
    if provenance_prompt and not provenance:
        raise OutputError("--provenance-prompt puts the prompt in the provenance XMP, which --no-provenance drops; "
                          "give one of them")
    c2pa = [flag for flag, value in (("--c2pa-cert", c2pa_cert), ("--c2pa-key", c2pa_key), ("--c2pa-tsa", c2pa_tsa))
            if value]
    if c2pa and not (c2pa_cert and c2pa_key):
        raise OutputError(f"{' and '.join(c2pa)} given: C2PA signing needs both --c2pa-cert and --c2pa-key")
    if c2pa and ".npy" in suffixes:
        raise OutputError("C2PA signs image files; .npy pixels cannot carry a manifest")
    signer = C2paSigner.open(Path(c2pa_cert), Path(c2pa_key), c2pa_tsa) if c2pa_cert and c2pa_key else None
    name = model_hash = None
    if identity is not None and provenance:
        model = identity()
        name, model_hash = Path(model["path"]).name, model["id"]
    return ImageOptions(provenance=provenance, provenance_prompt=provenance_prompt, quality=quality, model_name=name,
                        model_hash=model_hash, signer=signer)


def image_format(path: Path | str, flag: str = "--out") -> str:
    """png, jpeg or webp, from a file name's suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise OutputError(f"{flag} {path} must end in .png, .jpg, .jpeg or .webp")
    return SUFFIXES[suffix]


def to_pil(image: PIL.Image.Image | np.ndarray) -> PIL.Image.Image:
    """A PIL image from float pixels in [0, 1] (H, W, 3), as `Generation.to_pil`, or a PIL image itself."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        return Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    return image


def user_comment(text: str) -> bytes:
    """EXIF UserComment as webui writes it (piexif's `UserComment.dump(text, encoding="unicode")`)."""
    return UNICODE_PREFIX + text.encode("utf-16-be", errors="replace")


def exif_with_user_comment(comment: bytes) -> bytes:
    """An EXIF block (b"Exif\\0\\0" + little-endian TIFF) holding only UserComment, typed UNDEFINED as the EXIF
    standard and piexif's reader want it (Pillow would type raw bytes as BYTE)."""
    exif_ifd = 8 + 2 + 12 + 4  # after the header and IFD0's one entry
    data_at = exif_ifd + 2 + 12 + 4
    tiff = b"II*\x00" + struct.pack("<I", 8)
    tiff += struct.pack("<HHHII", 1, EXIF_IFD, 4, 1, exif_ifd) + struct.pack("<I", 0)  # IFD0: the Exif IFD pointer
    tiff += struct.pack("<HHHI", 1, USER_COMMENT, 7, len(comment))  # type 7: UNDEFINED
    tiff += (comment.ljust(4, b"\x00") if len(comment) <= 4 else struct.pack("<I", data_at)) + struct.pack("<I", 0)
    return b"Exif\x00\x00" + tiff + (comment if len(comment) > 4 else b"")


def encode_image(image: PIL.Image.Image | np.ndarray, trace: Mapping[str, Any], fmt: str = "png",
                 options: ImageOptions | None = None, title: str = "image") -> bytes:
    """The file's bytes: the image in `fmt` (png, jpeg, webp) with its trace and, per `options`, the provenance
    metadata and a C2PA manifest (`title`: the manifest's title, usually the file name)."""
    from PIL.PngImagePlugin import PngInfo

    options = options or ImageOptions()
    if fmt not in PIL_FORMATS:
        raise OutputError(f"image format must be one of {', '.join(PIL_FORMATS)} (got {fmt!r})")
    pil = to_pil(image)
    trace_json = json.dumps(trace, separators=(",", ":"), ensure_ascii=False)
    parameters = a1111_parameters(trace, model_name=options.model_name, model_hash=options.model_hash,
                                  version=f"basinguard {software_version()}") if options.provenance else None
    prompt = str(trace.get("prompt", "")) if options.provenance and options.provenance_prompt else None
    buffer = io.BytesIO()
    if fmt == "png":
        info = PngInfo()
        info.add_text(PNG_TRACE_KEY, trace_json, zip=True)
        if parameters is not None:
            info.add_text(PNG_PARAMETERS_KEY, parameters)  # tEXt, or iTXt beyond Latin-1, as webui's
            info.add_itxt(PNG_XMP_KEY, xmp_packet(prompt=prompt))
        pil.save(buffer, format="PNG", pnginfo=info)
    else:
        xmp = xmp_packet(provenance=options.provenance, prompt=prompt, trace_json=trace_json).encode()
        if fmt == "jpeg" and len(xmp) > JPEG_XMP_LIMIT:
            raise OutputError(f"this image's trace ({len(trace_json)} bytes) does not fit a JPEG's XMP segment "
                              f"(64 KB); write PNG or WebP, or use fewer steps")
        exif = {} if parameters is None else {"exif": exif_with_user_comment(user_comment(parameters))}
        quality = options.quality or DEFAULT_QUALITY
        pil.convert("RGB").save(buffer, format=PIL_FORMATS[fmt], quality=quality, xmp=xmp, **exif)
    data = buffer.getvalue()
    return data if options.signer is None else options.signer.sign(data, fmt, title)


def write_image(path: Path, image: PIL.Image.Image | np.ndarray, trace: Mapping[str, Any],
                options: ImageOptions | None = None, *, fsync: bool = False) -> None:
    """`encode_image` into `path` (its suffix picks the format), atomically: a kill never leaves half a file."""
    path = Path(path)
    data = encode_image(image, trace, image_format(path), options, title=path.name)
    write_atomic(path, data, fsync=fsync)
