"""`ddft plan`: the memory each model replica and each training worker will take on its device, item
by item, and whether it fits, before anything starts (torch-free: from the base's config.json).

The items follow what the engines and the trainer allocate:
- weights: every parameter (both vision towers, the projector, the language model) in the dtype
  they are served (serve.dtype) or trained (the job's precision) in;
- vLLM's LoRA slots: serve.vllm.max_loras slots allocated up front, each at max_lora_rank for every
  Linear layer of the language model, its token embedding and its LM head (vLLM wraps them all,
  whatever an adapter targets);
- projector copies: adapters that train the projector bring their own (vLLM's plugin keeps up to
  PROJECTORS_ON_DEVICE on the device; the hf engine one per resident adapter);
- the KV cache: 2 x layers x KV heads x head size per token, for one request at max_model_len
  (what vLLM needs to start) and for max_num_seqs of them (what full concurrency needs); the hf
  engine's serve.max_cached_tokens;
- training: trainable parameters with their gradients and Adam's two moments (fp32), the
  activations of one step (with gradient checkpointing: each layer's input kept, one layer's
  working set recomputed at a time) and the fp32 logits with their gradient.

Estimates of activations are marked as such; the rest is exact arithmetic over the shapes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources

from ddft.config import JOINT, JobConfig, ServeSettings
from ddft.engines.vllm_plugin import PROJECTORS_ON_DEVICE

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp32": 4, "bf16": 2}
VLLM_BATCHED_TOKENS = 8192  # vLLM's default max_num_batched_tokens on a GPU: its profile run's step
TEXT_TOKENS = 512  # a training sample's text (prompt + answer) beside its media tokens, at most
ANSWER_TOKENS = {"image": 32, "video": 512, "text": 256}


@dataclass(frozen=True)
class Arch:
    """A base's shape: what the plan needs of its config.json."""

    id: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    image_size: int
    patch: int

    @classmethod
    def of(cls, base_id: str, config: dict) -> Arch:
        t, v = config["text_config"], config["vision_config"]
        heads = t["num_attention_heads"]
        return cls(
            id=base_id,
            layers=t["num_hidden_layers"],
            hidden=t["hidden_size"],
            heads=heads,
            kv_heads=t.get("num_key_value_heads", heads),
            head_dim=t.get("head_dim") or t["hidden_size"] // heads,
            intermediate=t["intermediate_size"],
            vocab=t["vocab_size"],
            tied=bool(t.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
            vision_hidden=v["hidden_size"],
            vision_intermediate=v["intermediate_size"],
            vision_layers=v["num_hidden_layers"],
            image_size=v["image_size"],
            patch=v["patch_size"],
        )

    def lm_linears(self) -> dict[str, tuple[int, int]]:
        """One layer's Linear layers (in, out): what LoRA may target."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def lm_params(self) -> int:
        per_layer = sum(a * b for a, b in self.lm_linears().values()) + 2 * self.hidden
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * per_layer + self.hidden

    @property
    def frame_tokens(self) -> int:
        """Tokens one video frame becomes (patches and the class token)."""
        return (self.image_size // self.patch) ** 2 + 1

    @property
    def tower_params(self) -> int:
        """One CLIP vision tower (Video-LLaVA has two: images and videos)."""
        h, i = self.vision_hidden, self.vision_intermediate
        embeddings = 3 * self.patch**2 * h + h + self.frame_tokens * h + 2 * h
        layer = 4 * (h * h + h) + 4 * h + (h * i + i) + (i * h + h)
        return embeddings + self.vision_layers * layer + 2 * h

    @property
    def projector_params(self) -> int:
        return self.vision_hidden * self.hidden + self.hidden + self.hidden * self.hidden + self.hidden

    @property
    def params(self) -> int:
        return self.lm_params + 2 * self.tower_params + self.projector_params

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def vllm_slot_bytes(self, rank: int, dtype_bytes: int) -> int:
        """One of vLLM's LoRA slots: every Linear layer at `rank`, and the token embedding and the
        LM head too (vLLM wraps both; measured in its worker: tests/test_plan.py)."""
        return self.lora_bytes(rank, dtype_bytes) + 2 * rank * (self.vocab + self.hidden) * dtype_bytes

    def lora_bytes(self, rank: int, dtype_bytes: int, targets: set[str] | None = None) -> int:
        """One adapter's LoRA weights at `rank` on `targets` (every Linear layer when None)."""
        dims = sum(a + b for name, (a, b) in self.lm_linears().items() if targets is None or name in targets)
        return self.layers * rank * dims * dtype_bytes


def known_config(base_id: str) -> dict | None:
    """A published base's config.json shipped with ddft (models/known/<id>.json), for planning a base
    that is not in the store yet (the 7B before its import)."""
    path = resources.files("ddft.models").joinpath("known", f"{base_id}.json")
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass
class Item:
    name: str
    bytes: int
    note: str = ""


@dataclass
class Plan:
    what: str  # "serve replica (vllm on cuda, bfloat16)", "train job video (per worker, ...)"
    items: list[Item]
    budget: int | None = None  # bytes available on the device; None: not known
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(i.bytes for i in self.items)

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.total <= self.budget

    def lines(self) -> list[str]:
        out = [f"{self.what}"]
        out += [f"  {i.name:<34} {i.bytes / GIB:8.2f} GiB  {i.note}".rstrip() for i in self.items]
        verdict = (
            ""
            if self.budget is None
            else f" of {self.budget / GIB:.2f} GiB: " + ("fits" if self.fits else "DOES NOT FIT")
        )
        out.append(f"  {'total':<34} {self.total / GIB:8.2f} GiB{verdict}")
        out += [f"  - {n}" for n in self.notes]
        return out


def _targets(job: JobConfig) -> set[str]:
    """The Linear layers a job's LoRA targets (its regex over the language model's names)."""
    import re

    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    pattern = re.compile(job.lora.target_modules)
    return {
        n
        for n in names
        if pattern.fullmatch(f"model.language_model.layers.0.self_attn.{n}")
        or pattern.fullmatch(f"model.language_model.layers.0.mlp.{n}")
    }


def _layer_activations(arch: Arch, tokens: int, dtype_bytes: int) -> int:
    """What one decoder layer keeps for its backward, for `tokens` (batch x seq): its input, the
    norms', q/k/v, the attention's output and the MLP's four I-wide tensors (6h + 2kv + 4I values
    a token). SDPA's fused kernels keep no seq x seq scores, so there is no such term. Measured on
    the embedded base (fp32, CPU, no checkpointing): 63 bytes per hidden unit a token a layer,
    against 69 from this count (tests/test_plan.py holds whole steps to their plan)."""
    per_token = 6 * arch.hidden + 2 * arch.kv_heads * arch.head_dim + 4 * arch.intermediate
    return tokens * per_token * dtype_bytes


def serve_plan(s: ServeSettings, arch: Arch, lora_rank: int, budget: int | None) -> Plan:
    """One model replica of `s` (its engine, device and dtype)."""
    b = DTYPE_BYTES[s.torch_dtype]
    kv = arch.kv_bytes_per_token(b)
    resident = s.adapter_cache_size
    items = [Item("weights", arch.params * b, f"{arch.params / 1e9:.2f}B parameters in {s.torch_dtype}")]
    notes = []
    if s.engine == "vllm":
        v = s.vllm
        slots = min(v.max_loras, resident)
        items += [
            Item(
                "LoRA slots",
                slots * arch.vllm_slot_bytes(lora_rank, b),
                f"{slots} x rank {lora_rank}: every Linear, the embedding, the LM head",
            ),
            Item(
                "projector copies",
                min(PROJECTORS_ON_DEVICE, resident) * arch.projector_params * b,
                f"up to {min(PROJECTORS_ON_DEVICE, resident)} adapters' own projectors",
            ),
            Item(
                "activations (estimate)",
                VLLM_BATCHED_TOKENS * (2 * arch.hidden + 2 * arch.intermediate) * b + v.max_num_seqs * arch.vocab * 4,
                f"one step of {VLLM_BATCHED_TOKENS} tokens, fp32 logits of {v.max_num_seqs} requests",
            ),
        ]
        if s.device == "cuda":
            items.append(Item("KV cache, one request", v.max_model_len * kv, f"{v.max_model_len} tokens"))
            full = v.max_num_seqs * v.max_model_len * kv
            notes.append(
                f"KV cache for {v.max_num_seqs} requests at max_model_len: {full / GIB:.2f} GiB; vLLM takes "
                f"gpu_memory_utilization {v.gpu_memory_utilization} of the GPU and gives the rest to the cache"
            )
            if budget is not None:
                budget = int(budget * v.gpu_memory_utilization)
                room = budget - sum(i.bytes for i in items) + v.max_model_len * kv
                notes.append(
                    f"room for {max(room, 0) // kv:,} KV tokens: {max(room, 0) / (v.max_model_len * kv):.1f} "
                    f"requests at max_model_len at once"
                )
        else:
            items.append(Item("KV cache", v.kv_cache_gib * GIB, "serve.vllm.kv_cache_gib (VLLM_CPU_KVCACHE_SPACE)"))
    else:
        items += [
            Item(
                "resident adapters",
                resident * arch.lora_bytes(lora_rank, b),
                f"{resident} x rank {lora_rank} at most, every Linear",
            ),
            Item("projector copies", resident * arch.projector_params * b, "one per resident adapter, at most"),
            Item("KV cache", s.max_cached_tokens * kv, f"serve.max_cached_tokens {s.max_cached_tokens}"),
        ]
        video = 8 * arch.frame_tokens + 128
        items.append(
            Item(
                "activations (estimate)",
                _layer_activations(arch, s.max_batch_size * video, b),
                f"one layer of a prefill of {s.max_batch_size} videos",
            )
        )
    return Plan(f"serve replica ({s.engine} on {s.device}, {s.torch_dtype})", items, budget, notes)


def train_plan(job: JobConfig, arch: Arch, frames: int, budget: int | None, seq: int | None = None) -> Plan:
    """One training worker of `job`: weights, what trains, and one step's activations (samples of
    `seq` tokens; by default its media's tokens and TEXT_TOKENS of text)."""
    b = DTYPE_BYTES[job.precision]
    targets = _targets(job)
    lora = arch.lora_bytes(job.lora.r, 4, targets)  # fp32 (PEFT keeps adapters in fp32)
    items = [
        Item("weights (frozen)", arch.params * b, f"{arch.params / 1e9:.2f}B parameters in {job.precision}"),
        Item("LoRA + gradients + Adam", lora * 4, f"rank {job.lora.r} on {', '.join(sorted(targets))}, fp32"),
    ]
    if job.lora.train_projector and job.modality != "text":
        items.append(Item("projector + gradients + Adam", arch.projector_params * b * 4, "trained in full"))
    media = {"image": arch.frame_tokens - 1, "video": frames * arch.frame_tokens, "text": 0}
    kind = "video" if job.modality == JOINT else job.modality
    seq = seq or media[kind] + TEXT_TOKENS
    batch = job.optim.batch_size
    tokens = batch * seq
    layer = _layer_activations(arch, tokens, b)
    if job.gradient_checkpointing:
        acts = arch.layers * tokens * arch.hidden * b + layer
        how = f"{arch.layers} layers' inputs kept, one layer recomputed"
    else:
        acts = arch.layers * layer
        how = f"{arch.layers} layers' working sets"
    items.append(Item("activations", acts, f"batch {batch} x {seq} tokens: {how}"))
    items.append(Item("logits and their gradient", 2 * tokens * arch.vocab * 4, f"fp32, vocab {arch.vocab}"))
    return Plan(f"train job {job.name} (per worker, {job.precision})", items, budget)


def arch_of(store, base_id: str) -> Arch:
    """The base's shape: its config.json in the store, else a known base's (models/known/)."""
    from ddft.errors import NotFound
    from ddft.models.info import model_key
    from ddft.store import StoreError

    key = f"{model_key(base_id)}/config.json"
    try:
        config = store.read_json(key) if store.exists(key) else known_config(base_id)
    except StoreError:  # a store this machine can't reach (the cluster's bucket): a known shape still plans
        config = known_config(base_id)
        if config is None:
            raise
    if config is None:
        raise NotFound(
            f"base {base_id!r} is not in the store at {store.url(model_key(base_id))} and its shape is not known "
            "here: put the base in the store first (ddft base build)",
            "unknown_base",
        )
    return Arch.of(base_id, config)


def device_bytes(device: str, gpu_memory_gib: float | None, share: float = 1.0) -> int | None:
    """What a worker may use: `gpu_memory_gib` (or this machine's GPU) x its share of a GPU; on a
    CPU, this machine's memory; None when not known."""
    if device == "cuda":
        if gpu_memory_gib is None:
            try:
                import torch

                if not torch.cuda.is_available():
                    return None
                gpu_memory_gib = torch.cuda.get_device_properties(0).total_memory / GIB
            except ImportError:
                return None
        return int(gpu_memory_gib * GIB * share)
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plans(
    cfg, store, gpu_memory_gib: float | None = None, adapter_ranks=(), serve: bool = True, jobs=None
) -> list[Plan]:
    """Every replica's and training worker's plan a config describes (its serve part unless `serve`
    is False, and its jobs: those named in `jobs`, else all)."""
    from ddft.engines.base import serve_options

    arch = arch_of(store, cfg.base.id)
    out = []
    if serve and getattr(cfg, "serve", None) is not None:
        s = cfg.serve
        rank = serve_options(cfg, "vllm", adapter_ranks)["max_lora_rank"]
        out.append(serve_plan(s, arch, rank, device_bytes(s.device, gpu_memory_gib, s.gpus_per_replica or 1)))
    for job in getattr(cfg, "jobs", None) or []:
        if jobs is not None and job.name not in jobs:
            continue
        gpus = job.resources.gpus_per_worker
        budget = device_bytes("cuda" if gpus > 0 else "cpu", gpu_memory_gib, gpus or 1)
        out.append(train_plan(job, arch, cfg.data.frames, budget))
    return out


def check(cfg, store, gpu_memory_gib: float | None = None, **which) -> list[Plan]:
    """The plans (`which`: plans' adapter_ranks, serve, jobs), or ConfigError with every plan that
    cannot fit (its lines and the fix): what `ddft serve` and `ddft train` refuse to start."""
    from ddft.config import ConfigError

    made = plans(cfg, store, gpu_memory_gib, **which)
    short = [p for p in made if p.fits is False]
    if short:
        lines = [line for p in short for line in p.lines()]
        lines.append(
            "lower what the largest items come from (serve.vllm.max_loras, max_num_seqs, max_model_len, "
            "adapter_cache_size, max_cached_tokens; a job's batch_size, gradient_checkpointing, precision), "
            "or give each more GPU memory"
        )
        raise ConfigError("plan: does not fit", lines)
    return made
