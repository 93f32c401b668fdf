"""Readers for the datasets in their own native layouts (see DESIGN.md, "Native formats").

They validate what they read and never drop a row silently: a bad row or recipe is left out and
recorded in `problems` as (where, reason), so a preparation job can report or fail on it. Every
reason starts with a code word and a colon ("not_utf8: ...", "label_out_of_range: ..."): the data
plane counts skipped samples by that word.

Codes: not_utf8 (any text file), then
  FoodX-251  bad_row, duplicate_id, label_out_of_range, missing_file
  Tasty      missing_file, ambiguous_video, bad_xml, bad_ingredient, empty_recipe, bad_alignment,
             store_error, split_conflict, missing_folder
  YouCook2   not_object, bad_field, no_annotations, bad_segment, empty_sentence, duplicate_id
  QA         not_json, not_object, short_row, empty_question, empty_answer
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import posixpath
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field

from ddft.recipes import Ingredient, format_recipe, parse_tasty_ingredient
from ddft.store import Store, StoreError

__all__ = [
    "Records",
    "FoodxDataset",
    "read_foodx",
    "TastyRecipe",
    "read_tasty",
    "read_qa",
    "QAPair",
    "QA_SPLITS",
    "YoucookVideo",
    "read_youcook2",
    "TASTY_FRAME_STRIDE",
    "YOUCOOK2_SUBSETS",
]


class Records(list):
    """A list of what was read, plus `problems`: (where, reason) for each thing left out."""

    def __init__(self, items=(), problems=None):
        super().__init__(items)
        self.problems: list[tuple[str, str]] = list(problems or [])


class _Skip(ValueError):
    """One sample is left out; the message is its problem reason, "<code>: <detail>"."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")


def _keys_under(store: Store, prefix: str) -> list[str]:
    # Filter ourselves: a plain prefix would also match a sibling like "tasty_old/".
    prefix = prefix.rstrip("/") + "/"
    return [k for k in store.list(prefix) if k.startswith(prefix)]


# --- Text that may not be UTF-8 -------------------------------------------------------------------


def _not_utf8(err: UnicodeDecodeError, data: bytes) -> str:
    return f"not_utf8: byte {data[err.start]:#04x} at offset {err.start}"


def _lines(store: Store, key: str, problems: list) -> Iterator[tuple[int, str]]:
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


def _read_utf8(store: Store, key: str) -> str:
    """A whole document (one sample): not UTF-8 means the sample is left out."""
    data = store.read_bytes(key).removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Skip(
            "not_utf8", f"{posixpath.basename(key)} has byte {data[e.start]:#04x} at offset {e.start}"
        ) from None


# --- FoodX-251 ------------------------------------------------------------------------------------


@dataclass
class FoodxDataset:
    classes: dict[int, str]  # id -> name as in class_list.txt ("hot_dog")
    splits: dict[str, list[tuple[str, int, str]]]  # split -> [(image key, label, class name)]
    problems: list[tuple[str, str]] = field(default_factory=list)

    def dish_name(self, label: int) -> str:
        """The name as a person writes it: class_list.txt uses underscores ("hot_dog")."""
        return self.classes[label].replace("_", " ")


# split -> (official label file without header, Kaggle file with header "img_name,label", folder)
_FOODX_SPLITS = {
    "train": ("train_info.csv", "train_labels.csv", "train_set"),
    "val": ("val_info.csv", "val_labels.csv", "val_set"),
}


def _read_foodx_classes(store: Store, prefix: str, problems: list) -> dict[int, str]:
    classes: dict[int, str] = {}
    for n, line in _lines(store, f"{prefix}/class_list.txt", problems):
        if not line.strip():
            continue
        ident, _, name = line.strip().partition(" ")
        where = f"class_list.txt:{n}"
        if not ident.isdigit() or not name.strip():
            problems.append((where, f"bad_row: expected '<id> <name>', got {line!r}"))
        elif int(ident) in classes:
            problems.append((where, f"duplicate_id: duplicate class id {ident}"))
        else:
            classes[int(ident)] = name.strip()
    if not classes:
        raise ValueError(f"{prefix}/class_list.txt: no classes")
    return classes


def _foodx_row_problem(cells: list[str], line: str, classes: dict[int, str]) -> str | None:
    if len(cells) != 2 or not cells[0] or not cells[1].lstrip("-").isdigit():
        return f"bad_row: expected 'image_name,label', got {line!r}"
    if int(cells[1]) not in classes:
        return f"label_out_of_range: label {cells[1]} is not a class id"
    return None


