"""Batched multi-adapter LoRA for mixed batches (the Punica BGMV / S-LoRA idea) on PEFT layers.

PEFT's own mixed batch (`adapter_names=[...]`) loops over the adapters in every LoRA layer at every
decode step: pick that adapter's rows, two small matmuls, scatter back. With 8 adapters that is ~50
tiny ops per layer per token, and it costs ~40% of the throughput. Here every LoRA layer keeps its
resident adapters stacked,

    A_stack (n+1, r_max, in)   B_stack (n+1, out, r_max), the adapter's scaling folded into B,

slot 0 all zeros (the bare base), smaller ranks zero-padded to r_max. For a batch the engine sets
the slot of every row once (`AdapterBank.batch`); each layer gathers A[slots], B[slots] once per
call and then runs `base(x) + bmm(bmm(x, A_g^T), B_g^T)` at every step: two ops whatever the mix.
A batch on one adapter (or the bare base) takes the cheaper plain path.

Adapters stay PEFT's on disk and are loaded by PEFT; only the forward of `lora.Linear` changes
(its instances get the subclass below). Outside `AdapterBank.batch` the layers are PEFT's own.
Other LoRA layer types (embeddings, convolutions) keep PEFT's own mixed path, which PEFT's forward
hook drives from the same `adapter_names`. LoRA variants (DoRA, ...) are refused at load.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS
from peft.utils import PeftType

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names


def unsupported(config) -> str | None:
    """Why an adapter config can't be served by the batched path (None: it can).

    Variants change the forward itself (DoRA rescales by the weight norm, aLoRA masks tokens...),
    so a plain x·Aᵀ·Bᵀ would silently compute something else.
    """
    if config.peft_type != PeftType.LORA:
        return f"it is a {config.peft_type} adapter; only plain LoRA is served"
    for f in dataclasses.fields(config):
        value = getattr(config, f.name, None)
        if f.name == "init_lora_weights" and value in f.metadata.get("lora_variants", ()):
            return f"it uses the LoRA variant init_lora_weights={value!r}"
        if f.metadata.get("is_lora_variant") and value:
            return f"it uses the LoRA variant {f.name}"
    for name in ("lora_bias", "target_parameters"):
        if getattr(config, name, None):
            return f"it sets {name}"
    return None


class BatchedLoraLinear(LoraLinear):
    """PEFT's lora.Linear; while its bank serves a batch, every row goes through its own slot."""

    _bank: AdapterBank | None = None
    _stack: tuple[torch.Tensor, torch.Tensor] | None = None  # (A_stack, B_stack), see the module doc
    _present: frozenset[int] = frozenset()  # slots of the adapters this layer has
    _gathered: tuple | None = None  # (key, weights) for the batch being served

    def forward(self, x, *args, adapter_names=None, **kwargs):
        bank = self._bank
        if bank is None or bank.slots_of_rows is None or self.merged or self.disable_adapters:
            return super().forward(x, *args, adapter_names=adapter_names, **kwargs)
        for key in VARIANT_KWARG_KEYS:  # PEFT's hook may pass these; the base layer takes none
            kwargs.pop(key, None)
        result = self.base_layer(x, *args, **kwargs)
        weights = self._weights(bank, len(x))
        if weights is None:  # every row is the bare base here
            return result
        a, b = weights
        h = x.to(a.dtype)
        if a.dim() == 2:  # one adapter for every row
            delta = F.linear(F.linear(h, a), b)
        else:  # a (rows, in, r), b (rows, r, out): BGMV as two batched matmuls
            xa = torch.bmm(h.reshape(len(h), -1, h.shape[-1]), a)
            if result.dtype == b.dtype:  # the add fused into the second matmul: one op fewer per layer
                return torch.baddbmm(result.reshape(len(h), -1, result.shape[-1]), xa, b).view(result.shape)
            delta = torch.bmm(xa, b).view(result.shape)
        return result + delta.to(result.dtype)

    def _weights(self, bank: AdapterBank, rows: int):
        """This call's gathered weights, cached: the batch's rows don't change between steps."""
        key = (bank.call, rows)
        if self._gathered is None or self._gathered[0] != key:
            self._gathered = (key, self._gather(bank.slots_of_rows, rows))
        return self._gathered[1]

    def _gather(self, slots: list[int], rows: int):
        if rows != len(slots):  # k rows per request (a video's frames through a vision layer)
            if rows % len(slots):
                raise ValueError(f"{rows} input rows can't be split among {len(slots)} requests")
            slots = [s for s in slots for _ in range(rows // len(slots))]
        if self._stack is None or not self._present.intersection(slots):
            return None
        a, b = self._stack
        if len(set(slots)) == 1:
            return a[slots[0]], b[slots[0]]
        idx = torch.tensor(slots, device=a.device)
        return a[idx].transpose(1, 2).contiguous(), b[idx].transpose(1, 2).contiguous()


class AdapterBank:
    """The resident adapters of one PeftModel in stack slots, and the batch being served now."""

    def __init__(self, peft_model):
        self.model = peft_model
        self.slots: dict[str, int] = {}  # adapter name -> slot; 0 is the bare base
        self.slots_of_rows: list[int] | None = None  # per request of the running batch; None: PEFT's forward
        self.call = 0  # bumps per batch: layers re-gather their weights
        self.dirty = True
        self.layers: list[BatchedLoraLinear] = []

    def adopt(self) -> None:
        """After PEFT loaded or deleted an adapter: batch new LoRA layers, restack on next use."""
        for module in self.model.modules():
            if type(module) is LoraLinear:
                module.__class__ = BatchedLoraLinear
                module._bank = self
        self.dirty = True

    @torch.no_grad()
    def rebuild(self) -> None:
        """Stack every layer's adapters in one slot order (an adapter missing in a layer: zeros)."""
        names = list(self.model.peft_config)
        self.slots = {name: i + 1 for i, name in enumerate(names)}
        self.layers = [m for m in self.model.modules() if isinstance(m, BatchedLoraLinear)]
        for layer in self.layers:
            have = [n for n in names if n in layer.lora_A]
            layer._gathered = None
            if not have:
                layer._stack, layer._present = None, frozenset()
                continue
            first = layer.lora_A[have[0]].weight
            r_max = max(layer.lora_A[n].weight.shape[0] for n in have)
            out_features = layer.lora_B[have[0]].weight.shape[0]
            a = first.new_zeros((len(names) + 1, r_max, first.shape[1]))
            b = first.new_zeros((len(names) + 1, out_features, r_max))
            for n in have:
                s, wa = self.slots[n], layer.lora_A[n].weight
                a[s, : wa.shape[0]] = wa
                b[s, :, : wa.shape[0]] = layer.lora_B[n].weight.to(a.dtype) * layer.scaling[n]
            layer._stack, layer._present = (a, b), frozenset(self.slots[n] for n in have)
        self.dirty = False

    @contextmanager
    def batch(self, names: list[str]):
        """Serve one batch: row i through adapter names[i] (BASE: the bare base)."""
        if self.dirty:
            self.rebuild()
        unknown = sorted(set(names) - set(self.slots) - {BASE})
        if unknown:
            raise ValueError(f"adapters {unknown} are not resident: load them first")
        self.slots_of_rows = [self.slots.get(n, 0) for n in names]
        self.call += 1
        try:
            yield
        finally:
            self.slots_of_rows = None
            for layer in self.layers:
                layer._gathered = None  # frees the gathered copies between batches
