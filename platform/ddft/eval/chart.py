"""The evaluation table as a picture: one panel per set and modality (rows: held-out,
in-distribution, youcook2; columns: image, video, text), each with a bar per model (the base, the
DDFT adapter, the joint one, any other adapter asked for) on the modality's headline metric
(`HEADLINE`; a set without it, YouCook2's steps-only videos, shows ROUGE-L). A model scored with
mismatched inputs too gets a hatched bar beside its own and the gap (matched - mismatched) above
the pair.

`ddft eval` writes it as eval/<time>.png beside the .md and .json (evaluate.save); the web page
shows the newest one (`latest`, GET /eval/latest.png). Drawn on matplotlib's Agg canvas (no
display, no pyplot state), at a fixed size and dpi, with no timestamp or software in its metadata:
the same results give the same bytes. matplotlib is imported only when drawing, so whoever only
reads a chart (the gateway) never loads it.
"""

from __future__ import annotations

import io
import textwrap

from ddft.errors import NotFound
from ddft.eval.scores import HEADLINE
from ddft.store import Store

PREFIX = "eval/"
SIZE_IN, DPI = (12.0, 8.0), 100  # 1200 x 800 px
DATASETS = ("held-out", "in-distribution", "youcook2")  # rows, in this order, then any other set
MODALITIES = ("image", "video", "text")
FALLBACK = ("rouge_l", "bleu4")  # a set whose rows lack the headline metric (YouCook2: steps only)
COLORS = {"base": "#8a8f9c", "DDFT": "#b5461f", "joint": "#2f6db5", "other": "#4f8a3a"}
MISMATCHED_HATCH = "///"
BAR_W = 0.36
NAMES = {"accuracy": "accuracy", "content": "content (recipe)", "rouge_l": "ROUGE-L", "bleu4": "BLEU-4"}


def kind(model: str, modality: str) -> str:
    """What a model is, for the colour and the label: base, DDFT (the platform's adapter of the
    modality), joint (the platform's joint adapter) or other (an adapter named explicitly)."""
    if model.startswith("base:"):
        return "base"
    owner, name, _ = (model.split("/") + ["", ""])[:3]
    if owner == "ddft" and name == modality:
        return "DDFT"
    if owner == "ddft" and name == "joint":
        return "joint"
    return "other"


def label(model: str, modality: str) -> str:
    """The bar's label: "base", "DDFT v3", "joint v1", or the adapter's own ref."""
    k = kind(model, modality)
    if k == "base":
        return "base"
    if k == "other":
        return model
    return f"{k} {model.rsplit('/', 1)[-1]}"


def metric_of(rows: list[dict], modality: str) -> str | None:
    """The metric a panel shows: the modality's headline one when its rows have it, else the
    first of FALLBACK they have; None when they have neither."""
    for name in (HEADLINE.get(modality), *FALLBACK):
        if name and any(isinstance(r.get(name), int | float) for r in rows):
            return name
    return None


