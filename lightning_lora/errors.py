"""The error types every part of the package raises: a leaf module, imported by all, importing none.

Every message names the argument or setting to change and the value that was wrong, so that the
command line can print it as one line.
"""

from __future__ import annotations

__all__ = ["ExportError", "VerificationError"]


class ExportError(ValueError):
    """The inputs of an export do not fit together, or a file is not what it should be; the message
    says which and how to fix it."""


class VerificationError(ExportError):
    """An export was written but does not equal the trained model; nothing was published."""
