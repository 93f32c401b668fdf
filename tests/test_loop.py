"""Pieces of the training loop, without Ray: mixed-modality batches (the joint job), gradient
checkpointing that still reaches the adapters, and checkpoints that restore exactly."""

import numpy as np
import pytest
import torch

from ddft.config import LM_TARGETS, LoraSettings, OptimSettings
from ddft.models.build import build_tiny
from ddft.prompts import encode
from ddft.train.loop import TrainState, collate, load_checkpoint, lora_model, param_groups, save_checkpoint

LORA = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=LM_TARGETS, train_projector=True)


def _rows(processor):
    """Prepared-row columns for one image, one video and one text sample."""
    rng = np.random.default_rng(0)
    image, video = rng.integers(0, 255, (224, 224, 3), np.uint8), rng.integers(0, 255, (2, 224, 224, 3), np.uint8)
    rows = {"input_ids": [], "labels": [], "pixels": [], "pixel_shape": []}
    for modality, pixels in (("image", image), ("video", video), ("text", None)):
        ids = encode(processor, modality, "What is it?", "soup", frames=2)
        rows["input_ids"].append(np.array(ids["input_ids"]))
        rows["labels"].append(np.array(ids["labels"]))
        rows["pixels"].append(pixels.tobytes() if pixels is not None else None)
        rows["pixel_shape"].append(np.array(pixels.shape if pixels is not None else [], dtype=np.int32))
    return rows


@pytest.fixture(scope="module")
def tiny():
    return build_tiny()


def test_a_batch_can_mix_image_video_and_text_rows(tiny):
    model, processor = tiny
    batch = collate(_rows(processor), processor)
    assert batch["pixel_values"].shape[0] == 1 and batch["pixel_values_videos"].shape[:2] == (1, 2)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_gradient_checkpointing_still_trains_the_adapters(tiny):
    model, processor = build_tiny()
    peft_model = lora_model(model, LORA, "image", gradient_checkpointing=True)
    peft_model.train()
    peft_model(**collate(_rows(processor), processor)).loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)  # B starts at 0, so A gets none yet


def test_a_checkpoint_restores_weights_optimizer_scheduler_and_position(tiny, tmp_path):
    from transformers import get_cosine_schedule_with_warmup

    def setup():
        model, processor = build_tiny()
        peft_model = lora_model(model, LORA, "video")
        opt = torch.optim.AdamW(param_groups(peft_model, OptimSettings(lr=1e-2, projector_lr=1e-3)))
        return peft_model, processor, opt, get_cosine_schedule_with_warmup(opt, 1, 10)

    def step(model, processor, opt, sched):
        loss = model(**collate(_rows(processor), processor)).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        return loss.item()

    a = setup()
    for _ in range(3):
        step(*a)
    state = TrainState(step=3, position=3, epoch=1)
    save_checkpoint(a[0], a[2], a[3], tmp_path, state)
    assert not any(p.suffix in (".bin", ".pt") for p in (tmp_path / "adapter").iterdir())  # adapter: safetensors
    expected = step(*a)

    b = setup()  # a fresh process after a failure: new random LoRA, fresh optimizer
    restored = load_checkpoint(b[0], b[2], b[3], tmp_path)
    assert restored == state and b[3].last_epoch == 3
    assert step(*b) == pytest.approx(expected, abs=1e-6)  # the next step is the one the lost run took
