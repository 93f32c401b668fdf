"""Connect to (or start) a Ray cluster that stays on 127.0.0.1, and always shut down after."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

LOCAL_IP = "127.0.0.1"
TOKEN_FILE = "auth_token"


# -- token authentication, kept on, with nothing read from or written to the user's home -----------
# Ray's default token lives in ~/.ray/auth_token: `ray start` with RAY_AUTH_MODE=token needs one there
# and never makes it, and a local ray.init() writes one there. A cluster ddft starts keeps its own
# token beside it instead, and its clients are pointed at that file.


def token_env(folder: str | Path) -> dict[str, str]:
    """The environment for starting or joining a cluster whose token is `folder/auth_token`: made
    (random, mode 0600) when missing, kept when present (a running cluster's clients reuse it)."""
    path = Path(folder) / TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):  # another process made it first: theirs is the token
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:  # e.g. planted in a shared /tmp by another user
        raise PermissionError(
            f"the Ray token {path} is not this user's alone (owner uid {st.st_uid}, mode {oct(st.st_mode & 0o777)}); "
            "remove it (and stop the cluster it belongs to) so that a new one is made"
        )
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}


def use_token(env: dict, folder: str | Path) -> dict:
    """`env` set to use the token in `folder` (a token given inline would win over the file: dropped)."""
    env.pop("RAY_AUTH_TOKEN", None)
    env.update(token_env(folder))
    return env


def use_token_here(folder: str | Path) -> None:
    """This process (and what it starts) uses the token in `folder` from now on. Ray reads the mode and
    the token once, when it is imported: told again here, as ray.init does when it turns token auth on."""
    use_token(os.environ, folder)
    if "ray" in sys.modules:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


@functools.cache
def _process_token_dir() -> str:
    """One token per process for the clusters it starts with ray.init (Ray caches a process's token)."""
    folder = tempfile.mkdtemp(prefix="ddft-ray-token-")
    atexit.register(shutil.rmtree, folder, True)
    return folder


@contextlib.contextmanager
def ray_session(
    address: str | None = None,
    num_cpus: int | None = None,
    runtime_env: dict | None = None,
    metrics_export_port: int | None = None,
):
    """ray.init for the duration of a block: the given/RAY_ADDRESS cluster, else a local one."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env)
    else:  # a private cluster for this process; left alone Ray picks the external address
        # its own token (tests and subprocess drivers inherit the environment while it runs)
        use_token_here(_process_token_dir())
        # address="local": never attach to another cluster this machine happens to run
        # metrics_export_port: where Prometheus scrapes Ray's and ddft's Ray metrics on this node
        ray.init(
            address="local",
            _node_ip_address=LOCAL_IP,
            num_cpus=num_cpus,
            include_dashboard=False,
            runtime_env=runtime_env,
            _metrics_export_port=metrics_export_port,
        )
    try:
        yield ray
    finally:
        ray.shutdown()


# -- clusters started with `ray start`, stopped one at a time ----------------------------------------
# `ray stop` stops every Ray process on the machine: another user's cluster, a test session's, a
# driver connected to one (its core worker exits the process when its GCS is gone). A cluster
# started with its own `--temp-dir` is stopped by that temp dir instead: every daemon of it names
# the dir on its command line, and the workers die with their raylet.


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind((LOCAL_IP, 0))
        return s.getsockname()[1]


def pids_of(needle: str, name: str = "") -> list[int]:
    """Processes whose command line has `needle` (and, if given, whose program ends in `name`)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(needle.encode() in a for a in argv) and (not name or argv[0].decode(errors="ignore").endswith(name)):
            found.append(int(proc.name))
    return found


def stop_cluster_at(temp_dir: str | Path, grace_s: float = 10.0) -> int:
    """Stop the cluster whose nodes were started with `--temp-dir temp_dir` (SIGTERM, then SIGKILL
    what is left after `grace_s`), and no other; how many processes it stopped."""
    pids = pids_of(str(temp_dir))
    left = list(pids)
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while (left := [p for p in left if _alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not left:
            break
    return len(pids)


def _alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped by its parent, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
