"""Score the base and each published adapter per modality, on held-out and in-distribution prepared
data, with matched inputs and with mismatched ones.

- The sets: `test` is the held-out split (in the synthetic kitchen: dishes and QA facts never trained
  on, videos that combine foods and amounts in ways training never showed), `val` the
  in-distribution one (trained dishes with new amounts, trained facts asked in other words).
  FoodX has no test split: its val photos (new photos of the dishes trained on; a classifier
  can't be asked for a class it never saw) are the image held-out set.
- Counterfactuals: every adapter is scored a second time on the held-out set with the evidence
  taken away: each image or video is swapped for another sample's (a fixed derangement: the next
  sample whose reference differs), each question's dish or food replaced by another one; the
  question and the reference stay. matched - mismatched (`gap`) is what the adapter got from
  reading its modality; an adapter that writes the same answer whatever it is shown has none.
- Answers are generated with the serving engine itself (greedy, mixed-adapter batches), so the
  numbers are what users would get. Videos in YouCook2's format, when the store has them, are
  scored too (steps against steps: YouCook2 lists no ingredients).

The table goes to the store (eval/<timestamp>.{md,json}), with its chart (eval/<timestamp>.png,
chart.py), and each adapter's scores into its manifest's metrics.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

import numpy as np

from ddft.adapters.registry import PLATFORM_OWNER, Manifest, read_manifest
from ddft.config import JOINT, DataConfig
from ddft.data.prepare import good_rows, latest_version
from ddft.engines.base import GenerateRequest
from ddft.eval.scores import HEADLINE, markdown_table, normalize, score, score_steps
from ddft.prompts import QUESTIONS
from ddft.store import Store

# Which prepared splits each set reads, per modality (see the module's docstring).
SETS = {
    "held-out": {"image": ("val",), "video": ("test",), "text": ("test",)},
    "in-distribution": {"video": ("val",), "text": ("val",)},
}
COUNTERFACTUAL_SET = "held-out"
# Room for the longest reference answer of each modality (a dish name, a QA answer, a recipe).
MAX_NEW_TOKENS = {"image": 16, "text": 64, "video": 256}


@dataclass
class EvalSet:
    """Rows to score one modality on, with the scoring function; `skipped`: rows left out, with why."""

    dataset: str
    modality: str
    rows: list[dict]
    score: Callable
    skipped: list[str] = field(default_factory=list)


def held_out(
    store: Store, modality: str, limit: int | None = None, splits: tuple[str, ...] | None = None
) -> list[dict]:
    """The prepared rows of a set (default: the held-out one), sorted by id, the first `limit`."""
    rows = good_rows(
        store,
        modality,
        latest_version(store, modality),
        splits or SETS["held-out"][modality],
        ("id", "question", "answer", "pixels", "pixel_shape"),
    )
    return sorted(rows, key=lambda r: r["id"])[:limit]


def entities() -> list[tuple[str, ...]]:
    """What a question's key entity may be, by kind: the kitchen's dish names, its food names."""
    from ddft.data.synthetic import DISHES, FOODS

    return [tuple(d.name for d in DISHES), tuple(FOODS)]


def swap_entity(question: str, kinds: list[tuple[str, ...]]) -> str | None:
    """The question with its longest known entity replaced by the next one of the same kind that it
    doesn't name; None when it names none."""
    found = [(len(e), e, kind) for kind in kinds for e in kind if re.search(rf"\b{re.escape(e)}\b", question)]
    if not found:
        return None
    _, entity, kind = max(found)
    others = [
        e
        for e in kind[kind.index(entity) + 1 :] + kind[: kind.index(entity)]
        if not re.search(rf"\b{re.escape(e)}\b", question)
    ]
    return re.sub(rf"\b{re.escape(entity)}\b", others[0], question, count=1) if others else None


def mismatched(rows: list[dict], modality: str) -> list[dict]:
    """Each row with its evidence swapped (see the module's docstring); rows that can't be swapped
    keep their own input (and so count against the gap, never for it)."""
    out, kinds = [], entities() if modality == "text" else []
    for i, r in enumerate(rows):
        if modality == "text":
            out.append({**r, "question": swap_entity(r["question"], kinds) or r["question"]})
            continue
        after = rows[i + 1 :] + rows[:i]
        other = next((o for o in after if normalize(o["answer"]) != normalize(r["answer"])), r)
        out.append({**r, "pixels": other["pixels"], "pixel_shape": other.get("pixel_shape")})
    return out


def youcook2_root(data: DataConfig) -> str:
    return f"{data.raw_prefix.rstrip('/')}/{data.youcook2.strip('/')}"


