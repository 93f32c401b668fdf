"""The demo's cluster needs nothing in the user's home: started as `make cluster-up` starts it, with
HOME a new folder that holds only the machine's pip settings, it runs with token authentication on
and its own token, takes a `ray job submit`, and stops (`make cluster-down`) without touching ~/.ray."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster_fixture import fresh_home
from tests.test_demo_report import load_demo

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def _run(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_demo_cluster_starts_takes_a_job_and_stops_with_a_new_users_home(tmp_path):
    demo = load_demo()
    home = fresh_home(tmp_path)
    # none of this session's cluster settings: the demo brings its own
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(home)}
    ray = str(Path(sys.executable).with_name("ray"))
    up = _run([sys.executable, "jobs/demo.py", "--cluster", "up"], env, timeout=180)
    try:
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        token = demo.RAY_TEMP / "auth_token"
        assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) >= 32
        # A client without the token is refused: auth is on.
        refused = _run([ray, "job", "list", "--address", demo.DASHBOARD], env | {"RAY_AUTH_MODE": "token"}, 120)
        assert refused.returncode != 0, refused.stdout[-2000:]
        # With the cluster's token (what the demo gives `ray job submit`), a job runs on it.
        client = demo._env() | {"HOME": str(home)}
        code = "import ray; ray.init(); print('cpus', int(ray.cluster_resources()['CPU']))"
        job = _run([ray, "job", "submit", "--address", demo.DASHBOARD, "--", "python", "-c", code], client, 300)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "cpus 4" in job.stdout, job.stdout[-3000:]
    finally:
        down = _run([sys.executable, "jobs/demo.py", "--cluster", "down"], env, timeout=120)
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
    assert not (home / ".ray").exists()
