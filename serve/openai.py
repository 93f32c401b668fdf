"""The OpenAI-compatible chat surface: messages in, a GenerateRequest's parts out, and the
chat.completion object back, or with "stream": true its chat.completion.chunk events (SSE).
`model` is the base id or `<base>:<adapter>` (Ray Serve LLM's way). Content parts: text,
image_url and video_url (vLLM's extension), each url a data: URL or a store key/URI."""

import base64
import binascii
import time
import uuid
from dataclasses import dataclass, replace

from ddft.engines.base import GenerateRequest, GenerateResult
from ddft.prompts import QUESTIONS
from serve import inputs
from serve.errors import ApiError

MEDIA_PARTS = {"image_url": "image", "video_url": "video"}


@dataclass
class ChatInput:
    adapter: str | None  # the part after "<base>:", None for the bare model id (routing decides)
    modality: str
    question: str
    media: bytes | None = None  # decoded data: URL
    media_uri: str | None = None  # a store key or URI
    n: int = 1  # choices to generate
    stream: bool = False  # answer as chat.completion.chunk events
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts


def _data_url(url: str, kind: str) -> bytes:
    head, _, payload = url.partition(",")
    if ";base64" not in head:
        raise ApiError(422, "bad_data_url", f"{kind} data URLs must be base64: data:<mime>;base64,<data>")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "bad_data_url", f"the {kind} data URL is not valid base64") from None


