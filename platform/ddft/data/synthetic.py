"""The synthetic kitchen: small datasets in the native layouts whose answers are in the pixels.

- dishes (FoodX-251 layout): each dish has its own colour, shape and texture;
- recipe videos (Tasty layout): a step per frame range; the ingredient of a step is shown as icons
  (own colour + shape) in a tray at the top, one icon per unit of amount, so the amount can be
  counted; each action has its own motion (chop: a knife going up and down, whisk: a whisk going
  left and right, add: icons falling into the pot, pour: a jug tilting with a stream, stir: a spoon
  circling in the pot, serve: the dish growing). The recipe text follows from what is shown, and
  csvalignment.dat says where each step is; the closing "Enjoy!" is never shown (-1,-1), as in Tasty;
- cooking QA (JSONL): questions whose answers are the kitchen's facts, two phrasings of each.

Recipes combine foods freely: each video cooks one dish of the menu (shown at its end) with 2-4
of the 11 foods in any order, each with its own amount and action, so naming a recipe's foods
takes reading each step's tray: no dish has fixed foods to recognise instead.

What is held out is really held out: the last `held_out_dishes` dishes of the menu are never
trained on. Their recipe videos (`held_out_videos` each) are the Tasty `test` split, and every QA
fact about them is in QA's `test` split, as are a few other whole facts (both phrasings on one
side). The in-distribution sets are the `val` splits: trained dishes, and the second phrasing of
some trained facts. Every val and test video cooks a combination of foods no training video has.

Everything is seeded per item (numpy Generators keyed by (seed, kind, index)), so the same seed
writes the same bytes; changing one count reshuffles little (a recipe's foods avoid the
combinations of the training recipes before it, and held-out ones every training combination).
"""

from __future__ import annotations

import io
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from xml.sax.saxutils import escape

import av
import numpy as np
from PIL import Image, ImageDraw

from ddft.data.readers.tasty import RECIPES_FOLDER as TASTY_RECIPES
from ddft.recipes import Ingredient, format_quantity, format_recipe
from ddft.store import Store

__all__ = [
    "Dish",
    "Food",
    "DISHES",
    "FOODS",
    "write_kitchen",
    "render_dish",
    "step_frames",
    "encode_mp4",
    "video_codec",
]


@dataclass(frozen=True)
class Food:
    """An ingredient: its icon (colour + shape), unit, amount per icon and how it is handled."""

    name: str
    colour: tuple[int, int, int]
    colour_name: str
    shape: str
    unit: str | None  # canonical unit of the recipe text (None: a count)
    spellings: tuple[tuple[str, str], ...]  # native (singular, plural) unit spellings in recipe.xml
    per_icon: float
    actions: tuple[str, ...]  # what a step may do with it
    note: str | None = None


@dataclass(frozen=True)
class Dish:
    key: str  # class_list.txt name
    colour: tuple[int, int, int]
    colour_name: str
    shape: str
    texture: str
    foods: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.key.replace("_", " ")


_CUP, _TBSP, _TSP = (
    (("cup", "cups"),),
    (("tablespoon", "tablespoons"), ("tbsp", "tbsp")),
    (("teaspoon", "teaspoons"), ("tsp", "tsp")),
)
FOODS = {
    f.name: f
    for f in [
        Food("rice", (245, 245, 240), "white", "hexagon", "cup", _CUP, 1, ("add",), "rinsed"),
        Food("flour", (222, 196, 150), "beige", "square", "cup", _CUP, 1, ("add",)),
        Food("milk", (150, 200, 255), "light blue", "bar", "cup", _CUP, 1, ("pour",)),
        Food("oil", (235, 175, 20), "gold", "ellipse", "tbsp", _TBSP, 1, ("pour",)),
        Food("salt", (140, 140, 150), "grey", "cross", "tsp", _TSP, 0.5, ("add",)),
        Food("tomato", (220, 30, 30), "red", "circle", None, (), 1, ("chop", "add")),
        Food("onion", (150, 60, 170), "purple", "diamond", None, (), 1, ("chop", "add"), "peeled"),
        Food("carrot", (250, 125, 15), "orange", "triangle", None, (), 1, ("chop", "add")),
        Food("spinach", (30, 140, 40), "green", "star", "handful", (("handful", "handfuls"),), 1, ("chop", "add")),
        Food("cheese", (250, 225, 70), "yellow", "square", "g", (("g", "g"), ("grams", "grams")), 50, ("add",)),
        Food("egg", (250, 235, 200), "cream", "ellipse", None, (), 1, ("whisk",)),
    ]
}

