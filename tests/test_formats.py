import pytest

from ddft.data.formats import read_foodx, read_qa, read_tasty
from ddft.recipes import Ingredient
from ddft.store import Store


@pytest.fixture
def store(tmp_path):
    return Store(str(tmp_path))


def _images(store, folder, names):
    for n in names:
        store.write_bytes(f"foodx/{folder}/{n}", b"jpeg")


def test_foodx_official_layout(store):
    store.write_text("foodx/class_list.txt", "0 macaron\n1 hot_dog\n2 beignet\n")
    store.write_text("foodx/train_info.csv",
                     "train_00000.jpg,1\ntrain_00001.jpg,0\ntrain_00002.jpg,7\n"
                     "train_00003.jpg\ntrain_00004.jpg,2\n")
    store.write_text("foodx/val_info.csv", "val_00000.jpg,2\n")
    _images(store, "train_set", ["train_00000.jpg", "train_00001.jpg", "train_00002.jpg",
                                 "train_00003.jpg"])  # train_00004.jpg is missing
    _images(store, "val_set", ["val_00000.jpg"])
    ds = read_foodx(store, "foodx")
    assert ds.classes == {0: "macaron", 1: "hot_dog", 2: "beignet"}
    assert ds.dish_name(1) == "hot dog"
    assert ds.splits["train"] == [("foodx/train_set/train_00000.jpg", 1, "hot_dog"),
                                  ("foodx/train_set/train_00001.jpg", 0, "macaron")]
    assert ds.splits["val"] == [("foodx/val_set/val_00000.jpg", 2, "beignet")]
    assert [row for row, _ in ds.problems] == ["train_info.csv:3", "train_info.csv:4",
                                               "train_info.csv:5"]
    assert "label 7" in ds.problems[0][1] and "missing" in ds.problems[2][1]


def test_foodx_kaggle_layout(store):
    store.write_text("foodx/class_list.txt", "0 macaron\n1 beignet\n")
    store.write_text("foodx/train_labels.csv", "img_name,label\ntrain_00000.jpg,1\nx.jpg,-1\n")
    _images(store, "train_set", ["train_00000.jpg", "x.jpg"])
    ds = read_foodx(store, "foodx/")
    assert ds.splits == {"train": [("foodx/train_set/train_00000.jpg", 1, "beignet")]}
    assert ds.problems == [("train_labels.csv:3", "label -1 is not a class id")]


def test_foodx_without_labels_fails(store):
    store.write_text("foodx/class_list.txt", "0 macaron\n")
    with pytest.raises(ValueError, match="train_info.csv"):
        read_foodx(store, "foodx")


RECIPE_XML = """<?xml version="1.0" encoding="utf-8"?>
<recipe>
  <title>Rice Bowl</title>
  <ingredients>
    <ingredient>2 cups; rice, rinsed</ingredient>
    <ingredient>1/2 tsp; salt</ingredient>
  </ingredients>
  <steps_updated>
    <steps_updated>Rinse the rice.</steps_updated>
    <steps_updated>Boil  the rice.</steps_updated>
    <steps_updated>Enjoy!</steps_updated>
  </steps_updated>
</recipe>
"""


def _tasty(store):
    store.write_text("tasty/rice-bowl/recipe.xml", RECIPE_XML)
    store.write_text("tasty/rice-bowl/csvalignment.dat", "0,3\n4,9\n-1,-1\n")
    store.write_bytes("tasty/rice-bowl/recipe_video.mp4", b"mp4")
    # <step> children, a differently named video, and no title
    store.write_text("tasty/salty/recipe.xml", "<recipe><ingredients><ingredient>salt</ingredient>"
                     "</ingredients><steps_updated><step>Salt it.</step></steps_updated></recipe>")
    store.write_text("tasty/salty/csvalignment.dat", "2,2\n")
    store.write_bytes("tasty/salty/salty.mp4", b"mp4")
    # alignment lines don't match the steps
    store.write_text("tasty/broken/recipe.xml", RECIPE_XML)
    store.write_text("tasty/broken/csvalignment.dat", "0,3\n")
    store.write_bytes("tasty/broken/recipe_video.mp4", b"mp4")
    store.write_text("tasty/SPLITS/split_1/TRAIN_split_1.txt", "rice-bowl\nbroken\n")
    store.write_text("tasty/SPLITS/split_1/TEST_split_1.txt", "salty\nghost\n")
    store.write_text("tasty/SPLITS/split_1/VAL_split_1.txt", "")