def _adapter_of(body: dict, base_id: str) -> str | None:
    """The adapter a request's `model` names: None for the bare base id (routing decides)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(
            400,
            "missing_model",
            f'give "model": {base_id!r} (routing picks the adapter) or '
            f'"{base_id}:<adapter>"; GET /v1/models lists them',
        )
    if model != base_id and not model.startswith(base_id + ":"):
        raise ApiError(
            404,
            "model_not_found",
            f"model {model[:100]!r} is not served here; this server serves "
            f"{base_id!r} and its adapters (GET /v1/models)",
        )
    adapter = model[len(base_id) + 1 :] if model != base_id else None
    if adapter is not None and not adapter.strip():
        raise ApiError(
            404, "model_not_found", f"model {model[:100]!r} names no adapter after ':'; GET /v1/models lists the models"
        )
    return adapter


def _n(body: dict, max_n: int, stream: bool) -> int:
    n = inputs.integer(body.get("n", 1))
    if n is None:
        n = 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= max_n:
        raise ApiError(400, "bad_n", f"n must be an integer from 1 to {max_n} (serve.max_n)")
    if n > 1 and stream:
        raise ApiError(400, "bad_n", 'n > 1 is answered whole: drop "stream", or stream with n=1')
    return n


def parse_chat(body: dict, base_id: str, max_n: int = 1) -> ChatInput:
    adapter = _adapter_of(body, base_id)
    stream, include_usage = _stream_options(body)
    n = _n(body, max_n, stream)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "missing_messages", 'give "messages": a non-empty list of {role, content}')
    lines, media = [], []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, "bad_message", f"messages[{i}] must be an object with role system, user or assistant")
        content = msg.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise ApiError(400, "bad_message", f"messages[{i}].content must be a string or a list of parts")
        texts = []
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in MEDIA_PARTS and isinstance(part.get(kind), dict) and isinstance(part[kind].get("url"), str):
                media.append((MEDIA_PARTS[kind], part[kind]["url"]))
            else:
                raise ApiError(
                    400,
                    "bad_content_part",
                    f"messages[{i}].content[{j}]: use {{type: text, text}}, "
                    "{type: image_url, image_url: {url}} or {type: video_url, video_url: {url}}",
                )
        text = " ".join(t.strip() for t in texts if t.strip())
        if text:
            lines.append((msg["role"], text))
    if len(media) > 1:
        raise ApiError(422, "too_many_media", "send at most one image or video per conversation")
    if not lines and not media:
        raise ApiError(400, "missing_question", "the conversation holds no text and no image or video: ask something")
    if not lines:  # only a picture or a clip: the question the platform asks of it (as /v1/recipes does)
        question = QUESTIONS[media[0][0]]
    elif lines[-1][0] == "user":  # earlier turns become context before the question (one user turn)
        question = "\n".join(f"{role}: {text}" for role, text in lines[:-1]) + ("\n" if len(lines) > 1 else "")
        question += lines[-1][1]
    else:  # it ends with the assistant (or system): the whole conversation is the context to go on from
        question = "\n".join(f"{role}: {text}" for role, text in lines)
    chat = ChatInput(adapter, "text", question, n=n, stream=stream, include_usage=include_usage)
    if media:
        chat.modality, url = media[0]
        if url.startswith("data:"):
            chat.media = _data_url(url, chat.modality)
        else:
            chat.media_uri = url
    return chat


@dataclass
class CompletionInput:
    adapter: str | None
    prompt: str  # the whole prompt: no chat template (GenerateRequest.raw)
    n: int = 1
    stream: bool = False
    include_usage: bool = False


# OpenAI completion fields this server does not compute: refused unless absent or at their defaults
_UNSUPPORTED = {
    "echo": (None, False),
    "logprobs": (None, 0),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "logit_bias": (None, {}),
}


def parse_completion(body: dict, base_id: str, max_n: int = 1) -> CompletionInput:
    """POST /v1/completions: one text prompt (a string, or a list holding one), continued as it is."""
    adapter = _adapter_of(body, base_id)
    stream, include_usage = _stream_options(body)
    n = _n(body, max_n, stream)
    for key, defaults in _UNSUPPORTED.items():
        if body.get(key) not in defaults:
            raise ApiError(400, f"unsupported_{key}", f"{key} is not supported here; leave it out")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ApiError(
            400,
            "bad_prompt",
            "prompt must be a non-empty string (or a list of exactly one); send several prompts as several requests",
        )
    return CompletionInput(adapter, prompt, n, stream, include_usage)


def _stream_options(body: dict) -> tuple[bool, bool]:
    stream, options = body.get("stream") or False, body.get("stream_options")
    if not isinstance(stream, bool):
        raise ApiError(400, "bad_stream", "stream must be true or false")
    if options is None:
        return stream, False
    if not stream:
        raise ApiError(400, "bad_stream_options", 'stream_options is only allowed with "stream": true')
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ApiError(400, "bad_stream_options", 'stream_options is {"include_usage": true|false}')
    return stream, options.get("include_usage", False)


def _usage(result: GenerateResult) -> dict:
    prompt, completion_tokens = int(result.timings.get("prompt_tokens", 0)), int(result.timings.get("new_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def chat_choices(request: GenerateRequest, n: int) -> list[GenerateRequest]:
    """The n requests of n choices: with a seed, seeds seed..seed+n-1, so each choice is its own
    sample and the whole answer is reproducible."""
    if n == 1:
        return [request]
    return [replace(request, seed=None if request.seed is None else (request.seed + i) % 2**63) for i in range(n)]


def completion(model: str, results: list[GenerateResult], text: bool = False) -> dict:
    """The chat.completion object of one or more choices, or with `text` /v1/completions'
    text_completion object (one prompt: its tokens are counted once)."""
    usage = _usage(results[0])
    usage["completion_tokens"] = sum(_usage(r)["completion_tokens"] for r in results)
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    choices = [
        {
            "index": i,
            "finish_reason": r.finish_reason,
            **({"text": r.text, "logprobs": None} if text else {"message": {"role": "assistant", "content": r.text}}),
        }
        for i, r in enumerate(results)
    ]
    return {
        "id": f"{'cmpl' if text else 'chatcmpl'}-{uuid.uuid4().hex[:24]}",
        "object": "text_completion" if text else "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage,
        "adapter": results[0].adapter,
        "base": results[0].base,
    }


class ChunkStream:
    """The chat.completion.chunk objects of one streamed answer, as OpenAI sends them: the role
    first, then content deltas, finish_reason on the last content chunk, then (include_usage) a
    chunk with no choices and the usage; with include_usage every other chunk has "usage": null.
    With `text=True`, /v1/completions' text_completion chunks ({"text"} choices, no role chunk)."""

    def __init__(self, model: str, include_usage: bool, text: bool = False):
        prefix = "cmpl-" if text else "chatcmpl-"
        self.id, self.created = f"{prefix}{uuid.uuid4().hex[:24]}", int(time.time())
        self.model, self.include_usage, self.text = model, include_usage, text

    def _chunk(self, choices: list, **extra) -> dict:
        out = {
            "id": self.id,
            "object": "text_completion" if self.text else "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }
        if self.include_usage:
            out.setdefault("usage", None)
        return out

    def role(self) -> dict:
        return self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])

    def delta(self, text: str, result: GenerateResult | None = None) -> dict:
        """Content; with the result, the last content chunk: its finish_reason, adapter and base."""
        choice = {
            "index": 0,
            "finish_reason": result.finish_reason if result else None,
            **({"text": text, "logprobs": None} if self.text else {"delta": {"content": text} if text else {}}),
        }
        return self._chunk([choice], **({"adapter": result.adapter, "base": result.base} if result else {}))

    def usage(self, result: GenerateResult) -> dict:
        return self._chunk([], usage=_usage(result))
