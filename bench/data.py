"""make bench-data: how fast the data plane gets 8 frames per clip (and images), on Ray Data.

One run, one local Ray cluster (ddft.cluster.ray_session: 127.0.0.1, RAY_USAGE_STATS_ENABLED=0,
--concurrency CPUs), the same setup for every pipeline: one fused Ray Data stage (read -> map in
the same task), --tasks read tasks over the files (default 4: 10 clips or 50 images each), at most
--concurrency at once, 1 CPU each; results consumed fully (`.materialize()`); wall clock, after a
warm-up pass over one file per worker. Pipelines:

  exact        read_binary_files -> sample_frames(bytes, 8, strategy="uniform")  (frame-accurate)
  keyframe     read_binary_files -> sample_frames(bytes, 8, strategy="keyframe")
  read_videos  ray.data.read_videos (every frame a row, decord, its default threads) -> keep the
               same 8 uniformly spaced frames per clip (by frame_index; the clip's frame count from
               its container header), squared to 224 as sample_frames does: checked to give the
               very pixels `exact` gives
  floor        read_binary_files -> decode every frame of the clip, convert none: what decoding
               "everything" costs on a long GOP, where exact sampling's 8th frame is ~frame 281
  decord_*     sample_frames' decord path alone (how it was before the PyAV path), for comparison;
               checked to give the same frames
  images       read_binary_files -> load_image over FoodX-251-style JPEGs (512x384)

exact/keyframe/read_videos run on clips with a keyframe every second; exact and floor also on
clips with x264's default long GOP (keyint 250). Each timing is repeated --rounds times,
interleaved, and the best is kept (the machine is shared). Clips and images are generated once
(seeded, deterministic) into --cache. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import av  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ddft.cluster import ray_session  # noqa: E402
from ddft.data.media import SIZE, _frames_decord, load_image, sample_frames, square, uniform_indices  # noqa: E402

FRAMES = 8
W, H, FPS = 320, 240, 30
GEN_VERSION = 1  # bump when the clip/image content below changes (invalidates the cache)


# --- inputs ---------------------------------------------------------------------------------------


def render_clip(seed: int, index: int, seconds: int, w: int = W, h: int = H, fps: int = FPS):
    """Frames of one synthetic clip: a textured background panning back and forth (never jumping,
    so x264 sees no scene cut), five shapes bouncing around, fresh per-frame noise."""
    rng = np.random.default_rng([seed, 7, index])
    span = 160
    tex = rng.integers(40, 200, ((h + span) // 4, (w + span) // 4, 3)).astype(np.uint8)
    tex = np.repeat(np.repeat(tex, 4, 0), 4, 1)
    vx, vy = rng.uniform(0.5, 1.5, 2)
    n = 5
    pos = rng.uniform([0, 0], [w, h], (n, 2))
    vel = rng.uniform(-4, 4, (n, 2))
    rad = rng.integers(12, 36, n)
    col = rng.integers(0, 256, (n, 3)).astype(np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    for t in range(fps * seconds):
        ox, oy = (int(span - abs(span - (v * t) % (2 * span))) for v in (vx, vy))
        img = tex[oy : oy + h, ox : ox + w].copy()
        pos += vel
        for k, hi in enumerate((w, h)):
            vel[(pos[:, k] < 0) | (pos[:, k] > hi), k] *= -1
        for i in range(n):
            cx, cy, r = pos[i, 0], pos[i, 1], rad[i]
            x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 1, w)
            y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 1, h)
            if x0 >= x1 or y0 >= y1:
                continue
            if i % 2:
                disc = (xx[y0:y1, x0:x1] - cx) ** 2 + (yy[y0:y1, x0:x1] - cy) ** 2 < r * r
                img[y0:y1, x0:x1][disc] = col[i]
            else:
                img[y0:y1, x0:x1] = col[i]
        noise = rng.integers(-6, 7, (h, w, 1), dtype=np.int16)
        yield np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def encode_h264(frames, fps: int, gop: int | None) -> bytes:
    """libx264, yuv420p, one thread (same bytes every run); gop=None keeps x264's default
    (keyint 250, scene cuts allowed), else a keyframe every `gop` frames."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = None
        for frame in frames:
            if stream is None:
                stream = out.add_stream("libx264", rate=fps, options={"g": str(gop)} if gop else {})
                stream.height, stream.width = frame.shape[:2]
                stream.pix_fmt = "yuv420p"
                stream.codec_context.thread_count = 1
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def make_clip(index: int, seed: int, seconds: int, short_dir: str, long_dir: str) -> int:
    """Write clip `index` twice (same frames): keyframe every second, and x264's default GOP."""
    targets = [(Path(short_dir) / f"clip_{index:04d}.mp4", FPS), (Path(long_dir) / f"clip_{index:04d}.mp4", None)]
    missing = [(p, g) for p, g in targets if not p.exists()]
    if missing:
        frames = list(render_clip(seed, index, seconds))
        for path, gop in missing:
            _write(path, encode_h264(frames, FPS, gop))
    return index


