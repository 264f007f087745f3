"""Ray Train callbacks of avtune's runs: the per-epoch MLflow logger, the controller handle sent to the trial and
the release of a worker group's placement group that Ray Train leaves behind.

Ray pickles a run's callbacks into the Train controller and into every Train worker, and unpickling a
callback imports its module. So this module imports nothing heavy at load: MLflow is imported when the
controller first logs, never by a worker (which would pay ~0.8 s for it at every start, measured in
`benchmarks/startup.py`), and nothing of the orchestrator (pandas, Tune, the report) is pulled in.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import ray
from ray.train import UserCallback
# Internal in Ray 2.60 (the public UserCallback does not run at controller start); pinned ray==2.60.0.
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

# Metrics reported by the loop that describe bookkeeping, not model quality, still go to MLflow;
# only `epoch` itself is the step, not a metric of its own.
STEP_KEY = "epoch"


@contextmanager
def single_try_requests(seconds: float) -> Iterator[None]:
    """MLflow HTTP requests made inside get one try and at most `seconds` (>= 1) to answer.

    MLflow's client retries a failed request itself with exponential backoff for about four
    minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES=7, 120 s timeout). Inside a Ray Train callback that
    blocks the controller's report loop, and the workers stall at their next report for the whole
    outage; the logger retries on its own schedule instead. MLflow reads both variables on every
    request, so the override ends with the block.
    """
    override = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(seconds)))}
    saved = {key: os.environ.get(key) for key in override}
    os.environ.update(override)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class MlflowEpochLogger(UserCallback):
    """Logs each epoch's report (rank 0's metrics) to an MLflow run, once.

    Runs on the Ray Train controller. Epochs already in the run (a resumed trial, a restarted
    driver) are skipped, so every epoch appears exactly once. When the tracking server is
    unreachable the metrics stay queued and are retried on the next report and at the end,
    so a tracking hiccup never aborts training.
    """

    def __init__(self, tracking_uri: str, run_id: str, retry_seconds: float = 120.0):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.retry_seconds = retry_seconds
        # (epoch, metrics, timestamp): the timestamp is fixed when queued, so a batch re-sent after
        # an ambiguous failure (a timeout after the server stored it) is identical and MLflow's
        # store skips it instead of adding a second value at the same step.
        self._pending: list[tuple[int, dict[str, float], int]] = []
        self._logged_epochs: set[int] | None = None

    def _client(self) -> MlflowClient:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def _load_logged_epochs(self, client: MlflowClient) -> set[int]:
        history = client.get_metric_history(self.run_id, STEP_KEY)
        return {int(m.value) for m in history}

    def _flush(self, deadline: float) -> bool:
        from mlflow.entities import Metric

        while self._pending:
            try:
                with single_try_requests(deadline - time.monotonic()):
                    client = self._client()
                    if self._logged_epochs is None:
                        self._logged_epochs = self._load_logged_epochs(client)
                    epoch, values, ts = self._pending[0]
                    if epoch not in self._logged_epochs:
                        metrics = [Metric(k, float(v), ts, epoch) for k, v in values.items()]
                        # `epoch` goes last so a partly failed batch is retried in full next time.
                        for i in range(0, len(metrics), 200):
                            client.log_batch(self.run_id, metrics=metrics[i : i + 200])
                        self._logged_epochs.add(epoch)
                self._pending.pop(0)
            except Exception:  # noqa: BLE001 - any tracking failure: keep the queue, retry later
                if time.monotonic() >= deadline:
                    return False
                time.sleep(2.0)
        return True

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        report = metrics[0] if metrics else {}
        if STEP_KEY not in report:
            return
        epoch = int(report[STEP_KEY])
        values = {k: v for k, v in report.items() if isinstance(v, (int, float)) and k != STEP_KEY}
        values[STEP_KEY] = epoch
        self._pending.append((epoch, values, int(time.time() * 1000)))
        # Short deadline while training: never stall the run for long on a tracking outage.
        self._flush(deadline=time.monotonic() + 5.0)

    def reconcile(self, history: list[dict[str, float]]) -> bool:
        """Driver side, after fit(): log whatever epochs of the run's history MLflow still lacks.

        The controller's copy of this callback may have given up during an outage; the final
        checkpoint carries the whole history, and epochs already in MLflow are skipped.
        """
        for metrics in history:
            self._pending.append((int(metrics[STEP_KEY]), dict(metrics), int(time.time() * 1000)))
        return self._flush(deadline=time.monotonic() + self.retry_seconds)


class GroupLogger(UserCallback):
    """Logs a group's reports (`workers.engine.fit_group`): each member's metrics, reported under its
    prefix (``seed-3/acc``), to that member's own MLflow run through its own `MlflowEpochLogger`, so every
    (configuration, seed) keeps one child run with each epoch once, as when it trained alone."""

    def __init__(self, loggers: dict[str, MlflowEpochLogger]):
        self.loggers = loggers

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        report = metrics[0] if metrics else {}
        for name, logger in self.loggers.items():
            prefix = f"{name}/"  # workers.engine.member_prefix (not imported: it would pull torch in here)
            own = {k[len(prefix):]: v for k, v in report.items() if k.startswith(prefix)}
            logger.after_report(run_context, [own], checkpoint)


class ControllerHandle(ControllerCallback):
    """Runs in the Train controller: sends its own actor handle to the Tune trial actor that started the run
    (its `receive_train_controller`, `orchestrator.trial_actor.AbortTrainOnStop`), for `abort()`."""

    def __init__(self, trial_actor, run_name: str):
        self.trial_actor = trial_actor
        self.run_name = run_name

    def after_controller_start(self, train_run_context) -> None:
        self.trial_actor.receive_train_controller.remote(self.run_name, ray.get_runtime_context().current_actor)


class ReleaseLeftPlacementGroups(ControllerCallback, WorkerGroupCallback):
    """Runs in the Train controller: when the run ends, removes every placement group its worker groups
    reserved that is still there.

    Ray Train 2.60 leaves one behind when a worker dies after its worker group is built but before the
    training function is launched on it (`WorkerGroup._start_impl`: the group already counts as started,
    so its partial state is not shut down, and `WorkerGroup.create` raises before the controller holds
    the group, so the controller's shutdown never reaches it). The run then fails, and the reserved CPUs
    stay taken until the job ends: every later Train run of a sweep on that Ray waits for them ("worker
    group startup timed out", for ever; measured with tools/ray_kill_stress.py). Ray Train's own
    PlacementGroupCleaner cannot step in: it asks the State API, which needs the dashboard the embedded
    Ray does not start, and with two local Rays on the machine it dies on "Found multiple active Ray
    instances".
    """

    def __init__(self):
        self._reserved: list = []  # the placement groups of this run's worker groups, in the controller

    def after_worker_group_start(self, worker_group) -> None:
        self._reserved.append(worker_group.get_worker_group_state().placement_group_handle.placement_group)

    def after_controller_finish(self, result) -> None:
        from ray.util.placement_group import placement_group_table, remove_placement_group

        for group in self._reserved:
            if placement_group_table(group).get("state") not in (None, "REMOVED"):
                remove_placement_group(group)
        self._reserved.clear()
