"""A small HTTP client for the ddft serve app (the demo and scripts use it)."""

from __future__ import annotations

import base64

import requests

from ddft.adapters.files import PICKLE_SUFFIXES, REQUIRED

TIMEOUT = (5, 600)  # (connect, read) seconds: generation on a CPU can take minutes


class ClientError(RuntimeError):
    """The server answered with an error; .status, .error and .detail come from its JSON."""

    def __init__(self, status: int, error: str, detail: str, url: str):
        self.status, self.error, self.detail, self.url = status, error, detail, url
        super().__init__(f"{url} -> HTTP {status} {error}: {detail}")


def _answer(resp: requests.Response) -> dict:
    try:
        body = resp.json()
    except ValueError:
        body = None
    if not resp.ok:
        if isinstance(body, dict) and isinstance(body.get("error"), dict):  # OpenAI's shape, on the OpenAI routes
            err = body["error"]
            raise ClientError(resp.status_code, str(err.get("code")), str(err.get("message", "")), resp.url)
        if isinstance(body, dict) and "error" in body:
            raise ClientError(resp.status_code, str(body["error"]), str(body.get("detail", "")), resp.url)
        raise ClientError(resp.status_code, "http_error", resp.text[:300], resp.url)
    if not isinstance(body, dict):
        raise ClientError(
            resp.status_code, "bad_response", f"expected a JSON object, got {resp.text[:200]!r}", resp.url
        )
    return body


def _headers(api_key: str | None) -> dict:
    """A tenant's (or the admin's) key; no key: anonymous, the platform's adapters only."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def post_recipe(
    url: str,
    video: bytes | None = None,
    video_uri: str | None = None,
    *,
    api_key: str | None = None,
    adapter: str | None = None,
    timeout=TIMEOUT,
) -> dict:
    """POST /v1/recipes with the video's bytes (uploaded) or a store key/URI; returns the recipe JSON."""
    if (video is None) == (video_uri is None):
        raise ValueError("give exactly one of video (bytes) or video_uri")
    if video is not None:
        return post_recipe_file(url, video, api_key=api_key, adapter=adapter, timeout=timeout)
    body = {"video_uri": video_uri, **({"adapter": adapter} if adapter else {})}
    return _answer(
        requests.post(url.rstrip("/") + "/v1/recipes", json=body, headers=_headers(api_key), timeout=timeout)
    )


def generate(
    url: str,
    modality: str,
    question: str | None = None,
    image_bytes: bytes | None = None,
    *,
    image_uri: str | None = None,
    api_key: str | None = None,
    adapter: str | None = None,
    max_new_tokens: int | None = None,
    timeout=TIMEOUT,
) -> dict:
    """POST /v1/generate (modality "text" or "image"); returns {"answer", "adapter", "base", "timings"}."""
    body: dict = {"modality": modality}
    if question is not None:
        body["question"] = question
    if image_bytes is not None:
        body["image_b64"] = base64.b64encode(image_bytes).decode("ascii")
    if image_uri is not None:
        body["image_uri"] = image_uri
    if adapter:
        body["adapter"] = adapter
    if max_new_tokens is not None:
        body["max_new_tokens"] = max_new_tokens
    resp = requests.post(url.rstrip("/") + "/v1/generate", json=body, headers=_headers(api_key), timeout=timeout)
    return _answer(resp)


def models(url: str, *, api_key: str | None = None, timeout=(5, 30)) -> list[str]:
    """GET /v1/models: the model ids (the base, and `<base>:<adapter ref>`)."""
    resp = requests.get(url.rstrip("/") + "/v1/models", headers=_headers(api_key), timeout=timeout)
    return [m["id"] for m in _answer(resp)["data"]]


def health(url: str, *, admin_key: str | None = None, timeout=(5, 30)) -> dict:
    """GET /healthz: {"status"}; with the admin key also a replica's loaded adapters and counters."""
    return _answer(requests.get(url.rstrip("/") + "/healthz", headers=_headers(admin_key), timeout=timeout))


def chat(url: str, model: str, messages: list[dict], *, api_key: str | None = None, timeout=TIMEOUT, **params) -> dict:
    """POST /v1/chat/completions (OpenAI-compatible); params: max_tokens, temperature, stop, seed."""
    body = {"model": model, "messages": messages, **params}
    return _answer(
        requests.post(url.rstrip("/") + "/v1/chat/completions", json=body, headers=_headers(api_key), timeout=timeout)
    )


def upload_adapter(url: str, name: str, folder, modality: str, *, api_key: str, timeout=(5, 300)) -> dict:
    """PUT /v1/adapters/{name} with a PEFT folder (or a .tar/.tar.gz/.zip of one), no progress bar."""
    return upload_adapter_path(url, name, folder, modality, api_key=api_key, timeout=timeout)


def adapters(url: str, *, api_key: str, timeout=(5, 30)) -> list[dict]:
    """GET /v1/adapters: the caller's own adapters."""
    return _answer(requests.get(url.rstrip("/") + "/v1/adapters", headers=_headers(api_key), timeout=timeout))[
        "adapters"
    ]


