"""FoodX-251 (the image adapter's data): class_list.txt, label CSVs and image folders."""

from __future__ import annotations

from dataclasses import dataclass, field

from ddft.data.readers.common import DataError, Records, keys_under, lines
from ddft.store import Store


@dataclass
class FoodxDataset:
    classes: dict[int, str]  # id -> name as in class_list.txt ("hot_dog")
    splits: dict[str, list[tuple[str, int, str]]]  # split -> [(image key, label, class name)]
    problems: list[tuple[str, str]] = field(default_factory=list)

    def dish_name(self, label: int) -> str:
        """The name as a person writes it: class_list.txt uses underscores ("hot_dog")."""
        return self.classes[label].replace("_", " ")


# split -> (official label file without header, Kaggle file with header "img_name,label", folder)
_FOODX_SPLITS = {
    "train": ("train_info.csv", "train_labels.csv", "train_set"),
    "val": ("val_info.csv", "val_labels.csv", "val_set"),
}


def _read_foodx_classes(store: Store, prefix: str, problems: list) -> dict[int, str]:
    classes: dict[int, str] = {}
    for n, line in lines(store, f"{prefix}/class_list.txt", problems):
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
        raise ValueError(f"{prefix}/class_list.txt: no classes")
    return classes


def _foodx_row_problem(cells: list[str], line: str, classes: dict[int, str]) -> str | None:
    if len(cells) != 2 or not cells[0] or not cells[1].lstrip("-").isdigit():
        return f"bad_row: expected 'image_name,label', got {line!r}"
    if int(cells[1]) not in classes:
        return f"label_out_of_range: label {cells[1]} is not a class id"
    return None


def read_foodx(store: Store, prefix: str) -> FoodxDataset:
    prefix = prefix.rstrip("/")
    problems: list[tuple[str, str]] = []
    classes = _read_foodx_classes(store, prefix, problems)
    present = set(keys_under(store, prefix))
    splits: dict[str, list[tuple[str, int, str]]] = {}
    for split, (official, kaggle, folder) in _FOODX_SPLITS.items():
        label_file = next((f for f in (official, kaggle) if f"{prefix}/{f}" in present), None)
        if label_file is None:
            continue
        rows = splits[split] = []
        for n, line in lines(store, f"{prefix}/{label_file}", problems):
            cells = [c.strip() for c in line.split(",")]
            if not line.strip() or (n == 1 and cells[-1] == "label"):  # blank, Kaggle header
                continue
            image_key = f"{prefix}/{folder}/{cells[0]}"
            reason = _foodx_row_problem(cells, line, classes)
            if reason is None and image_key not in present:
                reason = f"missing_file: image {folder}/{cells[0]} is missing"
            if reason:
                problems.append((f"{label_file}:{n}", reason))
            else:
                rows.append((image_key, int(cells[1]), classes[int(cells[1])]))
    if not splits:
        raise ValueError(f"{prefix}: no train_info.csv / train_labels.csv (or val) found")
    return FoodxDataset(classes, splits, problems)
