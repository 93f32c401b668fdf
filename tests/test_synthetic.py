import io
import re

import numpy as np
import pytest
from PIL import Image

from ddft.data.formats import read_foodx, read_qa, read_tasty
from ddft.data.media import load_decord
from ddft.data.synthetic import DISHES, FOODS, write_kitchen
from ddft.recipes import parse_recipe
from ddft.store import Store

decord = load_decord()  # after torch (see load_decord)

SMALL = dict(dishes=3, images_per_dish=3, recipes=4, qa_pairs=20, video_seconds=3.3, fps=10)


@pytest.fixture(scope="module")
def kitchen(tmp_path_factory):
    """The default kitchen, as `make demo` writes it."""
    store = Store(str(tmp_path_factory.mktemp("kitchen")))
    return store, write_kitchen(store)


def _files(store):
    return {k: store.read_bytes(k) for k in store.list("")}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = (Store(str(tmp_path / n)) for n in "abc")
    write_kitchen(a, seed=7, **SMALL)
    write_kitchen(b, seed=7, **SMALL)
    write_kitchen(c, seed=8, **SMALL)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa == fb
    assert fa.keys() == fc.keys()
    media = [k for k in fa if k.endswith((".jpg", ".mp4"))]
    # photos of the 3 dishes; 4 recipes (all trained on) and 2 of each of the 2 held-out dishes; the
    # 4 that are not trained on (test) again in YouCook2's layout
    assert len(media) == 3 * 3 + (4 + 2 * 2) + 4
    assert all(fa[k] != fc[k] for k in media)
    assert fa["datasets/raw/cooking_qa/qa.jsonl"] != fc["datasets/raw/cooking_qa/qa.jsonl"]


def test_odd_frame_count_decodes(tmp_path):
    store = Store(str(tmp_path))
    summary = write_kitchen(store, "raw", **SMALL)
    assert summary["video"]["frames"] == 33
    for r in read_tasty(store, "raw/tasty"):
        vr = decord.VideoReader(io.BytesIO(store.read_bytes(r.video_key)))
        assert len(vr) == 33
        assert all(s is None or s[1] < 33 for s in r.step_spans)


def test_defaults_and_layout(kitchen):
    store, summary = kitchen
    assert summary["dishes"] == [d.key for d in DISHES[:6]]
    assert summary["foodx"] == {"train": 36, "val": 12}
    assert len(summary["recipes"]) == 12 + 2 * 2 and summary["qa_pairs"] == 60
    assert summary["held_out_dishes"] == ["rice_pudding", "cheese_toast"]
    # Held out: every video of a dish never trained on (and only those); in-distribution: new amounts.
    assert sorted(summary["splits"]["test"]) == ["cheese-toast-1", "cheese-toast-2", "rice-pudding-1", "rice-pudding-2"]
    assert summary["splits"]["val"] and all(
        summary["recipes"][r]["dish"] in summary["dishes"]
        for r in summary["splits"]["train"] + summary["splits"]["val"]
    )
    assert summary["video"] == {"codec": summary["video"]["codec"], "fps": 10, "frames": 60, "size": [224, 224]}
    assert summary["video"]["codec"] in ("libx264", "mpeg4")
    raw = "datasets/raw"
    assert store.read_text(f"{raw}/foodx251/class_list.txt").startswith("0 tomato_soup\n1 green_salad\n")
    assert store.read_text(f"{raw}/foodx251/train_info.csv").startswith("train_00000.jpg,0\n")
    # Tasty and YouCook2 as their releases lay them out
    assert store.exists(f"{raw}/tasty/SPLITS/split_16/TEST_16.txt")
    assert store.read_text(f"{raw}/tasty/ALL_RECIPES.txt").splitlines() == sorted(summary["recipes"])
    assert store.exists(f"{raw}/tasty/ALL_RECIPES_without_videos/tomato-soup-1/csvalignment.dat")
    assert store.exists(f"{raw}/youcook2/YouCookII/annotations/youcookii_annotations_trainval.json")


