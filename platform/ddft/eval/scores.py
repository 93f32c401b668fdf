"""Scoring functions of the evaluation: pure functions over prediction/reference strings.

`ddft eval` compares the base model, each DDFT adapter and a joint adapter on held-out data with
them. One headline metric per modality (`HEADLINE`):

- image -> dish name: top-1 `accuracy` of normalised names ("Hot dog" == "hot_dog").
- video -> recipe text (the `ddft.recipes` format): `score_recipes` — ingredient F1, quantity
  accuracy, step agreement, their mean `content` (the headline: a well-formatted recipe of the
  wrong dish scores low on it, unlike ROUGE-L), step-count error, ROUGE-L and corpus BLEU-4.
- text -> cooking answer: mean `rouge_l`.

Conventions: every score is a float in 0..1 (higher is better) except `step_count_error` (a step
count, lower is better); a `None` prediction reads as ""; mismatched list lengths raise ValueError;
empty lists score 0.0, and metrics with nothing to measure are None (see each docstring).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from ddft.recipes import parse_recipe

__all__ = [
    "HEADLINE",
    "normalize",
    "exact_match",
    "accuracy",
    "rouge_l",
    "mean_rouge_l",
    "bleu4",
    "matched_ingredients",
    "recipe_scores",
    "score_recipes",
    "score",
    "markdown_table",
]

HEADLINE = {"image": "accuracy", "video": "content", "text": "rouge_l"}

_PUNCT_RE = re.compile(r"[^\w\s]")  # after "_" -> " ", so \w is letters and digits only
_ARTICLES = frozenset({"a", "an", "the"})
# Quantities match when within 1% or 0.01 of each other ("0.33" vs "1/3").
_QTY_REL_TOL, _QTY_ABS_TOL = 0.01, 0.01


def normalize(text: str | None) -> str:
    """Lowercase; "_" and punctuation become spaces; articles (a/an/the) dropped; whitespace
    collapsed. "The Hot_Dog!" -> "hot dog"; None -> ""."""
    text = (text or "").lower().replace("_", " ")
    text = _PUNCT_RE.sub(" ", text)
    return " ".join(w for w in text.split() if w not in _ARTICLES)


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")


def exact_match(prediction: str | None, reference: str | None) -> bool:
    """Equal after `normalize`."""
    return normalize(prediction) == normalize(reference)


def accuracy(predictions: Sequence[str | None], references: Sequence[str]) -> float:
    """Share of exact matches (top-1 accuracy on dish names), 0..1; 0.0 for empty lists."""
    _check_lengths(predictions, references)
    if not references:
        return 0.0
    return sum(exact_match(p, r) for p, r in zip(predictions, references)) / len(references)


def _lcs_length(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], (prev_diag + 1 if x == y else max(row[j], row[j - 1]))
    return row[-1]


def rouge_l(prediction: str | None, reference: str | None) -> float:
    """ROUGE-L F1: longest common subsequence of the normalised word tokens, 2PR/(P+R), 0..1.

    0.0 when either side is empty after normalisation.
    """
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return 0.0
    lcs = _lcs_length(pred, ref)
    return 2 * lcs / (len(pred) + len(ref))  # == 2PR/(P+R) with P=lcs/|pred|, R=lcs/|ref|


def mean_rouge_l(predictions: Sequence[str | None], references: Sequence[str]) -> float:
    """Mean `rouge_l` over pairs; 0.0 for empty lists."""
    _check_lengths(predictions, references)
    if not references:
        return 0.0
    return sum(rouge_l(p, r) for p, r in zip(predictions, references)) / len(references)


def bleu4(predictions: Sequence[str | None], references: Sequence[str]) -> float:
    """Corpus BLEU-4 (sacrebleu defaults: 13a tokenizer, exp smoothing) scaled to 0..1.

    Raw texts, not `normalize`d. 0.0 for empty lists; note corpus BLEU is 0.0 for a corpus with
    no 4-gram at all (every text under 4 tokens), even an identical one.
    """
    _check_lengths(predictions, references)
    if not references:
        return 0.0
    import sacrebleu  # only the recipe evaluation needs it

    result = sacrebleu.corpus_bleu([p or "" for p in predictions], [[r or "" for r in references]])
    return min(max(result.score / 100, 0.0), 1.0)  # 100.00000000000004 happens


def _word_key(word: str) -> str:
    """Singular/plural-insensitive form of one word: trailing "s"/"es" stripped (not "ss"), then a
    final "e" dropped and "y" -> "i", so eggs~egg, tomatoes~tomato, cheeses~cheese, berries~berry."""
    if word.endswith("s") and not word.endswith("ss") and len(word) > 2:
        word = word[:-1]
    if word.endswith("e") and len(word) > 2:
        word = word[:-1]
    if word.endswith("y") and len(word) > 2:
        word = word[:-1] + "i"
    return word


def _name_key(name: str) -> str:
    return " ".join(_word_key(w) for w in normalize(name).split())


def _same_quantity(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=_QTY_REL_TOL, abs_tol=_QTY_ABS_TOL)


def matched_ingredients(predicted: Sequence[dict], reference: Sequence[dict]) -> list[tuple[dict, dict]]:
    """(predicted, reference) ingredient pairs ({"name", ...} dicts) matched one-to-one by name
    (`normalize`d, singular/plural insensitive), in the predicted order."""
    unmatched: dict[str, list[int]] = {}  # reference name key -> indices still free, in order
    for i, ing in enumerate(reference):
        unmatched.setdefault(_name_key(ing["name"]), []).append(i)
    pairs = []
    for ing in predicted:
        free = unmatched.get(_name_key(ing["name"]))
        if free:
            pairs.append((ing, reference[free.pop(0)]))
    return pairs


def recipe_scores(prediction_text: str | None, reference_text: str) -> dict:
    """Scores of one model-written recipe against the reference, both read with `parse_recipe`.

    - ingredient_f1: F1 of ingredient names, matched one-to-one after `normalize`, singular/plural
      insensitive; 1.0 when both lists are empty, 0.0 when only one is (e.g. unparseable output).
    - quantity_accuracy: share of matched ingredients whose quantity (within 1% or 0.01) AND unit
      equal the reference's (both missing counts as equal); None when nothing matched.
    - step_agreement: longest common subsequence of the two step lists (steps equal after
      `normalize`) over the longer list: the right steps in the right order; 1.0 when both are empty.
    - content: the mean of ingredient_f1, quantity_accuracy (None counts 0) and step_agreement.
    - step_count_error: |#predicted steps - #reference steps| (int).
    - rouge_l: `rouge_l` of the whole texts.
    """
    pred = parse_recipe(prediction_text or "")
    ref = parse_recipe(reference_text or "")
    pairs = matched_ingredients(pred["ingredients"], ref["ingredients"])

    n_pred, n_ref = len(pred["ingredients"]), len(ref["ingredients"])
    if n_pred + n_ref == 0:
        f1 = 1.0
    else:
        f1 = 2 * len(pairs) / (n_pred + n_ref)  # == 2PR/(P+R); 0.0 when one side is empty
    quantity_accuracy = None
    if pairs:
        right = sum(_same_quantity(p["quantity"], r["quantity"]) and p["unit"] == r["unit"] for p, r in pairs)
        quantity_accuracy = right / len(pairs)
    steps = [[normalize(s) for s in side["steps"]] for side in (pred, ref)]
    longest = max(map(len, steps))
    step_agreement = _lcs_length(*steps) / longest if longest else 1.0
    return {
        "ingredient_f1": f1,
        "quantity_accuracy": quantity_accuracy,
        "step_agreement": step_agreement,
        "content": (f1 + (quantity_accuracy or 0.0) + step_agreement) / 3,
        "step_count_error": abs(len(pred["steps"]) - len(ref["steps"])),
        "rouge_l": rouge_l(prediction_text, reference_text),
    }


def score_recipes(predictions: Sequence[str | None], references: Sequence[str]) -> dict:
    """`recipe_scores` averaged over a set, plus corpus `bleu4`.

    quantity_accuracy is averaged over the samples where it is defined (None if none is);
    step_count_error is a mean (float). Empty lists: 0.0 for the scores, None for
    quantity_accuracy and step_count_error (nothing measured, which must not read as perfect).
    """
    _check_lengths(predictions, references)
    per = [recipe_scores(p, r) for p, r in zip(predictions, references)]
    n = len(per)
    quantities = [s["quantity_accuracy"] for s in per if s["quantity_accuracy"] is not None]
    mean = lambda key: sum(s[key] for s in per) / n if n else 0.0  # noqa: E731
    return {
        "content": mean("content"),
        "ingredient_f1": mean("ingredient_f1"),
        "quantity_accuracy": sum(quantities) / len(quantities) if quantities else None,
        "step_agreement": mean("step_agreement"),
        "step_count_error": sum(s["step_count_error"] for s in per) / n if n else None,
        "rouge_l": mean("rouge_l"),
        "bleu4": bleu4(predictions, references),
    }


def score_steps(predictions: Sequence[str | None], references: Sequence[str]) -> dict:
    """Steps against steps, for references that list no ingredients (YouCook2): each side's
    steps section (parsed), ROUGE-L and corpus BLEU-4 over it, and the step-count error."""
    _check_lengths(predictions, references)
    steps = [["\n".join(parse_recipe(t or "")["steps"]) for t in side] for side in (predictions, references)]
    counts = [
        abs(len(parse_recipe(p or "")["steps"]) - len(parse_recipe(r)["steps"]))
        for p, r in zip(predictions, references)
    ]
    n = len(counts)
    return {
        "rouge_l": mean_rouge_l(*steps) if n else 0.0,
        "bleu4": bleu4(*steps),
        "step_count_error": sum(counts) / n if n else None,
    }


def score(modality: str, predictions: Sequence[str | None], references: Sequence[str]) -> dict:
    """The metrics of one modality: image -> {"accuracy"}, video -> `score_recipes`,
    text -> {"rouge_l"}. `HEADLINE[modality]` names the key to rank by."""
    if modality == "image":
        return {"accuracy": accuracy(predictions, references)}
    if modality == "video":
        return score_recipes(predictions, references)
    if modality == "text":
        return {"rouge_l": mean_rouge_l(predictions, references)}
    raise ValueError(f"unknown modality {modality!r}; expected one of {sorted(HEADLINE)}")


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub markdown table of `rows` (one per model) over `columns`.

    Floats print with 3 decimals, None and missing keys as "-", other values with str() ("|"
    escaped). No trailing newline; with no rows just the header and the separator line.
    """
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
