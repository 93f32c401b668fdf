"""The whole DDFT loop on one machine: what `make demo` runs.

    python jobs/demo.py --config jobs/configs/demo.yaml [--keep-serving]

Local Ray cluster on 127.0.0.1 -> embedded base in the store -> synthetic kitchen -> Ray Data
preparation -> `ray job submit ... jobs/train_all.py` (three Ray Train jobs at once) -> the Serve
app with the three adapters -> a held-out video through POST /v1/recipes -> summary.

The terminal gets a report (ddft.cli.report): one line per stage, each job's loss curve, the served
recipe as a table, where things landed. Ray's, its workers' and the training job's logs go to
<store>/logs/demo-<time>.log (its path printed first); --verbose prints them all here instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from ddft import client, config
from ddft.cli.report import Console, duration, logs_to, loss_table, named_line, recipe_tables
from ddft.cluster import LOCAL_IP, free_port, ray_session, stop_cluster_at, use_token, use_token_here
from ddft.data import formats
from ddft.data.prepare import PrepareError, prepare_all
from ddft.eval.scores import matched_ingredients
from ddft.recipes import format_quantity
from ddft.store import Store, StoreError
from ddft.train.launcher import read_results

REPO = Path(__file__).resolve().parents[1]

GCS_PORT, DASHBOARD_PORT = 6380, 8265
ADDRESS, DASHBOARD = f"{LOCAL_IP}:{GCS_PORT}", f"http://{LOCAL_IP}:{DASHBOARD_PORT}"
# Serve replicas import serve.app from the repo and read the same store as this process.
RUNTIME_ENV = {"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}}
MARKER = REPO / ".demo" / "cluster-started"  # the demo stops only a cluster it started
# Its own temp dir (short: Ray's socket paths under it must fit 107 bytes), so that stopping it
# stops it and nothing else (ddft.cluster.stop_cluster_at; `ray stop` would stop every cluster).
# Its token is there too (token auth on; ddft.cluster.token_env), not in ~/.ray: the cluster,
# `ray job submit` and this driver all read it from there.
RAY_TEMP = Path("/tmp") / f"ddft-demo-ray-{os.getuid()}"
# Without --verbose the logs go to a file: Ray Data's progress bars (redrawn as lines there, most
# of the output) are switched off in the demo's driver and in the training job, and Ray prints
# worker log prefixes without colour codes.
QUIET_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_COLOR_PREFIX": "0"}


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _env() -> dict:
    # Ray job entrypoints run `python` from the cluster's PATH: make it this venv's.
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    return use_token(env, RAY_TEMP)


def _aws_env() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


def ensure_cluster(num_cpus: int) -> bool:
    """Reuse a running local cluster, else start one with the dashboard (for `ray job submit`)."""
    with socket.socket() as probe:  # `ray status` on a dead address retries for a long time
        listening = probe.connect_ex((LOCAL_IP, GCS_PORT)) == 0
    if listening:
        print(f"reusing the Ray cluster at {ADDRESS}")
        return False
    subprocess.run(
        [
            _ray_bin(),
            "start",
            "--head",
            f"--node-ip-address={LOCAL_IP}",
            f"--port={GCS_PORT}",
            "--include-dashboard=true",
            f"--dashboard-host={LOCAL_IP}",
            f"--dashboard-port={DASHBOARD_PORT}",
            f"--num-cpus={num_cpus}",
            f"--temp-dir={RAY_TEMP}",
            # Ray's fixed default (52365) is taken by any other cluster on the machine (a notebook's
            # ray.init), and then no job can be submitted: "No available agent to submit job"
            f"--dashboard-agent-listen-port={free_port()}",
            "--disable-usage-stats",
        ],
        env=_env(),
        check=True,
    )
    MARKER.parent.mkdir(exist_ok=True)
    MARKER.write_text(ADDRESS)
    return True


def stop_cluster() -> None:
    """Stop the cluster this demo started (by its temp dir), not any other on the machine."""
    if MARKER.exists():
        stop_cluster_at(RAY_TEMP)
        MARKER.unlink()


class TrainingFailed(SystemExit):
    """The training job failed: its message is the demo's error line; `tail` its last log lines."""

    def __init__(self, message: str, tail: list[str]):
        super().__init__(message)
        self.tail = tail


