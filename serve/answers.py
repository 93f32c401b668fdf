"""What every route answers, as pydantic models: the routes return them and the OpenAPI document's
responses are their JSON Schema (bodies.py is the requests' side). OpenAI's objects follow
OpenAI's shapes, with `adapter` and `base` added where an answer was generated."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ddft.recipes import Recipe

Timings = dict[str, float | int]
TIMINGS = "seconds and counts: decode_s, generate_s, total_s, queue_s, prompt_tokens, new_tokens, ..."
FinishReason = Literal["stop", "length"]


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Generated(Answer):
    """Who answered, on every generated answer."""

    adapter: str | None = Field(description="the adapter that answered (null: the base)")
    base: str


class GenerateAnswer(Generated):
    """POST /v1/generate."""

    answer: str
    finish_reason: FinishReason = Field(description="stop: it ended (or met a stop string); length: the token cap")
    timings: Timings = Field(description=TIMINGS)


class RecipeAnswer(Recipe, Generated):
    """POST /v1/recipes' answer: the recipe (ddft.recipes.Recipe, read from the text the model wrote
    under the recipe grammar) and how it was made. A finished recipe (finish_reason "stop") has at
    least one ingredient and one step; one cut by max_new_tokens holds the lines written whole."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "if": {"properties": {"finish_reason": {"const": "stop"}}},
            "then": {"properties": {"ingredients": {"minItems": 1}, "steps": {"minItems": 1}}},
        },
    )

    text: str = Field(description="the recipe as the model wrote it (ddft.recipes' text format)")
    finish_reason: FinishReason = Field(description="stop: it ended; length: max_new_tokens cut it")
    timings: Timings = Field(description=TIMINGS)


# -- OpenAI's objects ------------------------------------------------------------------------------
class TopLogprob(Answer):
    token: str
    logprob: float
    bytes: list[int] | None = Field(description="the token's UTF-8 bytes (a piece of a character when it splits one)")


class ContentLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Answer):
    content: list[ContentLogprob] | None


class CompletionLogprobs(Answer):
    """/v1/completions' (legacy) log-probabilities."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class Usage(Answer):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Message(Answer):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(Answer):
    index: int
    message: Message
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class OpenAIObject(Answer):
    """What every OpenAI object of an answer carries: its id, time and model; its usage (the last
    streamed chunk's, or the whole answer's); who answered (adapter, base) where it says so."""

    id: str
    created: int
    model: str
    usage: Usage | None = None
    adapter: str | None = None
    base: str | None = None


class ChatCompletion(OpenAIObject):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    adapter: str | None = Field(description="the adapter that answered (null: the base)")
    base: str


class Delta(Answer):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(Answer):
    index: int
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(OpenAIObject):
    """One server-sent event of a streamed chat answer; the last content chunk names adapter and base."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]


class CompletionChoice(Answer):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


class TextCompletion(OpenAIObject):
    """POST /v1/completions, whole or (object the same) each streamed chunk."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelObject(Answer):
    id: str = Field(description="the base id, or <base>:<adapter ref>")
    object: Literal["model"] = "model"
    created: int = Field(
        description="unix seconds: an adapter's publication; the base's, when this gateway began serving it"
    )
    owned_by: str
    root: str
    parent: str | None = None
    modality: str | None = None
    adapter: str | None = None
    created_at: str | None = None


class ModelList(Answer):
    object: Literal["list"] = "list"
    data: list[ModelObject]


# -- adapters, tenants, operations -----------------------------------------------------------------
class AdapterView(Answer):
    adapter: str = Field(description="owner/name/vN")
    model: str = Field(description="its OpenAI model id, <base>:<adapter>")
    name: str
    version: int
    modality: str
    rank: int
    owner: str
    source: str
    created_at: str
    weights_sha256: str


class AdapterDetail(AdapterView):
    versions: list[int]
    metrics: dict[str, Any]


class AdapterList(Answer):
    adapters: list[AdapterView]


class AdaptersDeleted(Answer):
    deleted: list[str]


class TenantCreated(Answer):
    name: str
    key: str
    detail: str


class TenantList(Answer):
    tenants: list[str]


class TenantDeleted(Answer):
    deleted: str


class Health(BaseModel):
    """GET /healthz: the status; with the admin key, also a replica's details (its loaded adapters, counters)."""

    model_config = ConfigDict(extra="allow")
    status: Literal["ok"]


# -- errors (serve/errors.py makes them) -------------------------------------------------------------
class Error(Answer):
    error: str = Field(examples=["undecodable_video"])
    detail: str = Field(description="what was wrong and how to fix it")


class OpenAIErrorDetail(Answer):
    message: str
    type: str = Field(examples=["invalid_request_error"])
    code: str = Field(examples=["model_not_found"])
    param: str | None = None


class OpenAIError(Answer):
    """OpenAI's error shape (the OpenAI routes)."""

    error: OpenAIErrorDetail
