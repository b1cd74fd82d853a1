"""How library code reports progress and warnings without printing (the CLI renders them).

This is the one way library code reports: a long stage starts a ``task`` and advances it, says what it is doing
now with ``status``, and tells the user things with ``info`` and ``warn``. No module below the CLI prints, draws a
progress bar, or takes a callback of its own for progress."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Reporter(Protocol):
    """Receives progress and messages from long-running stages."""

    def task(self, description: str, total: int, unit: str = "patches") -> Callable[[int], None]:
        """Start a progress task; the returned function advances it."""
        ...

    def status(self, message: str) -> None:
        """Say what the work in progress is doing now (shown in place of the previous status)."""
        ...

    def info(self, message: str) -> None:
        """Tell the user something useful."""
        ...

    def warn(self, message: str) -> None:
        """Tell the user something they must not miss."""
        ...


class SilentReporter:
    """A reporter that drops everything (library use, tests); warnings are kept for inspection."""

    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.messages: list[str] = []
        self.statuses: list[str] = []

    def task(self, description: str, total: int, unit: str = "patches") -> Callable[[int], None]:
        return lambda n: None

    def status(self, message: str) -> None:
        self.statuses.append(message)

    def info(self, message: str) -> None:
        self.messages.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
