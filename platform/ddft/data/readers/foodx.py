"""FoodX-251 (the image adapter's data), in the layouts it is downloaded in, found by looking:

- official: class_list.txt, train_info.csv / val_info.csv ("image_name,label", no header), either
  at the root or under annot/ (where the annotation archive extracts to); images in train_set/,
  val_set/;
- Kaggle: train_labels.csv / val_labels.csv with the header "img_name,label"; as Kaggle mounts it,
  the images sit one folder deeper (train_set/train_set/, val_set/val_set/).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

from ddft.data.readers.common import DataError, keys_under, lines, top_level
from ddft.store import Store


@dataclass
class FoodxDataset:
    classes: dict[int, str]  # id -> name as in class_list.txt ("hot_dog")
    splits: dict[str, list[tuple[str, int, str]]]  # split -> [(image key, label, class name)]
    problems: list[tuple[str, str]] = field(default_factory=list)
    layout: str = ""  # which layout was found: "official", "official, annot/", "kaggle, nested folders"

    def dish_name(self, label: int) -> str:
        """The name as a person writes it: class_list.txt uses underscores ("hot_dog")."""
        return self.classes[label].replace("_", " ")


# split -> (official label file without header, Kaggle file with header "img_name,label", folder)
_FOODX_SPLITS = {
    "train": ("train_info.csv", "train_labels.csv", "train_set"),
    "val": ("val_info.csv", "val_labels.csv", "val_set"),
}
_ANNOT_DIRS = ("", "annot/")  # where class_list.txt and the label files may be, under the root
_LABEL_FILES = [f for official, kaggle, _ in _FOODX_SPLITS.values() for f in (official, kaggle)]


def _find(present: set[str], prefix: str, names) -> str | None:
    """The first of `names` there, at the root or under annot/, relative to the root."""
    return next((d + n for n in names for d in _ANNOT_DIRS if f"{prefix}/{d}{n}" in present), None)


def _read_foodx_classes(store: Store, key: str, problems: list) -> dict[int, str]:
    classes: dict[int, str] = {}
    for n, line in lines(store, key, problems):
        if not line.strip():
            continue
        ident, _, name = line.strip().partition(" ")
        where = f"class_list.txt:{n}"
        if not ident.isdigit() or not name.strip():
            problems.append((where, f"bad_row: expected '<id> <name>', got {line!r}"))
        elif int(ident) in classes:
            problems.append((where, f"duplicate_id: duplicate class id {ident}"))
        else:
            classes[int(ident)] = name.strip()
    if not classes:
        raise DataError(f"{store.url(key)}: no classes (expected '<id> <name>' per line, e.g. '0 macaron')")
    return classes


def _foodx_row_problem(cells: list[str], line: str, classes: dict[int, str]) -> str | None:
    if len(cells) != 2 or not cells[0] or not cells[1].lstrip("-").isdigit():
        return f"bad_row: expected 'image_name,label', got {line!r}"
    if int(cells[1]) not in classes:
        return f"label_out_of_range: label {cells[1]} is not a class id"
    return None


def _wrong_root(store: Store, prefix: str, present: set[str], missing: list[str]) -> DataError:
    """No class list or no label file: say what the root holds and where the files are, if deeper."""
    deeper = sorted(
        {posixpath.dirname(k).removesuffix("/annot") for k in present if posixpath.basename(k) in _LABEL_FILES}
        - {prefix}
    )
    point = "point the FoodX-251 root (data.foodx) at"
    if deeper:
        fix = f"found them under {store.url(deeper[0])}: {point} that folder"
    elif not present:
        parent = posixpath.dirname(prefix)
        beside = f" (beside it: {top_level(keys_under(store, parent), parent)})" if parent else ""
        fix = f"nothing is there{beside}: {point} the folder holding them"
    else:
        fix = f"the root holds {top_level(sorted(present), prefix)}: {point} the folder holding them"
    return DataError(
        f"FoodX-251 at {store.url(prefix)}: no {' and no '.join(missing)} (looked at the root and under annot/); {fix}"
    )


def _label_rows(store: Store, key: str, problems: list):
    """(where, cells, line) of each row of a label file; blank lines and the Kaggle header left out."""
    for n, line in lines(store, key, problems):
        cells = [c.strip() for c in line.split(",")]
        if line.strip() and not (n == 1 and cells[-1] == "label"):
            yield f"{posixpath.basename(key)}:{n}", cells, line


def _image_folder(store: Store, prefix: str, present: set[str], label_file: str, folder: str, names: list[str]):
    """(folder, nested?) holding the listed images: folder/ (official, flat Kaggle) or folder/folder/
    (Kaggle as mounted), whichever holds more; none of them at all is an error that says where they are."""
    candidates = (folder, f"{folder}/{folder}")
    found = {c: sum(f"{prefix}/{c}/{n}" in present for n in names) for c in candidates}
    best = max(candidates, key=found.get)  # a tie (none missing from either) keeps the plain folder
    if not names or found[best]:
        return best, best != folder
    listed = set(names)
    elsewhere = sorted({posixpath.dirname(k) for k in present if posixpath.basename(k) in listed})
    miss = (
        f"they are under {', '.join(store.url(d) for d in elsewhere[:3])}: move them to {folder}/"
        if elsewhere
        else f"the root holds {top_level(sorted(present), prefix)}: extract the {folder} images into {folder}/"
    )
    raise DataError(
        f"FoodX-251 at {store.url(prefix)}: none of the {len(names)} images listed in {label_file} "
        f"(e.g. {names[0]}) is in {folder}/ or {folder}/{folder}/; {miss}"
    )


def read_foodx(store: Store, prefix: str) -> FoodxDataset:
    """The dataset under `prefix` in whichever layout it is (see the module's docstring), which is
    recorded in `layout`. A missing image is a row's problem; a split missing all of them, or no
    class list or label file, is a DataError naming the closest miss."""
    prefix = prefix.rstrip("/")
    present = set(keys_under(store, prefix))
    class_list = _find(present, prefix, ["class_list.txt"])
    label_files = {split: _find(present, prefix, names[:2]) for split, names in _FOODX_SPLITS.items()}
    missing = [] if class_list else ["class_list.txt"]
    if not any(label_files.values()):
        missing.append(f"label file ({', '.join(_LABEL_FILES)})")
    if missing:
        raise _wrong_root(store, prefix, present, missing)

    problems: list[tuple[str, str]] = []
    classes = _read_foodx_classes(store, f"{prefix}/{class_list}", problems)
    splits: dict[str, list[tuple[str, int, str]]] = {}
    layouts = {}
    for split, (official, _, folder) in _FOODX_SPLITS.items():
        label_file = label_files[split]
        if label_file is None:
            continue
        file_problems: list[tuple[str, str]] = []  # this file's problems, put in line order at the end
        rows = list(_label_rows(store, f"{prefix}/{label_file}", file_problems))
        names = [cells[0] for _, cells, _ in rows if cells[0]]
        image_dir, nested = _image_folder(store, prefix, present, label_file, folder, names)
        kind = "official" if label_file.endswith(official) else "kaggle"
        layouts[split] = kind + ", annot/" * label_file.startswith("annot/") + ", nested folders" * nested
        splits[split] = []
        for where, cells, line in rows:
            image_key = f"{prefix}/{image_dir}/{cells[0]}"
            reason = _foodx_row_problem(cells, line, classes)
            if reason is None and image_key not in present:
                reason = f"missing_file: image {image_dir}/{cells[0]} is missing"
            if reason:
                file_problems.append((where, reason))
            else:
                splits[split].append((image_key, int(cells[1]), classes[int(cells[1])]))
        problems += sorted(file_problems, key=lambda p: int(p[0].rsplit(":", 1)[1]))
    if len(set(layouts.values())) == 1:
        layout = next(iter(layouts.values()))
    else:  # the splits were unpacked differently: say so per split
        layout = "; ".join(f"{s}: {v}" for s, v in layouts.items())
    return FoodxDataset(classes, splits, problems, layout)
