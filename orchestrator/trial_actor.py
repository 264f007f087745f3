"""What a Tune trial actor of a sweep does besides running its trial: receive its Train controller's handle and
abort that Train run when Tune stops or reuses the actor (the mixin `AbortTrainOnStop`, `orchestrator.sweep`).

Kept light (ray only): the trial actor's class includes the mixin, so every process that unpickles the trial
actor's handle imports this module. The Train controller does (`ControllerHandle` carries the handle), and when
the mixin lived in `orchestrator.sweep` that import pulled torch, the workers and MLflow into every controller:
~2.6 CPU-s per Train run (measured with a controller-start probe, RAY_TRAIN_CALLBACKS).
"""
from __future__ import annotations

import threading
from typing import Any

import ray

# ---- stopping a trial's Train run ---------------------------------------------------------
#
# When a scheduler (ASHA) stops a trial, Tune calls the trainable's `cleanup()` and then ends the
# trial actor. The trial's Train controller is owned by that actor and dies with it, ungracefully,
# so its worker group's placement group outlives it (a placement group made by a non-detached actor
# lives until the driver's job ends). Ray Train's PlacementGroupCleaner would remove it, but it
# watches the controller through the State API, which needs the dashboard; without it the CPUs stay
# reserved and the next trial's worker group times out waiting for them. So the trial does what
# Ray Train's own Ctrl-C handler does, which Train cannot install off the main thread (as in Tune):
# `TrainController.abort()`, which aborts the worker group (removing its placement group) first.

# While a Train run runs in this trial actor: {"name": its run name} and, once its controller has started and
# called `AbortTrainOnStop.receive_train_controller`, {"controller": the controller's handle}.
TRAIN_RUN: dict[str, Any] = {}
STOPPED_BY_TUNE = threading.Event()
TRIAL_ENDED = threading.Event()  # this trial actor runs no trial function now
TRIAL_ENDED.set()


def abort_train_run(timeout_s: float = 60) -> None:
    """Abort this trial actor's Train run, if one is running (called from Tune's `cleanup()`)."""
    if "name" not in TRAIN_RUN:
        return
    STOPPED_BY_TUNE.set()
    controller = TRAIN_RUN.get("controller")
    if controller is None:
        return  # the controller has not started yet
    try:
        ray.get(controller.abort.remote(), timeout=timeout_s)
    except ray.exceptions.RayActorError:
        pass  # abort() ends with the controller's own exit_actor()
    except ray.exceptions.GetTimeoutError:
        pass  # the placement group then lives until the job ends (or Train's cleaner sees the controller die)


class AbortTrainOnStop:
    """Mixin for the Tune function trainable (Tune's `__mixins__` hook): abort the trial's Train
    run before Tune's own cleanup ends the trial actor."""

    def receive_train_controller(self, run_name: str, controller) -> None:
        # Called by the run's Train controller (`ControllerHandle`) as an actor task of this trial actor:
        # the trial actor itself is the mailbox, no queue actor (a process, ~1.5 CPU-s) per trial. Tune's
        # actor runs one task at a time, so this runs between two `train()` steps, before any stop() or
        # reset() Tune sends after a result. A late handle of an earlier trial's run (Tune reuses the actor)
        # names another run and is dropped.
        if TRAIN_RUN.get("name") == run_name:
            TRAIN_RUN["controller"] = controller

    def cleanup(self):
        try:
            abort_train_run()
        finally:
            super().cleanup()

    def reset_config(self, new_config):
        # Tune reuses a trial's actor for the next trial (`reuse_actors`, make_tuner) through reset(),
        # not stop(): a trial the scheduler stopped gets its Train run aborted here, and Tune's own
        # reset, which gives the old trial's thread 2 s to end, runs once it has.
        abort_train_run()
        TRIAL_ENDED.wait(timeout=120)
        return super().reset_config(new_config)


def sweep_trial(config: dict[str, Any], base_spec: dict[str, Any], parent_run_id: str, tracking_uri: str,
                sweep_name: str, stage: str, members: dict[str, dict[str, Any]] | None = None) -> None:
    """Tune function trainable: one Ray Train run per trial (`orchestrator.sweep.run_trial`), of one seed or of a
    group's `members` side by side (a configuration's seeds, the estimation stage's heads). Defined here, and
    the sweep imported only when a trial runs: Tune names the trial actor's class after this function's
    module, and whoever unpickles the actor's handle (the Train controller) imports that module."""
    from orchestrator.sweep import run_trial

    TRIAL_ENDED.clear()
    try:
        run_trial(config, base_spec, parent_run_id, tracking_uri, sweep_name, stage, members)
    finally:
        TRIAL_ENDED.set()
