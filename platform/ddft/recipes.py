"""The recipe text contract shared by data, training and serving.

One format, learnt by the video adapter and parsed back by the server:

    Ingredients:
    - 2 cup rice
    - 1/2 tsp salt
    - 3 egg
    Steps:
    1. Chop the onion.
    2. Stir the pot.

Ingredient lines are "<quantity> <unit> <name>", each part optional except the name; units are
normalised (cups -> cup) and quantities printed compactly (2, 1/2, 1 1/2) so the tiny model has few
tokens to learn. Notes ("rinsed") are kept by the native readers but left out of the text.

This module is also the one home of what a served recipe is (`Recipe`: its JSON Schema is the one
docs/openapi.json publishes for POST /v1/recipes) and of the grammar both engines decode recipes
under (`recipe_grammar`). The grammar is over this text format, not JSON: the video adapter learnt
to write this text, so constraining it keeps what it learnt (a JSON constraint would ask it for a
format it never saw), and every text the grammar accepts is canonical, so it reads back exactly:
`format_recipe(*parse(text)) == text`, at least one ingredient and one step, units from `UNITS`,
quantities > 0 (tests/test_grammar.py checks both directions). A text cut short by max_new_tokens
still parses into the schema (a prefix of the grammar's language parses line by line).
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Ingredient",
    "UNITS",
    "parse_tasty_ingredient",
    "parse_ingredient_text",
    "format_quantity",
    "format_ingredient",
    "format_recipe",
    "parse_recipe",
    "Recipe",
    "RecipeIngredient",
    "read_recipe",
    "recipe_grammar",
]


@dataclass
class Ingredient:
    name: str
    quantity: float | None = None
    unit: str | None = None
    note: str | None = None
    # The second amount some recipes give ("1 1/2 cups ; flour ; 190 g" -> 190.0 g).
    alt_quantity: float | None = None
    alt_unit: str | None = None

    def as_dict(self) -> dict:
        """The serving/parse shape: notes and second amounts are not part of the recipe text."""
        return {"name": self.name, "quantity": self.quantity, "unit": self.unit}

    def full_dict(self) -> dict:
        """Every part, as the prepared data keeps it."""
        return asdict(self)


# Canonical unit -> spellings seen in recipes (matched case-insensitively, trailing "." ignored).
_UNIT_SPELLINGS = {
    "cup": ["cup", "cups", "c"],
    "tbsp": ["tbsp", "tbsps", "tbs", "tbl", "tablespoon", "tablespoons"],
    "tsp": ["tsp", "tsps", "teaspoon", "teaspoons"],
    "g": ["g", "gr", "gram", "grams", "gramme", "grammes"],
    "kg": ["kg", "kgs", "kilogram", "kilograms"],
    "ml": ["ml", "milliliter", "milliliters", "millilitre", "millilitres"],
    "l": ["l", "liter", "liters", "litre", "litres"],
    "oz": ["oz", "ounce", "ounces"],
    "lb": ["lb", "lbs", "pound", "pounds"],
    "pinch": ["pinch", "pinches"],
    "dash": ["dash", "dashes"],
    "clove": ["clove", "cloves"],
    "can": ["can", "cans"],
    "slice": ["slice", "slices"],
    "piece": ["piece", "pieces"],
    "stick": ["stick", "sticks"],
    "bunch": ["bunch", "bunches"],
    "handful": ["handful", "handfuls"],
    "sprig": ["sprig", "sprigs"],
    "package": ["package", "packages", "pkg"],
}
_UNIT_OF = {s: unit for unit, spellings in _UNIT_SPELLINGS.items() for s in spellings}
UNITS = frozenset(_UNIT_SPELLINGS)

_VULGAR = {
    "½": "1/2",
    "⅓": "1/3",
    "⅔": "2/3",
    "¼": "1/4",
    "¾": "3/4",
    "⅛": "1/8",
    "⅜": "3/8",
    "⅝": "5/8",
    "⅞": "7/8",
    "⅕": "1/5",
    "⅙": "1/6",
}
# "1 1/2", "1/2", "1.5", "2"; an optional range tail ("2-3", "2 to 3") whose upper bound is dropped.
_NUM = r"(?:\d+\s+\d+/\d+|\d+/\d+|\d+(?:\.\d+)?|\.\d+)"
_QUANTITY_RE = re.compile(rf"^({_NUM})(?:\s*(?:-|–|to)\s*{_NUM})?(?=\s|$|[a-zA-Z])\s*")


def _unit(word: str) -> str | None:
    return _UNIT_OF.get(word.lower().rstrip("."))


def _number(text: str) -> float:
    total = 0.0
    for part in text.split():
        if "/" in part:
            num, den = part.split("/")
            if int(den) == 0:
                raise ValueError(f"zero denominator in {text!r}")
            total += int(num) / int(den)
        else:
            total += float(part)
    return total


def _split_amount(text: str) -> tuple[float | None, str | None, str]:
    """Leading quantity and unit of `text`, and what is left after them."""
    for sym, frac in _VULGAR.items():  # "1½" -> "1 1/2"
        text = re.sub(rf"(\d)\s*{sym}", rf"\1 {frac}", text).replace(sym, frac)
    text = text.strip()
    quantity = None
    m = _QUANTITY_RE.match(text)
    if m:
        quantity, text = _number(m.group(1)), text[m.end() :]
    elif re.match(r"^an?\s", text, re.I):  # "a pinch"
        quantity, text = 1.0, text.split(None, 1)[1]
    words = text.split(None, 1)
    unit = _unit(words[0]) if words else None
    if unit is not None:
        text = words[1] if len(words) > 1 else ""
    return quantity, unit, text.strip()


def parse_ingredient_text(text: str) -> Ingredient:
    """One free-form ingredient: "2 cup rice", "1 1/2 cups flour, sifted", "salt".

    A name starting with a unit word and no quantity ("clove oil") reads as unit + name; recipe
    names in this project avoid that.
    """
    quantity, unit, rest = _split_amount(text)
    name, _, note = rest.partition(",")
    name, note = " ".join(name.split()), note.strip() or None
    if not re.search(r"[^\W\d_]", name):
        raise ValueError(f"no ingredient name in {text!r}")
    return Ingredient(name, quantity, unit, note)


def parse_tasty_ingredient(line: str) -> Ingredient:
    """Tasty's "amount ; name, note [; second amount]" line, e.g. "2 cups; rice, rinsed" -> 2.0 cup
    rice (rinsed), "1 ½ cups ; all-purpose flour ; 190 g" -> 1.5 cup all-purpose flour, 190.0 g.

    A line without ";" is read as free text ("2 cups rice", "salt"). Amount words that are not a
    unit ("1 large; egg") go in front of the name ("large egg"). Every part is kept: what a second
    amount holds besides quantity and unit, and any part after it, join the note.
    """
    if ";" not in line:
        try:
            return parse_ingredient_text(line)
        except ValueError:
            raise ValueError(f"not an ingredient line: {line!r}") from None
    amount, rest, *more = (p.strip() for p in line.split(";"))
    quantity, unit, extra = _split_amount(amount)
    name, _, note = rest.partition(",")
    name = " ".join(f"{extra} {name}".split())
    if not re.search(r"[^\W\d_]", name):
        raise ValueError(f"not an ingredient line: {line!r}")
    notes = [note.strip()] if note.strip() else []
    alt_quantity = alt_unit = None
    if more and more[0]:
        alt_quantity, alt_unit, leftover = _split_amount(more[0])
        if alt_quantity is None and alt_unit is None:
            leftover = more[0]
        notes += [leftover] if leftover else []
    notes += [p for p in more[1:] if p]
    return Ingredient(name, quantity, unit, "; ".join(notes) or None, alt_quantity, alt_unit)


def format_quantity(q: float) -> str:
    """2.0 -> "2", 0.5 -> "1/2", 1.5 -> "1 1/2", 0.3 -> "0.3".

    A fraction is printed only when it reads back as the very same float, so text round-trips.
    """
    if q == int(q):
        return str(int(q))
    whole, frac = int(q), Fraction(q - int(q)).limit_denominator(8)
    if frac.denominator in (2, 3, 4, 8) and _number(f"{whole} {frac}") == q:
        return f"{whole} {frac}" if whole else str(frac)
    return repr(q)


def format_ingredient(ing: Ingredient) -> str:
    parts = [format_quantity(ing.quantity) if ing.quantity is not None else None, ing.unit, " ".join(ing.name.split())]
    return " ".join(p for p in parts if p)


def format_recipe(ingredients: list[Ingredient], steps: list[str]) -> str:
    """The exact target text of the video adapter (see the module docstring)."""
    lines = ["Ingredients:"] + [f"- {format_ingredient(i)}" for i in ingredients]
    lines += ["Steps:"] + [f"{n}. {' '.join(s.split())}" for n, s in enumerate(steps, 1)]
    return "\n".join(lines)


_HEADER_RE = re.compile(r"^[#*\s]*(ingredients|steps|instructions|directions|method)\b[\s*:]*$", re.I)
_BULLET_RE = re.compile(r"^(?:[-*•]\s*)")
_NUMBERED_RE = re.compile(r"^(?:step\s*)?\d+\s*[.):]\s*|^step\s*\d+\s+", re.I)


def parse_recipe(text: str) -> dict:
    """Read a (model-written) recipe back: {"ingredients": [{name, quantity, unit}], "steps": [...]}.

    Tolerant: headers optional ("Ingredients", "**Steps:**", "Instructions"), bullets or numbering
    in any usual form; without a header, bullets read as ingredients and numbered lines as steps.
    Ingredient lines that don't parse are dropped.
    """
    ingredients, steps, section = [], [], None
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        m = _HEADER_RE.match(line)
        if m:
            section = "ingredients" if m.group(1).lower() == "ingredients" else "steps"
            continue
        bullet, numbered = _BULLET_RE.match(line), _NUMBERED_RE.match(line)
        kind = section or ("ingredients" if bullet else "steps" if numbered else None)
        body = line[(bullet or numbered).end() :].strip() if (bullet or numbered) else line
        if not body or kind is None:
            continue
        if kind == "ingredients":
            try:
                ingredients.append(parse_ingredient_text(body).as_dict())
            except ValueError:
                pass
        else:
            steps.append(" ".join(body.split()))
    return {"ingredients": ingredients, "steps": steps}


# -- the served recipe: its schema and the grammar that guarantees it ------------------------------
# The letters a name may use (ASCII and Latin-1's; no digit, comma or vulgar fraction, which the
# ingredient parser reads as amounts or notes): one class for the schema's pattern and the grammar.
LETTERS = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u00ff"
MAX_STEPS = 40  # steps the grammar numbers (1. .. 40.); the learnt recipes have about 5 to 20


class RecipeIngredient(BaseModel):
    """One ingredient of a served recipe (`Ingredient.as_dict`)."""

    model_config = ConfigDict(extra="forbid")

    # anchored, so the pattern means the same whether a validator searches (JSON Schema) or matches (xgrammar)
    name: str = Field(pattern=f"^.*[{LETTERS}].*$", description="what it is, e.g. 'rice'")
    quantity: Annotated[float, Field(gt=0)] | None = Field(description="how much, in `unit`s; null: unstated")
    unit: Literal[tuple(sorted(UNITS))] | None = Field(description="null: a count (3 egg) or unstated")


class Recipe(BaseModel):
    """A recipe as the server answers it: what `parse_recipe` reads from a text of the format above."""

    model_config = ConfigDict(extra="forbid")

    ingredients: list[RecipeIngredient]
    steps: list[Annotated[str, Field(pattern=r"^\S(.*\S)?$")]]  # no length bounds beside a pattern: xgrammar
    # would not enforce them, so the schema stays one a client can decode under (response_format) too


def read_recipe(text: str, cut: bool = False) -> Recipe:
    """A model's recipe text as a validated `Recipe` (pydantic's ValidationError: it isn't one).
    `cut`: the text was cut short (max_new_tokens), so its last line may be partial and is left out."""
    if cut:
        text = text.rpartition("\n")[0]
    return Recipe.model_validate(parse_recipe(text))


def _char_class(chars: set[str]) -> str:
    """An EBNF character class of exactly `chars` (runs of consecutive code points as ranges), written
    so xgrammar and llama.cpp's GBNF readers (llguidance's) read it alike: a "-" first, as itself."""
    points, parts, i = sorted(ord(c) for c in chars if c != "-"), ["-"] if "-" in chars else [], 0
    while i < len(points):
        j = i
        while j + 1 < len(points) and points[j + 1] == points[j] + 1:
            j += 1
        lo, hi = (_class_char(points[k]) for k in (i, j))
        parts.append(lo if i == j else f"{lo}{hi}" if j == i + 1 else f"{lo}-{hi}")
        i = j + 1
    return f"[{''.join(parts)}]"


def _class_char(point: int) -> str:
    c = chr(point)
    if c in "\\]^[":
        return "\\" + c
    return c if c.isprintable() and not c.isspace() else f"\\u{point:04x}"


def _letters() -> set[str]:
    out = set()
    for run in re.findall(r".-.|.", LETTERS):
        lo, hi = (run[0], run[2]) if len(run) == 3 else (run, run)
        out |= {chr(p) for p in range(ord(lo), ord(hi) + 1)}
    return out


def _word_except(rule: str, excluded: set[str], first: set[str], rest: set[str]) -> list[str]:
    """EBNF rules `rule`: a word (a char of `first`, then any of `rest`) that is none of `excluded`
    in any letter case: a trie of the excluded words, each node ending the word when its prefix
    isn't excluded, or leaving the trie with any other character."""
    trie: dict = {}
    for word in sorted(excluded):
        node = trie
        for c in word:
            node = node.setdefault(c, {})
        node[""] = {}
    rules, names = [], {}

    def visit(node: dict, name: str, depth: int) -> None:
        chars = first if depth == 0 else rest
        taken = {v for c in node if c for v in (c, c.upper())}
        alts = [] if depth == 0 or "" in node else ['""']
        for c in sorted(k for k in node if k):
            child = names.setdefault(id(node[c]), f"{rule}-{len(names) + 1}")
            alts.append(f"{_char_class({c, c.upper()})} {child}")
            visit(node[c], child, depth + 1)
        if chars - taken:
            alts.append(f"{_char_class(chars - taken)} {rule}-rest*")
        rules.append(f"{name} ::= {' | '.join(alts)}")

    visit(trie, rule, 0)
    rules.append(f"{rule}-rest ::= {_char_class(rest)}")
    return rules


