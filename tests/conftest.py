"""Shared fixtures: small generated datasets of real PyAV-encoded clips (session-scoped), a local Ray,
and real `mlflow server` processes on 127.0.0.1."""
from __future__ import annotations

import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from workers.layouts import LAYOUTS
from orchestrator.sqlite_store import prepare_sqlite_store
from orchestrator.synth import synthesize_dataset


def sqlite_store(path: Path) -> str:
    """The URI of a SQLite tracking store at `path`, a new one made from the migrated template as avtune
    makes its own (`orchestrator.sqlite_store`): MLflow's migrations cost seconds per new store."""
    uri = f"sqlite:///{path}"
    prepare_sqlite_store(uri)
    return uri

# One place for the small-set parameters, so tests can compute expectations from them.
SMALL_SET = dict(
    classes=3,
    clips_per_class=8,
    clip_seconds=1.0,
    fps=8,
    height=32,
    width=32,
    sample_rate_hz=16000,
    audio_informative=0.9,
    visual_informative=0.6,
    seed=0,
)


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a generated ``avtune``-layout dataset: 3 classes x 8 clips of 1 s, 32x32, 8 fps.

    Splits per class: 6 train / 1 val / 1 test. Read-only for tests: copy it before modifying.
    """
    root = tmp_path_factory.mktemp("synth") / "avtune"
    synthesize_dataset(root, layout="avtune", **SMALL_SET)
    return root


@pytest.fixture(scope="session")
def synth_layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small generated dataset per layout (3 classes x 4 clips, 0.5 s, 32x32): layout -> root."""
    base = tmp_path_factory.mktemp("layouts")
    roots = {}
    for layout in LAYOUTS:
        roots[layout] = base / layout
        synthesize_dataset(
            roots[layout], layout=layout, classes=3, clips_per_class=4, clip_seconds=0.5, fps=8,
            height=32, width=32, sample_rate_hz=16000, seed=1,
        )
    return roots


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session, as avtune starts its own (token auth as Ray sets it by default);
    shut down at the end."""
    import ray

    from orchestrator.training import start_local_ray

    if not ray.is_initialized():
        start_local_ray(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_local) -> str:
    """The session's local Ray as a subprocess reaches it (`RAY_ADDRESS`; the token is Ray's default file,
    ~/.ray/auth_token): a CLI or script under test joins it instead of paying for a Ray of its own."""
    return ray_local.get_runtime_context().gcs_address


# Ports handed out for servers a test starts itself, chosen below the kernel's ephemeral range
# (32768-60999 here) and above Ray's worker ports (10002-19999): a port picked from the ephemeral range
# and released can be taken, before our server binds it, by any process binding port 0, e.g. Ray's own
# gRPC servers starting in the same cluster (seen: the dashboard agent failing with "address already
# in use", then "No available agent" for every job submission).
_PORT_RANGE = (20000, 32000)


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port nothing listens on now, on any address, outside the ephemeral range, and never one this
    process handed out before: several are chosen before anything binds them (a `ray start` got the same
    port for its GCS and its dashboard once, and refused to start)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(*_PORT_RANGE)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port in {_PORT_RANGE}")


def wait_for_health(proc: subprocess.Popen, url: str, output=lambda: "", seconds: float = 180,
                    what: str = "server") -> None:
    """Until the server `proc` started answers `url`/health with 200; fails (showing `output()`) if `proc` ends
    first or `seconds` pass."""
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, output()
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            pytest.fail(f"{what}: no /health within {seconds:.0f} s\n" + output())
        time.sleep(0.5)


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (its own process group), restartable on the same port
    and the same SQLite + artifact stores."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 120) -> None:
        self.starts += 1
        log_file = self.folder / f"server-{self.starts}.log"
        # No background job runner (huey workers for GenAI jobs): nothing here uses it.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(log_file, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                 "--backend-store-uri", sqlite_store(self.folder / "m.db"), "--serve-artifacts",
                 "--artifacts-destination", str(self.folder / "art"), "--workers", "1"],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
        wait_for_health(self.proc, self.uri, lambda: log_file.read_text()[-3000:], timeout,
                        f"mlflow server on port {self.port}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # The server and its uvicorn worker share the session we started it in.
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def serve(folder: Path):
    """A started MlflowServer in `folder`, stopped when the fixture that yields from this ends."""
    server = MlflowServer(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def mlflow_server(tmp_path):
    """A fresh tracking server for one test (stop()/start() it to simulate an outage)."""
    yield from serve(tmp_path)


@pytest.fixture(scope="session")
def session_mlflow_server(tmp_path_factory):
    """One tracking server for the whole session (the shared sweep and the cluster test log into it)."""
    yield from serve(tmp_path_factory.mktemp("session_mlflow_server"))


@pytest.fixture(scope="session")
def avid_checkpoint(synth_dataset, tmp_path_factory) -> str:
    """An avtune checkpoint file of a 1-epoch AVID run in-process (model, memory banks, Z), with the
    settings tests/test_engine.py gives AVID: where CMA starts (official two-stage schedule)."""
    import io

    from workers.engine import fit
    from workers.specs import load_spec

    folder = tmp_path_factory.mktemp("avid")
    states = []
    fit(load_spec({
        "data": {"source": "dataset", "root": str(synth_dataset), "cache_dir": str(folder / "cache"),
                 "decode": {"num_frames": 2, "frame_height": 32, "frame_width": 32, "clip_seconds": 0.5}},
        "model": {"width": 8},
        "method": {"name": "avid", "config": "Cross-N64", "probe_epochs": 20, "embedding_dim": 16},
        "train": {"epochs": 1, "global_batch_size": 8, "optimizer": "adam", "learning_rate": 0.001},
    }), report=lambda metrics, state: states.append(state))
    buffer = io.BytesIO()
    torch.save(states[-1], buffer)
    (folder / "checkpoint.pt").write_bytes(buffer.getvalue())
    return str(folder / "checkpoint.pt")


SHARED_SWEEP = "shared"


@pytest.fixture(scope="session")
def shared_sweep(ray_local, synth_dataset, session_mlflow_server, tmp_path_factory):
    """One real sweep shared by the sweep, report and MLflow-UI tests: Ray Tune trials, each a Ray Train
    run, logged over HTTP to a real `mlflow server`. It compares normal, OGM-GE, G-Blend (so its offline
    estimation stage runs first: audio-only, visual-only and joint trials) and both uni-modal baselines,
    2 epochs each. Returns (SweepResult, its folder)."""
    from orchestrator import load_spec
    from orchestrator.sweep import run_sweep

    tmp = tmp_path_factory.mktemp("shared_sweep")
    spec = load_spec({
        "name": SHARED_SWEEP,
        "data": {"source": "dataset", "root": str(synth_dataset), "cache_dir": str(tmp / "cache"),
                 "decode": {"num_frames": 2, "frame_height": 32, "frame_width": 32, "clip_seconds": 0.5}},
        "model": {"width": 8},
        "method": {"name": "gblend", "mode": "offline", "weights": "estimate", "estimate_epochs": 1,
                   "estimate_window_epochs": 1},
        "train": {"epochs": 2, "global_batch_size": 8, "optimizer": "adam", "learning_rate": 0.001},
        "tracking": {"tracking_uri": session_mlflow_server.uri},
        "storage": {"runs_dir": str(tmp / "runs")},
        "search": {"compare": ["normal", "ogm_ge", "gblend", "audio_only", "visual_only"],
                   "space": {"method.alpha": {"grid": [0.5]}, "method.modulation_ends": {"grid": [2]}},
                   "max_concurrent_trials": 2},
    })
    return run_sweep(spec), tmp


class RunsCode:
    """Unpickling this calls os.mkdir(path): stands in for any code a hostile pickle would run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (str(self.path),))


