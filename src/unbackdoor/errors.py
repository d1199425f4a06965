"""The one base of every error this package raises for bad input or an unmet precondition.

The CLI turns any :class:`UnbackdoorError` into a one-paragraph message and exit code 2, for every
command. Subclasses keep their standard base too (``ValueError``, ``RuntimeError``), so code that catches
those keeps working. An error message names the file, field or value at fault and the fix.
"""
from __future__ import annotations


class UnbackdoorError(Exception):
    """Bad input or an unmet precondition, with a message that says what to change."""


class ManifestError(UnbackdoorError, ValueError):
    """A ``backdoor.json`` that cannot be read or describes no valid backdoor."""