def youcook2_rows(store: Store, data: DataConfig, limit: int | None = None) -> tuple[list[dict], list[str]] | None:
    """YouCook2 validation videos as eval rows (frames sampled like training), the first `limit`
    usable ones, and the videos that could not be used, each with its reason (reported, never
    dropped silently); None when there is no YouCook2 folder. Videos but none usable is a DataError
    with the reasons: a set that vanished would hide them."""
    from ddft.data.formats import DataError, find_youcook2, read_youcook2
    from ddft.data.media import MediaError, sample_frames

    found = find_youcook2(store, youcook2_root(data))
    if found is None:
        return None
    videos = read_youcook2(store, found.annotations, subset="validation")
    files = found.video_keys(store, "validation")
    rows, skipped = [], [f"{vid}: {reason}" for vid, reason in videos.problems]
    for v in videos:
        if limit is not None and len(rows) >= limit:
            break
        key = files.get(v.id)
        if key is None:
            where = f"{store.url(found.videos)}/validation/{v.recipe_type}/"
            skipped.append(f"{v.id}: missing_file: no {v.id}.<ext> under {where}")
            continue
        try:
            frames = sample_frames(store.read_bytes(key), data.frames, strategy="uniform")
        except MediaError as err:
            skipped.append(f"{v.id}: {err}")
            continue
        rows.append({"id": v.id, "question": QUESTIONS["video"], "answer": v.text, "pixels": frames})
    if not rows:
        counts = Counter(s.split(": ", 2)[1] for s in skipped)  # "<video>: <code>: <detail>"
        why = ", ".join(f"{n} {code}" for code, n in counts.most_common())
        raise DataError(
            f"YouCook2 at {store.url(found.annotations)} ({found.layout} layout): no validation video can be "
            + (f"used ({why}; e.g. {'; '.join(skipped[:3])})" if skipped else "used: it lists none")
            + "; fix that, or point data.youcook2 elsewhere to evaluate without YouCook2"
        )
    return rows, skipped


def _request(row: dict, modality: str, adapter: Manifest | None, max_new_tokens: int) -> GenerateRequest:
    pixels = row["pixels"]
    if isinstance(pixels, bytes):  # a prepared row
        pixels = np.frombuffer(pixels, np.uint8).reshape(row["pixel_shape"])
    return GenerateRequest(
        modality=modality, question=row["question"], pixels=pixels, adapter=adapter, max_new_tokens=max_new_tokens
    )


def eval_sets(
    store: Store, modalities, limit: int | None = None, data: DataConfig | None = None
) -> tuple[list[EvalSet], list[str]]:
    """The sets to score, and notes for the user: a set that isn't there, rows left out."""
    sets = [
        EvalSet(name, m, held_out(store, m, limit, splits[m]), partial(score, m))
        for name, splits in SETS.items()
        for m in modalities
        if m in splits
    ]
    sets, notes = [s for s in sets if s.rows], []
    if data is not None and "video" in modalities:
        found = youcook2_rows(store, data, limit)
        if found is None:
            notes.append(
                f"youcook2: not evaluated, nothing at {store.url(youcook2_root(data))} "
                "(data.youcook2 names that folder under data.raw_prefix)"
            )
        else:
            sets.append(EvalSet("youcook2", "video", found[0], score_steps, found[1]))
    for s in sets:
        if s.skipped:
            more = f" and {len(s.skipped) - 3} more" if len(s.skipped) > 3 else ""
            notes.append(f"{s.dataset} {s.modality}: {len(s.skipped)} left out: {'; '.join(s.skipped[:3])}{more}")
    return sets, notes


class Results(list):
    """The result rows, plus `notes`: what the user should read beside the table (a set not
    evaluated and why, rows left out)."""

    def __init__(self, rows=(), notes=()):
        super().__init__(rows)
        self.notes = list(notes)


