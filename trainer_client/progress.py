"""A progress bar for long commands: tqdm on a terminal, silent elsewhere.

tqdm comes with transformers but is not part of the ``client`` extra, so a client-only
install simply gets no bar.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from types import TracebackType
from typing import Protocol


class Progress(Protocol):
    """What the commands need of a progress bar."""

    def update(self, n: int = 1) -> object: ...

    def set_postfix(self, values: Mapping[str, str]) -> object: ...

    def close(self) -> None: ...


class _NoProgress:
    def update(self, n: int = 1) -> None:
        return None

    def set_postfix(self, values: Mapping[str, str]) -> None:
        return None

    def close(self) -> None:
        return None


class ProgressBar:
    """A context manager around a progress bar over ``total`` units (prompts, here)."""

    def __init__(
        self, total: int, *, description: str, quiet: bool = False, unit: str = "prompt"
    ) -> None:
        self._bar = _make_bar(total, description, unit, enabled=not quiet and sys.stderr.isatty())

    def update(self, n: int) -> None:
        """Count ``n`` more units as done."""
        self._bar.update(n)

    def set_postfix(self, values: Mapping[str, str]) -> None:
        """Show the latest figures (a training run's reward and KL) after the bar."""
        self._bar.set_postfix(values)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._bar.close()


def _make_bar(total: int, description: str, unit: str, *, enabled: bool) -> Progress:
    # Logs and CI captures are not terminals: a bar there is only noise in the file.
    if not enabled:
        return _NoProgress()
    try:
        # Through importlib: tqdm ships no type information, and stubs may or may not be there.
        tqdm = importlib.import_module("tqdm").tqdm
    except ImportError:
        return _NoProgress()
    bar: Progress = tqdm(total=total, desc=description, unit=unit, file=sys.stderr)
    return bar
