"""What every route accepts, as pydantic models: one home for both the checks and the OpenAPI
request schemas (serve/openapi_docs.py publishes these models' JSON Schema).

The routes read bodies themselves (through a size cap, serve/inputs.py) and then validate them
here with `parse`, which turns pydantic's first error into a BadArgument with a short code and a
sentence that says how to fix it. Types are JSON's, strictly: "5" is not a number, 5.0 is an
integer (JSON Schema says so), "true" is not a boolean, so the documented schema and the server
refuse the same bodies. Limits that follow the serve config (max_new_tokens, n) come in as the
validation context (`Limits`).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ddft.adapters.ref import SHAPE, TENANT_NAME
from ddft.engines.base import MAX_LOGPROBS
from ddft.engines.grammar import Constraint, check
from ddft.errors import BadArgument, BadConstraint, Invalid

_OURS = "ddft."  # the error types raised here: "ddft.<code>"


def refuse(code: str, detail: str) -> PydanticCustomError:
    """A refusal with our own code, from inside a validator."""
    return PydanticCustomError(_OURS + code, "{detail}", {"detail": detail})


@dataclass(frozen=True)
class Limits:
    """What the serve config bounds (the validation context)."""

    max_new_tokens: int = 96
    max_n: int = 4
    base_id: str = "<base>"


def _json_int(value: Any) -> Any:
    """JSON's integers: 5 and 5.0 (to JSON Schema both are integers); never a string or a boolean."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


def _form_int(value: Any) -> Any:
    """A multipart field's integer: form fields are text."""
    return int(value) if isinstance(value, str) and value.isdigit() else value


def json_int(description: str | None = None, **bounds):
    """An integer field within `bounds` (ge, le), as JSON has them (the bounds inside, so the schema shows them)."""
    return Annotated[StrictInt, Field(description=description, **bounds), BeforeValidator(_json_int)]


Text = Annotated[StrictStr, Field(pattern=r"^\s*\S")]  # something besides blanks
Key = Annotated[
    StrictStr,
    Field(
        min_length=1,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="a store key (or a URI inside the server's store) under serve.media_prefixes, "
        "e.g. datasets/raw/clips/one.mp4",
    ),
]
StopText = Annotated[StrictStr, Field(min_length=1, max_length=64)]
Stop = StopText | Annotated[list[StopText], Field(max_length=4)]
Adapter = Annotated[
    StrictStr, Field(pattern=SHAPE.pattern, description="name, name/vN, owner/name/vN or <base>:owner/name/vN")
]
Temperature = Annotated[StrictFloat, Field(ge=0, le=2)]  # an integer is a number too
Seed = json_int(ge=0, le=2**53 - 1)  # the largest integer every JSON client reads exactly
Tokens = json_int(ge=1)  # and at most Limits.max_new_tokens
Choices = json_int("choices, up to serve.max_n; n > 1 is not streamed", ge=1)


def _within(cls, value: int | None, info: ValidationInfo) -> int | None:
    """A token limit at most the serve config's max_new_tokens."""
    cap = _limits(info).max_new_tokens
    if value is not None and value > cap:
        raise refuse(f"bad_{info.field_name}", f"{info.field_name} must be an integer from 1 to {cap}")
    return value


def non_null(schema: dict) -> dict:
    """A field's JSON Schema without its null branch: for where null can't be sent (multipart) or a
    variant requires the field."""
    branches = [b for b in schema.get("anyOf", []) if b.get("type") != "null"]
    if len(branches) != 1:
        return schema
    rest = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
    return {**rest, **branches[0]}


def _limits(info: ValidationInfo) -> Limits:
    return info.context if isinstance(info.context, Limits) else Limits()


def _settings(tokens: int, temperature: float | None, stop: str | list[str] | None, seed: int | None, **more) -> dict:
    """GenerateRequest's settings from a validated body's fields (null is the default). Plain
    values: building another model here would validate again, without the config's limits."""
    return {
        "max_new_tokens": tokens,
        "temperature": float(temperature or 0.0),
        "stop": [stop] if isinstance(stop, str) else list(stop or []),
        "seed": seed,
        **{k: v for k, v in more.items() if v is not None},
    }


class Body(BaseModel):
    # Nothing asked is ignored: a field no model here has is refused, named (unsupported_field).
    model_config = ConfigDict(extra="forbid", frozen=True)


