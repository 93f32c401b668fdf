"""The OpenAPI document from the models: what a route reads (serve/bodies.py), what it answers
(serve/answers.py) and its errors (their shapes, serve/errors.py). The routes read their bodies
through a size cap and validate them with those models, so their request bodies are declared from
the models here (`body`); answers are the routes' response models. `finish` adds what only the
serve config knows (its token and choice limits). GET /openapi.json and /docs serve it;
docs/openapi.json is the committed copy (`make openapi`)."""

import copy

from pydantic import BaseModel

from serve import answers
from serve.bodies import non_null

# Nested models go to components/schemas, where their $refs point.
SCHEMAS: dict[str, dict] = {}


def schema(model: type[BaseModel], mode: str = "validation") -> dict:
    doc = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
    SCHEMAS.update(doc.pop("$defs", {}))
    return doc


def body(*models: type[BaseModel], form: dict | None = None) -> dict:
    """A route's request body: JSON of `models` (one of them), or with `form` a multipart body too."""
    docs = [schema(m) for m in models]
    content = {"application/json": {"schema": docs[0] if len(docs) == 1 else {"oneOf": docs}}} if docs else {}
    if form is not None:
        content = {"multipart/form-data": {"schema": form}, **content}
    return {"requestBody": {"required": True, "content": content}}


def multipart(fields: type[BaseModel] | None = None, required: tuple[str, ...] = (), **files: dict) -> dict:
    """A multipart body's schema: `files` (name -> its schema) beside the text fields of `fields`
    (never null: form fields are text)."""
    props = dict(files)
    if fields is not None:
        props.update({k: non_null(v) for k, v in schema(fields)["properties"].items()})
    return {
        "type": "object",
        "required": list(required),
        "maxProperties": 8,
        "additionalProperties": False,
        "properties": props,
    }


def errors(openai: bool = False) -> dict:
    """Every route's errors: any 4xx or 5xx, in our shape or (the OpenAI routes) OpenAI's."""
    model = answers.OpenAIError if openai else answers.Error
    return {
        "4XX": {"model": model, "description": "the request's problem, and how to fix it"},
        "5XX": {"model": model, "description": "the server's (503 and 504 with Retry-After where retrying helps)"},
    }


def streamed(description: str, openai: bool = False) -> dict:
    """A 200 that is JSON (the route's response model), or server-sent events when streamed."""
    sse = {"text/event-stream": {"schema": {"type": "string", "description": description}}}
    return {
        200: {"description": "JSON; or, streamed, server-sent events ending with data: [DONE]", "content": sse},
        **errors(openai),
    }


# body fields bounded by the serve config
LIMITS = {
    "max_new_tokens": "max_new_tokens",
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "n": "max_n",
}


def _bound(node, limits: dict) -> None:
    """Set each limited field's maximum, wherever it sits in a schema (oneOf branches included, and
    a nullable field's integer branch)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                for name, prop in value.items():
                    if name not in LIMITS or not isinstance(prop, dict):
                        continue
                    for branch in prop.get("anyOf", [prop]):
                        if branch.get("type") == "integer":
                            branch["maximum"] = limits[LIMITS[name]]
            _bound(value, limits)
    elif isinstance(node, list):
        for item in node:
            _bound(item, limits)


def finish(doc: dict, limits: dict) -> dict:
    """FastAPI's document with the request models' nested schemas and the config's limits
    (`limits`: max_new_tokens, max_n)."""
    doc = copy.deepcopy(doc)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(copy.deepcopy(SCHEMAS))
    for path in doc["paths"].values():
        for op in path.values():
            _bound(op.get("requestBody"), limits)
    _bound(schemas, limits)
    return doc
