"""FoodX-251 as it is downloaded, each layout built here by hand (not by the synthetic kitchen): the
official archives (annotations at the root or under annot/), the flat Kaggle CSVs, and Kaggle's
nested mount (train_set/train_set/...)."""

import pytest

from ddft.data.formats import DataError, read_foodx

CLASSES = "0 macaron\n1 hot_dog\n2 beignet\n"


def _images(store, folder, names):
    for n in names:
        store.write_bytes(f"foodx/{folder}/{n}", b"jpeg")


def _official(store, annot=""):
    store.write_text(f"foodx/{annot}class_list.txt", CLASSES)
    store.write_text(f"foodx/{annot}train_info.csv", "train_00000.jpg,1\ntrain_00001.jpg,0\n")
    store.write_text(f"foodx/{annot}val_info.csv", "val_00000.jpg,2\n")
    _images(store, "train_set", ["train_00000.jpg", "train_00001.jpg"])
    _images(store, "val_set", ["val_00000.jpg"])


@pytest.mark.parametrize("annot,layout", [("", "official"), ("annot/", "official, annot/")])
def test_official_at_the_root_or_under_annot(store, annot, layout):
    _official(store, annot)
    ds = read_foodx(store, "foodx")
    assert ds.layout == layout
    assert ds.splits == {
        "train": [("foodx/train_set/train_00000.jpg", 1, "hot_dog"), ("foodx/train_set/train_00001.jpg", 0, "macaron")],
        "val": [("foodx/val_set/val_00000.jpg", 2, "beignet")],
    }
    assert ds.problems == []


def test_flat_kaggle(store):
    store.write_text("foodx/class_list.txt", CLASSES)
    store.write_text("foodx/train_labels.csv", "img_name,label\ntrain_00000.jpg,1\n")
    store.write_text("foodx/val_labels.csv", "img_name,label\nval_00000.jpg,2\nval_00001.jpg,0\n")
    _images(store, "train_set", ["train_00000.jpg"])
    _images(store, "val_set", ["val_00000.jpg"])  # val_00001.jpg is missing: one row's problem
    ds = read_foodx(store, "foodx")
    assert ds.layout == "kaggle"
    assert ds.splits["train"] == [("foodx/train_set/train_00000.jpg", 1, "hot_dog")]
    assert ds.splits["val"] == [("foodx/val_set/val_00000.jpg", 2, "beignet")]
    assert ds.problems == [("val_labels.csv:3", "missing_file: image val_set/val_00001.jpg is missing")]


def test_nested_kaggle_mount(store):
    """As Kaggle mounts it: every image one folder deeper. This used to fail every row missing_file."""
    store.write_text("foodx/class_list.txt", CLASSES)
    store.write_text("foodx/train_labels.csv", "img_name,label\ntrain_00000.jpg,1\ntrain_00001.jpg,0\n")
    store.write_text("foodx/val_labels.csv", "img_name,label\nval_00000.jpg,2\n")
    _images(store, "train_set/train_set", ["train_00000.jpg"])  # train_00001.jpg is missing
    _images(store, "val_set/val_set", ["val_00000.jpg"])
    ds = read_foodx(store, "foodx")
    assert ds.layout == "kaggle, nested folders"
    assert ds.splits["train"] == [("foodx/train_set/train_set/train_00000.jpg", 1, "hot_dog")]
    assert ds.splits["val"] == [("foodx/val_set/val_set/val_00000.jpg", 2, "beignet")]
    assert ds.problems == [("train_labels.csv:3", "missing_file: image train_set/train_set/train_00001.jpg is missing")]


def test_no_listed_image_found_names_where_they_are(store):
    store.write_text("foodx/class_list.txt", CLASSES)
    store.write_text("foodx/train_info.csv", "train_00000.jpg,1\ntrain_00001.jpg,0\n")
    _images(store, "images/train", ["train_00000.jpg", "train_00001.jpg"])  # extracted somewhere else
    with pytest.raises(DataError) as err:
        read_foodx(store, "foodx")
    msg = str(err.value)
    assert err.value.code == "bad_data"
    assert "none of the 2 images listed in train_info.csv (e.g. train_00000.jpg)" in msg
    assert "is in train_set/ or train_set/train_set/" in msg
    assert f"they are under {store.url('foodx/images/train')}: move them to train_set/" in msg


def test_no_listed_image_anywhere_names_what_the_root_holds(store):
    store.write_text("foodx/class_list.txt", CLASSES)
    store.write_text("foodx/train_info.csv", "train_00000.jpg,1\n")
    store.write_bytes("foodx/train_set.tar", b"tar")  # not extracted
    with pytest.raises(DataError, match=r"the root holds class_list.txt, train_info.csv, train_set.tar: extract"):
        read_foodx(store, "foodx")


def test_root_one_level_too_high_names_the_dataset_below(store):
    """Pointed at the folder above the dataset: the message names where the label files are."""
    store.write_text("raw/FoodX-251/annot/class_list.txt", CLASSES)
    store.write_text("raw/FoodX-251/annot/train_info.csv", "train_00000.jpg,1\n")
    store.write_bytes("raw/FoodX-251/train_set/train_00000.jpg", b"jpeg")
    with pytest.raises(DataError) as err:
        read_foodx(store, "raw")
    msg = str(err.value)
    assert "no class_list.txt and no label file (train_info.csv, train_labels.csv, val_info.csv" in msg
    assert f"found them under {store.url('raw/FoodX-251')}: point the FoodX-251 root (data.foodx) at" in msg
    assert read_foodx(store, "raw/FoodX-251").layout == "official, annot/"


def test_wrong_root_names_its_siblings(store):
    store.write_text("raw/FoodX-251/class_list.txt", CLASSES)
    store.write_text("raw/tasty/ALL_RECIPES.txt", "x\n")
    with pytest.raises(DataError, match=r"nothing is there \(beside it: FoodX-251/, tasty/\)"):
        read_foodx(store, "raw/foodx251")  # the config's default name, not the release's


def test_no_label_file_names_the_files_looked_for(store):
    store.write_text("foodx/class_list.txt", CLASSES)
    _images(store, "train_set", ["train_00000.jpg"])
    with pytest.raises(DataError) as err:
        read_foodx(store, "foodx")
    msg = str(err.value)
    assert "no label file (train_info.csv, train_labels.csv, val_info.csv, val_labels.csv)" in msg
    assert "the root holds class_list.txt, train_set/" in msg


def test_no_class_list_names_what_the_root_holds(store):
    store.write_text("foodx/train_info.csv", "train_00000.jpg,1\n")
    _images(store, "train_set", ["train_00000.jpg"])
    with pytest.raises(DataError, match=r"no class_list.txt \(looked at .*the root holds train_info.csv, train_set/"):
        read_foodx(store, "foodx")