def delete_adapter(url: str, name: str, *, api_key: str, timeout=(5, 30)) -> list[str]:
    """DELETE /v1/adapters/{name}[/v<N>]: returns the refs deleted."""
    resp = requests.delete(f"{url.rstrip('/')}/v1/adapters/{name}", headers=_headers(api_key), timeout=timeout)
    return _answer(resp)["deleted"]


def add_tenant(url: str, name: str, *, admin_key: str, timeout=(5, 30)) -> str:
    """POST /v1/tenants (admin key): returns the new tenant's key (shown once)."""
    resp = requests.post(
        url.rstrip("/") + "/v1/tenants", json={"name": name}, headers=_headers(admin_key), timeout=timeout
    )
    return _answer(resp)["key"]


# -- streamed uploads with progress (the `ddft` command's bars) -----------------------------------

ARCHIVE_SUFFIXES = {
    ".tar": "application/x-tar",
    ".tar.gz": "application/gzip",
    ".tgz": "application/gzip",
    ".zip": "application/zip",
}


class ProgressBody:
    """Request bytes that requests streams in chunks (Content-Length set from len()), calling
    progress(sent, total) after each chunk; .sent says how far the upload got."""

    def __init__(self, data: bytes, progress=None, chunk: int = 1 << 16):
        self.data, self.progress, self.chunk, self.sent = data, progress, chunk, 0

    def __len__(self) -> int:
        return len(self.data) - self.sent

    def read(self, size: int = -1) -> bytes:
        size = self.chunk if size is None or size < 0 else min(size, self.chunk)
        out = self.data[self.sent : self.sent + size]
        self.sent += len(out)
        if self.progress is not None and out:
            self.progress(self.sent, len(self.data))
        return out


def _multipart(fields: dict) -> tuple[bytes, str]:
    """(body, Content-Type) for {name: value or (filename, bytes, type)}."""
    from urllib3 import encode_multipart_formdata

    return encode_multipart_formdata(fields)


def archive_type(path) -> str | None:
    """The Content-Type of a .tar/.tar.gz/.tgz/.zip path, None for anything else."""
    name = str(path).lower()
    return next((t for s, t in sorted(ARCHIVE_SUFFIXES.items(), key=lambda kv: -len(kv[0])) if name.endswith(s)), None)


def adapter_files(folder) -> dict[str, bytes]:
    """The files of a PEFT folder an upload sends: adapter_config.json, adapter_model.safetensors and
    any pickle-suffixed weights (sent so that the server refuses them by name, never loaded here)."""
    from pathlib import Path

    folder = Path(folder)
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.is_file() and (p.name in REQUIRED or p.name.lower().endswith(PICKLE_SUFFIXES))
    }


def upload_adapter_path(
    url: str,
    name: str,
    path,
    modality: str,
    *,
    api_key: str,
    progress=None,
    timeout=(5, 300),
    body_out: list | None = None,
) -> dict:
    """PUT /v1/adapters/{name} from a PEFT folder (multipart files) or a .tar/.tar.gz/.zip of one
    (the archive as the body, ?modality=); the body is streamed with progress(sent, total).
    body_out, when given, receives the ProgressBody (how far the upload got)."""
    from pathlib import Path

    path = Path(path)
    endpoint = f"{url.rstrip('/')}/v1/adapters/{name}"
    if path.is_dir():
        files = adapter_files(path)
        body, ctype = _multipart(
            {"modality": modality, **{f: (f, data, "application/octet-stream") for f, data in files.items()}}
        )
        params = None
    else:
        ctype = archive_type(path) or "application/octet-stream"
        body, params = path.read_bytes(), {"modality": modality}
    stream = ProgressBody(body, progress)
    if body_out is not None:
        body_out.append(stream)
    resp = requests.put(
        endpoint, data=stream, params=params, timeout=timeout, headers={**_headers(api_key), "Content-Type": ctype}
    )
    return _answer(resp)


def post_recipe_file(
    url: str, video: bytes, *, api_key: str | None = None, adapter: str | None = None, progress=None, timeout=TIMEOUT
) -> dict:
    """POST /v1/recipes with a video's bytes streamed as multipart field `video` (progress(sent, total))."""
    fields = {"video": ("video.mp4", video, "video/mp4"), **({"adapter": adapter} if adapter else {})}
    body, ctype = _multipart(fields)
    resp = requests.post(
        url.rstrip("/") + "/v1/recipes",
        data=ProgressBody(body, progress),
        timeout=timeout,
        headers={**_headers(api_key), "Content-Type": ctype},
    )
    return _answer(resp)


def list_tenants(url: str, *, admin_key: str, timeout=(5, 30)) -> list[str]:
    """GET /v1/tenants (admin key): the tenants' names."""
    return _answer(requests.get(url.rstrip("/") + "/v1/tenants", headers=_headers(admin_key), timeout=timeout))[
        "tenants"
    ]


def remove_tenant(url: str, name: str, *, admin_key: str, timeout=(5, 30)) -> str:
    """DELETE /v1/tenants/{name} (admin key): the tenant and its key are gone; returns the name."""
    resp = requests.delete(f"{url.rstrip('/')}/v1/tenants/{name}", headers=_headers(admin_key), timeout=timeout)
    return _answer(resp)["deleted"]
