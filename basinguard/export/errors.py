"""The exporter's one error type (kept apart so every export module can raise it without import cycles)."""

from __future__ import annotations

from basinguard.errors import BasinguardError


class ExportError(BasinguardError):
    """An export that cannot be done or failed its checks; the message is one line naming the cause."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, for one-line ExportError messages."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
