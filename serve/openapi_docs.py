"""The OpenAPI document's route tables: request bodies from serve/bodies.py's models (the routes
read raw requests through a size cap and validate them with those models, so FastAPI can't infer
them), responses and errors. GET /openapi.json and /docs serve it; docs/openapi.json is the
committed copy (`make openapi`)."""

import copy

from ddft.adapters.ref import NAME as _NAME
from serve import bodies

ERROR = {
    "description": "JSON error",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error", "detail"],
                "properties": {
                    "error": {"type": "string", "example": "undecodable_video"},
                    "detail": {"type": "string", "description": "what was wrong and how to fix it"},
                },
            }
        }
    },
}

OPENAI_ERROR = {
    "description": "OpenAI's error shape (the OpenAI routes)",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "properties": {
                            "message": {"type": "string"},
                            "type": {"type": "string", "example": "invalid_request_error"},
                            "code": {"type": "string", "example": "model_not_found"},
                            "param": {"type": "string", "nullable": True},
                        },
                    }
                },
            }
        }
    },
}


def _errors(*codes: int, shape: dict = ERROR) -> dict:
    return {str(c): shape for c in codes}


# Request schemas are the models' (serve/bodies.py): the server validates with the same models, so
# a body they accept is never refused as malformed (400). What a schema can't say (media that
# decodes, an adapter of the request's modality, one medium per conversation, tensors that fit the
# base) is a 422. Token and choice maxima follow the serve config (finish()). Nested models go to
# components/schemas (SCHEMAS), where their $refs point.
SCHEMAS: dict[str, dict] = {}


def schema(model: type[bodies.Body]) -> dict:
    doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
    SCHEMAS.update(doc.pop("$defs", {}))
    return doc


def _json_body(model: type[bodies.Body]) -> dict:
    return {"application/json": {"schema": schema(model)}}


def _sse(description: str) -> dict:
    """A 200 that is JSON, or server-sent events when streamed."""
    return {
        "200": {
            "description": "JSON; or, streamed, server-sent events ending with data: [DONE]",
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "text/event-stream": {"schema": {"type": "string", "description": description}},
            },
        }
    }


_FORM = schema(bodies.RecipeForm)
RECIPES = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["video"],
                    "maxProperties": 8,
                    "properties": {
                        "video": {"type": "string", "format": "binary"},
                        **{k: bodies.non_null(v) for k, v in _FORM["properties"].items()},  # form fields: text
                    },
                }
            },
            **_json_body(bodies.RecipeJson),
        },
    },
    "parameters": [
        {
            "name": "stream",
            "in": "query",
            "schema": {"type": "boolean", "default": False},
            "description": "answer as server-sent events: `delta` events {text} as the recipe is written, "
            "then one `recipe` event (the JSON answer), or an `error` event",
        }
    ],
    "responses": {
        **_sse('event: delta / data: {"text"}; event: recipe / data: <the JSON answer>'),
        **_errors(400, 401, 404, 413, 415, 422, 502, 503),
    },
}

GENERATE = {
    "requestBody": {"required": True, "content": _json_body(bodies.Generate)},
    "responses": _errors(400, 401, 404, 413, 422, 502, 503),
}

CHAT = {
    "requestBody": {"required": True, "content": _json_body(bodies.Chat)},
    "responses": {
        **_sse("data: <chat.completion.chunk>, as OpenAI streams them"),
        **_errors(400, 401, 404, 413, 422, 502, 503, shape=OPENAI_ERROR),
    },
}

COMPLETIONS = {
    "requestBody": {"required": True, "content": _json_body(bodies.Completion)},
    "responses": {
        **_sse("data: <text_completion chunk>, as OpenAI streams them"),
        **_errors(400, 401, 404, 413, 422, 502, 503, shape=OPENAI_ERROR),
    },
}

