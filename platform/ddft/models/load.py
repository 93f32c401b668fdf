"""Bases live in the store under models/<id>/ as ordinary HF dirs; this module puts them there
(built locally or imported from a real source) and gets them back onto a local disk to load."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoProcessor, VideoLlavaForConditionalGeneration

from ddft.models.info import INFO_FILE, LORA_TARGETS_FILE, BaseInfo, base_info, model_key
from ddft.store import Store, StoreError

log = logging.getLogger(__name__)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def lora_targets(model) -> dict[str, list[int]]:
    """The language model's Linear layers (PEFT's names) and their [in, out] features: what a LoRA
    upload may target. Works on a meta-device skeleton too (shapes only)."""
    return {
        n: [m.in_features, m.out_features]
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".language_model." in f".{n}."
    }


def write_lora_targets(store: Store, model_id: str) -> None:
    """LORA_TARGETS_FILE for a base saved before it existed: from its config.json alone."""
    import json

    import transformers

    with tempfile.TemporaryDirectory(prefix="ddft-spec-") as tmp:
        (Path(tmp) / "config.json").write_bytes(store.read_bytes(f"{model_key(model_id)}/config.json"))
        config = transformers.AutoConfig.from_pretrained(tmp)
    cls = getattr(transformers, (config.architectures or [""])[0], None)
    with torch.device("meta"):  # shapes only: no memory, no weights read
        model = cls._from_config(config) if cls else transformers.AutoModelForImageTextToText.from_config(config)
    store.write_bytes(f"{model_key(model_id)}/{LORA_TARGETS_FILE}", json.dumps(lora_targets(model)).encode())


def save_base(model, processor, out_dir: Path, model_id: str, origin: str) -> dict:
    """Save as safetensors + processor, the LoRA-able layers, and (last) the info file that names
    the weights' fingerprint."""
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    (out_dir / LORA_TARGETS_FILE).write_text(json.dumps(lora_targets(model)))
    weights = sorted(out_dir.glob("*.safetensors"))
    h = hashlib.sha256("".join(_sha256(w) for w in weights).encode()).hexdigest()
    info = {"id": model_id, "fingerprint": h, "origin": origin}
    (out_dir / INFO_FILE).write_text(json.dumps(info, indent=2))
    return info


def ensure_base(store: Store, model_id: str, build: str | None = None, source: str | None = None) -> BaseInfo:
    """Return the base in the store, building or importing it first when it is missing."""
    if store.exists(f"{model_key(model_id)}/{INFO_FILE}"):
        return base_info(store, model_id)
    if not build and not source:
        return base_info(store, model_id)  # raises the "not in the store" error
    with tempfile.TemporaryDirectory(prefix="ddft-base-") as tmp:
        if build:
            from ddft.models.build import BUILDERS

            model, processor = BUILDERS[build]()
            origin = f"build:{build}"
        else:
            model, processor = _import(source, Path(tmp) / "src")
            origin = source
        save_base(model, processor, Path(tmp) / "out", model_id, origin)
        store.upload_dir(Path(tmp) / "out", model_key(model_id))
    log.info("base %s saved to %s", model_id, store.url(model_key(model_id)))
    return base_info(store, model_id)


def _import(source: str, tmp: Path):
    if source.startswith("s3://"):
        Store(source).download_dir("", tmp)
        source = str(tmp)
    try:
        return (
            VideoLlavaForConditionalGeneration.from_pretrained(source, dtype=torch.float32),
            AutoProcessor.from_pretrained(source),
        )
    except OSError as err:
        raise StoreError(f"can't load a Video-LLaVA base from {source!r}: {err}") from None


def local_base_dir(store: Store, model_id: str) -> Path:
    """A local dir holding the base: the store's own folder for file://, a cache for s3://."""
    info = base_info(store, model_id)
    local = store.local_path(model_key(model_id))
    if local is not None:
        return local
    cache = Path(os.environ.get("DDFT_CACHE", Path.home() / ".cache" / "ddft")) / "models"
    target = cache / f"{model_id}-{info.fingerprint[:16]}"
    if not (target / INFO_FILE).exists():
        partial = Path(tempfile.mkdtemp(prefix=target.name, dir=cache.mkdir(parents=True, exist_ok=True) or cache))
        store.download_dir(model_key(model_id), partial)
        try:
            partial.rename(target)  # atomic: concurrent workers never see half a model
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)  # another worker won the race
    return target


def load_base(path: Path | str, dtype: torch.dtype = torch.float32):
    model = VideoLlavaForConditionalGeneration.from_pretrained(path, dtype=dtype)
    processor = AutoProcessor.from_pretrained(path)
    return model, processor
