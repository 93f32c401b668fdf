"""Tasty Videos (the video adapter's data), read from the release's own root.

The release (see DESIGN.md, "Native formats"):

    <root>/ALL_RECIPES.txt
    <root>/id2word_tasty.txt                         the decoding table of recipe_encoded.xml
    <root>/SPLITS/split_2511/{TRAIN,VAL,TEST}_2511.txt
    <root>/SPLITS/split_4022/{TRAIN,VAL,TEST}_4022.txt
    <root>/ALL_RECIPES_without_videos/<recipe>/{recipe_encoded.xml, recipe.xml, fps.txt,
                                                csvalignment.dat, <downloaded video>}

The root may also be the recipes folder itself (SPLITS then is one level up), or a flat copy with
recipe folders and SPLITS side by side. Text is read as the release's tools decode it (tokens
joined by spaces: "until browned ."), and turned back into written text for targets. Nothing
changes silently: a recipe in no list of the split set is excluded and counted (or trained on,
with `unlisted="train"`), a blank ingredient line is skipped and counted, extra alignment lines are
ignored and counted: see `Records.excluded` and `Records.decisions`.
"""

from __future__ import annotations

import ast
import posixpath
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass

from ddft.data.readers.common import DataError, Records, Skip, keys_under, lines, read_utf8, top_level
from ddft.recipes import Ingredient, format_recipe, parse_tasty_ingredient
from ddft.store import Store, StoreError

TASTY_FRAME_STRIDE = 5  # csvalignment.dat counts blocks of 5 frames, from 1
RECIPES_FOLDER = "ALL_RECIPES_without_videos"
DECODING_TABLE = "id2word_tasty.txt"
SPLIT_KINDS = ("train", "val", "test")
UNLISTED = ("exclude", "train")  # what happens to a recipe that no split list names
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov")
RECIPE_FILES = {"recipe.xml", "recipe_encoded.xml", "csvalignment.dat"}


@dataclass
class TastyRecipe:
    id: str
    title: str
    ingredients: list[Ingredient]
    steps: list[str]
    # Per step the (first, last) 0-based frame showing it, None when not shown (-1,-1). The file's
    # blocks are 1-based: "start,end" is frames start*5-4 .. end*5 counted from 1.
    step_spans: list[tuple[int, int] | None]
    video_key: str
    split: str | None  # "train" | "val" | "test"

    @property
    def text(self) -> str:
        """The target text of the video adapter."""
        return format_recipe(self.ingredients, self.steps)


# --- written text from the release's tokens -------------------------------------------------------

_DETOKENIZE = [
    (re.compile(r"``\s*"), '"'),
    (re.compile(r"\s*''"), '"'),
    (re.compile(r"\s+([.,!?;:%)\]}])"), r"\1"),
    (re.compile(r"([(\[{$])\s+"), r"\1"),
    (re.compile(r"\s+(n't|'s|'re|'ll|'ve|'d|'m)\b", re.I), r"\1"),
    (re.compile(r"(\w)\s+'(\s|$)"), r"\1'\2"),  # "confectioners ' sugar"
    (re.compile(r"\s*°\s*"), "°"),
]


def detokenize(text: str) -> str:
    """ "Bake until browned ." -> "Bake until browned." (the release's text is word-tokenized)."""
    text = " ".join(text.split())
    for pattern, repl in _DETOKENIZE:
        text = pattern.sub(repl, text)
    return text.strip()


# --- one recipe -----------------------------------------------------------------------------------


def _read_alignment(text: str, n_steps: int, decisions: Counter) -> list[tuple[int, int] | None]:
    rows = [line.strip() for line in text.splitlines() if line.strip()]
    if len(rows) < n_steps:
        raise Skip("bad_alignment", f"csvalignment.dat has {len(rows)} lines for {n_steps} steps")
    if len(rows) > n_steps:  # the release's reader uses the first line of each step too
        decisions["alignment_extra_lines_ignored"] += 1
    spans = []
    for n, line in enumerate(rows[:n_steps], 1):
        try:
            start, end = (int(v) for v in line.split(","))
        except ValueError:
            raise Skip("bad_alignment", f"csvalignment.dat:{n}: expected 'start,end', got {line!r}") from None
        if (start, end) == (-1, -1):
            spans.append(None)
        elif 1 <= start <= end:
            spans.append(((start - 1) * TASTY_FRAME_STRIDE, end * TASTY_FRAME_STRIDE - 1))
        else:
            raise Skip("bad_alignment", f"csvalignment.dat:{n}: bad span {line!r} (blocks count from 1)")
    return spans


def _decode(root: ET.Element, table: dict) -> None:
    """What the release's fs_decode_xml.py does: each token id -> its word, joined by spaces."""
    for path in ("steps_updated/steps_updated", "steps/step", "ingredients/ingredient"):
        for el in root.iterfind(path):
            try:
                words = [table[int(t)] for t in (el.text or "").split()]
            except (KeyError, ValueError) as e:
                raise Skip("bad_xml", f"recipe_encoded.xml: token {e} is not in {DECODING_TABLE}") from None
            el.text = " ".join(w.decode("utf-8") if isinstance(w, bytes) else str(w) for w in words)


