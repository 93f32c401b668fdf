"""The OpenAI-compatible surface: a conversation in (turn by turn, for the base's chat template),
and chat.completion / text_completion objects out, whole or as their streamed chunks (SSE), with
log-probabilities when asked. `model` is the base id or `<base>:<adapter>` (adapters/ref.py's
grammar). Content parts: text, image_url and video_url (vLLM's extension), each url a data: URL
or a store key/URI."""

import time
import uuid
from dataclasses import dataclass, field

from ddft.engines.base import Chunk, GenerateResult, TokenLogprob
from ddft.errors import BadArgument, Invalid
from ddft.prompts import QUESTIONS, Turn
from serve import answers, bodies, sse
from serve.pipeline import Rendering


@dataclass
class ChatInput:
    modality: str
    question: str  # the last user turn's text
    history: list[Turn] = field(default_factory=list)  # the turns before it
    media: bytes | None = None  # decoded data: URL
    media_uri: str | None = None  # a store key or URI


def chat_input(chat: bodies.Chat) -> ChatInput:
    """A validated conversation as its turns: the last user message is the question, the messages
    before it its history (system, user, assistant, in order), the one medium in the turn that
    carried it."""
    turns, media = [], []
    for msg in chat.messages:
        texts, carried = [], False
        for part in msg.parts():
            if isinstance(part, bodies.TextPart):
                texts.append(part.text.strip())
            else:
                media.append(
                    ("image", part.image_url.url) if part.type == "image_url" else ("video", part.video_url.url)
                )
                carried = True
        role = "system" if msg.role == "developer" else msg.role
        turns.append(Turn(role, " ".join(t for t in texts if t), carried))
    if len(media) > 1:
        raise Invalid("send at most one image or video per conversation", "too_many_media")
    if turns[-1].role != "user":
        raise BadArgument(
            f"the conversation ends with a {turns[-1].role} message: "
            "end it with the user's message, which the model answers",
            "bad_message",
        )
    last = turns[-1]
    if not last.text and not media:
        raise BadArgument(
            "the last user message holds no text and no image or video: ask something", "missing_question"
        )
    modality = media[0][0] if media else "text"
    # only a picture or a clip: the question the platform asks of it (as /v1/recipes does)
    question = last.text or QUESTIONS[modality]
    out = ChatInput(modality, question, [t for t in turns[:-1]])
    if media:
        url = media[0][1]
        if url.startswith("data:"):
            out.media = bodies.data_url(url, modality)
        else:
            out.media_uri = url
    return out


def _usage(results: list[GenerateResult]) -> answers.Usage:
    """One prompt's tokens (counted once) and every choice's."""
    prompt = int(results[0].timings.get("prompt_tokens", 0))
    completion = sum(int(r.timings.get("new_tokens", 0)) for r in results)
    return answers.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _top(lp: TokenLogprob) -> answers.TopLogprob:
    return answers.TopLogprob(token=lp.token, logprob=lp.logprob, bytes=list(lp.token.encode("utf-8")))


def chat_logprobs(lps: list[TokenLogprob] | None) -> answers.ChoiceLogprobs | None:
    if lps is None:
        return None
    return answers.ChoiceLogprobs(
        content=[answers.ContentLogprob(**_top(lp).model_dump(), top_logprobs=[_top(t) for t in lp.top]) for lp in lps]
    )


def completion_logprobs(lps: list[TokenLogprob] | None, offset: int = 0) -> answers.CompletionLogprobs | None:
    """The legacy shape: tokens, their log-probabilities, each step's alternatives, text offsets."""
    if lps is None:
        return None
    offsets = []
    for lp in lps:
        offsets.append(offset)
        offset += len(lp.token)
    return answers.CompletionLogprobs(
        tokens=[lp.token for lp in lps],
        token_logprobs=[lp.logprob for lp in lps],
        top_logprobs=[{t.token: t.logprob for t in lp.top} for lp in lps],
        text_offset=offsets,
    )


class OpenAIRendering(Rendering):
    """chat.completion (or, `text`, text_completion) objects and their streamed chunks, as OpenAI
    sends them: for chat the role first, then content deltas, finish_reason on the last content
    chunk, then (include_usage) a chunk with no choices and the usage; with include_usage every
    other chunk has "usage": null."""

    def __init__(self, model: str, include_usage: bool = False, text: bool = False, logprobs: bool = False):
        self.path = "/v1/completions" if text else "/v1/chat/completions"
        self.logprobs = logprobs  # asked for: every chunk carries its tokens' log-probabilities
        self.id = f"{'cmpl' if text else 'chatcmpl'}-{uuid.uuid4().hex[:24]}"
        self.created, self.model, self.include_usage, self.text = int(time.time()), model, include_usage, text
        self._offset = 0  # the streamed text so far (completions' text_offset)

    def _common(self) -> dict:
        return {"id": self.id, "created": self.created, "model": self.model}

    def whole(self, results: list[GenerateResult]):
        who = {"adapter": results[0].adapter, "base": results[0].base}
        if self.text:
            choices = [
                answers.CompletionChoice(
                    index=i, text=r.text, finish_reason=r.finish_reason, logprobs=completion_logprobs(r.logprobs)
                )
                for i, r in enumerate(results)
            ]
            return answers.TextCompletion(**self._common(), choices=choices, usage=_usage(results), **who)
        choices = [
            answers.ChatChoice(
                index=i,
                message=answers.Message(content=r.text),
                finish_reason=r.finish_reason,
                logprobs=chat_logprobs(r.logprobs),
            )
            for i, r in enumerate(results)
        ]
        return answers.ChatCompletion(**self._common(), choices=choices, usage=_usage(results), **who)

    def _event(self, answer, final: bool = False) -> str:
        doc = answer.model_dump(mode="json")
        if not self.include_usage:
            doc.pop("usage")
        if not final:  # who answered: on the last content chunk
            doc.pop("adapter")
            doc.pop("base")
        for choice in doc["choices"]:
            if "delta" in choice:
                choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        return sse.event(doc)

    def head(self) -> list[str]:
        if self.text:
            return []
        role = answers.ChunkChoice(index=0, delta=answers.Delta(role="assistant", content=""))
        return [self._event(answers.ChatCompletionChunk(**self._common(), choices=[role]))]

    def events(self, chunk: Chunk) -> list[str]:
        result = chunk.result
        if result is None and not chunk.text and not chunk.logprobs:
            return []
        reason = result.finish_reason if result else None
        if self.text:
            logprobs = completion_logprobs(chunk.logprobs, self._offset) if self.logprobs else None
            self._offset += len(chunk.text)
            choice = answers.CompletionChoice(index=0, text=chunk.text, finish_reason=reason, logprobs=logprobs)
            kind = answers.TextCompletion
        else:
            logprobs = chat_logprobs(chunk.logprobs) if self.logprobs else None
            delta = answers.Delta(content=chunk.text or None)
            choice = answers.ChunkChoice(index=0, delta=delta, finish_reason=reason, logprobs=logprobs)
            kind = answers.ChatCompletionChunk
        who = {"adapter": result.adapter, "base": result.base} if result else {}
        out = [self._event(kind(**self._common(), choices=[choice], **who), final=result is not None)]
        if result is not None and self.include_usage:
            out.append(self._event(kind(**self._common(), choices=[], usage=_usage([result]))))
        return out
