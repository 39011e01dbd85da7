"""How far a long step is, and where that is shown.

A core loop knows nothing of terminals or Dagster. It takes a `ProgressHook` and calls it as it
goes: `progress(done, total, loss=...)`, with the units done so far, the total when it is known,
and any figures worth a glance. The caller at the edge builds the hook, a `Progress`:

- `log`: an asset passes `context.log.info`. A line then lands in the run's log (the Dagster UI,
  a daemon's run, `mri-assets run` alike): when the step starts and when it ends, and in
  between, once it has run `LOG_AFTER_S` seconds, at every tenth of the total and at least
  every `log_every_s` seconds while units keep coming.
- a terminal bar: drawn when the process shows bars (`terminal_bars()`, which the `mri-assets`
  command enters). It is a tqdm bar with the step's unit, its rate and an ETA. The bar writes to
  the terminal the command started on, through a copy of its stderr taken then, so it reaches
  that terminal even while a Dagster run captures the process's stdout and stderr. A heartbeat
  redraws every open bar every `HEARTBEAT_S` seconds, so its elapsed time keeps moving while
  one unit takes long (an opaque step, a slow batch). A bar with no unit is a timer: the local
  runner draws one per run, so a step that reports nothing still shows that it is alive.

A daemon's run process never enters `terminal_bars()`, so there a `Progress` only writes lines.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Protocol, Self, TextIO

from tqdm import tqdm

HEARTBEAT_S = 5.0  # a bar is redrawn at least this often (the demo's goal: no 30 s of silence)
LOG_EVERY_S = 60.0  # a run-log line at least this often while units keep coming
LOG_FRACTION = 0.1  # and one at every tenth of the total,
LOG_AFTER_S = 10.0  # once the step has run this long (a short step logs its start and end only)
BAR_FORMAT = ("{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {unit} "
              "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")
COUNT_FORMAT = "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}{postfix}]"
TIMER_FORMAT = "{desc} [{elapsed}{postfix}]"


class ProgressHook(Protocol):
    """What a long loop calls: `done` units so far (of `total`, when known), and figures."""

    def __call__(self, done: int, total: int | None = None, **figures: float) -> None: ...


_terminal: TextIO | None = None


def terminal_stream() -> TextIO | None:
    """Where bars go in this process, or None when it shows none."""
    return _terminal


@contextmanager
def terminal_bars(stream: TextIO | None = None) -> Iterator[TextIO]:
    """While inside, every `Progress` of this process also draws a bar on `stream`. The default
    stream is a copy of the process's stderr as it is on entry: a Dagster run that captures
    stderr later does not capture the bars."""
    global _terminal
    own = None
    if stream is None:
        try:
            own = os.fdopen(os.dup(sys.stderr.fileno()), "w", encoding="utf-8", errors="replace")
        except (AttributeError, OSError, ValueError):  # a stderr with no file descriptor
            own = None
        stream = own or sys.stderr
    previous, _terminal = _terminal, stream
    try:
        yield stream
    finally:
        _terminal = previous
        if own is not None:
            own.close()


def _figures_text(figures: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}"
                     for name, value in figures.items())


class _Bar:
    """A tqdm bar plus the heartbeat thread that redraws it."""

    def __init__(self, stream: TextIO, desc: str, unit: str | None, total: int | None,
                 leave: bool):
        style = TIMER_FORMAT if unit is None else COUNT_FORMAT if total is None else BAR_FORMAT
        self.tqdm = tqdm(total=total, desc=desc, unit=unit or "", file=stream, leave=leave,
                         bar_format=style, mininterval=0.5, maxinterval=HEARTBEAT_S,
                         dynamic_ncols=True, smoothing=0.1)
        self._style = style
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True,
                                      name=f"progress heartbeat: {desc}")
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.tqdm.refresh()

    def show(self, done: int, total: int | None, figures: Mapping[str, float]) -> None:
        # tqdm draws an update only `mininterval` after its last frame: a step shorter than that
        # (a small shard's one batch) would never show its total nor its end before `close`
        # clears the bar. A new total and the last unit are drawn at once.
        new_total = total is not None and total != self.tqdm.total
        if new_total:
            self.tqdm.total = total
            if self._style == COUNT_FORMAT:
                self.tqdm.bar_format = self._style = BAR_FORMAT
        if figures:
            self.tqdm.set_postfix_str(_figures_text(figures), refresh=False)
        self.tqdm.update(done - self.tqdm.n)
        if new_total or (self.tqdm.total is not None and done >= self.tqdm.total):
            self.tqdm.refresh()

    def close(self) -> None:
        self._stop.set()
        self._beat.join()
        self.tqdm.close()


class Progress:
    """A long step's progress, shown in the run's log (`log`) and on the terminal (see the module
    docstring). Call it as a `ProgressHook` with the units done so far, or `advance` it by a few;
    close it (or use it as a context manager) when the step ends.

    `unit` is plural (`steps`, `images`, `shards`); None makes a timer, shown only as a bar.
    `bar`: None draws one when the process shows bars, False never. `leave`: the bar's last
    state stays on the terminal after `close`."""

    def __init__(self, desc: str, unit: str | None, total: int | None = None, *,
                 log: Callable[[str], None] | None = None, log_every_s: float = LOG_EVERY_S,
                 bar: bool | None = None, leave: bool = False,
                 clock: Callable[[], float] = time.monotonic):
        self.desc, self.unit, self.total = desc, unit, total
        self.done = 0
        self.figures: dict[str, float] = {}
        self._log, self._log_every_s, self._clock = log, log_every_s, clock
        self.started = self._last_line = clock()
        self._next_mark = self._mark_after(0)
        self._closed = False
        stream = terminal_stream() if bar is not False else None
        self._bar = _Bar(stream, desc, unit, total, leave) if stream is not None else None
        if log is not None:
            log(f"{desc}: started" + (f", {total} {unit} to do" if total is not None else ""))

    def _mark_after(self, done: int) -> int | None:
        if self.total is None or self.total <= 0:
            return None
        every = max(1, math.ceil(self.total * LOG_FRACTION))
        return (done // every + 1) * every

    @property
    def seconds(self) -> float:
        return self._clock() - self.started

    def __call__(self, done: int, total: int | None = None, **figures: float) -> None:
        if total is not None and total != self.total:
            self.total = total
            self._next_mark = self._mark_after(self.done)
        self.done = int(done)
        self.figures.update(figures)
        if self._bar is not None:
            self._bar.show(self.done, total, figures)
        if self._log is None:
            return
        now = self._clock()
        if now - self.started < LOG_AFTER_S:
            return
        at_mark = self._next_mark is not None and self.done >= self._next_mark
        if at_mark or now - self._last_line >= self._log_every_s:
            self._log(self.line())
            self._last_line = now
            self._next_mark = self._mark_after(self.done)

    def advance(self, n: int = 1, **figures: float) -> None:
        """`n` more units done."""
        self(self.done + n, **figures)

    def pretraining_entry(self, entry: Mapping[str, float]) -> None:
        """The hook `core.pretrain.pretrain_backbone` calls with a dict: `step` (steps finished)
        of `steps`, with `loss`; or, once per epoch, `epoch` and `steps` (finished so far)."""
        figures = {"loss": float(entry["loss"])} if "loss" in entry else {}
        if "step" in entry:
            self(int(entry["step"]), int(entry["steps"]) if "steps" in entry else None, **figures)
        else:
            if "epoch" in entry:
                figures["epoch"] = int(entry["epoch"]) + 1
            self(int(entry["steps"]), **figures)

    def line(self) -> str:
        """Where the step is, in words: the run-log line."""
        seconds = self.seconds
        if self.unit is None:
            where = "running"
        elif self.total:
            where = f"{self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f} %)"
        else:
            where = f"{self.done} {self.unit}"
        parts = [where]
        if self.figures:
            parts.append(_figures_text(self.figures))
        parts.append(f"{seconds:.0f} s elapsed")
        if self.total and 0 < self.done < self.total:
            parts.append(f"about {seconds * (self.total - self.done) / self.done:.0f} s left")
        return f"{self.desc}: " + ", ".join(parts)

    def close(self, failed: bool = False) -> None:
        """The last line: `done` (or `stopped`, when the step failed) with the totals."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if self._log is not None:
            counted = f"{self.done} {self.unit} in " if self.unit else ""
            figures = f"; {_figures_text(self.figures)}" if self.figures else ""
            self._log(f"{self.desc}: {'stopped after' if failed else 'done,'} {counted}"
                      f"{self.seconds:.1f} s{figures}")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(failed=kind is not None)
