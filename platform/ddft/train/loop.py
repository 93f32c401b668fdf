"""The per-worker LoRA training loop run by Ray Train, top to bottom:
setup (base + LoRA + optimizer, or resume from the latest checkpoint), train (streaming the
prepared shard), validate each epoch, checkpoint (adapter + optimizer + scheduler + data
position), report."""

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


def lora_model(model, lora: dict, modality: str, gradient_checkpointing: bool = False):
    """Wrap the base with LoRA on the language model (and the projector trained fully).

    Gradient checkpointing is non-reentrant: the reentrant kind gives no gradients to adapters
    behind a frozen embedding (their checkpointed inputs don't require grad)."""
    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
        task_type="CAUSAL_LM",
        modules_to_save=[PROJECTOR] if lora["train_projector"] and modality != "text" else None,
    )
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


def collate(rows: dict, processor) -> dict:
    """A numpy batch of prepared rows -> model inputs (left-padded, pixels normalized).
    Rows may mix modalities (the joint job): each row's pixel_shape says which it is."""
    from ddft.prompts import pad_batch, pixel_inputs

    n = len(rows["input_ids"])
    batch = pad_batch(
        [{"input_ids": rows["input_ids"][i], "labels": rows["labels"][i]} for i in range(n)],
        processor.tokenizer.pad_token_id,
    )
    media: dict[str, list] = {"image": [], "video": []}
    for i in range(n):
        shape = list(rows["pixel_shape"][i])
        if shape:  # HxWx3 image, TxHxWx3 video; text rows have none
            media["image" if len(shape) == 3 else "video"].append(
                np.frombuffer(rows["pixels"][i], dtype=np.uint8).reshape(shape)
            )
    for modality, pixels in media.items():
        if pixels:
            batch.update(pixel_inputs(processor, modality, pixels))
    return batch


def new_state() -> dict:
    # `position` = micro-batches of the current epoch already trained on (the data position).
    return {
        "step": 0,
        "epoch": 0,
        "position": 0,
        "micro": 0,
        "tokens": 0,
        "seconds": 0.0,
        "losses": [],
        "val_losses": [],
        "history": [],
        "resumed_from": [],
    }


def rng_state() -> dict:
    """Every random generator a step may draw from (dropout: torch's, on CPU and on each GPU)."""
    import random

    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": json.dumps(random.getstate()),
    }


def set_rng_state(saved: dict) -> None:
    import random

    torch.set_rng_state(saved["torch"])
    if saved["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])
    kind, keys, *rest = saved["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = json.loads(saved["python"])
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(model, optimizer, scheduler, out: Path, state: dict) -> None:
    """Everything needed to go on exactly where training stopped: the same weights, optimizer
    moments, schedule, data position and random streams as if it never had."""
    model.save_pretrained(out / "adapter", safe_serialization=True)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
        out / "optimizer.pt",
    )
    (out / "train_state.json").write_text(json.dumps(state, indent=2))


def load_checkpoint(model, optimizer, scheduler, ckpt: Path) -> dict:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(ckpt / "adapter" / "adapter_model.safetensors"))
    extra = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)  # tensors only: no code
    optimizer.load_state_dict(extra["optimizer"])  # moves state to each parameter's device
    scheduler.load_state_dict(extra["scheduler"])
    set_rng_state(extra["rng"])
    return json.loads((ckpt / "train_state.json").read_text())