DISHES = [
    Dish("tomato_soup", (200, 40, 40), "red", "circle", "rings", ("onion", "tomato", "salt")),
    Dish("green_salad", (50, 165, 60), "green", "hexagon", "dots", ("spinach", "tomato", "oil")),
    Dish("pancake", (150, 95, 45), "brown", "square", "stripes", ("flour", "milk", "egg")),
    Dish("fried_rice", (235, 210, 60), "yellow", "triangle", "speckle", ("rice", "carrot", "egg", "oil")),
    Dish("carrot_cake", (245, 135, 30), "orange", "diamond", "checker", ("flour", "carrot", "egg", "milk")),
    Dish("onion_pie", (130, 60, 150), "purple", "star", "waves", ("onion", "cheese", "flour")),
    Dish("rice_pudding", (90, 130, 220), "blue", "ellipse", "plain", ("milk", "rice", "salt")),
    Dish("cheese_toast", (240, 240, 225), "white", "cross", "dots", ("cheese", "oil", "tomato")),
]

_TABLE = np.array([105, 105, 112])  # neutral grey-blue: far from every dish colour
_STRIDE = 5  # csvalignment.dat unit, in frames (Tasty sub-sampling)
MAX_ICONS = 4


def _rng(seed: int, kind: int, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, kind, index])


