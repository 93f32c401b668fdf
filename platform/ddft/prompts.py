"""The prompt contract shared by data preparation, training and serving.

Training and serving must build the very same token sequence, so both call `encode` here.
The format is Video-LLaVA's own: `USER: <video>\\n<question> ASSISTANT: <answer></s>`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

QUESTIONS = {
    "image": "What is the dish in this image?",
    "video": "Give me the recipe for this video, with specific amounts for each ingredient.",
    # a step's clip (DataConfig.step_clips): training only
    "video_step": "What is done in this step of the video, with how much of what?",
}
IGNORE = -100  # label of prompt tokens: the loss covers the answer only
# Video-LLaVA-7B-hf's chat template: media placeholders first, then the text, `ASSISTANT:` last.
# Always this one (not whatever a processor carries) so every base sees the same prompt format.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}{% for c in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}"
    "{% endfor %}{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Turn:
    """An earlier turn of a conversation, before the question (the last user turn)."""

    role: str  # "system" | "user" | "assistant"
    text: str
    media: bool = False  # this turn carries the request's image or video (else the question does)


def prompt_text(tokenizer, modality: str, question: str, raw: bool = False, history: Sequence[Turn] = ()) -> str:
    """`USER: <video>\n<question> ASSISTANT:`, rendered with the chat template, after the earlier
    turns of `history` (each in the template's own form; the medium's placeholder goes in the turn
    that carried it, the question's when none did); with `raw` (text only: OpenAI's
    /v1/completions) the question is the whole prompt."""
    if raw:
        return question
    held = any(t.media for t in history)

    def content(text: str, media: bool) -> list[dict]:
        return ([{"type": modality}] if media and modality != "text" else []) + [{"type": "text", "text": text}]

    messages = [{"role": t.role, "content": content(t.text, t.media)} for t in history]
    messages.append({"role": "user", "content": content(question, not held)})
    return tokenizer.apply_chat_template(
        messages, chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
    )


def media_token_count(processor, modality: str, frames: int = 1) -> int:
    """How many placeholder tokens one image or video expands to (as VideoLlavaProcessor counts)."""
    if modality == "text":
        return 0
    crop = processor.image_processor.crop_size
    per_frame = (crop["height"] // processor.patch_size) * (crop["width"] // processor.patch_size)
    per_frame += processor.num_additional_image_tokens
    if modality == "image":
        return per_frame - (processor.vision_feature_select_strategy == "default")
    return per_frame * frames


def encode(
    processor,
    modality: str,
    question: str,
    answer: str | None = None,
    frames: int = 1,
    raw: bool = False,
    history: Sequence[Turn] = (),
) -> dict:
    """Token ids (media placeholders expanded) and labels with the prompt masked to -100."""
    tok = processor.tokenizer
    media = {"image": processor.image_token, "video": processor.video_token}.get(modality, "")
    text = prompt_text(tok, modality, question, raw, history)
    if media:
        text = text.replace(media, media * media_token_count(processor, modality, frames), 1)
    prompt_ids = tok(text, add_special_tokens=False).input_ids
    if answer is None:
        return {"input_ids": prompt_ids, "labels": [IGNORE] * len(prompt_ids)}
    answer_ids = tok(" " + answer.strip(), add_special_tokens=False).input_ids + [tok.eos_token_id]
    return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE] * len(prompt_ids) + answer_ids}


def prompt_ids(tokenizer, modality: str, question: str, raw: bool = False, history: Sequence[Turn] = ()) -> list[int]:
    """The prompt's token ids with one placeholder per image or video, unexpanded: what engines that
    expand placeholders themselves (vLLM) take; `encode` gives the same ids expanded."""
    return tokenizer(prompt_text(tokenizer, modality, question, raw, history), add_special_tokens=False).input_ids


def pixel_inputs(processor, modality: str, pixels: list[np.ndarray]) -> dict:
    """Model pixel inputs for a batch: one HxWx3 uint8 array per image, or TxHxWx3 per video."""
    # Ray hands arrays over read-only (zero-copy), and torch.from_numpy warns on those: copy just them.
    pixels = [p.copy() if isinstance(p, np.ndarray) and not p.flags.writeable else p for p in pixels]
    if modality == "image":
        out = processor.image_processor(images=pixels, return_tensors="pt", return_legacy_image_output=False)
        return {"pixel_values": out["pixel_values"]}
    if modality == "video":
        return {
            "pixel_values_videos": processor.video_processor(videos=pixels, return_tensors="pt")["pixel_values_videos"]
        }
    return {}


def pad_batch(rows: list[dict], pad_id: int) -> dict:
    """Left-pad (generation appends on the right) ids, mask and labels into tensors."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, width - n :] = torch.tensor(r["input_ids"])  # a copy: Ray Data's arrays are read-only
        mask[i, width - n :] = 1
        labels[i, width - n :] = torch.tensor(r["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
