"""The Engine protocol: a base model answering batches of requests, each with its own adapter.

An engine holds one base and loads adapters on demand; `generate` takes a batch that may mix
adapters (and the bare base) and answers every request with the adapter it names. Engines are
imported lazily by `make_engine`, so heavy or optional ones (vLLM) cost nothing until chosen.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

    from ddft.adapters.registry import Manifest


@dataclass
class GenerateRequest:
    modality: str  # "image" | "video" | "text"
    question: str
    pixels: "np.ndarray | None" = None  # (H, W, 3) uint8 for an image, (T, H, W, 3) for a video
    adapter: "Manifest | None" = None  # None: the base answers
    max_new_tokens: int = 96
    temperature: float = 0.0  # 0: greedy


@dataclass
class GenerateResult:
    text: str
    adapter: str | None  # the adapter's ref ("ddft/video/v1"), None for the base
    base: str  # the base model id
    timings: dict[str, Any] = field(default_factory=dict)  # seconds, token counts, batch size


@runtime_checkable
class Engine(Protocol):
    def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        """Answer every request (in order), each with its own adapter."""

    def loaded_adapters(self) -> list[str]:
        """Refs of the adapters held in memory now, least recently used first."""


_VLLM_UNAVAILABLE = (
    "the 'vllm' engine is not available yet: vLLM 0.33 has no Video-LLaVA model, needs a CUDA GPU and "
    "pins its own torch/transformers (it lives in its own environment: pip install 'ddft[vllm]'). "
    "Use engine 'hf' (transformers + PEFT), which serves Video-LLaVA on CPU or GPU."
)


def make_engine(kind: str, **kwargs) -> Engine:
    """Build an engine by name, importing its module only now: 'hf' (transformers + PEFT)."""
    if kind == "hf":
        module = importlib.import_module("ddft.engines.hf")
        return module.HFEngine(**kwargs)
    if kind == "vllm":
        raise NotImplementedError(_VLLM_UNAVAILABLE)
    raise ValueError(f"unknown engine {kind!r}: choose 'hf' ('vllm' is planned for GPU bases)")
