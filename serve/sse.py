"""Server-sent events: the streamed answers of /v1/chat/completions and /v1/recipes?stream=true.

A stream ends with `data: [DONE]` (OpenAI's convention, kept for every stream). The route reads
the first chunk before it answers, so an error before the first byte is a plain JSON error; a
later one can only be an event in the stream.
"""

import json
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

DONE = "data: [DONE]\n\n"


def event(data: dict, name: str | None = None) -> str:
    return (f"event: {name}\n" if name else "") + f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def response(events: AsyncIterator[str]) -> StreamingResponse:
    # no-cache and no proxy buffering: each event should reach the client when it is made
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
