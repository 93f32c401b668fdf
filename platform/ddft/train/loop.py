"""The per-worker LoRA training loop run by Ray Train, top to bottom:
setup (base + LoRA + optimizer), train (streaming the prepared shard), checkpoint, report."""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PROJECTOR = "multi_modal_projector"


def lora_model(model, lora: dict, modality: str):
    """Wrap the base with LoRA on the language model (and the projector trained fully)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=lora["target_modules"], task_type="CAUSAL_LM",
                        modules_to_save=[PROJECTOR] if lora["train_projector"] and modality != "text" else None)
    return get_peft_model(model, config)


def param_groups(model, optim: dict) -> list[dict]:
    proj, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (proj if PROJECTOR in name else rest).append(p)
    groups = [{"params": rest, "lr": optim["lr"]}]
    if proj:
        groups.append({"params": proj, "lr": optim["projector_lr"]})
    return groups


def collate(rows: dict, processor, modality: str) -> dict:
    """A numpy batch of prepared rows -> model inputs (left-padded, pixels normalized)."""
    from ddft.prompts import pad_batch, pixel_inputs

    n = len(rows["input_ids"])
    batch = pad_batch([{"input_ids": rows["input_ids"][i], "labels": rows["labels"][i]} for i in range(n)],
                      processor.tokenizer.pad_token_id)
    if modality != "text":
        pixels = [np.frombuffer(rows["pixels"][i], dtype=np.uint8).reshape(rows["pixel_shape"][i])
                  for i in range(n)]
        batch.update(pixel_inputs(processor, modality, pixels))
    return batch


def _save(model, out: Path, state: dict) -> None:
    unwrapped = model.module if hasattr(model, "module") else model
    unwrapped.save_pretrained(out / "adapter", safe_serialization=True)
    (out / "train_state.json").write_text(json.dumps(state, indent=2))


def train_loop(cfg: dict) -> None:
    import ray.train
    import ray.train.torch
    from transformers import get_cosine_schedule_with_warmup

    from ddft.models.load import load_base, local_base_dir
    from ddft.store import Store

    # --- setup ---
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    optim, modality = cfg["optim"], cfg["modality"]
    torch.manual_seed(optim["seed"] + rank)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    store = Store(**cfg["store"])
    dtype = torch.bfloat16 if cfg["precision"] == "bf16" else torch.float32
    base, processor = load_base(local_base_dir(store, cfg["base_id"]), dtype=dtype)
    if cfg["gradient_checkpointing"]:
        base.gradient_checkpointing_enable()
    model = lora_model(base, cfg["lora"], modality)
    optimizer = torch.optim.AdamW(param_groups(model, optim), weight_decay=optim["weight_decay"])
    model = ray.train.torch.prepare_model(model)  # DDP over gloo/nccl when world > 1
    device = ray.train.torch.get_device()
    per_epoch = math.ceil(cfg["num_rows"] / (optim["batch_size"] * optim["grad_accum"] * world))
    total = optim["max_steps"] or optim["epochs"] * per_epoch
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(optim["warmup_ratio"] * total), total)
    shard = ray.train.get_dataset_shard("train")

    # --- train ---
    step, micro, history, tokens, t0 = 0, 0, [], 0, time.time()
    model.train()
    while step < total:
        for rows in shard.iter_batches(batch_size=optim["batch_size"], batch_format="numpy"):
            batch = {k: v.to(device) for k, v in collate(rows, processor, modality).items()}
            loss = model(**batch).loss
            (loss / optim["grad_accum"]).backward()
            tokens += int((batch["labels"] != -100).sum())
            micro += 1
            if micro % optim["grad_accum"]:
                continue
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            history.append(round(loss.item(), 5))
            metrics = {"step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                       "tokens_per_s": tokens / (time.time() - t0)}
            every = optim["checkpoint_every"]
            if (every and step % every == 0) or step == total:
                # --- checkpoint: rank 0 writes, every rank reports (report is a barrier) ---
                with tempfile.TemporaryDirectory() as tmp:
                    checkpoint = None
                    if rank == 0:
                        _save(model, Path(tmp), {"step": step, "total_steps": total, "losses": history,
                                                 "tokens": tokens, "seconds": time.time() - t0})
                        checkpoint = ray.train.Checkpoint.from_directory(tmp)
                    ray.train.report(metrics, checkpoint=checkpoint)
            else:
                ray.train.report(metrics)
            if step >= total:
                break
