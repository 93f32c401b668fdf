"""What every `ddft` subcommand shares: exit codes, one-line errors, the server URL and keys."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# Exit codes scripts can trust (the top-level --help lists them).
OK, FAILED, USAGE, REFUSED, UNREACHABLE = 0, 1, 2, 3, 4
EXIT_CODES = f"""exit codes:
  {OK}  ok
  {FAILED}  the work failed (a job failed, the server answered 5xx)
  {USAGE}  usage or config error (bad arguments, an invalid config: the key is named)
  {REFUSED}  the server refused the request (4xx; the message has its error code and detail)
  {UNREACHABLE}  cannot reach the server or the Ray cluster"""

URL_ENV, KEY_ENV, ADMIN_ENV = "DDFT_URL", "DDFT_API_KEY", "DDFT_ADMIN_KEY"
DEFAULT_URL = "http://127.0.0.1:8000"
REPO = Path(__file__).resolve().parents[3]  # platform/ddft/cli/ -> the checkout (jobs/, serve/)


class CliError(Exception):
    """A failure the command explains in one line (what was wrong, how to fix it) with an exit code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def load_config(path: str, part: str = "train"):
    """The validated config of one part of the loop ("train": data, jobs; "serve": the serve app; "pipeline":
    both, serve's defaults where the file has no serve part), from a file that may hold both; an invalid one
    is a usage error (2) naming every key."""
    from ddft import config

    model = {"serve": config.ServeConfig, "pipeline": config.PipelineConfig}.get(part, config.TrainConfig)
    try:
        return config.load(path, model)  # before any Ray
    except config.ConfigError as err:
        raise CliError(
            USAGE,
            f"invalid config {err.source}: "
            + "; ".join(one_line(p) for p in err.problems)
            + " (fix the keys named; jobs/configs/demo.yaml is a working example)",
        ) from None


def server_url(args) -> str:
    url = (getattr(args, "url", None) or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise CliError(USAGE, f"--url {url!r}: give the server's base URL, e.g. {DEFAULT_URL} (or set {URL_ENV})")
    args.resolved_url = url
    return url


def tenant_key(args, required: bool = True) -> str | None:
    key = getattr(args, "key", None) or os.environ.get(KEY_ENV)
    if required and not key:
        raise CliError(
            USAGE,
            f"this needs a tenant's API key: pass --key KEY or set {KEY_ENV} "
            "(an admin makes one with: ddft tenants add NAME)",
        )
    return key


def admin_key(args) -> str:
    key = getattr(args, "admin_key", None) or os.environ.get(ADMIN_ENV)
    if not key:
        raise CliError(
            USAGE,
            f"tenant management needs the admin key: pass --admin-key KEY or set {ADMIN_ENV} "
            "(the key the server was started with, in its DDFT_ADMIN_KEY)",
        )
    return key


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples keep their line breaks; options show their defaults where given."""


def add_server_options(p: argparse.ArgumentParser, key: str | None = "tenant") -> None:
    p.add_argument("--url", help=f"the ddft server (default: ${URL_ENV} or {DEFAULT_URL})")
    if key == "tenant":
        p.add_argument("--key", help=f"a tenant's API key (default: ${KEY_ENV}); never printed")
    elif key == "admin":
        p.add_argument("--admin-key", help=f"the admin key (default: ${ADMIN_ENV}); never printed")
