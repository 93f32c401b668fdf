import pytest

from ddft.eval.scores import (
    HEADLINE,
    accuracy,
    bleu4,
    exact_match,
    markdown_table,
    mean_rouge_l,
    normalize,
    recipe_scores,
    rouge_l,
    score,
    score_recipes,
)

REFERENCE = """Ingredients:
- 2 cup rice
- 1/2 tsp salt
- 3 egg
Steps:
1. Rinse the rice.
2. Boil water.
3. Cook the rice."""

# rice and eggs found (salt missed), eggs with the wrong quantity, "Boil water" missing.
PREDICTION = """Ingredients:
- 2 cups rice
- 2 eggs
Steps:
1. Rinse the rice.
2. Cook the rice."""


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Hot_Dog!", "hot dog"),
        ("  an  Apple,  a pie  ", "apple pie"),
        ("crème brûlée", "crème brûlée"),
        ("Step 1/2: stir", "step 1 2 stir"),
        ("", ""),
        (None, ""),
    ],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


def test_exact_match_and_accuracy():
    assert exact_match("Hot dog", "hot_dog")
    assert not exact_match("pizza!", "sushi")
    assert accuracy(["Hot dog", "pizza!"], ["hot_dog", "sushi"]) == 0.5
    assert accuracy([None, ""], ["sushi", "pizza"]) == 0.0
    assert accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        accuracy(["a"], [])


def test_rouge_l():
    assert rouge_l("The cat sat on the mat.", "the cat sat on the mat") == 1.0
    assert rouge_l("boil the water", "chop onions") == 0.0
    # [cat sat on mat] vs [cat lay on mat]: LCS 3, P = R = 3/4.
    assert rouge_l("the cat sat on the mat", "the cat lay on a mat") == 0.75
    # [bake bread] vs [bake sourdough bread slowly]: LCS 2, P = 1, R = 1/2 -> F = 2/3.
    assert rouge_l("bake bread", "bake sourdough bread slowly") == pytest.approx(2 / 3)
    assert rouge_l("", "chop onions") == 0.0
    assert rouge_l(None, "chop onions") == 0.0
    assert rouge_l("the", "a") == 0.0  # both empty after normalisation
    assert mean_rouge_l(["chop onions", "x"], ["chop onions", "y"]) == 0.5
    assert mean_rouge_l([], []) == 0.0


def test_bleu4():
    corpus = ["rinse the rice and cook it in salted water", "stir the onions until golden brown"]
    assert bleu4(corpus, corpus) == 1.0
    assert bleu4(["", ""], corpus) == 0.0
    assert bleu4(["completely unrelated words here now"], ["rinse the rice and cook it"]) == 0.0
    assert 0.0 < bleu4(["rinse the rice and cook it in water"], corpus[:1]) < 1.0
    assert bleu4([], []) == 0.0


