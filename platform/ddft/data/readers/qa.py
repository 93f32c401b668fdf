"""Cooking QA (the text adapter's data): JSONL or CSV of question/answer pairs."""

from __future__ import annotations

import codecs
import csv
import io
import json
import posixpath
import re

from ddft.data.readers.common import Records, Skip, lines
from ddft.store import Store

_QA_COLUMNS = ("question", "answer")
QA_SPLITS = ("train", "val", "test")
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of a non-UTF-8 byte


class QAPair(tuple):
    """(question, answer), unpacking and comparing as that pair, plus two optional fields:
    `fact` names the fact asked (its paraphrases share it, so a split keeps them together) and
    `split` places the pair ("train", "val" or "test") as Tasty's split files place recipes."""

    fact: str | None
    split: str | None

    def __new__(cls, question: str, answer: str, fact: str | None = None, split: str | None = None):
        pair = super().__new__(cls, (question, answer))
        pair.fact, pair.split = fact, split
        return pair


def _qa_pair(q, a, fact=None, split=None) -> QAPair:
    """The stripped pair, or Skip naming what is empty or malformed."""
    for name, value in zip(_QA_COLUMNS, (q, a)):
        if not (isinstance(value, str) and value.strip()):
            raise Skip(f"empty_{name}", f"needs a non-empty string '{name}'")
    if fact is not None and not (isinstance(fact, str) and fact.strip()):
        raise Skip("bad_fact", "'fact' must be a non-empty string (or left out)")
    named = split.strip().lower() if isinstance(split, str) else split
    if named is not None and named not in QA_SPLITS:
        raise Skip("bad_split", f"'split' must be one of {list(QA_SPLITS)} (or left out), not {split!r}")
    return QAPair(q.strip(), a.strip(), fact.strip() if fact else None, named)


def _read_qa_jsonl(store: Store, key: str, pairs: Records) -> None:
    name = posixpath.basename(key)
    for n, line in lines(store, key, pairs.problems):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise Skip("not_object", f"expected a JSON object, got {type(row).__name__}")
            pairs.append(_qa_pair(row.get("question"), row.get("answer"), row.get("fact"), row.get("split")))
        except json.JSONDecodeError as e:
            pairs.problems.append((f"{name}:{n}", f"not_json: {e.msg}"))
        except Skip as e:
            pairs.problems.append((f"{name}:{n}", str(e)))


def _read_qa_csv(store: Store, key: str, pairs: Records) -> None:
    """A CSV with `question` and `answer` columns (others ignored); where = its first line.

    A quoted field may span lines, so the file can't be decoded line by line: undecodable bytes
    are kept as surrogates and the row holding them is reported.
    """
    name = posixpath.basename(key)
    text = store.read_bytes(key).removeprefix(codecs.BOM_UTF8).decode("utf-8", "surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    found = next(reader, [])
    header = [c.strip().lower() for c in found]
    missing = [c for c in _QA_COLUMNS if c not in header]
    if missing:
        raise ValueError(
            f"{store.url(key)}: CSV columns {found} lack {missing}; needs {list(_QA_COLUMNS)} in the header"
        )
    qi, ai = header.index("question"), header.index("answer")
    optional = [header.index(c) if c in header else None for c in ("fact", "split")]
    line = reader.line_num + 1  # where the next row starts
    for row in reader:
        where, line = f"{name}:{line}", reader.line_num + 1
        try:
            if len(row) <= 1 and not "".join(row).strip():
                continue  # a blank line
            if _UNDECODABLE.search("".join(row)):
                raise Skip("not_utf8", "row has bytes that are not UTF-8")
            if len(row) <= max(qi, ai):
                raise Skip("short_row", f"{len(row)} cells for {len(header)} columns")
            pairs.append(
                _qa_pair(
                    row[qi], row[ai], *(row[i] or None if i is not None and i < len(row) else None for i in optional)
                )
            )
        except Skip as e:
            pairs.problems.append((where, str(e)))


def read_qa(store: Store, key: str) -> Records:
    """QAPairs from `.jsonl` or `.csv` (`fact` and `split` optional beside `question` and `answer`);
    bad rows -> ("<file>:<line>", reason)."""
    readers = {".jsonl": _read_qa_jsonl, ".csv": _read_qa_csv}
    ext = posixpath.splitext(key)[1].lower()
    if ext not in readers:
        raise ValueError(f"{store.url(key)}: QA must be .jsonl or .csv, not {ext or 'no extension'}")
    pairs = Records()
    readers[ext](store, key, pairs)
    return pairs
