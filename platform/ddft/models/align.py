"""Stage 1 for the embedded base: its projector aligned to the language model's words, as LLaVA's is.

Video-LLaVA-7B comes with a projector trained (stage 1, then instruction tuning) to turn what its
towers see into tokens the language model already reads. The embedded base's towers are random,
and a random projector hands SmolLM2 tokens it has no word for: measured, a video adapter then
needs far more samples than a CPU budget to learn to read at all (README, "Reading the video").
So the embedded build does stage 1 itself, on captioned still frames of single steps drawn like
the kitchen's videos (`ddft.data.synthetic.step_frames`, generators no recipe video uses): the
towers and the language model stay frozen, and the projector learns to put the word of the food
shown on a frame's patches and the word of its count (icons in the tray) on the tray's row.
Regression onto the words' input embeddings, not LLaVA's caption loss: with that loss, 1,600
frames took 232 s to name 35% of foods. Images go through the same projector, not aligned: the
image adapters learn their own copy of it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

# ~45 s on 2 cores; on fresh frames food 0.76 and count 0.997 (300 steps: 0.63 and 0.94)
FRAMES = 6000  # captioned frames to fit on
STEPS = 600  # Adam steps of BATCH frames
BATCH = 256
LR = 3e-3
SEED = 0


@dataclass(frozen=True)
class Alignment:
    """How well the projected tokens of fresh frames land nearest their caption's words."""

    food_accuracy: float  # the mean token of the rows below the tray, nearest food word
    count_accuracy: float  # the mean token of the tray's row, nearest count word
    frames: int
    seconds: float


def _words(processor, model, words: list[str]) -> torch.Tensor:
    """Each word's input embedding (the mean of its tokens', with a leading space as in a sentence)."""
    emb = model.get_input_embeddings().weight.detach()
    tok = processor.tokenizer
    return torch.stack([emb[tok(" " + w, add_special_tokens=False).input_ids].mean(0) for w in words])


def _tower_features(model, processor, frames: list[np.ndarray], batch: int = 64) -> torch.Tensor:
    """The video tower's patch features at the layer the projector reads (CLS dropped): (frames, patches, width)."""
    from ddft.prompts import pixel_inputs

    out = []
    for i in range(0, len(frames), batch):
        pixels = pixel_inputs(processor, "video", [np.stack(frames[i : i + batch])])["pixel_values_videos"][0]
        with torch.no_grad():
            states = model.model.video_tower(pixels, output_hidden_states=True).hidden_states
        out.append(states[model.config.vision_feature_layer][:, 1:])
    return torch.cat(out)


def align_projector(model, processor, frames: int = FRAMES, steps: int = STEPS, seed: int = SEED) -> Alignment:
    """Train the projector in place (towers and language model frozen); return its check on fresh frames."""
    import time

    from ddft.data.synthetic import FOODS, MAX_ICONS, step_frames

    t0 = time.monotonic()
    foods, counts = sorted(FOODS), [str(c) for c in range(1, MAX_ICONS + 1)]
    food_words, count_words = _words(processor, model, foods), _words(processor, model, counts)

    def data(n: int, seed: int):
        pixels, captions = step_frames(n, seed)
        food = torch.tensor([foods.index(f) for f, _ in captions])
        count = torch.tensor([c - 1 for _, c in captions])
        return _tower_features(model, processor, pixels), food, count

    features, food, count = data(frames, seed)
    row = round(features.shape[1] ** 0.5)  # patches per row: the first row holds the tray
    target = food_words[food][:, None].expand(-1, features.shape[1], -1).clone()
    target[:, :row] = count_words[count][:, None]
    projector = model.model.multi_modal_projector
    optimizer = torch.optim.Adam(projector.parameters(), lr=LR)
    draw = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(features), (BATCH,), generator=draw)
        loss = (projector(features[idx]) - target[idx]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    check_features, check_food, check_count = data(300, seed + 1)
    with torch.no_grad():
        tokens = projector(check_features)

    def accuracy(mean: torch.Tensor, words: torch.Tensor, truth: torch.Tensor) -> float:
        return round(float((torch.cdist(mean, words).argmin(1) == truth).float().mean()), 3)

    out = Alignment(
        accuracy(tokens[:, row:].mean(1), food_words, check_food),
        accuracy(tokens[:, :row].mean(1), count_words, check_count),
        frames,
        round(time.monotonic() - t0, 1),
    )
    log.info("projector aligned: %s", out)
    return out
