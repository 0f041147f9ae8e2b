"""The adapter's one error (a module of its own, so that `guarded` and the package import it without a circle)."""

from basinguard.errors import BasinguardError


class AdapterError(BasinguardError, ValueError):
    """A pipeline, call argument or setting the diffusers adapter does not take; the message says what it takes."""
