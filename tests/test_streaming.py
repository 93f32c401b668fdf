"""Streamed answers over real HTTP (the serve fixture's app on 127.0.0.1): chat completions read by
the official `openai` client, and /v1/recipes?stream=true read as raw server-sent events."""

from __future__ import annotations

import asyncio
import base64
import json

import openai
import pytest
import requests

from ddft.engines.base import Chunk
from tests.serve_fixture import make_mp4, make_png, running_app

QUESTION = [{"role": "user", "content": "How long do I boil an egg?"}]


@pytest.fixture(scope="module")
def app(ray_cluster, tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("streaming"), max_new_tokens=16) as app:
        yield app


def _openai(app) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app.url}/v1", api_key=app.keys["acme"], max_retries=0, timeout=120)


def _plain_and_streamed(client: openai.OpenAI, **kwargs):
    plain = client.chat.completions.create(**kwargs, temperature=0)
    chunks = list(
        client.chat.completions.create(**kwargs, temperature=0, stream=True, stream_options={"include_usage": True})
    )
    return plain, chunks


def image_question() -> list[dict]:
    """A chat with one image part, as a data: URL."""
    png = base64.b64encode(make_png()).decode()
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What dish is this?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
            ],
        }
    ]


def _check_stream(plain, chunks) -> str:
    """The chunks are OpenAI's: role first, finish_reason once on the last content chunk, usage last."""
    assert {c.id for c in chunks} == {chunks[0].id} and {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant" and {c.model for c in chunks} == {plain.model}
    *content, usage = chunks
    assert usage.choices == [] and usage.usage.model_dump() == plain.usage.model_dump()
    assert all(c.usage is None for c in content)
    assert [c.choices[0].finish_reason for c in content][-1] == plain.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text == plain.choices[0].message.content  # the same greedy answer, streamed
    return text


@pytest.mark.integration
def test_openai_client_plain_and_streamed(app):
    client = _openai(app)
    plain, chunks = _plain_and_streamed(client, model="tiny:ddft/text/v1", messages=QUESTION, max_tokens=16)
    assert plain.model == "tiny:ddft/text/v1" and plain.usage.completion_tokens <= 16
    _check_stream(plain, chunks)
    # the tenant's own adapter by routing (model = the base), and an image through a data: URL
    mine, chunks = _plain_and_streamed(client, model="tiny", messages=QUESTION, max_tokens=8)
    assert mine.model == "tiny:tenant-acme/text/v1"
    _check_stream(mine, chunks)
    plain, chunks = _plain_and_streamed(client, model="tiny:ddft/image/v1", messages=image_question(), max_tokens=12)
    assert plain.model == "tiny:ddft/image/v1"
    _check_stream(plain, chunks)


@pytest.mark.integration
def test_openai_client_errors_are_useful(app):
    client = _openai(app)
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as err:
            client.chat.completions.create(model="gpt-4", messages=QUESTION, stream=stream)
        assert err.value.code == "model_not_found" and "is not served here" in err.value.message
        with pytest.raises(openai.NotFoundError) as err:
            client.chat.completions.create(model="tiny:nope", messages=QUESTION, stream=stream)
        assert err.value.code == "unknown_adapter"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=10**6)
    assert err.value.code == "bad_max_tokens" and "max_tokens must be" in err.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=QUESTION, stream_options={"include_usage": True})
    assert [m.id for m in client.models.list()][0] == "tiny"


