"""The `ddft` command. Each subcommand validates its config first, then calls the library."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from ddft import config


def _load(path: str) -> config.PipelineConfig:
    try:
        return config.load(path)  # refused here, before any Ray work
    except config.ConfigError as err:
        sys.exit(str(err))


def cmd_base_build(args) -> int:
    from ddft.models.load import ensure_base
    from ddft.store import Store

    cfg = _load(args.config)
    info = ensure_base(Store.from_config(cfg.store), cfg.base.id, cfg.base.build, cfg.base.source)
    print(f"base {info.id} at {info.uri} (sha256 {info.fingerprint[:12]})")
    return 0


def cmd_data_prepare(args) -> int:
    from ddft.cluster import ray_session
    from ddft.data.prepare import prepare_all

    cfg = _load(args.config)
    with ray_session():
        for p in prepare_all(cfg):
            print("prepared " + p.summary())
    return 0


def cmd_train(args) -> int:
    from ddft.cluster import ray_session
    from ddft.train.launcher import run_all, table

    cfg = _load(args.config)
    only = [n.strip() for n in args.only.split(",")] if args.only else None
    with ray_session():
        results = run_all(cfg, only, force=args.force)
    print(table(results))
    for r in results:
        if r.error:
            print(f"job {r.name} failed: {r.error}", file=sys.stderr)
    print("DDFT_RESULTS " + json.dumps([r.__dict__ for r in results]))  # for scripts (the demo)
    return 0 if all(r.status != "failed" for r in results) else 1


def cmd_eval(args) -> int:
    from ddft.store import Store
    from ddft.train import evaluate

    cfg = _load(args.config)
    store = Store.from_config(cfg.store)
    results = evaluate.evaluate(store, cfg.base.id, limit=args.limit, data=cfg.data)
    print(evaluate.table(results))
    print(f"written to {evaluate.save(store, results)} and into the adapters' manifests")
    return 0


def cmd_adapters_list(args) -> int:
    from ddft.adapters.registry import list_adapters
    from ddft.store import Store

    for m in list_adapters(Store.from_config(_load(args.config).store)):
        print(f"{m.ref:32} {m.modality:6} base={m.base_model_id} rank={m.rank} source={m.source}")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ddft", description="Directed Domain Fine-Tuning on Ray")
    sub = ap.add_subparsers(dest="command", required=True)

    def add(name, fn, help, parent=sub):
        p = parent.add_parser(name, help=help)
        p.add_argument("--config", required=True, help="a PipelineConfig YAML, e.g. jobs/configs/demo.yaml")
        p.set_defaults(fn=fn)
        return p

    base = sub.add_parser("base", help="the base model").add_subparsers(dest="sub", required=True)
    add("build", cmd_base_build, "build or import the base into the store", base)
    data = sub.add_parser("data", help="datasets").add_subparsers(dest="sub", required=True)
    add("prepare", cmd_data_prepare, "prepare every modality the jobs use (Ray Data)", data)
    train = add("train", cmd_train, "run the config's jobs concurrently (Ray Train)")
    train.add_argument("--only", help="comma-separated job names, e.g. image,video")
    train.add_argument("--force", action="store_true",
                       help="retrain jobs whose adapter was already published from the same settings and data")
    add("eval", cmd_eval, "score the base and the DDFT adapters on held-out data").add_argument(
        "--limit", type=int, help="at most this many held-out samples per modality")
    adapters = sub.add_parser("adapters", help="the adapter registry").add_subparsers(dest="sub", required=True)
    add("list", cmd_adapters_list, "list published adapters", adapters)
    return ap


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
