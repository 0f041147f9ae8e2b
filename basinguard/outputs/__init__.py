"""Image files and their metadata (trace JSON, A1111 parameters, XMP/IPTC, optional C2PA) and dataset shards.

Imports pillow and numpy; c2pa-python and pyarrow only when signing or parquet output is asked for. Nothing here
imports the runtime: it writes images and traces it is given."""

from basinguard.outputs.errors import OutputError
from basinguard.outputs.images import ImageOptions, encode_image, image_format, write_image

__all__ = ["ImageOptions", "OutputError", "encode_image", "image_format", "write_image"]
