"""The exporter's one error type (kept apart so every export module can raise it without import cycles)."""

from __future__ import annotations

from basinguard.errors import BasinguardError
from basinguard.errors import first_line as first_line  # re-exported: the export modules import it from here


class ExportError(BasinguardError):
    """An export that cannot be done or failed its checks; the message is one line naming the cause."""