NAME = {"type": "string", "pattern": _NAME.pattern}
UPLOAD = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files", "modality"],
                    "maxProperties": 8,
                    "properties": {
                        "files": {
                            "type": "array",
                            "minItems": 2,
                            "maxItems": 8,
                            "items": {"type": "string", "format": "binary"},
                            "description": "adapter_config.json and adapter_model.safetensors (never pickle)",
                        },
                        "modality": {"type": "string", "enum": ["image", "video", "text"]},
                    },
                }
            },
            "application/x-tar": {"schema": {"type": "string", "format": "binary"}},
            "application/zip": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "parameters": [
        {
            "name": "modality",
            "in": "query",
            "schema": {"type": "string", "enum": ["image", "video", "text"]},
            "description": "for archive bodies",
        }
    ],
    "responses": _errors(400, 401, 403, 413, 415, 422),
}

TENANT = {
    "requestBody": {"required": True, "content": _json_body(bodies.NewTenant)},
    "responses": _errors(401, 403, 409),
}


# -- what FastAPI can't know: statuses every route may answer, and the non-JSON answers ---------------
# Any route answers 401 to a wrong key; what each route answers beyond its own table is here.
_MORE = {
    ("get", "/v1/adapters/{name}"): (404,),
    ("delete", "/v1/adapters/{name}"): (404,),
    ("get", "/v1/models/{model_id}"): (404,),
    ("delete", "/v1/tenants/{name}"): (403, 404),
    ("get", "/v1/tenants"): (403,),
    ("put", "/v1/adapters/{name}"): (404, 409, 502),
}
_CREATED = {("put", "/v1/adapters/{name}"), ("post", "/v1/tenants")}
_TEXT = {"/metrics": "Prometheus text exposition format"}
HEALTH = {
    "200": {
        "description": "status only; with the admin key also a replica's loaded adapters and counters",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["status"],
                    "properties": {"status": {"type": "string", "enum": ["ok"]}},
                }
            }
        },
    }
}


_PATH_NAMES = {
    ("put", "/v1/adapters/{name}"): NAME["pattern"],
    ("get", "/v1/adapters/{name}"): r"^[a-z0-9][a-z0-9_.-]{0,63}(/v[1-9][0-9]{0,8})?$",
    ("delete", "/v1/adapters/{name}"): r"^[a-z0-9][a-z0-9_.-]{0,63}(/v[1-9][0-9]{0,8})?$",
}
# body fields bounded by the serve config
_LIMITS = {
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
                for field, prop in value.items():
                    if field not in _LIMITS or not isinstance(prop, dict):
                        continue
                    for branch in prop.get("anyOf", [prop]):
                        if branch.get("type") == "integer":
                            branch["maximum"] = limits[_LIMITS[field]]
            _bound(value, limits)
    elif isinstance(node, list):
        for item in node:
            _bound(item, limits)


def finish(doc: dict, openai_routes: tuple[str, ...], limits: dict) -> dict:
    """The generated document made true to the server: its error shapes (ours, or OpenAI's on the
    OpenAI routes) instead of FastAPI's 422 validation schema (the app answers 400), 401 on every
    route, 201 for creations, /metrics as text, /healthz's 503, path names' grammar, and the
    config's limits (`limits`: max_new_tokens, max_n)."""
    doc = copy.deepcopy(doc)  # the route tables above are shared: limits go into this document only
    for path, ops in doc["paths"].items():
        shape = OPENAI_ERROR if path.startswith(openai_routes) else ERROR
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            if "HTTPValidationError" in str(responses.get("422", "")):
                responses["422"] = shape  # a route's own 422 (content a schema can't describe), or none
                if "requestBody" not in op:
                    del responses["422"]
            for code in (400, 401, *_MORE.get((method, path), ())):
                responses.setdefault(str(code), shape)
            if (method, path) in _CREATED:
                responses["201"] = {**responses.pop("200", {}), "description": "created"}
            if path in _TEXT:
                responses["200"] = {
                    "description": _TEXT[path],
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            if path == "/healthz":
                responses.update(HEALTH, **{"503": shape})
            for param in op.get("parameters", []):
                if param.get("in") == "path" and (method, path) in _PATH_NAMES:
                    param["schema"] = {"type": "string", "pattern": _PATH_NAMES[(method, path)]}
            _bound(op.get("requestBody"), limits)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas.update(copy.deepcopy(SCHEMAS))  # the bodies' nested models
    _bound(schemas, limits)
    if "components" in doc and not schemas:
        doc["components"].pop("schemas", None)
        if not doc["components"]:
            del doc["components"]
    return doc
