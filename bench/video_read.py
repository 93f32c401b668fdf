"""make bench-video-read: which training choices make the video adapter read the video soonest.

One video adapter trained in this process (no Ray: minutes, not the pipeline's overhead) on the
synthetic kitchen's free combinations, with the embedded base, the pipeline's LoRA and optimizer
(`ddft.train.loop`), then scored the way `ddft eval` scores recipes: held-out (test) and
in-distribution (val) videos, each with its own video (matched) and another's (mismatched). An
adapter that reads has matched ingredient F1 above mismatched. The choices measured:

  --projector-lr     the multimodal projector's learning rate (aligned at the base's build: ddft.models.align)
  --lr               LoRA's
  --clips            share of samples that are step clips (`ddft.data.prepare.step_clips`: a
                     step's frames -> its sentence) beside whole recipes; their own score too
  --content-weight   loss weight of the answer tokens that depend on the video (amounts, foods)

--probe first asks whether the frozen towers see what the steps show at all (`tower_probe`).

The README's "Reading the video" rows come from here. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BASE_ID = "ddft-embedded-smollm2"
FOOD_WORDS = ("cup", "tbsp", "tsp", "handful", "g", *"0123456789/")


def videos(store, recipes: int, frames: int, clips_per_video: int):
    """{split: [(frames, question, answer)]}: the kitchen's recipes, and step clips of the train split."""
    from ddft.data import formats
    from ddft.data.media import sample_frames
    from ddft.data.prepare import step_clips
    from ddft.data.synthetic import write_kitchen
    from ddft.prompts import QUESTIONS

    write_kitchen(store, "raw", images_per_dish=2, recipes=recipes, held_out_videos=4, qa_pairs=8)
    out: dict[str, list] = {"train": [], "val": [], "test": [], "clips": []}
    for r in formats.read_tasty(store, "raw/tasty"):
        video = store.read_bytes(r.video_key)
        out[r.split].append((sample_frames(video, frames), QUESTIONS["video"], r.text))
        for clip in step_clips(r, clips_per_video) if r.split == "train" else []:
            pixels = sample_frames(video, frames, strategy="span", spans=json.loads(clip["spans"]))
            out["clips"].append((pixels, clip["question"], clip["answer"]))
    return out