def validation_loss(model, shard, processor, device, batch_size: int, world: int) -> float | None:
    """Mean loss per answer token over this worker's val shard, averaged over all workers."""
    if shard is None:
        return None
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for rows in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
            batch = {k: v.to(device) for k, v in collate(rows, processor).items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            total, count = total + model(**batch).loss.item() * n, count + n
    model.train()
    sums = torch.tensor([total, float(count)], dtype=torch.float64)
    if world > 1:
        torch.distributed.all_reduce(sums)
    return float(sums[0] / sums[1]) if sums[1] else None


def train_loop(cfg: dict) -> None:
    import ray.train
    import ray.train.torch
    from transformers import get_cosine_schedule_with_warmup

    from ddft.models.load import load_base, local_base_dir
    from ddft.store import Store
    from ddft.train.telemetry import TrainMetrics

    # --- setup ---
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    optim, modality = cfg["optim"], cfg["modality"]
    torch.manual_seed(optim["seed"] + rank)
    torch.set_num_threads(cfg.get("torch_threads") or max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    store = Store(**cfg["store"])
    dtype = torch.bfloat16 if cfg["precision"] == "bf16" else torch.float32
    base, processor = load_base(local_base_dir(store, cfg["base_id"]), dtype=dtype)
    model = lora_model(base, cfg["lora"], modality, cfg["gradient_checkpointing"])
    peft_model = model
    optimizer = torch.optim.AdamW(param_groups(model, optim), weight_decay=optim["weight_decay"])
    model = ray.train.torch.prepare_model(model)  # to the device; DDP over gloo/nccl when world > 1
    device = ray.train.torch.get_device()
    per_epoch = math.ceil(cfg["num_rows"] / (optim["batch_size"] * optim["grad_accum"] * world))
    total = optim["max_steps"] or optim["epochs"] * per_epoch
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(optim["warmup_ratio"] * total), total)
    state = new_state()
    latest = ray.train.get_checkpoint()  # set when Ray Train restarts us after a failure
    if latest:
        with latest.as_directory() as ckpt:
            state = load_checkpoint(peft_model, optimizer, scheduler, Path(ckpt))
        state["resumed_from"].append(state["step"])
    shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if cfg["has_val"] else None

    def report(metrics: dict, checkpoint: bool) -> None:
        """Rank 0 writes the checkpoint and the Prometheus gauges; every rank reports (a barrier)."""
        if telemetry:
            telemetry.publish(metrics)
        if not checkpoint:
            return ray.train.report(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                save_checkpoint(peft_model, optimizer, scheduler, Path(tmp), state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)

    pending: dict = {}  # metrics waiting for the next report
    telemetry = TrainMetrics() if rank == 0 else None

    def validate() -> None:
        loss = validation_loss(model, val_shard, processor, device, optim["batch_size"], world)
        if loss is not None:
            state["val_losses"].append({"epoch": state["epoch"], "step": state["step"], "loss": round(loss, 5)})
            pending["val_loss"] = loss

    # --- train ---
    model.train()
    while state["step"] < total:
        started = time.time()
        for i, rows in enumerate(shard.iter_batches(batch_size=optim["batch_size"], batch_format="numpy")):
            if i < state["position"]:
                continue  # trained on before the restart
            batch = {k: v.to(device) for k, v in collate(rows, processor).items()}
            loss = model(**batch).loss
            (loss / optim["grad_accum"]).backward()
            state["tokens"] += int(batch["attention_mask"].sum())  # tokens processed: prompt, media, answer
            state["position"], state["micro"] = i + 1, state["micro"] + 1
            if state["micro"] % optim["grad_accum"]:
                continue
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["seconds"] += time.time() - started
            started = time.time()
            state["losses"].append(round(loss.item(), 5))
            state["history"].append(
                {"step": state["step"], "tokens": state["tokens"], "seconds": round(state["seconds"], 4)}
            )
            done = state["step"] >= total
            if done:
                validate()
            every = optim["checkpoint_every"]
            checkpoint = done or bool(every and state["step"] % every == 0)
            if checkpoint or state["step"] % optim["report_every"] == 0:
                # Same steps on every rank: report is a barrier across the workers.
                report(
                    {
                        "step": state["step"],
                        "epoch": state["epoch"],
                        "loss": loss.item(),
                        "lr": scheduler.get_last_lr()[0],
                        "tokens": state["tokens"],
                        "tokens_per_s": state["tokens"] / max(state["seconds"], 1e-9),
                        **pending,
                    },
                    checkpoint,
                )
                pending.clear()
            if done:
                break
        else:  # a full pass over the data: the epoch ends with a validation loss
            state["epoch"], state["position"] = state["epoch"] + 1, 0
            validate()