def submit_training(
    config_path: str, cfg: config.PipelineConfig, store: Store, retrain: bool = False, env_vars: dict | None = None
) -> list:
    """The documented command, with the store made absolute (the job's working dir is a copy); the
    jobs' outcomes come from the store (runs/_results), where the job wrote them."""
    env_vars = {"DDFT_STORE": store.uri, **_aws_env(), **(env_vars or {})}
    cmd = [
        _ray_bin(),
        "job",
        "submit",
        "--address",
        DASHBOARD,
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps({"env_vars": env_vars}),
        "--",
        "python",
        "jobs/train_all.py",
        "--config",
        config_path,
    ] + (["--force"] if retrain else [])
    print(
        "$ ray job submit --working-dir . -- python jobs/train_all.py --config",
        config_path,
        "--force" if retrain else "",
    )
    submitted = time.time()
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: deque[str] = deque(maxlen=15)
    for line in proc.stdout:
        if "Reporting training result" not in line:  # one line per step per job is too much here
            sys.stdout.write(line)
            if line.strip():
                tail.append(line.rstrip())
    names = [j.name for j in cfg.jobs]
    results = read_results(store, names, since=submitted)
    if proc.wait() != 0 or len(results) != len(names):
        raise TrainingFailed(f"training job failed (exit {proc.returncode}); see the log above", list(tail))
    return [results[n] for n in names]


def try_it(cfg: config.PipelineConfig, store: Store, config_path: Path, engine: str | None = None) -> dict:
    """Start the Serve app and ask it one recipe, one dish and one cooking question over HTTP."""
    from serve.app import run

    url = run(config_path, engine=engine)
    print(f"\nserving on engine {engine or cfg.serve.engine} at {url}")
    raw = cfg.data.raw_prefix
    tests = [
        r
        for r in formats.read_tasty(
            store, f"{raw}/{cfg.data.tasty}", split_set=cfg.data.tasty_split, unlisted=cfg.data.tasty_unlisted
        )
        if r.split == "test"
    ]
    held_out = tests[0]
    recipe = client.post_recipe(url, store.read_bytes(held_out.video_key))

    # The same request with another held-out video (the one sharing the fewest foods): an adapter
    # that reads the video names the held-out recipe's foods only when shown its own video.
    def names(r) -> list[dict]:
        return [{"name": i.name} for i in r.ingredients]

    expected = names(held_out)
    other = min(tests[1:] or tests, key=lambda r: len(matched_ingredients(names(r), expected)))
    shown_other = client.post_recipe(url, store.read_bytes(other.video_key))
    named = {
        "of": len(expected),
        "own": len(matched_ingredients(recipe["ingredients"], expected)),
        "other": len(matched_ingredients(shown_other["ingredients"], expected)),
        "other_id": other.id,
    }
    print(f"\n=== POST /v1/recipes  (held-out video {held_out.id}, answered by {recipe['adapter']}) ===")
    for ing in recipe["ingredients"]:
        amount = " ".join(x for x in (format_quantity(ing["quantity"]) if ing["quantity"] else "", ing["unit"]) if x)
        print(f"  - {amount} {ing['name']}".replace("  ", " "))
    for i, step in enumerate(recipe["steps"], 1):
        print(f"  {i}. {step}")
    print(f"  (expected:\n    {held_out.text.replace(chr(10), chr(10) + '    ')})")
    print(f"  {named_line(named)}")
    foodx = formats.read_foodx(store, f"{raw}/{cfg.data.foodx}")
    key, _, dish = foodx.splits["val"][0]
    image = client.generate(url, "image", image_bytes=store.read_bytes(key))
    print(
        f"\n=== POST /v1/generate image ({key.rsplit('/', 1)[-1]}, a {dish.replace('_', ' ')}) ===\n"
        f"  {image['answer']!r}  <- {image['adapter']}"
    )
    question = formats.read_qa(store, f"{raw}/{cfg.data.qa}")[0][0]
    text = client.generate(url, "text", question=question)
    print(f"\n=== POST /v1/generate text ({question!r}) ===\n  {text['answer']!r}  <- {text['adapter']}")
    return {
        "recipe": recipe,
        "image": image,
        "text": text,
        "url": url,
        "engine": engine or cfg.serve.engine,
        "held_out": {
            "id": held_out.id,
            "title": held_out.title,
            "ingredients": held_out.ingredients,
            "steps": held_out.steps,
        },
        "named": named,
        "image_file": key.rsplit("/", 1)[-1],
        "dish": dish.replace("_", " "),
        "question": question,
    }


