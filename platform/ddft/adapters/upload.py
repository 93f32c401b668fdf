"""A tenant's uploaded LoRA adapter, checked in memory before anything reaches the store.

Everything here reads bytes (adapters/archive.py unpacks them): pickle files are never opened,
and adapter_model.safetensors is parsed by hand (its format is an 8-byte little-endian header
length, a JSON header, then the raw tensor bytes) before the safetensors library touches it.
Every refusal is one of ddft.errors' kinds with a short code and how to fix it (serve/errors.py
maps the kinds to HTTP).
"""

from __future__ import annotations

import json
import re

from ddft.adapters import registry
from ddft.adapters.archive import check_total
from ddft.adapters.files import PICKLE_SUFFIXES, REQUIRED, parse_safetensors
from ddft.adapters.registry import Manifest
from ddft.config import MODALITIES
from ddft.errors import BadArgument, Invalid, UnsupportedFormat
from ddft.models.info import BaseInfo, BaseSpec
from ddft.store import Store

DTYPES = ("F32", "F16", "BF16")
_LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_A|lora_B)\.weight$")
# LoRA variants whose weights or forward differ from plain LoRA: the engine serves plain LoRA only
_VARIANTS = (
    "use_dora",
    "use_qalora",
    "lora_bias",
    "alora_invocation_tokens",
    "use_bdlora",
    "layer_replication",
    "trainable_token_indices",
    "target_parameters",
    "fan_in_fan_out",
    "megatron_config",
    "velora_config",
    "monteclora_config",
    "kasa_config",
    "arrow_config",
)
SAVE_HINT = (
    "save it with PEFT's model.save_pretrained(dir) (safetensors is the default) and upload "
    "adapter_config.json and adapter_model.safetensors"
)


# -- validation ---------------------------------------------------------------------------------


def validate_upload(files: dict[str, bytes], spec: BaseSpec, *, max_rank: int, max_bytes: int) -> dict:
    """Check an adapter's files against the base without executing anything; returns adapter_config."""
    return _validate(files, spec, max_rank=max_rank, max_bytes=max_bytes)[0]


