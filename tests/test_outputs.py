"""Image files and their metadata (basinguard.outputs): the trace, A1111's parameters, the IPTC XMP packet, JPEG and
WebP, C2PA. Each is read back by an independent reader: webui's own parsing rules (reimplemented below from its
documented regex), sd-parsers, piexif (webui's EXIF reader), Pillow's and defusedxml's XMP parsing, c2pa's Reader."""

from __future__ import annotations

import datetime
import io
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from basinguard.cli import SHIPPED_MODEL
from basinguard.cli import main as cli_main

TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
IPTC_EXT = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
BASINGUARD_NS = "urn:basinguard:xmp:1/"
RUN = ["generate", "--steps", "4", "--threads", "1", "--seed", "7"]

# ---- webui's parse_generation_parameters (modules/infotext_utils.py), its documented rules reimplemented as the
# independent reference: the last line holds the `Key: value` pairs when it has three or more, a value in double
# quotes is JSON, a `WxH` value becomes Key-1 and Key-2.
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_generation_parameters(text: str) -> dict[str, str]:
    res: dict[str, str] = {}
    prompt = negative_prompt = ""
    done_with_prompt = False
    *lines, lastline = text.strip().split("\n")
    if len(RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative_prompt
    for k, v in RE_PARAM.findall(lastline):
        if v and v[0] == '"' and v[-1] == '"':
            try:
                v = json.loads(v)
            except ValueError:
                pass
        m = RE_IMAGESIZE.match(v)
        if m is not None:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    return res


def xmp_properties(xmp: bytes | str) -> dict[str, str]:
    """{namespace-qualified name: text} of an XMP packet's rdf:Description, parsed by defusedxml (namespaces kept,
    unlike Pillow's getxmp)."""
    from defusedxml import ElementTree

    root = ElementTree.fromstring(xmp.encode() if isinstance(xmp, str) else xmp)
    description = root.find(".//{http://www.w3.org/1999/02/22-rdf-syntax-ns#}Description")
    assert description is not None
    return {child.tag: child.text or "" for child in description}


def png_xmp(path: Path) -> dict[str, str]:
    from PIL import Image

    with Image.open(path) as im:
        return xmp_properties(im.info["XML:com.adobe.xmp"])


def user_comment(path: Path) -> str:
    """The EXIF UserComment as webui reads it (piexif)."""
    import piexif
    import piexif.helper
    from PIL import Image

    with Image.open(path) as im:
        exif = piexif.load(im.info["exif"])
    return piexif.helper.UserComment.load(exif["Exif"][piexif.ExifIFD.UserComment])


def embedded_xmp(path: Path) -> dict[str, str]:
    """A JPEG's or WebP's XMP, found by Pillow and parsed by defusedxml."""
    from PIL import Image

    with Image.open(path) as im:
        raw = im.info.get("xmp")
    assert raw, f"{path} has no XMP"
    return xmp_properties(raw)


def iptc(name: str) -> str:
    return f"{{{IPTC_EXT}}}{name}"


@pytest.fixture(scope="module")
def shipped_identity() -> dict:
    from basinguard.runtime.model_folder import model_identity

    return model_identity(SHIPPED_MODEL)


# ------------------------------------------------------------------------------------------------ parameters


def test_parameters_read_back_by_webuis_rules_whatever_the_text():
    from basinguard.outputs.parameters import a1111_parameters

    trace = {"prompt": "a cat, sitting: on a mat\nsecond line, ü", "negative_prompt": "blurry, low: quality",
             "seed": 123456789012, "steps": 30, "scheduler": "dpm++2m-karras", "width": 768, "height": 512,
             "policy": {"name": "og-stp", "guidance_scale": 7.5, "transition_t": 600, "opposite_scale": 2.25},
             "transition_step": 11, "detection_score": None}
    text = a1111_parameters(trace, model_name="my, model: v2", model_hash="0123456789abcdef", version="basinguard 9")
    parsed = parse_generation_parameters(text)
    assert parsed["Prompt"] == trace["prompt"] and parsed["Negative prompt"] == trace["negative_prompt"]
    assert {k: parsed[k] for k in ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size-1", "Size-2",
                                    "Model hash", "Model", "Guidance policy", "Transition t", "Opposite scale",
                                    "Transition step", "Version")} == {
        "Steps": "30", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7.5", "Seed": "123456789012",
        "Size-1": "768", "Size-2": "512", "Model hash": "0123456789abcdef", "Model": "my, model: v2",
        "Guidance policy": "og-stp", "Transition t": "600", "Opposite scale": "2.25", "Transition step": "11",
        "Version": "basinguard 9"}


