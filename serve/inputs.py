"""Reading what a request sends: bodies through a size cap, JSON objects, store URIs (what the
body's fields mean is serve/bodies.py's). Every refusal names what was wrong and the fix."""

import asyncio

from fastapi import Request

from ddft.errors import BadArgument, NotFound, TooLarge
from ddft.store import Store, StoreError

MB = 2**20
FORM_FIELDS = 16  # text fields a multipart body may hold (the OpenAPI document says so: maxProperties)


def check_length(request: Request, limit: int, what: str = "request") -> None:
    """Refuse by Content-Length before reading a byte (413)."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise TooLarge(
            f"the {what} is {int(length) / MB:.1f} MB; the limit is {limit / MB:.0f} MB: "
            "trim or re-encode the file, or put it in the store and send its URI",
            "too_large",
        )


def check_size(data: bytes, limit: int, what: str) -> bytes:
    if len(data) > limit:
        raise TooLarge(
            f"the {what} is {len(data) / MB:.1f} MB; the limit is {limit / MB:.0f} MB: trim or re-encode it",
            "too_large",
        )
    return data


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The raw body, stopped as soon as it passes `limit` (a missing or false Content-Length too)."""
    check_length(request, limit, what)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the {what} is over the {limit / MB:.0f} MB limit", "too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def bounded(request: Request, limit: int, what: str = "request") -> bytes:
    """Read the body through the cap (chunked or not, whatever Content-Length says), then leave it
    where Starlette's request.json() and request.form() read from (its cached `_body`), so no parser
    ever pulls more than `limit` bytes off the socket."""
    body = await read_body(request, limit, what)
    request._body = body
    return body


async def json_body(request: Request, limit: int = 64 * 2**10) -> dict:
    """The JSON object a request sends, read through a cap (`limit` bytes)."""
    await bounded(request, limit)
    try:
        body = await request.json()
    except ValueError:
        raise BadArgument(
            "the body is not valid JSON; send Content-Type: application/json with a JSON object", "bad_json"
        ) from None
    if not isinstance(body, dict):
        raise BadArgument(f"the body must be a JSON object, got {type(body).__name__}", "bad_json")
    return body


def _has_control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def store_key(store: Store, uri, prefixes: list[str]) -> str:
    """The store key a request's media URI names: a key (or a URI inside the server's store) under
    one of `prefixes`. A key outside them answers exactly as a missing one does, so a request can
    never learn what else the store holds; no error names the store's location."""
    if not isinstance(uri, str) or not uri.strip():
        raise BadArgument(
            f"give the media as a store key under {prefixes} (e.g. datasets/raw/clips/one.mp4), or upload the file",
            "bad_uri",
        )
    if _has_control(uri):
        raise BadArgument(
            "the media URI holds control characters (a NUL byte, a newline...): send the key as plain text", "bad_uri"
        )
    key = uri.strip()
    if "://" in key:  # a URI: only one inside this server's store names anything
        root = store.uri.rstrip("/") + "/"
        key = key[len(root) :] if key.startswith(root) else ""
    try:
        store.url(key)  # a key the store takes (no '..', relative)
    except StoreError:
        key = ""
    if not key or not any(key.startswith(p) for p in prefixes):
        raise _no_media(key or uri.strip(), prefixes)  # the caller's own words, or the key: never the store's place
    return key


def _no_media(key: str, prefixes: list[str]) -> NotFound:
    return NotFound(
        f"no media at {key[:200]!r}: media URIs name files under {prefixes}; check the key, or upload the file",
        "not_found",
    )


async def read_store(store: Store, uri, limit: int, prefixes: list[str]) -> bytes:
    """The media's bytes: its size is checked first (a HEAD on S3), so nothing over `limit` is fetched."""
    key = store_key(store, uri, prefixes)
    size = await asyncio.to_thread(store.size, key)  # a StoreError is the store's kind: 502, its details logged
    if size is None:
        raise _no_media(key, prefixes)
    if size > limit:
        raise TooLarge(f"{key[:200]!r} is {size / MB:.1f} MB; the limit is {limit / MB:.0f} MB", "too_large")
    data = await asyncio.to_thread(store.read_bytes, key)
    return check_size(data, limit, "file")


def flag(value, field: str) -> bool:
    """A yes/no query parameter (?stream=true)."""
    if value is None or value.lower() in ("false", "0", ""):
        return False
    if value.lower() in ("true", "1"):
        return True
    raise BadArgument(f"{field} must be true or false", f"bad_{field}")
