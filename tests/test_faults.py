"""Fault tolerance on real parts: local Ray Train / Tune, MLflow (SQLite or a real `mlflow server`).

Each test injects faults a long run meets in practice (a worker killed mid-epoch and then the
tracking server going away, a damaged file on disk; a trial that raises is in tests/test_sweep.py's CMA
sweep) and checks what the user sees
afterwards in MLflow and on disk. Deadlines are generous: the machine is shared; no timing asserts.
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import re
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import sqlite_store, fit_on_one_thread, write_hostile_checkpoint
from orchestrator import load_spec, run_training
from orchestrator.synth import synthesize_dataset
from orchestrator.training import TrainingResult, log_final_artifacts
from workers.cache import ClipCache, decode_entry
from workers.datasets import AVClipDataset, DecodeParams
from workers.train_loop import CHECKPOINT_FILE

pytestmark = pytest.mark.slow

EPOCHS = 6


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out.get(key, {}), value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.fixture(scope="module")
def busy_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """36 training clips; with `busy_spec`'s model an epoch takes ~0.7 s on one core (1-2 s in the busy
    suite), long enough to land a fault inside the run and to keep training while a server is down."""
    root = tmp_path_factory.mktemp("busy") / "avtune"
    synthesize_dataset(root, layout="avtune", classes=3, clips_per_class=16, clip_seconds=1.0, fps=8,
                       height=32, width=32, sample_rate_hz=16000, seed=3)
    return root


@pytest.fixture()
def busy_spec(busy_dataset, tmp_path) -> dict:
    return {
        "name": "faults",
        "data": {"source": "dataset", "layout": "avtune", "root": str(busy_dataset),
                 "cache_dir": str(tmp_path / "cache"),
                 "decode": {"num_frames": 8, "frame_height": 64, "frame_width": 64, "clip_seconds": 1.0}},
        "model": {"width": 32},
        "train": {"epochs": EPOCHS, "global_batch_size": 8, "optimizer": "adam", "learning_rate": 0.001, "max_failures": 2},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "storage": {"runs_dir": str(tmp_path / "runs")},
    }


# ---- helpers -------------------------------------------------------------------------------


class Background:
    """`fn()` in a daemon thread; `join()` returns its result or re-raises its exception."""

    def __init__(self, fn: Callable[[], Any]):
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._result = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            self._error = err

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout: float) -> None:
        """Join without raising: cleanup after a failed assertion, so no run outlives its test."""
        self._thread.join(timeout)

    def join(self, timeout: float) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"still running after {timeout} s"
        if self._error is not None:
            raise self._error
        return self._result


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])  # fields after "(comm)": state, ppid, ...


def descends_from_us(pid: int) -> bool:
    """Only this test process's own Ray: other jobs on the machine may run Ray workers too."""
    me = os.getpid()
    try:
        while pid > 1:
            pid = parent_pid(pid)
            if pid == me:
                return True
    except (OSError, ValueError, IndexError):
        return False
    return False