def write_hostile_checkpoint(path: Path, marker: Path) -> None:
    torch.save({"model": {}, "epoch": 0, "payload": RunsCode(marker)}, path)


# What Ray, Ray Train and Tune print on their own; none of it may reach the console without --verbose.
RAY_LINES = ("Reporting training result", "Checkpoint successfully created", "(TrainController", "(RayTrainWorker",
             "Failed to query Ray Train Controller", "PreemptionWatcher", "Started a local Ray instance")


def on_a_terminal(command: list[str], cwd: Path, timeout: float = 600, env: dict[str, str] | None = None) -> SimpleNamespace:
    """Run `command` under a pseudo-terminal; its exit code and what the terminal showed, escape codes removed."""
    typescript = cwd / "typescript.txt"
    env = {**os.environ, "COLUMNS": "160", "LINES": "60", "TERM": "xterm-256color", **(env or {})}
    done = subprocess.run(["script", "-qec", shlex.join(command), str(typescript)], cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", typescript.read_text(errors="replace"))
    return SimpleNamespace(exit_code=done.returncode, output=shown)


def fit_on_one_thread(spec_data: dict) -> tuple[list[dict[str, float]], dict]:
    """`workers.engine.fit` on one thread, as a Ray Train worker with one CPU runs it, for a forked
    process (`multiprocessing.get_context("fork")`): (per-epoch history, the last epoch's checkpoint state:
    its per-clip "predictions" and packed "probabilities", what a Train run logs as artifacts)."""
    from workers.specs import load_spec
    from workers.engine import fit

    torch.set_num_threads(1)
    states = []
    history = fit(load_spec(spec_data), report=lambda metrics, state: states.append(state))
    return history, {key: states[-1][key] for key in ("predictions", "probabilities")}


def reads_shared_sweep(item) -> bool:
    return "shared_sweep" in getattr(item, "fixturenames", ())


# Fixtures that train or start a cluster once for all their readers: under pytest-xdist each worker
# would build its own copy (a module- or session-scoped fixture lives per worker process), so their
# readers are kept on one worker. Measured: `cli_run` (a 2-worker DDP run, ~30 s) ran on both workers.
ONE_WORKER_FIXTURES = ("shared_sweep", "cli_run", "ray_cluster")


def one_worker_group(item) -> str | None:
    return next((name for name in ONE_WORKER_FIXTURES if name in getattr(item, "fixturenames", ())), None)


def pytest_collection_modifyitems(items):
    # Longest first: the shared sweep's readers (one xdist group), then the other Ray and server tests,
    # then the in-process ones, which fill in at the end while the other worker finishes its last long test.
    items.sort(key=lambda item: 0 if reads_shared_sweep(item) else 1 if item.get_closest_marker("slow") else 2)


# The first reader of one of those fixtures pays for building it (the shared sweep: 8 Ray Train runs,
# about 190 s on a busy worker) inside its own time limit.
SHARED_FIXTURE_TIMEOUT_S = 900


def pytest_itemcollected(item):
    # Under pytest-xdist (`--dist loadgroup`, as `make test` runs): every reader of one of those fixtures
    # goes to one worker, so it is built once. Marked as each test is collected, before xdist's own
    # collection hook turns the group marks into scheduling groups.
    group = one_worker_group(item)
    if group is not None:
        item.add_marker(pytest.mark.xdist_group(group))
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SHARED_FIXTURE_TIMEOUT_S))
