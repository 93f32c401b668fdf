"""Tasty Videos (the video adapter's data): recipe folders with recipe.xml, csvalignment.dat and the
video, and split lists."""

from __future__ import annotations

import posixpath
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from ddft.data.readers.common import DataError, Records, Skip, keys_under, lines, read_utf8
from ddft.recipes import Ingredient, format_recipe, parse_tasty_ingredient
from ddft.store import Store, StoreError


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
        raise Skip("bad_alignment", f"csvalignment.dat has {len(lines)} lines for {n_steps} steps")
    spans = []
    for n, line in enumerate(lines, 1):
        try:
            start, end = (int(v) for v in line.split(","))
        except ValueError:
            raise Skip("bad_alignment", f"csvalignment.dat:{n}: expected 'start,end', got {line!r}") from None
        if (start, end) == (-1, -1):
            spans.append(None)
        elif 0 <= start <= end:
            spans.append((start * TASTY_FRAME_STRIDE, end * TASTY_FRAME_STRIDE))
        else:
            raise Skip("bad_alignment", f"csvalignment.dat:{n}: bad span {line!r}")
    return spans


def _read_recipe_xml(text: str) -> tuple[str | None, list[Ingredient], list[str]]:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise Skip("bad_xml", f"recipe.xml: {e}") from None
    try:
        ingredients = [parse_tasty_ingredient(el.text or "") for el in root.iterfind("ingredients/ingredient")]
    except ValueError as e:
        raise Skip("bad_ingredient", str(e)) from None
    # The released files nest <steps_updated> in <steps_updated>; accept any child tag (<step>).
    steps_el = root.find("steps_updated")
    steps_el = steps_el if steps_el is not None else root.find("steps")
    steps = [
        " ".join(el.text.split()) for el in (steps_el if steps_el is not None else []) if el.text and el.text.strip()
    ]
    if not ingredients or not steps:
        raise Skip("empty_recipe", "recipe.xml has no ingredients or no steps")
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
        for _, line in lines(store, key, problems):
            for rid in line.split():
                if assigned.setdefault(rid, kind) != kind:
                    problems.append((f"SPLITS/{split_set}", f"split_conflict: {rid} is in {assigned[rid]} and {kind}"))
    return assigned, problems


def _read_tasty_recipe(store: Store, base: str, files: list[str]):
    """(title, ingredients, steps, spans, video file) of one recipe folder, or Skip."""
    for name in ("recipe.xml", "csvalignment.dat"):
        if name not in files:
            raise Skip("missing_file", f"no {name}")
    title, ingredients, steps = _read_recipe_xml(read_utf8(store, f"{base}/recipe.xml"))
    spans = _read_alignment(read_utf8(store, f"{base}/csvalignment.dat"), len(steps))
    if "recipe_video.mp4" in files:
        return title, ingredients, steps, spans, "recipe_video.mp4"
    videos = [f for f in files if f.lower().endswith(".mp4")]
    if len(videos) != 1:
        raise Skip(
            "missing_file" if not videos else "ambiguous_video",
            f"expected recipe_video.mp4 or one *.mp4, found {videos}",
        )
    return title, ingredients, steps, spans, videos[0]


def read_tasty(store: Store, prefix: str, *, split_set: str | None = None) -> Records:
    """All recipes under `prefix` as a Records list of TastyRecipe, sorted by id."""
    prefix = prefix.rstrip("/")
    keys = keys_under(store, prefix)
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
        except Skip as e:
            recipes.problems.append((rid, str(e)))
            continue
        except StoreError as e:
            recipes.problems.append((rid, f"store_error: {e}"))
            continue
        recipes.append(TastyRecipe(rid, title or rid, ingredients, steps, spans, f"{base}/{video}", splits.get(rid)))
    for rid in sorted(set(splits) - set(folders)):
        recipes.problems.append((rid, "missing_folder: listed in a split but has no folder"))
    return recipes