@functools.cache
def recipe_grammar() -> str:
    """The recipe text format as an EBNF grammar (xgrammar's dialect, which vLLM's structured
    outputs take too): every text it accepts reads back through `parse_recipe` into a `Recipe`
    whose `format_recipe` is that very text (canonical quantities and units, names the ingredient
    parser can't misread, steps numbered 1., 2., ...), with at least one ingredient and one step."""
    letters = _letters()
    first_word = letters | set("'-")  # the parser reads the first word (unit, "a"/"an"): letters only
    later = letters | set("0123456789'-&/().%+")
    spellings = set(_UNIT_OF)
    step_char = {chr(p) for p in range(33, 127)} | {chr(p) for p in range(0xA1, 0x100)}
    lines = [
        'root ::= " "? "Ingredients:\\n" ingredient+ "Steps:\\n" step-1',
        'ingredient ::= "- " (qty " " unit " " name | qty " " name-no-unit | unit " " name | name-bare) "\\n"',
        # format_quantity's forms: 2, 1/2, 1 1/2 (eighths, thirds, quarters, halves in lowest terms),
        # else a decimal that no such fraction equals (0.3; never 0.5 or 2.0)
        'qty ::= whole (" " frac)? | frac | ("0" | whole) "." decimals',
        "whole ::= [1-9] [0-9]? [0-9]? [0-9]?",
        "frac ::= " + " | ".join(f'"{f}"' for f in ("1/2", "1/3", "2/3", "1/4", "3/4", "1/8", "3/8", "5/8", "7/8")),
        "decimals ::= [1-46-9] | [013-689] [1-9] | [27] [1-46-9] | [0-9] [0-9] [1-46-9] "
        '| ([024579] [0-9] | [16] [013-9] | [38] [0-689]) "5"',
        "unit ::= " + " | ".join(f'"{u}"' for u in sorted(UNITS, key=lambda u: (-len(u), u))),
        'name ::= word (" " more)*',
        'name-no-unit ::= not-unit (" " more)*',
        'name-bare ::= not-unit-or-a (" " more)*',
        f"word ::= {_char_class(letters)} {_char_class(later)}*",
        f"more ::= {_char_class(later)}+",
        *_word_except("not-unit", spellings, letters, first_word),
        *_word_except("not-unit-or-a", spellings | {"a", "an"}, letters, first_word),
        f'text ::= {_char_class(step_char)}+ (" " {_char_class(step_char)}+)*',
    ]
    for k in range(1, MAX_STEPS + 1):
        lead = f'"{k}. "' if k == 1 else f'"\\n{k}. "'
        lines.append(f"step-{k} ::= {lead} text" + (f" step-{k + 1}?" if k < MAX_STEPS else ""))
    return "\n".join(lines) + "\n"