def _read_recipe_xml(text: str, decisions: Counter, table: dict | None = None):
    """(title, ingredients, steps) of recipe.xml (or of recipe_encoded.xml, given its table)."""
    name = "recipe_encoded.xml" if table is not None else "recipe.xml"
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise Skip("bad_xml", f"{name}: {e}") from None
    if table is not None:
        _decode(root, table)
    ingredients = []
    for el in root.iterfind("ingredients/ingredient"):
        if not (el.text or "").strip():  # the release's reader skips these too
            decisions["empty_ingredient_skipped"] += 1
            continue
        try:
            ing = parse_tasty_ingredient(el.text)
        except ValueError as e:
            raise Skip("bad_ingredient", str(e)) from None
        ing.name = detokenize(ing.name)
        ing.note = detokenize(ing.note) if ing.note else None
        if ing.alt_quantity is not None or ing.alt_unit is not None:
            decisions["second_amount_kept"] += 1
        ingredients.append(ing)
    # The release nests <steps_updated> in <steps_updated>; accept any child tag (<step>).
    steps_el = root.find("steps_updated")
    steps_el = steps_el if steps_el is not None else root.find("steps")
    steps = [detokenize(el.text) for el in (steps_el if steps_el is not None else []) if (el.text or "").strip()]
    if not ingredients or not steps:
        raise Skip("empty_recipe", f"{name} has no ingredients or no steps")
    title = root.findtext("title")
    return (detokenize(title) if title and title.strip() else None), ingredients, steps


def _video(files: list[str]) -> str:
    if "recipe_video.mp4" in files:
        return "recipe_video.mp4"
    videos = [f for f in files if f.lower().endswith(VIDEO_EXTENSIONS)]
    if len(videos) != 1:
        raise Skip(
            "missing_file" if not videos else "ambiguous_video",
            f"expected the downloaded video (recipe_video.mp4 or one {'/'.join(VIDEO_EXTENSIONS)}), found {videos}",
        )
    return videos[0]


# --- the release ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    name: str
    recipes: str  # folder holding one folder per recipe
    splits: str  # folder holding SPLITS/<set>/
    top: str  # where id2word_tasty.txt would be


def _layout(store: Store, prefix: str, keys: list[str]) -> _Layout:
    if any(k.startswith(f"{prefix}/{RECIPES_FOLDER}/") for k in keys):
        return _Layout("release", f"{prefix}/{RECIPES_FOLDER}", f"{prefix}/SPLITS", prefix)
    parent = posixpath.dirname(prefix)
    if posixpath.basename(prefix) == RECIPES_FOLDER:
        return _Layout(f"release, read from its {RECIPES_FOLDER}/ folder", prefix, f"{parent}/SPLITS", parent)
    return _Layout("flat: recipe folders and SPLITS/ side by side", prefix, f"{prefix}/SPLITS", prefix)


def _split_lists(store: Store, layout: _Layout, problems: list) -> dict[str, dict[str, str]]:
    """split set -> {recipe id -> split} from SPLITS/<set>/{TRAIN,VAL,TEST}_*.txt."""
    sets: dict[str, dict[str, str]] = {}
    for key in keys_under(store, layout.splits):
        parts = key[len(layout.splits) + 1 :].split("/")
        kind = parts[-1].split("_", 1)[0].lower()
        if len(parts) != 2 or kind not in SPLIT_KINDS or not parts[1].lower().endswith(".txt"):
            continue
        assigned = sets.setdefault(parts[0], {})
        for _, line in lines(store, key, problems):
            rid = line.strip()
            if rid and assigned.setdefault(rid, kind) != kind:
                problems.append((f"SPLITS/{parts[0]}", f"split_conflict: {rid} is in {assigned[rid]} and {kind}"))
    return sets


def _choose_split_set(sets: dict, wanted: str | None, folders: dict, layout: _Layout) -> tuple[str, str]:
    """(set name, how it was chosen). None: the set that lists the most recipe folders found."""
    if wanted is not None:
        if wanted not in sets:
            raise DataError(
                f"Tasty: no split set {wanted!r} under {layout.splits}/ (found {sorted(sets) or 'none'}); "
                "set data.tasty_split to one of them, or leave it unset to choose the one that lists the most recipes"
            )
        return wanted, "as configured"
    best = max(sorted(sets), key=lambda s: len(folders.keys() & sets[s].keys()))
    return best, f"chosen: it lists {len(folders.keys() & sets[best].keys())} of {len(folders)} recipe folders"


