"""Progress on stderr with tqdm: transfer bars and elapsed-time spinners. Off when stderr is not a
terminal or with --quiet, so logs and pipes stay clean."""

from __future__ import annotations

import sys
import threading


def enabled(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


class Progress:
    """One bar: bytes sent while uploading (update(sent, total)), then an elapsed-time spinner with
    `waiting` as its label until the answer comes (a ticker thread keeps the clock moving)."""

    def __init__(self, desc: str, quiet: bool, waiting: str = "waiting for the server"):
        from tqdm import tqdm

        self.desc, self.waiting = desc, waiting
        self.bar = tqdm(
            desc=desc,
            file=sys.stderr,
            disable=not enabled(quiet),
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            leave=False,
            dynamic_ncols=True,
        )
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        if not self.bar.disable:
            self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(0.25):
            self.bar.refresh()

    def update(self, sent: int, total: int) -> None:
        """A transfer callback: progress(sent, total)."""
        if self.bar.total != total:
            self.bar.reset(total=total)
        self.bar.update(sent - self.bar.n)
        if sent >= total:
            self.wait()

    def wait(self, label: str | None = None) -> None:
        """From here on, a spinner: the label and the time since the start."""
        self.bar.set_description_str(label or self.waiting, refresh=False)
        self.bar.bar_format = "{desc}  {elapsed}"
        self.bar.refresh()

    def write(self, text: str) -> None:
        """Print to stdout without tearing the bar."""
        if self.bar.disable:
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        with self.bar.external_write_mode(file=sys.stdout):
            sys.stdout.write(text)
            sys.stdout.flush()

    def close(self) -> None:
        self._stop.set()
        if self._ticker.is_alive():
            self._ticker.join(1)
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