def make_image(index: int, seed: int, folder: str) -> int:
    from ddft.data.synthetic import DISHES, render_dish

    path = Path(folder) / f"img_{index:04d}.jpg"
    if not path.exists():
        img = render_dish(DISHES[index % len(DISHES)], np.random.default_rng([seed, 11, index]), size=(512, 384))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        _write(path, buf.getvalue())
    return index


def prepare_inputs(ray, root: Path, clips: int, seconds: int, images: int, seed: int):
    base = root / f"v{GEN_VERSION}-seed{seed}-{W}x{H}-{FPS}fps-{seconds}s"
    short_dir, long_dir, img_dir = (
        base / "gop1s",
        base / "gopdefault",
        root / f"v{GEN_VERSION}-seed{seed}-images-512x384",
    )
    for d in (short_dir, long_dir, img_dir):
        d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    clip_task = ray.remote(num_cpus=1)(make_clip)
    img_task = ray.remote(num_cpus=1)(make_image)
    refs = [clip_task.remote(i, seed, seconds, str(short_dir), str(long_dir)) for i in range(clips)]
    refs += [img_task.remote(i, seed, str(img_dir)) for i in range(images)]
    ray.get(refs)
    names = [f"clip_{i:04d}.mp4" for i in range(clips)]
    return (
        [str(short_dir / n) for n in names],
        [str(long_dir / n) for n in names],
        [str(img_dir / f"img_{i:04d}.jpg") for i in range(images)],
        time.perf_counter() - t0,
    )


def gop_summary(paths: list[str]) -> str:
    """Frames, keyframes and size per clip of a set (from the containers, nothing decoded)."""
    frames, keys, sizes = [], [], []
    for p in paths:
        with av.open(p) as container:
            stream = container.streams.video[0]
            packets = [pk for pk in container.demux(stream) if pk.size]
        frames.append(len(packets))
        keys.append(sum(pk.is_keyframe for pk in packets))
        sizes.append(os.path.getsize(p))
    return (
        f"{min(frames)}-{max(frames)} frames, {min(keys)}-{max(keys)} keyframes per clip, "
        f"{np.mean(sizes) / 1e6:.2f} MB per clip"
    )


# --- the per-task work ----------------------------------------------------------------------------


def _sample(row: dict, strategy: str) -> dict:
    return {"path": row["path"], "frames": sample_frames(row["bytes"], FRAMES, strategy=strategy)}


def _decode_all(row: dict) -> dict:
    """The floor for frame-accurate sampling: every frame decoded, none converted to RGB.
    PyAV demux + the codec context's decode on one thread (as sample_frames decodes) is the
    cheapest way to decode every frame here: threads only add CPU when every core already runs a
    task, and decord has no "decode but don't convert" over a whole clip (next() converts each
    frame to RGB; skip_frames() jumps to the last keyframe instead of decoding what it skips)."""
    with av.open(io.BytesIO(row["bytes"])) as container:
        stream = container.streams.video[0]
        codec = stream.codec_context
        codec.thread_count = 1
        n = 0
        for packet in container.demux(stream):
            n += len(codec.decode(packet))  # the last (empty) packet drains the decoder
    return {"path": row["path"], "decoded": n}


def _image(row: dict) -> dict:
    return {"path": row["path"], "image": load_image(row["bytes"])}


_WANTED: dict[str, frozenset] = {}


def _wanted(path: str) -> frozenset:
    """The frame indices exact sampling takes from a clip. The frame count comes from the
    container header (what decord's len() gives for mp4: one sample per frame); once per clip
    per worker."""
    if path not in _WANTED:
        with av.open(path) as container:
            n = container.streams.video[0].frames
        if n <= 0:  # no count in the header: count the packets
            from ddft.data.media import load_decord

            decord = load_decord()
            n = len(decord.VideoReader(path, num_threads=1))
        _WANTED[path] = frozenset(uniform_indices(n, FRAMES))
    return _WANTED[path]


def _select(batch: dict) -> dict:
    """Keep the 8 uniformly spaced frames of each clip (frame_index is the frame's index in the
    clip), squared to 224 as sample_frames does."""
    keep = [i for i, (p, k) in enumerate(zip(batch["path"], batch["frame_index"])) if int(k) in _wanted(p)]
    frames = [square(Image.fromarray(batch["frame"][i]), SIZE) for i in keep]
    return {
        "path": np.array([batch["path"][i] for i in keep], dtype=object),
        "frame_index": np.array([int(batch["frame_index"][i]) for i in keep], dtype=np.int64),
        "frame": np.stack(frames) if frames else np.zeros((0, SIZE, SIZE, 3), np.uint8),
    }


