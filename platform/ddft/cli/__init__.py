"""The `ddft` command: one entry point for the whole flow (prepare, train, evaluate, serve, manage
adapters and tenants, ask for a recipe). Thin: it parses, validates, calls the library or the HTTP
client, and turns failures into one line on stderr and an exit code scripts can trust.

    ddft --help                 # every command, each with an example, and the exit codes
    python -m ddft.cli --help   # the same
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap

from ddft.cli import pipeline, remote
from ddft.cli.common import (
    EXIT_CODES,
    FAILED,
    KEY_ENV,
    REFUSED,
    UNREACHABLE,
    USAGE,
    CliError,
    Formatter,
    add_server_options,
    one_line,
)

__all__ = ["main", "parser"]

OVERVIEW = """\
Directed Domain Fine-Tuning on Ray: one LoRA adapter per modality over one Video-LLaVA base.

the whole flow:
  ddft base build    --config jobs/configs/demo.yaml     # the base model into the store
  ddft data prepare  --config jobs/configs/demo.yaml     # datasets -> prepared shards (Ray Data)
  ddft train         --config jobs/configs/demo.yaml     # every job at once (Ray Train)
  ddft eval          --config jobs/configs/demo.yaml     # base vs adapters on held-out data
  ddft plan          --config jobs/configs/demo.yaml     # memory per replica and worker: does it fit?
  ddft serve         --config jobs/configs/demo.yaml     # the HTTP app (Ray Serve)
  ddft recipe clip.mp4                                   # a recipe from a cooking video
