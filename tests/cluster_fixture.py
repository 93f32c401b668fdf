"""A Ray cluster of two nodes on this machine for the multi-node tests: a head and a worker started
with `ray start`, each with its own temp dir, resources and labels, on loopback addresses.

Why 127.0.0.3 and 127.0.0.2 and not 127.0.0.1: once a second node may join
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1, which `ray start` needs for a worker node), Ray rewrites
"127.0.0.1" and "localhost" to the machine's external address. Other 127/8 addresses are kept, and
they are loopback too: no packet leaves the machine. Each node having its own address also tells
Ray which raylet a process belongs to.

The pytest process never joins the cluster (it may hold the session's local cluster): everything on
it runs in subprocess drivers, as `ray job submit` would run them on the head. Token authentication
is on, with the cluster's own token in its root folder (ddft.cluster.token_env), never ~/.ray.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from ddft.cluster import free_port, pids_of, stop_cluster_at, use_token

REPO = Path(__file__).resolve().parents[1]
HEAD_IP, WORKER_IP = "127.0.0.3", "127.0.0.2"
HEAD_RESOURCE = "ddft-head"  # only the head has it: the gateway is pinned there


@dataclass
class TwoNodes:
    root: Path
    port: int = field(default_factory=free_port)
    cpus: int = 2
    worker_dirs: list[Path] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{HEAD_IP}:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            **os.environ,
            "RAY_ADDRESS": self.address,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            # a lost node is declared dead in ~3 s, not Ray's default ~30
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
            "PYTHONPATH": str(REPO),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            **extra,
        }
        return use_token(env, self.root)

    def _ray_start(self, args: list[str], temp_dir: Path, **env: str) -> None:
        temp_dir.mkdir(parents=True, exist_ok=True)
        common = ["--num-cpus", str(self.cpus), "--object-store-memory", str(300 * 2**20), "--temp-dir", str(temp_dir)]
        cmd = [str(Path(sys.executable).parent / "ray"), "start", *args, *common, "--disable-usage-stats"]
        out = subprocess.run(cmd, env=self.env(**env), capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"

    def start_head(self) -> None:
        self._ray_start(
            ["--head", "--node-ip-address", HEAD_IP, "--port", str(self.port), "--include-dashboard", "false"]
            + ["--resources", json.dumps({HEAD_RESOURCE: 1}), "--labels", "ddft-node=head"],
            self.root / "head",
        )

    def start_worker(self) -> None:
        """A worker node (again, after a loss: a new temp dir, as a replaced pod would have)."""
        temp = self.root / f"worker{len(self.worker_dirs)}"
        self.worker_dirs.append(temp)
        self._ray_start(
            ["--address", self.address, "--node-ip-address", WORKER_IP, "--labels", "ddft-node=worker"],
            temp,
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1",
        )

    def kill_worker(self) -> int:
        """SIGKILL the worker node's raylet (the node is lost: its workers and replicas die with it)."""
        (pid,) = pids_of(f"--temp_dir={self.worker_dirs[-1]}", "raylet")
        os.kill(pid, signal.SIGKILL)
        return pid

    def python(self, code: str, timeout: float = 300, **env: str) -> dict:
        """Run a driver on the cluster (as `ray job submit` runs one on the head); its last stdout
        line is JSON."""
        out = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    def entrypoint(self, script: str, config: Path, timeout: float) -> subprocess.CompletedProcess:
        """jobs/<script> --config <config> as `ray job submit` runs it, on the head; it must succeed."""
        out = subprocess.run(
            [sys.executable, str(REPO / "jobs" / script), "--config", str(config)],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out

    def nodes(self) -> dict[str, list[str]]:
        """{"head": [id], "worker": [ids of live worker nodes]}"""
        return self.python(
            """
            import json, ray
            ray.init(logging_level="ERROR")
            out = {"head": [], "worker": []}
            for n in ray.nodes():
                if n["Alive"]:
                    out[n["Labels"]["ddft-node"]].append(n["NodeID"])
            print(json.dumps(out))
            """
        )

    def stop(self) -> None:
        """Every process of both nodes (by temp dir: `ray stop` would stop every cluster on the machine)."""
        for temp in [self.root / "head", *self.worker_dirs]:
            stop_cluster_at(temp, grace_s=0)
        shutil.rmtree(self.root, ignore_errors=True)


def wait_until(what: str, check, timeout: float, every: float = 1.0):
    """check()'s first truthy value within `timeout` seconds, else an AssertionError naming `what`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := check():
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f}s")


def fresh_home(root: Path) -> Path:
    """A home folder as a new user's: only the machine's own pip settings (~/.config/pip names the
    local package mirrors), no ~/.ray, no caches."""
    home = root / "home"
    home.mkdir(parents=True)
    pip = Path.home() / ".config" / "pip"
    if pip.is_dir():
        shutil.copytree(pip, home / ".config" / "pip")
    return home


def two_nodes():
    """A started two-node cluster (a generator for a fixture: stopped after)."""
    cluster = TwoNodes(Path(tempfile.mkdtemp(prefix="ddft-ray-", dir="/tmp")))  # short: socket paths
    try:
        cluster.start_head()
        cluster.start_worker()
        yield cluster
    finally:
        cluster.stop()