def _decoding_table(store: Store, layout: _Layout) -> dict | None:
    key = f"{layout.top}/{DECODING_TABLE}"
    if not store.exists(key):
        return None
    try:  # a Python dict literal {id: b'word'}: parsed, never evaluated
        table = ast.literal_eval(store.read_bytes(key).decode("utf-8"))
    except (ValueError, SyntaxError, UnicodeDecodeError) as e:
        raise DataError(f"Tasty: {store.url(key)} is not the release's decoding table: {e}") from None
    if not isinstance(table, dict):
        raise DataError(f"Tasty: {store.url(key)} is not the release's decoding table (not a dict)")
    return table


def _read_recipe(store: Store, base: str, files: list[str], layout: _Layout, table, decisions: Counter):
    """(title, ingredients, steps, spans, video file) of one recipe folder, or Skip."""
    if "csvalignment.dat" not in files:
        raise Skip("missing_file", "no csvalignment.dat")
    if "recipe.xml" in files:
        parsed = _read_recipe_xml(read_utf8(store, f"{base}/recipe.xml"), decisions)
    elif "recipe_encoded.xml" in files and table is not None:
        parsed = _read_recipe_xml(read_utf8(store, f"{base}/recipe_encoded.xml"), decisions, table)
        decisions["decoded_from_recipe_encoded"] += 1
    else:
        raise Skip(
            "missing_file",
            "no recipe.xml"
            + (
                f": decode recipe_encoded.xml with the release's fs_decode_xml.py, or put {DECODING_TABLE} "
                f"in {layout.top}/ and ddft decodes it"
                if "recipe_encoded.xml" in files
                else ""
            ),
        )
    title, ingredients, steps = parsed
    spans = _read_alignment(read_utf8(store, f"{base}/csvalignment.dat"), len(steps), decisions)
    return title, ingredients, steps, spans, _video(files)


def read_tasty(store: Store, prefix: str, *, split_set: str | None = None, unlisted: str = "exclude") -> Records:
    """Every recipe of a Tasty copy as a Records list of TastyRecipe, sorted by id.

    `split_set` names SPLITS/<set> (None: the one listing the most recipe folders); `unlisted`
    says what happens to a recipe no list of that set names: "exclude" (counted in `excluded`) or
    "train" (counted in `decisions`). `layout` says what was found and which split set was used.
    """
    if unlisted not in UNLISTED:
        raise DataError(f"Tasty: unlisted={unlisted!r}; use one of {UNLISTED}")
    prefix = prefix.rstrip("/")
    keys = keys_under(store, prefix)
    layout = _layout(store, prefix, keys)
    folders: dict[str, list[str]] = {}
    for key in keys if layout.recipes == prefix else keys_under(store, layout.recipes):
        parts = key[len(layout.recipes) + 1 :].split("/")
        if len(parts) == 2 and parts[0] != "SPLITS":
            folders.setdefault(parts[0], []).append(parts[1])
    # A recipe folder holds a recipe file; others (notes/, a frames dump) are not recipes.
    folders = {rid: files for rid, files in folders.items() if set(files) & RECIPE_FILES}
    if not folders:
        raise DataError(
            f"Tasty: no recipe folders under {store.url(prefix)} (it holds {top_level(keys, prefix)}); "
            f"point data.tasty at the release's root (the folder holding {RECIPES_FOLDER}/ and SPLITS/)"
        )
    recipes = Records()
    sets = _split_lists(store, layout, recipes.problems)
    if not sets and unlisted == "exclude":
        raise DataError(
            f"Tasty: no split lists under {store.url(layout.splits)}/ (SPLITS/<set>/TRAIN_*.txt, VAL_*, TEST_*): "
            "point data.tasty at the release's root, or set data.tasty_unlisted: train to train on every recipe"
        )
    chosen, how = _choose_split_set(sets, split_set, folders, layout) if sets else (None, "no split lists")
    splits = sets.get(chosen, {})
    recipes.layout = f"{layout.name}; split set {chosen} ({how})" if chosen else layout.name
    table = _decoding_table(store, layout)
    for rid, files in sorted(folders.items()):
        split = splits.get(rid)
        if split is None and unlisted == "exclude":
            recipes.excluded.append((rid, f"unlisted: in no list of SPLITS/{chosen}"))
            continue
        if split is None:
            recipes.decisions["unlisted_trained_on"] += 1  # counted even if the recipe is then bad
        base, made = f"{layout.recipes}/{rid}", Counter()  # decisions count for recipes kept only
        try:
            title, ingredients, steps, spans, video = _read_recipe(store, base, files, layout, table, made)
        except Skip as e:
            recipes.problems.append((rid, str(e)))
            continue
        except StoreError as e:
            recipes.problems.append((rid, f"store_error: {e}"))
            continue
        recipes.decisions.update(made)
        recipes.append(TastyRecipe(rid, title or rid, ingredients, steps, spans, f"{base}/{video}", split or "train"))
    for rid in sorted(set(splits) - set(folders)):
        recipes.problems.append((rid, f"missing_folder: listed in SPLITS/{chosen} but has no folder"))
    return recipes