def quiet_ray_data() -> None:
    """No Ray Data progress bars in this process: redrawn as lines in a log, they were most of it."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = ctx.enable_operator_progress_bars = False


def stop_serving() -> None:
    from ray import serve

    serve.shutdown()


# --- the report ---------------------------------------------------------------------------------


def _key(store: Store, url: str | None) -> str | None:
    return url.removeprefix(store.uri + "/") if url else None


def loss_curves(store: Store, results: list) -> dict[str, list]:
    """Each job's whole loss curve: a skipped job's result keeps only its first and last loss, its
    run's newest train_state.json (named by the adapter's manifest) keeps them all."""
    curves = {}
    for r in results:
        if len(r.losses) > 2 or not r.adapter:
            continue
        with contextlib.suppress(Exception):  # a curve is a nicety: no run, no curve
            run = _key(store, store.read_json(f"{_key(store, r.adapter)}/manifest.json")["metrics"]["run"])
            states = [store.read_json(k) for k in store.list(f"{run}/") if k.endswith("/train_state.json")]
            curves[r.name] = max(states, key=lambda s: s["step"])["losses"]
    return curves


def newest_eval(store: Store) -> str | None:
    with contextlib.suppress(Exception):
        reports = [k for k in store.list("eval/") if k.endswith(".md")]
        return reports[-1] if reports else None
    return None


def stage_notes(prepared: list, results: list) -> tuple[str, str]:
    """What the prepare and train stages did, in a few words each."""
    data = ", ".join(f"{p.modality} {sum(p.counts.values())}" for p in prepared)
    reused = all(p.reused for p in prepared)
    data = f"{data} samples" + (" (all reused)" if reused and prepared else "")
    by_status: dict[str, list[str]] = {}
    for r in results:
        by_status.setdefault(r.status, []).append(r.name)
    train = "; ".join(f"{', '.join(names)} {status}" for status, names in by_status.items())
    if set(by_status) == {"skipped"}:
        train += " (published from the same settings and data; --retrain trains again)"
    return data, train


def report(out: Console, d: Demo, done: dict) -> None:
    """After the stages: the loss curves, the three answers, where everything landed."""
    store, cfg, results, answers = d.store, d.cfg, done["results"], done["answers"]
    out.section("training: loss per step")
    out.lines(loss_table(results, loss_curves(store, results), ascii=out.ascii))

    recipe, held = answers["recipe"], answers["held_out"]
    took = recipe.get("timings", {}).get("total_s")
    out.section(
        f"recipe for held-out video {held['id']} ({held['title']}): POST /v1/recipes, "
        f"answered by {recipe['adapter']}" + (f" in {took:.1f} s" if took else "")
    )
    out.lines(recipe_tables(recipe, held["ingredients"], held["steps"], ascii=out.ascii))
    if named := answers.get("named"):
        out.lines([named_line(named)])
    image, text = answers["image"], answers["text"]
    out.section("image and text: POST /v1/generate")
    out.lines(
        out.table(
            [
                (f"{answers['image_file']} (a {answers['dish']})", repr(image["answer"]), image["adapter"]),
                (repr(answers["question"]), repr(text["answer"]), text["adapter"]),
            ],
            ("asked", "answer", "adapter"),
        )
    )

    out.section("where things landed")
    rows = [("store", store.uri), ("base", f"models/{cfg.base.id}")]
    rows += [("prepared", ", ".join(f"{p.modality}/{p.version}" for p in done["prepared"]) + " in datasets/prepared/")]
    rows += [("adapters", ", ".join(_key(store, r.adapter) or f"{r.name}: none" for r in results))]
    evaluated = newest_eval(store)
    rows += [("eval", evaluated or f"none yet: ddft eval --config {d.shown} writes eval/<time>.md")]
    if d.keep_serving:
        rows += [("serving", f"{answers['url']} on engine {answers['engine']} (stop it: make cluster-down)")]
    else:
        rows += [("serving", f"stopped ({answers['engine']} engine; --keep-serving leaves it up at {answers['url']})")]
    if d.log:
        rows += [("logs", d.log)]
    rows += [("total", duration(sum(done["times"].values())))]
    out.lines(out.table(rows, max_width=120))


# --- the run ------------------------------------------------------------------------------------


def main() -> int | str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="jobs/configs/demo.yaml")
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local cluster")
    ap.add_argument("--keep-serving", action="store_true", help="leave the cluster and the app running")
    ap.add_argument(
        "--retrain",
        action="store_true",
        help="train again even when the adapters were published from the same settings and data",
    )
    ap.add_argument(
        "--engine",
        choices=("hf", "vllm"),
        help="serve with this engine (default: the config's serve.engine); vllm runs in its own venv (make venv-vllm)",
    )
    ap.add_argument(
        "--verbose",
        action="store_true",
        help="print Ray's, its workers' and the training job's logs here (default: into <store>/logs/)",
    )
    ap.add_argument(
        "--cluster",
        choices=("up", "down"),
        help="only start the demo's local cluster (make cluster-up), or stop it and no other (make cluster-down)",
    )
    args = ap.parse_args()
    if args.cluster == "up":
        ensure_cluster(args.num_cpus)
        MARKER.unlink(missing_ok=True)  # started on purpose: a demo reuses it and leaves it running
        token = use_token({}, RAY_TEMP)
        print(f"token auth is on; for `ray job submit --address {DASHBOARD}` and ddft train --address, first:")
        print("  export " + " ".join(f"{k}={v}" for k, v in token.items()))
        return 0
    if args.cluster == "down":
        print(f"stopped {stop_cluster_at(RAY_TEMP)} processes of the cluster at {ADDRESS}")
        return 0
    try:
        return run(
            Path(args.config).resolve(), args.num_cpus, args.keep_serving, args.retrain, args.engine, args.verbose
        )
    except (config.ConfigError, StoreError, PrepareError, client.ClientError) as err:
        return f"demo stopped: {err}"  # a clear message, not a traceback from deep inside Ray


def log_file(store: Store) -> tuple[Path, str | None]:
    """Where this run's log goes: <store>/logs/demo-<time>.log on a file store; on S3 a local file
    (.demo/logs/) copied to that key at the end (the key is returned as the second value)."""
    name = f"logs/demo-{time.strftime('%Y%m%d-%H%M%S')}.log"
    local = store.local_path(name)
    return (local, None) if local is not None else (REPO / ".demo" / name, name)


@dataclass
class Demo:
    """One run's settings, as the stages read them."""

    cfg: config.PipelineConfig
    store: Store
    config_path: Path
    shown: str  # the config's path as the user would type it (relative to the repo when inside)
    num_cpus: int
    keep_serving: bool
    retrain: bool
    engine: str | None
    quiet: bool  # logs into a file (the default) rather than on the terminal (--verbose)
    log: str | None = None  # where the log file is or will be copied to


