"""Progress display for long compiles: one line per pass, a bar over layers."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class CompileProgress:
    """A thin facade so passes can report progress without knowing about rich.
    Disabled, every call is a no-op."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._progress: Progress | None = None
        self._task = None
        self._layers = None

    def __enter__(self) -> CompileProgress:
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=Console(file=sys.stderr), transient=False,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def step(self, description: str) -> None:
        if self._progress is not None:
            self._progress.console.print(f"[dim]·[/] {description}")

    def start_layers(self, description: str, total: int) -> None:
        if self._progress is not None:
            self._layers = self._progress.add_task(description, total=total)

    def advance_layer(self) -> None:
        if self._progress is not None and self._layers is not None:
            self._progress.advance(self._layers)
