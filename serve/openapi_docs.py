"""Request bodies for the OpenAPI document (the routes read raw requests, to check sizes and
give precise errors, so FastAPI can't infer them). GET /openapi.json and /docs serve it;
docs/openapi.json is the committed copy (`make openapi`)."""

ERROR = {"description": "JSON error", "content": {"application/json": {"schema": {
    "type": "object", "required": ["error", "detail"],
    "properties": {"error": {"type": "string", "example": "undecodable_video"},
                   "detail": {"type": "string", "description": "what was wrong and how to fix it"}}}}}}

OPENAI_ERROR = {"description": "OpenAI's error shape (the OpenAI routes)", "content": {"application/json": {"schema": {
    "type": "object", "required": ["error"], "properties": {"error": {"type": "object", "properties": {
        "message": {"type": "string"}, "type": {"type": "string", "example": "invalid_request_error"},
        "code": {"type": "string", "example": "model_not_found"}, "param": {"type": "string", "nullable": True}}}}}}}}


def _errors(*codes: int, shape: dict = ERROR) -> dict:
    return {str(c): shape for c in codes}


def _json(properties: dict, required: list[str]) -> dict:
    return {"application/json": {"schema": {"type": "object", "properties": properties, "required": required}}}


GEN = {"adapter": {"type": "string", "description": "name, name/vN, owner/name/vN or <base>:owner/name/vN"},
       "max_new_tokens": {"type": "integer", "minimum": 1}, "temperature": {"type": "number", "minimum": 0},
       "stop": {"type": "array", "items": {"type": "string"}}, "seed": {"type": "integer"}}


def _sse(description: str) -> dict:
    """A 200 that is JSON, or server-sent events when streamed."""
    return {"200": {"description": "JSON; or, streamed, server-sent events ending with data: [DONE]", "content": {
        "application/json": {"schema": {"type": "object"}},
        "text/event-stream": {"schema": {"type": "string", "description": description}}}}}


RECIPES = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["video"], "properties": {
        "video": {"type": "string", "format": "binary"}, "adapter": {"type": "string"},
        "max_new_tokens": {"type": "integer"}}}},
    **_json({"video_uri": {"type": "string", "description": "a store key (or a URI inside the server's "
                                                     "store) under serve.media_prefixes, e.g. datasets/raw/clip.mp4"}, **GEN},
            ["video_uri"])}},
    "parameters": [{"name": "stream", "in": "query", "schema": {"type": "boolean", "default": False},
                    "description": "answer as server-sent events: `delta` events {text} as the recipe is written, "
                                   "then one `recipe` event (the JSON answer), or an `error` event"}],
    "responses": {**_sse("event: delta / data: {\"text\"}; event: recipe / data: <the JSON answer>"),
                  **_errors(400, 401, 404, 413, 415, 422, 502, 503)}}

GENERATE = {"requestBody": {"required": True, "content": _json(
    {"modality": {"type": "string", "enum": ["text", "image"]}, "question": {"type": "string"},
     "image_b64": {"type": "string", "format": "byte"}, "image_uri": {"type": "string", "description": "a store key under serve.media_prefixes"}, **GEN}, ["modality"])},
    "responses": _errors(400, 401, 404, 413, 422, 502, 503)}

CHAT = {"requestBody": {"required": True, "content": _json(
    {"model": {"type": "string", "description": "the base id or <base>:<adapter> (GET /v1/models)"},
     "messages": {"type": "array", "items": {"type": "object", "properties": {
         "role": {"type": "string", "enum": ["system", "user", "assistant"]},
         "content": {"description": "a string, or parts: text, image_url {url}, video_url {url}; urls are "
                                    "data: URLs or store keys under serve.media_prefixes"}}}},
     "max_tokens": {"type": "integer"}, "temperature": {"type": "number"}, "stop": {"type": "array"},
     "seed": {"type": "integer"}, "n": {"type": "integer", "minimum": 1, "description": "choices, up to serve.max_n"},
     "stream": {"type": "boolean", "description": "answer as chat.completion.chunk server-sent events"},
     "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}}},
    ["model", "messages"])},
    "responses": {**_sse("data: <chat.completion.chunk>, as OpenAI streams them"),
                  **_errors(400, 401, 404, 413, 422, 502, 503, shape=OPENAI_ERROR)}}

COMPLETIONS = {"requestBody": {"required": True, "content": _json(
    {"model": {"type": "string", "description": "the base id or <base>:<adapter> (a text adapter)"},
     "prompt": {"description": "the whole prompt, continued as it is (no chat template): a string, or a list "
                               "of one", "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"},
                                                                       "minItems": 1, "maxItems": 1}]},
     "max_tokens": {"type": "integer"}, "temperature": {"type": "number"}, "stop": {"type": "array"},
     "seed": {"type": "integer"}, "n": {"type": "integer", "minimum": 1},
     "stream": {"type": "boolean", "description": "answer as text_completion server-sent events"},
     "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}}},
    ["model", "prompt"])},
    "responses": {**_sse("data: <text_completion chunk>, as OpenAI streams them"),
                  **_errors(400, 401, 404, 409, 502, 503, shape=OPENAI_ERROR)}}

UPLOAD = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["files", "modality"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "adapter_config.json and adapter_model.safetensors (never pickle)"},
        "modality": {"type": "string", "enum": ["image", "video", "text"]}}}},
    "application/x-tar": {"schema": {"type": "string", "format": "binary"}},
    "application/zip": {"schema": {"type": "string", "format": "binary"}}}},
    "parameters": [{"name": "modality", "in": "query", "schema": {"type": "string"},
                    "description": "for archive bodies"}],
    "responses": _errors(400, 401, 403, 413, 415, 422)}

TENANT = {"requestBody": {"required": True, "content": _json({"name": {"type": "string"}}, ["name"])},
          "responses": _errors(401, 403, 409)}
