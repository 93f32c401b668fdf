import json

import pytest

from ddft.data.formats import DataError, YoucookVideo, read_foodx, read_qa, read_tasty, read_youcook2
from ddft.recipes import Ingredient


def _images(store, folder, names):
    for n in names:
        store.write_bytes(f"foodx/{folder}/{n}", b"jpeg")


def test_foodx_official_layout(store):
    store.write_text("foodx/class_list.txt", "0 macaron\n1 hot_dog\n2 beignet\n")
    store.write_text(
        "foodx/train_info.csv",
        "train_00000.jpg,1\ntrain_00001.jpg,0\ntrain_00002.jpg,7\ntrain_00003.jpg\ntrain_00004.jpg,2\n",
    )
    store.write_text("foodx/val_info.csv", "val_00000.jpg,2\n")
    _images(
        store, "train_set", ["train_00000.jpg", "train_00001.jpg", "train_00002.jpg", "train_00003.jpg"]
    )  # train_00004.jpg is missing
    _images(store, "val_set", ["val_00000.jpg"])
    ds = read_foodx(store, "foodx")
    assert ds.classes == {0: "macaron", 1: "hot_dog", 2: "beignet"}
    assert ds.dish_name(1) == "hot dog"
    assert ds.splits["train"] == [
        ("foodx/train_set/train_00000.jpg", 1, "hot_dog"),
        ("foodx/train_set/train_00001.jpg", 0, "macaron"),
    ]
    assert ds.splits["val"] == [("foodx/val_set/val_00000.jpg", 2, "beignet")]
    assert ds.problems == [
        ("train_info.csv:3", "label_out_of_range: label 7 is not a class id"),
        ("train_info.csv:4", "bad_row: expected 'image_name,label', got 'train_00003.jpg'"),
        ("train_info.csv:5", "missing_file: image train_set/train_00004.jpg is missing"),
    ]


def test_foodx_kaggle_layout(store):
    store.write_text("foodx/class_list.txt", "0 macaron\n1 beignet\n")
    store.write_text("foodx/train_labels.csv", "img_name,label\ntrain_00000.jpg,1\nx.jpg,-1\n")
    _images(store, "train_set", ["train_00000.jpg", "x.jpg"])
    ds = read_foodx(store, "foodx/")
    assert ds.splits == {"train": [("foodx/train_set/train_00000.jpg", 1, "beignet")]}
    assert ds.problems == [("train_labels.csv:3", "label_out_of_range: label -1 is not a class id")]


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
    store.write_text("tasty/rice-bowl/csvalignment.dat", "1,4\n5,10\n-1,-1\n")  # 5-frame blocks from 1
    store.write_bytes("tasty/rice-bowl/recipe_video.mp4", b"mp4")
    # <step> children, a differently named video, and no title
    store.write_text(
        "tasty/salty/recipe.xml",
        "<recipe><ingredients><ingredient>salt</ingredient>"
        "</ingredients><steps_updated><step>Salt it.</step></steps_updated></recipe>",
    )
    store.write_text("tasty/salty/csvalignment.dat", "2,2\n")
    store.write_bytes("tasty/salty/salty.mp4", b"mp4")
    # alignment lines don't match the steps
    store.write_text("tasty/broken/recipe.xml", RECIPE_XML)
    store.write_text("tasty/broken/csvalignment.dat", "1,4\n")
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
    assert bowl.ingredients == [Ingredient("rice", 2.0, "cup", "rinsed"), Ingredient("salt", 0.5, "tsp")]
    assert bowl.steps == ["Rinse the rice.", "Boil the rice.", "Enjoy!"]
    assert bowl.step_spans == [(0, 19), (20, 49), None]  # frames 1-20 and 21-50, counted from 1
    assert bowl.video_key == "tasty/rice-bowl/recipe_video.mp4"
    assert bowl.split == "train"
    assert bowl.text == (
        "Ingredients:\n- 2 cup rice\n- 1/2 tsp salt\nSteps:\n1. Rinse the rice.\n2. Boil the rice.\n3. Enjoy!"
    )
    assert (salty.title, salty.steps, salty.step_spans) == ("salty", ["Salt it."], [(5, 9)])
    assert (salty.video_key, salty.split) == ("tasty/salty/salty.mp4", "test")
    assert recipes.problems == [
        ("broken", "bad_alignment: csvalignment.dat has 1 lines for 3 steps"),
        ("ghost", "missing_folder: listed in SPLITS/split_1 but has no folder"),
    ]
    assert recipes.layout == (
        "flat: recipe folders and SPLITS/ side by side; split set split_1 (chosen: it lists 3 of 3 recipe folders)"
    )


