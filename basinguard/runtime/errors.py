"""User-facing errors of the runtime; each message names the problem and what is allowed."""

from basinguard.errors import BasinguardError
from basinguard.model_format import ModelFolderError

__all__ = ["InputError", "ModelFolderError"]


class InputError(BasinguardError, ValueError):
    """A generation request outside what the model accepts (size, steps, latents, prompts)."""
