"""Request bodies (serve/bodies.py): the models the routes validate with and the OpenAPI document
publishes. Each refusal has its code and a sentence with the fix; JSON's types, strictly."""

from __future__ import annotations

import pytest

from ddft.errors import DdftError
from serve import bodies
from serve.errors import ApiError, to_http

LIMITS = bodies.Limits(max_new_tokens=96, max_n=4, base_id="tiny")
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Boil an egg?"}]}


def _refused(model, data) -> ApiError:
    with pytest.raises(DdftError) as err:
        bodies.parse(model, data, LIMITS)
    http = to_http(err.value)
    assert http.status == 400 and http.detail
    return http


@pytest.mark.parametrize(
    "data, code, words",
    [
        ({"modality": "text", "question": "q", "max_new_tokens": 97}, "bad_max_new_tokens", "from 1 to 96"),
        ({"modality": "text", "question": "q", "max_new_tokens": "5"}, "bad_max_new_tokens", "integer"),
        ({"modality": "text", "question": "q", "temperature": True}, "bad_temperature", "from 0"),
        ({"modality": "text", "question": "q", "stop": ["a"] * 5}, "bad_stop", "up to 4"),
        ({"modality": "text", "question": "q", "seed": -1}, "bad_seed", "non-negative"),
        ({"modality": "text", "question": "  "}, "missing_question", "question"),
        ({"modality": "text"}, "missing_question", "question"),
        ({"modality": "video"}, "bad_modality", "/v1/recipes"),
        ({"question": "q"}, "bad_modality", '"text" or "image"'),
        ({"modality": "image"}, "missing_image", "exactly one of image_b64"),
        ({"modality": "image", "image_b64": "AAAA", "image_uri": "k"}, "missing_image", "exactly one"),
        ({"modality": "text", "question": "q", "image_uri": "k"}, "bad_request", "carries no image"),
        ({"modality": "image", "image_uri": "datasets/\x00a.png"}, "bad_uri", "plain text"),
        ({"modality": "image", "image_b64": "not base64!"}, "bad_image_b64", "base64.b64encode"),
        ({"modality": "text", "question": "q", "adapter": "a/b/c"}, "bad_adapter", "name/vN"),
    ],
)
def test_generate_refusals_name_the_field_and_the_fix(data, code, words):
    err = _refused(bodies.Generate, data)
    assert err.error == code and words in err.detail, err.detail


def test_json_integers_are_integers_and_nothing_else_is():
    ok = bodies.parse(bodies.Generate, {"modality": "text", "question": "q", "max_new_tokens": 5.0, "seed": 7}, LIMITS)
    assert ok.generation(96) == {"max_new_tokens": 5, "temperature": 0.0, "stop": [], "seed": 7}
    assert bodies.parse(bodies.RecipeForm, {"max_new_tokens": "7"}, LIMITS).max_new_tokens == 7  # a form field
    for bad in ("5", True, 5.5):
        _refused(bodies.Generate, {"modality": "text", "question": "q", "max_new_tokens": bad})


@pytest.mark.parametrize(
    "change, code",
    [
        ({"model": None}, "missing_model"),
        ({"messages": []}, "missing_messages"),
        ({"messages": ["hi"]}, "bad_message"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "bad_message"),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "bad_content_part"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a\x00"}}]}]},
            "bad_uri",
        ),
        ({"n": 5}, "bad_n"),
        ({"n": 2, "stream": True}, "bad_n"),
        ({"stream": "yes"}, "bad_stream"),
        ({"stream_options": {"include_usage": True}}, "bad_stream_options"),
        ({"max_tokens": 0}, "bad_max_tokens"),
    ],
)
def test_chat_refusals(change, code):
    data = {**CHAT, **change}
    assert _refused(bodies.Chat, {k: v for k, v in data.items() if v is not None}).error == code


def test_completion_refuses_what_it_does_not_compute_and_takes_one_prompt():
    base = {"model": "tiny", "prompt": "Once"}
    assert bodies.parse(bodies.Completion, {**base, "logit_bias": {}, "echo": False}, LIMITS).text == "Once"
    assert bodies.parse(bodies.Completion, {**base, "prompt": ["Once"]}, LIMITS).text == "Once"
    assert _refused(bodies.Completion, {**base, "echo": True}).error == "unsupported_echo"
    assert _refused(bodies.Completion, {**base, "prompt": ["a", "b"]}).error == "bad_prompt"


def test_the_documented_schema_is_the_models():
    """The OpenAPI document carries these models' JSON Schema (no second copy to drift), requests
    and answers alike."""
    from serve.gateway import api

    doc = api.openapi()
    chat = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert chat["properties"]["messages"]["items"] == {"$ref": "#/components/schemas/Message"}
    schemas = doc["components"]["schemas"]
    assert {"Message", "TextPart", "ImagePart", "VideoPart", "MediaUrl", "ChatCompletion", "RecipeAnswer"} <= set(
        schemas
    )
    answer = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]["application/json"]
    assert answer["schema"] == {"$ref": "#/components/schemas/ChatCompletion"}
    generate = doc["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert [v["required"] for v in generate["oneOf"]] == [
        ["modality", "question"],
        ["modality", "image_b64"],
        ["modality", "image_uri"],
    ]


def test_the_configs_token_cap_holds_when_the_settings_are_read():
    """A body validated under a cap above the default (96) keeps its token count: reading the
    settings re-validates nothing (a multipart recipe asking for 200 of 400 was a 500)."""
    wide = bodies.Limits(max_new_tokens=400, max_n=4, base_id="tiny")
    form = bodies.parse(bodies.RecipeForm, {"max_new_tokens": "200"}, wide)
    assert form.generation(400)["max_new_tokens"] == 200
    chat = bodies.parse(bodies.Chat, {**CHAT, "max_tokens": 300, "stop": "x"}, wide)
    assert chat.generation(400) == {"max_new_tokens": 300, "temperature": 0.0, "stop": ["x"], "seed": None}
    assert bodies.parse(bodies.Chat, CHAT, wide).generation(400)["max_new_tokens"] == 400
