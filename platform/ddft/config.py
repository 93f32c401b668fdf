"""One pydantic model per job and app; every YAML is validated before any Ray work starts.

A bad config is refused with every problem at once, each naming the key, the value and what
to do (the torchtune/Ray LLM convention), instead of failing deep inside a Ray worker.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ddft.adapters.ref import NAME

Modality = Literal["image", "video", "text"]
MODALITIES: tuple[str, ...] = ("image", "video", "text")
JOINT = "joint"  # one adapter trained on every modality mixed: the paper's baseline against DDFT
# LoRA goes on the language model only: plain "q_proj" would also match the CLIP towers.
STORE_ENV = "DDFT_STORE"
LM_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"


class ConfigError(ValueError):
    """A config that can't run; str() lists every problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        super().__init__(f"invalid config {source}:\n" + "\n".join(f"  - {p}" for p in problems))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StoreConfig(Strict):
    uri: str = Field("store", description="file:// path (the embedded default) or s3://bucket/prefix")
    endpoint_url: str | None = Field(
        None,
        description="S3 endpoint such as http://127.0.0.1:9000 (MinIO); defaults to AWS_ENDPOINT_URL or AWS itself",
    )
    region: str | None = None
    access_key_id: str | None = Field(None, description="defaults to AWS_ACCESS_KEY_ID / boto3's chain")
    secret_access_key: str | None = None

    @model_validator(mode="after")
    def _scheme(self):
        if "://" in self.uri and not self.uri.startswith(("file://", "s3://")):
            raise ValueError(f"store.uri {self.uri!r}: use a path, file:///abs/path or s3://bucket/prefix")
        return self


class BaseModelConfig(Strict):
    id: str = Field(description="model id; the model lives in the store under models/<id>/")
    build: Literal["embedded", "tiny"] | None = Field(
        None,
        description="build this base locally when the store lacks it: 'embedded' (SmolLM2-135M "
        "language model, small random CLIP towers) or 'tiny' (random, for tests)",
    )
    source: str | None = Field(None, description="import a real base from an HF dir, s3:// prefix or hub id")

    @model_validator(mode="after")
    def _one_origin(self):
        if self.build and self.source:
            raise ValueError("base: set either build or source, not both")
        return self


KITCHEN_DISHES = 8  # len(ddft.data.synthetic.DISHES); not imported here: that module draws with PIL and PyAV


class SyntheticConfig(Strict):
    seed: int = 0
    dishes: int = Field(6, ge=2, le=KITCHEN_DISHES, description="dishes trained on")
    held_out_dishes: int = Field(2, ge=0, le=6, description="dishes only in the held-out (test) splits")
    images_per_dish: int = Field(8, ge=2)
    recipes: int = Field(12, ge=3, description="recipe videos of the trained dishes (train and val splits)")
    held_out_videos: int = Field(2, ge=1, le=32, description="recipe videos of each held-out dish (the test split)")
    qa_pairs: int = Field(60, ge=4)

    @model_validator(mode="after")
    def _menu(self):
        if self.dishes + self.held_out_dishes > KITCHEN_DISHES:
            raise ValueError(
                f"synthetic: dishes {self.dishes} + held_out_dishes {self.held_out_dishes} is more "
                f"than the kitchen's {KITCHEN_DISHES} dishes; lower one of them"
            )
        return self


