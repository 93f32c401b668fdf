"""Adapters' projector weights inside vLLM's workers, read when the adapter loads, never mid-step.

DDFT's image/video adapters train the projector in full (PEFT `modules_to_save`), which vLLM's LoRA
can't apply, so the model applies it per item: a request names its adapter's projector slot (an int,
part of the item's cache hash) and the weights are in memory here. They get here through
`collective_rpc` (vLLM's call into every worker of the replica, through `ProjectorWorker` below):
when the engine loads an adapter it sends the file's path in the adapter's own folder (the folder
vLLM's LoRA is read from, so every worker can read it) and each worker reads it then. A missing or
broken file fails that call, which fails the one request that loaded the adapter and leaves the
engine serving; an exception in model execution would end vLLM's engine core and every request
with it. So execution reads no file: a file removed later changes nothing.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


class Projectors:
    """Slot -> weights of `like` (the base's projector): every added slot held on the host until it
    is dropped (the engine drops an adapter's when its LRU evicts it), the `on_device` most recent
    also on the projector's device (a GPU's memory holds a few, not every resident adapter's)."""

    def __init__(self, like: nn.Module, on_device: int):
        self._like, self.on_device = like, on_device
        self._host: dict[int, dict[str, torch.Tensor]] = {}
        self._device: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()

    def add(self, slot: int, path: str) -> None:
        """Read slot's weights from `path` now; raise, keeping nothing, if it is missing or isn't
        this base's projector (a slot id is never reused for other weights: a known one is kept)."""
        from safetensors.torch import load_file

        if slot in self._host:
            return
        try:
            tensors = load_file(path)
        except Exception as err:  # a missing or unreadable file: the message reaches the engine's call
            raise ValueError(f"projector file {path}: {type(err).__name__}: {err}") from err
        want = {k: tuple(v.shape) for k, v in self._like.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if got != want:
            raise ValueError(f"{path} holds {got}, not the base's projector {want}")
        dtype = next(self._like.parameters()).dtype
        self._host[slot] = {k: v.to(dtype) for k, v in tensors.items()}

    def drop(self, slot: int) -> None:
        self._host.pop(slot, None)
        self._device.pop(slot, None)

    def __contains__(self, slot: int) -> bool:
        return slot in self._host

    def get(self, slot: int) -> dict[str, torch.Tensor] | None:
        """Slot's weights on the projector's device; None if the slot was never added (or dropped)."""
        if slot in self._device:
            self._device.move_to_end(slot)
            return self._device[slot]
        if slot not in self._host:
            return None
        device = next(self._like.parameters()).device
        weights = {k: v.to(device) for k, v in self._host[slot].items()}
        self._device[slot] = weights
        while len(self._device) > self.on_device:
            self._device.popitem(last=False)
        return weights


class ProjectorWorker:
    """Mixed into vLLM's worker class (engine argument `worker_extension_cls`): the methods the
    engine's `collective_rpc` calls in every worker. An exception here goes back to that call."""

    def ddft_add_projector(self, slot: int, path: str) -> None:
        self.get_model().projectors.add(slot, path)

    def ddft_drop_projector(self, slot: int) -> None:
        self.get_model().projectors.drop(slot)
