"""Readers for the datasets in their own native layouts (see DESIGN.md, "Native formats").

They validate what they read and never drop a row silently: a bad row or recipe is left out and
recorded in `problems` as (where, reason), so a preparation job can report or fail on it.
"""

from __future__ import annotations

import json
import posixpath
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from ddft.recipes import Ingredient, format_recipe, parse_tasty_ingredient
from ddft.store import Store, StoreError

__all__ = ["Records", "FoodxDataset", "read_foodx", "TastyRecipe", "read_tasty", "read_qa",
           "TASTY_FRAME_STRIDE"]


class Records(list):
    """A list of what was read, plus `problems`: (where, reason) for each thing left out."""

    def __init__(self, items=(), problems=None):
        super().__init__(items)
        self.problems: list[tuple[str, str]] = list(problems or [])


def _keys_under(store: Store, prefix: str) -> list[str]:
    # Filter ourselves: a plain prefix would also match a sibling like "tasty_old/".
    prefix = prefix.rstrip("/") + "/"
    return [k for k in store.list(prefix) if k.startswith(prefix)]


# --- FoodX-251 ------------------------------------------------------------------------------------

@dataclass
class FoodxDataset:
    classes: dict[int, str]                       # id -> name as in class_list.txt ("hot_dog")
    splits: dict[str, list[tuple[str, int, str]]]  # split -> [(image key, label, class name)]
    problems: list[tuple[str, str]] = field(default_factory=list)

    def dish_name(self, label: int) -> str:
        """The name as a person writes it: class_list.txt uses underscores ("hot_dog")."""
        return self.classes[label].replace("_", " ")


# split -> (official label file without header, Kaggle file with header "img_name,label", folder)
_FOODX_SPLITS = {"train": ("train_info.csv", "train_labels.csv", "train_set"),
                 "val": ("val_info.csv", "val_labels.csv", "val_set")}


def read_foodx(store: Store, prefix: str) -> FoodxDataset:
    prefix = prefix.rstrip("/")
    classes: dict[int, str] = {}
    problems: list[tuple[str, str]] = []
    for n, line in enumerate(store.read_text(f"{prefix}/class_list.txt").splitlines(), 1):
        if not line.strip():
            continue
        ident, _, name = line.strip().partition(" ")
        where = f"class_list.txt:{n}"
        if not ident.isdigit() or not name.strip():
            problems.append((where, f"expected '<id> <name>', got {line!r}"))
        elif int(ident) in classes:
            problems.append((where, f"duplicate class id {ident}"))
        else:
            classes[int(ident)] = name.strip()
    if not classes:
        raise ValueError(f"{prefix}/class_list.txt: no classes")

    present = set(_keys_under(store, prefix))
    splits: dict[str, list[tuple[str, int, str]]] = {}
    for split, (official, kaggle, folder) in _FOODX_SPLITS.items():
        label_file = next((f for f in (official, kaggle) if f"{prefix}/{f}" in present), None)
        if label_file is None:
            continue
        rows = splits[split] = []
        for n, line in enumerate(store.read_text(f"{prefix}/{label_file}").splitlines(), 1):
            cells = [c.strip() for c in line.split(",")]
            if not line.strip() or (n == 1 and cells[-1] == "label"):  # blank, Kaggle header
                continue
            where, reason = f"{label_file}:{n}", None
            if len(cells) != 2 or not cells[0] or not cells[1].lstrip("-").isdigit():
                reason = f"expected 'image_name,label', got {line!r}"
            elif int(cells[1]) not in classes:
                reason = f"label {cells[1]} is not a class id"
            elif f"{prefix}/{folder}/{cells[0]}" not in present:
                reason = f"image {folder}/{cells[0]} is missing"
            if reason:
                problems.append((where, reason))
            else:
                label = int(cells[1])
                rows.append((f"{prefix}/{folder}/{cells[0]}", label, classes[label]))
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
        raise ValueError(f"csvalignment.dat has {len(lines)} lines for {n_steps} steps")
    spans = []
    for n, line in enumerate(lines, 1):
        try:
            start, end = (int(v) for v in line.split(","))
        except ValueError:
            raise ValueError(f"csvalignment.dat:{n}: expected 'start,end', got {line!r}") from None
        if (start, end) == (-1, -1):
            spans.append(None)
        elif 0 <= start <= end:
            spans.append((start * TASTY_FRAME_STRIDE, end * TASTY_FRAME_STRIDE))
        else:
            raise ValueError(f"csvalignment.dat:{n}: bad span {line!r}")
    return spans