def panels(results: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """The rows of each (set, modality), sets in DATASETS' order (then others as they come),
    modalities in MODALITIES' order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["modality"]), []).append(r)

    def rank(order: tuple[str, ...], value: str) -> tuple[int, str]:
        return (order.index(value), "") if value in order else (len(order), value)

    return dict(sorted(groups.items(), key=lambda kv: (rank(DATASETS, kv[0][0]), rank(MODALITIES, kv[0][1]))))


def _value(row: dict | None, metric: str) -> float | None:
    v = None if row is None else row.get(metric)
    return float(v) if isinstance(v, int | float) else None


def _draw_panel(ax, dataset: str, modality: str, rows: list[dict]) -> None:
    metric = metric_of(rows, modality)
    models = list(dict.fromkeys(r["model"] for r in rows))  # the base first, as evaluate() orders them
    by = {(r["model"], r["inputs"]): r for r in rows}
    samples = max((r.get("samples", 0) for r in rows), default=0)
    ax.set_title(f"{dataset} · {modality}  (n={samples})", fontsize=11)
    ax.set_ylim(0, 1.32)  # room above 1.0 for the value and the gap
    ax.set_ylabel(NAMES.get(metric, metric) if metric else "no metric", fontsize=10)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.grid(axis="y", color="#e3e6ee", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if metric is None:
        ax.text(0.5, 0.5, "no comparable metric", ha="center", va="center", transform=ax.transAxes, color="#5b6478")
        return
    for x, model in enumerate(models):
        color = COLORS[kind(model, modality)]
        matched, swapped = by.get((model, "matched")), by.get((model, "mismatched"))
        mv = _value(matched, metric)
        _bar(ax, x - BAR_W / 2 if swapped else x, mv, color, f"{dataset}|{modality}|{model}|matched")
        if swapped is None:
            continue
        sv = _value(swapped, metric)
        _bar(ax, x + BAR_W / 2, sv, color, f"{dataset}|{modality}|{model}|mismatched", hatch=True)
        gap = swapped.get("gap", {}).get(metric)  # evaluate()'s own; else computed from the two bars
        if not isinstance(gap, int | float):
            gap = None if mv is None or sv is None else mv - sv
        if gap is not None:
            top = max(mv or 0.0, sv or 0.0)
            ax.annotate(
                f"gap {gap:+.2f}",
                xy=(x, top + 0.12),
                ha="center",
                va="bottom",
                fontsize=9,
                fontweight="bold",
                color=color,
                gid=f"gap|{dataset}|{modality}|{model}",
            )
    ax.set_xticks(range(len(models)), [label(m, modality) for m in models], fontsize=9)
    ax.set_xlim(-0.6, max(len(models), 2) - 0.4)


def _bar(ax, x: float, value: float | None, color: str, gid: str, hatch: bool = False) -> None:
    (bar,) = ax.bar(
        [x],
        [value or 0.0],
        width=BAR_W,
        color="white" if hatch else color,
        edgecolor=color,
        hatch=MISMATCHED_HATCH if hatch else None,
        linewidth=1.2,
    )
    bar.set_gid(gid)
    ax.text(x, (value or 0.0) + 0.015, "n/a" if value is None else f"{value:.2f}", ha="center", va="bottom", fontsize=8)


def figure(results: list[dict], when: str = "", notes: list[str] | tuple = ()):
    """The chart of `results` (evaluate()'s rows) as a matplotlib Figure on an Agg canvas. Each
    bar's gid is "<set>|<modality>|<model>|<inputs>", each gap annotation's
    "gap|<set>|<modality>|<model>" (what tests and readers can find it by)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    fig = Figure(figsize=SIZE_IN, dpi=DPI)
    FigureCanvasAgg(fig)
    fig.suptitle(f"ddft evaluation{' — ' + when if when else ''}", fontsize=14, fontweight="bold")
    groups = panels(results)
    if not groups:
        why = "\n".join(textwrap.fill(n, 110) for n in list(notes)[:4])
        fig.text(0.5, 0.55, "no set was evaluated", ha="center", va="center", fontsize=13, color="#5b6478")
        fig.text(0.5, 0.45, why, ha="center", va="top", fontsize=9, color="#5b6478")
        return fig
    datasets = list(dict.fromkeys(d for d, _ in groups))
    modalities = [m for m in MODALITIES if any(mm == m for _, mm in groups)]
    modalities += [m for m in dict.fromkeys(mm for _, mm in groups) if m not in modalities]
    axes = fig.subplots(len(datasets), len(modalities), squeeze=False)
    for i, dataset in enumerate(datasets):
        for j, modality in enumerate(modalities):
            ax = axes[i][j]
            if (dataset, modality) in groups:
                _draw_panel(ax, dataset, modality, groups[(dataset, modality)])
            else:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"{dataset} · {modality}\nnot evaluated", ha="center", va="center", color="#9aa1b1")
    kinds = list(dict.fromkeys(kind(r["model"], r["modality"]) for r in results))
    handles = [Patch(facecolor=COLORS[k], edgecolor=COLORS[k], label=k) for k in kinds]
    handles.append(Patch(facecolor="white", edgecolor="#5b6478", hatch=MISMATCHED_HATCH, label="mismatched inputs"))
    fig.legend(handles=handles, loc="lower left", ncol=len(handles), frameon=False, fontsize=10)
    fig.text(
        0.99,
        0.015,
        "each panel: the modality's headline metric (higher is better); gap = matched − mismatched",
        ha="right",
        va="bottom",
        fontsize=8,
        color="#5b6478",
    )
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    return fig


def png(results: list[dict], when: str = "", notes: list[str] | tuple = ()) -> bytes:
    """The chart as PNG bytes: SIZE_IN at DPI, no metadata that changes from run to run."""
    buf = io.BytesIO()
    figure(results, when, notes).savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def latest(store: Store) -> tuple[str, bytes]:
    """The newest chart in the store (eval/<time>.png: the name sorts by time), its key and bytes;
    NotFound when `ddft eval` has saved none yet."""
    keys = [k for k in store.list(PREFIX) if k.endswith(".png") and "/" not in k[len(PREFIX) :]]
    if not keys:
        raise NotFound(
            "no evaluation chart yet: `ddft eval` writes one (eval/<time>.png in the store) after scoring the adapters",
            code="no_eval_chart",
        )
    return keys[-1], store.read_bytes(keys[-1])
