"""YouCook2 as it is downloaded, each layout built here by hand (not by the synthetic kitchen): the
release (YouCookII/annotations/ beside YouCookII/raw_videos/), the root pointed at YouCookII/, and a
flat copy; then the evaluation's rows from it, and what the user is told when it can't be used."""

import io

import av
import numpy as np
import pytest

from ddft.config import DataConfig
from ddft.data.formats import DataError, find_youcook2
from ddft.data.readers.youcook2 import YoucookLayout
from ddft.eval import evaluate

JSON = "youcookii_annotations_trainval.json"
ANNOTATIONS = {
    "database": {
        "GLd3aX16zBg": {  # the one usable video
            "duration": 4.0,
            "subset": "validation",
            "recipe_type": "113",
            "annotations": [
                {"id": 0, "segment": [0, 2], "sentence": "spread margarine on the bread"},
                {"id": 1, "segment": [2, 4], "sentence": "fry the egg"},
            ],
        },
        "xHr8X2Wpmno": {  # annotated, but its video was never downloaded
            "duration": 4.0,
            "subset": "validation",
            "recipe_type": "201",
            "annotations": [{"id": 0, "segment": [0, 3], "sentence": "boil the noodles"}],
        },
        "neg": {
            "duration": 4.0,
            "subset": "validation",
            "recipe_type": "201",
            "annotations": [{"id": 0, "segment": [-1, 3], "sentence": "wash"}],
        },
        "trainonly": {
            "duration": 4.0,
            "subset": "training",
            "recipe_type": "113",
            "annotations": [{"id": 0, "segment": [0, 3], "sentence": "cut"}],
        },
    }
}


def _clip(frames: int = 12) -> bytes:
    """A few real H.264 frames (as tests/test_media.py's _clip)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.thread_count = 1
        for i in range(frames):
            img = np.full((48, 64, 3), i * 20, np.uint8)
            for p in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in stream.encode(None):
            out.mux(p)
    return buf.getvalue()


def _release(store, root="yc2"):
    store.write_json(f"{root}/YouCookII/annotations/{JSON}", ANNOTATIONS)
    store.write_bytes(f"{root}/YouCookII/raw_videos/validation/113/GLd3aX16zBg.mkv", _clip())


def test_release_layout(store):
    _release(store)
    store.write_bytes("yc2/YouCookII/raw_videos/validation/113/GLd3aX16zBg.jpg", b"thumbnail")
    store.write_bytes("yc2/YouCookII/raw_videos/validation/201/other.webm", b"webm")
    found = find_youcook2(store, "yc2/")
    assert found == YoucookLayout(f"yc2/YouCookII/annotations/{JSON}", "yc2/YouCookII/raw_videos", "release")
    assert found.video_keys(store, "validation") == {  # any video extension; the thumbnail is not one
        "GLd3aX16zBg": "yc2/YouCookII/raw_videos/validation/113/GLd3aX16zBg.mkv",
        "other": "yc2/YouCookII/raw_videos/validation/201/other.webm",
    }


def test_root_at_youcookii_and_flat(store):
    _release(store)
    assert find_youcook2(store, "yc2/YouCookII") == YoucookLayout(
        f"yc2/YouCookII/annotations/{JSON}", "yc2/YouCookII/raw_videos", "YouCookII folder"
    )
    store.write_json(f"flat/{JSON}", ANNOTATIONS)  # the synthetic kitchen's layout
    store.write_bytes("flat/raw_videos/validation/113/GLd3aX16zBg.mp4", b"mp4")
    assert find_youcook2(store, "flat") == YoucookLayout(f"flat/{JSON}", "flat/raw_videos", "flat")


def test_absent_is_none(store):
    store.write_json(f"youcook2_old/{JSON}", ANNOTATIONS)  # a sibling whose name starts the same
    assert find_youcook2(store, "youcook2") is None


def test_files_but_no_annotations_names_where_it_looked(store):
    store.write_bytes("yc2/YouCookII/raw_videos/validation/113/GLd3aX16zBg.mp4", b"mp4")
    store.write_json("yc2/YouCookII/annotations/youcookii_annotations_test_segments_only.json", {})
    with pytest.raises(DataError) as err:
        find_youcook2(store, "yc2")
    msg = str(err.value)
    assert f"no {JSON} in YouCookII/annotations/, annotations/, the folder itself" in msg
    assert "found YouCookII/annotations/youcookii_annotations_test_segments_only.json" in msg
    assert "the folder holds YouCookII/" in msg


def test_annotations_one_level_deeper_are_named(store):
    _release(store, "yc2/download")
    with pytest.raises(DataError, match=f"found it under {store.url('yc2/download/YouCookII')}: point data.youcook2"):
        find_youcook2(store, "yc2")


def _data(youcook2="yc2") -> DataConfig:
    return DataConfig(raw_prefix="raw", youcook2=youcook2, frames=4)


def test_eval_rows_from_the_release(store):
    _release(store, "raw/yc2")
    rows, skipped = evaluate.youcook2_rows(store, _data())
    assert [r["id"] for r in rows] == ["GLd3aX16zBg"]
    assert rows[0]["answer"] == "Steps:\n1. spread margarine on the bread\n2. fry the egg"
    assert rows[0]["pixels"].shape[0] == 4
    videos = store.url("raw/yc2/YouCookII/raw_videos")
    assert skipped == [
        "neg: bad_segment: annotation 0: segment [-1.0, 3.0] needs 0 <= start < end",
        f"xHr8X2Wpmno: missing_file: no xHr8X2Wpmno.<ext> under {videos}/validation/201/",
    ]


def test_eval_without_usable_videos_fails_with_the_reasons(store):
    _release(store, "raw/yc2")
    store.delete("raw/yc2/YouCookII/raw_videos")
    with pytest.raises(DataError) as err:
        evaluate.youcook2_rows(store, _data())
    msg = str(err.value)
    assert "(release layout): no validation video can be used (2 missing_file, 1 bad_segment; e.g. neg: " in msg
    assert "point data.youcook2 elsewhere" in msg


def test_eval_sets_tell_the_user(store, monkeypatch):
    monkeypatch.setattr(evaluate, "held_out", lambda *a: [])  # no prepared data: only YouCook2
    sets, notes = evaluate.eval_sets(store, ("video",), data=_data("youcook2"))
    assert sets == []
    assert notes == [
        f"youcook2: not evaluated, nothing at {store.url('raw/youcook2')} "
        "(data.youcook2 names that folder under data.raw_prefix)"
    ]

    _release(store, "raw/youcook2")
    sets, notes = evaluate.eval_sets(store, ("video",), data=_data("youcook2"))
    assert [(s.dataset, len(s.rows), len(s.skipped)) for s in sets] == [("youcook2", 1, 2)]
    assert notes == ["youcook2 video: 2 left out: " + "; ".join(sets[0].skipped)]
    report = evaluate.save(store, evaluate.Results([], notes))
    assert store.read_text(report.removeprefix(store.url() + "/")).endswith(f"\n\n- {notes[0]}\n")