"""

EPILOG = f"""\
environment: DDFT_URL (the server, default http://127.0.0.1:8000), DDFT_API_KEY (a tenant's key),
DDFT_ADMIN_KEY (the admin key); --url/--key/--admin-key take precedence. Keys are never printed.
Progress bars go to stderr, only when it is a terminal; --quiet turns them off.

{EXIT_CODES}

`ddft COMMAND --help` explains a command, with an example."""


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars and less logging")
    return p


def parser() -> argparse.ArgumentParser:
    common = _common()
    ap = argparse.ArgumentParser(prog="ddft", description=OVERVIEW, epilog=EPILOG, formatter_class=Formatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def group(parent, name: str, summary: str, examples: str):
        p = parent.add_parser(
            name, help=summary, description=summary, epilog="example:\n" + examples, formatter_class=Formatter
        )
        return p.add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")

    def command(parent, name: str, fn, summary: str, example: str, details: str = "", config: str | None = "required"):
        p = parent.add_parser(
            name,
            help=summary,
            parents=[common],
            formatter_class=Formatter,
            description=summary + ("\n\n" + textwrap.fill(details, 88) if details else ""),
            epilog="example:\n  " + example.replace("\n", "\n  "),
        )
        if config == "required":
            p.add_argument("--config", required=True, help="a pipeline config YAML, e.g. jobs/configs/demo.yaml")
        elif config:
            p.add_argument("--config", default=config, help="a pipeline config YAML (default: %(default)s)")
        p.set_defaults(fn=fn)
        return p

    base = group(sub, "base", "the base model", "  ddft base build --config jobs/configs/demo.yaml")
    command(
        base,
        "build",
        pipeline.cmd_base_build,
        "build or import the config's base model into the store",
        "ddft base build --config jobs/configs/demo.yaml",
    )

    data = group(sub, "data", "datasets", "  ddft data prepare --config jobs/configs/demo.yaml")
    command(
        data,
        "prepare",
        pipeline.cmd_data_prepare,
        "prepare every modality the config's jobs use (Ray Data)",
        "ddft data prepare --config jobs/configs/demo.yaml",
        "Writes the synthetic kitchen first when the config asks for it; reads the native formats from the "
        "store and writes prepared shards and a manifest per modality.",
    )

    train = command(
        sub,
        "train",
        pipeline.cmd_train,
        "run the config's training jobs concurrently (Ray Train)",
        "ddft train --config jobs/configs/demo.yaml --only video\n"
        "ddft train --config jobs/configs/demo.yaml --address http://127.0.0.1:8265   # as a Ray job",
        "Runs here on a local Ray cluster by default. With --address it submits "
        "`python jobs/train_all.py --config ...` as a Ray job (the repository as its working dir), "
        "streams the job's log and exits with the job's outcome.",
    )
    train.add_argument("--only", help="comma-separated job names, e.g. image,video")
    train.add_argument(
        "--force",
        action="store_true",
        help="retrain jobs whose adapter was already published from the same settings and data",
    )
    train.add_argument(
        "--address",
        help="a Ray cluster's dashboard (job submission) address, "
        "e.g. http://127.0.0.1:8265: submit the training there as a Ray job",
    )
    train.add_argument("--no-wait", action="store_true", help="with --address: print the job id and return")

    ev = command(
        sub,
        "eval",
        pipeline.cmd_eval,
        "score the base and the DDFT adapters on held-out and in-distribution data, "
        "each adapter also with mismatched inputs (its matched - mismatched gap)",
        "ddft eval --config jobs/configs/demo.yaml --limit 20\n"
        "ddft eval --config jobs/configs/demo.yaml --engine vllm   # answers from vLLM (make venv-vllm first)",
        "The answers come from a serving engine (greedy, adapters mixed in batches), with the config's serve "
        "settings; the table and the report name the engine.",
    )
    ev.add_argument("--limit", type=int, help="at most this many samples per set and modality")
    ev.add_argument(
        "--engine",
        choices=("hf", "vllm"),
        help="the engine that generates the answers, instead of the config's serve.engine "
        "(vllm: in its own environment, serve.vllm.python)",
    )

    pl = command(
        sub,
        "plan",
        pipeline.cmd_plan,
        "the memory each model replica and each training worker will take, item by item, and whether it fits",
        "ddft plan --config jobs/configs/demo.yaml\n"
        "ddft plan --config jobs/configs/video-llava-7b.yaml --gpu-memory-gib 80",
        "From the base's shape alone (its config.json in the store, or a known base's): weights in the "
        "serving or training dtype, vLLM's LoRA slots, projector copies, the KV cache, trainable state and "
        "one step's activations. GPU plans are checked against --gpu-memory-gib (default: this machine's "
        "GPU), CPU plans against this machine's memory. ddft serve and ddft train refuse a config that "
        "does not fit, with the same lines. Exit 1 when something does not fit.",
    )
    pl.add_argument("--gpu-memory-gib", type=float, help="one GPU's memory, for planning a GPU this machine lacks")

    serve = command(
        sub,
        "serve",
        pipeline.cmd_serve,
        "serve the config's base and adapters over HTTP (Ray Serve)",
        "DDFT_ADMIN_KEY=change-me ddft serve --config jobs/configs/demo.yaml",
        "Listens on the config's serve.host and serve.port until Ctrl-C. Starts a local Ray cluster "
        "unless --address (or RAY_ADDRESS) names one. Tenant management needs DDFT_ADMIN_KEY set "
        "here (the env var named by serve.admin_key_env).",
        config="jobs/configs/demo.yaml",
    )
    serve.add_argument("--address", help="a running Ray cluster (GCS address, e.g. 127.0.0.1:6380) to serve on")
    serve.add_argument(
        "--engine",
        choices=("hf", "vllm"),
        help="the serving engine, instead of the config's serve.engine (vllm: make venv-vllm first)",
    )

    adapters = group(
        sub,
        "adapters",
        "adapters: the store's registry, or your own on a server",
        "  ddft adapters list --config jobs/configs/demo.yaml\n"
        "  ddft adapters upload my-text ./my_lora --modality text --key $KEY",
    )
    lst = command(
        adapters,
        "list",
        None,
        "list adapters: every published one in the store (--config), or your own on a server (--url/--key)",
        "ddft adapters list --config jobs/configs/demo.yaml\n"
        "ddft adapters list --url http://127.0.0.1:8000 --key $DDFT_API_KEY",
        config=None,
    )
    lst.add_argument("--config", help="a pipeline config YAML: list the store's registry")
    add_server_options(lst)
    lst.set_defaults(fn=_adapters_list)
    up = command(
        adapters,
        "upload",
        remote.cmd_adapters_upload,
        "upload a PEFT LoRA adapter for your tenant",
        "ddft adapters upload my-text ./my_lora --modality text --key $DDFT_API_KEY\n"
        "ddft adapters upload my-video my_lora.tar.gz --modality video",
        "FOLDER is what PEFT's save_pretrained writes (adapter_config.json, adapter_model.safetensors; "
        "sent as multipart files); an ARCHIVE (.tar, .tar.gz, .zip) of it is sent as it is. The server "
        "validates it against its base before it exists; each upload is a new version.",
        config=None,
    )
    up.add_argument("name", metavar="NAME", help="the adapter's name, e.g. my-text")
    up.add_argument("path", metavar="FOLDER_OR_ARCHIVE", help="a PEFT folder, or a .tar/.tar.gz/.zip of one")
    up.add_argument("--modality", required=True, choices=("text", "image", "video"), help="the requests it answers")
    add_server_options(up)
    rm = command(
        adapters,
        "delete",
        remote.cmd_adapters_delete,
        "delete one of your adapters (every version, or one: NAME/vN)",
        "ddft adapters delete my-text/v2 --key $DDFT_API_KEY",
        config=None,
    )
    rm.add_argument("name", metavar="NAME[/vN]", help="the adapter, or one version of it")
    add_server_options(rm)

    recipe = command(
        sub,
        "recipe",
        remote.cmd_recipe,
        "ask a server for the recipe of a cooking video",
        "ddft recipe clip.mp4\nddft recipe --uri datasets/raw/clips/one.mp4 --url http://127.0.0.1:8000 --json",
        "Prints the ingredients as a table, numbered steps, the adapter that answered and the "
        "timings; --json prints the server's JSON as it is.",
        config=None,
    )
    recipe.add_argument("video", metavar="VIDEO", nargs="?", help="a local video file (uploaded)")
    recipe.add_argument("--uri", help="instead of VIDEO: a video already in the server's store (key or URI)")
    recipe.add_argument("--adapter", help="ask a named adapter, e.g. ddft/video/v1 or one of yours")
    recipe.add_argument("--json", action="store_true", help="print the raw JSON answer")
    add_server_options(recipe)

    tenants = group(
        sub,
        "tenants",
        "tenants and their API keys (the admin key)",
        "  ddft tenants add acme --admin-key $DDFT_ADMIN_KEY",
    )
    add = command(
        tenants,
        "add",
        remote.cmd_tenants_add,
        "add a tenant; prints its new API key, once",
        "KEY=$(ddft tenants add acme --url http://127.0.0.1:8000 --admin-key $DDFT_ADMIN_KEY)",
        "Only the key goes to stdout (the note goes to stderr), so a script can capture it.",
        config=None,
    )
    add.add_argument("name", metavar="NAME", help="the tenant's name, e.g. acme")
    add_server_options(add, "admin")
    tl = command(tenants, "list", remote.cmd_tenants_list, "list the tenants", "ddft tenants list", config=None)
    add_server_options(tl, "admin")
    tr = command(
        tenants,
        "remove",
        remote.cmd_tenants_remove,
        "remove a tenant; its key stops working",
        "ddft tenants remove acme",
        config=None,
    )
    tr.add_argument("name", metavar="NAME")
    add_server_options(tr, "admin")
    return ap


def _adapters_list(args) -> int:
    if args.config and (args.url or args.key):
        raise CliError(USAGE, "give --config (the store's registry) or --url/--key (yours on a server), not both")
    if args.config:
        return pipeline.cmd_adapters_list_store(args)
    if not (args.key or os.environ.get(KEY_ENV)):
        raise CliError(
            USAGE,
            f"list which adapters? --config FILE: every one in the store; --key KEY (or {KEY_ENV}): "
            "your own on the server at --url",
        )
    return remote.cmd_adapters_list_server(args)


def _explain(err: BaseException, args) -> tuple[int, str]:
    """(exit code, one line) for a failure; anything unforeseen is re-raised."""
    import requests

    from ddft import client
    from ddft.config import ConfigError
    from ddft.errors import DdftError, Unavailable
    from ddft.store import StoreError

    if isinstance(err, CliError):
        return err.code, str(err)
    if isinstance(err, ConfigError):  # every problem on its own line (a plan that does not fit: its lines)
        return USAGE, "\n".join([f"{err.source}:", *err.problems])
    if isinstance(err, client.ClientError):
        where = err.url.split("?")[0]
        if 400 <= err.status < 500:
            hint = {
                401: "; check --key/--admin-key or DDFT_API_KEY/DDFT_ADMIN_KEY",
                403: "; check which key this needs (tenant or admin)",
            }.get(err.status, "")
            return REFUSED, f"the server refused it: {err.error} (HTTP {err.status}): {one_line(err.detail)}{hint}"
        return FAILED, f"the server failed: {err.error} (HTTP {err.status} from {where}): {one_line(err.detail)}"
    if isinstance(err, requests.ConnectionError):
        url = getattr(args, "resolved_url", None) or getattr(getattr(err, "request", None), "url", "the server")
        bodies = getattr(args, "upload_bodies", None)
        if bodies and bodies[0].sent:
            return FAILED, (
                f"the connection to {url} broke during the upload ({bodies[0].sent} bytes sent); "
                "the server may have refused its size (serve.max_adapter_mb) or restarted; retry"
            )
        return UNREACHABLE, (
            f"cannot reach the server at {url}: is it running (ddft serve --config ...)? Fix --url or DDFT_URL"
        )
    if isinstance(err, requests.Timeout):
        return FAILED, f"the server did not answer in time ({one_line(err)[:200]}); retry, or ask for less"
    if isinstance(err, StoreError):
        return FAILED, f"store: {one_line(err)}"
    if isinstance(err, DdftError):  # the library's typed errors: a refusal, or "try later"
        return (FAILED if isinstance(err, Unavailable) else REFUSED), f"{err.code}: {one_line(err.detail)}"
    if isinstance(err, OSError) and getattr(err, "filename", None):
        return USAGE, f"{err.strerror or err}: {err.filename}"
    raise err


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)  # usage errors: argparse prints them and exits 2
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    name = "ddft " + " ".join(x for x in (args.command, getattr(args, "sub", None)) if x)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 — every failure becomes one line and an exit code
        try:
            code, line = _explain(err, args)
        except Exception:
            if os.environ.get("DDFT_DEBUG"):
                raise
            code, line = (
                FAILED,
                (f"unexpected {type(err).__name__}: {one_line(err)[:500]} (DDFT_DEBUG=1 shows the traceback)"),
            )
        print(f"{name}: {line}", file=sys.stderr)
        return code