def _read_recipe_xml(text: str) -> tuple[str | None, list[Ingredient], list[str]]:
    root = ET.fromstring(text)
    ingredients = [parse_tasty_ingredient(el.text or "")
                   for el in root.iterfind("ingredients/ingredient")]
    # The released files nest <steps_updated> in <steps_updated>; accept any child tag (<step>).
    steps_el = root.find("steps_updated")
    steps_el = steps_el if steps_el is not None else root.find("steps")
    steps = [" ".join(el.text.split()) for el in (steps_el if steps_el is not None else [])
             if el.text and el.text.strip()]
    if not ingredients or not steps:
        raise ValueError("recipe.xml has no ingredients or no steps")
    title = root.findtext("title")
    return (title.strip() if title and title.strip() else None), ingredients, steps


def _read_splits(store: Store, keys: list[str], prefix: str, split_set: str | None):
    """recipe id -> split from SPLITS/<set>/{TRAIN,VAL,TEST}_*.txt (first set by name if None)."""
    split_keys = [k for k in keys
                  if k.startswith(f"{prefix}/SPLITS/") and k.count("/") == prefix.count("/") + 3]
    sets = sorted({k.split("/")[-2] for k in split_keys})
    if split_set is None and sets:
        split_set = sets[0]
    if split_set is not None and split_set not in sets:
        raise ValueError(f"{prefix}/SPLITS/{split_set}: no such split set (have {sets})")
    assigned: dict[str, str] = {}
    problems = []
    for key in split_keys:
        head, _, name = key.rpartition("/")
        kind = name.split("_", 1)[0].lower()
        if head != f"{prefix}/SPLITS/{split_set}" or kind not in ("train", "val", "test"):
            continue
        for rid in store.read_text(key).split():
            if assigned.setdefault(rid, kind) != kind:
                problems.append((f"SPLITS/{split_set}", f"{rid} is in {assigned[rid]} and {kind}"))
    return assigned, problems


def read_tasty(store: Store, prefix: str, *, split_set: str | None = None) -> Records:
    """All recipes under `prefix` as a Records list of TastyRecipe, sorted by id."""
    prefix = prefix.rstrip("/")
    keys = _keys_under(store, prefix)
    splits, problems = _read_splits(store, keys, prefix, split_set)
    folders: dict[str, list[str]] = {}
    for key in keys:
        parts = key[len(prefix) + 1:].split("/")
        if len(parts) == 2 and parts[0] != "SPLITS":
            folders.setdefault(parts[0], []).append(parts[1])
    recipes = Records(problems=problems)
    for rid, files in sorted(folders.items()):
        base = f"{prefix}/{rid}"
        try:
            if "recipe.xml" not in files:
                raise ValueError("no recipe.xml")
            title, ingredients, steps = _read_recipe_xml(store.read_text(f"{base}/recipe.xml"))
            if "csvalignment.dat" not in files:
                raise ValueError("no csvalignment.dat")
            spans = _read_alignment(store.read_text(f"{base}/csvalignment.dat"), len(steps))
            videos = [f for f in files if f.lower().endswith(".mp4")]
            video = "recipe_video.mp4" if "recipe_video.mp4" in files else (
                videos[0] if len(videos) == 1 else None)
            if video is None:
                raise ValueError(f"expected recipe_video.mp4 or one *.mp4, found {videos}")
        except (ValueError, ET.ParseError, StoreError) as e:
            recipes.problems.append((rid, str(e)))
            continue
        recipes.append(TastyRecipe(rid, title or rid, ingredients, steps, spans,
                                   f"{base}/{video}", splits.get(rid)))
    for rid in sorted(set(splits) - set(folders)):
        recipes.problems.append((rid, "listed in a split but has no folder"))
    return recipes


# --- Cooking QA -----------------------------------------------------------------------------------

def read_qa(store: Store, key: str) -> Records:
    """(question, answer) pairs from JSONL; bad lines -> problems as ("<file>:<line>", reason)."""
    pairs = Records()
    name = posixpath.basename(key)
    for n, line in enumerate(store.read_text(key).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            pairs.problems.append((f"{name}:{n}", f"not JSON: {e.msg}"))
            continue
        q, a = (row.get("question"), row.get("answer")) if isinstance(row, dict) else (None, None)
        if not (isinstance(q, str) and q.strip() and isinstance(a, str) and a.strip()):
            pairs.problems.append((f"{name}:{n}", "needs non-empty string 'question' and 'answer'"))
            continue
        pairs.append((q.strip(), a.strip()))
    return pairs