def test_foodx_reads_back_and_dishes_differ_in_colour(kitchen):
    store, summary = kitchen
    ds = read_foodx(store, "datasets/raw/foodx251")
    assert ds.problems == [] and len(ds.classes) == 6
    assert [len(ds.splits[s]) for s in ("train", "val")] == [36, 12]
    means: dict[int, list] = {}
    for key, label, _ in ds.splits["train"] + ds.splits["val"]:
        img = np.asarray(Image.open(io.BytesIO(store.read_bytes(key))).convert("RGB"), np.float32)
        assert img.shape == (224, 224, 3)
        means.setdefault(label, []).append(img[100:124, 100:124].reshape(-1, 3).mean(0))
    centroids = {k: np.mean(v, 0) for k, v in means.items()}
    dists = [np.linalg.norm(centroids[i] - centroids[j]) for i in centroids for j in centroids if i < j]
    assert min(dists) > 40, dists
    for label, ms in means.items():  # every photo is nearest its own dish's colour
        for m in ms:
            assert min(centroids, key=lambda k: np.linalg.norm(centroids[k] - m)) == label


def _icon_runs(row: np.ndarray, colour) -> int:
    """How many separate stretches of `colour` lie along a pixel row."""
    hit = np.linalg.norm(row.astype(np.float32) - np.array(colour, np.float32), axis=1) < 60
    return int(np.sum(hit[1:] & ~hit[:-1]) + hit[0])


def test_tasty_reads_back_and_video_shows_the_recipe(kitchen):
    store, summary = kitchen
    recipes = read_tasty(store, "datasets/raw/tasty")
    assert recipes.problems == []
    assert {r.id: (r.text, r.split) for r in recipes} == {
        k: (v["text"], v["split"]) for k, v in summary["recipes"].items()
    }
    for r in recipes:
        assert r.steps[-1] == "Enjoy!" and r.step_spans[-1] is None
        assert all(s is not None for s in r.step_spans[:-1])
    for r in recipes:
        vr = decord.VideoReader(io.BytesIO(store.read_bytes(r.video_key)))
        assert len(vr) == 60 and vr[0].shape == (224, 224, 3) and vr.get_avg_fps() == 10
        # The tray's row, inside the tray (x 20%..80%): the table around it may be near a food's grey.
        tray_row = vr.get_batch(list(range(60))).asnumpy()[
            :, round(224 * 0.11), round(224 * 0.2) + 2 : round(224 * 0.8) - 2
        ]
        # Every frame of an ingredient's step, first to last, shows as many icons of its colour as
        # the amount says: the amounts and the alignment (the release's 1-based blocks) are right.
        for ing, (first, last) in zip(r.ingredients, r.step_spans):
            food = FOODS[ing.name]
            counts = {_icon_runs(row, food.colour) for row in tray_row[first : last + 1]}
            assert counts == {ing.quantity / food.per_icon}, (r.id, ing, counts)


def test_qa_holds_out_whole_facts_and_every_fact_of_the_held_out_dishes(kitchen):
    store, summary = kitchen
    pairs = read_qa(store, "datasets/raw/cooking_qa/qa.jsonl")
    by_fact: dict = {}
    for p in pairs:
        by_fact.setdefault(p.fact, set()).add(p.split)
    # No fact has one phrasing held out and the other trained on; val phrasings are of trained facts.
    assert all(s in ({"test"}, {"train"}, {"val"}, {"train", "val"}) for s in by_fact.values()), by_fact
    assert summary["qa_splits"]["test"] >= 6 and summary["qa_splits"]["val"] >= 2
    unseen = [d.replace("_", " ") for d in summary["held_out_dishes"]]
    about_unseen = [p for p in pairs if any(d in p[0] for d in unseen)]
    assert about_unseen and {p.split for p in about_unseen} == {"test"}


def test_qa_reads_back_and_agrees_with_the_videos(kitchen):
    store, _ = kitchen
    pairs = read_qa(store, "datasets/raw/cooking_qa/qa.jsonl")
    assert pairs.problems == [] and len(pairs) == 60 and len(set(pairs)) == 60
    texts = {r.id: r.text for r in read_tasty(store, "datasets/raw/tasty")}
    colours = {d.name: d.colour_name for d in DISHES}
    checked = 0
    for q, a in pairs:
        if m := re.fullmatch(r"How much (\w+) (?:for|goes into) (.+)\?", q):
            food, dish = m.groups()  # the dish's first recipe uses the classic amounts
            assert f"\n- {a} {food}\n" in texts[dish.replace(" ", "-") + "-1"], (q, a)
            checked += 1
        elif m := re.fullmatch(r"What colour is (?:the )?(.+)\?", q):
            assert a == colours.get(m.group(1), FOODS.get(m.group(1)) and FOODS[m.group(1)].colour_name)
            checked += 1
    assert checked >= 10


