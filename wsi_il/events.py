"""How library code reports progress and warnings without printing (the CLI renders them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Reporter(Protocol):
    """Receives progress and messages from long-running stages."""

    def task(self, description: str, total: int, unit: str = "patches") -> Callable[[int], None]:
        """Start a progress task; the returned function advances it."""
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

    def task(self, description: str, total: int, unit: str = "patches") -> Callable[[int], None]:
        return lambda n: None

    def info(self, message: str) -> None:
        self.messages.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
