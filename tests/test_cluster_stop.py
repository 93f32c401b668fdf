"""Stopping a cluster started with `ray start --temp-dir` stops the processes of that temp dir and
no other (ddft.cluster.stop_cluster_at: `ray stop` would stop every Ray process on the machine)."""

from __future__ import annotations

import subprocess
import sys
import time

from ddft.cluster import pids_of, stop_cluster_at

# stands in for a Ray daemon: a process naming its cluster's temp dir on its command line,
# and one that ignores SIGTERM (it must get SIGKILL after the grace period)
DAEMON = "import signal, time; {}print('ready', flush=True); time.sleep(600)"


def _start(temp_dir, stubborn=False):
    code = DAEMON.format("signal.signal(signal.SIGTERM, signal.SIG_IGN); " if stubborn else "")
    proc = subprocess.Popen([sys.executable, "-c", code, f"--temp-dir={temp_dir}"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"  # its SIGTERM handler is in place
    return proc


def test_only_the_named_clusters_processes_stop(tmp_path):
    mine, other = tmp_path / "mine", tmp_path / "other"
    procs = [_start(mine), _start(f"{mine}/session_1/logs"), _start(mine, stubborn=True), _start(other)]
    try:
        assert sorted(pids_of(str(mine))) == sorted(p.pid for p in procs[:3])
        t = time.monotonic()
        assert stop_cluster_at(mine, grace_s=1) == 3
        assert time.monotonic() - t >= 1  # the stubborn one waited out its grace, then got SIGKILL
        for p in procs[:3]:
            assert p.wait(timeout=10) is not None
        assert procs[3].poll() is None and pids_of(str(other)) == [procs[3].pid]
        assert stop_cluster_at(tmp_path / "nothing") == 0
    finally:
        for p in procs:
            p.kill()
            p.wait()
