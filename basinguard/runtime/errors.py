"""User-facing errors of the runtime; each message names the problem and what is allowed."""

from basinguard.errors import BasinguardError


class ModelFolderError(BasinguardError, ValueError):
    """A model folder that is missing a part or holds a corrupt file; the message names the file."""


class InputError(BasinguardError, ValueError):
    """A generation request outside what the model accepts (size, steps, latents, prompts)."""