class DataConfig(Strict):
    synthetic: SyntheticConfig | None = Field(
        None, description="write the synthetic kitchen into raw_prefix before preparing"
    )
    raw_prefix: str = "datasets/raw"
    foodx: str = Field(
        "foodx251", description="FoodX-251 root under raw_prefix: official (annot/ or not), Kaggle flat or nested"
    )
    tasty: str = Field("tasty", description="Tasty Videos root under raw_prefix: the release's own root")
    tasty_split: str | None = Field(
        None, description="split set under SPLITS/ (split_2511, split_4022); unset: the one listing the most recipes"
    )
    tasty_unlisted: Literal["exclude", "train"] = Field(
        "exclude", description="a recipe no list of the split set names: left out and counted, or trained on"
    )
    qa: str = "cooking_qa/qa.jsonl"
    youcook2: str = Field(
        "youcook2",
        description="YouCook2 root under raw_prefix (the release's YouCookII/annotations/ beside "
        "YouCookII/raw_videos/<subset>/<recipe_type>/<id>.*, or those two folders, or the JSON beside "
        "raw_videos/), evaluation only; `ddft eval` says so and goes on when it is absent",
    )
    frames: int = Field(8, ge=1, le=64, description="frames sampled per video")
    frame_strategy: Literal["uniform", "keyframe", "steps"] = Field(
        "uniform",
        description="uniform (frame-accurate), keyframe (nearest keyframes: far cheaper) "
        "or steps (one frame per annotated step span, Tasty)",
    )
    step_clips: int = Field(
        0,
        ge=0,
        le=16,
        description="per training video, up to this many annotated steps (Tasty's csvalignment.dat) also become "
        "samples of their own: the step's frames -> its sentence (measured by make bench-video-read)",
    )
    workers: int = Field(2, ge=1, description="most Ray Data map actors per modality")
    cpus_per_worker: float = Field(0.5, gt=0)
    batch_size: int = Field(8, ge=1, description="samples per Ray Data map batch")
    max_skip_ratio: float = Field(0.05, ge=0, le=1, description="fail preparation above this share of bad samples")


class LoraSettings(Strict):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str = Field(LM_TARGETS, description="regex over module names (scoped to the language model)")
    train_projector: bool = Field(True, description="train the multimodal projector fully (image/video jobs)")


class OptimSettings(Strict):
    lr: float = Field(2e-4, gt=0)
    projector_lr: float = Field(2e-5, gt=0)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    batch_size: int = Field(1, ge=1, description="per worker")
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    report_every: int = Field(
        10,
        ge=1,
        description="optimizer steps between metric reports to Ray Train "
        "(each step's metrics are kept with the run either way; a report can wait up to "
        "Ray Train's 2 s poll, so reporting every step would cap a fast job)",
    )
    checkpoint_every: int = Field(
        50,
        ge=0,
        description="optimizer steps between checkpoints (adapter, optimizer, "
        "scheduler, data position) in the store; 0 = at the end only",
    )


class Resources(Strict):
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0, description="fractions let small jobs share a node")
    gpus_per_worker: float = Field(0.0, ge=0)
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads torch uses per worker; default: "
        "the worker's CPUs (fewer than cores keeps concurrent jobs from "
        "oversubscribing a small machine)",
    )
    niceness: int | None = Field(
        None,
        ge=0,
        le=19,
        description="the workers' CPU priority (Unix nice); default: Ray's (15, below its own daemons, "
        "so a busy node's daemons stay responsive); 0 ranks them with the daemons",
    )