# --- drawing --------------------------------------------------------------------------------------


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float = 0.0):
    """Outline of `shape` (radius r, rotated by angle) as a list of (x, y)."""

    def ring(n, rx=1.0, ry=1.0, start=0.0, radii=(1.0,)):
        return [
            (
                rx * radii[k % len(radii)] * math.cos(start + 2 * math.pi * k / n),
                ry * radii[k % len(radii)] * math.sin(start + 2 * math.pi * k / n),
            )
            for k in range(n)
        ]

    w = 0.33  # half width of a cross arm
    pts = {
        "circle": lambda: ring(24),
        "ellipse": lambda: ring(24, ry=0.6),
        "square": lambda: ring(4, start=math.pi / 4),
        "diamond": lambda: ring(4, rx=0.7),
        "triangle": lambda: ring(3, start=-math.pi / 2),
        "hexagon": lambda: ring(6),
        "star": lambda: ring(10, start=-math.pi / 2, radii=(1.0, 0.45)),
        "bar": lambda: [(-1, -0.35), (1, -0.35), (1, 0.35), (-1, 0.35)],
        "cross": lambda: [
            (-w, -1),
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
        ],
    }[shape]()
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _texture(name: str, box, unit: float, rng: np.random.Generator, cx: float, cy: float):
    """Boolean mask of the texture's darker pixels in box (x0, y0, x1, y1); phase jittered."""
    x0, y0, x1, y1 = box
    y, x = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    h, w = y.shape
    px, py = rng.uniform(0, 20, 2)
    if name == "plain":
        return np.zeros((h, w), bool)
    if name == "stripes":
        return ((x + y + px) // (10 * unit)) % 2 == 0
    if name == "dots":
        p = 14 * unit
        return ((x + px) % p - p / 2) ** 2 + ((y + py) % p - p / 2) ** 2 < (3.5 * unit) ** 2
    if name == "checker":
        return ((x + px) // (12 * unit) + (y + py) // (12 * unit)) % 2 == 0
    if name == "rings":
        return (np.hypot(x - cx, y - cy) // (8 * unit)) % 2 == 0
    if name == "speckle":
        return rng.random((h, w)) < 0.2
    if name == "waves":
        return ((y + 6 * unit * np.sin(x / (7 * unit) + px)) // (8 * unit)) % 2 == 0
    raise ValueError(f"unknown texture {name!r}")


def _paint_dish(img: np.ndarray, dish: Dish, cx, cy, r, angle, rng, jitter: int = 12) -> None:
    """Paint the dish (shape filled with colour + darker texture) onto img (H, W, 3 float) in place."""
    h, w = img.shape[:2]
    pts = _polygon(dish.shape, cx, cy, r, angle)
    x0, y0 = (max(int(min(v)), 0) for v in zip(*pts))  # work in the bounding box only
    x1, y1 = min(int(max(p[0] for p in pts)) + 2, w), min(int(max(p[1] for p in pts)) + 2, h)
    mask_img = Image.new("L", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(mask_img).polygon([(x - x0, y - y0) for x, y in pts], fill=255)
    mask = np.asarray(mask_img) > 0
    colour = np.array(dish.colour, np.float32) + rng.integers(-jitter, jitter + 1, 3)
    layer = np.empty((y1 - y0, x1 - x0, 3), np.float32)
    layer[:] = colour
    layer[_texture(dish.texture, (x0, y0, x1, y1), min(h, w) / 224, rng, cx, cy)] *= 0.6
    sub = img[y0:y1, x0:x1]
    sub[mask] = layer[mask]


def render_dish(dish: Dish, rng: np.random.Generator, size=(224, 224)) -> Image.Image:
    """One photo of `dish`: the dish large on a table, position/size/rotation/colour jittered."""
    w, h = size
    img = np.empty((h, w, 3), np.float32)
    img[:] = _TABLE + rng.integers(-20, 21, 3)
    m = min(w, h)
    _paint_dish(
        img,
        dish,
        w / 2 + rng.uniform(-0.07, 0.07) * w,
        h / 2 + rng.uniform(-0.07, 0.07) * h,
        m * rng.uniform(0.33, 0.41),
        rng.uniform(0, 2 * math.pi),
        rng,
    )
    img += rng.normal(0, 5, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _icon(draw: ImageDraw.ImageDraw, food: Food, cx, cy, r, angle=0.0) -> None:
    draw.polygon(_polygon(food.shape, cx, cy, r, angle), fill=food.colour, outline=(30, 30, 30))


# --- videos ---------------------------------------------------------------------------------------


@dataclass
class _Step:
    action: str  # chop | whisk | add | pour | stir | serve
    food: Food | None
    icons: int  # amount shown in the tray
    text: str


class _Scene:
    """Draws the frames of one recipe video; the pot remembers what went in (its colour)."""

    def __init__(self, dish: Dish, size, rng: np.random.Generator):
        self.dish, self.size = dish, size
        self.table = tuple(int(v) for v in _TABLE + rng.integers(-15, 16, 3))
        w, h = size
        self.m = min(w, h)
        self.pot = (w / 2, h * 0.74, self.m * 0.2)
        self.pot_colours: list[tuple[int, int, int]] = []
        self.dish_seed = int(rng.integers(1 << 31))  # one texture phase for the whole serve step

    def frame(self, step: _Step, t: int, n: int) -> np.ndarray:
        w, h = self.size
        p = t / max(n - 1, 1)  # progress through the step, 0..1
        img = Image.new("RGB", (w, h), self.table)
        d = ImageDraw.Draw(img)
        px, py, pr = self.pot
        if step.action != "serve":
            d.ellipse([px - pr, py - pr * 0.6, px + pr, py + pr * 0.6], fill=(55, 55, 60))
            inside = tuple(int(v) for v in np.mean(self.pot_colours, 0)) if self.pot_colours else (80, 80, 88)
            d.ellipse([px - pr * 0.8, py - pr * 0.42, px + pr * 0.8, py + pr * 0.42], fill=inside)
        ir = self.m * 0.055
        tray = [(w / 2 + (k - (step.icons - 1) / 2) * ir * 2.6, h * 0.11) for k in range(step.icons)]
        if step.food is not None:  # the amount, countable in every frame of the step
            d.rectangle(
                [w * 0.2, h * 0.11 - ir * 1.4, w * 0.8, h * 0.11 + ir * 1.4], fill=(45, 45, 55)
            )  # dark: the pale foods (rice, egg) stand out
            for x, y in tray:
                _icon(d, step.food, x, y, ir)
        getattr(self, "_" + step.action)(d, img, step, t, p, tray, ir)
        if step.action in ("add", "pour") and t == n - 1:
            self.pot_colours.append(step.food.colour)
        return np.asarray(img)

    def _chop(self, d, img, step, t, p, tray, ir):
        w, h = self.size
        bx0, by0, bx1, by1 = w * 0.12, h * 0.42, w * 0.88, h * 0.58
        d.rectangle([bx0, by0, bx1, by1], fill=(160, 110, 60))
        xs = [bx0 + (k + 0.5) * (bx1 - bx0) / step.icons for k in range(step.icons)]
        for x in xs:
            _icon(d, step.food, x, (by0 + by1) / 2, ir)
        kx = bx0 + 0.08 * w + p * (bx1 - bx0 - 0.16 * w)  # knife walks along the board...
        ky = by0 - h * 0.07 * abs(math.sin(math.pi * t / 2))  # ...up and down every 2 frames,
        d.rectangle(
            [kx - w * 0.012, ky - h * 0.08, kx + w * 0.012, ky + h * 0.02],  # below the tray
            fill=(215, 215, 225),
        )
        d.rectangle([kx - w * 0.015, ky - h * 0.14, kx + w * 0.015, ky - h * 0.08], fill=(20, 20, 20))

    def _whisk(self, d, img, step, t, p, tray, ir):
        w, h = self.size
        cx, cy = w / 2, h * 0.42
        d.chord([cx - w * 0.25, cy - h * 0.15, cx + w * 0.25, cy + h * 0.15], 0, 180, fill=(245, 245, 245))
        for k in range(step.icons):
            _icon(d, step.food, cx + (k - (step.icons - 1) / 2) * ir * 2.2, cy + h * 0.05, ir * 0.8)
        wx = cx + w * 0.16 * math.sin(2 * math.pi * t / 4)  # side to side, period 4 frames
        d.line([wx, cy - h * 0.2, wx, cy + h * 0.04], fill=(60, 60, 60), width=max(2, int(w / 80)))
        d.ellipse(
            [wx - w * 0.03, cy - h * 0.02, wx + w * 0.03, cy + h * 0.1],
            outline=(60, 60, 60),
            width=max(2, int(w / 110)),
        )

    def _add(self, d, img, step, t, p, tray, ir):
        px, py, pr = self.pot
        for k, (x, y) in enumerate(tray):  # each icon falls into the pot, one after the other,
            q = min(max((p - k * 0.12) / 0.6, 0.0), 1.0)
            y += ir * 3  # from just below the tray (which keeps the count)
            if q < 1:
                _icon(d, step.food, x + (px - x) * q * q, y + (py - y) * q, ir)

    def _pour(self, d, img, step, t, p, tray, ir):
        w, h = self.size
        px, py, pr = self.pot
        tilt = min(p * 2, 1.0) * 2.0  # the jug tips towards the pot...
        jx, jy, jr = px + w * 0.22, h * 0.36, w * 0.09
        a = math.pi / 2 - tilt
        d.polygon(_polygon("bar", jx, jy, jr, a), fill=step.food.colour, outline=(30, 30, 30))
        if tilt > 0.8:  # ...and the stream runs into it
            d.line(
                [jx - jr * math.cos(a), jy - jr * math.sin(a), px + pr * 0.2, py],
                fill=step.food.colour,
                width=max(3, int(w / 40)),
            )

    def _stir(self, d, img, step, t, p, tray, ir):
        px, py, pr = self.pot
        a = 2 * math.pi * t / 6  # one turn every 6 frames
        tx, ty = px + pr * 0.55 * math.cos(a), py + pr * 0.28 * math.sin(a)
        d.line([tx, ty, tx + pr * 0.3, ty - pr * 1.6], fill=(120, 75, 35), width=max(3, int(pr / 8)))
        d.ellipse([tx - pr * 0.12, ty - pr * 0.08, tx + pr * 0.12, ty + pr * 0.08], fill=(120, 75, 35))

    def _serve(self, d, img, step, t, p, tray, ir):
        w, h = self.size
        arr = np.asarray(img).astype(np.float32)
        scale = 0.35 + 0.65 * min(p * 1.5, 1.0)  # the dish grows onto the table
        _paint_dish(
            arr, self.dish, w / 2, h * 0.55, self.m * 0.36 * scale, 0.0, np.random.default_rng(self.dish_seed), jitter=0
        )
        img.paste(Image.fromarray(arr.astype(np.uint8)))


_CODEC: str | None = None


def step_frames(count: int, seed: int = 0, size=(224, 224)) -> tuple[list[np.ndarray], list[tuple[str, int]]]:
    """`count` captioned still frames of single steps: (frames, [(food, icons in the tray)]).

    Drawn like the recipe videos' frames (any dish, food, count, action and moment of the step, a
    few foods already in the pot), from generators of their own kind: no recipe video has them."""
    names, frames, captions = sorted(FOODS), [], []
    for i in range(count):
        rng = _rng(seed, 6, i)
        scene = _Scene(DISHES[rng.integers(len(DISHES))], size, rng)
        food = FOODS[names[rng.integers(len(names))]]
        icons = int(rng.integers(1, MAX_ICONS + 1))
        scene.pot_colours = [FOODS[names[j]].colour for j in rng.integers(0, len(names), rng.integers(0, 3))]
        step = _Step(food.actions[rng.integers(len(food.actions))], food, icons, "")
        frames.append(scene.frame(step, int(rng.integers(0, 8)), 8))
        captions.append((food.name, icons))
    return frames, captions


def video_codec() -> str:
    """libx264 (H.264) when PyAV has it, else mpeg4 (always built into FFmpeg)."""
    global _CODEC
    if _CODEC is None:
        _CODEC = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    return _CODEC


def encode_mp4(frames, fps: int) -> bytes:
    """RGB uint8 frames -> mp4 bytes: yuv420p, a keyframe every second, one thread (same bytes
    every run)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = None
        for frame in frames:
            if stream is None:
                # x264's macroblock tree made some of these videos differ from run to run on the
                # same frames (one thread, default preset); without it the bytes are the same.
                options = {"g": str(fps)} | ({"x264-params": "mbtree=0"} if video_codec() == "libx264" else {})
                stream = out.add_stream(video_codec(), rate=fps, options=options)
                stream.height, stream.width = frame.shape[:2]
                stream.pix_fmt = "yuv420p"
                stream.codec_context.thread_count = 1
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        if stream is None:
            raise ValueError("no frames to encode")
        out.mux(stream.encode())
    return buf.getvalue()


MIN_FOODS, MAX_FOODS = 2, 4  # foods per recipe
COMBINATIONS = sum(math.comb(len(FOODS), k) for k in range(MIN_FOODS, MAX_FOODS + 1))


def _combination(rng: np.random.Generator, taken: set[frozenset]) -> list[str]:
    """A free combination of MIN_FOODS..MAX_FOODS foods in a random order, none of `taken`."""
    names = sorted(FOODS)
    while True:
        foods = [names[i] for i in rng.permutation(len(names))[: rng.integers(MIN_FOODS, MAX_FOODS + 1)]]
        if frozenset(foods) not in taken:
            return foods


def _plan_recipe(dish: Dish, rng: np.random.Generator, foods: list[str], amounts: list[int]) -> list[_Step]:
    steps = []
    for name, icons in zip(foods, amounts):
        food = FOODS[name]
        action = food.actions[rng.integers(len(food.actions))]
        # Steps say the amount, as Tasty's often do: a step's clip shows all it says.
        amount = format_quantity(icons * food.per_icon) + (f" {food.unit} of" if food.unit else "")
        text = {
            "chop": f"Chop {amount} {name}.",
            "whisk": f"Whisk {amount} {name}.",
            "add": f"Add {amount} {name} to the pot.",
            "pour": f"Pour {amount} {name} into the pot.",
        }[action]
        steps.append(_Step(action, food, icons, text))
    if rng.random() < 0.7:
        steps.append(_Step("stir", None, 0, "Stir the pot."))
    steps.append(_Step("serve", None, 0, f"Serve the {dish.name}."))
    return steps


def _native_amount(food: Food, quantity: float, rng: np.random.Generator) -> str:
    number = format_quantity(quantity)
    if food.unit is None:
        return number
    singular, plural = food.spellings[rng.integers(len(food.spellings))]
    return f"{number} {singular if quantity <= 1 else plural}"


def _tokenized(text: str) -> str:
    """Text as the Tasty release's tools decode it: word tokens joined by spaces ("the pot .")."""
    return " ".join(re.sub(r"([.,;!?])", r" \1 ", text).split()) + " "


def _recipe_xml(title: str, lines: list[str], steps: list[str]) -> str:
    lines, steps = [_tokenized(s) for s in lines], [_tokenized(s) for s in steps]
    ing = "".join(f"    <ingredient>{escape(s)}</ingredient>\n" for s in lines)
    # The released Tasty files nest <steps_updated> elements inside <steps_updated>.
    st = "".join(f"    <steps_updated>{escape(s)}</steps_updated>\n" for s in steps)
    return (
        f'<?xml version="1.0" encoding="utf-8"?>\n<recipe>\n  <title>{escape(title)}</title>\n'
        f"  <ingredients>\n{ing}  </ingredients>\n  <steps_updated>\n{st}  </steps_updated>\n"
        f"</recipe>\n"
    )


# The layout the kitchen writes: a store written with another is rewritten (2: the releases' own
# trees; 3: recipes of free combinations of foods).
KITCHEN_LAYOUT = 3
KITCHEN_FOLDERS = ("foodx251", "tasty", "youcook2", "cooking_qa")
HELD_OUT_VIDEOS = 2  # recipe videos of each held-out dish, by default


def _split_of(r: int, n_dishes: int) -> str:
    # The first round of recipes trains every dish; later, one recipe in three is val, turn by turn
    # over the dishes (each dish is trained on in most rounds).
    return "train" if r < n_dishes or (r // n_dishes + r % n_dishes) % 3 else "val"


# --- the kitchen ----------------------------------------------------------------------------------


def write_kitchen(
    store: Store | str,
    prefix: str = "datasets/raw",
    *,
    seed: int = 0,
    dishes: int = 6,
    held_out_dishes: int = 2,
    images_per_dish: int = 8,
    recipes: int = 12,
    held_out_videos: int = HELD_OUT_VIDEOS,
    qa_pairs: int = 60,
    video_seconds: float = 6.0,
    fps: int = 10,
    size: tuple[int, int] = (224, 224),
) -> dict:
    """Write foodx251/, tasty/, youcook2/ (the held-out recipes, for evaluation) and cooking_qa/
    under `prefix`; return a summary with every recipe's expected target text.

    `dishes` are trained on (photos, `recipes` videos, QA); the next `held_out_dishes` of the menu
    only appear in the held-out splits (`held_out_videos` videos each, and their QA facts)."""
    store = Store(store) if isinstance(store, str) else store
    if dishes < 1 or held_out_dishes < 0 or dishes + held_out_dishes > len(DISHES):
        raise ValueError(
            f"dishes={dishes} + held_out_dishes={held_out_dishes}: the kitchen knows "
            f"{len(DISHES)} dishes in all (and at least one to train on)"
        )
    if images_per_dish < 2 or recipes < 1 or qa_pairs < 0:
        raise ValueError("need images_per_dish >= 2 (train + val), recipes >= 1, qa_pairs >= 0")
    prefix = prefix.rstrip("/")
    menu = DISHES[:dishes]
    unseen = DISHES[dishes : dishes + held_out_dishes]
    kitchen = menu + unseen
    files = 0

    def put(key: str, data: bytes | str) -> None:
        nonlocal files
        store.write_bytes(f"{prefix}/{key}", data.encode() if isinstance(data, str) else data)
        files += 1

    # FoodX-251: a quarter of each dish's photos (at least one) go to val.
    put("foodx251/class_list.txt", "".join(f"{i} {d.key}\n" for i, d in enumerate(menu)))
    rows = {"train": [], "val": []}
    n_val = max(1, images_per_dish // 4)
    for label, dish in enumerate(menu):
        for k in range(images_per_dish):
            split = "val" if k >= images_per_dish - n_val else "train"
            name = f"{split}_{len(rows[split]):05d}.jpg"
            buf = io.BytesIO()
            render_dish(dish, _rng(seed, 1, label * 10_000 + k), size).save(buf, "JPEG", quality=90)
            put(f"foodx251/{split}_set/{name}", buf.getvalue())
            rows[split].append(f"{name},{label}\n")
    for split, lines in rows.items():
        put(f"foodx251/{split}_info.csv", "".join(lines))

    # Tasty: recipe r cooks dish r % dishes; then each held-out dish's videos (all test). The foods
    # of a recipe are a free combination with amounts and actions of its own, so that only reading
    # each step's tray names them: no dish has fixed foods, and every val and test recipe is a
    # combination no training recipe has (training recipes differ from each other while they can).
    # Each dish's first recipe is its classic one (its `foods`, `classic` amounts), which QA asks
    # about; no training recipe cooks a held-out dish's classic combination.
    classic = [list(_rng(seed, 2, i).integers(1, MAX_ICONS + 1, len(d.foods))) for i, d in enumerate(kitchen)]
    n_frames = round(video_seconds * fps)
    summary_recipes, splits, youcook = {}, {"train": [], "val": [], "test": []}, {}
    held_out = [(dishes + i, k) for i in range(held_out_dishes) for k in range(held_out_videos)]
    n_recipes = recipes + len(held_out)
    split_of = [_split_of(r, dishes) if r < recipes else "test" for r in range(n_recipes)]
    first = {r: dishes + i for i in range(held_out_dishes) if (r := recipes + i * held_out_videos) < n_recipes}
    first |= {r: r for r in range(min(dishes, recipes))}
    combos = {r: list(kitchen[d].foods) for r, d in first.items()}
    for r in (r for r in range(n_recipes) if split_of[r] == "train" and r not in first):
        taken = set(map(frozenset, combos.values())) if len(combos) < COMBINATIONS else set()
        combos[r] = _combination(_rng(seed, 5, r), taken)
    trained = {frozenset(c) for r, c in combos.items() if split_of[r] == "train"}
    if len(trained) >= COMBINATIONS and len(combos) < n_recipes:
        raise ValueError(f"recipes={recipes}: all {COMBINATIONS} combinations are trained on, none is left to hold out")
    for r in (r for r in range(n_recipes) if split_of[r] != "train" and r not in first):
        combos[r] = _combination(_rng(seed, 5, r), trained)
    for r in range(n_recipes):
        dish_i, round_ = (r % dishes, r // dishes) if r < recipes else held_out[r - recipes]
        dish, rng, split = kitchen[dish_i], _rng(seed, 3, r), split_of[r]
        classic_one = r in first
        amounts = [int(a) for a in (classic[dish_i] if classic_one else rng.integers(1, MAX_ICONS + 1, len(combos[r])))]
        plan = _plan_recipe(dish, rng, combos[r], amounts)
        blocks = n_frames // _STRIDE
        if blocks < len(plan):
            raise ValueError(
                f"video_seconds*fps={n_frames} frames is too short for {len(plan)} steps of at least {_STRIDE} frames"
            )
        # Whole 5-frame blocks per step so csvalignment.dat is exact; leftover frames go last.
        sizes = [blocks // len(plan) + (k < blocks % len(plan)) for k in range(len(plan))]
        scene, frames, spans, segments, start = _Scene(dish, size, rng), [], [], [], 0
        for k, (step, nb) in enumerate(zip(plan, sizes)):
            n = nb * _STRIDE + (n_frames - blocks * _STRIDE if k == len(plan) - 1 else 0)
            frames += [scene.frame(step, t, n) for t in range(n)]
            spans.append(f"{start // _STRIDE + 1},{start // _STRIDE + nb}\n")  # blocks count from 1
            segments.append(
                {"id": k, "segment": [round(start / fps, 2), round((start + n) / fps, 2)], "sentence": step.text}
            )
            start += n
        rid = f"{dish.key.replace('_', '-')}-{round_ + 1}"
        ingredients = [
            Ingredient(s.food.name, float(s.icons * s.food.per_icon), s.food.unit, s.food.note)
            for s in plan
            if s.food is not None
        ]
        native = [
            f"{_native_amount(FOODS[i.name], i.quantity, rng)}; {i.name}" + (f", {i.note}" if i.note else "")
            for i in ingredients
        ]
        steps = [s.text for s in plan] + ["Enjoy!"]
        folder = f"tasty/{TASTY_RECIPES}/{rid}"
        put(f"{folder}/recipe.xml", _recipe_xml(f"{dish.name.capitalize()} #{round_ + 1}", native, steps))
        put(f"{folder}/csvalignment.dat", "".join(spans) + "-1,-1\n")
        put(f"{folder}/fps.txt", f"{fps}\n")
        video = encode_mp4(frames, fps)
        put(f"{folder}/recipe_video.mp4", video)
        splits[split].append(rid)
        if split != "train":  # held-out recipes again in YouCook2's layout, for its evaluation path
            recipe_type = str(101 + dish_i)
            put(f"youcook2/YouCookII/raw_videos/validation/{recipe_type}/{rid}.mp4", video)
            youcook[rid] = {
                "duration": round(n_frames / fps, 2),
                "subset": "validation",
                "recipe_type": recipe_type,
                "annotations": segments,
            }
        summary_recipes[rid] = {
            "dish": dish.key,
            "split": split,
            "frames": n_frames,
            "text": format_recipe(ingredients, steps),
        }
    # The release's split files: SPLITS/split_<n>/{TRAIN,VAL,TEST}_<n>.txt, n the number of recipes.
    n = sum(map(len, splits.values()))
    for split, ids in splits.items():
        put(f"tasty/SPLITS/split_{n}/{split.upper()}_{n}.txt", "".join(f"{i}\n" for i in ids))
    put("tasty/ALL_RECIPES.txt", "".join(f"{i}\n" for i in sorted(summary_recipes)))
    put(
        "youcook2/YouCookII/annotations/youcookii_annotations_trainval.json",
        json.dumps({"database": youcook}, indent=1),
    )

    qa = _qa_pairs(kitchen, classic, _rng(seed, 4), qa_pairs, {d.name for d in unseen})
    put("cooking_qa/qa.jsonl", "".join(json.dumps(row) + "\n" for row in qa))
    return {
        "prefix": prefix,
        "seed": seed,
        "dishes": [d.key for d in menu],
        "held_out_dishes": [d.key for d in unseen],
        "qa_splits": dict(sorted(Counter(row["split"] for row in qa).items())),
        "foodx": {s: len(v) for s, v in rows.items()},
        "recipes": summary_recipes,
        "splits": splits,
        "youcook2": sorted(youcook),
        "qa_pairs": len(qa),
        "files": files,
        "video": {"codec": video_codec(), "fps": fps, "frames": n_frames, "size": list(size)},
    }


def _qa_pairs(menu: list[Dish], classic, rng: np.random.Generator, n: int, unseen: set[str]) -> list[dict]:
    """Cooking questions answered by the kitchen's facts, two phrasings each, shuffled, first n; as
    QA JSONL rows with the fact they ask (`fact`) and their `split`: every fact about an `unseen`
    dish and about one in seven of the others is `test` (both phrasings), one in seven of the rest
    has its second phrasing in `val`."""
    facts = []
    for dish, amounts in zip(menu, classic):
        facts.append((f"What colour is {dish.name}?", f"What colour is the {dish.name}?", dish.colour_name))
        facts.append((f"What shape is {dish.name}?", f"Which shape does {dish.name} have?", dish.shape))
        facts.append(
            (f"Which ingredients go into {dish.name}?", f"What is {dish.name} made of?", ", ".join(dish.foods))
        )
        for name, icons in zip(dish.foods, amounts):
            f = FOODS[name]
            amount = " ".join(x for x in (format_quantity(int(icons) * f.per_icon), f.unit) if x)
            facts.append((f"How much {name} for {dish.name}?", f"How much {name} goes into {dish.name}?", amount))
    for f in {n for d in menu for n in d.foods}:
        f = FOODS[f]
        facts.append((f"What colour is {f.name}?", f"Which colour is the {f.name}?", f.colour_name))
        if f.unit:
            facts.append((f"How is {f.name} measured?", f"What unit is {f.name} measured in?", f.unit))
        facts.append((f"What do you do with {f.name}?", f"How is {f.name} prepared?", " or ".join(f.actions)))
    facts.sort()  # set iteration order above is not stable across runs
    roll = rng.integers(0, 7, len(facts))
    rows = []
    for i, ((q1, q2, a), r) in enumerate(zip(facts, roll)):
        about_unseen = any(d in q1 for d in unseen)
        splits = ("test", "test") if about_unseen or r == 0 else ("train", "val") if r == 1 else ("train", "train")
        rows += [
            {"question": q, "answer": a, "fact": f"fact-{i:03d}", "split": split} for q, split in zip((q1, q2), splits)
        ]
    order = rng.permutation(len(rows))
    return [rows[i] for i in order[:n]]
