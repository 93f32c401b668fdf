"""Batched multi-adapter LoRA for mixed batches (the Punica BGMV / S-LoRA idea) on PEFT layers.

PEFT's own mixed batch (`adapter_names=[...]`) loops over the adapters in every LoRA layer at every
decode step: pick that adapter's rows, two small matmuls, scatter back. With 8 adapters that is ~50
tiny ops per layer per token, and it costs ~40% of the throughput. Here every LoRA layer keeps its
resident adapters stacked,

    A_stack (slots, r_max, in)   B_stack (slots, out, r_max), the adapter's scaling folded into B,

slot 0 all zeros (the bare base), smaller ranks zero-padded to r_max. For a batch the engine sets
the slot of every row once (`AdapterBank.batch`); each layer gathers A[slots], B[slots] once per
call and then runs `base(x) + bmm(bmm(x, A_g^T), B_g^T)` at every step: two ops whatever the mix.
A batch on one adapter (or the bare base) takes the cheaper plain path.

An adapter gets a slot when it is loaded and gives it back when it goes (a later one reuses it);
a layer's stacks grow when a slot or a rank beyond them arrives and narrow when the widest adapter
leaves. Adapters come in two ways:

- **Hot load** (`AdapterBank.load`): a plain LoRA on Linear layers of the language model (no
  modules_to_save, no variant, no bias) is written from its safetensors straight into its slot of
  each layer's stacks, and PEFT creates no module for it. What PEFT's load would compute is kept
  exactly: the same modules (its target matching), ranks and alphas (its rank/alpha patterns),
  scaling, and dtype (the base layer's, fp16/bf16 upcast to fp32 as PEFT's autocast does), so the
  stacks hold the same numbers as after PEFT's load. A Linear no adapter has touched yet is wrapped
  once in a LoRA layer of the class below.
- **PEFT** for everything else (a projector trained in full, other layer types): PEFT loads it, then
  `AdapterBank.add_peft` copies its lora.Linear weights into a slot. Only the forward of `lora.Linear`
  changes (its instances get the subclass below); outside `AdapterBank.batch` the layers are PEFT's
  own. Other LoRA layer types (embeddings, convolutions) keep PEFT's own mixed path, which PEFT's
  forward hook drives from the same `adapter_names`. LoRA variants (DoRA, ...) are refused at load.
"""

from __future__ import annotations

import dataclasses
import math
import re
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils import INCLUDE_LINEAR_LAYERS_SHORTHAND, UPCAST_DTYPES, PeftType
from peft.utils.other import get_pattern_key
from torch import nn

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names
LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")  # a PEFT LoRA Linear's saved weights
_ZERO_B_INITS = (True, "gaussian")  # a targeted module without saved weights adds nothing (B starts at 0)


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


def needs_peft(config) -> str | None:
    """Why PEFT must load this (already supported) adapter itself; None: a hot load can, as far as
    its config tells (the weights are checked by `AdapterBank.load`)."""
    for name in (
        "modules_to_save",
        "trainable_token_indices",
        "layer_replication",
        "megatron_config",
        "ensure_weight_tying",
    ):
        if getattr(config, name, None):
            return f"it sets {name}"
    if config.target_modules is None or config.target_modules == INCLUDE_LINEAR_LAYERS_SHORTHAND:
        return f"PEFT resolves its target_modules={config.target_modules!r}"
    if getattr(config, "bias", "none") != "none":
        return f"it trains biases (bias={config.bias!r})"
    if getattr(config, "fan_in_fan_out", False):
        return "it sets fan_in_fan_out"
    if config.init_lora_weights not in (*_ZERO_B_INITS, False):
        return f"PEFT initializes it with init_lora_weights={config.init_lora_weights!r}"
    return None


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype PEFT's load gives a LoRA on a layer of `base_dtype` (its autocast upcasts half floats)."""
    upcast = {torch.float16, torch.bfloat16} | {getattr(torch, n) for n in UPCAST_DTYPES if hasattr(torch, n)}
    return torch.float32 if base_dtype in upcast else base_dtype


