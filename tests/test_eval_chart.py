"""The evaluation chart (ddft.eval.chart): `ddft eval`'s table as a PNG beside the .md and .json,
drawn from evaluate()'s rows, and the gateway's GET /eval/latest.png that the web page shows. No
Ray, no model: hand-made rows of the shape evaluate() returns."""

from __future__ import annotations

import io

import pytest

from ddft.errors import NotFound
from ddft.eval import chart, evaluate
from ddft.store import Store

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VIDEO, JOINT, IMAGE = "ddft/video/v2", "ddft/joint/v1", "ddft/image/v3"


def _row(dataset, modality, model, inputs="matched", **metrics) -> dict:
    return {
        "dataset": dataset,
        "modality": modality,
        "model": model,
        "inputs": inputs,
        "samples": 4,
        "skipped": 0,
        **metrics,
        "example": {"id": "x", "question": "q", "prediction": "p", "reference": "r"},
    }


def _mismatched(dataset, modality, model, matched: dict, **metrics) -> dict:
    gap = {k: matched[k] - v for k, v in metrics.items()}
    return {**_row(dataset, modality, model, "mismatched", **metrics), "gap": gap, "headline_gap": gap.get("content")}


def results() -> list[dict]:
    """A held-out and an in-distribution video set (base, DDFT, joint; both adapters also on
    mismatched inputs), an image set, and YouCook2 (steps only: no `content`, ROUGE-L instead)."""
    video_m = dict(content=0.625, ingredient_f1=0.7, rouge_l=0.5)
    joint_m = dict(content=0.5, ingredient_f1=0.55, rouge_l=0.45)
    return [
        _row("held-out", "video", "base:tiny", content=0.125, ingredient_f1=0.1, rouge_l=0.2),
        _row("held-out", "video", VIDEO, **video_m),
        _row("held-out", "video", JOINT, **joint_m),
        _mismatched("held-out", "video", VIDEO, video_m, content=0.25, ingredient_f1=0.3, rouge_l=0.4),
        _mismatched("held-out", "video", JOINT, joint_m, content=0.375, ingredient_f1=0.5, rouge_l=0.42),
        _row("held-out", "image", "base:tiny", accuracy=0.0),
        _row("held-out", "image", IMAGE, accuracy=0.75),
        _row("in-distribution", "video", "base:tiny", content=0.15),
        _row("in-distribution", "video", VIDEO, content=0.875),
        _row("youcook2", "video", "base:tiny", rouge_l=0.05, bleu4=0.0, step_count_error=3.0),
        _row("youcook2", "video", VIDEO, rouge_l=0.3125, bleu4=0.01, step_count_error=1.0),
    ]


def _bars(fig) -> dict[str, float]:
    """{gid: height} of every bar in the figure ("<set>|<modality>|<model>|<inputs>")."""
    return {p.get_gid(): p.get_height() for ax in fig.axes for p in ax.patches if p.get_gid()}


def _gaps(fig) -> dict[str, str]:
    return {t.get_gid(): t.get_text() for ax in fig.axes for t in ax.texts if (t.get_gid() or "").startswith("gap|")}


def test_bars_are_each_sets_headline_metric_with_the_gap_beside_the_mismatched_ones():
    fig = chart.figure(results(), "2026-11-30 12:00:00 UTC")
    headline = {"image": "accuracy", "video": "content"}  # YouCook2's rows have no content: ROUGE-L
    expected = {
        f"{r['dataset']}|{r['modality']}|{r['model']}|{r['inputs']}": r.get(headline[r["modality"]], r.get("rouge_l"))
        for r in results()
    }
    assert _bars(fig) == pytest.approx(expected)  # one bar per row, nothing else, each its headline value
    assert _gaps(fig) == {  # matched - mismatched on the headline metric, only where a mismatched row is
        f"gap|held-out|video|{VIDEO}": "gap +0.38",
        f"gap|held-out|video|{JOINT}": "gap +0.12",
    }
    hatched = {p.get_gid() for ax in fig.axes for p in ax.patches if p.get_hatch()}
    assert hatched == {f"held-out|video|{VIDEO}|mismatched", f"held-out|video|{JOINT}|mismatched"}
    assert fig.texts[0].get_text() == "ddft evaluation — 2026-11-30 12:00:00 UTC"  # the suptitle
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert sorted(panels) == [
        "held-out · image  (n=4)",
        "held-out · video  (n=4)",
        "in-distribution · video  (n=4)",
        "youcook2 · video  (n=4)",
    ]
    assert panels["held-out · video  (n=4)"].get_ylabel() == "content (recipe)"
    assert panels["youcook2 · video  (n=4)"].get_ylabel() == "ROUGE-L"  # no content: steps only
    labels = [t.get_text() for t in panels["held-out · video  (n=4)"].get_xticklabels()]
    assert labels == ["base", "DDFT v2", "joint v1"]
    # the grid is sets x modalities: in-distribution and youcook2 have no image panel, said so
    assert sum("not evaluated" in t.get_text() for ax in fig.axes for t in ax.texts) == 2


