"""A progress bar on a terminal (rich), plain log lines otherwise (CI, pipes, the job server)."""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

log = logging.getLogger("tunery")


class StepProgress:
    def __init__(
        self,
        total: int,
        initial: int = 0,
        description: str = "training",
        enabled: bool = True,
        log_every_s: float = 10.0,
    ) -> None:
        self.total, self.enabled, self.log_every_s = total, enabled, log_every_s
        self.description = description
        self._last_log = 0.0
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self._initial = initial

    def __enter__(self) -> StepProgress:
        if self.enabled and sys.stderr.isatty():
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(
                self.description, total=self.total, completed=self._initial, info=""
            )
        return self

    def update(self, step: int, info: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=step, info=info)
        elif time.monotonic() - self._last_log >= self.log_every_s or step == self.total:
            self._last_log = time.monotonic()
            log.info("%s step %d/%d %s", self.description, step, self.total, info)

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(message)
        else:
            log.info("%s", message)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.__exit__(exc_type, exc, tb)
