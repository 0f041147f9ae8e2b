"""The outputs' user-facing error."""

from basinguard.errors import BasinguardError


class OutputError(BasinguardError, ValueError):
    """An image or shard that cannot be written as asked (format, quality, C2PA credentials, a shard directory)."""
