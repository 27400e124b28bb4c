"""Progress reporting for long stages: Rich bars on a terminal, plain log lines elsewhere (CI logs)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class Reporter:
    """What the pipeline calls; the default does nothing, so library users see no output."""

    @contextmanager
    def stage(self, name: str, total: int) -> Iterator["StageHandle"]:
        yield StageHandle()

    def log(self, message: str) -> None:  # noqa: D401 - a hook
        pass


class StageHandle:
    def advance(self, text: str = "") -> None:
        pass


class RichReporter(Reporter):
    """Bars on a TTY; `(3/30): Calibrating` lines when stdout is not a terminal."""

    def __init__(self, console: Console | None = None, quiet: bool = False):
        self.console = console or Console(stderr=True)
        self.quiet = quiet

    @contextmanager
    def stage(self, name: str, total: int) -> Iterator[StageHandle]:
        if self.quiet:
            yield StageHandle()
        elif self.console.is_terminal:
            columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[detail]}"), TimeElapsedColumn())
            with Progress(*columns, console=self.console, transient=False) as bar:
                task = bar.add_task(name, total=total, detail="")
                yield _RichHandle(bar, task)
        else:
            yield _LineHandle(self.console, name, total)

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message)


class _RichHandle(StageHandle):
    def __init__(self, bar: Progress, task) -> None:
        self.bar, self.task = bar, task

    def advance(self, text: str = "") -> None:
        self.bar.update(self.task, advance=1, detail=text)


class _LineHandle(StageHandle):
    def __init__(self, console: Console, name: str, total: int) -> None:
        self.console, self.name, self.total, self.done, self.start = console, name, total, 0, time.perf_counter()

    def advance(self, text: str = "") -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        suffix = f" {text}" if text else ""
        self.console.print(f"({self.done}/{self.total}): {self.name}{suffix} [{elapsed:.1f}s]", highlight=False)
        sys.stderr.flush()
