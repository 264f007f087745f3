"""What a person sees while avtune trains, and where Ray's own output goes.

`Board` holds the trials of one command (name, status, epoch k/N, the latest acc / acc_audio /
acc_visual, elapsed time, the last line of a failure) as events arrive: from a sweep's Tune callback
(`orchestrator.sweep.TrialProgress`) or a single run's epoch poller. Two views draw it:
`LiveView`, one live rich table with an overall progress line and the time left, on a terminal; and
the board's `on_line`, one plain line per finished epoch (a single run) or trial (a sweep) when stdout
is not a terminal (CI, `| tee`).

`ray_output_to(log)` sends this process's stdout and stderr (file descriptors 1 and 2: Ray's driver
logs, the worker output Ray streams to the driver, Ray Train's report and checkpoint lines, Tune's
messages) to a log file, and hands back a stream on the original stdout for the view. The spec
errors, failed trials and lost clusters the CLI prints go to that stream: errors stay on the console.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator

# The board of the command now running in this process (None: nobody is watching). A module global,
# not an argument, because Tune pickles its callbacks with the experiment state: the callback stays
# stateless and looks the board up here.
_BOARD: "Board | None" = None

SHOWN_METRICS = (("acc", "acc"), ("acc_audio", "audio"), ("acc_visual", "visual"))


def current_board() -> "Board | None":
    return _BOARD


@contextmanager
def watching(board: "Board") -> Iterator["Board"]:
    """Make `board` the one progress events of this process go to, for the duration of the block."""
    global _BOARD
    previous, _BOARD = _BOARD, board
    try:
        yield board
    finally:
        _BOARD = previous


def last_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclass
class TrialState:
    key: str
    label: str
    epochs: int
    status: str = "RUNNING"
    epoch: int = 0  # epochs finished
    metrics: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    error: str = ""

    def elapsed(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def scores(self) -> str:
        return "  ".join(f"{short} {self.metrics[key]:.3f}" for key, short in SHOWN_METRICS if key in self.metrics)


class Board:
    """The trials of one command and the events that change them; thread-safe (Tune's callbacks and
    an epoch poller call it, the live view reads it from its refresh thread).

    `on_line(text)`, if given, receives one plain line per finished epoch (``per_epoch=True``: a
    single run) or per finished trial (a sweep)."""

    def __init__(self, title: str, per_epoch: bool = False, on_line: Callable[[str], None] | None = None) -> None:
        self.title = title
        self.per_epoch = per_epoch
        self.on_line = on_line
        self.trials: dict[str, TrialState] = {}
        self.expected_epochs = 0
        self.expected_trials = 0
        self.stage = ""
        self.notes: list[str] = []  # warnings the researcher must see (G-Blend's fallback), shown under the table
        self.started = time.monotonic()
        self._lock = threading.Lock()

    # ---- events ----

    def expect(self, trials: int, epochs: int, stage: str = "") -> None:
        """A stage of `trials` trials of `epochs` epochs each is about to run."""
        with self._lock:
            self.expected_trials += trials
            self.expected_epochs += trials * epochs
            self.stage = stage

    def announce(self, text: str) -> None:
        with self._lock:
            self.notes.append(text)
        if self.on_line:
            self.on_line("warning: " + text)

    def trial_started(self, key: str, label: str, epochs: int) -> None:
        with self._lock:
            if key in self.trials:  # a restarted trial (retry, resumed sweep) keeps its row
                self.trials[key].status, self.trials[key].ended = "RUNNING", None
            else:
                self.trials[key] = TrialState(key, label, epochs)

    def epoch_done(self, key: str, metrics: dict[str, Any]) -> None:
        with self._lock:
            trial = self.trials.get(key)
            if trial is None or "epoch" not in metrics:
                return
            trial.epoch = max(trial.epoch, int(metrics["epoch"]) + 1)
            trial.metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            line = self._line(trial, f"epoch {trial.epoch}/{trial.epochs}") if self.per_epoch else None
        if line and self.on_line:
            self.on_line(line)

    def epochs_recorded(self, key: str, epochs: int) -> None:
        """The trial's epochs as its tracking runs logged them: what the end line shows (not the reports seen)."""
        with self._lock:
            trial = self.trials.get(key)
            if trial is not None:
                trial.epoch = epochs

    def trial_ended(self, key: str, status: str, error: str = "") -> None:
        with self._lock:
            trial = self.trials.get(key)
            if trial is None:
                return
            trial.status, trial.ended, trial.error = status, time.monotonic(), last_line(error)
            line = None
            if not self.per_epoch:
                line = self._line(trial, f"{status:<8} {trial.epoch}/{trial.epochs} epochs")
                if trial.error:
                    line += f"  error: {trial.error}"
        if line and self.on_line:
            self.on_line(line)

    # ---- what the views show ----

    def _line(self, trial: TrialState, what: str) -> str:
        return f"[{clock(time.monotonic() - self.started)}] {trial.label}  {what}  {trial.scores()}  ({trial.elapsed():.0f} s)"

    def epochs_done(self) -> int:
        # A trial a scheduler stopped early will not run its remaining epochs: count them as done.
        return sum(t.epochs if t.ended is not None else t.epoch for t in self.trials.values())

    def seconds_left(self) -> float | None:
        done, total = self.epochs_done(), max(self.expected_epochs, sum(t.epochs for t in self.trials.values()))
        if done == 0:
            return None
        return (time.monotonic() - self.started) / done * max(0, total - done)

    def overall(self) -> str:
        with self._lock:
            trials = list(self.trials.values())
            total = max(self.expected_trials, len(trials))
            ended = sum(t.ended is not None for t in trials)
            failed = sum(t.status == "FAILED" for t in trials)
            running = sum(t.ended is None for t in trials)
            left = self.seconds_left()
        parts = [f"{ended}/{total} trials done" + (f" ({failed} failed)" if failed else ""), f"{running} running",
                 f"elapsed {clock(time.monotonic() - self.started)}",
                 "time left " + ("estimating" if left is None else f"~{clock(left)}")]
        return "  |  ".join(parts)

    def rows(self) -> list[TrialState]:
        with self._lock:
            return [TrialState(**{**vars(t), "metrics": dict(t.metrics)}) for t in self.trials.values()]