def run(
    config_path: Path,
    num_cpus: int,
    keep_serving: bool,
    retrain: bool = False,
    engine: str | None = None,
    verbose: bool = False,
) -> int:
    cfg = config.load(config_path)
    store = Store.from_config(cfg.store)
    use_token_here(RAY_TEMP)  # this driver joins the demo's cluster with its token
    os.environ["DDFT_STORE"] = store.uri  # every process (jobs, replicas) sees the same store
    RUNTIME_ENV["env_vars"].update({"DDFT_STORE": store.uri, **_aws_env()})
    store.exists(f"models/{cfg.base.id}")  # an unreachable store or missing bucket fails here, first
    shown = str(config_path.relative_to(REPO) if config_path.is_relative_to(REPO) else config_path)
    demo = Demo(cfg, store, config_path, shown, num_cpus, keep_serving, retrain, engine, quiet=not verbose)
    if verbose:  # everything on this terminal, as it comes; the report as well
        return stages(Console(sys.stdout, live=False, announce=True), demo)
    log, upload_to = log_file(store)
    demo.log = str(log) if upload_to is None else store.url(upload_to)
    os.environ.update({"RAY_COLOR_PREFIX": "0"})
    RUNTIME_ENV["env_vars"].update(QUIET_ENV)
    ddft_log, level = logging.getLogger("ddft"), logging.getLogger("ddft").level
    try:
        with logs_to(log) as terminal:
            out = Console(terminal)
            out.line(f"ddft demo: {shown}, store {store.uri}")
            out.line(f"logs: {log}  (--verbose prints them here)")
            out.line()
            handlers = [logging.StreamHandler(sys.stderr), out.note_handler()]  # the log file, the spinner
            ddft_log.setLevel(logging.INFO)
            for h in handlers:
                ddft_log.addHandler(h)
            try:
                return stages(out, demo)
            finally:
                for h in handlers:
                    ddft_log.removeHandler(h)
                ddft_log.setLevel(level)
    finally:
        if upload_to is not None:
            with contextlib.suppress(Exception):
                store.write_bytes(upload_to, log.read_bytes())


