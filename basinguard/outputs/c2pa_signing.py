"""Optional C2PA manifests (c2pa-python, imported only when signing is asked for): each image is signed last, after
its XMP and text metadata are written, with a `c2pa.created` action whose digital source type is IPTC's
trainedAlgorithmicMedia and whose software agent is basinguard and its version."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from basinguard.errors import first_line
from basinguard.outputs.errors import OutputError
from basinguard.outputs.xmp import DIGITAL_SOURCE_TYPE, SYSTEM_NAME, software_version

MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
INSTALL_HINT = "pip install 'basinguard[c2pa]'"


def manifest_definition(title: str, mime: str) -> dict[str, Any]:
    agent = {"name": SYSTEM_NAME, "version": software_version()}
    return {"claim_generator_info": [agent], "title": title, "format": mime,
            "assertions": [{"label": "c2pa.actions", "data": {"actions": [
                {"action": "c2pa.created", "digitalSourceType": DIGITAL_SOURCE_TYPE, "softwareAgent": agent}]}}]}


def _signing_algorithm(key: object, path: Path) -> str:
    """The C2PA algorithm for a private key: ES256/384/512 by EC curve, Ed25519, PS256 for RSA."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(key, ec.EllipticCurvePrivateKey):
        by_curve = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}
        if key.curve.name not in by_curve:
            raise OutputError(f"--c2pa-key {path}: EC curve {key.curve.name} is not one C2PA signs with "
                              "(P-256, P-384 or P-521)")
        return by_curve[key.curve.name]
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    if isinstance(key, rsa.RSAPrivateKey):
        return "ps256"
    raise OutputError(f"--c2pa-key {path}: a {type(key).__name__} key; C2PA signs with EC (P-256/384/521), "
                      "Ed25519 or RSA keys")


def _read(path: Path, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise OutputError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None


@dataclass
class C2paSigner:
    """A certificate chain (PEM, the signer's certificate first) and its private key (PEM), checked when opened:
    a key that is not the certificate's, or a chain c2pa refuses, is one error before any image is made."""

    cert: Path
    key: Path
    tsa_url: str | None = None
    _signer: Any = field(default=None, init=False, repr=False)

    @classmethod
    def open(cls, cert: Path, key: Path, tsa_url: str | None = None) -> C2paSigner:
        signer = cls(Path(cert), Path(key), tsa_url)
        signer.sign(_probe_png(), "png", "probe.png")  # c2pa's own checks of the chain, once, before any work
        return signer

    def _load(self) -> Any:
        try:
            import c2pa
            from cryptography import x509
            from cryptography.hazmat.primitives import serialization
        except ImportError as exc:
            raise OutputError(f"--c2pa-cert needs c2pa-python: {INSTALL_HINT} ({exc})") from None
        chain, key_pem = _read(self.cert, "--c2pa-cert"), _read(self.key, "--c2pa-key")
        try:
            certificates = x509.load_pem_x509_certificates(chain)
        except ValueError:
            raise OutputError(f"--c2pa-cert {self.cert} holds no PEM certificate") from None
        try:
            private_key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise OutputError(f"--c2pa-key {self.key} is not an unencrypted PEM private key ({first_line(exc)})") from None
        public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if private_key.public_key().public_bytes(*public) != certificates[0].public_key().public_bytes(*public):
            raise OutputError(f"--c2pa-key {self.key} is not the key of the first certificate in --c2pa-cert "
                              f"{self.cert} ({certificates[0].subject.rfc4514_string()}); give the matching key")
        info = c2pa.C2paSignerInfo(_signing_algorithm(private_key, self.key), chain, key_pem, self.tsa_url)
        try:
            return c2pa.Signer.from_info(info)
        except c2pa.C2paError as exc:
            raise OutputError(f"--c2pa-cert {self.cert}: c2pa refuses this signer: {first_line(exc)}") from None

    def sign(self, data: bytes, image_format: str, title: str) -> bytes:
        """`data` (an encoded image of `image_format`: png, jpeg or webp) with a C2PA manifest embedded."""
        if self._signer is None:
            self._signer = self._load()
        import c2pa

        mime = MIME_TYPES[image_format]
        out = io.BytesIO()
        try:
            with c2pa.Builder(json.dumps(manifest_definition(title, mime))) as builder:
                builder.sign(self._signer, mime, io.BytesIO(data), out)
        except c2pa.C2paError as exc:
            raise OutputError(f"C2PA signing with --c2pa-cert {self.cert} failed: {first_line(exc)}") from None
        return out.getvalue()

    def __getstate__(self) -> dict[str, Any]:  # to Ray workers: the paths; each process loads its own signer
        return {"cert": self.cert, "key": self.key, "tsa_url": self.tsa_url, "_signer": None}


def _probe_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    return buffer.getvalue()
