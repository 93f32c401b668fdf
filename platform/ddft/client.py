"""A small HTTP client for the ddft serve app (the demo and scripts use it)."""
from __future__ import annotations

import base64

import requests

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
        if isinstance(body, dict) and "error" in body:
            raise ClientError(resp.status_code, str(body["error"]), str(body.get("detail", "")), resp.url)
        raise ClientError(resp.status_code, "http_error", resp.text[:300], resp.url)
    if not isinstance(body, dict):
        raise ClientError(resp.status_code, "bad_response", f"expected a JSON object, got {resp.text[:200]!r}",
                          resp.url)
    return body


def _headers(api_key: str | None) -> dict:
    """A tenant's (or the admin's) key; no key: anonymous, the platform's adapters only."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def post_recipe(url: str, video: bytes | None = None, video_uri: str | None = None, *, api_key: str | None = None,
                adapter: str | None = None, timeout=TIMEOUT) -> dict:
    """POST /v1/recipes with the video's bytes (uploaded) or a store key/URI; returns the recipe JSON."""
    if (video is None) == (video_uri is None):
        raise ValueError("give exactly one of video (bytes) or video_uri")
    endpoint = url.rstrip("/") + "/v1/recipes"
    if video is not None:
        data = {"adapter": adapter} if adapter else None
        resp = requests.post(endpoint, files={"video": ("video.mp4", video, "video/mp4")}, data=data,
                             headers=_headers(api_key), timeout=timeout)
    else:
        body = {"video_uri": video_uri, **({"adapter": adapter} if adapter else {})}
        resp = requests.post(endpoint, json=body, headers=_headers(api_key), timeout=timeout)
    return _answer(resp)


def generate(url: str, modality: str, question: str | None = None, image_bytes: bytes | None = None, *,
             image_uri: str | None = None, api_key: str | None = None, adapter: str | None = None,
             max_new_tokens: int | None = None, timeout=TIMEOUT) -> dict:
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


def health(url: str, timeout=(5, 30)) -> dict:
    return _answer(requests.get(url.rstrip("/") + "/healthz", timeout=timeout))


def chat(url: str, model: str, messages: list[dict], *, api_key: str | None = None, timeout=TIMEOUT,
         **params) -> dict:
    """POST /v1/chat/completions (OpenAI-compatible); params: max_tokens, temperature, stop, seed."""
    body = {"model": model, "messages": messages, **params}
    return _answer(requests.post(url.rstrip("/") + "/v1/chat/completions", json=body, headers=_headers(api_key),
                                 timeout=timeout))


def upload_adapter(url: str, name: str, folder, modality: str, *, api_key: str, timeout=(5, 300)) -> dict:
    """PUT /v1/adapters/{name} with a PEFT folder's adapter_config.json and adapter_model.safetensors."""
    from pathlib import Path

    folder = Path(folder)
    files = [("files", (f, (folder / f).read_bytes())) for f in ("adapter_config.json", "adapter_model.safetensors")]
    resp = requests.put(f"{url.rstrip('/')}/v1/adapters/{name}", files=files, data={"modality": modality},
                        headers=_headers(api_key), timeout=timeout)
    return _answer(resp)


def adapters(url: str, *, api_key: str, timeout=(5, 30)) -> list[dict]:
    """GET /v1/adapters: the caller's own adapters."""
    return _answer(requests.get(url.rstrip("/") + "/v1/adapters", headers=_headers(api_key), timeout=timeout))["adapters"]


def delete_adapter(url: str, name: str, *, api_key: str, timeout=(5, 30)) -> list[str]:
    """DELETE /v1/adapters/{name}[/v<N>]: returns the refs deleted."""
    resp = requests.delete(f"{url.rstrip('/')}/v1/adapters/{name}", headers=_headers(api_key), timeout=timeout)
    return _answer(resp)["deleted"]


def add_tenant(url: str, name: str, *, admin_key: str, timeout=(5, 30)) -> str:
    """POST /v1/tenants (admin key): returns the new tenant's key (shown once)."""
    resp = requests.post(url.rstrip("/") + "/v1/tenants", json={"name": name}, headers=_headers(admin_key),
                         timeout=timeout)
    return _answer(resp)["key"]