def evaluate(
    store: Store,
    base_id: str,
    modalities=("image", "video", "text"),
    adapters: dict | None = None,
    limit: int | None = None,
    max_new_tokens: int | dict | None = None,
    batch: int = 8,
    data: DataConfig | None = None,
    counterfactual: bool = True,
) -> list[dict]:
    """One row per (dataset, modality, model, inputs): the base, then each adapter given for that
    modality (default: the platform's DDFT adapter and, when one was trained, the joint adapter
    beside it), with matched inputs; then, on the held-out set, each adapter with mismatched
    inputs and its `gap` (matched - mismatched, per metric). With `data`, YouCook2-format videos
    are scored as well. The rows come as Results: their `notes` are for the user (a set not
    evaluated, rows left out)."""
    from ddft.engines.hf import HFEngine

    sets, notes = eval_sets(store, modalities, limit, data)
    engine = HFEngine(store, base_id, cache_size=4)
    joint = read_manifest(store, PLATFORM_OWNER, JOINT)
    results = Results(notes=notes)
    for es in sets:
        default = [m for m in (read_manifest(store, PLATFORM_OWNER, es.modality), joint) if m]
        models = [None] + (adapters or {}).get(es.modality, default)
        budget = (
            max_new_tokens
            if isinstance(max_new_tokens, int)
            else {**MAX_NEW_TOKENS, **(max_new_tokens or {})}[es.modality]
        )
        runs = [(a, "matched", es.rows) for a in models]
        if counterfactual and es.dataset == COUNTERFACTUAL_SET:
            swapped = mismatched(es.rows, es.modality)
            runs += [(a, "mismatched", swapped) for a in models if a is not None]
        # Every model's requests in one queue: the engine batches mixed adapters.
        reqs = [_request(r, es.modality, a, budget) for a, _, rows in runs for r in rows]
        texts = [r.text for i in range(0, len(reqs), batch) for r in engine.generate(reqs[i : i + batch])]
        references = [r["answer"] for r in es.rows]
        matched: dict[str, dict] = {}
        for k, (adapter, inputs, rows) in enumerate(runs):
            preds = texts[k * len(rows) : (k + 1) * len(rows)]
            model = adapter.ref if adapter else f"base:{base_id}"
            scores = es.score(preds, references)
            row = {
                "dataset": es.dataset,
                "modality": es.modality,
                "model": model,
                "inputs": inputs,
                "samples": len(rows),
                "skipped": len(es.skipped),
                **scores,
                "example": {
                    "id": rows[0]["id"],
                    "question": rows[0]["question"],
                    "prediction": preds[0],
                    "reference": references[0],
                },
            }
            if inputs == "matched":
                matched[model] = scores
            else:
                row["gap"] = {
                    key: matched[model][key] - v
                    for key, v in scores.items()
                    if isinstance(v, float) and isinstance(matched[model].get(key), float)
                }
                row["headline_gap"] = row["gap"].get(HEADLINE[es.modality])
            if es.skipped:
                row["skipped_reasons"] = es.skipped[:5]
            results.append(row)
    return results


def table(results: list[dict]) -> str:
    columns = [
        "dataset",
        "modality",
        "model",
        "inputs",
        "samples",
        "skipped",
        "accuracy",
        "content",
        "ingredient_f1",
        "quantity_accuracy",
        "step_agreement",
        "rouge_l",
        "bleu4",
        "step_count_error",
        "headline_gap",
    ]
    return markdown_table(results, columns)


class Report(str):
    """Where `save` wrote the table: the .md's URL (the string itself), `.json` and `.png` (the
    chart, chart.py) beside it."""

    json: str
    png: str


def save(store: Store, results: list[dict]) -> Report:
    """Write the table (markdown + JSON), its chart (PNG) and put each adapter's scores into its
    manifest (under the set's name, "<set> (mismatched)" for the counterfactual rows)."""
    from ddft.eval import chart

    now = time.gmtime()
    key = f"eval/{time.strftime('%Y%m%d-%H%M%S', now)}"
    notes = getattr(results, "notes", [])
    bullets = "".join(f"\n- {n}" for n in notes)
    store.write_text(f"{key}.md", table(results) + "\n" + bullets + "\n" * bool(bullets))
    store.write_json(f"{key}.json", results)
    store.write_bytes(f"{key}.png", chart.png(results, time.strftime("%Y-%m-%d %H:%M:%S UTC", now), notes))
    for r in results:
        if r["model"].startswith("base:"):
            continue
        owner, name, version = r["model"].split("/")
        manifest = read_manifest(store, owner, name, int(version.lstrip("v")))
        scores = {k: v for k, v in r.items() if k not in ("dataset", "modality", "model", "inputs", "example")}
        where = r["dataset"] + (" (mismatched)" if r["inputs"] == "mismatched" else "")
        evals = {**manifest.metrics.get("eval", {}), where: {**scores, "report": store.url(f"{key}.md")}}
        manifest.metrics = {**manifest.metrics, "eval": evals}
        store.write_json(f"{manifest.key}/manifest.json", asdict(manifest))
    report = Report(store.url(f"{key}.md"))
    report.json, report.png = store.url(f"{key}.json"), store.url(f"{key}.png")
    return report
