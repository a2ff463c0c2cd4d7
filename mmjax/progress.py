"""What `mmjax-train` prints: a live tqdm progress line on a terminal, plain periodic lines otherwise.

Modes (`mmjax-train --progress MODE`, or the `MMJAX_PROGRESS` environment variable):

* `auto` (default): `bar` when stdout is a terminal, else `lines`.
* `bar`: one live line, `step 120/1000 12%|###   | loss 2.314 | 1.2k ex/s | MFU 41% | ETA 0h03m10s`,
  redrawn in place; every other message (evaluations, checkpoint notes, warnings logged to the
  console) is written above it through tqdm, so nothing garbles it.
* `lines`: `step 120/1000 | loss 2.314 | ... | eta 0h03m10s` every `log_every_steps` steps, the
  format CI logs, pods and tests/test_resume.py read.

Only process 0 prints. Both modes end with a summary table (`summary`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import sys
import time
from typing import Any, TextIO

import jax
from tqdm import tqdm

from mmjax import metrics as metrics_lib
from mmjax import paths

MODES = ("auto", "bar", "lines")
ENV_VAR = "MMJAX_PROGRESS"
BAR_FORMAT = "step {n_fmt}/{total_fmt} {percentage:3.0f}%|{bar:20}| {desc}"


def resolve_mode(mode: str | None, stream: TextIO) -> str:
    """`bar` or `lines`: `mode`, else $MMJAX_PROGRESS, else `auto` (a terminal gets the bar)."""
    mode = (mode or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if mode not in MODES:
        raise ValueError(f"progress mode {mode!r} is not one of {', '.join(MODES)} "
                         f"(from --progress or ${ENV_VAR})")
    if mode == "auto":
        isatty = getattr(stream, "isatty", None)
        interactive = bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"
        return "bar" if interactive else "lines"
    return mode


class _LineWriter:
    """A file whose complete lines go to `Progress.write` (stdout while the bar is live)."""

    def __init__(self, progress: Progress, wrapped: TextIO):
        self._progress, self._wrapped, self._buffer = progress, wrapped, ""

    def write(self, text: str) -> int:
        head, newline, self._buffer = (self._buffer + text).rpartition("\n")
        if newline:
            self._progress.write(head)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False  # nothing below should draw its own live output

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)


class _LogHandler(logging.Handler):
    """Console logging while the bar is live: the record is written above the bar."""

    def __init__(self, progress: Progress, stream: TextIO, like: logging.Handler | None):
        super().__init__(like.level if like else logging.WARNING)  # no handler: as logging.lastResort
        self._progress, self._stream = progress, stream
        if like is not None:
            self.setFormatter(like.formatter)
            self.filters = list(like.filters)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._progress.write(self.format(record), file=self._stream)
        except Exception:  # as logging.StreamHandler does
            self.handleError(record)


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr)


class Progress:
    """The trainer's console. Use as a context manager around the run, so an exception still
    closes the bar and gives back stdout and logging."""

    def __init__(self, total: int, batch_size: int, mode: str | None = None, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.enabled = jax.process_index() == 0
        self.mode = resolve_mode(mode, self.stream)
        self.total, self.batch_size = int(total), int(batch_size)
        self.start_time = time.perf_counter()
        self.last: dict[str, float] = {}      # the scalars of the last `log`
        self._bar: tqdm | None = None
        self._seconds_per_step: float | None = None   # measured over the last log interval
        self._guess: float | None = None              # before that: since the first step
        self._first: tuple[int, float] | None = None
        self._stack = contextlib.ExitStack()

    # -- writing -------------------------------------------------------------------------------
    def write(self, message: str, file: TextIO | None = None) -> None:
        """Prints one message (process 0 only) without garbling the live line."""
        if not self.enabled:
            return
        target = file or self.stream
        if self._bar is None:
            print(message, file=target, flush=True)
            return
        with tqdm.external_write_mode(file=self.stream):  # clears the bar, redraws it after
            target.write(message + "\n")
            target.flush()

    # -- the run -------------------------------------------------------------------------------
    def start(self, step: int) -> None:
        """Starts the live line at `step` (bar mode), just before the first training step."""
        if not (self.enabled and self.mode == "bar") or self._bar is not None:
            return
        try:  # follow the terminal's size; one that reports none (0x0, a bare pty) gets 100x20
            size = os.get_terminal_size(self.stream.fileno())
            sized = size.columns > 0 and size.lines > 0
        except (AttributeError, OSError, ValueError):
            sized = False
        self._bar = tqdm(total=self.total, initial=step, file=self.stream, bar_format=BAR_FORMAT,
                         dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 20,
                         mininterval=0.25, miniters=1, leave=True, desc="compiling the train step")
        self._stack.callback(self._close_bar)
        # Anything else printed or logged to the console meanwhile (checkpoint notes, warnings)
        # goes above the bar. Logging keeps its stream; with no handler it is stderr, as Python's.
        root = logging.getLogger()
        saved = root.handlers
        console = [h for h in saved if _is_console(h)]
        like = console[0] if console else None
        if like is not None or not saved:
            stream = like.stream if like is not None else sys.stderr
            root.handlers = [h for h in saved if not _is_console(h)] + [_LogHandler(self, stream, like)]
            self._stack.callback(setattr, root, "handlers", saved)
        self._stack.enter_context(contextlib.redirect_stdout(_LineWriter(self, sys.stdout)))

    def advance(self, step: int) -> None:
        """After every train step (cheap: no device sync). Bar mode: moves the live line on."""
        if self._bar is None:
            return
        now = time.perf_counter()
        if self._first is None:
            self._first = (step, now)     # the first step includes the compile: time from here
        else:
            self._guess = (now - self._first[1]) / max(step - self._first[0], 1)
        self._bar.set_description_str(self._stats(step), refresh=False)
        self._bar.update(step - self._bar.n)
        if step == self.total:
            self._bar.refresh()

    def log(self, step: int, scalars: dict[str, float], seconds_per_step: float, keys: tuple[str, ...]) -> None:
        """Every `log_every_steps`: a `step N/T | ...` line, or the live line's loss and rate."""
        self.last = dict(scalars)
        self._seconds_per_step = seconds_per_step
        eta = metrics_lib.format_eta(seconds_per_step * (self.total - step))
        if self.mode == "lines":
            self.write(metrics_lib.format_line(step, self.total, {**scalars, "eta": eta}, keys))
        elif self._bar is not None:
            self._bar.set_description_str(self._stats(step), refresh=False)

    def _stats(self, step: int) -> str:
        parts = []
        if "loss" in self.last:
            parts.append(f"loss {self.last['loss']:.4g}")
        per_step = self._seconds_per_step or self._guess
        rate = self.last.get("examples_per_sec") or (self.batch_size / self._guess if self._guess else None)
        if rate:  # until the first log: from the wall time since the first step
            parts.append(f"{tqdm.format_sizeof(rate)} ex/s")
        if "mfu" in self.last:
            parts.append(f"MFU {self.last['mfu']:.0%}")
        parts.append("ETA " + (metrics_lib.format_eta(per_step * (self.total - step)) if per_step else "?"))
        return " | ".join(parts)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the end -------------------------------------------------------------------------------
    def summary(self, workdir: str, final: dict[str, Any], start: int, step: int,
                checkpoint_dir: str | None = None) -> str:
        """Prints (process 0) and returns the end-of-run table: metrics, time, checkpoints, and
        how to load and export them."""
        if not self.enabled:
            return ""
        wall = time.perf_counter() - self.start_time
        run = f"{step}/{self.total}" + (f" (resumed at {start})" if start else "")
        rows: list[tuple[str, str]] = [("steps", run), ("wall time", metrics_lib.format_eta(wall))]
        if "loss" in self.last:
            rows.append(("train loss", f"{self.last['loss']:.4g}"))
        if "examples_per_sec" in self.last:
            rows.append(("examples/s", f"{self.last['examples_per_sec']:.4g}"))
        rows += [(key, f"{float(value):.4f}") for key, value in final.items()]
        newest = newest_step_dir(checkpoint_dir or paths.join(str(workdir), "checkpoints"))
        rows.append(("checkpoint", newest or "none written"))
        workdir = str(workdir)
        quoted = shlex.quote(workdir)
        rows += [("load", f'mmjax.load("{workdir}")' if '"' not in workdir and "\\" not in workdir
                  else f"mmjax.load({workdir!r})"),
                 ("export (mmjax)", f"mmjax-convert --input {quoted} --output MODEL_DIR"),
                 ("export (other)", f"mmjax-convert --to <target> --input {quoted} --output OUT")]
        targets = _export_targets()
        if targets:
            rows.append(("  <target>", ", ".join(targets)))
        width = max(len(k) for k, _ in rows)
        title = " mmjax-train summary "
        rule = "─" * max(len(title) + 4, width + 3 + max(len(v) for _, v in rows))
        body = [f"  {k:<{width}}  {v}" for k, v in rows]
        text = "\n".join([("──" + title).ljust(len(rule), "─"), *body, rule])
        self.write(text)
        return text


def _export_targets() -> tuple[str, ...]:
    try:
        from mmjax.convert.cli import EXPORT_TARGETS  # argparse only: cheap
    except ImportError:
        return ()
    return tuple(EXPORT_TARGETS)


def newest_step_dir(directory: str) -> str | None:
    """The newest committed `checkpoints/<step>` directory (local or gs://), or None."""
    try:
        steps = [int(name) for name in paths.listdir(str(directory)) if name.isdigit()]
    except Exception:  # noqa: BLE001 - a summary line is not worth failing a finished run
        return None
    return paths.join(str(directory), str(max(steps))) if steps else None
