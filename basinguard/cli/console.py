"""How the command line talks: our warnings as one line, known library noise silenced, other libraries' warnings
in their own form, SIGTERM ended as Ctrl-C is."""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from typing import TYPE_CHECKING

from basinguard.cli.common import PACKAGE_DIR

if TYPE_CHECKING:
    pass


def _ours(category: type[Warning], filename: str) -> bool:
    """A warning basinguard wrote: of one of its warning classes, or a plain UserWarning warned from its code."""
    if category.__module__.split(".")[0] == "basinguard":
        return True
    return category is UserWarning and os.path.realpath(filename).startswith(str(PACKAGE_DIR) + os.sep)


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our warnings (e.g. a truncated prompt naming its dropped words) as one line, not a source excerpt; a
    library's as Python prints it, naming its source, so that it is not taken for ours."""
    if _ours(category, filename):
        print(f"basinguard: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


# Libraries' messages that say nothing a user of basinguard can act on.
NOISY_WARNINGS = (
    # torch, on a machine without CUDA, when diffusers (loaded by `export`) decorates functions with a CUDA autocast
    "CUDA is not available or torch_xla is imported. Disabling autocast.",
)


NOISY_LOG_LINES = {  # logger → the starts of its records that are dropped
    # diffusers, where two installed distributions provide one package (optimum and optimum-onnx both `optimum`)
    "diffusers.utils.import_utils": ("Multiple distributions found for package",),
    # Ray, starting a local instance for `batch --ray` (the "disabled" warning, which matters, still shows)
    "ray._private.authentication.authentication_token_setup": (
        "Token authentication is enabled for this Ray cluster", "Generated new authentication token"),
}


class _DropRecords(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def quiet_known_noise() -> None:
    """Silence NOISY_WARNINGS and NOISY_LOG_LINES (by the libraries' logger names: nothing is imported here)."""
    for text in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(text), category=UserWarning)
    for name, starts in NOISY_LOG_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropRecords) for f in logger.filters):
            logger.addFilter(_DropRecords(starts))


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an interrupt so that it ends a run as Ctrl-C does: the running ONNX Runtime call is
    cancelled (`engine.ort.cancellable`), temporary files are removed, what was finished stays."""


def raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()