def test_recipe_scores_by_hand():
    s = recipe_scores(PREDICTION, REFERENCE)
    # 2 matched of 2 predicted, 3 reference: P = 1, R = 2/3 -> F1 = 2*2/(2+3) = 0.8.
    assert s["ingredient_f1"] == pytest.approx(0.8)
    # rice 2 cup == 2 cup; eggs 2 != 3.
    assert s["quantity_accuracy"] == 0.5
    assert s["step_count_error"] == 1
    # Steps: "rinse rice", "cook rice" in order, of 3 -> 2/3; content is the mean of the three.
    assert s["step_agreement"] == pytest.approx(2 / 3)
    assert s["content"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # Tokens: pred 13, ref 20 ("1/2" -> "1 2", articles gone); LCS 11 (all but "cups", "eggs").
    assert s["rouge_l"] == pytest.approx(2 * 11 / (13 + 20))


def test_recipe_scores_identical_and_tolerant():
    s = recipe_scores(REFERENCE, REFERENCE)
    assert s == {
        "ingredient_f1": 1.0,
        "quantity_accuracy": 1.0,
        "step_agreement": 1.0,
        "content": 1.0,
        "step_count_error": 0,
        "rouge_l": 1.0,
    }
    # The right steps in another order agree less.
    swapped = REFERENCE.replace("1. Rinse the rice.\n2. Boil water.", "1. Boil water.\n2. Rinse the rice.")
    assert recipe_scores(swapped, REFERENCE)["step_agreement"] == pytest.approx(2 / 3)
    # Plurals, articles, case and a near-equal quantity still match.
    s = recipe_scores(
        "Ingredients:\n- 0.33 cup Tomatoes\n- 1 slice of cheeses\nSteps:\n1. Mix.",
        "Ingredients:\n- 1/3 cup tomato\n- 1 slice of cheese\nSteps:\n1. Mix.",
    )
    assert s["ingredient_f1"] == 1.0 and s["quantity_accuracy"] == 1.0
    # A unit mismatch fails quantity even when the number is right.
    s = recipe_scores("Ingredients:\n- 2 tbsp sugar", "Ingredients:\n- 2 tsp sugar")
    assert s["ingredient_f1"] == 1.0 and s["quantity_accuracy"] == 0.0


@pytest.mark.parametrize("prediction", ["I don't know how to cook this.", "", None, "###\n\n!!"])
def test_recipe_scores_unparseable(prediction):
    s = recipe_scores(prediction, REFERENCE)
    assert s["ingredient_f1"] == 0.0
    assert s["quantity_accuracy"] is None
    assert s["step_agreement"] == 0.0 and s["content"] == 0.0
    assert s["step_count_error"] == 3
    assert 0.0 <= s["rouge_l"] < 0.2


def test_recipe_scores_nothing_to_find():
    s = recipe_scores("Steps:\n1. Boil.", "Steps:\n1. Boil.")
    assert s["ingredient_f1"] == 1.0 and s["quantity_accuracy"] is None


def test_score_recipes_averages():
    s = score_recipes([PREDICTION, "no idea"], [REFERENCE, REFERENCE])
    assert s["ingredient_f1"] == pytest.approx(0.4)
    assert s["quantity_accuracy"] == 0.5  # only the first sample defines it
    assert s["step_count_error"] == 2.0  # (1 + 3) / 2
    assert s["rouge_l"] == pytest.approx((2 / 3 + rouge_l("no idea", REFERENCE)) / 2)
    assert 0.0 < s["bleu4"] < 1.0
    assert score_recipes([REFERENCE], [REFERENCE])["bleu4"] == 1.0
    assert s["content"] == pytest.approx((recipe_scores(PREDICTION, REFERENCE)["content"] + 0.0) / 2)
    assert score_recipes([], []) == {
        "content": 0.0,
        "ingredient_f1": 0.0,
        "quantity_accuracy": None,
        "step_agreement": 0.0,
        "step_count_error": None,
        "rouge_l": 0.0,
        "bleu4": 0.0,
    }


def test_score_dispatch():
    assert score("image", ["Hot dog", "pizza!"], ["hot_dog", "sushi"]) == {"accuracy": 0.5}
    assert score("text", ["chop onions"], ["chop onions"]) == {"rouge_l": 1.0}
    video = score("video", [PREDICTION], [REFERENCE])
    assert set(video) == {
        "content",
        "ingredient_f1",
        "quantity_accuracy",
        "step_agreement",
        "step_count_error",
        "rouge_l",
        "bleu4",
    }
    for modality, key in HEADLINE.items():
        assert key in score(modality, ["x"], ["x"])
    with pytest.raises(ValueError, match="unknown modality"):
        score("audio", [], [])


def test_markdown_table():
    rows = [
        {"model": "base", "accuracy": 0.25, "rouge_l": None},
        {"model": "ddft|image", "accuracy": 2 / 3, "rouge_l": 0.5, "n": 3},
    ]
    assert markdown_table(rows, ["model", "accuracy", "rouge_l", "n"]) == (
        "| model | accuracy | rouge_l | n |\n"
        "|---|---|---|---|\n"
        "| base | 0.250 | - | - |\n"
        "| ddft\\|image | 0.667 | 0.500 | 3 |"
    )
    assert markdown_table([], ["model"]) == "| model |\n|---|"


def test_score_steps_compares_steps_with_steps():
    from ddft.eval.scores import score_steps

    ref = "Steps:\n1. Chop the onion.\n2. Stir the pot."
    pred = "Ingredients:\n- 2 onion\nSteps:\n1. Chop the onion.\n2. Stir the pot.\n3. Enjoy!"
    s = score_steps([pred], [ref])
    assert s["step_count_error"] == 1 and 0.7 < s["rouge_l"] < 1 and s["bleu4"] > 0
    assert score_steps([ref], [ref])["rouge_l"] == 1.0
    assert score_steps([None], [ref]) == {"rouge_l": 0.0, "bleu4": 0.0, "step_count_error": 2.0}