class BatchedLoraLinear(LoraLinear):
    """PEFT's lora.Linear; while its bank serves a batch, every row goes through its own slot."""

    _bank: AdapterBank | None = None
    _stack: tuple[torch.Tensor, torch.Tensor] | None = None  # (A_stack, B_stack), see the module doc
    _ranks: dict[int, int] | None = None  # slot -> rank of the adapters this layer has
    _present: frozenset[int] = frozenset()  # those slots
    _gathered: tuple | None = None  # (key, weights) for the batch being served

    @classmethod
    def wrap(cls, base_layer: nn.Linear) -> BatchedLoraLinear:
        """A LoRA layer around a Linear, holding no adapter yet (what PEFT's layer is before its first
        adapter); PEFT adds its own adapters to it as to any of its LoRA layers."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        LoraLayer.__init__(layer, base_layer)
        layer.fan_in_fan_out = False
        layer.is_target_conv_1d_layer = False
        layer._active_adapter = []
        layer.train(base_layer.training)
        return layer

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
        slots = [s if s in self._present else 0 for s in slots]  # an adapter without this layer: zeros
        a, b = self._stack
        if len(set(slots)) == 1:
            return a[slots[0]], b[slots[0]]
        idx = torch.tensor(slots, device=a.device)
        return a[idx].transpose(1, 2).contiguous(), b[idx].transpose(1, 2).contiguous()

    # -- slots (the bank calls these, under no_grad and outside inference mode) --------------------
    def _put(self, slot: int, slots: int, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
        """Write one adapter, A (r, in) and its scaled B (out, r), into `slot`; the stacks grow to
        `slots` slots and to its rank if they are smaller. A new stack is of `dtype`."""
        ranks = {**(self._ranks or {}), slot: a.shape[0]}
        width = max(ranks.values())
        if self._stack is None or len(self._stack[0]) <= slot or self._stack[0].shape[1] < width:
            self._resize(max(slots, slot + 1), width, dtype)
        stack_a, stack_b = self._stack
        r = a.shape[0]
        stack_a[slot, :r].copy_(a)
        stack_b[slot, :, :r].copy_(b)
        if r < stack_a.shape[1]:  # a smaller rank: zero-padded (the slot may hold a wider adapter's old rows)
            stack_a[slot, r:].zero_()
            stack_b[slot, :, r:].zero_()
        self._ranks, self._present, self._gathered = ranks, frozenset(ranks), None

    def _drop(self, slot: int) -> None:
        """Forget the adapter in `slot` (its rows are read as zeros from now on; a later adapter
        overwrites them); the stacks narrow to the widest adapter left, or go with the last one."""
        if not self._ranks or slot not in self._ranks:
            return
        ranks = {s: r for s, r in self._ranks.items() if s != slot}
        if not ranks:
            self._stack = None
        elif max(ranks.values()) < self._stack[0].shape[1]:
            self._resize(len(self._stack[0]), max(ranks.values()), self._stack[0].dtype)
        self._ranks, self._present, self._gathered = ranks, frozenset(ranks), None

    def _resize(self, slots: int, width: int, dtype: torch.dtype) -> None:
        old = self._stack
        if old is not None:
            dtype = old[0].dtype
        device = self.get_base_layer().weight.device
        a = torch.zeros((slots, width, self.in_features), dtype=dtype, device=device)
        b = torch.zeros((slots, self.out_features, width), dtype=dtype, device=device)
        if old is not None:
            n, w = min(slots, len(old[0])), min(width, old[0].shape[1])
            a[:n, :w] = old[0][:n, :w]
            b[:n, :, :w] = old[1][:n, :, :w]
        self._stack = (a, b)

    def _slot_weights(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = self._ranks[slot]
        return self._stack[0][slot, :r], self._stack[1][slot, :, :r]


class AdapterBank:
    """The resident adapters of one model in stack slots, and the batch being served now.

    `model` is the base model; PEFT injects its layers into it in place, so its module names are the
    ones in a saved adapter's keys after `base_model.model.`.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.slots: dict[str, int] = {}  # adapter name -> slot; 0 is the bare base
        self.size = 1  # stack slots a layer needs: the highest slot handed out + 1
        self.slots_of_rows: list[int] | None = None  # per request of the running batch; None: PEFT's forward
        self.call = 0  # bumps when the rows' slots change: layers re-gather their weights
        self._rows_key: tuple | None = None  # (slots of the rows, slots version) of the last batch
        self._version = 0  # bumps when an adapter takes or leaves a slot
        self.layers: dict[str, BatchedLoraLinear] = {}  # module name -> its batched LoRA layer
        self._targets_of: dict[tuple, list[str]] = {}  # what a config's targeting matches (see _targets)
        # hot loads stay in the language model: no Linear there is ever inside a modules_to_save copy
        # (a projector's), which would deep-copy a LoRA layer of ours, stacks and bank with it
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        self.lm_prefix = next((n + "." for n, m in model.named_modules() if n and m is decoder), "")
        self.adopt()

    def adopt(self) -> None:
        """After PEFT loaded an adapter: its new lora.Linear layers become batched layers."""
        self._targets_of.clear()  # PEFT may have added modules (a projector's copies)
        for name, module in self.model.named_modules():
            if type(module) is LoraLinear:
                module.__class__ = BatchedLoraLinear
            if isinstance(module, BatchedLoraLinear):
                module._bank = self
                self.layers[name] = module

    def _free_slot(self) -> int:
        used = set(self.slots.values())
        slot = next(s for s in range(1, len(used) + 2) if s not in used)
        self.size = max(self.size, slot + 1)
        return slot

    def _add(self, name: str, weights: dict[BatchedLoraLinear, tuple]) -> int:
        """Put an adapter in a free slot: layer -> (A, scaled B, dtype of a new stack)."""
        if name in self.slots:
            raise ValueError(f"adapter {name} already has slot {self.slots[name]}")
        slot = self._free_slot()
        with torch.inference_mode(False), torch.no_grad():  # plain tensors: written in and outside batches
            try:
                for layer, (a, b, dtype) in weights.items():
                    layer._put(slot, self.size, a, b, dtype)
            except BaseException:  # (out of memory) no layer may keep a part of it in a free slot
                for layer in self.layers.values():
                    layer._drop(slot)
                raise
        self.slots[name] = slot
        self._version += 1
        return slot

    @torch.no_grad()
    def add_peft(self, name: str) -> int:
        """Stack an adapter PEFT has loaded (its lora.Linear weights; `adopt` first); its slot."""
        weights = {}
        for layer in self.layers.values():
            if name in layer.lora_A:
                a = layer.lora_A[name].weight
                weights[layer] = (a, layer.lora_B[name].weight.to(a.dtype) * layer.scaling[name], a.dtype)
        return self._add(name, weights)

    @torch.no_grad()
    def load(self, name: str, config, state_dict: dict[str, torch.Tensor]) -> str | None:
        """Hot load: write a plain LoRA's tensors (a PEFT-saved state dict) into a free slot of each
        layer, creating no PEFT module. None when done; otherwise why PEFT must load it (nothing changed).
        `config` is its LoraConfig, already checked by `unsupported` and `needs_peft`."""
        plan = self._plan(config, state_dict)
        if isinstance(plan, str):
            return plan
        weights = {}
        for module, (a, b, scaling, dtype, base) in plan.items():
            # B scaled in the dtype and on the device PEFT's lora_B has: add_peft's numbers exactly
            weights[self._layer(module, base)] = (a, b.to(base.weight.device, dtype) * scaling, dtype)
        self._add(name, weights)
        return None

    def _plan(self, config, state_dict: dict[str, torch.Tensor]):
        """module -> (A, B, scaling, dtype, base Linear) as PEFT's load would make them, or why not."""
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state_dict.items():
            m = LORA_KEY.match(key)
            if m is None:
                return f"its weight {key!r} is not a LoRA Linear's"
            pairs.setdefault(m[1], {})[m[2]] = tensor
        if not pairs:
            return "it has no LoRA weights"
        plan = {}
        for module, pair in pairs.items():
            if not module.startswith(self.lm_prefix):
                return f"module {module!r} is outside the language model"
            if len(pair) != 2:
                return f"module {module!r} lacks lora_A or lora_B"
            try:
                target = self.model.get_submodule(module)
            except AttributeError:
                return f"the base has no module {module!r}"  # e.g. a transformers v4 name PEFT renames
            base = target.base_layer if isinstance(target, BatchedLoraLinear) else target
            if type(base) is not nn.Linear:
                return f"module {module!r} is a {type(target).__name__}, not a Linear"
            if not check_target_module_exists(config, module):
                return f"its config doesn't target module {module!r}, which has weights"
            ranks, alphas = config.rank_pattern or {}, config.alpha_pattern or {}
            r = ranks.get(get_pattern_key(ranks.keys(), module), config.r)  # PEFT's _create_and_replace
            alpha = alphas.get(get_pattern_key(alphas.keys(), module), config.lora_alpha)
            a, b = pair["A"], pair["B"]
            if tuple(a.shape) != (r, base.in_features) or tuple(b.shape) != (base.out_features, r):
                return f"module {module!r} has weights {tuple(a.shape)}, {tuple(b.shape)} for rank {r}"
            if not (a.is_floating_point() and b.is_floating_point()):
                return f"module {module!r} has {a.dtype} weights"
            scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
            plan[module] = (a, b, scaling, adapter_dtype(base.weight.dtype), base)
        if config.init_lora_weights not in _ZERO_B_INITS:  # a targeted module without weights would add noise
            extra = [n for n in self._targets(config) if n not in plan]
            if extra:
                init = config.init_lora_weights
                return f"its config targets {extra[:3]}... without weights (init_lora_weights={init!r})"
        return plan

    def _targets(self, config) -> list[str]:
        """The modules PEFT's inject would match with this config (adapters trained with the same
        targets share the answer: the module names only change when PEFT adds modules)."""
        fields = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save")
        key = tuple(repr(getattr(config, f, None)) for f in fields)
        if key not in self._targets_of:
            inside = ()  # a LoRA layer's own submodules are never targets
            out = []
            for name, module in self.model.named_modules():
                if not name or name.startswith(inside):
                    continue
                if check_target_module_exists(config, name):
                    out.append(name)
                if isinstance(module, BaseTunerLayer):
                    inside = (*inside, name + ".")
            self._targets_of[key] = out
        return self._targets_of[key]

    def _layer(self, module: str, base: nn.Linear) -> BatchedLoraLinear:
        """The batched LoRA layer of a module, wrapping its Linear the first time."""
        layer = self.layers.get(module)
        if layer is not None:
            return layer
        target = self.model.get_submodule(module)
        if isinstance(target, BatchedLoraLinear):
            layer = target
        else:
            layer = BatchedLoraLinear.wrap(base)
            parent, _, child = module.rpartition(".")
            setattr(self.model.get_submodule(parent), child, layer)
        layer._bank = self
        self.layers[module] = layer
        return layer

    def weights(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """An adapter's weights as stacked: module -> (A (r, in), B·scaling (out, r))."""
        slot = self.slots[name]
        return {m: layer._slot_weights(slot) for m, layer in self.layers.items() if slot in layer._present}

    def remove(self, name: str) -> None:
        """An adapter goes: its slot is free for the next one."""
        slot = self.slots.pop(name, None)
        if slot is None:
            return
        self._version += 1
        with torch.inference_mode(False), torch.no_grad():
            for layer in self.layers.values():
                layer._drop(slot)

    @contextmanager
    def batch(self, names: list[str]):
        """Serve one step: row i through adapter names[i] (BASE: the bare base). Steps whose rows have
        the same slots as the step before (the scheduler's decode steps between arrivals and
        departures) reuse the layers' gathered weights."""
        unknown = sorted(set(names) - set(self.slots) - {BASE})
        if unknown:
            raise ValueError(f"adapters {unknown} are not resident: load them first")
        self.slots_of_rows = [self.slots.get(n, 0) for n in names]
        key = (tuple(self.slots_of_rows), self._version)
        if key != self._rows_key:
            self._rows_key = key
            self.call += 1
        try:
            yield
        finally:
            self.slots_of_rows = None
