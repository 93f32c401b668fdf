"""The OpenAI-compatible chat surface: messages in, a GenerateRequest's parts out, and the
chat.completion object back, or with "stream": true its chat.completion.chunk events (SSE).
`model` is the base id or `<base>:<adapter>` (Ray Serve LLM's way). Content parts: text,
image_url and video_url (vLLM's extension), each url a data: URL or a store key/URI."""

import time
import uuid
from dataclasses import dataclass, replace

from ddft.engines.base import GenerateRequest, GenerateResult
from ddft.prompts import QUESTIONS
from serve import bodies
from serve.errors import ApiError


@dataclass
class ChatInput:
    adapter: str | None  # the part after "<base>:", None for the bare model id (routing decides)
    modality: str
    question: str
    media: bytes | None = None  # decoded data: URL
    media_uri: str | None = None  # a store key or URI


def adapter_of(model: str, base_id: str) -> str | None:
    """The adapter a request's `model` names: None for the bare base id (routing decides)."""
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


def chat_input(chat: bodies.Chat, base_id: str) -> ChatInput:
    """A validated conversation as one question (earlier turns as its context) and at most one medium."""
    lines, media = [], []
    for msg in chat.messages:
        texts = []
        for part in msg.parts():
            if isinstance(part, bodies.TextPart):
                texts.append(part.text)
            else:
                media.append(
                    ("image", part.image_url.url) if part.type == "image_url" else ("video", part.video_url.url)
                )
        text = " ".join(t.strip() for t in texts if t.strip())
        if text:
            lines.append((msg.role, text))
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
    out = ChatInput(adapter_of(chat.model, base_id), "text", question)
    if media:
        out.modality, url = media[0]
        if url.startswith("data:"):
            out.media = bodies.data_url(url, out.modality)
        else:
            out.media_uri = url
    return out


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
