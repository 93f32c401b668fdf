"""Frame sampling: the PyAV fast path must return exactly decord's frames (decord is the reference
and the fallback), for every strategy, on short and long GOPs; bad input raises MediaError."""

import io

import av
import numpy as np
import pytest

from ddft.data import media


def _clip(frames: int = 90, gop: int | None = 30, bframes: bool = True) -> bytes:
    rng = np.random.default_rng(frames + (gop or 0))
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        opts = {"g": str(gop)} if gop else {}
        if not bframes:
            opts["bf"] = "0"
        stream = out.add_stream("libx264", rate=30, options=opts)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        stream.codec_context.thread_count = 1
        for i in range(frames):
            img = np.full((120, 160, 3), (i * 3) % 255, np.uint8)
            img[:, (i * 2) % 160 :] = rng.integers(0, 255, 3, dtype=np.uint8)
            for p in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in stream.encode(None):
            out.mux(p)
    return buf.getvalue()


@pytest.mark.parametrize("gop,bframes", [(30, True), (None, True), (10, False)])
@pytest.mark.parametrize("strategy", ["uniform", "keyframe", "steps", "span"])
def test_fast_path_returns_decords_frames(gop, bframes, strategy):
    data = _clip(gop=gop, bframes=bframes)
    spans = [(0, 20), None, (40, 60), (70, 89)]
    fast = media._frames_pyav(data, 8, strategy, spans)
    assert fast is not None  # plain H.264: the fast path takes it
    reference = media._frames_decord(data, 8, strategy, spans)
    assert np.array_equal(np.stack(fast), reference)
    out = media.sample_frames(data, 8, strategy=strategy, spans=spans)
    assert out.shape == (8, 224, 224, 3) and out.dtype == np.uint8


def test_uniform_indices_and_steps():
    assert media.uniform_indices(80, 8) == [5, 15, 25, 35, 45, 55, 65, 75]
    assert media.step_indices([(0, 10), None, (20, 30)], 100, 2) == [5, 25]
    assert len(media.step_indices([(0, 10)], 100, 8)) == 8
    # span: a step's clip, every frame from within its span (repeated when it is short)
    assert media._indices("span", [(20, 35)], 100, 8, []) == [21, 23, 25, 27, 29, 31, 33, 35]
    assert media._indices("span", [(40, 42)], 100, 4, []) == [40, 41, 41, 42]


@pytest.mark.parametrize("data,reason", [(b"", "empty_file"), (b"text, not video" * 9, "undecodable_video")])
def test_bad_video_raises_media_error(data, reason):
    with pytest.raises(media.MediaError) as err:
        media.sample_frames(data)
    assert err.value.reason == reason


def test_too_few_frames():
    with pytest.raises(media.MediaError, match="too_few_frames: the video has 4 frames, 8 were asked for"):
        media.sample_frames(_clip(frames=4))