def read_foodx(store: Store, prefix: str) -> FoodxDataset:
    prefix = prefix.rstrip("/")
    problems: list[tuple[str, str]] = []
    classes = _read_foodx_classes(store, prefix, problems)
    present = set(_keys_under(store, prefix))
    splits: dict[str, list[tuple[str, int, str]]] = {}
    for split, (official, kaggle, folder) in _FOODX_SPLITS.items():
        label_file = next((f for f in (official, kaggle) if f"{prefix}/{f}" in present), None)
        if label_file is None:
            continue
        rows = splits[split] = []
        for n, line in _lines(store, f"{prefix}/{label_file}", problems):
            cells = [c.strip() for c in line.split(",")]
            if not line.strip() or (n == 1 and cells[-1] == "label"):  # blank, Kaggle header
                continue
            image_key = f"{prefix}/{folder}/{cells[0]}"
            reason = _foodx_row_problem(cells, line, classes)
            if reason is None and image_key not in present:
                reason = f"missing_file: image {folder}/{cells[0]} is missing"
            if reason:
                problems.append((f"{label_file}:{n}", reason))
            else:
                rows.append((image_key, int(cells[1]), classes[int(cells[1])]))
    if not splits:
        raise ValueError(f"{prefix}: no train_info.csv / train_labels.csv (or val) found")
    return FoodxDataset(classes, splits, problems)


# --- Tasty Videos -------------------------------------------------------------------------------

TASTY_FRAME_STRIDE = 5  # csvalignment.dat counts sub-sampled frames: x5 gives the frame index


@dataclass
class TastyRecipe:
    id: str
    title: str
    ingredients: list[Ingredient]
    steps: list[str]
    # Per step (first, last) frame index showing it (the file's values x5), None when not shown.
    step_spans: list[tuple[int, int] | None]
    video_key: str
    split: str | None  # "train" | "val" | "test" | None (in no split list)

    @property
    def text(self) -> str:
        """The target text of the video adapter."""
        return format_recipe(self.ingredients, self.steps)


def _read_alignment(text: str, n_steps: int) -> list[tuple[int, int] | None]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != n_steps:
        raise _Skip("bad_alignment", f"csvalignment.dat has {len(lines)} lines for {n_steps} steps")
    spans = []
    for n, line in enumerate(lines, 1):
        try:
            start, end = (int(v) for v in line.split(","))
        except ValueError:
            raise _Skip("bad_alignment", f"csvalignment.dat:{n}: expected 'start,end', got {line!r}") from None
        if (start, end) == (-1, -1):
            spans.append(None)
        elif 0 <= start <= end:
            spans.append((start * TASTY_FRAME_STRIDE, end * TASTY_FRAME_STRIDE))
        else:
            raise _Skip("bad_alignment", f"csvalignment.dat:{n}: bad span {line!r}")
    return spans


def _read_recipe_xml(text: str) -> tuple[str | None, list[Ingredient], list[str]]:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise _Skip("bad_xml", f"recipe.xml: {e}") from None
    try:
        ingredients = [parse_tasty_ingredient(el.text or "") for el in root.iterfind("ingredients/ingredient")]
    except ValueError as e:
        raise _Skip("bad_ingredient", str(e)) from None
    # The released files nest <steps_updated> in <steps_updated>; accept any child tag (<step>).
    steps_el = root.find("steps_updated")
    steps_el = steps_el if steps_el is not None else root.find("steps")
    steps = [
        " ".join(el.text.split()) for el in (steps_el if steps_el is not None else []) if el.text and el.text.strip()
    ]
    if not ingredients or not steps:
        raise _Skip("empty_recipe", "recipe.xml has no ingredients or no steps")
    title = root.findtext("title")
    return (title.strip() if title and title.strip() else None), ingredients, steps


def _read_splits(store: Store, keys: list[str], prefix: str, split_set: str | None):
    """recipe id -> split from SPLITS/<set>/{TRAIN,VAL,TEST}_*.txt (first set by name if None)."""
    split_keys = [k for k in keys if k.startswith(f"{prefix}/SPLITS/") and k.count("/") == prefix.count("/") + 3]
    sets = sorted({k.split("/")[-2] for k in split_keys})
    if split_set is None and sets:
        split_set = sets[0]
    if split_set is not None and split_set not in sets:
        raise ValueError(f"{prefix}/SPLITS/{split_set}: no such split set (have {sets})")
    assigned: dict[str, str] = {}
    problems: list[tuple[str, str]] = []
    for key in split_keys:
        head, _, name = key.rpartition("/")
        kind = name.split("_", 1)[0].lower()
        if head != f"{prefix}/SPLITS/{split_set}" or kind not in ("train", "val", "test"):
            continue
        for _, line in _lines(store, key, problems):
            for rid in line.split():
                if assigned.setdefault(rid, kind) != kind:
                    problems.append((f"SPLITS/{split_set}", f"split_conflict: {rid} is in {assigned[rid]} and {kind}"))
    return assigned, problems