class LiveView:
    """The board as one live rich table (a terminal); finished trials stay, failed ones show the last
    line of their error. Use as a context manager around the command."""

    def __init__(self, board: Board, console) -> None:
        from rich.live import Live

        self.board = board
        self.console = console
        # Live would otherwise route sys.stdout / sys.stderr (where Ray prints) onto the terminal.
        self.live = Live(self, console=console, refresh_per_second=2, transient=False, redirect_stdout=False,
                         redirect_stderr=False)

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(title=self.board.title + (f"  [{self.board.stage}]" if self.board.stage else ""),
                      expand=False, title_justify="left")
        for column in ("trial", "status", "epoch", "acc", "audio", "visual", "time", "note"):
            table.add_column(column, justify="right" if column in ("epoch", "acc", "audio", "visual", "time") else "left")
        colours = {"FINISHED": "green", "FAILED": "red", "KILLED": "yellow", "STOPPED": "yellow", "RUNNING": "cyan"}
        for t in self.board.rows():
            cells = [f"{t.metrics[k]:.3f}" if k in t.metrics else "" for k, _ in SHOWN_METRICS]
            table.add_row(t.label, Text(t.status, style=colours.get(t.status, "white")), f"{t.epoch}/{t.epochs}", *cells,
                          clock(t.elapsed()), Text(t.error[:120], style="red"))
        notes = [Text("warning: " + note, style="bold yellow") for note in list(self.board.notes)]
        return Group(table, *notes, Text(self.board.overall(), style="bold"))

    def __enter__(self) -> "LiveView":
        self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.live.refresh()
        self.live.__exit__(*exc)


def log_file_for(runs_dir: str | os.PathLike[str], name: str) -> Path:
    """runs/logs/<name>-<UTC time>.log: one file per command."""
    folder = Path(runs_dir) / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return (folder / f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}.log").resolve()


@contextmanager
def ray_output_to(log_path: Path | None) -> Iterator[IO[str]]:
    """Send file descriptors 1 and 2 (everything Ray, Ray Train, Tune and their threads print in this
    process, and what Ray streams from its workers) to `log_path`; yield a text stream on the original
    stdout for what a person should see. `None`: nothing is redirected (``--verbose``)."""
    if log_path is None:
        yield sys.stdout
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    view = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    with open(log_path, "ab", buffering=0) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield view
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            view.close()
