"""Decode only what the model needs: a few sampled video frames (decord), or one image (Pillow).

Both raise MediaError with the reason in words, so a bad file is skipped and counted by the
data plane, or answered with a 422 by the serve app, never a crash.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

SIZE = 224  # the processor's crop size; frames are stored at this size to keep shards small


class MediaError(ValueError):
    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail  # reason: short, countable ("too_few_frames")
        super().__init__(f"{reason}: {detail}")

    def __reduce__(self):  # picklable across Ray and process pools
        return MediaError, (self.reason, self.detail)


def uniform_indices(total: int, count: int) -> list[int]:
    """`count` frame indices spread evenly over the clip (the centre of each equal segment)."""
    return [int((i + 0.5) * total / count) for i in range(count)]


def square(img: Image.Image, size: int) -> np.ndarray:
    """Resize the short side to `size` and centre-crop, as the Video-LLaVA processor does."""
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


STRATEGIES = ("uniform", "keyframe", "steps", "span")  # span: a step clip's frames (not a config choice)


def step_indices(spans: list, total: int, count: int) -> list[int]:
    """One frame per annotated step span (its centre), made up to exactly `count` frames:
    spread over the spans when there are more, topped up with uniform frames when fewer."""
    centres = sorted({min(total - 1, (a + b) // 2) for a, b in (s for s in spans if s)})
    if len(centres) >= count:
        return [centres[i] for i in uniform_indices(len(centres), count)]
    extra = [i for i in uniform_indices(total, count) if i not in centres]
    return sorted(centres + extra[: count - len(centres)])


def _nearest(targets: list[int], keys: list[int]) -> list[int]:
    return [min(keys, key=lambda k: abs(k - t)) for t in targets]


def sample_frames(
    data: bytes, count: int = 8, size: int = SIZE, strategy: str = "uniform", spans: list | None = None
) -> np.ndarray:
    """`count` frames of an encoded video as (count, size, size, 3) uint8; only those are decoded.

    uniform: frame-accurate, evenly spaced; keyframe: each uniform target snapped to its nearest
    keyframe (no decoding between keyframes: far cheaper, fine for minute-long recipe videos);
    steps: one frame per annotated step span (Tasty's csvalignment.dat), topped up to `count`;
    span: `count` frames evenly over the one span in `spans` (a step's clip).

    Frame i is the i-th frame in presentation order and the frame count is the number of video
    packets, as decord counts them. Plain H.264 (yuv420p, no rotation, closed GOPs) is decoded
    with PyAV, which decodes no more than needed (from the keyframe before each wanted frame,
    skipping non-reference frames that aren't wanted; a lone keyframe for `keyframe`); anything
    else, or anything unexpected on the way, goes to decord. Both give the very same pixels.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"frame strategy {strategy!r}; use one of {STRATEGIES}")
    if not data:
        raise MediaError("empty_file", "the video file has zero bytes")
    frames = _frames_pyav(data, count, strategy, spans)
    if frames is None:
        frames = _frames_decord(data, count, strategy, spans)
    return np.stack([square(Image.fromarray(f), size) for f in frames])


def _indices(strategy: str, spans: list | None, total: int, count: int, keys: list[int]) -> list[int]:
    if strategy == "keyframe":
        return _nearest(uniform_indices(total, count), keys or [0])
    if strategy == "steps" and spans:
        return step_indices(spans, total, count)
    if strategy == "span":
        if not spans or not spans[0]:
            raise ValueError("strategy 'span' takes the step's (first, last) frame as spans[0]")
        first, last = max(0, spans[0][0]), min(total - 1, spans[0][1])
        return [first + i for i in uniform_indices(max(1, last - first + 1), count)]
    return uniform_indices(total, count)


def load_decord():
    """decord, loaded after torch: decord2's bundled libraries bring NVBLAS, and when they load
    first torch's CPU matrix products bind to it and crash the process ("[NVBLAS] CPU Blas
    library need to be provided", then a segfault)."""
    import importlib.util

    if importlib.util.find_spec("torch"):
        importlib.import_module("torch")
    import decord

    return decord


def _frames_decord(data: bytes, count: int, strategy: str, spans: list | None) -> np.ndarray:
    decord = load_decord()
    try:
        vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
        total = len(vr)
    except (decord.DECORDError, RuntimeError) as err:
        raise MediaError("undecodable_video", f"no decodable video stream ({str(err).splitlines()[0][:200]})") from None
    if total < count:
        raise MediaError("too_few_frames", f"the video has {total} frames, {count} were asked for")
    try:
        keys = list(vr.get_key_indices()) if strategy == "keyframe" else []
        return vr.get_batch(_indices(strategy, spans, total, count, keys)).asnumpy()
    except (decord.DECORDError, RuntimeError, IndexError) as err:
        raise MediaError(
            "undecodable_video", f"frames could not be decoded ({str(err).splitlines()[0][:200]})"
        ) from None


class _Unsupported(Exception):
    """Not a clip the PyAV path handles exactly as decord would: use decord."""


def _frames_pyav(data: bytes, count: int, strategy: str, spans: list | None) -> list[np.ndarray] | None:
    """The frames decord would return, decoded with PyAV; None when decord should do it."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            return _decode_pyav(container, count, strategy, spans)
    except Exception:  # _Unsupported, or PyAV failed: decord decides (frames or the MediaError)
        return None


def _decode_pyav(container, count: int, strategy: str, spans: list | None) -> list[np.ndarray]:
    import bisect

    videos = container.streams.video
    if len(videos) != 1 or videos[0].metadata.get("rotate", "0") not in ("", "0"):
        raise _Unsupported
    stream = videos[0]
    cc = stream.codec_context
    if cc.name != "h264" or cc.pix_fmt != "yuv420p":  # the formats checked pixel-equal to decord
        raise _Unsupported
    cc.thread_count = 1
    packets = [p for p in container.demux(stream) if p.size]  # size 0: PyAV's end-of-stream flush
    total = len(packets)
    if total < count or any(p.pts is None for p in packets):
        raise _Unsupported  # decord says why (too_few_frames) or copes
    order = sorted(p.pts for p in packets)  # frame i (presentation order) has pts order[i]
    if len(set(order)) != total:
        raise _Unsupported
    rank = {pts: i for i, pts in enumerate(order)}
    keys = [k for k, p in enumerate(packets) if p.is_keyframe]  # decode-order counts, as decord
    if not keys or keys[0] != 0 or any(rank[packets[k].pts] != k for k in keys):
        raise _Unsupported  # open GOPs / leading frames: a keyframe isn't where decord puts it
    indices = _indices(strategy, spans, total, count, keys)
    wanted = sorted(set(indices))
    got: dict[int, np.ndarray] = {}

    def keep(frames):
        for f in frames:
            i = rank.get(f.pts, -1)
            if i in want_set and i not in got:
                if (
                    f.rotation
                    or f.interlaced_frame
                    or f.format.name != "yuv420p"
                    or f.color_range == 2
                    or (f.width, f.height) != (cc.width, cc.height)
                ):
                    raise _Unsupported  # decord rotates / scales these differently
                got[i] = f.to_ndarray(format="rgb24", threads=1)

    want_set = set(wanted)
    if strategy == "keyframe":  # every wanted frame is a keyframe: decode each packet alone
        for i in wanted:
            cc.flush_buffers()
            keep(cc.decode(packets[i]) + cc.decode(None))
    else:
        decode_index = {p.pts: d for d, p in enumerate(packets)}
        want_pts = {order[i] for i in wanted}
        pos, start, skipping = None, None, None
        for i in wanted:  # ascending: within a GOP decode forward, else start at its keyframe
            if i in got:
                continue
            key = keys[bisect.bisect_right(keys, decode_index[order[i]]) - 1]
            if key != start:  # as decord: a wanted frame of another GOP starts afresh at its keyframe
                if pos is not None:
                    cc.flush_buffers()
                pos, start = key, key
            while i not in got:
                if pos < total:
                    packet = packets[pos]
                    pos += 1
                    skip = packet.pts not in want_pts  # non-reference frames that aren't wanted
                    if skip != skipping:
                        cc.skip_frame, skipping = ("NONREF" if skip else "DEFAULT"), skip
                    keep(cc.decode(packet))
                else:
                    frames = cc.decode(None)
                    if not frames:
                        raise _Unsupported
                    keep(frames)
    if set(got) != want_set:
        raise _Unsupported
    return [got[i] for i in indices]


def load_image(data: bytes, size: int = SIZE) -> np.ndarray:
    """An image as (size, size, 3) uint8 RGB; greyscale, CMYK, palette and 16-bit are converted."""
    if not data:
        raise MediaError("empty_file", "the image file has zero bytes")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError) as err:
        raise MediaError("unreadable_image", str(err)[:200]) from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 256).clip(0, 255).astype(np.uint8))
    return square(img.convert("RGB"), size)
