"""The one base class of user-facing errors: the CLI prints their message as one line and exits non-zero."""


class BasinguardError(Exception):
    """A problem with the user's input, files or environment; the message names it and the allowed range."""