def _no_stop(cls, data):
    """A recipe ends where the recipe grammar says: a stop string could cut it before its steps, an
    answer its schema forbids."""
    if isinstance(data, dict) and "stop" in data and cls.__name__.startswith("Recipe"):
        raise refuse(
            "unsupported_stop",
            "stop is not taken on /v1/recipes: the recipe grammar decides where a recipe ends; "
            "bound it with max_new_tokens",
        )
    return data


class RecipeKnobs(Body):
    """Generation settings every inference route takes; null is the same as absent. No `stop` on
    recipes (_no_stop)."""

    refuse_stop = model_validator(mode="before")(classmethod(_no_stop))

    adapter: Adapter | None = None
    max_new_tokens: Tokens | None = None
    temperature: Temperature | None = None
    seed: Seed | None = None

    check_cap = field_validator("max_new_tokens")(classmethod(_within))

    def generation(self, cap: int) -> dict:
        """The GenerateRequest settings this body asks for (`cap` when it names no token limit)."""
        return _settings(self.max_new_tokens or cap, self.temperature, getattr(self, "stop", None), self.seed)


class Knobs(RecipeKnobs):
    stop: Stop | None = None


class RecipeJson(RecipeKnobs):
    """POST /v1/recipes as JSON: a video already in the store."""

    video_uri: Key


class RecipeForm(Body):
    """POST /v1/recipes as multipart: the text fields beside the `video` file."""

    refuse_stop = model_validator(mode="before")(classmethod(_no_stop))

    adapter: Adapter | None = None
    max_new_tokens: Annotated[StrictInt, Field(ge=1), BeforeValidator(_form_int)] | None = None

    check_cap = field_validator("max_new_tokens")(classmethod(_within))

    def generation(self, cap: int) -> dict:
        return _settings(self.max_new_tokens or cap, None, None, None)


Base64 = Annotated[StrictStr, Field(pattern=r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$")]


def _generate_variants(schema: dict) -> None:
    """Generate's cross-field rules (its `_media` validator) said in JSON Schema: one of three shapes."""
    props = schema.pop("properties")
    schema.pop("required", None)
    closed = schema.pop("additionalProperties", True)  # each shape lists all its fields
    knobs = {k: v for k, v in props.items() if k not in ("modality", "question", "image_b64", "image_uri")}
    question = non_null(props["question"])

    def variant(modality: str, field: str | None, required: str) -> dict:
        own = {"modality": {"type": "string", "enum": [modality]}, "question": question}
        if field:
            own[field] = non_null(props[field])
        return {
            "type": "object",
            "required": ["modality", required],
            "properties": {**own, **knobs},
            "additionalProperties": closed,
        }

    schema["oneOf"] = [
        variant("text", None, "question"),
        variant("image", "image_b64", "image_b64"),
        variant("image", "image_uri", "image_uri"),
    ]


class Generate(Knobs):
    """POST /v1/generate: a text question, or an image (base64 or a store key) and its question."""

    model_config = ConfigDict(json_schema_extra=_generate_variants)

    modality: Literal["text", "image"]
    question: Text | None = None  # an image's defaults to the dish question
    image_b64: Base64 | None = None
    image_uri: Key | None = None

    @field_validator("modality", mode="before")
    @classmethod
    def _no_video(cls, value):
        if value == "video":
            raise refuse("bad_modality", "videos go to POST /v1/recipes (multipart 'video' or video_uri)")
        return value

    @model_validator(mode="after")
    def _media(self):
        given = [k for k in ("image_b64", "image_uri") if getattr(self, k) is not None]
        if self.modality == "text":
            if given:
                raise refuse("bad_request", 'a text request carries no image; use modality "image"')
            if self.question is None:
                raise refuse("missing_question", 'give a non-empty "question" string')
        elif len(given) != 1:
            raise refuse(
                "missing_image",
                "give exactly one of image_b64 (base64 of the file) or image_uri (a store key or URI)",
            )
        return self

    def image(self) -> bytes | None:
        return None if self.image_b64 is None else base64.b64decode(self.image_b64, validate=True)


# -- OpenAI's bodies ------------------------------------------------------------------------------
class MediaUrl(Body):
    url: Annotated[Key, Field(description="a data: URL (base64) or a store key under serve.media_prefixes")]
    detail: Literal["auto"] | None = Field(None, description="OpenAI's; one resolution is served: auto only")


class TextPart(Body):
    type: Literal["text"]
    text: Text


class ImagePart(Body):
    type: Literal["image_url"]
    image_url: MediaUrl


class VideoPart(Body):
    type: Literal["video_url"]
    video_url: MediaUrl


Part = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class Message(Body):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="developer is OpenAI's new name for system"
    )
    content: Text | Annotated[list[Part], Field(min_length=1)] = Field(
        description="a string, or parts: text, image_url {url}, video_url {url} (one medium per conversation)"
    )

    def parts(self) -> list[TextPart | ImagePart | VideoPart]:
        return [TextPart(type="text", text=self.content)] if isinstance(self.content, str) else self.content


# OpenAI fields this server does not implement: refused (unsupported_<field>) unless absent or a default
_UNSUPPORTED = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
}


