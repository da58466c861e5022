"""Progress bars that a log can read.

On a terminal, long stages show rich's live bars. Written to a file or a pipe (a CI log, ``eat run > run.log``), a
live bar prints nothing until the stage ends, so a 15-minute timing stage looks hung. :class:`LogProgress` has the
same small interface as :class:`rich.progress.Progress` (``add_task``, ``update``, ``advance``, a context manager) and
prints one plain line per task at most every ``interval`` seconds, plus one when a task finishes:
``[progress] timing sst2: 120/400 (30%), 4.1/s, ETA 1m08s``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _duration(seconds: float) -> str:
    """``75.2`` -> ``"1m15s"``; ``4000`` -> ``"1h06m40s"``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


@dataclass
class _LogTask:
    description: str
    total: float | None
    completed: float = 0.0
    started: float = field(default_factory=time.monotonic)
    last_printed: float = field(default_factory=time.monotonic)
    fields: dict[str, Any] = field(default_factory=dict)
    finished_printed: bool = False


class LogProgress:
    """A progress reporter for non-terminal output: one line per task every ``interval`` seconds and at the end.

    ``clock`` and ``write`` are injectable so that tests can drive it without sleeping.
    """

    def __init__(self, write: Callable[[str], None], interval: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self._write = write
        self.interval = interval
        self._clock = clock
        self._tasks: dict[int, _LogTask] = {}

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        for task_id, task in self._tasks.items():  # a stage cut short still says where it stopped
            if not task.finished_printed and task.completed:
                self._print(task_id)

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        """Start a task (same signature as rich's); returns its id."""
        now = self._clock()
        task_id = len(self._tasks)
        self._tasks[task_id] = _LogTask(description, total, started=now, last_printed=now, fields=dict(fields))
        return task_id

    def update(self, task_id: int, *, completed: float | None = None, total: float | None = None,
               advance: float | None = None, description: str | None = None, **fields: Any) -> None:
        """Update a task like rich's ``Progress.update``; prints a line when ``interval`` has passed or it is done."""
        task = self._tasks[task_id]
        if total is not None:
            task.total = total
        if description is not None:
            task.description = description
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        task.fields.update(fields)
        done = task.total is not None and task.completed >= task.total
        if done and not task.finished_printed:
            self._print(task_id)
            task.finished_printed = True
        elif not done and self._clock() - task.last_printed >= self.interval:
            self._print(task_id)

    def advance(self, task_id: int, advance: float = 1) -> None:
        """Add ``advance`` to a task's completed count."""
        self.update(task_id, advance=advance)

    def line(self, task_id: int) -> str:
        """The line that describes a task now: stage, done / total, share, rate, ETA and any ``info`` field."""
        task = self._tasks[task_id]
        elapsed = max(self._clock() - task.started, 1e-9)
        rate = task.completed / elapsed
        parts = [f"[progress] {task.description}: {task.completed:g}"]
        if task.total:
            parts[0] += f"/{task.total:g} ({100 * task.completed / task.total:.0f}%)"
        parts.append(f"{rate:.3g}/s")
        if task.total and rate > 0 and task.completed < task.total:
            parts.append(f"ETA {_duration((task.total - task.completed) / rate)}")
        else:
            parts.append(f"elapsed {_duration(elapsed)}")
        info = task.fields.get("info")
        if info:
            parts.append(str(info))
        return ", ".join(parts)

    def _print(self, task_id: int) -> None:
        self._write(self.line(task_id))
        self._tasks[task_id].last_printed = self._clock()


def make_progress(console: Console, interval: float = 30.0) -> Progress | LogProgress:
    """Rich live bars on a terminal; :class:`LogProgress` lines (every ``interval`` s) when output is a file or pipe."""
    if console.is_terminal:
        return Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console)
    return LogProgress(lambda text: console.print(text, markup=False, highlight=False), interval=interval)