def stages(out: Console, d: Demo) -> int:
    """The loop, one stage line each, then the report."""
    cfg, store, times = d.cfg, d.store, {}
    failed = f"failed; the log: {d.log}" if d.log else "failed"
    with out.stage("cluster", f"ray start at {ADDRESS}") as st:
        st.failure = failed
        started = ensure_cluster(d.num_cpus)
        st.done(f"{'started' if started else 'reusing'} {ADDRESS}, dashboard {DASHBOARD}")
    times["cluster"] = st.seconds
    try:
        with ray_session(address=ADDRESS, runtime_env=RUNTIME_ENV):
            with out.stage("base + kitchen + prepare", "the base model") as st:
                st.failure = failed
                if d.quiet:
                    quiet_ray_data()
                prepared = prepare_all(cfg)  # base, kitchen, Ray Data preparation
                for p in prepared:
                    print(f"prepared {p.summary()}\n  at {store.url(p.key)}")
                st.done(stage_notes(prepared, [])[0])
            times["base + kitchen + prepare"] = st.seconds
        names, since = [j.name for j in cfg.jobs], time.time()
        progress = lambda: f"ray job submit: {len(read_results(store, names, since))}/{len(names)} jobs done"  # noqa: E731
        with out.stage("train (ray job submit)", progress(), poll=progress) as st:
            st.failure = failed
            try:
                results = submit_training(d.shown, cfg, store, d.retrain, env_vars=QUIET_ENV if d.quiet else None)
            except TrainingFailed as err:
                if d.quiet:  # its log is in the file: its last lines here, so "above" holds
                    out.lines(err.tail, indent="  | ")
                raise
            st.done(stage_notes(prepared, results)[1])
        times["train (ray job submit)"] = st.seconds
        with ray_session(address=ADDRESS, runtime_env=RUNTIME_ENV):
            with out.stage("serve + requests", "deploying the Serve app") as st:
                st.failure = failed
                answers = try_it(cfg, store, d.config_path, d.engine)
                st.done(f"engine {answers['engine']} at {answers['url']}: a recipe, a dish, an answer")
                if not d.keep_serving:
                    stop_serving()
            times["serve + requests"] = st.seconds
    finally:
        if started and not d.keep_serving:
            with out.stage("stop the cluster", f"stopping the cluster at {ADDRESS}") as st:
                stop_cluster()
                st.done(f"stopped {ADDRESS} (and no other cluster)")
    report(out, d, {"prepared": prepared, "results": results, "answers": answers, "times": times})
    return 0


if __name__ == "__main__":
    sys.exit(main())