def test_tasty_bad_recipes_become_problems(store):
    store.write_text("tasty/a/recipe.xml", "<recipe><ingredients>")
    store.write_text("tasty/a/csvalignment.dat", "1,1\n")
    store.write_text("tasty/b/recipe.xml", RECIPE_XML.replace("1/2 tsp; salt", "; "))
    store.write_text("tasty/b/csvalignment.dat", "1,1\n1,2\n-1,-1\n")
    store.write_bytes("tasty/b/v.mp4", b"")
    store.write_text("tasty/c/recipe.xml", RECIPE_XML)
    store.write_text("tasty/c/csvalignment.dat", "1,1\n5,2\n-1,-1\n")
    store.write_bytes("tasty/c/recipe_video.mp4", b"")
    store.write_text("tasty/d/recipe.xml", RECIPE_XML)
    store.write_text("tasty/d/csvalignment.dat", "1,1\n1,2\n-1,-1\n")
    recipes = read_tasty(store, "tasty", unlisted="train")  # no split lists here
    assert list(recipes) == []
    reasons = dict(recipes.problems)
    assert {rid: r.split(":")[0] for rid, r in reasons.items()} == {
        "a": "bad_xml",
        "b": "bad_ingredient",
        "c": "bad_alignment",
        "d": "missing_file",
    }
    assert "'; '" in reasons["b"] and "bad span" in reasons["c"] and "mp4" in reasons["d"]
    with pytest.raises(DataError, match="no split lists under .*tasty_unlisted: train"):
        read_tasty(store, "tasty")
    store.write_text("tasty/SPLITS/split_1/TRAIN_1.txt", "a\n")
    with pytest.raises(DataError, match="no split set 'split_9' under .*found \\['split_1'\\]"):
        read_tasty(store, "tasty", split_set="split_9")


def test_qa(store):
    store.write_text(
        "qa/qa.jsonl",
        '{"question": "What colour is a tomato?", "answer": "red"}\n'
        "\n"
        "{not json\n"
        '{"question": "Why?"}\n'
        '["a", "b"]\n'
        '{"question": " How long to boil an egg? ", "answer": "10 minutes"}\n',
    )
    pairs = read_qa(store, "qa/qa.jsonl")
    assert list(pairs) == [("What colour is a tomato?", "red"), ("How long to boil an egg?", "10 minutes")]
    assert pairs.problems == [
        ("qa.jsonl:3", "not_json: Expecting property name enclosed in double quotes"),
        ("qa.jsonl:4", "empty_answer: needs a non-empty string 'answer'"),
        ("qa.jsonl:5", "not_object: expected a JSON object, got list"),
    ]


def test_qa_fact_and_split_are_read_and_checked(store):
    from ddft.data.prepare import qa_split

    store.write_text(
        "qa/qa.jsonl",
        '{"question": "Colour of soup?", "answer": "red", "fact": "f1", "split": "TEST"}\n'
        '{"question": "What colour is soup?", "answer": "red", "fact": "f1"}\n'
        '{"question": "Q?", "answer": "A", "split": "holdout"}\n'
        '{"question": "Q?", "answer": "A", "fact": 3}\n',
    )
    store.write_text("qa/qa.csv", "question,answer,split,fact\nColour of soup?,red,val,f1\nShape?,round,,\n")
    pairs = read_qa(store, "qa/qa.jsonl")
    assert [(p.fact, p.split) for p in pairs] == [("f1", "test"), ("f1", None)]
    assert pairs[0] == ("Colour of soup?", "red")  # still a pair
    assert [w for w, _ in pairs.problems] == ["qa.jsonl:3", "qa.jsonl:4"]
    assert pairs.problems[0][1].startswith("bad_split: 'split' must be one of ['train', 'val', 'test']")
    assert pairs.problems[1][1].startswith("bad_fact")
    csv_pairs = read_qa(store, "qa/qa.csv")
    assert [(tuple(p), p.fact, p.split) for p in csv_pairs] == [
        (("Colour of soup?", "red"), "f1", "val"),
        (("Shape?", "round"), None, None),
    ]
    # The file's split wins; without one, a hash of the fact decides, the same for every phrasing.
    assert qa_split(pairs[0]) == "test"
    from ddft.data.formats import QAPair

    facts = [[QAPair(f"q{i}-{k}", "a", fact=f"fact-{i}") for k in range(2)] for i in range(200)]
    sides = [{qa_split(p) for p in pair} for pair in facts]
    assert all(s in ({"test"}, {"train"}, {"val"}, {"train", "val"}) for s in sides)
    assert 5 <= sum(s == {"test"} for s in sides) <= 40