def our_ray_processes(title: str) -> set[int]:
    """Pids of this session's Ray processes whose title (Ray sets it as the cmdline) starts with `title`."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith(title) and descends_from_us(int(entry.name)):
            found.add(int(entry.name))
    return found


def find_run_id(client: MlflowClient, experiment: str) -> str | None:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id])
    return runs[0].info.run_id if runs else None


def logged_steps(client: MlflowClient, run_id: str, key: str = "acc") -> Counter:
    """How many times each epoch was logged for `key` (MLflow keeps every logged value)."""
    return Counter(m.step for m in client.get_metric_history(run_id, key))


class CheckpointWatch:
    """Names of every checkpoint folder Ray Train writes under `runs_dir` (each report writes one;
    `num_to_keep` deletes old ones, so they are collected while the run goes on)."""

    def __init__(self, runs_dir: Path):
        self.pattern_root = runs_dir / "ray"
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            self.seen |= {p.name for p in self.pattern_root.glob("*/checkpoint_*") if p.is_dir()}

    def stop(self) -> set[str]:
        self._stop.set()
        self._thread.join(5)
        return set(self.seen)


# ---- 1. a Ray Train worker SIGKILLed mid-epoch, then the tracking server gone for the rest of the run ----


# Longer than two of the logger's 5 s per-report deadlines; the server stays down until every
# remaining epoch has run, so the whole rest of the run happens during the outage.
OUTAGE_SECONDS = 12


def test_worker_killed_then_tracking_outage_loses_no_epoch_and_resumes_exactly(ray_local, busy_spec, mlflow_server):
    """Two faults of one long run, one after the other (one Ray Train run pays for both): a worker
    SIGKILLed mid-epoch (Ray Train restarts the worker group from the last checkpoint), then the
    tracking server down from there to the end of training (the controller's logger queues and retries).
    Every epoch ends up in MLflow exactly once, and the numbers are those of an undisturbed run."""
    spec = load_spec(merge(busy_spec, {"train": {"epochs": EPOCHS}, "tracking": {"tracking_uri": mlflow_server.uri}}))
    runs_dir = Path(busy_spec["storage"]["runs_dir"])
    client = MlflowClient(mlflow_server.uri)
    # The undisturbed reference run trains meanwhile in a forked process on the other core.
    reference = multiprocessing.get_context("fork").Pool(1)
    undisturbed = reference.apply_async(fit_on_one_thread, (busy_spec,))
    older_workers = our_ray_processes("ray::RayTrainWorker")  # e.g. of a run still shutting down
    watch = CheckpointWatch(runs_dir)
    training = Background(lambda: run_training(spec))

    def an_epoch_logged():
        run_id = find_run_id(client, "faults")
        return run_id if run_id and len(logged_steps(client, run_id)) >= 1 else None

    try:
        # Killed once epoch 0 is in MLflow (its checkpoint registered): on a busy machine a few more epochs
        # may pass before the kill lands, and at least two must be left for the outage.
        run_id = wait_for(an_epoch_logged, 240, "epoch 0 in MLflow")
        (victim,) = wait_for(lambda: our_ray_processes("ray::RayTrainWorker") - older_workers, 30,
                             "the Ray Train worker", 0.1)
        os.kill(victim, signal.SIGKILL)
        before_kill = logged_steps(client, run_id)
        assert max(before_kill) < EPOCHS - 2, "the run ended before both faults could land"
        # Ray Train notices the dead worker and starts a new worker group from the last checkpoint.
        wait_for(lambda: our_ray_processes("ray::RayTrainWorker") - older_workers - {victim}, 120,
                 "a restarted worker", 0.2)
        before_outage = set(watch.seen)
        mlflow_server.stop()
        down_at = time.monotonic()
        # Training goes on while the server is down: every remaining epoch's checkpoint gets written.
        # (At least OUTAGE_SECONDS; longer only if the machine is slow, to let the run reach its end.)
        time.sleep(OUTAGE_SECONDS)
        give_up = time.monotonic() + 60
        while len(watch.seen) < EPOCHS and time.monotonic() < give_up:
            time.sleep(0.5)
        during_outage = set(watch.seen) - before_outage
        mlflow_server.start()
        outage = time.monotonic() - down_at
    finally:
        training.wait(300)
        reference.close()

    result: TrainingResult = training.join(300)
    checkpoints_written = watch.stop()
    assert len(watch.seen) >= EPOCHS and len(during_outage) >= 2, \
        f"{len(during_outage)} epochs ran during a {outage:.0f} s outage, {len(watch.seen)} in all"
    assert result.run_id == run_id and client.get_run(run_id).info.status == "FINISHED"
    # Restarted from the last checkpoint, not from scratch (which would write >= 2 + EPOCHS): only
    # the interrupted epoch, or one whose checkpoint was not yet registered, may have run twice.
    assert EPOCHS <= len(checkpoints_written) <= EPOCHS + 1
    for key in ("acc", "loss", "loss_train", "epoch"):
        assert logged_steps(client, run_id, key) == Counter(range(EPOCHS)), key
    assert list(result.history.index) == list(range(EPOCHS))
    assert "checkpoints/final_model.pt" in {a.path for a in client.list_artifacts(run_id, "checkpoints")}
    # The loop writes state.pt under a temporary name and renames it: no half-written file is ever
    # inside a checkpoint Ray registered.
    ckpts = [p for p in (runs_dir / "ray").glob("*/checkpoint_*") if p.is_dir()]
    assert ckpts and all((c / CHECKPOINT_FILE).is_file() for c in ckpts)
    assert not list((runs_dir / "ray").rglob("*.partial"))

    # Resumed from the checkpoint with model, optimiser and RNG state: the same numbers as a run
    # that was never interrupted.
    undisturbed, _ = undisturbed.get(timeout=300)
    reference.join()
    assert [int(h["epoch"]) for h in undisturbed] == list(result.history.index)
    for key in ("loss_train", "loss", "acc"):
        assert result.history[key].tolist() == pytest.approx([h[key] for h in undisturbed], rel=1e-4), key


# ---- 2. a trial that raises inside a sweep: tests/test_sweep.py (the CMA sweep's broken-clip trial) ----


# ---- 3. half-written or hostile files on disk ---------------------------------------------


def test_hostile_pickle_checkpoint_is_refused(tmp_path):
    state_file = tmp_path / "ckpt" / CHECKPOINT_FILE
    state_file.parent.mkdir()
    marker = tmp_path / "code-ran"
    write_hostile_checkpoint(state_file, marker)
    client = MlflowClient(sqlite_store(tmp_path / "m.db"))
    with pytest.raises(pickle.UnpicklingError, match="mkdir"):
        log_final_artifacts(client, "no-run-needed", str(state_file.parent))
    assert not marker.exists()
    # The payload is live: a plain unpickler runs it. weights_only is what stopped it above.
    torch.load(state_file, weights_only=False)
    assert marker.is_dir()


def test_partial_checkpoint_file_is_never_loaded(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    # A complete, loadable state, but under the name the loop writes *before* its rename.
    torch.save({"model": {}, "epoch": 0, "num_classes": 2, "class_names": ["a", "b"],
                "best": {"state": None}}, ckpt / (CHECKPOINT_FILE + ".partial"))
    client = MlflowClient(sqlite_store(tmp_path / "m.db"))
    with pytest.raises(FileNotFoundError, match=re.escape(f"{ckpt / CHECKPOINT_FILE}'")):
        log_final_artifacts(client, "no-run-needed", str(ckpt))


def test_cache_temp_file_of_a_killed_writer_is_ignored_and_the_entry_rebuilt(synth_dataset, tmp_path):
    params = DecodeParams(num_frames=3, frame_height=32, frame_width=32)
    cache = tmp_path / "cache"
    ds = AVClipDataset(synth_dataset, "avtune", "val", params, cache_dir=cache)
    reference = ds[0]
    clip_cache = ClipCache(cache, params)
    entry = clip_cache.entry_path(clip_cache.key(ds.records[0].video_path, ds.records[0].audio_path))
    data = entry.read_bytes()
    # What a writer killed mid-write leaves: the first half under its temporary name, no entry.
    entry.unlink()
    stale = entry.parent / f".{entry.name}.killed.tmp"
    stale.write_bytes(data[: len(data) // 2])
    fresh = AVClipDataset(synth_dataset, "avtune", "val", params, cache_dir=cache)
    rebuilt = fresh[0]
    for a, b in zip(rebuilt, reference):
        torch.testing.assert_close(a, b)
    assert entry.is_file() and decode_entry(bytearray(entry.read_bytes()))[1]["frames"].shape == (3, 32, 32, 3)
