"""Tasty Videos read from a copy of the release's own tree, built here by hand (not by the synthetic
kitchen): its root, both split sets, recipe XML as the release's tools decode it (or still
encoded), and the odd cases of real recipes."""

import pytest

from ddft.data.formats import DataError, read_tasty
from ddft.data.readers.tasty import detokenize
from ddft.recipes import Ingredient
from ddft.store import Store

R = "tasty"  # the release root
RECIPES = f"{R}/ALL_RECIPES_without_videos"

# As fs_decode_xml.py writes it: every token followed by a space; ingredients "amount ; name , note
# [; second amount]"; <steps_updated> nested in <steps_updated>; an empty <ingredient/>.
PANCAKES = """<?xml version='1.0' encoding='UTF-8'?>
<recipe>
  <ingredients>
    <ingredient>1 ½ cups ; all-purpose flour ; 190 g </ingredient>
    <ingredient>2 ; eggs , beaten </ingredient>
    <ingredient />
    <ingredient>1 ; confectioners ' sugar , for dusting </ingredient>
  </ingredients>
  <steps>
    <step>Mix . </step>
  </steps>
  <steps_updated>
    <steps_updated>Whisk the flour and eggs until smooth . </steps_updated>
    <steps_updated>Fry the batter ( in batches ) until browned , about 2 minutes . </steps_updated>
    <steps_updated>Enjoy ! </steps_updated>
  </steps_updated>
</recipe>
"""

SOUP = """<recipe><ingredients><ingredient>2 cups ; tomatoes , chopped </ingredient></ingredients>
<steps_updated><steps_updated>Boil the tomatoes . </steps_updated><steps_updated>Enjoy ! </steps_updated>
</steps_updated></recipe>"""

# The encoded form of a one-step recipe, and the release's table (a dict literal of bytes).
ENCODED = """<recipe><ingredients><ingredient>1 2 3 4 </ingredient></ingredients><steps><step>5 </step></steps>
<steps_updated><steps_updated>6 7 8 </steps_updated><steps_updated>9 10 </steps_updated></steps_updated></recipe>"""
TABLE = "{1: b'3', 2: b';', 3: b'lemons', 4: b'', 5: b'x', 6: b'Squeeze', 7: b'lemons', 8: b'.', 9: b'Enjoy', 10: b'!'}"


def _recipe(store, rid, xml, alignment, *, name="recipe.xml", video="recipe_video.mp4"):
    store.write_text(f"{RECIPES}/{rid}/{name}", xml)
    store.write_text(f"{RECIPES}/{rid}/csvalignment.dat", alignment)
    store.write_text(f"{RECIPES}/{rid}/fps.txt", "29.97\n")
    if video:
        store.write_bytes(f"{RECIPES}/{rid}/{video}", b"mp4")


@pytest.fixture
def release(tmp_path):
    store = Store(str(tmp_path))
    # Extra alignment lines (the release's reader ignores them) and 1-based 5-frame blocks.
    _recipe(store, "fluffy-pancakes", PANCAKES, "1,4\n5,12\n-1,-1\n13,14\n")
    _recipe(store, "tomato-soup", SOUP, "2,3\n-1,-1\n")
    _recipe(store, "lemonade", PANCAKES.replace("Whisk", "Stir"), "1,1\n2,2\n-1,-1\n", video="lemonade.webm")
    store.write_text(f"{R}/ALL_RECIPES.txt", "fluffy-pancakes\nlemonade\ntomato-soup\n")
    # split_2511 (the ICCV paper's) lists two of the three; split_4022 all of them.
    store.write_text(f"{R}/SPLITS/split_2511/TRAIN_2511.txt", "fluffy-pancakes\n")
    store.write_text(f"{R}/SPLITS/split_2511/TEST_2511.txt", "tomato-soup\n")
    store.write_text(f"{R}/SPLITS/split_4022/TRAIN_4022.txt", "fluffy-pancakes\nlemonade\n")
    store.write_text(f"{R}/SPLITS/split_4022/VAL_4022.txt", "")
    store.write_text(f"{R}/SPLITS/split_4022/TEST_4022.txt", "tomato-soup\n")
    return store


def test_the_release_root_reads_with_no_settings(release):
    recipes = read_tasty(release, R)
    assert recipes.problems == [] and recipes.excluded == []
    assert recipes.layout == "release; split set split_4022 (chosen: it lists 3 of 3 recipe folders)"
    assert {r.id: r.split for r in recipes} == {"fluffy-pancakes": "train", "lemonade": "train", "tomato-soup": "test"}
    pancakes = recipes[0]
    # Every part of a three-part line is kept; the empty ingredient is skipped, not the recipe.
    assert pancakes.ingredients == [
        Ingredient("all-purpose flour", 1.5, "cup", None, 190.0, "g"),
        Ingredient("eggs", 2.0, None, "beaten"),
        Ingredient("confectioners' sugar", 1.0, None, "for dusting"),
    ]
    # Written text, not the tokenizer's: "smooth." and "(in batches)".
    assert pancakes.steps == [
        "Whisk the flour and eggs until smooth.",
        "Fry the batter (in batches) until browned, about 2 minutes.",
        "Enjoy!",
    ]
    assert pancakes.text.splitlines()[:4] == [
        "Ingredients:",
        "- 1 1/2 cup all-purpose flour",
        "- 2 eggs",
        "- 1 confectioners' sugar",
    ]
    # Blocks "1,4" and "5,12" are frames 1-20 and 21-60 counted from 1 (start*5-4 .. end*5).
    assert pancakes.step_spans == [(0, 19), (20, 59), None]
    assert pancakes.video_key == f"{RECIPES}/fluffy-pancakes/recipe_video.mp4"
    assert recipes[1].video_key == f"{RECIPES}/lemonade/lemonade.webm"
    assert recipes[2].step_spans == [(5, 14), None]
    # Each change inside a kept recipe is counted.
    assert recipes.decisions == {
        "empty_ingredient_skipped": 2,
        "second_amount_kept": 2,
        "alignment_extra_lines_ignored": 1,
    }


