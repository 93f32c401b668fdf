"""Adapter references and owners: the one grammar for naming an adapter (torch- and store-free).

    name              the caller's adapter of that name, else the platform's; the newest version
    name/vN           ... that version
    owner/name        that owner's, the newest version
    owner/name/vN     exactly that (how answers and GET /v1/models name an adapter: Manifest.ref)
    <base>:<any of the above>   an OpenAI model id (`model_id`, `model_adapter`); the base part
                                must be the served base

A resident adapter (in an engine's memory, routed to by Serve) is keyed by `resident_key`: its ref
and its weights, so a version republished with other weights is another adapter.

Owners are "ddft" (the platform's trained adapters) and "tenant-<tenant>". A second part that reads
v<N> is a version, so no owner/name pair is ever read as name/vN the other way round.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ddft.errors import BadArgument, NotFound

if TYPE_CHECKING:
    from ddft.adapters.registry import Manifest

PLATFORM_OWNER = "ddft"
TENANT_OWNER_PREFIX = "tenant-"
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")  # an owner or adapter name: one store path segment
# a tenant's name: NAME, short enough that its owner "tenant-<name>" is a NAME too
TENANT_NAME = re.compile(rf"^[a-z0-9][a-z0-9_.-]{{0,{63 - len(TENANT_OWNER_PREFIX)}}}$")
_VERSION = re.compile(r"^v(\d{1,9})$")
SHAPES = "'video', 'video/v1', 'ddft/video' or 'ddft/video/v1'"
# The grammar's shape, for JSON Schema (serve/bodies.py documents `adapter` fields with it): a string
# of this shape parses or names nothing (404, unknown_adapter); any other is refused (400, bad_adapter).
# "<base>:" is anything up to the last ':'; a prefix that is not the served base names nothing.
SHAPE = re.compile(r"^\s*(?:\S*:)?[^/:\s][^/:]*(?:/[^/:]+)?(?:/v[0-9]{1,9})?\s*$")


def tenant_owner(tenant: str) -> str:
    """The registry owner of a tenant's adapters (adapters/tenant-<tenant>/...)."""
    return TENANT_OWNER_PREFIX + tenant


def tenant_of(owner: str) -> str | None:
    """The tenant an owner belongs to; None for the platform."""
    return owner.removeprefix(TENANT_OWNER_PREFIX) if owner.startswith(TENANT_OWNER_PREFIX) else None


def visible_owners(tenant: str | None) -> list[str]:
    """Whose adapters a caller may use, in the order a bare name is looked up: their own, then the platform's."""
    return ([tenant_owner(tenant)] if tenant else []) + [PLATFORM_OWNER]


def checked_name(what: str, value: str) -> str:
    """An owner or adapter name that is safe as a store path segment, or BadArgument saying the rule."""
    if not isinstance(value, str) or not NAME.match(value):
        raise BadArgument(
            f"adapter {what} {value!r} is not allowed: use 1-64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            "bad_name",
        )
    return value


@dataclass(frozen=True)
class AdapterRef:
    name: str
    owner: str | None = None  # None: the caller's, then the platform's
    version: int | None = None  # None: the newest

    @classmethod
    def parse(cls, text: object, base_id: str | None = None) -> AdapterRef:
        """The reference a caller wrote. BadArgument (bad_adapter) when it has no shape of the grammar;
        NotFound (unknown_adapter) when it has one but names something that can't exist."""
        if not isinstance(text, str) or not text.strip():
            raise BadArgument(f"adapter must be a name like {SHAPES}", "bad_adapter")
        text = text.strip()
        if base_id is not None:
            text = text.removeprefix(base_id + ":")
        if ":" in text:
            raise NotFound(
                f"no adapter {text[:100]!r} here: an adapter of another base model, or not a name; "
                "GET /v1/models lists what is available",
                "unknown_adapter",
            )
        parts = text.split("/")
        version = _VERSION.match(parts[-1]) if len(parts) > 1 else None
        if version:
            parts = parts[:-1]
        elif len(parts) == 3:
            raise BadArgument(f"adapter {text[:100]!r}: the version is written v<N>, e.g. ddft/video/v1", "bad_adapter")
        if len(parts) > 2:
            raise BadArgument(f"adapter {text[:100]!r} has too many parts: write {SHAPES}", "bad_adapter")
        if not all(NAME.match(p) for p in parts):
            raise NotFound(
                f"no adapter {text[:100]!r}: adapter names are lowercase letters, digits, '.', '_' "
                "or '-'; GET /v1/models lists what is available",
                "unknown_adapter",
            )
        owner, name = parts if len(parts) == 2 else (None, parts[0])
        return cls(name=name, owner=owner, version=int(version.group(1)) if version else None)

    def __str__(self) -> str:
        return "/".join(
            ([self.owner] if self.owner else []) + [self.name] + ([f"v{self.version}"] if self.version else [])
        )


def model_id(base_id: str, ref: str | None) -> str:
    """The OpenAI model id of what answers: the base, or `<base>:<adapter ref>`."""
    return f"{base_id}:{ref}" if ref else base_id


def model_adapter(model: str, base_id: str) -> str | None:
    """The adapter an OpenAI model id names (AdapterRef's grammar, parsed by the caller): None for
    the bare base id (routing decides); NotFound (model_not_found) for a model not served here."""
    if model != base_id and not model.startswith(base_id + ":"):
        raise NotFound(
            f"model {model[:100]!r} is not served here; this server serves {base_id!r} "
            "and its adapters (GET /v1/models)",
            "model_not_found",
        )
    adapter = model[len(base_id) + 1 :] if model != base_id else None
    if adapter is not None and not adapter.strip():
        raise NotFound(
            f"model {model[:100]!r} names no adapter after ':'; GET /v1/models lists the models", "model_not_found"
        )
    return adapter


def resident_key(manifest: Manifest) -> str:
    """One resident adapter version's key: its ref and its weights. Serve's multiplexed model id."""
    return f"{manifest.ref}@{manifest.weights_sha256[:8]}"


def module_key(manifest: Manifest) -> str:
    """`resident_key` made safe as a PEFT adapter name (no '.', '/' or '@': module-dict keys)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", resident_key(manifest))
