"""What every native reader shares: the Records it returns, the skip reason, text that may not be
UTF-8, and the layout error. See ddft.data.formats for the readers and their reason codes."""

from __future__ import annotations

import codecs
import posixpath
from collections import Counter
from collections.abc import Iterator

from ddft.errors import Invalid
from ddft.store import Store


class DataError(Invalid):
    """A dataset can't be read as given (wrong root, unknown layout, nothing usable): the message
    names what was found and what to change."""

    default_code = "bad_data"


class Records(list):
    """A list of what was read, plus:
    - `problems`: (where, reason) for each bad sample left out (counts against max_skip_ratio);
    - `excluded`: (where, reason) for each good sample a rule left out (a recipe in no split);
    - `decisions`: how often each change inside a kept sample was made ("empty_ingredient": a blank
      ingredient line skipped), so nothing changes without being counted;
    - `layout`: which of the release's layouts was found."""

    def __init__(self, items=(), problems=None, layout: str | None = None):
        super().__init__(items)
        self.problems: list[tuple[str, str]] = list(problems or [])
        self.excluded: list[tuple[str, str]] = []
        self.decisions: Counter = Counter()
        self.layout = layout


class Skip(ValueError):
    """One sample is left out; the message is its problem reason, "<code>: <detail>"."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")


def keys_under(store: Store, prefix: str) -> list[str]:
    # Filter ourselves: a plain prefix would also match a sibling like "tasty_old/".
    prefix = prefix.rstrip("/") + "/"
    return [k for k in store.list(prefix) if k.startswith(prefix)]


def top_level(keys: list[str], prefix: str, most: int = 8) -> str:
    """What a folder holds at its top level ("annot/, train_set/, readme.txt"), for messages."""
    names = set()
    for key in keys:
        first, slash, _ = key[len(prefix) + 1 :].partition("/")
        names.add(first + slash)
    names = sorted(names)
    if not names:
        return "nothing"
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _not_utf8(err: UnicodeDecodeError, data: bytes) -> str:
    return f"not_utf8: byte {data[err.start]:#04x} at offset {err.start}"


def lines(store: Store, key: str, problems: list) -> Iterator[tuple[int, str]]:
    """(line number, text) of a one-row-per-line file; a line that isn't UTF-8 goes to problems
    (as it is reached, so problems stay in line order).

    Split the bytes, not the text: a bad byte then costs one row, not the file, and str.splitlines
    would also break rows at characters like U+2028 that JSON allows inside a string.
    """
    data = store.read_bytes(key).removeprefix(codecs.BOM_UTF8)
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append((f"{posixpath.basename(key)}:{n}", _not_utf8(e, raw)))
            continue
        yield n, line


def read_utf8(store: Store, key: str) -> str:
    """A whole document (one sample): not UTF-8 means the sample is left out."""
    data = store.read_bytes(key).removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Skip("not_utf8", f"{posixpath.basename(key)} has byte {data[e.start]:#04x} at offset {e.start}") from None