class JobConfig(Strict):
    name: str = Field(
        pattern=NAME.pattern,
        description="lowercase letters, digits, '.', - and _ (64 at most): its adapter is published as ddft/<name>, "
        "and the job named after its modality trains the adapter that modality's requests get by default",
    )
    modality: Literal["image", "video", "text", "joint"] = Field(
        description="the modality whose data trains this adapter, or 'joint' for all of them mixed"
    )
    dataset_version: str | None = Field(None, description="prepared version to train on; default: newest")
    max_failures: int = Field(
        3, ge=-1, description="worker failures to recover from, each time from the latest checkpoint (-1: no limit)"
    )
    lora: LoraSettings = LoraSettings()
    optim: OptimSettings = OptimSettings()
    resources: Resources = Resources()
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 needs a GPU")
    gradient_checkpointing: bool = False
    samples: dict[Literal["image", "video", "text"], int] | Literal["directed"] | None = Field(
        None,
        description="joint jobs only: train samples to draw from each modality (whole passes over its "
        "train rows, then a seeded part of one more), or 'directed' for as many as this pipeline's directed "
        "job of that modality trains on (steps x batch x grad_accum x workers): the equal-budget baseline. "
        "The job's steps follow from the total; default: every modality's rows mixed, by max_steps/epochs",
    )

    def samples_per_step(self) -> int:
        return self.optim.batch_size * self.optim.grad_accum * self.resources.num_workers

    @model_validator(mode="after")
    def _gpu_only(self):
        if self.precision == "bf16" and self.resources.gpus_per_worker == 0:
            raise ValueError(f"job {self.name}: precision bf16 needs resources.gpus_per_worker > 0 (use fp32 on CPU)")
        if self.gradient_checkpointing and self.resources.gpus_per_worker == 0:
            raise ValueError(
                f"job {self.name}: gradient_checkpointing saves GPU memory at the cost of "
                "compute; it needs resources.gpus_per_worker > 0 (turn it off on CPU)"
            )
        if self.modality == JOINT and self.dataset_version:
            raise ValueError(
                f"job {self.name}: a joint job trains on the newest version of every modality; remove dataset_version"
            )
        if self.samples is not None and self.modality != JOINT:
            raise ValueError(
                f"job {self.name}: samples is for joint jobs; a {self.modality} job trains on its "
                "own modality's rows (set optim.max_steps or optim.epochs)"
            )
        if isinstance(self.samples, dict) and (bad := {m: n for m, n in self.samples.items() if n < 1}):
            raise ValueError(f"job {self.name}: samples {bad}: give each modality at least 1 (or leave it out)")
        return self


class VllmSettings(Strict):
    python: str = Field(
        ".venv-vllm/bin/python",
        description="the interpreter of vLLM's own environment (`make "
        "venv-vllm`), absolute or relative to where the app starts; model replicas run on it",
    )
    kv_cache_gib: int = Field(2, ge=1, description="CPU only: GiB of memory for the KV cache (VLLM_CPU_KVCACHE_SPACE)")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="CUDA only: the GPU memory vLLM may take")
    max_model_len: int = Field(
        4096, ge=256, description="prompt + answer tokens per request (a 7B video prompt is about 2,100)"
    )
    max_num_seqs: int = Field(32, ge=1, description="requests in one running batch")
    max_loras: int = Field(
        4,
        ge=1,
        description="adapters in one running batch: vLLM's LoRA slots, each allocated up front at "
        "max_lora_rank on the device (`ddft plan` sizes them); more adapters stay resident on the host "
        "(serve.adapter_cache_size: vLLM's max_cpu_loras and ddft's LRU) and swap into a free slot",
    )


class ServePlacement(Strict):
    """Where the app's parts run on a cluster of many nodes (Ray custom resources and Serve options)."""

    max_replicas_per_node: int | None = Field(
        None, ge=1, description="model replicas on one node at most: spread, a node lost loses at most this many"
    )
    model_resources: dict[str, float] = Field(
        {}, description="custom Ray resources each model replica needs (a node group: e.g. {gpu-node: 1})"
    )
    gateway_resources: dict[str, float] = Field(
        {},
        description="custom Ray resources the gateway needs: pin it where the HTTP proxy runs "
        "(e.g. a resource only the head has), so losing a worker node never drops a request in flight",
    )
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        "EveryNode", description="Serve's HTTP proxies: one per node (behind a load balancer) or on the head only"
    )


