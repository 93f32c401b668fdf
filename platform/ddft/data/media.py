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


def _square(img: Image.Image, size: int) -> np.ndarray:
    """Resize the short side to `size` and centre-crop, as the Video-LLaVA processor does."""
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


STRATEGIES = ("uniform", "keyframe", "steps")


def step_indices(spans: list, total: int, count: int) -> list[int]:
    """One frame per annotated step span (its centre), made up to exactly `count` frames:
    spread over the spans when there are more, topped up with uniform frames when fewer."""
    centres = sorted({min(total - 1, (a + b) // 2) for a, b in (s for s in spans if s)})
    if len(centres) >= count:
        return [centres[i] for i in uniform_indices(len(centres), count)]
    extra = [i for i in uniform_indices(total, count) if i not in centres]
    return sorted(centres + extra[:count - len(centres)])


def _nearest(targets: list[int], keys: list[int]) -> list[int]:
    return [min(keys, key=lambda k: abs(k - t)) for t in targets]


def sample_frames(data: bytes, count: int = 8, size: int = SIZE, strategy: str = "uniform",
                  spans: list | None = None) -> np.ndarray:
    """`count` frames of an encoded video as (count, size, size, 3) uint8; only those are decoded.

    uniform: frame-accurate, evenly spaced; keyframe: each uniform target snapped to its nearest
    keyframe (no decoding between keyframes: far cheaper, fine for minute-long recipe videos);
    steps: one frame per annotated step span (Tasty's csvalignment.dat), topped up to `count`.
    """
    import decord

    if strategy not in STRATEGIES:
        raise ValueError(f"frame strategy {strategy!r}; use one of {STRATEGIES}")
    if not data:
        raise MediaError("empty_file", "the video file has zero bytes")
    try:
        vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
        total = len(vr)
    except (decord.DECORDError, RuntimeError) as err:
        raise MediaError("undecodable_video", f"no decodable video stream ({str(err).splitlines()[0][:200]})") from None
    if total < count:
        raise MediaError("too_few_frames", f"the video has {total} frames, {count} were asked for")
    try:
        if strategy == "keyframe":
            indices = _nearest(uniform_indices(total, count), list(vr.get_key_indices()) or [0])
        elif strategy == "steps" and spans:
            indices = step_indices(spans, total, count)
        else:
            indices = uniform_indices(total, count)
        frames = vr.get_batch(indices).asnumpy()
    except (decord.DECORDError, RuntimeError, IndexError) as err:
        raise MediaError("undecodable_video", f"frames could not be decoded ({str(err).splitlines()[0][:200]})") from None
    return np.stack([_square(Image.fromarray(f), size) for f in frames])


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
    return _square(img.convert("RGB"), size)