def test_parameters_of_an_image_that_never_switched_and_of_given_latents():
    from basinguard.outputs.parameters import a1111_parameters

    trace = {"prompt": "p", "negative_prompt": "", "seed": None, "steps": 5, "scheduler": "euler-a", "width": 64,
             "height": 64, "policy": {"name": "dtp", "guidance_scale": 6.0, "pre_scale": 0.0},
             "transition_step": None}
    text = a1111_parameters(trace)
    parsed = parse_generation_parameters(text)
    assert "Negative prompt:" not in text and parsed["Negative prompt"] == ""
    assert "Seed" not in parsed  # latents, not a seed, made it: no seed is claimed
    assert (parsed["Sampler"], parsed["Schedule type"], parsed["CFG scale"], parsed["Pre scale"],
            parsed["Transition step"]) == ("Euler a", "Automatic", "6", "0", "none")


# ------------------------------------------------------------------------------------------------ PNG


def test_png_has_trace_parameters_and_iptc_xmp(tmp_path, shipped_identity):
    from PIL import Image

    out, trace_file = tmp_path / "a.png", tmp_path / "a.json"
    assert cli_main([*RUN, "--prompt", "a red circle, large", "--negative-prompt", "blue square", "--policy", "og-dtp",
                     "--out", str(out), "--trace", str(trace_file)]) == 0
    trace = json.loads(trace_file.read_text())
    with Image.open(out) as im:
        text = dict(im.text)
        xmp_pillow = im.getxmp()["xmpmeta"]["RDF"]["Description"]
    assert json.loads(text["basinguard"]) == trace
    parsed = parse_generation_parameters(text["parameters"])
    assert (parsed["Prompt"], parsed["Negative prompt"]) == ("a red circle, large", "blue square")
    assert (parsed["Steps"], parsed["Seed"], parsed["Size-1"], parsed["Size-2"]) == ("4", "7", "32", "32")
    assert float(parsed["CFG scale"]) == trace["policy"]["guidance_scale"]
    assert float(parsed["Opposite scale"]) == trace["policy"]["opposite_scale"]
    assert parsed["Guidance policy"] == "og-dtp"
    assert parsed["Transition step"] == ("none" if trace["transition_step"] is None else str(trace["transition_step"]))
    assert (parsed["Model"], parsed["Model hash"]) == ("shapes", shipped_identity["id"])
    xmp = png_xmp(out)
    assert xmp[iptc("DigitalSourceType")] == TRAINED == xmp_pillow["DigitalSourceType"]
    assert xmp[iptc("AISystemUsed")] == "basinguard"
    assert xmp[iptc("AISystemVersionUsed")] == metadata.version("basinguard")
    assert iptc("AIPromptInformation") not in xmp  # private unless asked for


def test_sd_parsers_reads_the_png_and_the_jpeg(tmp_path):
    from sd_parsers import ParserManager

    for name in ("a.png", "a.jpg"):
        assert cli_main([*RUN, "--prompt", "a green triangle", "--negative-prompt", "red", "--scheduler", "euler",
                         "--out", str(tmp_path / name)]) == 0
        info = ParserManager().parse(tmp_path / name)
        assert info is not None, name
        sampler = info.samplers[0]
        assert (info.full_prompt, info.full_negative_prompt) == ("a green triangle", "red")
        assert sampler.name == "Euler" and sampler.parameters["seed"] == "7" and sampler.parameters["steps"] == "4"
        assert sampler.model is not None and sampler.model.name == "shapes"