@pytest.mark.integration
def test_openai_client_retrieves_models_and_takes_n(app):
    client = _openai(app)
    mine = client.models.retrieve("tiny:tenant-acme/text/v1")
    assert (mine.id, mine.owned_by) == ("tiny:tenant-acme/text/v1", "tenant-acme")
    assert client.models.retrieve("tiny").id == "tiny"
    # another's adapter and one that doesn't exist: the same 404
    for who, model in ((_openai_without_key(app), "tiny:tenant-acme/text/v1"), (client, "tiny:tenant-acme/none/v1")):
        with pytest.raises(openai.NotFoundError) as err:
            who.models.retrieve(model)
        assert err.value.code == "model_not_found", model

    kw = dict(model="tiny:ddft/text/v1", messages=QUESTION, max_tokens=8, temperature=1.0)
    three = client.chat.completions.create(n=3, seed=7, **kw)
    assert [c.index for c in three.choices] == [0, 1, 2]
    singles = [client.chat.completions.create(seed=7 + i, **kw) for i in range(3)]  # choice i is seed + i
    assert [c.message.content for c in three.choices] == [one.choices[0].message.content for one in singles]
    assert three.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert three.usage.completion_tokens == sum(one.usage.completion_tokens for one in singles)
    for bad in ({"n": 0}, {"n": 99}, {"n": 2, "stream": True}):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=4, **bad)
        assert err.value.code == "bad_n", bad


@pytest.mark.integration
def test_openai_client_completions_plain_and_streamed(app):
    """/v1/completions continues the prompt as it is: sent the chat prompt rendered, it answers as
    chat does; streamed, the text chunks add up to the plain answer."""
    from transformers import AutoTokenizer

    from ddft import prompts
    from ddft.models.load import local_base_dir

    client = _openai(app)
    kw = dict(model="tiny:ddft/text/v1", max_tokens=12, temperature=0)
    plain = client.completions.create(prompt="Once upon a time", **kw)
    assert plain.object == "text_completion" and plain.model == "tiny:ddft/text/v1"
    assert plain.choices[0].text and 0 < plain.usage.completion_tokens <= 12
    chunks = list(
        client.completions.create(prompt="Once upon a time", stream=True, stream_options={"include_usage": True}, **kw)
    )
    *content, usage = chunks
    assert "".join(c.choices[0].text for c in content) == plain.choices[0].text
    assert content[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert usage.usage.completion_tokens == plain.usage.completion_tokens

    question = QUESTION[0]["content"]
    rendered = prompts.prompt_text(AutoTokenizer.from_pretrained(local_base_dir(app.store, "tiny")), "text", question)
    chat = client.chat.completions.create(messages=QUESTION, **kw)
    assert client.completions.create(prompt=[rendered], **kw).choices[0].text == chat.choices[0].message.content
    for bad, code in (
        ({"echo": True}, "unsupported_echo"),
        ({"prompt": ["a", "b"]}, "bad_prompt"),
        ({"prompt": ""}, "bad_prompt"),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(**{"prompt": "x", **kw, **bad})
        assert err.value.code == code, bad


TURNS = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "How long do I boil an egg?"},
    {"role": "assistant", "content": "Ten minutes."},
    {"role": "user", "content": "And a potato?"},
]


