"""The XMP packet every image carries: IPTC's digital source type (the machine-readable "made by a generative model"
mark that platforms and the EU AI Act's marking rules look for), IPTC 2025.1's AI system fields, optionally the
prompt, and in JPEG and WebP files the trace, which those formats have no text chunk for."""

from __future__ import annotations

import re
from importlib import metadata
from xml.sax.saxutils import escape

SYSTEM_NAME = "basinguard"
DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
IPTC_EXT = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
XMP_BASIC = "http://ns.adobe.com/xap/1.0/"
BASINGUARD_NS = "urn:basinguard:xmp:1/"  # the trace's property; a URN, as nothing is served at it
RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
PNG_XMP_KEY = "XML:com.adobe.xmp"  # the iTXt keyword the XMP specification gives PNG

# Characters XML 1.0 cannot hold at all (most C0 controls, lone surrogates, U+FFFE/U+FFFF): a prompt may have them.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def software_version() -> str:
    """basinguard's installed version (the AI system version in XMP, C2PA's software agent)."""
    try:
        return metadata.version("basinguard")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _text(value: str) -> str:
    """`value` as XML element text: escaped, carriage returns kept (a parser would fold a bare one into \\n), and
    what XML cannot hold replaced by U+FFFD."""
    return escape(_NOT_XML.sub("\ufffd", value)).replace("\r", "&#13;")


def xmp_packet(*, provenance: bool = True, prompt: str | None = None, trace_json: str | None = None) -> str:
    """An XMP packet: with `provenance`, the digital source type, the AI system and its version (and `prompt` where
    given); `trace_json`, where given, as basinguard:trace."""
    version = software_version()
    properties = []
    if provenance:
        properties += [("Iptc4xmpExt:DigitalSourceType", DIGITAL_SOURCE_TYPE),
                       ("Iptc4xmpExt:AISystemUsed", SYSTEM_NAME),
                       ("Iptc4xmpExt:AISystemVersionUsed", version),
                       ("xmp:CreatorTool", f"{SYSTEM_NAME} {version}")]
        if prompt is not None:
            properties.append(("Iptc4xmpExt:AIPromptInformation", prompt))
    if trace_json is not None:
        properties.append(("basinguard:trace", trace_json))
    body = "".join(f"   <{name}>{_text(value)}</{name}>\n" for name, value in properties)
    return ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
            '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
            f' <rdf:RDF xmlns:rdf="{RDF}">\n'
            f'  <rdf:Description rdf:about="" xmlns:Iptc4xmpExt="{IPTC_EXT}" xmlns:xmp="{XMP_BASIC}" '
            f'xmlns:basinguard="{BASINGUARD_NS}">\n'
            f'{body}'
            '  </rdf:Description>\n'
            ' </rdf:RDF>\n'
            '</x:xmpmeta>\n'
            '<?xpacket end="w"?>')
