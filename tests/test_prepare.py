"""Preparation with Ray Data on a real local cluster: prompts, targets, frames, masking, reuse,
and bad input skipped with a reason (or refused above the skip limit)."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from ddft.data.prepare import PrepareError, latest_version, prepare, prepared_key
from ddft.prompts import IGNORE, QUESTIONS, encode
from ddft.recipes import parse_recipe

pytestmark = pytest.mark.integration


def _rows(store, modality):
    key = prepared_key(modality, latest_version(store, modality))
    files = [k for k in store.list(key) if k.endswith(".parquet")]
    return [r for f in files for r in pq.read_table(store.local_path(f)).to_pylist() if not r["error"]]


def _processor(store):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(store.local_path("models/tiny"))


@pytest.mark.parametrize("modality", ["image", "video", "text"])
def test_prepared_rows(prepared, modality):
    cfg, store, base, done = prepared
    rows = _rows(store, modality)
    manifest = store.read_json(f"{done[modality].key}/manifest.json")
    assert sum(manifest["counts"].values()) == len(rows) > 0 and manifest["skipped"]["total"] == 0
    processor = _processor(store)
    for row in rows:
        ids, labels = row["input_ids"], row["labels"]
        # The prompt is masked out of the loss; the answer (and EOS) is not.
        prompt = encode(processor, modality, row["question"], None, cfg.data.frames)["input_ids"]
        assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [IGNORE] * len(prompt)
        assert labels[len(prompt) :] == ids[len(prompt) :] and labels[-1] == processor.tokenizer.eos_token_id
        assert processor.tokenizer.decode(ids[len(prompt) : -1]).strip() == row["answer"]
        if modality == "text":
            assert row["pixels"] is None and row["pixel_shape"] == []
            continue
        shape = (cfg.data.frames, 224, 224, 3) if modality == "video" else (224, 224, 3)
        assert tuple(row["pixel_shape"]) == shape and len(row["pixels"]) == np.prod(shape)
        assert row["question"] == QUESTIONS[modality]
        token = {"image": processor.image_token_id, "video": processor.video_token_id}[modality]
        assert ids.count(token) == (8 * 17 if modality == "video" else 16)  # patch 56 on 224 px
    if modality == "video":
        recipe = parse_recipe(rows[0]["answer"])
        assert recipe["ingredients"] and all(i["quantity"] for i in recipe["ingredients"]) and recipe["steps"]
    if modality == "image":
        assert len({r["answer"] for r in rows}) == 3  # one name per dish


def test_unchanged_input_reuses_the_version(prepared):
    cfg, store, base, done = prepared
    before = store.entries(done["text"].key)
    again = prepare(store, cfg.data, base, "text")
    assert again.reused and again.version == done["text"].version
    assert store.entries(done["text"].key) == before  # no shard rewritten (same sizes and mtimes)


def test_bad_videos_are_skipped_with_reasons_or_refused(prepared, tmp_path):
    from ddft.store import Store

    cfg, store, base, _ = prepared
    bad = Store(str(tmp_path / "bad"))
    for key in store.list("models/tiny"):
        bad.write_bytes(key, store.read_bytes(key))
    for key in store.list("datasets/raw/tasty"):
        bad.write_bytes(key, store.read_bytes(key))
    recipes = sorted({k.split("/")[3] for k in bad.list("datasets/raw/tasty") if k.endswith(".mp4")})
    bad.write_bytes(f"datasets/raw/tasty/{recipes[0]}/recipe_video.mp4", b"this is a text file, not an mp4")
    bad.write_bytes(f"datasets/raw/tasty/{recipes[1]}/recipe_video.mp4", b"")
    # 6 recipes of the 3 trained dishes and 2 of each of the 2 held-out ones: 10 videos
    with pytest.raises(PrepareError, match=r"2 of 10 samples are bad .*undecodable_video \(1\), empty_file \(1\)"):
        prepare(bad, cfg.data, base, "video")
    lenient = cfg.data.model_copy(update={"max_skip_ratio": 0.5})
    result = prepare(bad, lenient, base, "video")
    assert result.skipped["total"] == 2 and sum(result.counts.values()) == 8
    manifest = bad.read_json(f"{result.key}/manifest.json")
    assert manifest["skipped"]["by_reason"] == {"undecodable_video": 1, "empty_file": 1}
    assert {e["id"] for e in manifest["skipped"]["examples"]} == set(recipes[:2])
