import pytest

from ddft.recipes import Ingredient, format_quantity, format_recipe, parse_recipe, parse_tasty_ingredient


@pytest.mark.parametrize(
    "line, expected",
    [
        ("2 cups; rice, rinsed", Ingredient("rice", 2.0, "cup", "rinsed")),
        ("1/2 tsp; salt", Ingredient("salt", 0.5, "tsp", None)),
        ("1 1/2 cups; flour", Ingredient("flour", 1.5, "cup", None)),
        ("3; eggs", Ingredient("eggs", 3.0, None, None)),
        ("; salt, to taste", Ingredient("salt", None, None, "to taste")),
        ("salt", Ingredient("salt", None, None, None)),
        ("2 tablespoons; olive oil", Ingredient("olive oil", 2.0, "tbsp", None)),
        ("1 Tbsp; butter, melted", Ingredient("butter", 1.0, "tbsp", "melted")),
        ("3 teaspoons; sugar", Ingredient("sugar", 3.0, "tsp", None)),
        ("100 grams; cheese, grated", Ingredient("cheese", 100.0, "g", "grated")),
        ("100g; cheese", Ingredient("cheese", 100.0, "g", None)),
        ("1 kg; potatoes", Ingredient("potatoes", 1.0, "kg", None)),
        ("250 ml; milk", Ingredient("milk", 250.0, "ml", None)),
        ("2 l; water", Ingredient("water", 2.0, "l", None)),
        ("14 ounces; tomatoes", Ingredient("tomatoes", 14.0, "oz", None)),
        ("1 lb; beef", Ingredient("beef", 1.0, "lb", None)),
        ("a pinch; salt", Ingredient("salt", 1.0, "pinch", None)),
        ("3 cloves; garlic, minced", Ingredient("garlic", 3.0, "clove", "minced")),
        ("1 ½ cups; sugar", Ingredient("sugar", 1.5, "cup", None)),
        ("½ teaspoon; pepper", Ingredient("pepper", 0.5, "tsp", None)),
        ("2-3 cups; stock", Ingredient("stock", 2.0, "cup", None)),
        ("1 large; egg", Ingredient("large egg", 1.0, None, None)),
        ("  2   cups ;  rice  ", Ingredient("rice", 2.0, "cup", None)),
        ("2 cups rice", Ingredient("rice", 2.0, "cup", None)),
    ],
)
def test_parse_tasty_ingredient(line, expected):
    assert parse_tasty_ingredient(line) == expected


@pytest.mark.parametrize("line", ["", "   ", ";", "2 cups;", "12; ", ";;;", "3", "1/2 cup; 42"])
def test_parse_tasty_ingredient_rejects_garbage(line):
    with pytest.raises(ValueError) as e:
        parse_tasty_ingredient(line)
    assert repr(line) in str(e.value)


@pytest.mark.parametrize(
    "q, text",
    [
        (2.0, "2"),
        (0.5, "1/2"),
        (1.5, "1 1/2"),
        (0.25, "1/4"),
        (2.75, "2 3/4"),
        (1 / 3, "1/3"),
        (0.3, "0.3"),
        (150.0, "150"),
    ],
)
def test_format_quantity(q, text):
    assert format_quantity(q) == text


INGREDIENTS = [
    Ingredient("rice", 2.0, "cup", "rinsed"),
    Ingredient("salt", 0.5, "tsp"),
    Ingredient("flour", 1.5, "cup"),
    Ingredient("egg", 3.0),
    Ingredient("pepper"),
    Ingredient("saffron", None, "pinch"),
    Ingredient("cheese", 150.0, "g"),
    Ingredient("water", 0.3, "l"),
]
STEPS = ["Chop the onion.", "Stir the rice.", "Serve."]


def test_format_recipe_exact_text():
    assert format_recipe(INGREDIENTS[:2] + INGREDIENTS[3:4], STEPS[:2]) == (
        "Ingredients:\n- 2 cup rice\n- 1/2 tsp salt\n- 3 egg\nSteps:\n1. Chop the onion.\n2. Stir the rice."
    )


def test_format_parse_round_trip():
    text = format_recipe(INGREDIENTS, STEPS)
    parsed = parse_recipe(text)
    assert parsed == {"ingredients": [i.as_dict() for i in INGREDIENTS], "steps": STEPS}
    back = format_recipe([Ingredient(**d) for d in parsed["ingredients"]], parsed["steps"])
    assert back == text


def test_parse_recipe_tolerates_model_output():
    text = """Sure! Here it is.

**Ingredients:**
*  2 cups rice
- 1/2 teaspoon  salt
- ???
• 3 eggs

Instructions
1) Chop the   onion.
Step 2: Stir the rice.
3 - not a numbered line but still a step
"""
    assert parse_recipe(text) == {
        "ingredients": [
            {"name": "rice", "quantity": 2.0, "unit": "cup"},
            {"name": "salt", "quantity": 0.5, "unit": "tsp"},
            {"name": "eggs", "quantity": 3.0, "unit": None},
        ],
        "steps": ["Chop the onion.", "Stir the rice.", "3 - not a numbered line but still a step"],
    }


def test_parse_recipe_without_headers_and_empty():
    assert parse_recipe("- 1 cup milk\n1. Pour the milk.\n") == {
        "ingredients": [{"name": "milk", "quantity": 1.0, "unit": "cup"}],
        "steps": ["Pour the milk."],
    }
    assert parse_recipe("") == {"ingredients": [], "steps": []}
    assert parse_recipe("Ingredients:\nSteps:\n") == {"ingredients": [], "steps": []}
