"""What the store says about a base model, without torch: the gateway, the registry and tenant
commands read it (models/load.py loads the weights)."""

from __future__ import annotations

from dataclasses import dataclass

from ddft.store import Store, StoreError

INFO_FILE = "ddft_base.json"  # written last: a model dir without it is incomplete


@dataclass(frozen=True)
class BaseInfo:
    id: str
    fingerprint: str  # sha256 of the weights: adapters record it and refuse other bases
    uri: str


def model_key(model_id: str) -> str:
    return f"models/{model_id}"


def base_info(store: Store, model_id: str) -> BaseInfo:
    key = f"{model_key(model_id)}/{INFO_FILE}"
    if not store.exists(key):
        raise StoreError(
            f"base model {model_id!r} is not in the store at {store.url(model_key(model_id))}: "
            "run `ddft base build` / `make demo`, or set base.build or base.source in the config"
        )
    info = store.read_json(key)
    return BaseInfo(id=model_id, fingerprint=info["fingerprint"], uri=store.url(model_key(model_id)))
