"""A tenant's uploaded LoRA adapter, checked in memory before anything reaches the store.

Everything here reads bytes: archives are never extracted to disk, pickle files are never opened,
and adapter_model.safetensors is parsed by hand (its format is an 8-byte little-endian header
length, a JSON header, then the raw tensor bytes) before the safetensors library touches it.
Every refusal is one of ddft.errors' kinds with a short code and how to fix it (serve/errors.py
maps the kinds to HTTP).
"""

from __future__ import annotations

import io
import json
import re
import stat
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ddft.adapters import registry
from ddft.adapters.files import PICKLE_SUFFIXES, REQUIRED, parse_safetensors
from ddft.adapters.registry import Manifest
from ddft.config import MODALITIES
from ddft.errors import BadArgument, Invalid, TooLarge, UnsupportedFormat
from ddft.models.info import INFO_FILE, BaseInfo, base_info, model_key
from ddft.store import Store

DEFAULT_MAX_BYTES = 1 << 30  # a 7B LM with r=128 on q/k/v/o in fp32 is ~0.5 GiB
TAR_OVERHEAD = 1 << 20  # tar headers and padding on top of the members' own bytes
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


# -- unpacking ----------------------------------------------------------------------------------


def unpack(
    files: dict[str, bytes] | None = None,
    archive: bytes | None = None,
    content_type: str = "",
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> dict[str, bytes]:
    """{file name: bytes} from multipart files (base names kept) or a .tar/.tar.gz/.zip archive."""
    if (files is None) == (archive is None):
        raise BadArgument(code="bad_upload", detail="send either the adapter's files or one archive of them")
    if files is not None:
        out: dict[str, bytes] = {}
        for raw, data in files.items():
            name = PurePosixPath(str(raw).replace("\\", "/")).name  # a client's path says nothing to us
            if name in ("", ".", "..") or name in out:
                raise Invalid(
                    code="bad_upload",
                    detail=f"file name {raw!r} is empty or given twice; send {list(REQUIRED)} once each",
                )
            out[name] = bytes(data)
        _cap(sum(map(len, out.values())), max_bytes)
        return out
    if archive[:2] == b"\x1f\x8b":
        archive = _gunzip(archive, max_bytes + TAR_OVERHEAD)
        return _flatten(_tar_members(archive, max_bytes))
    if archive[257:262] == b"ustar":
        return _flatten(_tar_members(archive, max_bytes))
    if archive[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return _flatten(_zip_members(archive, max_bytes))
    raise Invalid(
        code="bad_archive",
        detail=f"the upload ({content_type or 'no content type'}) is not a .tar, .tar.gz "
        "or .zip archive; send one of those, or the two files as multipart form data",
    )


def _cap(total: int, max_bytes: int) -> None:
    if total > max_bytes:
        raise TooLarge(
            code="too_large",
            detail=f"the adapter's files hold {total} bytes, over the limit of {max_bytes}; "
            "lower the rank or target fewer modules",
        )


def _bad_archive(why: str) -> Invalid:
    return Invalid(
        code="bad_archive",
        detail=f"{why}; archive only the adapter folder's regular files, with "
        "relative paths (e.g. `tar czf adapter.tar.gz -C my-adapter .`)",
    )


def _gunzip(data: bytes, cap: int) -> bytes:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, cap + 1)  # never inflate more than the cap: a gzip bomb stops here
    except zlib.error as err:
        raise _bad_archive(f"the gzip stream is corrupt ({err})") from None
    if len(out) > cap:
        raise TooLarge(
            code="too_large", detail=f"the archive inflates past {cap} bytes; lower the rank or target fewer modules"
        )
    if not d.eof:
        raise _bad_archive("the gzip stream is truncated")
    return out


def _check_path(name: str) -> None:
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm) or ".." in norm.split("/") or "\x00" in norm:
        raise _bad_archive(f"member {name!r} has an absolute path or '..'")


