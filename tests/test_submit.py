"""Remote submission: a real Ray head (`ray start --head` on 127.0.0.1, token auth on) with a worker
node joined, a spec submitted with Ray Jobs, its runs landing in a real `mlflow server`."""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import free_port
from orchestrator import load_spec
from orchestrator.jobs import job_client, submit_spec
from orchestrator.training import EMBEDDED_RAY_ENV

# `cluster`: starts its own Ray head + worker node and an MLflow server (`make test-cluster` runs only
# these). Runs in `make test` too: each node gets its own dashboard-agent port (both nodes share
# 127.0.0.1, and Ray's default 52365 is also taken by any other local Ray, the test session's own
# included: the head's job agent then never served, "No available agent to submit job").
pytestmark = [pytest.mark.slow, pytest.mark.cluster]
VENV_BIN = Path(sys.executable).parent


def wait_http(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers (401 without the token): it is up
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(1)
    raise TimeoutError(url)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A head and one worker node on 127.0.0.1, token authentication on, our venv first on PATH;
    one for the module (a start costs 15-40 s on 2 loaded cores)."""
    tmp_path = tmp_path_factory.mktemp("ray_cluster")
    token = secrets.token_hex(16)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    env.pop(EMBEDDED_RAY_ENV, None)  # a cluster has its dashboard: Ray Train keeps its PlacementGroupCleaner
    gcs_port, dash_port = free_port(), free_port()
    ray = str(VENV_BIN / "ray")
    temp_dir = Path("/tmp") / f"avtray{secrets.token_hex(3)}"  # short: socket paths have a length limit
    # Two logical CPUs per node, so that each node can run a 1-CPU Train worker beside the other node's.
    head = [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", "--include-dashboard=true",
            f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
            "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    # The worker node gets its own temp dir (named with the head's as a prefix, for the teardown):
    # sharing the head's, the two nodes' runtime-env agents share one working_dir cache on this one
    # machine, and the job's driver on the head lost its cwd (the job's working_dir) mid-run.
    worker = [ray, "start", f"--address=127.0.0.1:{gcs_port}", "--node-ip-address=127.0.0.1",
              f"--dashboard-agent-listen-port={free_port()}", "--num-cpus=2", f"--temp-dir={temp_dir}w",
              "--disable-usage-stats"]
    groups: set[int] = set()
    try:
        for cmd in (head, worker):
            # Its own session: the daemons `ray start` leaves behind keep its process group, so the
            # teardown finds every one of them (not all name the temp dir in their command line).
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            groups.add(proc.pid)
            out, _ = proc.communicate(timeout=180)
            assert proc.returncode == 0, out[-4000:]
        wait_http(f"http://127.0.0.1:{dash_port}/api/version", 90)
        yield {"address": f"http://127.0.0.1:{dash_port}", "token": token, "env": env, "temp_dir": temp_dir}
    finally:
        # Not `ray stop`: it would stop every Ray on the machine, the test session's own included.
        kill_cluster(str(temp_dir), groups)
        for node, folder in (("head", temp_dir), ("worker", Path(f"{temp_dir}w"))):
            # Kept with the test's files for a post-mortem (dashboard_agent.log, job-driver-*.log, ...).
            logs = folder / "session_latest" / "logs"
            if logs.is_dir():
                shutil.copytree(logs, tmp_path / "ray-logs" / node, dirs_exist_ok=True, ignore_dangling_symlinks=True)
            shutil.rmtree(folder, ignore_errors=True)


def processes() -> dict[int, tuple[str, int, int]]:
    """pid -> (command line, parent pid, process group) for every process we can read."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        table[int(entry.name)] = (cmdline, int(fields[1]), int(fields[2]))
    return table


def kill_cluster(temp_dir: str, groups: set[int]) -> None:
    """SIGKILL this cluster's processes: the process groups of our `ray start` calls (GCS, raylets,
    dashboard, ray client server, ...), the processes that name its temp dir, and every descendant
    of those (agents, workers, actors, job drivers, which make their own groups)."""
    spared = {os.getpid(), os.getppid()}
    own_group = os.getpgrp()  # never this test session's own group (e.g. a shell line naming the dir)
    for _ in range(3):
        table = processes()
        chosen = {pid for pid, (cmd, _, pgid) in table.items()
                  if pgid in groups or (temp_dir in cmd and pgid != own_group)} - spared
        while True:
            children = {pid for pid, (_, ppid, _) in table.items() if ppid in chosen} - chosen - spared
            if not children:
                break
            chosen |= children
        for pid in chosen:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        if not chosen:
            return
        time.sleep(1)


def test_submit_runs_a_sweep_on_the_cluster_into_the_tracking_server(ray_cluster, session_mlflow_server, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_cluster["token"])
    tracking_uri = session_mlflow_server.uri
    spec = load_spec({
        "name": "remote",
        "data": {"synth": {"classes": 3, "clips_per_class": 6, "clip_seconds": 0.5, "height": 32, "width": 32},
                 "decode": {"num_frames": 2, "frame_height": 32, "frame_width": 32, "clip_seconds": 0.5}},
        "model": {"width": 8},
        "method": {"name": "ogm_ge", "alpha": 0.5, "modulation_ends": 2},
        "train": {"epochs": 2, "global_batch_size": 4, "optimizer": "adam", "learning_rate": 0.001},
        "storage": {"runs_dir": str(tmp_path / "cluster-runs")},
        "search": {"space": {"method.alpha": {"grid": [0.8]}}},
    })
    address = ray_cluster["address"]
    job_id = submit_spec(spec, address, tracking_uri=tracking_uri)
    client = job_client(address)
    deadline = time.monotonic() + 240
    status = None
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job_id))
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(3)
    logs = client.get_job_logs(job_id)
    (tmp_path / "job.log").write_text(logs)
    errors = [line for line in logs.splitlines() if "Error" in line or "error" in line][-20:]
    assert status == "SUCCEEDED", f"{status}; full log in {tmp_path / 'job.log'}\n" + "\n".join(errors) + logs[-3000:]
    # The job's driver joined this cluster (RAY_ADDRESS set by Ray Jobs), it did not start a Ray of its own.
    assert "Connecting to existing Ray cluster" in logs, logs[-4000:]

    tracking = MlflowClient(tracking_uri)
    exp = tracking.get_experiment_by_name("remote")
    runs = tracking.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("avtune.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 1 and all(c.info.status == "FINISHED" for c in children)
    for child in children:
        assert sorted(m.step for m in tracking.get_metric_history(child.info.run_id, "acc_visual")) == [0, 1]

    # The CLI's jobs commands talk to the same cluster with the token.
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "jobs", "status", job_id, "--address", address],
                         capture_output=True, text=True, env={**os.environ, "RAY_AUTH_TOKEN": ray_cluster["token"]})
    assert "SUCCEEDED" in out.stdout, out.stdout + out.stderr


def test_submit_without_the_token_is_refused(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 32)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token to fall back on
    with pytest.raises(Exception) as info:
        job_client(ray_cluster["address"]).list_jobs()
    assert "401" in str(info.value) or "403" in str(info.value) or "auth" in str(info.value).lower()