def test_provenance_prompt_puts_the_prompt_in_xmp_escaped(tmp_path):
    prompt = 'a <b> & "c" circle\x01'  # markup and a control character XML cannot hold
    out = tmp_path / "a.png"
    assert cli_main([*RUN, "--prompt", prompt, "--provenance-prompt", "--out", str(out)]) == 0
    assert png_xmp(out)[iptc("AIPromptInformation")] == 'a <b> & "c" circle\ufffd'


def test_no_provenance_keeps_only_the_trace(tmp_path):
    from PIL import Image

    out = tmp_path / "a.png"
    assert cli_main([*RUN, "--prompt", "a circle", "--no-provenance", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert set(im.text) == {"basinguard"} and "XML:com.adobe.xmp" not in im.info
        assert json.loads(im.text["basinguard"])["prompt"] == "a circle"


def test_save_png_without_options_marks_the_image(tmp_path):
    from PIL import Image

    from basinguard.runtime.pipeline import PNG_TRACE_KEY, Generation

    trace = {"prompt": "x", "negative_prompt": "", "seed": 1, "steps": 2, "scheduler": "ddim", "width": 4, "height": 4,
             "policy": {"name": "cfg", "guidance_scale": 3.0}, "transition_step": 0}
    pixels = np.random.default_rng(0).random((4, 4, 3), dtype=np.float32)
    Generation(pixels, trace).save_png(tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as im:
        assert json.loads(im.text[PNG_TRACE_KEY]) == trace
        assert parse_generation_parameters(im.text["parameters"])["CFG scale"] == "3"
        np.testing.assert_array_equal(np.asarray(im), (pixels * 255).round().astype(np.uint8))
    assert png_xmp(tmp_path / "g.png")[iptc("DigitalSourceType")] == TRAINED


# ------------------------------------------------------------------------------------------------ JPEG, WebP


@pytest.mark.parametrize("suffix", [".jpg", ".webp"])
def test_jpeg_and_webp_carry_parameters_xmp_and_trace(tmp_path, suffix):
    from PIL import Image

    out, trace_file, raw = tmp_path / f"a{suffix}", tmp_path / "a.json", tmp_path / "a.npy"
    args = [*RUN, "--prompt", "a blue circle, tiny", "--negative-prompt", "noise"]
    assert cli_main([*args, "--out", str(out), "--trace", str(trace_file), "--provenance-prompt"]) == 0
    assert cli_main([*args, "--out", str(raw)]) == 0
    trace = json.loads(trace_file.read_text())
    parsed = parse_generation_parameters(user_comment(out))
    assert (parsed["Prompt"], parsed["Negative prompt"], parsed["Seed"]) == ("a blue circle, tiny", "noise", "7")
    xmp = embedded_xmp(out)
    assert xmp[iptc("DigitalSourceType")] == TRAINED and xmp[iptc("AIPromptInformation")] == "a blue circle, tiny"
    assert json.loads(xmp[f"{{{BASINGUARD_NS}}}trace"]) == trace
    with Image.open(out) as im:
        assert im.format == {".jpg": "JPEG", ".webp": "WEBP"}[suffix]
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
    # the same image, lossily coded: close to the float pixels on average
    assert np.abs(pixels - np.load(raw)).mean() < 0.05


@pytest.mark.parametrize("quality", [25, 95])
def test_quality_is_the_jpeg_encoders_quality(tmp_path, quality):
    """The quantization tables are those Pillow's encoder makes at that quality (the reference), not its default's."""
    from PIL import Image

    out = tmp_path / "a.jpg"
    assert cli_main([*RUN, "--prompt", "a circle", "--quality", str(quality), "--out", str(out)]) == 0
    with Image.open(out) as im:
        reference = io.BytesIO()
        im.convert("RGB").save(reference, format="JPEG", quality=quality)
        tables = im.quantization
    with Image.open(reference) as ref:
        assert tables == ref.quantization


def test_jpeg_no_provenance_keeps_the_trace_in_xmp(tmp_path):
    from PIL import Image

    out, trace_file = tmp_path / "a.jpg", tmp_path / "a.json"
    assert cli_main([*RUN, "--prompt", "a circle", "--no-provenance", "--out", str(out), "--trace", str(trace_file)]) == 0
    xmp = embedded_xmp(out)
    assert set(xmp) == {f"{{{BASINGUARD_NS}}}trace"}
    assert json.loads(xmp[f"{{{BASINGUARD_NS}}}trace"]) == json.loads(trace_file.read_text())
    with Image.open(out) as im:
        assert "exif" not in im.info


def test_a_trace_too_long_for_jpeg_is_one_clear_error(tmp_path):
    from basinguard.outputs import OutputError, write_image

    trace = {"prompt": "x", "gap": [0.123456789012345] * 5000}
    with pytest.raises(OutputError, match="does not fit a JPEG's XMP segment"):
        write_image(tmp_path / "a.jpg", np.zeros((8, 8, 3)), trace)
    assert list(tmp_path.iterdir()) == []
    write_image(tmp_path / "a.webp", np.zeros((8, 8, 3)), trace)  # WebP's XMP chunk has room
    assert json.loads(embedded_xmp(tmp_path / "a.webp")[f"{{{BASINGUARD_NS}}}trace"]) == trace


@pytest.mark.parametrize(("flags", "message"), [
    (["--out", "a.png", "--quality", "80"], "--quality applies to .jpg and .webp images, not .png"),
    (["--out", "a.jpg", "--quality", "0"], "--quality must be an integer in [1, 100] (got 0)"),
    (["--out", "a.gif"], "--out a.gif must end in .png or .jpg or .jpeg or .webp or .npy"),
    (["--out", "a.png", "--no-provenance", "--provenance-prompt"], "--provenance-prompt puts the prompt"),
    (["--out", "a.png", "--c2pa-cert", "chain.pem"], "C2PA signing needs both --c2pa-cert and --c2pa-key"),
    (["--out", "a.npy", "--c2pa-cert", "c.pem", "--c2pa-key", "k.pem"], "cannot carry a manifest"),
])
def test_bad_output_flags_are_one_line_and_write_nothing(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    assert cli_main([*RUN, "--prompt", "a circle", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ C2PA


def make_chain(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and an ES256 signer certificate with the extensions C2PA asks of a signer (digitalSignature key usage,
    emailProtection extended key usage, not a CA, key identifiers); returns (chain.pem, key.pem, other_key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "basinguard tests")])

    def usage(**on: bool) -> x509.KeyUsage:
        names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
                 "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
        return x509.KeyUsage(**{n: on.get(n, False) for n in names})

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def certificate(subject: str, public: object, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name("test CA"))
                   .public_key(public).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                   .add_extension(usage(key_cert_sign=ca, crl_sign=ca, digital_signature=not ca), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False))
        if not ca:
            builder = (builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
                       .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                      critical=False))
        return builder.sign(ca_key, hashes.SHA256())

    pem = serialization.Encoding.PEM
    chain = folder / "chain.pem"
    chain.write_bytes(certificate("test signer", key.public_key(), False).public_bytes(pem)
                      + certificate("test CA", ca_key.public_key(), True).public_bytes(pem))
    paths = []
    for stem, k in (("key", key), ("other_key", ec.generate_private_key(ec.SECP256R1()))):
        paths.append(folder / f"{stem}.pem")
        paths[-1].write_bytes(k.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return chain, paths[0], paths[1]


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> tuple[Path, Path, Path]:
    pytest.importorskip("c2pa", reason="C2PA signing needs c2pa-python (the c2pa extra)")
    return make_chain(tmp_path_factory.mktemp("c2pa"))


@pytest.mark.parametrize(("suffix", "mime"), [(".png", "image/png"), (".jpg", "image/jpeg"), (".webp", "image/webp")])
def test_c2pa_manifest_says_created_by_a_trained_model(tmp_path, chain, suffix, mime):
    import c2pa

    cert, key, _ = chain
    out = tmp_path / f"a{suffix}"
    assert cli_main([*RUN, "--prompt", "a circle, red", "--out", str(out), "--c2pa-cert", str(cert),
                     "--c2pa-key", str(key)]) == 0
    with open(out, "rb") as f, c2pa.Reader(mime, f) as reader:
        manifest = reader.get_active_manifest()
        results = reader.get_validation_results()
    actions = next(a["data"]["actions"] for a in manifest["assertions"] if a["label"].startswith("c2pa.actions"))
    assert actions[0]["action"] == "c2pa.created" and actions[0]["digitalSourceType"] == TRAINED
    assert actions[0]["softwareAgent"] == {"name": "basinguard", "version": metadata.version("basinguard")}
    assert manifest["signature_info"]["common_name"] == "test signer"
    # Every check passes but trust: the test CA is in no trust list
    failures = {f["code"] for f in results["activeManifest"]["failure"]}
    assert failures == {"signingCredential.untrusted"}
    successes = {s["code"] for s in results["activeManifest"]["success"]}
    assert {"assertion.dataHash.match", "claimSignature.validated"} <= successes  # the image bytes are what was signed
    # the metadata written before signing is still there, and read as before
    xmp = png_xmp(out) if suffix == ".png" else embedded_xmp(out)
    assert xmp[iptc("DigitalSourceType")] == TRAINED
    if suffix == ".png":
        from PIL import Image

        with Image.open(out) as im:
            parameters = im.text["parameters"]
    else:
        parameters = user_comment(out)
    assert parse_generation_parameters(parameters)["Prompt"] == "a circle, red"


def test_c2pa_key_not_matching_its_certificate_is_one_line_and_nothing_written(tmp_path, chain, capsys):
    cert, _, other_key = chain
    out = tmp_path / "a.png"
    assert cli_main([*RUN, "--prompt", "a circle", "--out", str(out), "--c2pa-cert", str(cert),
                     "--c2pa-key", str(other_key)]) == 2
    err = capsys.readouterr().err
    assert "is not the key of the first certificate in --c2pa-cert" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_c2pa_unreadable_credentials_are_one_line(tmp_path, chain, capsys):
    cert, key, _ = chain
    (tmp_path / "junk.pem").write_text("not a certificate")
    for flags, message in ((["--c2pa-cert", str(tmp_path / "junk.pem"), "--c2pa-key", str(key)], "holds no PEM"),
                           (["--c2pa-cert", str(cert), "--c2pa-key", str(tmp_path / "missing.pem")], "cannot read")):
        assert cli_main([*RUN, "--prompt", "a circle", "--out", str(tmp_path / "a.png"), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert not (tmp_path / "a.png").exists()


# ------------------------------------------------------------------------------------------------ import rules


def test_outputs_import_neither_the_runtime_nor_optional_libraries():
    """outputs sits below the runtime (Generation.save_png uses it), and c2pa and pyarrow load only when used."""
    code = ("import sys\n"
            "for name in ('c2pa', 'pyarrow', 'webdataset', 'cryptography'):\n"
            "    sys.modules[name] = None\n"
            "import basinguard.outputs, basinguard.outputs.shards, basinguard.outputs.c2pa_signing\n"
            "print(sorted(m for m in sys.modules if m.startswith('basinguard.runtime')))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