def _tar_members(data: bytes, max_bytes: int) -> list[tuple[str, bytes]]:
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            members = tf.getmembers()
            for m in members:
                _check_path(m.name)
                if m.issym() or m.islnk():
                    raise _bad_archive(f"member {m.name!r} is a link")
                if not (m.isfile() or m.isdir()):
                    raise _bad_archive(f"member {m.name!r} is not a regular file")
            files = [m for m in members if m.isfile()]
            _cap(sum(m.size for m in files), max_bytes)  # sizes from the headers, before reading
            return [(m.name, tf.extractfile(m).read(m.size)) for m in files]
    except (tarfile.TarError, EOFError, OSError) as err:
        raise _bad_archive(f"the tar archive is unreadable ({err})") from None


def _zip_members(data: bytes, max_bytes: int) -> list[tuple[str, bytes]]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            for i in infos:
                _check_path(i.filename)
                kind = stat.S_IFMT(i.external_attr >> 16)  # the unix file type, when a unix zip recorded one
                if kind == stat.S_IFLNK:
                    raise _bad_archive(f"member {i.filename!r} is a link")
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise _bad_archive(f"member {i.filename!r} is not a regular file")
                if i.flag_bits & 0x1:
                    raise _bad_archive(f"member {i.filename!r} is encrypted")
            files = [i for i in infos if not i.is_dir()]
            _cap(sum(i.file_size for i in files), max_bytes)
            out, left = [], max_bytes
            for i in files:
                with zf.open(i) as f:
                    blob = f.read(left + 1)  # declared sizes can lie: never read past what's left
                if len(blob) > left:
                    raise TooLarge(
                        code="too_large",
                        detail=f"the archive inflates past {max_bytes} bytes; lower the rank or target fewer modules",
                    )
                left -= len(blob)
                out.append((i.filename, blob))
            return out
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError, EOFError, OSError) as err:
        raise _bad_archive(f"the zip archive is unreadable ({err})") from None


def _flatten(members: list[tuple[str, bytes]]) -> dict[str, bytes]:
    """Files at the top level or in one folder -> {base name: bytes}."""
    out: dict[str, bytes] = {}
    folders = set()
    for path, data in members:
        parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
        if not parts or parts[0] == "__MACOSX":  # macOS Finder's resource forks
            continue
        if len(parts) > 2:
            raise _bad_archive(f"member {path!r} is nested too deep: files must sit at the top level or in one folder")
        folders.add(tuple(parts[:-1]))
        if len(folders) > 1 or parts[-1] in out:
            raise _bad_archive(f"member {path!r} is in a second folder or repeats a name: keep one adapter per archive")
        out[parts[-1]] = data
    return out


# -- the base's shape ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseSpec:
    id: str
    fingerprint: str
    origin: str
    modules: dict[str, tuple[int, int]]  # LM Linear name, as PEFT names it -> (in_features, out_features)


_SPECS: dict[tuple[str, str], BaseSpec] = {}


def base_spec(store: Store, base_id: str) -> BaseSpec:
    """The base's language-model Linear layers, from its config.json alone (a meta-device skeleton)."""
    if (store.uri, base_id) in _SPECS:
        return _SPECS[(store.uri, base_id)]
    import torch
    import transformers

    info = base_info(store, base_id)
    origin = store.read_json(f"{model_key(base_id)}/{INFO_FILE}").get("origin", "")
    with tempfile.TemporaryDirectory(prefix="ddft-spec-") as tmp:
        (Path(tmp) / "config.json").write_bytes(store.read_bytes(f"{model_key(base_id)}/config.json"))
        config = transformers.AutoConfig.from_pretrained(tmp)
    cls = getattr(transformers, (config.architectures or [""])[0], None)
    with torch.device("meta"):  # shapes only: no memory, no weights read
        model = cls._from_config(config) if cls else transformers.AutoModelForImageTextToText.from_config(config)
    modules = {
        n: (m.in_features, m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".language_model." in f".{n}."
    }
    spec = _SPECS[(store.uri, base_id)] = BaseSpec(base_id, info.fingerprint, origin, modules)
    return spec


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
    _cap(sum(map(len, files.values())), max_bytes)
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
    """Last check by the safetensors library itself (no pickle anywhere in it)."""
    from safetensors import safe_open

    with tempfile.TemporaryDirectory(prefix="ddft-upload-") as tmp:
        path = Path(tmp) / "adapter_model.safetensors"
        path.write_bytes(data)
        try:
            with safe_open(str(path), framework="pt") as f:
                ok = set(f.keys()) == keys
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
