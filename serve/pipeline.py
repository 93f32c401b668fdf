"""The one request pipeline of every inference route: a GenerateRequest in, its answer out as JSON
or, streamed, as server-sent events. A route supplies only how its typed body becomes the request
and a `Rendering` (how results and chunks are said); everything else is here: n choices, the
replica call, the first chunk read before answering (an error before the first byte is still a
JSON error; after it, an error event), [DONE], closing the replica's stream, and the timings.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from ddft.engines.base import Chunk, GenerateRequest, GenerateResult
from serve import sse
from serve.errors import ApiError, body, to_http
from serve.replicas import Replicas

log = logging.getLogger("ddft.serve")
ENGINE_TIMINGS = ("queue_s", "first_token_s", "batch_size", "adapters_in_batch", "prompt_tokens", "new_tokens")


@dataclass
class Clock:
    """A request's times: when it arrived, how long its media took to decode, when generation began."""

    t0: float = field(default_factory=time.perf_counter)
    decode_s: float = 0.0
    generation: float = 0.0

    def timings(self, result: GenerateResult) -> dict:
        """The answer's timings: decode_s, generate_s, total_s and the engine's own (ENGINE_TIMINGS)."""
        now = time.perf_counter()
        return {
            "decode_s": round(self.decode_s, 4),
            "generate_s": round(now - self.generation, 4),
            "total_s": round(now - self.t0, 4),
            **{k: result.timings[k] for k in ENGINE_TIMINGS if k in result.timings},
        }


class Rendering:
    """How a route says its answers: `whole` (the JSON answer of n results), the SSE events of a
    stream (`head` first, then `events` of each chunk; the last chunk carries the result) and of an
    error met mid-stream."""

    path = ""  # the route's path: its error shape (serve/errors.py)

    def whole(self, results: list[GenerateResult]) -> BaseModel:
        raise NotImplementedError

    def head(self) -> list[str]:
        return []

    def events(self, chunk: Chunk) -> list[str]:
        raise NotImplementedError

    def error_event(self, err: ApiError) -> str:
        """OpenAI's mid-stream error: data {"error": {...}}; the recipe route names its events."""
        return sse.event(body(err, self.path))


def choices(request: GenerateRequest, n: int) -> list[GenerateRequest]:
    """The n requests of n choices: with a seed, seeds seed..seed+n-1, so each choice is its own
    sample and the whole answer is reproducible."""
    if n == 1:
        return [request]
    return [replace(request, seed=None if request.seed is None else (request.seed + i) % 2**63) for i in range(n)]


async def answer(
    replicas: Replicas,
    request: GenerateRequest,
    rendering: Rendering,
    clock: Clock,
    stream: bool = False,
    n: int = 1,
) -> BaseModel | StreamingResponse:
    """The answer to one inference request, whole (n choices generated at once) or streamed."""
    clock.generation = time.perf_counter()
    if not stream:
        return rendering.whole(list(await asyncio.gather(*(replicas.generate(g) for g in choices(request, n)))))
    chunks = replicas.stream(request)
    first = await anext(chunks)  # a failure before the first byte is still a JSON error
    return sse.response(_events(first, chunks, rendering))


async def _events(first: Chunk, chunks: AsyncIterator[Chunk], rendering: Rendering) -> AsyncIterator[str]:
    """A streamed answer's SSE body: the head, every chunk's events, an error event if the stream
    fails on the way (a kind of error as its table says; anything else logged, 500), then [DONE]."""
    try:
        for text in rendering.head():
            yield text
        chunk = first
        while True:
            for text in rendering.events(chunk):
                yield text
            if chunk.result is not None:
                break
            chunk = await anext(chunks)
    except Exception as err:
        yield rendering.error_event(to_http(err))
    finally:
        await chunks.aclose()
    yield sse.DONE
