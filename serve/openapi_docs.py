"""Request bodies for the OpenAPI document (the routes read raw requests, to check sizes and
give precise errors, so FastAPI can't infer them). GET /openapi.json and /docs serve it;
docs/openapi.json is the committed copy (`make openapi`)."""

import copy

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


def _json(properties: dict, required: list[str]) -> dict:
    return {"application/json": {"schema": {"type": "object", "properties": properties, "required": required}}}


# Request schemas are as strict as the server: a body they accept is never refused as malformed
# (400). What a schema can't say (media that decodes, an adapter of the request's modality, one
# medium per conversation, tensors that fit the base) is a 422. Token and choice maxima follow
# the serve config (finish()).
TEXT = {"type": "string", "pattern": r"\S"}  # something besides blanks
KEY = {
    "type": "string",
    "minLength": 1,
    "pattern": r"^[^\x00-\x1f\x7f]+$",
    "description": "a store key (or a URI inside the server's store) under serve.media_prefixes, "
    "e.g. datasets/raw/clips/one.mp4",
}
BASE64 = {"type": "string", "pattern": r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"}
STOP = {
    "oneOf": [
        {"type": "string", "minLength": 1, "maxLength": 64},
        {"type": "array", "maxItems": 4, "items": {"type": "string", "minLength": 1, "maxLength": 64}},
    ]
}


def _nullable(fields: dict) -> dict:
    """The same fields, each also null (the server takes null as absent)."""
    out = {}
    for name, schema in fields.items():
        if "oneOf" in schema:
            out[name] = {**schema, "oneOf": [*schema["oneOf"], {"type": "null"}]}
        else:
            kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
            out[name] = {**schema, "type": [*kinds, *(["null"] if "null" not in kinds else [])]}
    return out


GEN = {
    "adapter": {**TEXT, "description": "name, name/vN, owner/name/vN or <base>:owner/name/vN"},
    "max_new_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "stop": STOP,
    "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
}
FORM_GEN = {k: GEN[k] for k in ("adapter", "max_new_tokens")}  # multipart fields: text, never null
GEN = _nullable(GEN)
MODEL = {"type": "string", "minLength": 1, "description": "the base id or <base>:<adapter> (GET /v1/models)"}
OPENAI_GEN = {
    "max_tokens": {"type": "integer", "minimum": 1},
    "max_completion_tokens": {"type": "integer", "minimum": 1},
    "temperature": GEN["temperature"],
    "stop": STOP,
    "seed": GEN["seed"],
    "n": {"type": "integer", "minimum": 1, "description": "choices, up to serve.max_n; n > 1 is not streamed"},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
}
OPENAI_GEN = _nullable(OPENAI_GEN)
# stream_options only with "stream": true, and n > 1 only unstreamed
STREAM_RULES = {
    "dependentSchemas": {"stream_options": {"required": ["stream"], "properties": {"stream": {"const": True}}}},
    "if": {"required": ["stream"], "properties": {"stream": {"const": True}}},
    "then": {"properties": {"n": {"maximum": 1}}},
}


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


RECIPES = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["video"],
                    "maxProperties": 8,
                    "properties": {"video": {"type": "string", "format": "binary"}, **FORM_GEN},
                }
            },
            **_json({"video_uri": KEY, **GEN}, ["video_uri"]),
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
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        {
                            "type": "object",
                            "required": ["modality", "question"],
                            "properties": {"modality": {"type": "string", "enum": ["text"]}, "question": TEXT, **GEN},
                        },
                        {
                            "type": "object",
                            "required": ["modality", "image_b64"],
                            "properties": {
                                "modality": {"type": "string", "enum": ["image"]},
                                "question": TEXT,
                                "image_b64": BASE64,
                                **GEN,
                            },
                        },
                        {
                            "type": "object",
                            "required": ["modality", "image_uri"],
                            "properties": {
                                "modality": {"type": "string", "enum": ["image"]},
                                "question": TEXT,
                                "image_uri": KEY,
                                **GEN,
                            },
                        },
                    ]
                }
            }
        },
    },
    "responses": _errors(400, 401, 404, 413, 422, 502, 503),
}

_URL = {
    "type": "object",
    "required": ["url"],
    "properties": {"url": {**KEY, "description": "a data: URL (base64) or a store key under serve.media_prefixes"}},
}
PART = {
    "oneOf": [
        {
            "type": "object",
            "required": ["type", "text"],
            "properties": {"type": {"type": "string", "enum": ["text"]}, "text": TEXT},
        },
        {
            "type": "object",
            "required": ["type", "image_url"],
            "properties": {"type": {"type": "string", "enum": ["image_url"]}, "image_url": _URL},
        },
        {
            "type": "object",
            "required": ["type", "video_url"],
            "properties": {"type": {"type": "string", "enum": ["video_url"]}, "video_url": _URL},
        },
    ]
}
CHAT = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["model", "messages"],
                    **STREAM_RULES,
                    "properties": {
                        "model": MODEL,
                        "messages": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["role", "content"],
                                "properties": {
                                    "role": {"type": "string", "enum": ["system", "user", "assistant"]},
                                    "content": {
                                        "oneOf": [TEXT, {"type": "array", "minItems": 1, "items": PART}],
                                        "description": "a string, or parts: text, image_url {url}, "
                                        "video_url {url} (one medium per conversation)",
                                    },
                                },
                            },
                        },
                        **OPENAI_GEN,
                    },
                }
            }
        },
    },
    "responses": {
        **_sse("data: <chat.completion.chunk>, as OpenAI streams them"),
        **_errors(400, 401, 404, 413, 422, 502, 503, shape=OPENAI_ERROR),
    },
}

COMPLETIONS = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["model", "prompt"],
                    **STREAM_RULES,
                    "properties": {
                        "model": {**MODEL, "description": "the base id or <base>:<adapter> (a text adapter)"},
                        "prompt": {
                            "description": "the whole prompt, continued as it is (no chat template): "
                            "a string, or a list of one",
                            "oneOf": [TEXT, {"type": "array", "items": TEXT, "minItems": 1, "maxItems": 1}],
                        },
                        **OPENAI_GEN,
                    },
                }
            }
        },
    },
    "responses": {
        **_sse("data: <text_completion chunk>, as OpenAI streams them"),
        **_errors(400, 401, 404, 413, 422, 502, 503, shape=OPENAI_ERROR),
    },
}

NAME = {"type": "string", "pattern": "^[a-z0-9][a-z0-9_.-]{0,63}$"}
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
    "requestBody": {
        "required": True,
        "content": _json({"name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_.-]{0,56}$"}}, ["name"]),
    },
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
    """Set each limited field's maximum, wherever it sits in a schema (oneOf branches included)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                for field, schema in value.items():
                    kinds = schema.get("type") if isinstance(schema, dict) else None
                    if field in _LIMITS and "integer" in (kinds if isinstance(kinds, list) else [kinds]):
                        schema["maximum"] = limits[_LIMITS[field]]
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
    schemas = doc.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    if "components" in doc and not schemas:
        doc["components"].pop("schemas", None)
        if not doc["components"]:
            del doc["components"]
    return doc
