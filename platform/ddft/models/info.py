"""What the store says about a base model, without torch: the gateway, the registry and tenant
commands read it (models/load.py loads the weights and writes these files when it saves a base)."""

from __future__ import annotations

from dataclasses import dataclass

from ddft.store import Store, StoreError

INFO_FILE = "ddft_base.json"  # written last: a model dir without it is incomplete
LORA_TARGETS_FILE = "ddft_lora_targets.json"  # the LM's Linear layers and shapes: what an adapter may target


@dataclass(frozen=True)
class BaseInfo:
    id: str
    fingerprint: str  # sha256 of the weights: adapters record it and refuse other bases
    uri: str


def model_key(model_id: str) -> str:
    return f"models/{model_id}"


def base_info(store: Store, model_id: str) -> BaseInfo:
    return _base_info(store, model_id)[0]


def _base_info(store: Store, model_id: str) -> tuple[BaseInfo, dict]:
    """BaseInfo and the info file it came from (one read)."""
    key = f"{model_key(model_id)}/{INFO_FILE}"
    if not store.exists(key):
        raise StoreError(
            f"base model {model_id!r} is not in the store at {store.url(model_key(model_id))}: "
            "run `ddft base build` / `make demo`, or set base.build or base.source in the config"
        )
    info = store.read_json(key)
    return BaseInfo(id=model_id, fingerprint=info["fingerprint"], uri=store.url(model_key(model_id))), info


@dataclass(frozen=True)
class BaseSpec:
    """What a LoRA adapter may target on a base: its language model's Linear layers."""

    id: str
    fingerprint: str
    origin: str
    modules: dict[str, tuple[int, int]]  # LM Linear name, as PEFT names it -> (in_features, out_features)


_SPECS: dict[tuple[str, str, str], BaseSpec] = {}


def base_spec(store: Store, base_id: str) -> BaseSpec:
    """The base's LoRA-able layers, as written when the base was saved (no torch). A base saved
    before that file existed gets it now, once (models/load.py, a meta-device skeleton)."""
    info, raw = _base_info(store, base_id)
    cached = _SPECS.get((store.uri, base_id, info.fingerprint))
    if cached is not None:
        return cached
    key = f"{model_key(base_id)}/{LORA_TARGETS_FILE}"
    if not store.exists(key):
        from ddft.models.load import write_lora_targets

        write_lora_targets(store, base_id)
    origin = raw.get("origin", "")
    modules = {name: (int(i), int(o)) for name, (i, o) in store.read_json(key).items()}
    spec = _SPECS[(store.uri, base_id, info.fingerprint)] = BaseSpec(base_id, info.fingerprint, origin, modules)
    return spec
