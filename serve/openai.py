"""The OpenAI-compatible chat surface: messages in, a GenerateRequest's parts out, and the
chat.completion object back. `model` is the base id or `<base>:<adapter>` (Ray Serve LLM's way).
Content parts: text, image_url and video_url (vLLM's extension), each url a data: URL or a
store key/URI."""

import base64
import binascii
import time
import uuid
from dataclasses import dataclass

from serve.errors import ApiError

MEDIA_PARTS = {"image_url": "image", "video_url": "video"}


@dataclass
class ChatInput:
    adapter: str | None  # the part after "<base>:", None for the bare model id (routing decides)
    modality: str
    question: str
    media: bytes | None = None  # decoded data: URL
    media_uri: str | None = None  # a store key or URI


def _data_url(url: str, kind: str) -> bytes:
    head, _, payload = url.partition(",")
    if ";base64" not in head:
        raise ApiError(400, "bad_data_url", f"{kind} data URLs must be base64: data:<mime>;base64,<data>")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_data_url", f"the {kind} data URL is not valid base64") from None


def parse_chat(body: dict, base_id: str) -> ChatInput:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "missing_model", f"give \"model\": {base_id!r} (routing picks the adapter) or "
                       f"\"{base_id}:<adapter>\"; GET /v1/models lists them")
    if model != base_id and not model.startswith(base_id + ":"):
        raise ApiError(404, "model_not_found", f"model {model[:100]!r} is not served here; this server serves "
                       f"{base_id!r} and its adapters (GET /v1/models)")
    adapter = model[len(base_id) + 1:] if model != base_id else None
    if adapter == "":
        raise ApiError(400, "missing_model", f"model {model!r} names no adapter after ':'")
    if body.get("stream"):
        raise ApiError(400, "stream_unsupported", "streaming is not supported yet; send \"stream\": false")
    if body.get("n", 1) != 1:
        raise ApiError(400, "bad_n", "only n=1 is supported")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "missing_messages", "give \"messages\": a non-empty list of {role, content}")
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
                raise ApiError(400, "bad_content_part", f"messages[{i}].content[{j}]: use {{type: text, text}}, "
                               "{type: image_url, image_url: {url}} or {type: video_url, video_url: {url}}")
        text = " ".join(t.strip() for t in texts if t.strip())
        if text:
            lines.append((msg["role"], text))
    if len(media) > 1:
        raise ApiError(400, "too_many_media", "send at most one image or video per conversation")
    if not lines or lines[-1][0] != "user":
        raise ApiError(400, "missing_question", "the last message with text must be the user's question")
    # earlier turns become context before the question (the prompt template has one user turn)
    question = "\n".join(f"{role}: {text}" for role, text in lines[:-1]) + ("\n" if len(lines) > 1 else "")
    question += lines[-1][1]
    if not media:
        return ChatInput(adapter, "text", question)
    kind, url = media[0]
    if url.startswith("data:"):
        return ChatInput(adapter, kind, question, media=_data_url(url, kind))
    return ChatInput(adapter, kind, question, media_uri=url)


def completion(model: str, result: dict) -> dict:
    t = result["timings"]
    prompt, completion_tokens = int(t.get("prompt_tokens", 0)), int(t.get("new_tokens", 0))
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                     "finish_reason": result.get("finish_reason", "length")}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                  "total_tokens": prompt + completion_tokens},
        "adapter": result["adapter"], "base": result["base"],
    }