def test_the_png_has_a_fixed_size_and_the_same_bytes_for_the_same_rows():
    from PIL import Image

    data = chart.png(results(), "2026-11-30 12:00:00 UTC")
    assert data.startswith(PNG_SIGNATURE)
    image = Image.open(io.BytesIO(data))
    image.verify()
    assert Image.open(io.BytesIO(data)).size == (1200, 800)
    assert b"tEXt" not in data and b"Software" not in data  # no matplotlib version, no date
    assert chart.png(results(), "2026-11-30 12:00:00 UTC") == data
    empty = chart.png([], "2026-11-30 12:00:00 UTC", ["youcook2: not evaluated"])
    assert Image.open(io.BytesIO(empty)).size == (1200, 800)


def test_save_writes_the_chart_beside_the_table_and_latest_finds_the_newest(tmp_path):
    store = Store(str(tmp_path / "store"))
    with pytest.raises(NotFound) as err:
        chart.latest(store)
    assert err.value.code == "no_eval_chart" and "ddft eval" in err.value.detail
    base_only = [r for r in results() if r["model"] == "base:tiny"]  # no adapter manifests to update
    report = evaluate.save(store, evaluate.Results(base_only, ["a note"]))
    assert report.endswith(".md") and report.png == report.removesuffix(".md") + ".png"
    assert report.json == report.removesuffix(".md") + ".json"
    key = report.png.removeprefix(store.url() + "/")
    assert store.read_bytes(key).startswith(PNG_SIGNATURE)
    assert chart.latest(store) == (key, store.read_bytes(key))
    store.write_bytes("eval/29991231-235959.png", PNG_SIGNATURE + b"newer")
    store.write_bytes("eval/zz/99999999-999999.png", b"not an eval chart: a folder below")
    store.write_text("eval/99999999-999999.md", "not a chart")
    assert chart.latest(store) == ("eval/29991231-235959.png", PNG_SIGNATURE + b"newer")


def test_the_gateway_route_returns_the_newest_png_or_a_json_404(tmp_path):
    """GET /eval/latest.png, the gateway's own method behind a bare FastAPI app with the serve
    errors installed (the same mapping, no Ray): the newest PNG's bytes, or 404 no_eval_chart."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from serve import errors
    from serve.gateway import Gateway, api

    assert api.url_path_for("eval_chart") == "/eval/latest.png"
    assert "/eval/latest.png" not in api.openapi()["paths"]  # a page asset, like /, not the API
    gateway = object.__new__(Gateway.func_or_class.__bases__[0])  # our class, without Serve's wrapper
    gateway.store = Store(str(tmp_path / "store"))
    app = FastAPI()
    errors.install(app)

    @app.get("/eval/latest.png")
    async def eval_chart():
        return await Gateway.func_or_class.eval_chart(gateway)

    http = TestClient(app)

    missing = http.get("/eval/latest.png")
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/json"
    assert missing.json()["error"] == "no_eval_chart" and "ddft eval" in missing.json()["detail"]

    gateway.store.write_bytes("eval/20260101-000000.png", PNG_SIGNATURE + b"old")
    gateway.store.write_bytes("eval/20261130-120000.png", PNG_SIGNATURE + b"new")
    got = http.get("/eval/latest.png")
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert got.content == PNG_SIGNATURE + b"new" and got.headers["cache-control"] == "no-cache"
