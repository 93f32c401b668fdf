"""Pixel preparation for ddft's Video-LLaVA in vLLM, without torchvision (and without vLLM, so
the project's venv tests it against transformers' own processors)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def clip_pixels(frames: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, size, size) float32: short side to `size` (bicubic), centre
    crop, /255, CLIP mean/std; what VideoLlavaImageProcessor and VideoLlavaVideoProcessor do."""
    from ddft.data.media import square

    frames = np.asarray(frames)
    if frames.shape[1:3] != (size, size):  # ddft's decoders already give size x size frames
        from PIL import Image

        frames = np.stack([square(Image.fromarray(f.astype(np.uint8)), size) for f in frames])
    x = frames.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
