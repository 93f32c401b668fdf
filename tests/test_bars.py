"""The quality bench's bars (bench/quality.py), and proof that they can't be passed by format: on the
synthetic kitchen's held-out recipes, a fixed "always the same recipe" answer and a wrong-dish answer both fail them
(ROUGE-L, the old headline, let a correctly formatted wrong recipe through), and any answer that
doesn't depend on the video has no matched - mismatched gap."""

import pytest

from bench.quality import FLOORS, GAPS, KITCHEN
from ddft.data.synthetic import write_kitchen
from ddft.eval.scores import score_recipes
from ddft.store import Store


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    """The quality bench's kitchen (its recipes don't depend on the photo count): {id: summary}."""
    summary = write_kitchen(Store(str(tmp_path_factory.mktemp("kitchen"))), **{**KITCHEN, "images_per_dish": 2})
    return summary["recipes"]


def _held_out(recipes) -> list[str]:
    return [k for k, r in recipes.items() if r["split"] == "test"]


def test_no_fixed_recipe_passes_the_video_floor_though_rouge_would_let_some_through(recipes):
    references = [recipes[k]["text"] for k in _held_out(recipes)]
    (floor,) = FLOORS.values()
    rouge = []
    for k, r in recipes.items():
        if r["split"] == "train":  # a model that memorised one training recipe and always writes it
            s = score_recipes([r["text"]] * len(references), references)
            assert s["content"] < floor, (k, s)
            rouge.append(s["rouge_l"])
    assert max(rouge) > floor  # the format alone is worth this much ROUGE-L


def test_a_wrong_dish_answer_fails_the_video_floor(recipes):
    """Each held-out video answered with a recipe of another dish, the same way each time (the next
    dish of the menu that is trained on: a model that mistakes one dish for another)."""
    held_out = _held_out(recipes)
    trained = [k for k, r in recipes.items() if r["split"] == "train"]
    answers = [next(t for t in trained if recipes[t]["dish"] != recipes[k]["dish"]) for k in held_out]
    s = score_recipes([recipes[a]["text"] for a in answers], [recipes[k]["text"] for k in held_out])
    assert s["content"] < FLOORS[("video", "content")], s
    assert s["ingredient_f1"] < 0.5 and s["step_agreement"] < 0.5, s


def test_the_gap_bars_pass_a_model_that_reads_the_video_and_fail_one_that_does_not(recipes):
    """evaluate's mismatched inputs: each held-out video swapped for another one's (of a different
    recipe), the reference kept. A model that writes the recipe of the video it is shown clears the
    ingredient-F1 gap bar; one that writes a fixed recipe has no gap at all."""
    from ddft.eval.evaluate import mismatched

    held_out = _held_out(recipes)
    rows = [
        {"id": k, "question": "Recipe?", "answer": recipes[k]["text"], "pixels": k.encode(), "pixel_shape": [1]}
        for k in held_out
    ]
    swapped = mismatched(rows, "video")
    assert [r["answer"] for r in swapped] == [r["answer"] for r in rows]  # the references stay
    assert all(s["pixels"] != r["pixels"] for s, r in zip(swapped, rows))  # every video is another's
    references = [r["answer"] for r in rows]

    def gap(model):
        matched, shown_another = (
            score_recipes([model(r) for r in side], references)["ingredient_f1"] for side in (rows, swapped)
        )
        return matched - shown_another

    assert gap(lambda r: recipes[r["pixels"].decode()]["text"]) >= GAPS[("video", "ingredient_f1")]
    assert gap(lambda r: recipes[held_out[0]]["text"]) == 0.0