def test_tasty_recipe_that_is_not_utf8(store):
    _tasty(store)
    store.write_bytes("tasty/salty/recipe.xml", "<recipe><title>Salé</title></recipe>".encode("latin-1"))
    recipes = read_tasty(store, "tasty")
    assert [r.id for r in recipes] == ["rice-bowl"]
    assert recipes.problems[:2] == [
        ("broken", "bad_alignment: csvalignment.dat has 1 lines for 3 steps"),
        ("salty", "not_utf8: recipe.xml has byte 0xe9 at offset 18"),
    ]


def test_foodx_lines_that_are_not_utf8(store):
    store.write_bytes("foodx/class_list.txt", "0 macaron\n1 crème_brûlée\n2 beignet\n".encode())
    store.write_bytes("foodx/train_info.csv", b"train_00000.jpg,1\ntr\xe9s.jpg,0\r\ntrain_00001.jpg,2\n")
    _images(store, "train_set", ["train_00000.jpg", "train_00001.jpg"])
    ds = read_foodx(store, "foodx")
    assert ds.classes == {0: "macaron", 1: "crème_brûlée", 2: "beignet"}
    assert ds.splits["train"] == [
        ("foodx/train_set/train_00000.jpg", 1, "crème_brûlée"),
        ("foodx/train_set/train_00001.jpg", 2, "beignet"),
    ]
    assert ds.problems == [("train_info.csv:2", "not_utf8: byte 0xe9 at offset 2")]

    store.write_bytes("foodx/class_list.txt", b"0 macaron\n1 cr\xe8me\n")
    ds = read_foodx(store, "foodx")
    assert ds.classes == {0: "macaron"}
    assert ds.problems == [
        ("class_list.txt:2", "not_utf8: byte 0xe8 at offset 4"),
        ("train_info.csv:1", "label_out_of_range: label 1 is not a class id"),
        ("train_info.csv:2", "not_utf8: byte 0xe9 at offset 2"),
        ("train_info.csv:3", "label_out_of_range: label 2 is not a class id"),
    ]


def test_qa_jsonl_lines_that_are_not_utf8(store):
    good = json.dumps({"question": "Line\u2028separator?", "answer": "kept"}, ensure_ascii=False)
    store.write_bytes(
        "qa/qa.jsonl",
        b'{"question": "Q1", "answer": "A1"}\n'
        b'{"question": "caf\xe9?", "answer": "yes"}\n' + good.encode() + b"\n\xff\xfe\n",
    )
    pairs = read_qa(store, "qa/qa.jsonl")
    assert list(pairs) == [("Q1", "A1"), ("Line\u2028separator?", "kept")]
    assert pairs.problems == [
        ("qa.jsonl:2", "not_utf8: byte 0xe9 at offset 17"),
        ("qa.jsonl:4", "not_utf8: byte 0xff at offset 0"),
    ]


QA_CSV = (
    "id,Question,answer,source\r\n"
    '1,"Salt, pepper or both?","Both, to taste",book\r\n'
    '2,How do I make a roux?,"Melt the butter.\r\nWhisk in the flour, then cook 2 minutes.",\r\n'
    "\r\n"
    "3,What is mise en place?,,web\r\n"
    '4,"He said ""stir"", why?",To keep it from sticking.,web\r\n'
)


def test_qa_csv(store):
    store.write_text("qa/qa.csv", QA_CSV)
    pairs = read_qa(store, "qa/qa.csv")
    assert list(pairs) == [
        ("Salt, pepper or both?", "Both, to taste"),
        ("How do I make a roux?", "Melt the butter.\r\nWhisk in the flour, then cook 2 minutes."),
        ('He said "stir", why?', "To keep it from sticking."),
    ]
    assert pairs.problems == [("qa.csv:6", "empty_answer: needs a non-empty string 'answer'")]


