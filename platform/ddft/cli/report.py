"""A run's report on the terminal: one line per stage (a spinner while it runs, on a terminal only),
loss curves as sparklines, tables, sections. Where the stream is not a terminal (CI, pipes) it is
plain text: no ANSI codes, no bars, one line per stage when it ends. `make demo` prints with it.

    out = Console(sys.stdout)
    with out.stage("train") as st:
        ...
        st.done("3 jobs")          # -> "✓ train   182.4 s  3 jobs"
    out.lines(table([("a", "1")], headers=("name", "n")))
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

BLOCKS = "▁▂▃▄▅▆▇█"
ASCII_BLOCKS = "_.-:=+*#"  # where the stream can't encode the blocks
SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
NAME_WIDTH = 26  # stage names line up under each other


def encodes(stream, text: str) -> bool:
    """The stream's encoding can write `text` (a C-locale terminal may be ASCII only)."""
    try:
        text.encode(getattr(stream, "encoding", None) or "utf-8")
        return True
    except (UnicodeEncodeError, LookupError):
        return False


def sparkline(values: Iterable, width: int = 32, ascii: bool = False) -> str:
    """A curve in one line of block characters, lowest value ▁, highest █; longer series are
    averaged into `width` buckets. None/NaN values are left out; a flat series is a flat line."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return ""
    if len(vals) > width:
        n = len(vals)
        vals = [sum(c) / len(c) for c in (vals[i * n // width : (i + 1) * n // width] for i in range(width))]
    blocks = ASCII_BLOCKS if ascii else BLOCKS
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        return blocks[len(blocks) // 2 - 1] * len(vals)
    return "".join(blocks[round((v - lo) / (hi - lo) * (len(blocks) - 1))] for v in vals)


def clip(text: str, width: int, ascii: bool = False) -> str:
    text = " ".join(str(text).split())
    if len(text) <= width:
        return text
    more = "..." if ascii else "…"
    return text[: max(0, width - len(more))] + more


def table(
    rows: Sequence[Sequence],
    headers: Sequence[str] | None = None,
    align: str = "",
    max_width: int = 48,
    ascii: bool = False,
    gap: str = "  ",
) -> list[str]:
    """Rows as aligned columns (each cell at most `max_width` characters, clipped with …), the
    header underlined; `align` gives each column "l" or "r" (default "l")."""
    cells = [[clip("" if c is None else c, max_width, ascii) for c in row] for row in rows]
    if headers:
        cells.insert(0, [clip(h, max_width, ascii) for h in headers])
    if not cells:
        return []
    ncols = max(len(r) for r in cells)
    cells = [r + [""] * (ncols - len(r)) for r in cells]
    widths = [max(len(r[i]) for r in cells) for i in range(ncols)]

    def fmt(row: list[str]) -> str:
        parts = [c.rjust(w) if align[i : i + 1] == "r" else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return gap.join(parts).rstrip()

    out = [fmt(r) for r in cells]
    if headers:
        out.insert(1, gap.join(("-" if ascii else "─") * w for w in widths))
    return out


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s"


MAX_ROWS = 8  # rows of a recipe table; the rest is counted


def _clipped_rows(rows: list, ascii: bool) -> tuple[list, str | None]:
    if len(rows) <= MAX_ROWS:
        return rows, None
    return rows[: MAX_ROWS - 1], f"{'...' if ascii else '…'} {len(rows) - MAX_ROWS + 1} more"


def loss_table(results: Sequence, curves: dict | None = None, ascii: bool = False, width: int = 32) -> list[str]:
    """Each training job (a JobResult) in one row: status, steps, its first loss, the curve as a
    sparkline, the last loss, the last validation loss, tokens/s. `curves` may give a job's whole
    curve where the result holds less (a skipped job keeps its first and last loss only)."""
    num = lambda x: f"{x:.3f}" if isinstance(x, (int, float)) else "-"  # noqa: E731
    rows = []
    for r in results:
        losses = (curves or {}).get(r.name) or [x for x in r.losses if x is not None]
        val = r.val_losses[-1]["loss"] if r.val_losses else None
        curve = sparkline(losses, width, ascii) if losses else clip(r.error or "no losses", width, ascii)
        first, last = (losses[0], losses[-1]) if losses else (None, None)
        tps = f"{r.tokens_per_s:.0f}" if r.tokens_per_s else "-"
        rows.append((r.name, r.status, str(r.steps), num(first), curve, num(last), num(val), tps))
    headers = ("job", "status", "steps", "first", "loss", "last", "val", "tokens/s")
    return table(rows, headers, align="llrrlrrr", max_width=max(48, width), ascii=ascii)


def _amount(ing: dict) -> tuple[str, str]:
    from ddft.recipes import format_quantity

    q = ing.get("quantity")
    return (format_quantity(q) if isinstance(q, (int, float)) else (str(q) if q else "")), ing.get("unit") or ""


def recipe_tables(
    recipe: dict, expected_ingredients: Sequence = (), expected_steps: Sequence[str] = (), ascii: bool = False
) -> list[str]:
    """A served recipe ({ingredients: [{name, quantity, unit}], steps}) as two tables, ingredients
    (quantity, unit, name) and steps, each beside what was expected when that is given (the
    reference recipe's ingredients, as dicts or Ingredient objects, and steps)."""
    from itertools import zip_longest

    from ddft.recipes import format_ingredient

    expected = [
        format_ingredient(i) if hasattr(i, "name") else " ".join(x for x in (*_amount(i), i["name"]) if x)
        for i in expected_ingredients
    ]
    has_expected = bool(expected or expected_steps)
    rows = []
    for ing, exp in zip_longest(recipe.get("ingredients") or [], expected):
        q, u = _amount(ing) if ing else ("", "")
        rows.append((q, u, ing.get("name", "") if ing else "") + ((exp or "",) if has_expected else ()))
    rows, more = _clipped_rows(rows, ascii)
    out = table(rows, ("quantity", "unit", "ingredient") + (("expected",) if has_expected else ()), "rll", ascii=ascii)
    out += [more] if more else []
    steps = []
    for n, (step, exp) in enumerate(zip_longest(recipe.get("steps") or [], expected_steps), 1):
        steps.append((str(n), step or "") + ((exp or "",) if has_expected else ()))
    steps, more = _clipped_rows(steps, ascii)
    out += table(steps, ("#", "step") + (("expected",) if has_expected else ()), "rl", ascii=ascii, max_width=40)
    return out + ([more] if more else [])


def named_line(named: dict) -> str:
    """Whether the video adapter read the video, in one line: how many of the held-out recipe's
    ingredients its answer named, and how many the same request named shown another video
    ({"of", "own", "other", "other_id"})."""
    return (
        f"ingredients named: {named['own']} of {named['of']} from its own video; "
        f"shown another video ({named['other_id']}): {named['other']} of {named['of']}"
    )


class Console:
    """Where the report goes. `tty` (default: the stream is a terminal) allows colour and, with
    `live`, spinners; otherwise every line is plain text written once."""

    def __init__(self, stream=None, tty: bool | None = None, live: bool = True, announce: bool = False):
        self.stream = stream if stream is not None else sys.stdout
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty and isatty())
        self.tty = tty
        self.color = tty and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"
        self.live = live and self.tty
        self.announce = announce  # a line when a stage starts too (verbose runs, logs in between)
        self.ascii = not encodes(self.stream, BLOCKS + SPINNER + "✓✗…─")
        self.current: Stage | None = None
        self._lock = threading.Lock()

    # -- text ------------------------------------------------------------------------------------
    def style(self, text: str, *codes: str) -> str:
        """ANSI styling (bold, dim, green, red, cyan), only on a colour terminal."""
        if not self.color or not codes:
            return text
        sgr = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "cyan": "36"}
        return f"\033[{';'.join(sgr[c] for c in codes)}m{text}\033[0m"

    def line(self, text: str = "") -> None:
        with self._lock:
            stage = self.current
            if stage is not None and stage.bar is not None:
                with stage.bar.external_write_mode(file=self.stream):
                    self.stream.write(text + "\n")
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def lines(self, lines: Iterable[str], indent: str = "  ") -> None:
        for text in lines:
            self.line(indent + text if text else "")

    def section(self, title: str) -> None:
        self.line()
        self.line(self.style(title, "bold"))

    def sparkline(self, values: Iterable, width: int = 32) -> str:
        return sparkline(values, width, ascii=self.ascii)

    def table(self, rows, headers=None, align: str = "", max_width: int = 48) -> list[str]:
        return table(rows, headers, align, max_width, ascii=self.ascii)

    # -- stages ----------------------------------------------------------------------------------
    def stage(self, name: str, note: str = "", poll: Callable[[], str | None] | None = None) -> Stage:
        return Stage(self, name, note, poll)

    def note_handler(self, level: int = logging.INFO) -> logging.Handler:
        """A logging handler that shows each record as the running stage's note (spinner text)."""
        console = self

        class _Note(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                stage = console.current
                if stage is not None:
                    with contextlib.suppress(Exception):
                        stage.note = record.getMessage()

        return _Note(level)


class Stage:
    """One stage of a run: on a live terminal a spinner (name, elapsed, note) while it runs; then
    one line, ✓ or ✗, its time and what it did (`done(detail)`). Exceptions pass through."""

    def __init__(self, console: Console, name: str, note: str = "", poll: Callable[[], str | None] | None = None):
        self.console, self.name, self.note, self.poll = console, name, note, poll
        self.detail = ""
        self.failure = "failed"
        self.seconds = 0.0
        self.bar = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def done(self, detail: str) -> None:
        self.detail = detail

    def _status(self, frame: int) -> str:
        c = self.console
        spin = "-\\|/"[frame % 4] if c.ascii else SPINNER[frame % len(SPINNER)]
        room = shutil.get_terminal_size((100, 24)).columns - NAME_WIDTH - 16  # one line, never wrapped
        note = f"  {clip(self.note, room, c.ascii)}" if self.note and room > 8 else ""
        elapsed = duration(time.time() - self.started)
        return f"{c.style(spin, 'cyan')} {self.name:{NAME_WIDTH}} {elapsed:>10}{c.style(note, 'dim')}"

    def _tick(self) -> None:
        frame, polled = 0, 0.0
        while not self._stop.wait(0.1):
            frame += 1
            if self.poll is not None and time.time() - polled > 2.0:
                polled = time.time()
                with contextlib.suppress(Exception):
                    self.note = self.poll() or self.note
            with self.console._lock:
                if self.bar is not None:
                    self.bar.set_description_str(self._status(frame))

    def __enter__(self) -> Stage:
        c = self.console
        self.started = time.time()
        if c.announce:
            c.line(c.style(f"> {self.name}", "bold") + (f"  {self.note}" if self.note else ""))
        if c.live:
            from tqdm import tqdm

            self.bar = tqdm(
                file=c.stream, bar_format="{desc}", leave=False, dynamic_ncols=True, desc=self._status(0), delay=0
            )
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()
        c.current = self
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        c = self.console
        self.seconds = time.time() - self.started
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(1)
        with c._lock:
            if self.bar is not None:
                self.bar.close()
                self.bar = None
        c.current = None
        ok = exc_type is None
        mark = ("✓" if ok else "✗") if not c.ascii else ("ok" if ok else "XX")
        detail = self.detail if ok else self.failure
        c.line(
            f"{c.style(mark, 'green' if ok else 'red')} {c.style(f'{self.name:{NAME_WIDTH}}', 'bold')} "
            f"{duration(self.seconds):>10}  {detail}".rstrip()
        )


@contextlib.contextmanager
def logs_to(path: Path):
    """Route everything this process and the processes it starts write to stdout and stderr (Ray's
    and its workers' logs, warnings, subprocess output) into the file at `path`, at the file
    descriptor level; yield a stream on what stdout was, for the report. Restored on exit."""
    for s in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            s.flush()
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        terminal = open(os.dup(sys.stdout.fileno()), "w", encoding=encoding, errors="replace", buffering=1)
    except (AttributeError, OSError, io.UnsupportedOperation):  # stdout is no file (a test's capture)
        terminal = None
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", encoding="utf-8", errors="replace", buffering=1)
    saved_fds = [os.dup(1), os.dup(2)]
    saved_sys = sys.stdout, sys.stderr
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    try:
        yield terminal if terminal is not None else saved_sys[0]
    finally:
        with contextlib.suppress(Exception):
            log.flush()
        sys.stdout, sys.stderr = saved_sys
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for fd in saved_fds:
            os.close(fd)
        log.close()
        if terminal is not None:
            terminal.close()