def _read_tasty_recipe(store: Store, base: str, files: list[str]):
    """(title, ingredients, steps, spans, video file) of one recipe folder, or _Skip."""
    for name in ("recipe.xml", "csvalignment.dat"):
        if name not in files:
            raise _Skip("missing_file", f"no {name}")
    title, ingredients, steps = _read_recipe_xml(_read_utf8(store, f"{base}/recipe.xml"))
    spans = _read_alignment(_read_utf8(store, f"{base}/csvalignment.dat"), len(steps))
    if "recipe_video.mp4" in files:
        return title, ingredients, steps, spans, "recipe_video.mp4"
    videos = [f for f in files if f.lower().endswith(".mp4")]
    if len(videos) != 1:
        raise _Skip(
            "missing_file" if not videos else "ambiguous_video",
            f"expected recipe_video.mp4 or one *.mp4, found {videos}",
        )
    return title, ingredients, steps, spans, videos[0]


def read_tasty(store: Store, prefix: str, *, split_set: str | None = None) -> Records:
    """All recipes under `prefix` as a Records list of TastyRecipe, sorted by id."""
    prefix = prefix.rstrip("/")
    keys = _keys_under(store, prefix)
    splits, problems = _read_splits(store, keys, prefix, split_set)
    folders: dict[str, list[str]] = {}
    for key in keys:
        parts = key[len(prefix) + 1 :].split("/")
        if len(parts) == 2 and parts[0] != "SPLITS":
            folders.setdefault(parts[0], []).append(parts[1])
    recipes = Records(problems=problems)
    for rid, files in sorted(folders.items()):
        base = f"{prefix}/{rid}"
        try:
            title, ingredients, steps, spans, video = _read_tasty_recipe(store, base, files)
        except _Skip as e:
            recipes.problems.append((rid, str(e)))
            continue
        except StoreError as e:
            recipes.problems.append((rid, f"store_error: {e}"))
            continue
        recipes.append(TastyRecipe(rid, title or rid, ingredients, steps, spans, f"{base}/{video}", splits.get(rid)))
    for rid in sorted(set(splits) - set(folders)):
        recipes.problems.append((rid, "missing_folder: listed in a split but has no folder"))
    return recipes


# --- YouCook2 (evaluation) ------------------------------------------------------------------------

YOUCOOK2_SUBSETS = ("training", "validation", "testing")


@dataclass
class YoucookVideo:
    id: str
    subset: str  # "training" | "validation" (| "testing")
    recipe_type: str  # YouCook2's recipe id, e.g. "113"
    duration: float  # seconds
    segments: list[tuple[float, float, str]]  # (start s, end s, sentence), in annotation id order

    @property
    def steps(self) -> list[str]:
        return [sentence for _, _, sentence in self.segments]

    @property
    def text(self) -> str:
        """The steps as the video adapter writes them. YouCook2 lists no ingredients, so the
        (empty) Ingredients section is left out: compare steps with steps."""
        return format_recipe([], self.steps).removeprefix("Ingredients:\n")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _youcook_segment(ann) -> tuple[int, float, float, str]:
    """(id, start, end, sentence) of one annotation, or _Skip."""
    if not isinstance(ann, dict) or not isinstance(ann.get("id"), int):
        raise _Skip("bad_segment", f"expected {{'id': int, 'segment', 'sentence'}}, got {ann!r:.80}")
    seg, sentence = ann.get("segment"), ann.get("sentence")
    if not (isinstance(seg, list) and len(seg) == 2 and all(_number(v) for v in seg)):
        raise _Skip("bad_segment", f"annotation {ann['id']}: segment {seg!r} is not [start, end]")
    start, end = float(seg[0]), float(seg[1])
    if start < 0 or end <= start:
        raise _Skip("bad_segment", f"annotation {ann['id']}: segment [{start}, {end}] needs 0 <= start < end")
    if not isinstance(sentence, str) or not sentence.strip():
        raise _Skip("empty_sentence", f"annotation {ann['id']} has no sentence")
    return ann["id"], start, end, " ".join(sentence.split())