class ServeSettings(Strict):
    host: str = "127.0.0.1"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="the base's weights on both engines (the same, so their tokens compare): auto is "
        "bfloat16 on a GPU (serve.gpus_per_replica > 0), float32 on a CPU",
    )
    port: int = Field(8000, ge=1, le=65535)
    engine: Literal["hf", "vllm"] = Field(
        "hf",
        description="hf: transformers + PEFT, batched multi-LoRA (CPU or "
        "GPU); vllm: vLLM with ddft's Video-LLaVA plugin, continuous batching "
        "(vllm-cpu or CUDA vLLM, in its own environment: serve.vllm.python)",
    )
    vllm: VllmSettings = VllmSettings()
    max_new_tokens: int = Field(96, ge=1, le=4096)
    max_n: int = Field(4, ge=1, le=16, description="most choices one chat request may ask for (OpenAI's n)")
    adapter_cache_size: int = Field(8, ge=1, description="adapters kept loaded per replica (LRU)")
    host_cache_mb: float = Field(
        512.0, ge=0, description="adapters' files kept in a replica's host memory, loaded or not (0: off)"
    )
    num_replicas: int = Field(1, ge=1, description="replicas at start (autoscaling: serve/config.yaml)")
    placement: ServePlacement = ServePlacement()
    cpus_per_replica: float = Field(1.0, gt=0)
    gpus_per_replica: float = Field(0.0, ge=0)
    max_batch_size: int = Field(
        8, ge=1, le=256, description="hf: rows (any adapters, modalities) running at once, stepped together"
    )
    max_cached_tokens: int = Field(
        65536, ge=256, description="hf: KV-cache tokens of the running rows (rows x width), checked at admission"
    )
    max_queued_requests: int = Field(32, ge=1, description="per replica; beyond it requests get 503 + Retry-After")
    request_timeout_s: float = Field(300.0, gt=0)
    # vLLM's own default. vLLM pads every adapter to this rank and its cost grows with it: its CPU LoRA kernels
    # gather per-token weights of this rank (18 requests took 188 s at 64, 41 s at 8 here): raise it only as needed.
    max_lora_rank: int = Field(16, ge=1, description="tenant uploads with a higher rank are refused")
    max_adapter_mb: float = Field(256.0, gt=0, description="size limit of a tenant adapter upload")
    max_media_mb: float = Field(200.0, gt=0, description="size limit of a video or image, uploaded or by URI")
    media_prefixes: list[str] = Field(
        ["datasets/raw/"],
        min_length=1,
        description="store folders that requests may name media in (video_uri, "
        "image_uri, chat image_url); adapters/, models/, runs/ and tenants.json never",
    )
    admin_key_env: str = Field(
        "DDFT_ADMIN_KEY",
        description="environment variable holding the admin key (manages tenants); unset: tenant management is off",
    )

    @field_validator("media_prefixes")
    @classmethod
    def _public_prefixes(cls, prefixes: list[str]) -> list[str]:
        from ddft.store import PRIVATE_KEYS

        for p in prefixes:
            if not p.endswith("/") or p.startswith("/") or "://" in p or ".." in p.split("/"):
                raise ValueError(
                    f"media prefix {p!r}: give a folder key relative to the store, ending in '/' (e.g. datasets/raw/)"
                )
            if any(p.startswith(k) or k.startswith(p) for k in PRIVATE_KEYS):
                raise ValueError(
                    f"media prefix {p!r} overlaps the store's private keys {list(PRIVATE_KEYS)}: "
                    "requests never read those as media"
                )
        return prefixes

    @model_validator(mode="after")
    def _vllm_rank(self):
        # every upload the gateway accepts must be one the engine can apply (vLLM's LoRA ranks stop at 512)
        if self.engine == "vllm" and self.max_lora_rank > 512:
            raise ValueError(
                f"serve.max_lora_rank {self.max_lora_rank}: the vllm engine serves LoRA ranks up to 512; lower it"
            )
        return self

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_replica > 0 else "cpu"

    @property
    def torch_dtype(self) -> str:
        """serve.dtype with auto resolved for the replicas' device."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.device == "cuda" else "float32"


class ServeConfig(Strict):
    """What the serve app needs: the store, the base and the serve settings (no training jobs)."""

    store: StoreConfig = StoreConfig()
    base: BaseModelConfig
    serve: ServeSettings = ServeSettings()


class TrainConfig(Strict):
    """What data preparation, training and evaluation need: the store, the base, data and jobs."""

    store: StoreConfig = StoreConfig()
    base: BaseModelConfig
    data: DataConfig = DataConfig()
    jobs: list[JobConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_jobs(self):
        names = [j.name for j in self.jobs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"jobs: names must be unique, repeated: {dupes}")
        return self

    @model_validator(mode="after")
    def _joint_budgets(self):
        """A joint job's `samples` resolved to numbers, and its steps set from their total."""
        for i, job in enumerate(self.jobs):
            if job.samples is None:
                continue
            samples = job.samples
            if samples == "directed":
                samples = {}
                for m in MODALITIES:
                    directed = [j for j in self.jobs if j.modality == m]
                    if len(directed) != 1 or directed[0].optim.max_steps is None:
                        raise ValueError(
                            f"job {job.name}: samples 'directed' needs exactly one {m} job with "
                            f"optim.max_steps set (found {[j.name for j in directed]}); or give "
                            "samples per modality"
                        )
                    samples[m] = directed[0].optim.max_steps * directed[0].samples_per_step()
            steps = -(-sum(samples.values()) // job.samples_per_step())
            if job.optim.max_steps not in (None, steps):  # (a resolved config, written back out, has it)
                raise ValueError(
                    f"job {job.name}: remove optim.max_steps: a job with samples trains exactly "
                    f"those, so its steps follow from them ({steps} here)"
                )
            self.jobs[i] = job.model_copy(
                update={"samples": samples, "optim": job.optim.model_copy(update={"max_steps": steps})}
            )
        return self

    def job(self, name: str) -> JobConfig:
        for j in self.jobs:
            if j.name == name:
                return j
        raise ConfigError("jobs", [f"no job named {name!r}; jobs are {[j.name for j in self.jobs]}"])


class PipelineConfig(TrainConfig, ServeConfig):
    """The whole DDFT loop in one file (jobs/configs/*.yaml): both parts, sharing store and base."""


def _model_at(model: type[BaseModel] | None, loc: tuple) -> type[BaseModel] | None:
    """The model class a path leads to (through nested models, lists and optionals)."""
    import typing

    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part)) if model else None
        if field is None:
            return None
        found = [
            a
            for a in (field.annotation, *typing.get_args(field.annotation))
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        found += [
            b
            for a in typing.get_args(field.annotation)
            for b in typing.get_args(a)
            if isinstance(b, type) and issubclass(b, BaseModel)
        ]  # list[JobConfig]
        model = found[0] if found else None
    return model


def _problems(err: ValidationError, model: type[BaseModel]) -> list[str]:
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        value = e.get("input")
        parent = _model_at(model, tuple(p for p in e["loc"][:-1]))
        field = parent.model_fields.get(str(e["loc"][-1])) if parent and e["loc"] else None
        hint = f" ({field.description})" if field is not None and field.description else ""
        if e["type"] == "extra_forbidden":
            keys = f"; the keys here are {sorted(parent.model_fields)}" if parent else ""
            out.append(f"{loc}: unknown key (value {value!r}); remove it or fix its spelling{keys}")
        elif e["type"] == "missing":
            out.append(f"{loc}: required key is missing; add it{hint}")
        elif e["type"] == "value_error":
            out.append(f"{loc or 'config'}: {e['msg'].removeprefix('Value error, ')}")
        else:
            out.append(f"{loc}: got {value!r}; {e['msg']}{hint}")
    return out


def validate(model: type[BaseModel], data: Any, source: str = "config"):
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as err:
        raise ConfigError(source, _problems(err, model)) from None


def load(path: str | Path, model: type[BaseModel] = PipelineConfig):
    """Read and validate a YAML file; ConfigError names every problem. $DDFT_STORE overrides store.uri."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), [f"file not found: {path} (pass --config jobs/configs/demo.yaml)"])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(str(path), [f"not valid YAML: {err}"]) from None
    if isinstance(data, dict) and os.environ.get(STORE_ENV) and "store" in model.model_fields:
        # `make demo STORE=s3://...` and `ray job submit` (whose working dir is a copy) point here.
        data = {**data, "store": {**(data.get("store") or {}), "uri": os.environ[STORE_ENV]}}
    if model is not PipelineConfig and isinstance(data, dict) and set(data) - set(model.model_fields):
        # A whole-loop file: every section is checked (a broken serve section fails training too,
        # before hours of it), then the part asked for is taken. A file of one part is that part.
        whole = validate(PipelineConfig, data, str(path))
        return model.model_validate({k: getattr(whole, k) for k in model.model_fields})
    return validate(model, data, str(path))