# --- pipelines ------------------------------------------------------------------------------------


def _sample_decord(row: dict, strategy: str) -> dict:
    """sample_frames as it was before the PyAV path: decord's get_batch for every clip."""
    frames = _frames_decord(row["bytes"], FRAMES, strategy, None)
    return {"path": row["path"], "frames": np.stack([square(Image.fromarray(f), SIZE) for f in frames])}


def pipeline(ray, kind: str, paths: list[str], concurrency: int, tasks: int):
    """One fused Ray Data stage (read -> map in the same task: same compute for both), `tasks`
    read tasks over the files, at most `concurrency` at once, 1 CPU each."""
    opts = {"concurrency": concurrency, "override_num_blocks": max(1, min(tasks, len(paths)))}
    if kind == "read_videos":
        return ray.data.read_videos(paths, include_paths=True, **opts).map_batches(
            _select, batch_size=None, batch_format="numpy", concurrency=concurrency
        )
    fn, kwargs = {
        "exact": (_sample, {"strategy": "uniform"}),
        "keyframe": (_sample, {"strategy": "keyframe"}),
        "decord_exact": (_sample_decord, {"strategy": "uniform"}),
        "decord_keyframe": (_sample_decord, {"strategy": "keyframe"}),
        "floor": (_decode_all, {}),
        "images": (_image, {}),
    }[kind]
    return ray.data.read_binary_files(paths, include_paths=True, **opts).map(
        fn, fn_kwargs=kwargs, concurrency=concurrency
    )


def timed(ray, kind: str, paths: list[str], concurrency: int, tasks: int):
    pipeline(ray, kind, paths[:concurrency], concurrency, tasks).materialize()  # warm-up: a file per worker
    t0 = time.perf_counter()
    ds = pipeline(ray, kind, paths, concurrency, tasks).materialize()
    return time.perf_counter() - t0, ds


def _by_clip(ds) -> dict[str, np.ndarray]:
    """{clip file name: its 8 frames} from a per-clip (`frames`) or per-frame (`frame`) dataset."""
    rows = ds.take_all()
    if rows and "frames" in rows[0]:
        return {Path(r["path"]).name: r["frames"] for r in rows}
    got: dict[str, list] = {}
    for r in rows:
        got.setdefault(Path(r["path"]).name, []).append((int(r["frame_index"]), r["frame"]))
    return {k: np.stack([f for _, f in sorted(v, key=lambda x: x[0])]) for k, v in got.items()}