def _youcook_video(vid: str, entry) -> YoucookVideo:
    if not isinstance(entry, dict):
        raise _Skip("not_object", f"expected a JSON object, got {type(entry).__name__}")
    subset, recipe_type, duration = (entry.get(k) for k in ("subset", "recipe_type", "duration"))
    if subset not in YOUCOOK2_SUBSETS:
        raise _Skip("bad_field", f"subset {subset!r} is not one of {YOUCOOK2_SUBSETS}")
    if not (isinstance(recipe_type, (str, int)) and str(recipe_type).strip()):
        raise _Skip("bad_field", f"recipe_type {recipe_type!r} is not an id")
    if not (_number(duration) and duration > 0):
        raise _Skip("bad_field", f"duration {duration!r} is not a positive number")
    anns = entry.get("annotations")
    if not isinstance(anns, list) or not anns:
        raise _Skip("no_annotations", "no annotated segments")
    segments = sorted(_youcook_segment(a) for a in anns)
    ids = [s[0] for s in segments]
    if len(set(ids)) != len(ids):
        raise _Skip("duplicate_id", f"annotation ids repeat: {ids}")
    return YoucookVideo(
        vid,
        subset,
        str(recipe_type).strip(),
        float(duration),
        [(start, end, sentence) for _, start, end, sentence in segments],
    )


def read_youcook2(store: Store, key: str, *, subset: str | None = None) -> Records:
    """Videos of youcookii_annotations_trainval.json as YoucookVideo, sorted by id.

    A video with any bad annotation is left out whole: a reference missing a step would score a
    correct answer as wrong. With `subset` ("training"/"validation"), other videos are skipped
    without a problem; entries whose subset can't be read are reported whatever the filter.
    """
    if subset is not None and subset not in YOUCOOK2_SUBSETS:
        raise ValueError(f"subset {subset!r}: use one of {YOUCOOK2_SUBSETS}")
    try:
        doc = json.loads(store.read_bytes(key))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{store.url(key)}: not a UTF-8 JSON file: {e}") from None
    database = doc.get("database") if isinstance(doc, dict) else None
    if not isinstance(database, dict):
        raise ValueError(f"{store.url(key)}: expected {{'database': {{video id: ...}}}}")
    videos = Records()
    for vid, entry in sorted(database.items()):
        given = entry.get("subset") if isinstance(entry, dict) else None
        if subset and given in YOUCOOK2_SUBSETS and given != subset:
            continue
        try:
            videos.append(_youcook_video(vid, entry))
        except _Skip as e:
            videos.problems.append((vid, str(e)))
    return videos


# --- Cooking QA -----------------------------------------------------------------------------------

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
    """The stripped pair, or _Skip naming what is empty or malformed."""
    for name, value in zip(_QA_COLUMNS, (q, a)):
        if not (isinstance(value, str) and value.strip()):
            raise _Skip(f"empty_{name}", f"needs a non-empty string '{name}'")
    if fact is not None and not (isinstance(fact, str) and fact.strip()):
        raise _Skip("bad_fact", "'fact' must be a non-empty string (or left out)")
    named = split.strip().lower() if isinstance(split, str) else split
    if named is not None and named not in QA_SPLITS:
        raise _Skip("bad_split", f"'split' must be one of {list(QA_SPLITS)} (or left out), not {split!r}")
    return QAPair(q.strip(), a.strip(), fact.strip() if fact else None, named)


def _read_qa_jsonl(store: Store, key: str, pairs: Records) -> None:
    name = posixpath.basename(key)
    for n, line in _lines(store, key, pairs.problems):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise _Skip("not_object", f"expected a JSON object, got {type(row).__name__}")
            pairs.append(_qa_pair(row.get("question"), row.get("answer"), row.get("fact"), row.get("split")))
        except json.JSONDecodeError as e:
            pairs.problems.append((f"{name}:{n}", f"not_json: {e.msg}"))
        except _Skip as e:
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
                raise _Skip("not_utf8", "row has bytes that are not UTF-8")
            if len(row) <= max(qi, ai):
                raise _Skip("short_row", f"{len(row)} cells for {len(header)} columns")
            pairs.append(
                _qa_pair(
                    row[qi], row[ai], *(row[i] or None if i is not None and i < len(row) else None for i in optional)
                )
            )
        except _Skip as e:
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