def test_tasty(store):
    _tasty(store)
    recipes = read_tasty(store, "tasty")
    assert [r.id for r in recipes] == ["rice-bowl", "salty"]
    bowl, salty = recipes
    assert bowl.title == "Rice Bowl"
    assert bowl.ingredients == [Ingredient("rice", 2.0, "cup", "rinsed"),
                                Ingredient("salt", 0.5, "tsp")]
    assert bowl.steps == ["Rinse the rice.", "Boil the rice.", "Enjoy!"]
    assert bowl.step_spans == [(0, 15), (20, 45), None]
    assert bowl.video_key == "tasty/rice-bowl/recipe_video.mp4"
    assert bowl.split == "train"
    assert bowl.text == ("Ingredients:\n- 2 cup rice\n- 1/2 tsp salt\nSteps:\n"
                         "1. Rinse the rice.\n2. Boil the rice.\n3. Enjoy!")
    assert (salty.title, salty.steps, salty.step_spans) == ("salty", ["Salt it."], [(10, 10)])
    assert (salty.video_key, salty.split) == ("tasty/salty/salty.mp4", "test")
    assert recipes.problems == [("broken", "csvalignment.dat has 1 lines for 3 steps"),
                                ("ghost", "listed in a split but has no folder")]


def test_tasty_bad_recipes_become_problems(store):
    store.write_text("tasty/a/recipe.xml", "<recipe><ingredients>")
    store.write_text("tasty/a/csvalignment.dat", "0,1\n")
    store.write_text("tasty/b/recipe.xml", RECIPE_XML.replace("1/2 tsp; salt", "; "))
    store.write_text("tasty/b/csvalignment.dat", "0,1\n1,2\n-1,-1\n")
    store.write_bytes("tasty/b/v.mp4", b"")
    store.write_text("tasty/c/recipe.xml", RECIPE_XML)
    store.write_text("tasty/c/csvalignment.dat", "0,1\n5,2\n-1,-1\n")
    store.write_bytes("tasty/c/recipe_video.mp4", b"")
    store.write_text("tasty/d/recipe.xml", RECIPE_XML)
    store.write_text("tasty/d/csvalignment.dat", "0,1\n1,2\n-1,-1\n")
    recipes = read_tasty(store, "tasty")
    assert list(recipes) == []
    reasons = dict(recipes.problems)
    assert set(reasons) == {"a", "b", "c", "d"}
    assert "'; '" in reasons["b"] and "bad span" in reasons["c"] and "mp4" in reasons["d"]
    with pytest.raises(ValueError, match="no such split set"):
        read_tasty(store, "tasty", split_set="split_9")


def test_qa(store):
    store.write_text("qa/qa.jsonl", '{"question": "What colour is a tomato?", "answer": "red"}\n'
                     "\n"
                     "{not json\n"
                     '{"question": "Why?"}\n'
                     '["a", "b"]\n'
                     '{"question": " How long to boil an egg? ", "answer": "10 minutes"}\n')
    pairs = read_qa(store, "qa/qa.jsonl")
    assert list(pairs) == [("What colour is a tomato?", "red"),
                           ("How long to boil an egg?", "10 minutes")]
    assert [where for where, _ in pairs.problems] == ["qa.jsonl:3", "qa.jsonl:4", "qa.jsonl:5"]
    assert "not JSON" in pairs.problems[0][1]
