"""Constrained decoding: the recipe grammar (ddft.recipes) accepts the learnt text format and only
texts that read back exactly into the schema docs/openapi.json publishes; the hf engine decodes
under a grammar or a JSON Schema beside free rows of the same batch; bad constraints are refused
with the grammar library's reason. (Both engines over HTTP: test_serve.py, test_serve_vllm.py;
vLLM's tokens against hf's: test_engine_vllm.py.)"""

from __future__ import annotations

import json
import random
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from ddft.engines.base import GenerateRequest
from ddft.engines.grammar import Compiler, Constraint, check, vllm_params
from ddft.errors import BadConstraint
from ddft.models.build import build_tiny
from ddft.recipes import UNITS, Ingredient, format_recipe, parse_recipe, read_recipe
from serve.answers import RecipeAnswer

REPO = Path(__file__).resolve().parents[1]


def published(name: str) -> jsonschema.Draft202012Validator:
    """A schema as docs/openapi.json publishes it (its $refs into components resolved there)."""
    doc = json.loads((REPO / "docs" / "openapi.json").read_text())
    return jsonschema.Draft202012Validator({**doc["components"]["schemas"][name], "components": doc["components"]})


def answer(text: str, finish_reason: str) -> dict:
    """The recipe answer the gateway makes of a model's text (serve/gateway.py _recipe)."""
    recipe = read_recipe(text, cut=finish_reason != "stop")
    return RecipeAnswer(
        **recipe.model_dump(), text=text, adapter=None, base="tiny", finish_reason=finish_reason, timings={}
    ).model_dump(mode="json")


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return build_tiny()[1].tokenizer


@pytest.fixture(scope="module")
def compiler(tiny_tokenizer):
    return Compiler(tiny_tokenizer, len(tiny_tokenizer))


def accepts(compiler, tokenizer, text: str) -> bool:
    """Whether the recipe grammar takes `text` whole, then the end of sequence."""
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(compiler(Constraint.recipe()))
    return matcher.accept_string(text) and matcher.accept_token(tokenizer.eos_token_id) and matcher.is_terminated()


NAMES = [
    "rice",
    "olive oil",
    "all-purpose flour",
    "Salt",
    "crème fraîche",
    "jalapeño",
    "canola oil",
    "pinto beans",
    "can't-miss sauce",
    "bell pepper (red)",
    "bread mix (7-grain)",
    "slices of bread",
    "anchovy",
    "ale",
]


def _recipes(n: int, seed: int = 0):
    """Recipes in the learnt format: names, units and quantities in format_quantity's canonical forms."""
    rng = random.Random(seed)
    quantities = [None, 1.0, 2.0, 12.0, 250.0, 0.5, 1.5, 2 / 3, 0.125, 3.75, 0.3, 2.2, 0.05]
    for _ in range(n):
        ingredients = []
        for _ in range(rng.randint(1, 6)):
            name, unit, quantity = rng.choice(NAMES), rng.choice([None, *sorted(UNITS)]), rng.choice(quantities)
            ingredients.append(Ingredient(name, quantity, unit))
        steps = [rng.choice(["Chop the onion.", "Stir for 2 minutes at 180°C.", "Enjoy!", "Add 1/2 cup (or more)."])]
        yield format_recipe(ingredients or [Ingredient("egg", 2.0)], steps * rng.randint(1, 12))


def reads_back(text: str) -> bool:
    recipe = parse_recipe(text)
    return format_recipe([Ingredient(**i) for i in recipe["ingredients"]], recipe["steps"]) == text


def test_the_learnt_format_is_accepted_exactly_where_it_reads_back(compiler, tiny_tokenizer):
    """format_recipe's texts: the grammar takes each one that parse_recipe reads back as written, and
    refuses the others ("- 2 slices of bread" would read as 2 slice "of bread")."""
    from ddft.data.synthetic import FOODS

    kitchen = format_recipe([Ingredient(n, 2.0, f.unit) for n, f in FOODS.items()], ["Stir the pot.", "Enjoy!"])
    texts = [kitchen, *_recipes(300)]
    exact = [t for t in texts if reads_back(t)]
    assert kitchen in exact and 100 < len(exact) < len(texts)
    for text in texts:
        assert accepts(compiler, tiny_tokenizer, text) == (text in exact), text
    for text in exact:
        assert accepts(compiler, tiny_tokenizer, " " + text)  # the adapter learnt it after a space
        published("RecipeAnswer").validate(answer(text, "stop"))


@pytest.mark.parametrize(
    "text",
    [
        "Ingredients:\n- cup\nSteps:\n1. Mix.",  # a unit alone: no name
        "Ingredients:\n- cloves oil\nSteps:\n1. Mix.",  # reads back as "clove oil"
        "Ingredients:\n- a egg\nSteps:\n1. Mix.",  # reads as 1 egg
        "Ingredients:\n- 2 cups flour\nSteps:\n1. Mix.",  # a unit not as format_recipe spells it
        "Ingredients:\n- 0.5 egg\nSteps:\n1. Mix.",  # 1/2
        "Ingredients:\n- 0 egg\nSteps:\n1. Mix.",  # nothing
        "Ingredients:\n- 2/4 cup milk\nSteps:\n1. Mix.",  # 1/2
        "Ingredients:\n- salt, to taste\nSteps:\n1. Mix.",  # a note
        "Ingredients:\n- egg\nSteps:\n1. Mix.\n3. Bake.",  # numbering
        "Ingredients:\n- egg\nSteps:\n1. Mix  well.",  # spacing
        "Ingredients:\nSteps:\n1. Mix.",  # no ingredient
        "Ingredients:\n- egg\nSteps:\n",  # no step
        "Ingredients:\n- egg\nSteps:\n1. Mix.\n",  # a trailing newline
    ],
)
def test_texts_that_would_not_read_back_exactly_are_refused(compiler, tiny_tokenizer, text):
    assert not accepts(compiler, tiny_tokenizer, text)


