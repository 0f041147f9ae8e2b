"""The one base class of user-facing errors: the CLI prints their message as one line and exits non-zero."""

import re


class BasinguardError(Exception):
    """A problem with the user's input, files or environment; the message names it and the allowed range."""


class BasinguardWarning(UserWarning):
    """A warning of basinguard's own (the CLI prints it with its prefix, and a library's in the library's form)."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message without terminal colour codes (libraries' messages are
    often multi-line, Ray's coloured), else the exception's type: one-line errors quote a library's failure so."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
