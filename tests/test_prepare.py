"""Preparation with Ray Data on a real local cluster: prompts, targets, frames, masking, reuse,
and bad input skipped with a reason (or refused above the skip limit)."""

import json

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
    folder = "datasets/raw/tasty/ALL_RECIPES_without_videos"
    recipes = sorted({k.split("/")[4] for k in bad.list(folder) if k.endswith(".mp4")})
    bad.write_bytes(f"{folder}/{recipes[0]}/recipe_video.mp4", b"this is a text file, not an mp4")
    bad.write_bytes(f"{folder}/{recipes[1]}/recipe_video.mp4", b"")
    # 6 recipes of the 3 trained dishes and 2 of each of the 2 held-out ones: 10 videos
    with pytest.raises(PrepareError, match=r"2 of 10 samples are bad .*undecodable_video \(1\), empty_file \(1\)"):
        prepare(bad, cfg.data, base, "video")
    lenient = cfg.data.model_copy(update={"max_skip_ratio": 0.5})
    result = prepare(bad, lenient, base, "video")
    assert result.skipped["total"] == 2 and sum(result.counts.values()) == 8
    manifest = bad.read_json(f"{result.key}/manifest.json")
    assert manifest["skipped"]["by_reason"] == {"undecodable_video": 1, "empty_file": 1}
    assert {e["id"] for e in manifest["skipped"]["examples"]} == set(recipes[:2])
    # The gate is a setting, not part of the data: tightened again, the reused version is refused
    # too (it stays, for the lenient setting), and the error says what to change.
    with pytest.raises(PrepareError, match=r"2 of 10 samples are bad .*raise data.max_skip_ratio"):
        prepare(bad, cfg.data, base, "video")
    assert prepare(bad, lenient, base, "video").reused
    # Nothing usable fails whatever the ratio allows, with its reasons.
    for r in recipes:
        bad.write_bytes(f"{folder}/{r}/recipe_video.mp4", b"")
    anything = cfg.data.model_copy(update={"max_skip_ratio": 1.0})
    with pytest.raises(
        PrepareError, match=r"video: no usable samples \(10 read, all bad\); reasons: empty_file \(10\)"
    ):
        prepare(bad, anything, base, "video")


def _jpeg(colour) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buf, "JPEG")
    return buf.getvalue()


