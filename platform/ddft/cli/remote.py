"""The commands that talk to a running ddft server over HTTP: recipes, tenant adapters, tenants.
Keys come from --key/--admin-key or the environment and are never printed (except the new key of
`tenants add`, once)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ddft import client
from ddft.cli.common import OK, USAGE, CliError, admin_key, server_url, tenant_key
from ddft.cli.progress import Progress

# -- recipes -------------------------------------------------------------------------------------


def cmd_recipe(args) -> int:
    url = server_url(args)
    key = tenant_key(args, required=False)
    if (args.video is None) == (args.uri is None):
        raise CliError(USAGE, "give a VIDEO file or --uri STORE_URI (one of them), e.g. ddft recipe clip.mp4")
    if args.video is not None:
        path = Path(args.video)
        if not path.is_file():
            raise CliError(
                USAGE,
                f"no video file {str(path)!r}; give a path to a cooking video (.mp4), or "
                "--uri for one in the server's store",
            )
        with Progress(f"uploading {path.name}", args.quiet, "generating the recipe") as progress:
            out = client.post_recipe_file(
                url, path.read_bytes(), api_key=key, adapter=args.adapter, progress=progress.update
            )
    else:
        with Progress("recipe", args.quiet) as progress:
            progress.wait("generating the recipe")
            out = client.post_recipe(url, video_uri=args.uri, api_key=key, adapter=args.adapter)
    print(json.dumps(out, indent=2) if args.json else render_recipe(out, args.video or args.uri))
    return OK


def _amount(ing: dict) -> str:
    from ddft.recipes import format_quantity

    q = ing.get("quantity")
    return format_quantity(q) if isinstance(q, (int, float)) and q else ""


def render_recipe(recipe: dict, source: str) -> str:
    """The recipe for a terminal: who answered, an ingredients table, numbered steps, timings."""
    lines = [
        f"Recipe for {source}",
        f"  adapter {recipe.get('adapter') or '(none: the base)'} on base {recipe.get('base', '?')}",
        "",
    ]
    ingredients, steps = recipe.get("ingredients") or [], recipe.get("steps") or []
    if ingredients:
        rows = [("amount", "unit", "ingredient")] + [
            (_amount(i), i.get("unit") or "", i.get("name", "")) for i in ingredients
        ]
        widths = [max(len(r[c]) for r in rows) for c in range(2)]
        lines.append("Ingredients")
        for n, row in enumerate(rows):
            lines.append(f"  {row[0]:>{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]}".rstrip())
            if n == 0:
                lines.append(f"  {'-' * widths[0]}  {'-' * widths[1]}  {'-' * max(10, len(row[2]))}")
        lines.append("")
    if steps:
        lines.append("Steps")
        lines += [f"  {n:>2}. {step}" for n, step in enumerate(steps, 1)]
        lines.append("")
    if not ingredients and not steps:
        lines += [
            "(no ingredients or steps could be read from the answer; its text:)",
            *("  " + line for line in (recipe.get("text") or "").splitlines() or [""]),
            "",
        ]
    t = recipe.get("timings") or {}
    parts = [f"{k.removesuffix('_s')} {t[k]:.2f} s" for k in ("decode_s", "generate_s", "total_s") if k in t]
    parts += [f"{t['new_tokens']} new tokens"] if "new_tokens" in t else []
    parts += [f"batch of {t['batch_size']}"] if "batch_size" in t else []
    lines.append("Timings: " + (", ".join(parts) or "none reported"))
    return "\n".join(lines)


# -- adapters on the server ------------------------------------------------------------------------


def cmd_adapters_list_server(args) -> int:
    url, key = server_url(args), tenant_key(args)
    mine = client.adapters(url, api_key=key)
    if not mine:
        print("no adapters yet; upload one with: ddft adapters upload NAME FOLDER --modality text", file=sys.stderr)
    for a in mine:
        print(f"{a['adapter']:32} {a['modality']:6} rank={a['rank']} source={a['source']} created={a['created_at']}")
    return OK


def cmd_adapters_upload(args) -> int:
    url, key = server_url(args), tenant_key(args)
    path = Path(args.path)
    if path.is_dir():
        files = client.adapter_files(path)
        missing = [f for f in client.REQUIRED if f not in files]
        if missing and not any(f.lower().endswith(client.PICKLE_SUFFIXES) for f in files):
            raise CliError(
                USAGE,
                f"folder {str(path)!r} has no {missing}: give a PEFT LoRA folder "
                "(model.save_pretrained(dir)) or a .tar/.tar.gz/.zip of one",
            )
    elif not path.is_file():
        raise CliError(USAGE, f"no folder or archive {str(path)!r}: give a PEFT LoRA folder or a .tar/.tar.gz/.zip")
    elif client.archive_type(path) is None:
        raise CliError(USAGE, f"{str(path)!r} is not a folder or a .tar/.tar.gz/.tgz/.zip archive")
    bodies: list = []
    args.upload_bodies = bodies  # how far it got, if the connection breaks
    with Progress(f"uploading {path.name}", args.quiet, "validating on the server") as progress:
        out = client.upload_adapter_path(
            url, args.name, path, args.modality, api_key=key, progress=progress.update, body_out=bodies
        )
    print(
        f"uploaded {out['adapter']} ({out['modality']}, rank {out['rank']}); use it as adapter "
        f"{out['name']!r} or model {out['model']!r}"
    )
    return OK


def cmd_adapters_delete(args) -> int:
    url, key = server_url(args), tenant_key(args)
    for ref in client.delete_adapter(url, args.name, api_key=key):
        print(f"deleted {ref}")
    return OK


# -- tenants (admin key) -------------------------------------------------------------------------


def cmd_tenants_add(args) -> int:
    url, key = server_url(args), admin_key(args)
    new_key = client.add_tenant(url, args.name, admin_key=key)
    print(
        f"tenant {args.name!r} created; its API key follows, shown this once: store it now "
        "(use it as --key or in DDFT_API_KEY)",
        file=sys.stderr,
    )
    print(new_key)
    return OK


def cmd_tenants_list(args) -> int:
    url, key = server_url(args), admin_key(args)
    names = client.list_tenants(url, admin_key=key)
    if not names:
        print("no tenants yet; add one with: ddft tenants add NAME", file=sys.stderr)
    for name in names:
        print(name)
    return OK


def cmd_tenants_remove(args) -> int:
    url, key = server_url(args), admin_key(args)
    print(f"removed tenant {client.remove_tenant(url, args.name, admin_key=key)!r} (its key no longer works)")
    return OK