def test_held_out_recipes_read_back_in_youcook2_layout(kitchen):
    from ddft.data.formats import read_youcook2

    store, summary = kitchen
    raw = "datasets/raw"
    held_out = sorted(summary["splits"]["val"] + summary["splits"]["test"])
    yc2 = f"{raw}/youcook2/YouCookII"
    videos = read_youcook2(store, f"{yc2}/annotations/youcookii_annotations_trainval.json", subset="validation")
    assert not videos.problems and [v.id for v in videos] == held_out == summary["youcook2"]
    for v in videos:
        tasty_steps = summary["recipes"][v.id]["text"].split("Steps:\n", 1)[1].splitlines()
        assert [f"{i}. {s}" for i, s in enumerate(v.steps, 1)] == tasty_steps[:-1]  # all but "Enjoy!"
        assert v.segments[-1][1] == v.duration == 6.0 and v.segments[0][0] == 0.0
        assert store.read_bytes(f"{yc2}/raw_videos/validation/{v.recipe_type}/{v.id}.mp4") == store.read_bytes(
            f"{raw}/tasty/ALL_RECIPES_without_videos/{v.id}/recipe_video.mp4"
        )


def test_recipes_combine_foods_freely_and_hold_out_unseen_combinations(tmp_path):
    """Naming a recipe's foods takes reading the video: a dish has no fixed foods, every food is
    trained in many combinations, and no val or test recipe cooks a trained combination."""
    summary = write_kitchen(
        Store(str(tmp_path)), seed=3, images_per_dish=2, recipes=36, held_out_videos=4, qa_pairs=8, video_seconds=6
    )
    foods = {
        rid: frozenset(i["name"] for i in parse_recipe(r["text"])["ingredients"])
        for rid, r in summary["recipes"].items()
    }
    trained = [foods[r] for r in summary["splits"]["train"]]
    held = [foods[r] for s in ("val", "test") for r in summary["splits"][s]]
    assert len(held) == 36 - len(trained) + 2 * 4 and not set(held) & set(trained)
    assert len(set(trained)) == len(trained)  # each training recipe a combination of its own
    for name in FOODS:  # every food in several trained combinations, beside several other foods
        combos = [c for c in trained if name in c]
        assert len(combos) >= 3 and len(set().union(*combos)) >= 5, name
    by_dish = {}
    for rid in summary["splits"]["train"]:
        by_dish.setdefault(summary["recipes"][rid]["dish"], set()).add(foods[rid])
    assert all(len(c) >= 3 for c in by_dish.values())  # a dish's recipes cook different foods
    with pytest.raises(ValueError, match="none is left to hold out"):
        write_kitchen(
            Store(str(tmp_path / "all")),
            dishes=2,
            held_out_dishes=0,
            recipes=900,
            images_per_dish=2,
            qa_pairs=4,
            video_seconds=1,
        )


def test_step_frames_show_their_captions_and_no_recipe_videos_frame():
    """The alignment's captioned frames: seeded (the same bytes twice), each caption a food of the kitchen
    and a count it can show, and the frames are the recipe videos' size and kind (a tray at the top)."""
    from ddft.data.synthetic import FOODS, MAX_ICONS, step_frames

    frames, captions = step_frames(12, seed=3)
    again, same = step_frames(12, seed=3)
    assert captions == same and all(np.array_equal(a, b) for a, b in zip(frames, again))
    assert step_frames(12, seed=4)[1] != captions
    assert {f.shape for f in frames} == {(224, 224, 3)} and all(f.dtype == np.uint8 for f in frames)
    assert all(food in FOODS and 1 <= icons <= MAX_ICONS for food, icons in captions)
    tray = np.stack([f[:50, 50:174] for f in frames]).reshape(12, -1, 3)
    for (food, _), pixels in zip(captions, tray):  # the tray shows the food's own colour
        assert (np.abs(pixels.astype(int) - FOODS[food].colour).sum(1) < 30).any(), food