def _validate(files: dict[str, bytes], spec: BaseSpec, *, max_rank: int, max_bytes: int) -> tuple[dict, dict]:
    """validate_upload, also returning the safetensors header it checked."""
    pickles = sorted(n for n in files if n.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        raise UnsupportedFormat(
            code="pickle_refused",
            detail=f"refusing {pickles}: pickle files can run code when loaded, so they are never opened; {SAVE_HINT}",
        )
    missing = [n for n in REQUIRED if n not in files]
    if missing:
        raise Invalid(code="missing_file", detail=f"the upload lacks {missing}; {SAVE_HINT}")
    check_total(sum(map(len, files.values())), max_bytes)
    cfg = _check_config(files["adapter_config.json"], max_rank)
    _check_base(cfg, spec)
    header = parse_safetensors(files["adapter_model.safetensors"], f"; {SAVE_HINT}, whole")
    _check_tensors(header, cfg, spec)
    _safe_open(files["adapter_model.safetensors"], set(header))
    return cfg, header


def _check_config(raw: bytes, max_rank: int) -> dict:
    def bad(why: str) -> Invalid:
        return Invalid(code="bad_config", detail=f"adapter_config.json {why}; {SAVE_HINT}")

    try:
        cfg = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise bad(f"is not valid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise bad("is not a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise bad(f'has peft_type {cfg.get("peft_type")!r}; only LoRA adapters ("LORA") are served')
    ranks = {"r": cfg.get("r"), **{f"rank_pattern[{k!r}]": v for k, v in _dict(cfg, "rank_pattern", bad).items()}}
    for what, r in ranks.items():
        if type(r) is not int or r < 1:
            raise bad(f"has {what}={r!r}; ranks must be positive integers")
    alpha = cfg.get("lora_alpha", cfg["r"])
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise bad(f"has lora_alpha={alpha!r}; it must be a positive number")
    _dict(cfg, "alpha_pattern", bad)
    variants = [k for k in _VARIANTS if cfg.get(k)] + (["bias"] if cfg.get("bias", "none") != "none" else [])
    if variants:
        raise Invalid(
            code="unsupported_lora",
            detail=f"adapter_config.json sets {variants}: only plain LoRA is served "
            "(no DoRA, LoRA bias, trainable tokens or other variants); retrain with those off",
        )
    too_high = {k: r for k, r in ranks.items() if r > max_rank}
    if too_high:
        raise Invalid(
            code="rank_too_high",
            detail=f"rank {too_high} is over this server's limit of {max_rank}; retrain with r <= {max_rank}",
        )
    return cfg


def _dict(cfg: dict, key: str, bad) -> dict:
    value = cfg.get(key) or {}
    if not isinstance(value, dict):
        raise bad(f"has {key}={value!r}; it must be an object")
    return value


def _check_base(cfg: dict, spec: BaseSpec) -> None:
    name = str(cfg.get("base_model_name_or_path") or "")
    basename = name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    if basename == spec.id or (name and name == spec.origin) or cfg.get("ddft_base_fingerprint") == spec.fingerprint:
        return
    raise Invalid(
        code="wrong_base",
        detail=f"the adapter was trained on base {name or '(none given)'!r}, but this "
        f"server's base is {spec.id!r} (from {spec.origin!r}, fingerprint {spec.fingerprint[:12]}); "
        f"train it on {spec.origin or spec.id!r}, or, if that is the same model, set "
        f"base_model_name_or_path to {spec.id!r} or ddft_base_fingerprint to {spec.fingerprint!r}",
    )


def _pattern_value(module: str, pattern: dict, default):
    """A rank_pattern/alpha_pattern entry for a module. Keys are read as module names or name
    suffixes, never as regexes: a tenant's regex never runs on the server (no ReDoS)."""
    for key, value in pattern.items():
        if module == key or module.endswith("." + key):
            return value
    return default


def _rank(module: str, cfg: dict) -> int:
    return _pattern_value(module, cfg.get("rank_pattern") or {}, cfg["r"])


def served_config(cfg: dict, header: dict, spec: BaseSpec) -> dict:
    """The adapter_config the server stores: the uploaded one with the modules spelled out exactly
    (the tensors' modules), so PEFT never runs the tenant's regexes and never creates LoRA
    layers the upload has no weights for."""
    modules = sorted({_LORA_KEY.match(k)[1] for k in header})
    alpha = cfg.get("lora_alpha", cfg["r"])
    ranks = {m: _rank(m, cfg) for m in modules}
    alphas = {m: _pattern_value(m, cfg.get("alpha_pattern") or {}, alpha) for m in modules}
    out = {
        **cfg,
        "target_modules": modules,
        "base_model_name_or_path": spec.id,
        "init_lora_weights": True,
        "rank_pattern": {m: r for m, r in ranks.items() if r != cfg["r"]},
        "alpha_pattern": {m: a for m, a in alphas.items() if a != alpha},
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        "modules_to_save": None,
        "inference_mode": True,
    }
    return out


def _check_tensors(header: dict, cfg: dict, spec: BaseSpec) -> None:
    lm_only = (
        "tenant adapters are LoRA on the language model only: train without modules_to_save, "
        "trained biases or embedding LoRA"
    )
    if cfg.get("modules_to_save"):
        raise Invalid(
            code="unknown_module",
            detail=f"adapter_config.json has modules_to_save={cfg['modules_to_save']!r}; {lm_only}",
        )
    layers: dict[str, dict[str, str]] = {}  # module -> {"lora_A": key, "lora_B": key}
    for key in header:
        m = _LORA_KEY.match(key)
        if not m:
            raise Invalid(
                code="unknown_module",
                detail=f"tensor {key!r} is not a LoRA weight of the form "
                f"base_model.model.<module>.lora_A.weight / lora_B.weight; {lm_only}",
            )
        if m[1] not in spec.modules:
            examples = list(spec.modules)[:3]
            raise Invalid(
                code="unknown_module",
                detail=f"module {m[1]!r} (tensor {key!r}) is not a Linear layer of "
                f"{spec.id}'s language model; valid modules look like {examples}",
            )
        layers.setdefault(m[1], {})[m[2]] = key
    for module, pair in layers.items():
        r, (fan_in, fan_out) = _rank(module, cfg), spec.modules[module]
        for part, key in pair.items():
            want = [r, fan_in] if part == "lora_A" else [fan_out, r]
            if header[key]["shape"] != want:
                raise Invalid(
                    code="wrong_shape",
                    detail=f"tensor {key!r} has shape {header[key]['shape']}, expected "
                    f"{want} ({part} of a rank-{r} LoRA on a {fan_in}->{fan_out} Linear): was it "
                    f"trained on {spec.id} with r={r}?",
                )
    for key, t in header.items():
        if t["dtype"] not in DTYPES:
            raise Invalid(code="bad_dtype", detail=f"tensor {key!r} is {t['dtype']}; use one of {list(DTYPES)}")
    for module, pair in layers.items():
        if len(pair) != 2:
            (has,) = pair
            raise Invalid(
                code="bad_safetensors",
                detail=f"module {module!r} has {has} but not its other half: every "
                f"LoRA layer needs both lora_A and lora_B; {SAVE_HINT}",
            )


def _safe_open(data: bytes, keys: set[str]) -> None:
    """Last check by the safetensors library itself (no pickle anywhere in it), from the bytes."""
    import safetensors

    try:
        ok = {name for name, _ in safetensors.deserialize(data)} == keys
    except Exception as err:  # the library's errors are plain strings
        raise Invalid(
            code="bad_safetensors", detail=f"adapter_model.safetensors is unreadable ({err}); {SAVE_HINT}"
        ) from None
    if not ok:
        raise Invalid(
            code="bad_safetensors", detail=f"adapter_model.safetensors reads differently than its header; {SAVE_HINT}"
        )


# -- publishing ---------------------------------------------------------------------------------


def publish_upload(
    store: Store,
    files: dict[str, bytes],
    *,
    tenant: str,
    name: str,
    modality: str,
    spec: BaseSpec,
    max_rank: int,
    max_bytes: int,
) -> Manifest:
    """Validate, then publish as the next version of adapters/tenant-<tenant>/<name>/."""
    owner = registry.tenant_owner(tenant)
    registry.adapter_prefix(owner, name)  # checks the name: BadArgument (bad_name)
    if modality not in MODALITIES:
        raise BadArgument(code="bad_modality", detail=f"modality {modality!r} is not one of {list(MODALITIES)}")
    cfg, header = _validate(files, spec, max_rank=max_rank, max_bytes=max_bytes)
    files = {**files, "adapter_config.json": json.dumps(served_config(cfg, header, spec), indent=2).encode()}
    # publish() takes the next version atomically and cleans up after itself on failure
    return registry.publish(
        store,
        {n: files[n] for n in REQUIRED},
        owner=owner,
        name=name,
        modality=modality,
        source="uploaded",
        base=BaseInfo(spec.id, spec.fingerprint, ""),
    )