def check_same_frames(ref_ds, other_ds, paths) -> tuple[bool, str]:
    """Both pipelines must give the very same 8 frames of every clip."""
    ref, other = _by_clip(ref_ds), _by_clip(other_ds)
    for name in (Path(p).name for p in paths):
        a, b = ref.get(name), other.get(name)
        if a is None or b is None or a.shape != (FRAMES, SIZE, SIZE, 3) or a.shape != b.shape:
            return False, f"{name}: {None if b is None else b.shape[0]} frames"
        if not np.array_equal(a, b):
            return False, f"{name}: pixels differ"
    return True, "identical"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=40, help="clips per set (default 40)")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=2, help="tasks at once, 1 CPU each (default 2)")
    ap.add_argument(
        "--tasks",
        type=int,
        default=4,
        help="read tasks per pipeline, files split evenly (default 4: 10 clips or 50 images "
        "each, two per worker; Ray Data's per-task cost stays small next to a task's work)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="timed passes per pipeline; the best counts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--cache",
        default=os.path.join(tempfile.gettempdir(), "ddft-bench-data"),
        help="where generated clips/images are kept between runs",
    )
    args = ap.parse_args(argv)

    with ray_session(num_cpus=args.concurrency) as ray:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        # Ray Data reserves half the cluster per operator by default (op_resource_reservation_ratio
        # 0.5); on 2 CPUs that left our single fused operator a budget of 1 CPU, i.e. one task at a
        # time ("backpressured:tasks(ResourceBudget)" in the ray-data log) whatever `concurrency`
        # says. Off, every pipeline really runs --concurrency tasks at once.
        ctx.op_resource_reservation_enabled = False
        short, long_, imgs, gen_s = prepare_inputs(
            ray, Path(args.cache), args.clips, args.seconds, args.images, args.seed
        )
        print(
            f"inputs: {args.clips} clips x2 ({args.seconds} s, {W}x{H}, {FPS} fps, H.264), "
            f"{args.images} JPEGs 512x384 in {Path(args.cache)} ({gen_s:.1f} s)",
            flush=True,
        )
        for label, paths in (("1 s GOP", short), ("x264 default GOP", long_)):
            print(f"  {label:17s} {gop_summary(paths)}", flush=True)

        # name: (pipeline, files)
        runs = {
            "exact": ("exact", short),
            "keyframe": ("keyframe", short),
            "read_videos": ("read_videos", short),
            "long_exact": ("exact", long_),
            "long_floor": ("floor", long_),
            "decord_exact": ("decord_exact", short),
            "decord_keyframe": ("decord_keyframe", short),
            "long_decord_exact": ("decord_exact", long_),
            "images": ("images", imgs),
        }
        best: dict[str, float] = {}
        keep: dict[str, object] = {}
        for rnd in range(args.rounds):
            for name, (kind, paths) in runs.items():
                secs, ds = timed(ray, kind, paths, args.concurrency, args.tasks)
                print(f"  round {rnd + 1} {name:17s} {secs:7.2f} s  {ds.count()} rows", file=sys.stderr, flush=True)
                best[name] = min(secs, best.get(name, secs))
                if rnd == 0 and name in (
                    "exact",
                    "read_videos",
                    "decord_exact",
                    "long_exact",
                    "long_decord_exact",
                    "long_floor",
                ):
                    keep[name] = ds  # for the checks below
        checks = {
            "read_videos == exact": check_same_frames(keep["exact"], keep["read_videos"], short),
            "decord == exact (1 s GOP)": check_same_frames(keep["exact"], keep["decord_exact"], short),
            "decord == exact (long GOP)": check_same_frames(keep["long_exact"], keep["long_decord_exact"], long_),
        }
        decoded = int(keep["long_floor"].sum("decoded"))
        checks["floor decoded every frame"] = (
            decoded == len(long_) * args.seconds * FPS,
            f"{decoded} frames of {len(long_)} clips",
        )

    rate = {name: len(paths) / best[name] for name, (_, paths) in runs.items()}
    res = {
        "bench": "data",
        "clips": args.clips,
        "images": args.images,
        "concurrency": args.concurrency,
        "tasks": args.tasks,
        "rounds": args.rounds,
        "exact_ratio": round(rate["exact"] / rate["read_videos"], 2),
        "keyframe_ratio": round(rate["keyframe"] / rate["read_videos"], 2),
        "long_gop_exact_vs_floor": round(rate["long_exact"] / rate["long_floor"], 2),
        "exact_clips_per_s": round(rate["exact"], 2),
        "keyframe_clips_per_s": round(rate["keyframe"], 2),
        "read_videos_clips_per_s": round(rate["read_videos"], 2),
        "long_gop_exact_clips_per_s": round(rate["long_exact"], 2),
        "long_gop_floor_clips_per_s": round(rate["long_floor"], 2),
        "decord_exact_clips_per_s": round(rate["decord_exact"], 2),
        "decord_keyframe_clips_per_s": round(rate["decord_keyframe"], 2),
        "long_gop_decord_exact_clips_per_s": round(rate["long_decord_exact"], 2),
        "images_per_s": round(rate["images"], 1),
        "frames_identical": all(ok for ok, _ in checks.values()),
    }
    rows = [
        ("exact: sample_frames uniform", "1 s GOP", "exact"),
        ("keyframe: sample_frames keyframe", "1 s GOP", "keyframe"),
        ("read_videos + keep the same 8", "1 s GOP", "read_videos"),
        ("  decord get_batch, uniform", "1 s GOP", "decord_exact"),
        ("  decord get_batch, keyframe", "1 s GOP", "decord_keyframe"),
        ("exact: sample_frames uniform", "x264 default GOP", "long_exact"),
        ("floor: decode all, no RGB", "x264 default GOP", "long_floor"),
        ("  decord get_batch, uniform", "x264 default GOP", "long_decord_exact"),
    ]
    print(
        f"\n{'pipeline (8 frames per clip)':36s} {'clips':17s} {'best s':>7s} {'clips/s':>8s} {'vs read_videos':>15s}"
    )
    for label, clipset, name in rows:
        vs = (
            f"{rate[name] / rate['read_videos']:.2f}x"
            if clipset == "1 s GOP"
            else f"{rate[name] / rate['long_floor']:.2f}x floor"
        )
        print(f"{label:36s} {clipset:17s} {best[name]:7.2f} {rate[name]:8.2f} {vs:>15s}")
    print(
        f"{'load_image (FoodX-251-style)':36s} {'200 JPEG 512x384' if args.images == 200 else 'JPEG 512x384':17s} "
        f"{best['images']:7.2f} {rate['images']:8.1f} images/s"
    )
    print()
    for k, goal in {"exact_ratio": 3, "keyframe_ratio": 8, "long_gop_exact_vs_floor": 0.8}.items():
        print(f"{k:27s} {res[k]:6.2f}  (goal >= {goal}: {'met' if res[k] >= goal else 'NOT met'})")
    for k, (_ok, why) in checks.items():
        print(f"{k:27s} {why}")
    print(json.dumps(res))
    return 0 if res["frames_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