def check_openai_fields(app, adapter: str = "ddft/text/v1"):
    """Every OpenAI field is honoured or refused by name, through the official client (both engines'
    tests): logprobs plain and streamed, top_p, a multi-turn chat through the base's chat template
    turn by turn, penalties, tools and unknown fields refused, recipes refusing `stop`, model
    objects' `created`. Returns the greedy answer with its logprobs, for comparing engines."""
    from transformers import AutoTokenizer

    from ddft import prompts
    from ddft.models.load import local_base_dir

    client = _openai(app)
    kw = dict(model=f"tiny:{adapter}", messages=QUESTION, max_tokens=8, temperature=0)
    plain = client.chat.completions.create(**kw, logprobs=True, top_logprobs=3)
    content = plain.choices[0].logprobs.content
    assert len(content) == plain.usage.completion_tokens > 0
    for lp in content:  # greedy: the chosen token is the likeliest, alternatives most likely first
        tops = [t.logprob for t in lp.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and lp.logprob <= 0
        assert lp.top_logprobs[0].token == lp.token and abs(tops[0] - lp.logprob) < 1e-6
        assert lp.bytes == list(lp.token.encode())
    streamed = list(client.chat.completions.create(**kw, logprobs=True, top_logprobs=3, stream=True))
    again = [lp for c in streamed if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert [lp.token for lp in again] == [lp.token for lp in content]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(again, content, strict=True)) < 1e-4
    greedy = client.chat.completions.create(**kw)
    assert greedy.choices[0].logprobs is None and greedy.choices[0].message.content == plain.choices[0].message.content
    # top_p: a nucleus this small holds only the likeliest token, so sampling answers as greedy does
    nucleus = client.chat.completions.create(**{**kw, "temperature": 1.0}, top_p=1e-9, seed=3)
    assert nucleus.choices[0].message.content == greedy.choices[0].message.content
    # /v1/completions' logprobs: tokens, their logprobs, n alternatives each
    comp = client.completions.create(model=kw["model"], prompt="Once upon", max_tokens=6, temperature=0, logprobs=2)
    lps = comp.choices[0].logprobs
    assert len(lps.tokens) == len(lps.token_logprobs) == comp.usage.completion_tokens
    assert all(len(top) <= 2 for top in lps.top_logprobs) and lps.text_offset[0] == 0

    # a conversation goes through the chat template turn by turn: the very prompt /v1/completions
    # is sent rendered answers the same, and usage counts its tokens
    tokenizer = AutoTokenizer.from_pretrained(local_base_dir(app.store, "tiny"))
    history = [prompts.Turn(m["role"], m["content"]) for m in TURNS[:-1]]
    rendered = prompts.prompt_text(tokenizer, "text", TURNS[-1]["content"], history=history)
    multi = client.chat.completions.create(**{**kw, "messages": TURNS})
    assert multi.usage.prompt_tokens == len(tokenizer(rendered, add_special_tokens=False).input_ids)
    raw = client.completions.create(model=kw["model"], prompt=rendered, max_tokens=8, temperature=0)
    assert raw.choices[0].text == multi.choices[0].message.content
    assert "ASSISTANT: Ten minutes." in rendered and rendered.startswith("You answer briefly.")

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for extra, code, named in (
        ({"frequency_penalty": 1.5}, "unsupported_frequency_penalty", "frequency_penalty"),
        ({"presence_penalty": 0.5}, "unsupported_presence_penalty", "presence_penalty"),
        ({"tools": [tool]}, "unsupported_tools", "tools"),
        ({"extra_body": {"top_k": 5}}, "unsupported_field", "top_k"),
        ({"top_logprobs": 2}, "bad_top_logprobs", "logprobs"),
        ({"messages": TURNS[:-1]}, "bad_message", "end it with the user's message"),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(**{**kw, **extra})
        assert err.value.code == code and named in err.value.message, extra
    refused = requests.post(
        f"{app.url}/v1/recipes", json={"video_uri": "datasets/raw/clips/one.mp4", "stop": ["Steps"]}, timeout=60
    )
    assert (refused.status_code, refused.json()["error"]) == (400, "unsupported_stop")
    models = client.models.list().data
    assert models and all(isinstance(m.created, int) and m.created > 1_600_000_000 for m in models)
    return plain


@pytest.mark.integration
def test_openai_fields_are_honoured_or_refused(app):
    check_openai_fields(app)


def _openai_without_key(app) -> openai.OpenAI:
    """The official client sending no Authorization header (an anonymous caller)."""
    import httpx

    class NoAuth(httpx.Client):
        def send(self, request, **kwargs):
            request.headers.pop("Authorization", None)
            return super().send(request, **kwargs)

    return openai.OpenAI(base_url=f"{app.url}/v1", api_key="-", max_retries=0, timeout=60, http_client=NoAuth())


def _events(resp: requests.Response) -> list[tuple[str | None, str]]:
    """(event name, data) of a server-sent event stream."""
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream"), resp.text
    out, name = [], None
    for line in resp.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            out.append((name, line[len("data: ") :]))
            name = None
    return out


@pytest.mark.integration
def test_recipes_stream_deltas_then_the_recipe(app):
    url = f"{app.url}/v1/recipes?stream=true"
    plain = requests.post(f"{app.url}/v1/recipes", json={"video_uri": "datasets/raw/clips/one.mp4"}, timeout=120)
    for kwargs in (
        {"files": {"video": ("clip.mp4", make_mp4())}},
        {"json": {"video_uri": "datasets/raw/clips/one.mp4"}},
    ):
        events = _events(requests.post(url, stream=True, timeout=120, **kwargs))
        assert events[-1] == (None, "[DONE]")
        deltas = [json.loads(data)["text"] for name, data in events if name == "delta"]
        (recipe,) = [json.loads(data) for name, data in events if name == "recipe"]
        assert [name for name, _ in events[:-1]] == ["delta"] * len(deltas) + ["recipe"]
        assert "".join(deltas) == recipe["text"] == plain.json()["text"]
        assert set(recipe) == set(plain.json()) and recipe["adapter"] == "ddft/video/v1" and recipe["base"] == "tiny"
        assert set(recipe["timings"]) >= {"decode_s", "generate_s", "total_s", "batch_size", "queue_s"}
    # before the first byte an error is still a plain JSON error
    missing = requests.post(url, json={"video_uri": "datasets/raw/clips/missing.mp4"}, timeout=60)
    assert (missing.status_code, missing.json()["error"]) == (404, "not_found")
    bad = requests.post(f"{app.url}/v1/recipes?stream=maybe", json={"video_uri": "x"}, timeout=60)
    assert (bad.status_code, bad.json()["error"]) == (400, "bad_stream")


def test_an_error_mid_stream_is_an_event_then_done():
    """After the first byte the status is sent: a failure becomes an error event (its kind's, from
    the one table: a store failure's details stay in the log), then [DONE], and the replica's
    stream is closed."""
    from ddft.store import StoreError
    from serve import sse
    from serve.pipeline import Rendering, _events

    closed = []

    async def chunks():
        try:
            yield Chunk("Boil ")
            raise StoreError("s3://bucket at http://10.0.0.5:9000 went away")
        finally:
            closed.append(True)

    class Deltas(Rendering):
        path = "/v1/chat/completions"

        def events(self, chunk):
            return [sse.event({"text": chunk.text}, "delta")]

    async def body():
        stream = chunks()
        first = await anext(stream)
        return [e async for e in _events(first, stream, Deltas())]

    events = asyncio.run(body())
    assert events[0] == 'event: delta\ndata: {"text":"Boil "}\n\n' and events[-1] == "data: [DONE]\n\n"
    error = json.loads(events[1].removeprefix("data: "))["error"]
    assert (error["type"], error["code"]) == ("server_error", "store_error") and "10.0.0.5" not in error["message"]
    assert closed == [True]


@pytest.mark.integration
def test_engine_figures_reach_metrics_under_load(app):
    """/metrics, scraped with prometheus_client while 8 streams run on the hf engine: running rows
    seen live, then TTFT, time per output token and queue wait observed for each, rows back to 0."""
    check_engine_figures(app, "hf")


def check_engine_figures(app, engine: str, clients: int = 8) -> None:
    """The engine figures' series, the same names whichever engine serves (both engines' tests)."""
    from tests.serve_fixture import engine_figures_under_load

    before = engine_figures_under_load(app, 1)[1]
    most, after = engine_figures_under_load(app, clients)

    def count(name: str) -> float:
        def total(samples):
            return sum(v for (n, labels), v in samples.items() if n == name and ("engine", engine) in labels)

        return total(after) - total(before)

    assert most >= 1, "no scrape saw a running row while the streams ran"
    assert count("ddft_engine_time_to_first_token_seconds_count") == clients
    assert count("ddft_engine_queue_wait_seconds_count") == clients
    assert count("ddft_engine_time_per_output_token_seconds_count") >= 1
    gauges = {n: v for (n, _), v in after.items() if n.startswith("ddft_engine_") and "_seconds" not in n}
    assert gauges["ddft_engine_running_rows"] == 0 and gauges["ddft_engine_waiting_rows"] == 0
    assert {"ddft_engine_cache_usage", "ddft_engine_cache_tokens"} <= set(gauges)
