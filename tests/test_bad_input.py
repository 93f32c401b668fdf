"""One file of every bad kind, mixed into good ones on the S3 endpoint: every good sample comes
out, every bad one is counted under its reason, and a tight skip limit fails naming the reasons."""

import io

import av
import numpy as np
import pytest
from PIL import Image

from ddft.config import DataConfig
from ddft.data.prepare import PrepareError, list_samples, prepare, shard_columns
from ddft.data.synthetic import encode_mp4, write_kitchen
from ddft.models.load import ensure_base

pytestmark = pytest.mark.integration
RAW = "datasets/raw"


def _audio_only_mp4() -> bytes:
    """A well-formed mp4 whose only stream is audio: there is no video stream to decode."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def _image(mode: str, value) -> bytes:
    buf = io.BytesIO()
    if mode == "I;16":
        Image.fromarray(np.full((240, 320), value, np.uint16)).save(buf, "PNG")
    else:
        Image.new(mode, (320, 240), value).save(buf, "JPEG")
    return buf.getvalue()


def _spoil(store) -> dict:
    """Break the kitchen in every way the data plane must survive; return what to expect."""
    tasty = f"{RAW}/tasty/ALL_RECIPES_without_videos"  # the release's recipes folder
    ids = sorted({k.rsplit("/", 2)[-2] for k in store.list(tasty) if k.endswith(".mp4")})
    video = lambda i: f"{tasty}/{ids[i]}/recipe_video.mp4"  # noqa: E731
    good_mp4 = store.read_bytes(video(0))
    store.write_bytes(video(0), good_mp4[: len(good_mp4) // 2])  # truncated
    store.write_bytes(video(1), b"")  # zero bytes
    store.write_bytes(video(2), b"<html>not a video</html>\n" * 20)  # text named .mp4
    store.write_bytes(video(3), encode_mp4([np.zeros((64, 64, 3), np.uint8)] * 4, 10))  # 4 frames < 8
    store.write_bytes(video(4), _audio_only_mp4())  # no video stream
    store.write_text(f"{tasty}/{ids[5]}/recipe.xml", "<recipe><title>oops</title><ingredients>")  # malformed

    foodx = f"{RAW}/foodx251"
    store.write_bytes(f"{foodx}/train_set/train_00000.jpg", b"\x00garbage, not a jpeg")  # unreadable
    store.write_bytes(f"{foodx}/train_set/train_00001.jpg", _image("CMYK", (0, 200, 200, 0)))  # converted
    store.write_bytes(f"{foodx}/train_set/train_00002.jpg", _image("L", 90))  # converted
    store.write_bytes(f"{foodx}/train_set/train_00003.jpg", _image("I;16", 50000))  # converted
    csv = store.read_text(f"{foodx}/train_info.csv")
    store.write_text(f"{foodx}/train_info.csv", csv + "train_09999.jpg,0\ntrain_00004.jpg,4000\n")

    qa = f"{RAW}/cooking_qa/qa.jsonl"
    store.write_bytes(
        qa,
        store.read_bytes(qa)
        + b'{"question": "caf\xe9?", "answer": "x"}\n'
        + b'{"question": "What is an empty answer?", "answer": ""}\n',
    )
    return {
        "video": ({"undecodable_video": 3, "empty_file": 1, "too_few_frames": 1, "bad_xml": 1}, set(ids[6:])),
        "image": {"unreadable_image": 1, "missing_file": 1, "label_out_of_range": 1},
        "text": {"not_utf8": 1, "empty_answer": 1},
    }


def test_every_bad_kind_is_counted_and_every_good_sample_kept(ray_cluster, s3_store, tmp_path, monkeypatch):
    monkeypatch.setenv("DDFT_CACHE", str(tmp_path / "cache"))
    base = ensure_base(s3_store, "tiny", build="tiny")
    write_kitchen(s3_store, RAW, seed=1, dishes=3, held_out_dishes=0, images_per_dish=4, recipes=10, qa_pairs=20)
    expected = _spoil(s3_store)
    lenient = DataConfig(max_skip_ratio=0.7)

    for modality in ("image", "video", "text"):
        items = list_samples(s3_store, lenient, modality).items
        result = prepare(s3_store, lenient, base, modality)
        reasons = expected[modality][0] if modality == "video" else expected[modality]
        assert result.skipped["by_reason"] == reasons, modality
        rows = shard_columns(s3_store, result.key).to_pylist()
        kept = {r["id"] for r in rows if not r["error"]}
        bad_media = {r["id"] for r in rows if r["error"]}
        # Every listed sample came out as a row; the good ones are exactly those without an error.
        assert kept | bad_media == {i["id"] for i in items} and sum(result.counts.values()) == len(kept)
        if modality == "video":
            assert kept == expected["video"][1]
        if modality == "image":  # CMYK, greyscale and 16-bit were converted, not skipped
            assert {"train_00001.jpg", "train_00002.jpg", "train_00003.jpg"} <= kept
            assert bad_media == {"train_00000.jpg"}

    strict = DataConfig(max_skip_ratio=0.05)
    with pytest.raises(PrepareError, match=r"video: 6 of 10 samples are bad .*reasons: undecodable_video \(3\)"):
        prepare(s3_store, strict.model_copy(update={"frames": 7}), base, "video")  # new settings: new run
