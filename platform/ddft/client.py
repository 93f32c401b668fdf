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


def _headers(tenant: str | None) -> dict:
    return {"X-Tenant": tenant} if tenant else {}


def post_recipe(url: str, video: bytes | None = None, video_uri: str | None = None, *, tenant: str | None = None,
                adapter: str | None = None, timeout=TIMEOUT) -> dict:
    """POST /v1/recipes with the video's bytes (uploaded) or a store key/URI; returns the recipe JSON."""
    if (video is None) == (video_uri is None):
        raise ValueError("give exactly one of video (bytes) or video_uri")
    endpoint = url.rstrip("/") + "/v1/recipes"
    if video is not None:
        data = {"adapter": adapter} if adapter else None
        resp = requests.post(endpoint, files={"video": ("video.mp4", video, "video/mp4")}, data=data,
                             headers=_headers(tenant), timeout=timeout)
    else:
        body = {"video_uri": video_uri, **({"adapter": adapter} if adapter else {})}
        resp = requests.post(endpoint, json=body, headers=_headers(tenant), timeout=timeout)
    return _answer(resp)


def generate(url: str, modality: str, question: str | None = None, image_bytes: bytes | None = None, *,
             image_uri: str | None = None, tenant: str | None = None, adapter: str | None = None,
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
    resp = requests.post(url.rstrip("/") + "/v1/generate", json=body, headers=_headers(tenant), timeout=timeout)
    return _answer(resp)


def models(url: str, *, tenant: str | None = None, timeout=(5, 30)) -> list[str]:
    """GET /v1/models: the model ids (the base, and `<base>:<adapter ref>`)."""
    resp = requests.get(url.rstrip("/") + "/v1/models", headers=_headers(tenant), timeout=timeout)
    return [m["id"] for m in _answer(resp)["data"]]


def health(url: str, timeout=(5, 30)) -> dict:
    return _answer(requests.get(url.rstrip("/") + "/healthz", timeout=timeout))