_NEEDS_STREAM = {"required": ["stream"], "properties": {"stream": {"const": True}}}


class StreamOptions(Body):
    include_usage: StrictBool = False


class OpenAIKnobs(Body):
    """OpenAI's generation fields, on both OpenAI routes."""

    # `_streaming` in JSON Schema: stream_options only with "stream": true, n > 1 only unstreamed
    model_config = ConfigDict(
        json_schema_extra={
            "dependentSchemas": {"stream_options": _NEEDS_STREAM},
            "if": {"required": ["stream"], "properties": {"stream": {"const": True}}},
            "then": {"properties": {"n": {"maximum": 1}}},
        }
    )

    model: Annotated[StrictStr, Field(min_length=1, description="the base id or <base>:<adapter> (GET /v1/models)")]
    max_tokens: Tokens | None = None
    max_completion_tokens: Tokens | None = None
    temperature: Temperature | None = None
    stop: Stop | None = None
    seed: Seed | None = None
    n: Choices | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    top_p: Annotated[StrictFloat, Field(gt=0, le=1)] | None = None
    # OpenAI's fields this server does not implement: only their defaults are accepted (_UNSUPPORTED)
    frequency_penalty: Annotated[StrictFloat, Field(ge=0, le=0)] | None = None
    presence_penalty: Annotated[StrictFloat, Field(ge=0, le=0)] | None = None
    logit_bias: Annotated[dict[str, Any], Field(max_length=0)] | None = None

    check_cap = field_validator("max_tokens", "max_completion_tokens")(classmethod(_within))

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data):
        if isinstance(data, dict):
            for key, defaults in _UNSUPPORTED.items():
                if key in cls.model_fields and key in data and data[key] not in defaults:
                    raise refuse(f"unsupported_{key}", f"{key} is not supported here; leave it out")
        return data

    @field_validator("n")
    @classmethod
    def _max_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        limit = _limits(info).max_n
        if value is not None and value > limit:
            raise refuse("bad_n", f"n must be an integer from 1 to {limit} (serve.max_n)")
        return value

    @model_validator(mode="after")
    def _streaming(self):
        if "stream_options" in self.model_fields_set and not self.stream:  # null too: as the schema says
            raise refuse("bad_stream_options", 'stream_options is only allowed with "stream": true')
        if (self.n or 1) > 1 and self.stream:
            raise refuse("bad_n", 'n > 1 is answered whole: drop "stream", or stream with n=1')
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def generation(self, cap: int) -> dict:
        tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return _settings(tokens or cap, self.temperature, self.stop, self.seed, top_p=self.top_p)


class TextFormat(Body):
    type: Literal["text"]


class JsonObjectFormat(Body):
    type: Literal["json_object"]