def tower_probe(store, model, processor) -> dict:
    """Is what a step shows in the frozen video tower's features (the layer the projector reads)? A
    ridge classifier per frame, fit on the training videos' food steps and scored on the held-out
    ones: the food and its count (icons in the tray) from one frame at the step's centre."""
    import torch

    from ddft.data import formats
    from ddft.data.media import sample_frames
    from ddft.data.synthetic import FOODS
    from ddft.prompts import pixel_inputs

    names, feats, foods, counts, train = sorted(FOODS), [], [], [], []
    for r in formats.read_tasty(store, "raw/tasty"):
        centres = [(a + b) // 2 for a, b in r.step_spans[: len(r.ingredients)]]
        frames = sample_frames(
            store.read_bytes(r.video_key), len(centres), strategy="steps", spans=[(c, c) for c in centres]
        )
        pixels = pixel_inputs(processor, "video", [frames])["pixel_values_videos"][0]
        with torch.no_grad():
            layers = model.model.video_tower(pixels, output_hidden_states=True).hidden_states
        feats += [f.flatten().numpy() for f in layers[model.config.vision_feature_layer]]
        foods += [names.index(i.name) for i in r.ingredients]
        counts += [round(i.quantity / FOODS[i.name].per_icon) - 1 for i in r.ingredients]
        train += [r.split == "train"] * len(r.ingredients)
    x, train = np.array(feats), np.array(train)
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)

    def accuracy(labels: list[int]) -> float:
        y = np.eye(max(labels) + 1)[labels]
        w = np.linalg.solve(x[train].T @ x[train] + 10 * np.eye(x.shape[1]), x[train].T @ y[train])
        return round(float(((x[~train] @ w).argmax(1) == np.array(labels)[~train]).mean()), 3)

    return {"probe_food_acc": accuracy(foods), "probe_count_acc": accuracy(counts), "probe_steps": int((~train).sum())}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", type=int, default=96, help="recipe videos of the trained dishes (train + val)")
    ap.add_argument("--samples", type=int, default=200, help="training samples (recipes and clips)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--projector-lr", type=float, default=1e-4)
    ap.add_argument("--clips", type=float, default=0.0, help="share of step clips among the samples")
    ap.add_argument("--content-weight", type=float, default=1.0)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probe", action="store_true", help="also probe the frozen tower: does it see the food and count?")
    args = ap.parse_args(argv)

    import torch
    from transformers import get_cosine_schedule_with_warmup

    from ddft.config import LoraSettings, OptimSettings
    from ddft.data.synthetic import FOODS
    from ddft.eval.scores import recipe_scores
    from ddft.models.load import ensure_base, load_base, local_base_dir
    from ddft.prompts import encode, pad_batch, pixel_inputs
    from ddft.store import Store
    from ddft.train.loop import lora_model, optimizer_step, param_groups

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    pick = random.Random(args.seed)
    store = Store(tempfile.mkdtemp(prefix="ddft-video-read-"))
    ensure_base(store, BASE_ID, build="embedded")
    model, processor = load_base(local_base_dir(store, BASE_ID))
    tok = processor.tokenizer
    data = videos(store, args.recipes, args.frames, 8 if args.clips else 0)
    model = lora_model(model, LoraSettings(r=8, alpha=16, dropout=0.0), "video")
    total = math.ceil(args.samples / args.batch)
    groups = param_groups(model, OptimSettings(lr=args.lr, projector_lr=args.projector_lr))
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(0.1 * total), total)
    words = (*FOOD_WORDS, *FOODS)  # the tokens of amounts, units and foods: what only the video tells
    content = {i for w in words for p in ("", " ") for i in tok(p + w, add_special_tokens=False).input_ids}

    def batch(rows, answers=True):
        enc = [encode(processor, "video", q, a if answers else None, args.frames) for _, q, a in rows]
        b = pad_batch(enc, tok.pad_token_id)
        return b | pixel_inputs(processor, "video", [f for f, _, _ in rows])

    def loss_of(b):
        if args.content_weight == 1.0:
            return model(**b).loss
        labels = b.pop("labels")[:, 1:]
        logits = model(**b).logits[:, :-1].float()
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        weight = torch.where(torch.isin(labels, torch.tensor(sorted(content))), args.content_weight, 1.0) * (
            labels != -100
        )
        return (ce * weight).sum() / weight.sum()

    t0, losses, seen = time.time(), [], 0
    for step in range(total):
        rows = []
        for _ in range(args.batch):
            if data["clips"] and pick.random() < args.clips:
                rows.append(pick.choice(data["clips"]))
            else:
                rows.append(data["train"][seen % len(data["train"])])
                seen += 1
        loss = loss_of(batch(rows))
        loss.backward()
        optimizer_step(optimizer, scheduler)
        losses.append(loss.item())
        if step % 10 == 0:
            print(f"step {step}/{total}: loss {np.mean(losses[-10:]):.3f}, {time.time() - t0:.0f} s", flush=True)
    train_s = time.time() - t0

    def generate(rows, max_new_tokens=110):
        model.eval()
        with torch.no_grad():
            b = batch(rows, answers=False)
            b.pop("labels")
            out = model.generate(**b, max_new_tokens=max_new_tokens, do_sample=False)
        return [tok.decode(o[b["input_ids"].shape[1] :], skip_special_tokens=True) for o in out]

    result: dict = {"bench": "video_read", **vars(args), "train_s": round(train_s, 1)}
    if args.probe:
        result |= tower_probe(store, model.get_base_model(), processor)
    result["loss_end"] = round(float(np.mean(losses[-5:])), 3)
    for split, tag in (("test", "held_out"), ("val", "in_dist")):
        rows = data[split]
        for inputs, shown in (("matched", rows), ("mismatched", rows[1:] + rows[:1])):
            preds = generate([(f, q, a) for (f, _, _), (_, q, a) in zip(shown, rows)])
            scores = [recipe_scores(p, a) for p, (_, _, a) in zip(preds, rows)]
            for key in ("ingredient_f1", "quantity_accuracy"):
                result[f"{tag}_{inputs}_{key}"] = round(float(np.mean([s[key] or 0.0 for s in scores])), 3)
        result[f"{tag}_f1_gap"] = round(
            result[f"{tag}_matched_ingredient_f1"] - result[f"{tag}_mismatched_ingredient_f1"], 3
        )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