def test_qa_csv_bad_rows_and_header(store):
    store.write_bytes("qa/qa.csv", b'question,answer\n"Q1","A1\nmore"\n"caf\xe9?","multi\nline"\n,A3\nQ4\nQ5,A5\n')
    pairs = read_qa(store, "qa/qa.csv")
    assert list(pairs) == [("Q1", "A1\nmore"), ("Q5", "A5")]
    assert pairs.problems == [
        ("qa.csv:4", "not_utf8: row has bytes that are not UTF-8"),
        ("qa.csv:6", "empty_question: needs a non-empty string 'question'"),
        ("qa.csv:7", "short_row: 1 cells for 2 columns"),
    ]

    store.write_text("qa/bad.csv", "prompt,answer,notes\nQ,A,\n")
    with pytest.raises(ValueError, match=r"\['prompt', 'answer', 'notes'\] lack \['question'\]"):
        read_qa(store, "qa/bad.csv")
    store.write_text("qa/qa.txt", "Q\tA\n")
    with pytest.raises(ValueError, match=".jsonl or .csv"):
        read_qa(store, "qa/qa.txt")


YOUCOOK2 = {
    "database": {
        "GLd3aX16zBg": {
            "duration": 241.62,
            "subset": "training",
            "recipe_type": "113",
            "video_url": "https://www.youtube.com/watch?v=GLd3aX16zBg",
            "annotations": [  # out of id order on purpose
                {"id": 1, "segment": [97, 104], "sentence": "add  salt and pepper to the egg"},
                {"id": 0, "segment": [90, 102], "sentence": "spread margarine on two slices of bread"},
                {"id": 2, "segment": [105.5, 116], "sentence": "fry the egg"},
            ],
        },
        "xHr8X2Wpmno": {
            "duration": 109.5,
            "subset": "validation",
            "recipe_type": "201",
            "video_url": "https://www.youtube.com/watch?v=xHr8X2Wpmno",
            "annotations": [{"id": 0, "segment": [10, 22], "sentence": "boil the noodles"}],
        },
        "broken_seg": {
            "duration": 60.0,
            "subset": "training",
            "recipe_type": "113",
            "video_url": "",
            "annotations": [
                {"id": 0, "segment": [5, 9], "sentence": "cut the bread"},
                {"id": 1, "segment": [30, 12], "sentence": "toast it"},
            ],
        },
        "no_anns": {"duration": 60.0, "subset": "validation", "recipe_type": "201", "annotations": []},
        "neg": {
            "duration": 60.0,
            "subset": "validation",
            "recipe_type": "201",
            "annotations": [{"id": 0, "segment": [-1, 4], "sentence": "wash"}],
        },
        "blank": {
            "duration": 60.0,
            "subset": "training",
            "recipe_type": "113",
            "annotations": [{"id": 0, "segment": [1, 4], "sentence": "  "}],
        },
        "junk": ["not", "a", "video"],
    }
}


def test_youcook2(store):
    store.write_json("yc2/youcookii_annotations_trainval.json", YOUCOOK2)
    videos = read_youcook2(store, "yc2/youcookii_annotations_trainval.json")
    assert videos == [
        YoucookVideo(
            "GLd3aX16zBg",
            "training",
            "113",
            241.62,
            [
                (90.0, 102.0, "spread margarine on two slices of bread"),
                (97.0, 104.0, "add salt and pepper to the egg"),
                (105.5, 116.0, "fry the egg"),
            ],
        ),
        YoucookVideo("xHr8X2Wpmno", "validation", "201", 109.5, [(10.0, 22.0, "boil the noodles")]),
    ]
    assert videos[0].text == (
        "Steps:\n1. spread margarine on two slices of bread\n2. add salt and pepper to the egg\n3. fry the egg"
    )
    assert videos.problems == [
        ("blank", "empty_sentence: annotation 0 has no sentence"),
        ("broken_seg", "bad_segment: annotation 1: segment [30.0, 12.0] needs 0 <= start < end"),
        ("junk", "not_object: expected a JSON object, got list"),
        ("neg", "bad_segment: annotation 0: segment [-1.0, 4.0] needs 0 <= start < end"),
        ("no_anns", "no_annotations: no annotated segments"),
    ]

    val = read_youcook2(store, "yc2/youcookii_annotations_trainval.json", subset="validation")
    assert [v.id for v in val] == ["xHr8X2Wpmno"]
    assert [where for where, _ in val.problems] == ["junk", "neg", "no_anns"]
    with pytest.raises(ValueError, match="subset 'val'"):
        read_youcook2(store, "yc2/youcookii_annotations_trainval.json", subset="val")
    store.write_json("yc2/other.json", {"videos": {}})
    with pytest.raises(ValueError, match="database"):
        read_youcook2(store, "yc2/other.json")
