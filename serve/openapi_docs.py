"""Request bodies for the OpenAPI document (the routes read raw requests, to check sizes and
give precise errors, so FastAPI can't infer them). GET /openapi.json and /docs serve it;
docs/openapi.json is the committed copy (`make openapi`)."""

ERROR = {"description": "JSON error", "content": {"application/json": {"schema": {
    "type": "object", "required": ["error", "detail"],
    "properties": {"error": {"type": "string", "example": "undecodable_video"},
                   "detail": {"type": "string", "description": "what was wrong and how to fix it"}}}}}}


def _errors(*codes: int) -> dict:
    return {str(c): ERROR for c in codes}


def _json(properties: dict, required: list[str]) -> dict:
    return {"application/json": {"schema": {"type": "object", "properties": properties, "required": required}}}


GEN = {"adapter": {"type": "string", "description": "name, name/vN, owner/name/vN or <base>:owner/name/vN"},
       "max_new_tokens": {"type": "integer", "minimum": 1}, "temperature": {"type": "number", "minimum": 0},
       "stop": {"type": "array", "items": {"type": "string"}}, "seed": {"type": "integer"}}

RECIPES = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["video"], "properties": {
        "video": {"type": "string", "format": "binary"}, "adapter": {"type": "string"},
        "max_new_tokens": {"type": "integer"}}}},
    **_json({"video_uri": {"type": "string", "description": "a store key or a URI inside the store"}, **GEN},
            ["video_uri"])}},
    "responses": _errors(400, 401, 404, 413, 415, 422, 503)}

GENERATE = {"requestBody": {"required": True, "content": _json(
    {"modality": {"type": "string", "enum": ["text", "image"]}, "question": {"type": "string"},
     "image_b64": {"type": "string", "format": "byte"}, "image_uri": {"type": "string"}, **GEN}, ["modality"])},
    "responses": _errors(400, 401, 404, 413, 422, 503)}

CHAT = {"requestBody": {"required": True, "content": _json(
    {"model": {"type": "string", "description": "the base id or <base>:<adapter> (GET /v1/models)"},
     "messages": {"type": "array", "items": {"type": "object", "properties": {
         "role": {"type": "string", "enum": ["system", "user", "assistant"]},
         "content": {"description": "a string, or parts: text, image_url {url}, video_url {url}; urls are "
                                    "data: URLs or store keys"}}}},
     "max_tokens": {"type": "integer"}, "temperature": {"type": "number"}, "stop": {"type": "array"},
     "seed": {"type": "integer"}}, ["model", "messages"])},
    "responses": _errors(400, 401, 404, 413, 422, 503)}

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
