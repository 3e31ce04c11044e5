"""The console of a long command (train, tune, run): one display of its progress on the terminal, and everything
Ray, DeepSpeed and transformers print in a log file of the run directory.

Their output cannot be caught in Python alone: Ray's C++ core writes to file descriptors 1 and 2 directly, and
processes started during the command (Ray's own) inherit them. So `redirected` points descriptors 1 and 2 at
the log file and hands the display copies of the terminal's. Producers of progress get a `log` callable as
before; `tell` sends it an event besides the line, which a `Display` keeps for its live view and a plain `print`
ignores.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

LOG_NAME = "console.log"
EVAL_KEYS = (
    "eval_loss",
    "eval_accuracy",
    "eval_f1_macro",
    "eval_whole_accuracy",
    "eval_perplexity",
    "eval_gen_exact",
    "eval_gen_contains",
    "eval_gen_token_f1",
)


def tell(log: Callable[[str], None], line: str, kind: str, **data: Any) -> None:
    """LINE to LOG; a Display also takes the event (KIND and DATA) for its live view."""
    event = getattr(log, "event", None)
    if event is None:
        log(line)
    else:
        event(line, kind, **data)


def evaluation_line(metrics: dict[str, Any], total: int, eta_s: float | None = None) -> str:
    """One evaluation as the training workers log it: step, losses, headline metrics, speed and time left."""
    shown = [f"step {metrics.get('step')}/{total}"]
    if isinstance(metrics.get("train_loss"), (int, float)):
        shown.append(f"train_loss {metrics['train_loss']:.4f}")
    shown += [f"{key} {metrics[key]:.4f}" for key in EVAL_KEYS if isinstance(metrics.get(key), (int, float))]
    speed = [f"{metrics['samples_per_s']:.1f} samples/s"] if metrics.get("samples_per_s") else []
    if eta_s is not None:
        speed.append(f"ETA {eta_s / 60:.1f} min")
    if speed:
        shown.append(", ".join(speed))
    return " | ".join(shown)


@dataclass
class Terminal:
    """Where the display writes (the terminal's descriptors as they were) and where everything else went."""

    out: TextIO
    err: TextIO
    log: Path
    start: int  # the log's size before this command: what it wrote begins there


@contextmanager
def redirected(log: Path) -> Iterator[Terminal]:
    """Descriptors 1 and 2 appended to LOG while the block runs, restored after it however it ends. An exception
    leaves its traceback in the log too; the caller decides what the terminal shows of it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    start = os.lseek(fd, 0, os.SEEK_END)
    os.write(fd, f"==== {time.strftime('%Y-%m-%dT%H:%M:%S')} raytune-ft {' '.join(sys.argv[1:])}\n".encode())
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    out, err = (os.fdopen(os.dup(s), "w", buffering=1, encoding="utf-8", errors="replace") for s in saved)
    try:
        yield Terminal(out, err, log, start)
    except Exception:
        traceback.print_exc(file=sys.stderr)
        raise
    except KeyboardInterrupt:
        print("interrupted (KeyboardInterrupt)", file=sys.stderr)
        raise
    finally:
        for stream in (sys.stdout, sys.stderr, out, err):
            stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for handle in (out, err):
            handle.close()
        for s in saved:
            os.close(s)


# What marks a line of Ray's, DeepSpeed's or transformers' output as a warning (or an error they only logged)
WARNING = re.compile(
    r"\b(WARNING|WARN|ERROR)\b|\w+Warning: |^\[?[\d-]+ [\d:.,]+ [WE] \d+ \d+\]|^[WE]\d{4} [\d:.]+ |^- MISSING:"
)
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
SOURCE = re.compile(r"^\((?:[\w.-]+ )?pid=\d+(?:, ip=[\w.:]+)?\)\s*|^\(raylet(?:, ip=[\w.:]+)?\)\s*")
HEADER = [
    re.compile(r"^[\d-]+ [\d:,.]+\s+(WARNING|ERROR|WARN)\s+\S+:\d+ -- "),  # Python logging in Ray's format
    re.compile(r"^\[?[\d-]+ [\d:.,]+ [WE] \d+ \d+\]\s*"),  # Ray's C++ logs
    re.compile(r"^[WE]\d{4} [\d:.]+\s+\d+\s+"),  # glog
    re.compile(r"^\S+\.py:\d+: (?=\w+Warning: )"),  # warnings.warn: keep the category and message
    re.compile(r"^\[[\d-]+ [\d:,.]+\] \[(WARNING|ERROR)\] (\[[^]]+\] )?"),  # DeepSpeed
    re.compile(r"^(WARNING|ERROR|WARN)[: ]+"),
]


def normalised(line: str) -> str:
    """LINE without what differs between repeats of one warning: colours, the process, the time, numbers."""
    text = SOURCE.sub("", ANSI.sub("", line).strip())
    for header in HEADER:
        text = header.sub("", text)
    text = re.sub(r"\s+", " ", re.sub(r"\b[0-9a-f]{12,}\b", "…", text))
    text = re.sub(r"\d+(\.\d+)?", "N", text)
    return text if len(text) <= 60 else text[:59].rstrip() + "…"


def warnings_in(text: str) -> Counter[str]:
    """The warnings in TEXT (a console log), counted by their normalised message."""
    found: Counter[str] = Counter()
    for line in text.splitlines():
        bare = SOURCE.sub("", ANSI.sub("", line).strip())
        if WARNING.search(bare):
            found[normalised(bare)] += 1
    return found


def warning_summary(found: Counter[str], log: Path, shown: int = 4) -> str | None:
    """One line: how many warnings went to LOG, the commonest with their counts."""
    total = sum(found.values())
    if not total:
        return None
    common = ", ".join(f"{n} × '{message}'" for message, n in found.most_common(shown))
    more = f", and {len(found) - shown} more kinds" if len(found) > shown else ""
    return f"{total} warning/error line(s) from Ray/DeepSpeed/transformers in {log}: {common}{more}"


class Display:
    """What a command shows of its progress. Plain: one line per note and event, as they come. Live: a rich Live
    view of the stage, the trials or the training run, the best so far and the time left, with each note and
    evaluation printed once above it. VERBOSE: the raw stream of today, in which the training workers print their
    own evaluation lines, so the driver's copies are left out."""

    def __init__(self, stream: TextIO, *, live: bool = False, verbose: bool = False, title: str = "") -> None:
        from rich.console import Console

        self.stream, self.verbose, self.title = stream, verbose, title
        self.console = Console(file=stream, width=None if stream.isatty() else 120, highlight=False)
        self.lock = threading.RLock()
        self.started = time.monotonic()
        self.stage: dict[str, Any] | None = None
        self.trials: dict[str, Any] | None = None
        self.train: dict[str, Any] | None = None
        self.note = ""  # the latest note: what the command is doing while no stage, trial or step says it
        self.live = None
        if live:
            from rich.live import Live

            # Live's own capture of sys.stdout and sys.stderr would put Ray's forwarded output back on the terminal
            self.live = Live(
                console=self.console,
                get_renderable=self.render,
                refresh_per_second=4,
                transient=True,  # what it showed last is in the lines above it and the command's own summary
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self.live.start()

    def __call__(self, message: str) -> None:
        self.write(message)

    def event(self, line: str, kind: str, **data: Any) -> None:
        """KIND: 'stage' (number, names), 'trials' (rows, metric, headline), 'evaluation' (metrics, total, eta_s,
        best: a line) or any other, shown as its line. A live view prints DATA's `live_line` instead of LINE (None:
        nothing)."""
        if kind == "evaluation" and self.verbose:
            return
        if kind in ("stage", "trials", "evaluation"):
            # one assignment of a new dict: the live view's refresh thread reads whole states without a lock
            setattr(self, {"stage": "stage", "trials": "trials", "evaluation": "train"}[kind], data)
        shown = data.get("live_line", line) if self.live is not None else line
        if shown:
            self.write(shown)

    def write(self, line: str) -> None:
        live = self.live
        if live is not None:
            # rich's own lock orders this with the view's refresh; holding ours here as well could deadlock with it
            self.note = line
            live.console.print(line, markup=False, highlight=False, soft_wrap=True)
            return
        with self.lock:  # the training run's reports come from a thread of their own
            self.stream.write(line + "\n")
            self.stream.flush()

    def render(self) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        stage, trials, train, note = self.stage, self.trials, self.train, self.note
        parts: list[Any] = []
        elapsed = time.monotonic() - self.started
        parts.append(Text(f"{self.title}  {elapsed // 60:.0f}:{elapsed % 60:02.0f}", style="bold"))
        if stage is not None:
            names, at = stage["names"], stage["number"] - 1
            marks = [
                Text(name, style="green" if i < at else "bold cyan" if i == at else "dim")
                for i, name in enumerate(names)
            ]
            parts.append(Text(" → ").join(marks))
        if trials is not None:
            table = Table(box=None, pad_edge=False)
            for col in ("trial", "status", "step", trials["metric"], "best"):
                table.add_column(col, justify="left" if col in ("trial", "status") else "right")
            for row in trials["rows"]:
                step = "-" if row["step"] is None else f"{row['step']}/{row['total'] or '?'}"
                table.add_row(row["trial"], row["status"], step, _fmt(row["value"]), _fmt(row["best"]))
            parts.append(table)
            parts.append(Text(trials["headline"]))
        if train is not None:
            metrics, total = train["metrics"], train["total"]
            steps = Table.grid(padding=(0, 1))
            steps.add_row(
                ProgressBar(total=max(1, total), completed=metrics.get("step") or 0, width=20),
                Text(evaluation_line(metrics, total, train.get("eta_s"))),
            )
            parts.append(steps)
            if train.get("best"):
                parts.append(Text(train["best"]))
        if note and trials is None and train is None:
            parts.append(Text(f"… {note}", style="dim", overflow="ellipsis", no_wrap=True))
        return Group(*parts)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


@contextmanager
def console(
    log: Path, *, verbose: bool = False, title: str = "", before_restore: Callable[[], None] | None = None
) -> Iterator[Display]:
    """The display of one command. Unless VERBOSE, the output of everything else goes to LOG (its path printed
    first) and a summary of its warnings is printed at the end; Live on a terminal, plain lines elsewhere.
    BEFORE_RESTORE runs while the output still goes to the log (Ray's farewell lines)."""
    if verbose or not _writable(log):  # an unwritable run directory: the command itself says so, on the terminal
        display = Display(sys.stderr, verbose=verbose, title=title)
        yield display
        return
    with redirected(log) as terminal:
        live = terminal.out.isatty() and terminal.err.isatty() and os.environ.get("TERM") != "dumb"
        display = Display(terminal.err, live=live, title=title)
        display(f"console log (Ray, DeepSpeed, transformers): {log}")
        try:
            yield display
        finally:
            try:
                if before_restore is not None:
                    before_restore()
            finally:
                display.close()
                sys.stdout.flush()
                sys.stderr.flush()
                with open(log, "rb") as fh:
                    fh.seek(terminal.start)
                    found = warnings_in(fh.read().decode(errors="replace"))
                summary = warning_summary(found, log)
                if summary:
                    terminal.err.write(summary + "\n")


def _writable(log: Path) -> bool:
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a"):
            return True
    except OSError:
        return False