def test_the_other_split_set_excludes_what_it_does_not_list(release):
    recipes = read_tasty(release, R, split_set="split_2511")
    assert [r.id for r in recipes] == ["fluffy-pancakes", "tomato-soup"]
    assert recipes.excluded == [("lemonade", "unlisted: in no list of SPLITS/split_2511")]
    assert recipes.layout == "release; split set split_2511 (as configured)"
    trained = read_tasty(release, R, split_set="split_2511", unlisted="train")
    assert [(r.id, r.split) for r in trained][1] == ("lemonade", "train")
    assert trained.excluded == [] and trained.decisions["unlisted_trained_on"] == 1
    with pytest.raises(DataError, match=r"no split set 'split_1' .*found \['split_2511', 'split_4022'\]"):
        read_tasty(release, R, split_set="split_1")


def test_pointed_at_the_recipes_folder_finds_the_splits_one_level_up(release):
    recipes = read_tasty(release, RECIPES)
    assert len(recipes) == 3 and recipes.problems == []
    assert recipes.layout.startswith("release, read from its ALL_RECIPES_without_videos/ folder; split set split_4022")


def test_encoded_recipes_are_decoded_with_the_release_table(release):
    _recipe(release, "lemonade", ENCODED, "1,2\n-1,-1\n", name="recipe_encoded.xml")
    release.delete(f"{RECIPES}/lemonade/recipe.xml")
    missing = read_tasty(release, R)
    assert dict(missing.problems)["lemonade"].startswith("missing_file: no recipe.xml: decode recipe_encoded.xml")
    release.write_text(f"{R}/id2word_tasty.txt", TABLE)
    recipes = read_tasty(release, R)
    lemonade = next(r for r in recipes if r.id == "lemonade")
    assert lemonade.ingredients == [Ingredient("lemons", 3.0)] and lemonade.steps == ["Squeeze lemons.", "Enjoy!"]
    assert recipes.decisions["decoded_from_recipe_encoded"] == 1
    release.write_text(f"{R}/id2word_tasty.txt", "__import__('os').system('echo no')")
    with pytest.raises(DataError, match="not the release's decoding table"):
        read_tasty(release, R)  # a literal, never code


def test_bad_recipes_are_problems_with_reasons(release):
    _recipe(release, "short", SOUP, "1,2\n")  # fewer alignment lines than steps
    _recipe(release, "zero", SOUP, "0,2\n-1,-1\n")  # blocks count from 1
    _recipe(release, "blank", SOUP.replace("2 cups ; tomatoes , chopped ", ""), "1,2\n-1,-1\n")
    _recipe(release, "novideo", SOUP, "1,2\n-1,-1\n", video=None)
    release.write_text(f"{R}/SPLITS/split_4022/TRAIN_4022.txt", "short\nzero\nblank\nnovideo\nghost\n")
    release.write_text(f"{R}/SPLITS/split_4022/TEST_4022.txt", "tomato-soup\nfluffy-pancakes\n")
    recipes = read_tasty(release, R)
    assert {rid: reason.split(":")[0] for rid, reason in recipes.problems} == {
        "short": "bad_alignment",
        "zero": "bad_alignment",
        "blank": "empty_recipe",
        "novideo": "missing_file",
        "ghost": "missing_folder",
    }
    assert recipes.excluded == [("lemonade", "unlisted: in no list of SPLITS/split_4022")]


def test_a_wrong_root_names_what_it_found(tmp_path):
    store = Store(str(tmp_path))
    store.write_text("downloads/tasty.zip.part", "x")
    store.write_text("downloads/notes/readme.txt", "x")
    with pytest.raises(DataError, match=r"no recipe folders under .*downloads \(it holds notes/, tasty.zip.part\)"):
        read_tasty(store, "downloads")
    store.write_text("flat/r1/recipe.xml", SOUP)
    store.write_text("flat/r1/csvalignment.dat", "1,1\n-1,-1\n")
    with pytest.raises(DataError, match="no split lists under .*tasty_unlisted: train"):
        read_tasty(store, "flat")


@pytest.mark.parametrize(
    "tokens, text",
    [
        ("Bake until browned . ", "Bake until browned."),
        ("Preheat the oven to 350 ° F ( 175 ° C ) . ", "Preheat the oven to 350°F (175°C)."),
        ("Do n't stir ; it 's done ! ", "Don't stir; it's done!"),
        ("Add 1/2 cup of `` magic '' sauce , then serve : hot", 'Add 1/2 cup of "magic" sauce, then serve: hot'),
    ],
)
def test_detokenize(tokens, text):
    assert detokenize(tokens) == text