def test_release_layouts_prepare_from_their_roots_alone(prepared, tmp_path):
    """Copies of the releases as downloaded, built here by hand: FoodX-251 as mounted from Kaggle
    (train_set/train_set/...), Tasty's release root (split sets one level up from the recipes,
    encoded recipe XML and its table, tokenized text, a recipe in no list), cooking QA. The config
    names only the roots."""
    from ddft.config import load as load_config
    from ddft.data.prepare import prepare_all
    from ddft.data.synthetic import encode_mp4
    from ddft.store import Store

    cfg, store, _, _ = prepared
    root = tmp_path / "store"
    copy = Store(str(root))
    for key in store.list("models/tiny"):
        copy.write_bytes(key, store.read_bytes(key))
    raw = "datasets/raw"
    copy.write_text(f"{raw}/ifood/class_list.txt", "0 apple_pie\n1 hot_dog\n")
    copy.write_text(f"{raw}/ifood/train_labels.csv", "img_name,label\ntrain_0.jpg,0\ntrain_1.jpg,1\n")
    copy.write_text(f"{raw}/ifood/val_labels.csv", "img_name,label\nval_0.jpg,1\n")
    for split, name, colour in (("train", "train_0", "red"), ("train", "train_1", "blue"), ("val", "val_0", "blue")):
        copy.write_bytes(f"{raw}/ifood/{split}_set/{split}_set/{name}.jpg", _jpeg(colour))
    tasty = f"{raw}/Tasty_Videos_Dataset"
    frames = [np.full((48, 64, 3), 40 * k, np.uint8) for k in range(6) for _ in range(5)]  # 30 frames
    table = {
        1: b"2",
        2: b";",
        3: b"eggs",
        4: b",",
        5: b"beaten",
        6: b"Whisk",
        7: b"the",
        8: b".",
        9: b"Enjoy",
        10: b"!",
    }
    copy.write_text(f"{tasty}/id2word_tasty.txt", repr(table))
    for rid in ("omelette", "scrambled-eggs", "frittata"):
        folder = f"{tasty}/ALL_RECIPES_without_videos/{rid}"
        copy.write_text(
            f"{folder}/recipe_encoded.xml",
            "<recipe><ingredients><ingredient>1 2 3 4 5 </ingredient></ingredients><steps><step>6 </step></steps>"
            "<steps_updated><steps_updated>6 7 3 8 </steps_updated><steps_updated>9 10 </steps_updated>"
            "</steps_updated></recipe>",
        )
        copy.write_text(f"{folder}/csvalignment.dat", "1,6\n-1,-1\n")
        copy.write_text(f"{folder}/fps.txt", "10\n")
        copy.write_bytes(f"{folder}/recipe_video.mp4", encode_mp4(frames, 10))
    copy.write_text(f"{tasty}/ALL_RECIPES.txt", "frittata\nomelette\nscrambled-eggs\n")
    copy.write_text(f"{tasty}/SPLITS/split_2511/TRAIN_2511.txt", "omelette\n")
    copy.write_text(f"{tasty}/SPLITS/split_2511/TEST_2511.txt", "scrambled-eggs\n")
    copy.write_text(f"{tasty}/SPLITS/split_4022/TRAIN_4022.txt", "omelette\nfrittata\n")
    copy.write_text(f"{tasty}/SPLITS/split_4022/TEST_4022.txt", "scrambled-eggs\n")
    copy.write_text(f"{raw}/qa.jsonl", '{"question": "What colour is a hot dog?", "answer": "brown"}\n')
    (tmp_path / "release.yaml").write_text(
        f"store: {{uri: {root}}}\nbase: {{id: tiny, build: tiny}}\n"
        "data: {foodx: ifood, tasty: Tasty_Videos_Dataset, qa: qa.jsonl, frames: 4}\n"
        "jobs: [{name: image, modality: image}, {name: video, modality: video}, {name: text, modality: text}]\n"
    )
    done = {p.modality: p for p in prepare_all(load_config(tmp_path / "release.yaml"))}
    assert done["image"].counts == {"train": 2, "val": 1} and done["image"].skipped["total"] == 0
    video = done["video"]
    assert video.counts == {"test": 1, "train": 2} and video.skipped["total"] == 0
    assert video.layout.startswith("release; split set split_4022")
    assert video.decisions == {"decoded_from_recipe_encoded": 3}
    assert done["text"].counts and done["text"].skipped["total"] == 0
    manifest = copy.read_json(f"{video.key}/manifest.json")
    assert manifest["layout"] == video.layout and manifest["excluded"]["total"] == 0
    rows = _rows(copy, "video")
    assert {r["answer"] for r in rows} == {"Ingredients:\n- 2 eggs\nSteps:\n1. Whisk the eggs.\n2. Enjoy!"}
    assert json.loads(rows[0]["ingredients"]) == [
        {"name": "eggs", "quantity": 2.0, "unit": None, "note": "beaten", "alt_quantity": None, "alt_unit": None}
    ]
    # The paper's split set leaves the frittata out: excluded and counted, not put into train.
    (tmp_path / "release.yaml").write_text(
        (tmp_path / "release.yaml").read_text().replace("frames: 4", "frames: 4, tasty_split: split_2511")
    )
    video = prepare_all(load_config(tmp_path / "release.yaml"))[1]
    assert video.counts == {"test": 1, "train": 1}
    assert video.excluded["total"] == 1 and video.excluded["by_reason"] == {"unlisted": 1}
    assert "excluded 1 {'unlisted': 1}" in video.summary()


def test_step_clips_are_training_samples_of_one_step_each(prepared, tmp_path):
    """data.step_clips: annotated steps of training videos become samples of their own, the step's
    frames -> the step's sentence; val and test keep whole recipes only."""
    import shutil

    from ddft.data import formats
    from ddft.data.media import sample_frames
    from ddft.store import Store

    cfg, store, base, done = prepared
    shutil.copytree(store.local_path(""), tmp_path / "store")  # a version of its own: the module's stays latest
    copy = Store(str(tmp_path / "store"))
    data = cfg.data.model_copy(update={"step_clips": 2})
    clipped = prepare(copy, data, base, "video")
    rows = _rows(copy, "video")
    clips = [r for r in rows if "#step" in r["id"]]
    recipes = {r.id: r for r in formats.read_tasty(copy, f"{data.raw_prefix}/{data.tasty}")}
    trained = [r for r in recipes.values() if r.split == "train"]
    assert len(clips) == 2 * len(trained) and clipped.version != done["video"].version
    assert len(rows) - len(clips) == sum(done["video"].counts.values())  # the whole recipes, as before
    for row in clips:
        recipe, step = row["id"].split("#step")
        r, k = recipes[recipe], int(step) - 1
        assert row["split"] == "train" and row["question"] == QUESTIONS["video_step"] and row["answer"] == r.steps[k]
        frames = sample_frames(copy.read_bytes(r.video_key), data.frames, strategy="span", spans=[r.step_spans[k]])
        assert np.frombuffer(row["pixels"], np.uint8).reshape(row["pixel_shape"]).tobytes() == frames.tobytes()