def test_random_walks_through_the_grammar_always_read_into_the_schema(compiler, tiny_tokenizer):
    """Any token the grammar allows, at random, ended by EOS or cut anywhere: a finished text reads back
    exactly with an ingredient and a step, a cut one still validates against the published schema."""
    import xgrammar as xgr

    eos, validator = tiny_tokenizer.eos_token_id, published("RecipeAnswer")
    bitmask, finished = xgr.allocate_token_bitmask(1, len(tiny_tokenizer)), 0
    for seed in range(150):
        rng, matcher, ids = np.random.default_rng(seed), xgr.GrammarMatcher(compiler(Constraint.recipe())), []
        for _ in range(int(rng.integers(10, 400))):
            matcher.fill_next_token_bitmask(bitmask)
            allowed = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[: len(tiny_tokenizer)]
            allowed = np.flatnonzero(allowed)
            token = eos if eos in allowed and rng.random() < 0.3 else int(rng.choice(allowed[allowed != eos]))
            assert matcher.accept_token(token)
            if token == eos:
                break
            ids.append(token)
        text = tiny_tokenizer.decode(ids).strip()
        if matcher.is_terminated():
            finished += 1
            assert reads_back(text), text
            validator.validate(answer(text, "stop"))
        else:
            validator.validate(answer(text, "length"))
    assert finished > 20


def test_bad_constraints_are_refused_with_the_reason():
    check(Constraint.recipe())
    check(Constraint.schema({"type": "object", "properties": {"a": {"type": "integer"}}}))
    with pytest.raises(BadConstraint, match='JSON Schema.*Unsupported type "strin"') as err:
        check(Constraint.schema({"type": "strin"}))
    assert err.value.code == "bad_response_format" and "/project/" not in err.value.detail
    with pytest.raises(BadConstraint, match="parenthesis is not closed"):
        check(Constraint.schema({"type": "string", "pattern": "(("}))
    with pytest.raises(BadConstraint, match="'uniqueItems' is not enforced"):  # vLLM refuses it too
        check(Constraint.schema({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}))
    with pytest.raises(BadConstraint, match='grammar.*Rule "b" is not defined'):
        check(Constraint("grammar", 'root ::= "a" b'))


def test_vllm_gets_the_same_constraint():
    assert vllm_params(None) == {}
    assert vllm_params(Constraint.recipe()) == {"grammar": Constraint.recipe().spec}
    assert vllm_params(Constraint.schema({"type": "object"})) == {"json": '{"type": "object"}'}
    assert vllm_params(Constraint("json_object")) == {"json_object": True}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from ddft.engines.hf import HFEngine
    from ddft.models.load import ensure_base
    from ddft.store import Store
    from tests.test_engine_hf import make_adapter

    tmp = tmp_path_factory.mktemp("grammar")
    store = Store(str(tmp / "store"))
    base = ensure_base(store, "tiny", build="tiny")
    return HFEngine(store, "tiny"), make_adapter(store, base, "video", 1, tmp)


def test_the_hf_engine_decodes_recipes_and_json_under_their_constraints_beside_free_rows(engine):
    """One batch: recipes (the base and a video adapter, greedy and sampled), a JSON Schema answer and
    free rows; every recipe validates against the published schema, the free rows answer as alone."""
    hf, video_adapter = engine
    recipe, videos = (
        Constraint.recipe(),
        [np.random.default_rng(s).integers(0, 256, (8, 224, 224, 3), np.uint8) for s in range(2)],
    )
    recipes = [
        GenerateRequest("video", "Recipe?", v, adapter, 60, constraint=recipe, **sampling)
        for v in videos
        for adapter in (None, video_adapter)
        for sampling in ({}, {"temperature": 1.0, "seed": 7})
    ]
    yes_no = Constraint.schema({"enum": ["yes", "no"]})
    free = [
        GenerateRequest("text", "Is it done?", None, None, 12),
        GenerateRequest("video", "Recipe?", videos[0], None, 12),
    ]
    out = hf.generate([*recipes, GenerateRequest("text", "Is it done?", None, None, 12, constraint=yes_no), *free])
    for result in out[: len(recipes)]:
        published("RecipeAnswer").validate(answer(result.text, result.finish_reason))
        assert result.text.startswith("Ingredients:\n- ")
    assert json.loads(out[len(recipes)].text) in ("yes", "no") and out[len(recipes)].finish_reason == "stop"
    assert [r.token_ids for r in out[-2:]] == [hf.generate([r])[0].token_ids for r in free]
    assert not out[-1].text.startswith("Ingredients:")  # the free video row was not constrained
    hf.prepare(recipe)  # compiled once, kept
    with pytest.raises(BadConstraint):
        hf.generate([GenerateRequest("text", "Hi?", constraint=Constraint("grammar", "root ::= nope"))])