class JsonSchema(Body):
    name: Annotated[StrictStr, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: StrictStr | None = None
    schema_: Annotated[dict[str, Any] | StrictBool, Field(alias="schema")] = Field(
        True, description="the JSON Schema the answer is decoded under (absent: any JSON)"
    )
    strict: StrictBool | None = Field(None, description="accepted; the answer always matches the schema")


class JsonSchemaFormat(Body):
    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class Chat(OpenAIKnobs):
    """POST /v1/chat/completions."""

    # OpenAIKnobs' rules, and top_logprobs only with "logprobs": true (`_logprobs`)
    model_config = ConfigDict(
        json_schema_extra={
            "dependentSchemas": {
                "stream_options": _NEEDS_STREAM,
                "top_logprobs": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
            },
            "if": {"required": ["stream"], "properties": {"stream": {"const": True}}},
            "then": {"properties": {"n": {"maximum": 1}}},
        }
    )

    messages: Annotated[list[Message], Field(min_length=1)]
    logprobs: StrictBool | None = Field(None, description="each answer token's log-probability (the model's own)")
    top_logprobs: (
        json_int("with logprobs: that many likeliest alternatives per token", ge=0, le=MAX_LOGPROBS) | None
    ) = None
    tools: Annotated[list[Any], Field(max_length=0)] | None = None
    tool_choice: Literal["none"] | None = None
    functions: Annotated[list[Any], Field(max_length=0)] | None = None
    function_call: Literal["none"] | None = None
    response_format: ResponseFormat | None = Field(
        None,
        description="OpenAI's: text, json_object (any JSON object) or json_schema {name, schema, strict}; the "
        "answer is decoded under it (grammar-constrained), so it is JSON matching the schema unless cut by max_tokens",
    )

    def constraint(self) -> Constraint | None:
        """What the answer is decoded under, checked: a schema the decoder can't use (it doesn't
        compile, or has a keyword it would not enforce) is ddft.errors.BadConstraint, a 422 like
        any well-formed request whose content can't be used (schemathesis holds the app to that)."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return Constraint("json_object")
        constraint = Constraint.schema(fmt.json_schema.schema_)
        try:
            check(constraint)
        except BadConstraint as err:
            raise BadConstraint(f"response_format.json_schema.schema: {err.detail}") from None
        return constraint

    @model_validator(mode="after")
    def _logprobs(self):
        if "top_logprobs" in self.model_fields_set and not self.logprobs:  # null too: as the schema says
            raise refuse("bad_top_logprobs", 'top_logprobs needs "logprobs": true')
        return self

    def generation(self, cap: int) -> dict:
        """OpenAIKnobs' settings, the log-probabilities asked for, and the response_format's
        constraint when it sets one."""
        constraint = self.constraint()
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return {
            **super().generation(cap),
            **({"constraint": constraint} if constraint else {}),
            **({"logprobs": logprobs} if logprobs is not None else {}),
        }


class Completion(OpenAIKnobs):
    """POST /v1/completions: one prompt, continued as it is (no chat template)."""

    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1)] = Field(
        description="the whole prompt, continued as it is (no chat template): a string, or a list of one"
    )
    logprobs: json_int("each token's log-probability and that many likeliest alternatives", ge=0, le=5) | None = None
    echo: Literal[False] | None = None
    suffix: Literal[""] | None = None
    best_of: Literal[1] | None = None

    def generation(self, cap: int) -> dict:
        return {**super().generation(cap), **({"logprobs": self.logprobs} if self.logprobs is not None else {})}

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class NewTenant(Body):
    """POST /v1/tenants."""

    name: Annotated[StrictStr, Field(pattern=TENANT_NAME.pattern)]


# -- a refused body as the client sees it ---------------------------------------------------------
# The field (first part of the error's place) -> its code, and the sentence that says how to fix it.
_FIELDS: dict[str, tuple[str, str]] = {
    "adapter": ("bad_adapter", "adapter is a string: name, name/vN, owner/name/vN or <base>:owner/name/vN"),
    "max_new_tokens": ("bad_max_new_tokens", "max_new_tokens must be an integer from 1 to {max_new_tokens}"),
    "max_tokens": ("bad_max_tokens", "max_tokens must be an integer from 1 to {max_new_tokens}"),
    "max_completion_tokens": (
        "bad_max_completion_tokens",
        "max_completion_tokens must be an integer from 1 to {max_new_tokens}",
    ),
    "temperature": ("bad_temperature", "temperature must be a number from 0 (greedy) to 2"),
    "stop": ("bad_stop", "stop must be a string or a list of up to 4 non-empty strings (64 characters at most)"),
    "seed": ("bad_seed", "seed must be a non-negative integer"),
    "top_p": ("bad_top_p", "top_p must be a number above 0, at most 1"),
    "logprobs": (
        "bad_logprobs",
        "logprobs is true or false on /v1/chat/completions, an integer from 0 to 5 on /v1/completions",
    ),
    "top_logprobs": ("bad_top_logprobs", f"top_logprobs must be an integer from 0 to {MAX_LOGPROBS}"),
    "n": ("bad_n", "n must be an integer from 1 to {max_n} (serve.max_n)"),
    "stream": ("bad_stream", "stream must be true or false"),
    "stream_options": ("bad_stream_options", 'stream_options is {"include_usage": true|false}'),
    "model": (
        "missing_model",
        'give "model": {base_id!r} (routing picks the adapter) or "{base_id}:<adapter>"; GET /v1/models lists them',
    ),
    "messages": ("bad_message", "each message is an object {role: system|user|assistant, content}"),
    "prompt": (
        "bad_prompt",
        "prompt must be a non-empty string (or a list of exactly one); send several prompts as several requests",
    ),
    "modality": ("bad_modality", 'modality: use "text" or "image" (videos go to POST /v1/recipes)'),
    "question": ("missing_question", 'give a non-empty "question" string'),
    "image_b64": (
        "bad_image_b64",
        "image_b64 is not valid base64 (standard alphabet, padded); e.g. "
        "base64.b64encode(open(path, 'rb').read()).decode()",
    ),
    "image_uri": ("bad_uri", "image_uri is a store key under serve.media_prefixes, as plain text"),
    "video_uri": ("bad_uri", "video_uri is a store key under serve.media_prefixes, as plain text"),
    "name": ("tenant_bad_name", "name: lowercase letters, digits, '.', '-' and '_', starting with a letter or digit"),
    "response_format": (
        "bad_response_format",
        'response_format is {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": '
        '{"name": "<letters, digits, _ or ->", "schema": {...}, "strict": true}}',
    ),
}
_MISSING = {
    "video_uri": (
        "missing_video",
        'JSON requests give {"video_uri": "<store key or URI>"}; or upload the file as multipart field \'video\'',
    ),
    "messages": ("missing_messages", 'give "messages": a non-empty list of {role, content}'),
    "modality": ("bad_modality", 'give "modality": "text" or "image"'),
    "prompt": ("bad_prompt", _FIELDS["prompt"][1]),
}


def _fill(template: str, limits: Limits) -> str:
    """The config's limits in a sentence (the sentences hold JSON braces of their own: no str.format)."""
    for name, value in (
        ("{base_id!r}", repr(limits.base_id)),
        *((f"{{{k}}}", str(v)) for k, v in vars(limits).items()),
    ):
        template = template.replace(name, value)
    return template


def _refusal(error: dict, limits: Limits) -> BadArgument:
    kind, loc = error["type"], error["loc"]
    if kind.startswith(_OURS):
        return BadArgument(error["msg"], kind.removeprefix(_OURS))
    if kind == "extra_forbidden":  # never ignored: named, with the fix
        where = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".")
        return BadArgument(
            f"{where[:100]} is not a field this server reads or supports; leave it out (the API's schema lists them)",
            "unsupported_field",
        )
    field = str(loc[0]) if loc else ""
    if kind == "missing" and len(loc) == 1 and field in _MISSING:
        code, template = _MISSING[field]
        return BadArgument(_fill(template, limits), code)
    if field in _FIELDS and field != "messages":
        code, template = _FIELDS[field]
        return BadArgument(_fill(template, limits), code)
    if field == "messages" and len(loc) > 3 and loc[2] == "content":  # (a union's branch, then the part)
        part = next((x for x in loc[3:] if isinstance(x, int)), None)
        if part is None:
            code, detail = "bad_message", f"messages[{loc[1]}].content must be a non-empty string or a list of parts"
        elif loc[-1] == "url" and kind != "missing":
            code, detail = "bad_uri", "a media url is a data: URL or a store key, as plain text (no control characters)"
        else:
            code = "bad_content_part"
            detail = (
                f"messages[{loc[1]}].content[{part}]: use {{type: text, text}}, "
                "{type: image_url, image_url: {url}} or {type: video_url, video_url: {url}}"
            )
    elif field == "messages" and len(loc) >= 2:
        code, detail = "bad_message", f"messages[{loc[1]}] must be an object with role system, user or assistant"
    elif field == "messages":
        code, detail = "missing_messages", _MISSING["messages"][1]
    else:
        code, detail = f"bad_{field or 'request'}", error["msg"]
    return BadArgument(detail, code)


def parse(model: type[Body], data: Any, limits: Limits = Limits()) -> Any:
    """`data` as `model`, or the BadArgument (400) of its first problem."""
    try:
        return model.model_validate(data, context=limits)
    except ValidationError as err:
        problems = err.errors(include_url=False)
        ours = [e for e in problems if e["type"].startswith(_OURS)]
        # ours first; else the deepest (of a union's branches, the one that got furthest into the input)
        raise _refusal(ours[0] if ours else max(problems, key=lambda e: len(e["loc"])), limits) from None


def data_url(url: str, kind: str) -> bytes:
    """A data: URL's bytes (422: a well-formed string whose content is wrong)."""
    head, _, payload = url.partition(",")
    if ";base64" not in head:
        raise Invalid(f"{kind} data URLs must be base64: data:<mime>;base64,<data>", "bad_data_url")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise Invalid(f"the {kind} data URL is not valid base64", "bad_data_url") from None
