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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ddft.config import LoraSettings, OptimSettings, StoreConfig

PROJECTOR = "multi_modal_projector"


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a Ray Train worker needs; it crosses the process boundary pickled, as typed values."""

    store: StoreConfig  # with an absolute uri: workers run elsewhere
    base_id: str
    modality: str
    num_rows: int  # train rows of the whole job: the steps of an epoch follow from it
    has_val: bool
    lora: LoraSettings
    optim: OptimSettings
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    torch_threads: int | None = None

    def total_steps(self, world: int) -> int:
        o = self.optim
        return o.max_steps or o.epochs * math.ceil(self.num_rows / (o.batch_size * o.grad_accum * world))


def lora_model(model, lora: LoraSettings, modality: str, gradient_checkpointing: bool = False):
    """Wrap the base with LoRA on the language model (and the projector trained fully).

    Gradient checkpointing is non-reentrant: the reentrant kind gives no gradients to adapters
    behind a frozen embedding (their checkpointed inputs don't require grad)."""
    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
        modules_to_save=[PROJECTOR] if lora.train_projector and modality != "text" else None,
    )
    return get_peft_model(model, config)


def param_groups(model, optim: OptimSettings) -> list[dict]:
    proj, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (proj if PROJECTOR in name else rest).append(p)
    groups = [{"params": rest, "lr": optim.lr}]
    if proj:
        groups.append({"params": proj, "lr": optim.projector_lr})
    return groups


def optimizer_for(model, optim: OptimSettings, total_steps: int):
    """AdamW over the LoRA (and projector) parameters with a warmup + cosine schedule."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(param_groups(model, optim), weight_decay=optim.weight_decay)
    return optimizer, get_cosine_schedule_with_warmup(
        optimizer, math.ceil(optim.warmup_ratio * total_steps), total_steps
    )


def accumulate(model, batch: dict, grad_accum: int) -> tuple[torch.Tensor, int]:
    """One micro-batch: forward and backward (the gradient scaled for accumulation); returns the
    loss and the tokens processed (prompt, media placeholders and answer)."""
    loss = model(**batch).loss
    (loss / grad_accum).backward()
    return loss, int(batch["attention_mask"].sum())


def optimizer_step(optimizer, scheduler) -> None:
    """The end of a step: clip, update, advance the schedule, clear the gradients."""
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


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


@dataclass
class TrainState:
    """Where a run is; saved with every checkpoint as train_state.json (the job and the bench read it)."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # micro-batches of the current epoch already trained on (the data position)
    micro: int = 0
    tokens: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    val_losses: list[dict] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)  # per step: {step, tokens, seconds}
    resumed_from: list[int] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)  # the Ray node rank 0 ran on, at the start and after each restart


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


def save_checkpoint(model, optimizer, scheduler, out: Path, state: TrainState) -> None:
    """Everything needed to go on exactly where training stopped: the same weights, optimizer
    moments, schedule, data position and random streams as if it never had."""
    model.save_pretrained(out / "adapter", safe_serialization=True)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
        out / "optimizer.pt",
    )
    (out / "train_state.json").write_text(json.dumps(asdict(state), indent=2))


def load_checkpoint(model, optimizer, scheduler, ckpt: Path) -> TrainState:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(ckpt / "adapter" / "adapter_model.safetensors"))
    extra = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)  # tensors only: no code
    optimizer.load_state_dict(extra["optimizer"])  # moves state to each parameter's device
    scheduler.load_state_dict(extra["scheduler"])
    set_rng_state(extra["rng"])
    return TrainState(**json.loads((ckpt / "train_state.json").read_text()))


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


def train_loop(cfg: WorkerConfig) -> None:
    """One Ray Train worker: setup (or resume), then steps over its data shard with a validation
    loss at each epoch's end, reports and checkpoints on the configured steps."""
    import ray.train
    import ray.train.torch

    from ddft.models.load import load_base, local_base_dir
    from ddft.store import Store
    from ddft.train.telemetry import TrainMetrics

    # --- setup ---
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    optim = cfg.optim
    torch.manual_seed(optim.seed + rank)
    torch.set_num_threads(cfg.torch_threads or max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    store = Store.from_config(cfg.store)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    base, processor = load_base(local_base_dir(store, cfg.base_id), dtype=dtype)
    peft_model = lora_model(base, cfg.lora, cfg.modality, cfg.gradient_checkpointing)
    total = cfg.total_steps(world)
    optimizer, scheduler = optimizer_for(peft_model, optim, total)
    model = ray.train.torch.prepare_model(peft_model)  # to the device; DDP over gloo/nccl when world > 1
    device = ray.train.torch.get_device()
    state = TrainState()
    latest = ray.train.get_checkpoint()  # set when Ray Train restarts us after a failure
    if latest:
        with latest.as_directory() as ckpt:
            state = load_checkpoint(peft_model, optimizer, scheduler, Path(ckpt))
        state.resumed_from.append(state.step)
    state.nodes.append(ray.get_runtime_context().get_node_id())
    shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if cfg.has_val else None
    telemetry = TrainMetrics() if rank == 0 else None
    pending: dict = {}  # metrics waiting for the next report

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

    def validate() -> None:
        loss = validation_loss(model, val_shard, processor, device, optim.batch_size, world)
        if loss is not None:
            state.val_losses.append({"epoch": state.epoch, "step": state.step, "loss": round(loss, 5)})
            pending["val_loss"] = loss

    # --- train ---
    model.train()
    while state.step < total:
        started = time.time()
        for i, rows in enumerate(shard.iter_batches(batch_size=optim.batch_size, batch_format="numpy")):
            if i < state.position:
                continue  # trained on before the restart
            batch = {k: v.to(device) for k, v in collate(rows, processor).items()}
            loss, tokens = accumulate(model, batch, optim.grad_accum)
            state.tokens += tokens
            state.position, state.micro = i + 1, state.micro + 1
            if state.micro % optim.grad_accum:
                continue
            optimizer_step(optimizer, scheduler)
            state.step += 1
            state.seconds += time.time() - started
            started = time.time()
            state.losses.append(round(loss.item(), 5))
            state.history.append({"step": state.step, "tokens": state.tokens, "seconds": round(state.seconds, 4)})
            done = state.step >= total
            if done:
                validate()
            every = optim.checkpoint_every
            checkpoint = done or bool(every and state.step % every == 0)
            if checkpoint or state.step % optim.report_every == 0:
                # Same steps on every rank: report is a barrier across the workers.
                metrics = {
                    "step": state.step,
                    "epoch": state.epoch,
                    "loss": loss.item(),
                    "lr": scheduler.get_last_lr()[0],
                    "tokens": state.tokens,
                    "tokens_per_s": state.tokens / max(state.seconds, 1e-9),
                }
                report(metrics | pending, checkpoint)
                pending.clear()
            if done:
                break
        else:  # a full pass over the data: the epoch ends with a validation loss
            state.epoch, state.position = state.epoch + 1, 0
            validate()
