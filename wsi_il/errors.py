"""The errors wsi-il raises: one base class, a few kinds, each with an exit code.

Library code raises these with what failed, where, and how to fix it; only ``cli`` turns them into
a one-line message and an exit code.
"""

from __future__ import annotations


class WsiIlError(Exception):
    """Something went wrong that the user can act on; ``hint`` says how."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def __reduce__(self) -> tuple[type, tuple[str, str | None]]:  # a reader process sends it whole to the parent
        return type(self), (self.message, self.hint)


class InputError(WsiIlError):
    """A file or value the user gave is wrong (exit code 3)."""

    exit_code = 3


class SlideError(InputError):
    """A slide cannot be opened or read."""


class GeoJsonError(InputError):
    """A GeoJSON file cannot be read as QuPath objects."""


class LabelsError(InputError):
    """A labels file (CSV or GeoJSON from QuPath) is not valid for its batch."""


class WeightsError(InputError):
    """Backbone weights cannot be found or loaded."""


class ProjectStateError(WsiIlError):
    """The project is not in a state that allows the command (exit code 4)."""

    exit_code = 4
