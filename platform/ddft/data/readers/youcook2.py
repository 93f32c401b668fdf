"""YouCook2 (evaluation only): the annotations JSON and raw_videos/<subset>/<recipe_type>/<id>.<ext>,
found by find_youcook2 in the release's layout (YouCookII/annotations/ beside YouCookII/raw_videos/)
or a flat one."""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

from ddft.data.readers.common import DataError, Records, Skip, keys_under, top_level
from ddft.recipes import format_recipe
from ddft.store import Store

YOUCOOK2_SUBSETS = ("training", "validation", "testing")
YOUCOOK2_ANNOTATIONS = "youcookii_annotations_trainval.json"
# (layout, the annotations JSON, the raw_videos folder), under the root given, in the order tried
_YOUCOOK2_LAYOUTS = (
    ("release", f"YouCookII/annotations/{YOUCOOK2_ANNOTATIONS}", "YouCookII/raw_videos"),
    ("YouCookII folder", f"annotations/{YOUCOOK2_ANNOTATIONS}", "raw_videos"),
    ("flat", YOUCOOK2_ANNOTATIONS, "raw_videos"),
)
# Beside the videos, downloaders leave files that are not videos (youtube-dl's info JSON, thumbnails,
# partial downloads): any other extension counts as a video, so .mp4, .mkv, .webm ... all work.
_NOT_VIDEO = {".json", ".part", ".ytdl", ".jpg", ".jpeg", ".png", ".webp", ".txt", ".description", ".vtt", ".srt"}


@dataclass(frozen=True)
class YoucookLayout:
    annotations: str  # key of youcookii_annotations_trainval.json
    videos: str  # the raw_videos folder: <videos>/<subset>/<recipe_type>/<id>.<ext>
    layout: str  # "release", "YouCookII folder" or "flat"

    def video_keys(self, store: Store, subset: str) -> dict[str, str]:
        """Video id -> key of its file under <videos>/<subset>/ (whatever its extension)."""
        keys = {}
        for key in reversed(keys_under(store, f"{self.videos}/{subset}")):  # the first by name wins
            stem, ext = posixpath.splitext(posixpath.basename(key))
            if ext.lower() not in _NOT_VIDEO:
                keys[stem] = key
        return keys


def find_youcook2(store: Store, root: str) -> YoucookLayout | None:
    """Where YouCook2's annotations and videos are under `root` (see _YOUCOOK2_LAYOUTS); None when
    nothing at all is there. Files but no annotations JSON is an error naming where it was looked for."""
    root = root.rstrip("/")
    for layout, ann_key, videos in _YOUCOOK2_LAYOUTS:
        if store.exists(f"{root}/{ann_key}"):
            return YoucookLayout(f"{root}/{ann_key}", f"{root}/{videos}", layout)
    keys = keys_under(store, root)
    if not keys:
        return None
    jsons = [k for k in keys if k.endswith(".json")]
    deeper = [posixpath.dirname(k).removesuffix("/annotations") for k in jsons if k.endswith(YOUCOOK2_ANNOTATIONS)]
    if deeper:
        fix = f"found it under {store.url(deeper[0])}: point data.youcook2 at that folder"
    else:
        found = ", ".join(k[len(root) + 1 :] for k in jsons[:5]) if jsons else "no .json file"
        fix = (
            f"found {found}; the folder holds {top_level(keys, root)}: put the release's YouCookII/ "
            f"there (annotations/{YOUCOOK2_ANNOTATIONS} beside raw_videos/)"
        )
    looked = ", ".join(a.removesuffix(YOUCOOK2_ANNOTATIONS) or "the folder itself" for _, a, _ in _YOUCOOK2_LAYOUTS)
    raise DataError(f"YouCook2 at {store.url(root)}: no {YOUCOOK2_ANNOTATIONS} in {looked}; {fix}")


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
    """(id, start, end, sentence) of one annotation, or Skip."""
    if not isinstance(ann, dict) or not isinstance(ann.get("id"), int):
        raise Skip("bad_segment", f"expected {{'id': int, 'segment', 'sentence'}}, got {ann!r:.80}")
    seg, sentence = ann.get("segment"), ann.get("sentence")
    if not (isinstance(seg, list) and len(seg) == 2 and all(_number(v) for v in seg)):
        raise Skip("bad_segment", f"annotation {ann['id']}: segment {seg!r} is not [start, end]")
    start, end = float(seg[0]), float(seg[1])
    if start < 0 or end <= start:
        raise Skip("bad_segment", f"annotation {ann['id']}: segment [{start}, {end}] needs 0 <= start < end")
    if not isinstance(sentence, str) or not sentence.strip():
        raise Skip("empty_sentence", f"annotation {ann['id']} has no sentence")
    return ann["id"], start, end, " ".join(sentence.split())


def _youcook_video(vid: str, entry) -> YoucookVideo:
    if not isinstance(entry, dict):
        raise Skip("not_object", f"expected a JSON object, got {type(entry).__name__}")
    subset, recipe_type, duration = (entry.get(k) for k in ("subset", "recipe_type", "duration"))
    if subset not in YOUCOOK2_SUBSETS:
        raise Skip("bad_field", f"subset {subset!r} is not one of {YOUCOOK2_SUBSETS}")
    if not (isinstance(recipe_type, (str, int)) and str(recipe_type).strip()):
        raise Skip("bad_field", f"recipe_type {recipe_type!r} is not an id")
    if not (_number(duration) and duration > 0):
        raise Skip("bad_field", f"duration {duration!r} is not a positive number")
    anns = entry.get("annotations")
    if not isinstance(anns, list) or not anns:
        raise Skip("no_annotations", "no annotated segments")
    segments = sorted(_youcook_segment(a) for a in anns)
    ids = [s[0] for s in segments]
    if len(set(ids)) != len(ids):
        raise Skip("duplicate_id", f"annotation ids repeat: {ids}")
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
        raise DataError(f"{store.url(key)}: not a UTF-8 JSON file: {e}") from None
    database = doc.get("database") if isinstance(doc, dict) else None
    if not isinstance(database, dict):
        found = f"keys {sorted(doc)[:5]}" if isinstance(doc, dict) else f"a JSON {type(doc).__name__}"
        raise DataError(
            f"{store.url(key)}: expected YouCook2's {{'database': {{video id: ...}}}}, found {found}; "
            f"is it {YOUCOOK2_ANNOTATIONS} as released?"
        )
    videos = Records()
    for vid, entry in sorted(database.items()):
        given = entry.get("subset") if isinstance(entry, dict) else None
        if subset and given in YOUCOOK2_SUBSETS and given != subset:
            continue
        try:
            videos.append(_youcook_video(vid, entry))
        except Skip as e:
            videos.problems.append((vid, str(e)))
    return videos
