"""Sweeps: a spec with a `search` section -> Ray Tune trials, each a Ray Train run, in MLflow as
one parent run with a nested child run per trial.

Built the way Ray 2.60 (Train V2) documents Tune over Train: a Tune *function trainable* builds
the trial's `TorchTrainer` (stable name from the trial id, FailureConfig, TuneReportCallback so
every epoch reaches Tune's scheduler) and calls `fit()`. Scheduling, queueing, retries and
resume are Ray Tune's; tracking is MLflow's.
"""
from __future__ import annotations

import copy
import itertools
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import ray
from mlflow.entities import Metric, RunStatus
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from orchestrator.console import current_board
from orchestrator.folders import check_owned
from orchestrator.specs import SEARCH_METRICS, ExperimentSpec, SearchDimension, SpecError, validate_spec
from orchestrator.synth import CARD_FILE, made_by_generator
from orchestrator.train_callbacks import ControllerHandle, GroupLogger, MlflowEpochLogger
from orchestrator.trial_actor import STOPPED_BY_TUNE, TRAIN_RUN, AbortTrainOnStop, sweep_trial
from orchestrator.tracking import finish_run, log_summary_once, redact_text, redact_uri, reopen_run, resolve_tracking_uri
from orchestrator.training import (
    build_trainer,
    check_resources,
    config_label,
    connect_ray,
    ensure_data,
    fetch_final_checkpoint,
    finish_group,
    finish_train_run,
    resolve_start_point,
    run_name_for,
    start_mlflow_run,
)
from workers.engine import seed_member
from workers.methods import get_method, unimodal_methods

# The tags are orchestrator.runs' (avtune's one MLflow vocabulary); importable from here as before.
from orchestrator.runs import (
    CEILING_METRICS,
    CONFIG_TAG,
    MAIN_STAGE,
    PARENT_TAG,
    SEED_PARAM,
    STAGE_TAG,
    SWEEP_KIND_TAG,
    SWEEP_TAG,
    TRIAL_COLUMNS,
    TRIAL_TAG,
    child_runs,
    logged_params,
    csv_safe,
    trial_row,
    trials_frame,
)
# G-Blend estimation: each head of the blended model is trained alone as its own method.
GBLEND_HEADS = {**unimodal_methods(), "joint": "normal"}
GBLEND_STAGE = "gblend-estimate"


@dataclass
class SweepResult:
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    experiment_path: str
    result_grid: Any = field(repr=False)
    trials: pd.DataFrame = field(repr=False)
    gblend_weights: dict[str, float] | None = None


# ---- search space -------------------------------------------------------------------------


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    """Set `path` (`train.seed`) in `data`, copying each section on the way rather than changing it: the
    sections of a base spec are shared by every trial spec made from it (`trial_spec_data`)."""
    node = data
    parts = path.split(".")
    for p in parts[:-1]:
        child = node.get(p)
        node[p] = dict(child) if isinstance(child, dict) else {}
        node = node[p]
    node[parts[-1]] = value


def tune_domain(dim: SearchDimension):
    if dim.kind == "grid":
        return tune.grid_search(list(dim.grid))
    if dim.kind == "choice":
        return tune.choice(list(dim.choice))
    if dim.kind == "uniform":
        return tune.uniform(*dim.uniform)
    return tune.loguniform(*dim.loguniform)


def compare_methods(spec: ExperimentSpec, gblend_weights: dict[str, float] | None,
                    starts: dict[str, dict[str, str]] | None = None,
                    gblend_source: str = "estimation_stage") -> list[dict[str, Any]]:
    """The `compare` shorthand: one method section per compared method, each crossed with the grid over
    the `method.*` fields its section has (e.g. every searched alpha and window for OGM variants; a
    normal run has no alpha). A compared method of the spec's own section starts from its fields.
    Sections that need an estimation stage get the estimated weights, those that start from a stage's
    model (CMA from AVID) get its checkpoint (`starts`, by method name)."""
    search = spec.search
    method_dims = {p.split(".", 1)[1]: d for p, d in search.space.items() if p.startswith("method.")}
    for key, dim in method_dims.items():
        if dim.kind != "grid":
            raise SpecError(f"search.space.method.{key}: with search.compare, method fields must be grid dimensions")
    base = spec.method.model_dump(mode="json")
    methods: list[dict[str, Any]] = []
    for name in search.compare:
        cls = get_method(name)
        fields = cls.Section.model_fields
        start = {k: v for k, v in base.items() if get_method(base["name"]) is cls and k != "name"}
        keys = [k for k in method_dims if k in fields]
        for values in itertools.product(*(method_dims[k].grid for k in keys)):
            entry = {**start, **dict(zip(keys, values)), "name": name}
            if gblend_weights is not None and cls.needs_estimation(cls.Section.model_validate(entry)):
                entry.update(weights=gblend_weights, weights_source=gblend_source)
            if starts and name in starts and cls.start_stage(cls.Section.model_validate(entry)) is not None:
                entry.update(starts[name])
            methods.append(entry)
    # Deduplicate identical dicts (e.g. an OGM with no searched fields listed twice).
    unique = {json.dumps(m, sort_keys=True): m for m in methods}
    return list(unique.values())


def build_param_space(spec: ExperimentSpec, gblend_weights: dict[str, float] | None = None,
                      starts: dict[str, dict[str, str]] | None = None,
                      gblend_source: str = "estimation_stage") -> dict[str, Any]:
    """Tune's param space; `gblend_source` says where `gblend_weights` came from: "estimation_stage", or
    "estimation_fallback" (uniform, the stage found no window in which every head generalised)."""
    search = spec.search
    space: dict[str, Any] = {}
    if search.compare:
        space["method"] = tune.grid_search(compare_methods(spec, gblend_weights, starts, gblend_source))
        for path, dim in search.space.items():
            if not path.startswith("method."):
                space[path] = tune_domain(dim)
    else:
        for path, dim in search.space.items():
            space[path] = tune_domain(dim)
        if gblend_weights is not None:
            space["method.weights"] = gblend_weights
            space["method.weights_source"] = gblend_source
        if starts and spec.method.name in starts:
            space.update({f"method.{k}": v for k, v in starts[spec.method.name].items()})
    if search.seeds and not seed_group(spec):
        # Crossed with every configuration: Tune's grid is the product of its grid dimensions.
        space[SEED_PARAM] = tune.grid_search(list(search.seeds))
    return space


def seed_group(spec: ExperimentSpec) -> list[int] | None:
    """The seeds every main trial trains side by side (`search.group_seeds`), or None: one trial per seed."""
    if spec.search is None or not spec.search.group_seeds or len(spec.search.seeds) < 2:
        return None
    return list(spec.search.seeds)


def group_members(spec: ExperimentSpec, stage: str) -> dict[str, dict[str, Any]] | None:
    """What one trial of `stage` trains side by side in its Train run, as {member name: config overrides}: a
    main trial's seeds (`search.group_seeds`), the G-Blend estimation stage's three heads
    (`search.group_estimation`); None: the trial trains its one configuration."""
    seeds = seed_group(spec) if stage == MAIN_STAGE else None
    if seeds:
        return {seed_member(seed): {SEED_PARAM: seed} for seed in seeds}
    if stage == GBLEND_STAGE and spec.search is not None and spec.search.group_estimation:
        return {m: {"method": {"name": m}} for m in GBLEND_HEADS.values()}
    return None


def trial_spec_data(base: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The plain data of the trial spec `config` makes of `base`: only the sections on a configured path are
    copied, the rest is shared with `base` (never deep-copied: validating 10,000 combinations of a spec whose
    search lists 10,000 seeds copied 10,000 x 10,000 seeds). Read it, do not change it."""
    data = {**base, "search": None}
    for path, value in config.items():
        if path == "method":
            data["method"] = value
        else:
            set_path(data, path, value)
    return data


def check_search(spec: ExperimentSpec) -> None:
    """Every trial spec the search can produce validates and reports `search.metric` every epoch: each grid
    combination, each `choice` value and both bounds of a `uniform` / `loguniform` range (paths included: a
    typo'd field is refused here, not after data synthesis or inside a trial); one G-Blend estimation window.
    How many runs the search plans is capped before any of this (`SearchSpec.planned_runs`, at load)."""
    estimating = needs_gblend_estimation(spec)
    check_grid_combinations(spec, build_param_space(spec, {"audio": 1.0, "visual": 1.0, "joint": 1.0} if estimating else None))
    if estimating:
        estimation_epochs(spec)
    base = spec.model_dump(mode="json")
    problems = []
    for path, dim in spec.search.space.items():
        values = {"choice": dim.choice, "uniform": dim.uniform, "loguniform": dim.loguniform}.get(dim.kind) or []
        for value in values:
            problem = trial_problem(base, {path: value}, spec.search.metric, "(search value)")
            if problem:
                problems.append(f"{path}={value!r}: {problem}")
    if problems:
        raise SpecError("search.space has invalid values:\n  " + "\n  ".join(problems[:20]))


def trial_problem(base: dict[str, Any], config: dict[str, Any], metric: str, source: str) -> str | None:
    """What is wrong with the trial spec `config` makes of `base`: its validation error, or a method that
    never reports `metric` (Tune's scheduler and searcher end the whole sweep at the first result without
    it, after trials trained); None when it can run."""
    try:
        trial = validate_spec(trial_spec_data(base, config), source=source)
    except SpecError as err:
        return str(err).splitlines()[-1].strip()
    reported = get_method(trial.method.name).epoch_metrics(trial)
    if metric not in reported:
        return (f"search.metric {metric!r} is not reported by method {trial.method.name} (its epochs report "
                f"{', '.join(sorted(reported & set(SEARCH_METRICS)))}): rank by a metric every swept method reports")
    return None


def check_grid_combinations(spec: ExperimentSpec, param_space: dict[str, Any]) -> None:
    """Reject a grid whose combinations include invalid specs (e.g. ends <= starts), naming them. The seeds
    are not crossed in: a seed's validity is its range, which `search.seeds` checks itself (`train.seed`'s)."""
    base = spec.model_dump(mode="json")
    grids = {k: v["grid_search"] for k, v in param_space.items()
             if isinstance(v, dict) and "grid_search" in v and not (k == SEED_PARAM and spec.search.seeds)}
    fixed = {k: v for k, v in param_space.items() if not isinstance(v, dict) or "grid_search" not in v}
    fixed = {k: v for k, v in fixed.items() if not hasattr(v, "sample")}
    problems: dict[str, str] = {}
    for values in itertools.product(*grids.values()):
        config = {**fixed, **dict(zip(grids, values))}
        problem = trial_problem(base, config, spec.search.metric, "(search combination)")
        if problem:
            shown = {k: v for k, v in config.items() if k in grids}
            problems.setdefault(f"{json.dumps(shown, default=str) if shown else 'every trial'}: {problem}")
    if problems:
        raise SpecError("search.space has invalid combinations:\n  " + "\n  ".join(list(problems)[:20]))


# ---- the trial ----------------------------------------------------------------------------


def find_or_create_child(client: MlflowClient, spec: ExperimentSpec, parent_run_id: str, trial_id: str,
                         sweep_name: str, stage: str, searched: Iterable[str] = ()) -> str:
    """One child run per trial id and seed: a restarted trial or a resumed sweep continues the same run."""
    found = [run for run in child_runs(client, parent_run_id, trial_id=trial_id)
             if run.data.params.get(SEED_PARAM) == str(spec.train.seed)
             and run.data.params.get("method.name") == spec.method.name]  # the estimation group's heads share a seed
    if found:
        if found[0].info.status != "RUNNING":
            reopen_run(client, found[0].info.run_id)
        return found[0].info.run_id
    tags = {PARENT_TAG: parent_run_id, TRIAL_TAG: trial_id, SWEEP_TAG: sweep_name, STAGE_TAG: stage,
            # A stage's runs are their own configurations: grouped with the main ones they would skew their means.
            CONFIG_TAG: config_label(spec, searched) if stage == MAIN_STAGE else f"{stage}_{config_label(spec, searched)}"}
    # A stage's runs say so in their names: the estimation stage trains the same methods as the main one.
    run_name = run_name_for(spec) if stage == MAIN_STAGE else f"{stage}_{run_name_for(spec)}"
    _, run_id = start_mlflow_run(client, spec, tags=tags, run_name=run_name)
    return run_id


def run_trial(config: dict[str, Any], base_spec: dict[str, Any], parent_run_id: str, tracking_uri: str,
              sweep_name: str, stage: str, members: dict[str, dict[str, Any]] | None = None) -> None:
    """One trial: a Ray Train run of the trial's configuration or, with `members` ({name: config overrides}:
    its seeds, the estimation stage's heads), of every member side by side; each its own MLflow child run."""
    trial_id = tune.get_context().get_trial_id()
    spec = validate_spec(trial_spec_data(base_spec, config), source=f"trial {trial_id}")
    client = MlflowClient(tracking_uri=tracking_uri)
    group = {name: validate_spec(trial_spec_data(base_spec, {**config, **overrides}), source=f"trial {trial_id} {name}")
             for name, overrides in (members or {}).items()}
    specs = group or {"": spec}
    run_ids = {name: find_or_create_child(client, s, parent_run_id, trial_id, sweep_name, stage, searched=config)
               for name, s in specs.items()}
    loggers = {name: MlflowEpochLogger(tracking_uri, run_id) for name, run_id in run_ids.items()}
    logger = GroupLogger(loggers) if group else loggers[""]
    STOPPED_BY_TUNE.clear()  # a flag from an earlier trial in this actor (Tune's reuse_actors) is not ours
    run_name = f"{sweep_name}-{trial_id}"
    TRAIN_RUN.clear()
    TRAIN_RUN["name"] = run_name
    try:
        trial_actor = ray.get_runtime_context().current_actor
        trainer = build_trainer(spec, run_name, [logger, TuneReportCallback(), ControllerHandle(trial_actor, run_name)],
                                group=group or None)
        result = trainer.fit()
        TRAIN_RUN.clear()
        if group:
            finish_group(client, run_ids, loggers, result)
        else:
            finish_train_run(client, run_ids[""], logger, result)
    except BaseException as err:
        if STOPPED_BY_TUNE.is_set():
            return  # aborted on purpose; ChildRunStatus marks the runs KILLED on the driver
        for run_id in run_ids.values():
            if client.get_run(run_id).info.status == "RUNNING":
                finish_run(client, run_id, err)
        raise
    finally:
        TRAIN_RUN.clear()


class ChildRunStatus(tune.Callback):
    """Driver side: a trial the scheduler stopped (ASHA) or that errored is marked so in MLflow.

    A trial killed by ASHA never returns from `fit()`, so its own code cannot close its run.
    """

    def __init__(self, tracking_uri: str, parent_run_id: str):
        self.tracking_uri = tracking_uri
        self.parent_run_id = parent_run_id

    def _children(self, trial):
        """The trial's runs still RUNNING (one per seed of a seed group)."""
        client = MlflowClient(tracking_uri=self.tracking_uri)
        found = child_runs(client, self.parent_run_id, trial_id=trial.trial_id)
        return client, [run for run in found if run.info.status == "RUNNING"]

    def on_trial_complete(self, iteration, trials, trial, **info):
        client, runs = self._children(trial)
        for run in runs:
            client.set_tag(run.info.run_id, "avtune.stopped_by", "scheduler")
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))

    def on_trial_error(self, iteration, trials, trial, **info):
        client, runs = self._children(trial)
        for run in runs:
            finish_run(client, run.info.run_id, RuntimeError(str(trial.error_file or "trial error")))


class TrialProgress(tune.Callback):
    """Driver side: each trial's start, epochs and end, for the console's board (`orchestrator.console`).
    Holds only the base spec (Tune pickles callbacks with its experiment state); the board is looked up."""

    def __init__(self, base_spec: dict[str, Any], stage: str, seeds: list[int] | None = None,
                 label: str | None = None, tracking_uri: str | None = None, parent_run_id: str | None = None):
        self.base_spec = base_spec
        self.stage = stage
        self.seeds = seeds
        self.label = label  # a fixed label for every trial of the stage (the estimation group)
        self.tracking_uri = tracking_uri  # where the trial's end is read from: its MLflow runs
        self.parent_run_id = parent_run_id

    def _mlflow_end(self, trial) -> tuple[str, int] | None:
        """The trial's end as MLflow records it (ChildRunStatus, called before this callback, has closed the runs a
        scheduler stopped): STOPPED when a run of the trial is KILLED, else FINISHED, and the epochs its runs
        logged. None when MLflow cannot say (no runs found, tracking unreachable): the board's own count stands."""
        if self.tracking_uri is None or self.parent_run_id is None:
            return None
        try:
            runs = child_runs(MlflowClient(tracking_uri=self.tracking_uri), self.parent_run_id, trial_id=trial.trial_id)
        except Exception:  # noqa: BLE001 - the console only
            return None
        if not runs:
            return None
        stopped = any(run.info.status == "KILLED" for run in runs)
        epochs = max(int(run.data.metrics.get("epoch", -1)) + 1 for run in runs)
        return ("STOPPED" if stopped else "FINISHED"), epochs

    def _label(self, trial) -> tuple[str, int]:
        try:
            spec = validate_spec(trial_spec_data(self.base_spec, trial.config), source=f"trial {trial.trial_id}")
            label, epochs = run_name_for(spec), spec.train.epochs
            if self.seeds:  # a seed group: "normal_concat_s0-4", not the base seed's name
                label = label.rsplit("_s", 1)[0] + "_s" + seeds_label(self.seeds)
            label = self.label or label
        except SpecError:  # the trial itself reports it; the board still shows the trial
            label, epochs = trial.trial_id, int(self.base_spec["train"]["epochs"])
        return (label if self.stage == MAIN_STAGE else f"{self.stage}_{label}"), epochs

    def on_trial_start(self, iteration, trials, trial, **info):
        board = current_board()
        if board is not None:
            board.trial_started(trial.trial_id, *self._label(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        board = current_board()
        if board is not None:
            board.epoch_done(trial.trial_id, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        board = current_board()
        if board is not None:
            # A trial restored from a resumed sweep may end without a new report: its last result counts.
            board.epoch_done(trial.trial_id, trial.last_result or {})
            recorded = self._mlflow_end(trial)
            if recorded is not None:  # the console says what MLflow says
                status, epochs = recorded
                board.epochs_recorded(trial.trial_id, epochs)
            else:
                state = board.trials.get(trial.trial_id)
                status = "STOPPED" if state is not None and state.epoch < state.epochs else "FINISHED"
            board.trial_ended(trial.trial_id, status)

    def on_trial_error(self, iteration, trials, trial, **info):
        board = current_board()
        if board is not None:
            board.trial_ended(trial.trial_id, "FAILED", trial_error_text(trial))


def seeds_label(seeds: list[int]) -> str:
    """"0-4" for consecutive seeds, "0,2,7" otherwise."""
    ordered = sorted(seeds)
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]}-{ordered[-1]}"
    return ",".join(map(str, seeds))


def trial_error_text(trial) -> str:
    """The end of a failed trial's error (Tune's error file), for one line on the console."""
    try:
        return Path(trial.error_file).read_text()[-2000:] if trial.error_file else "trial error"
    except OSError:
        return "trial error (no error file)"


def count_trials(param_space: Any, samples: int) -> int:
    """Trials Tune's variant generator makes of `param_space`: `samples` x every grid's length."""
    def grids(node: Any) -> int:
        if isinstance(node, dict):
            if set(node) == {"grid_search"}:
                return len(node["grid_search"])
            count = 1
            for value in node.values():
                count *= grids(value)
            return count
        return 1

    return samples * grids(param_space)


# ---- the sweep ----------------------------------------------------------------------------


def sweep_ray_path(spec: ExperimentSpec, parent_run_id: str) -> Path:
    """Where Tune keeps the main stage of the sweep `parent_run_id` (its tuner.pkl, which a resume unpickles)."""
    return (Path(spec.storage.runs_dir) / "ray" / f"{spec.name}-{parent_run_id[:8]}").resolve()


def sweep_state_file(spec: ExperimentSpec) -> Path:
    return (Path(spec.storage.runs_dir) / "sweeps" / f"{spec.name}.json").resolve()


def make_trainable(spec: ExperimentSpec, parent_run_id: str, tracking_uri: str, name: str, stage: str):
    """The Tune function trainable with its fixed arguments and its own resources (`search.trial_cpus`, by
    default none, and `trial_memory_mb`: the trial's Train workers get `scaling.*`); the same for a new Tuner
    and for Tuner.restore."""
    fn = tune.with_parameters(sweep_trial, base_spec=spec.model_dump(mode="json"), parent_run_id=parent_run_id,
                              tracking_uri=tracking_uri, sweep_name=name, stage=stage,
                              members=group_members(spec, stage))
    fn.__mixins__ = (AbortTrainOnStop,)
    return tune.with_resources(fn, {"cpu": spec.search.trial_cpus, "memory": spec.search.trial_memory_mb * 2**20})


def make_tuner(spec: ExperimentSpec, param_space: dict[str, Any], name: str, parent_run_id: str,
               tracking_uri: str, stage: str, max_concurrent: int | None = None,
               scheduler_on: bool = True, label: str | None = None) -> tuple[tune.Tuner, str]:
    search = spec.search
    storage = str((Path(spec.storage.runs_dir) / "ray").resolve())
    trainable = make_trainable(spec, parent_run_id, tracking_uri, name, stage)
    search_alg = None
    # A stage (G-Blend's estimation, AVID before CMA) trains fixed configurations: no searcher and no scheduler,
    # which would also demand search.metric of heads that never report it (an audio-only head's acc_visual).
    if scheduler_on and search.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(metric=search.metric, mode=search.mode, seed=spec.train.seed)
    elif scheduler_on and search.searcher == "random":
        from ray.tune.search import BasicVariantGenerator

        search_alg = BasicVariantGenerator(random_state=spec.train.seed)
    scheduler = None
    if scheduler_on and search.scheduler == "asha":
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="training_iteration", metric=search.metric, mode=search.mode,
            max_t=spec.train.epochs, grace_period=search.asha_grace_epochs,
            reduction_factor=search.asha_reduction_factor,
            # A trial that reaches max_t (its last epoch) ends by itself: its fit() returns and its
            # final artifacts are logged; only rung decisions stop trials.
            stop_last_trials=False,
        )
    path = str(Path(storage) / name)
    samples = search.num_samples if stage == MAIN_STAGE else 1
    board = current_board()
    if board is not None:
        board.expect(count_trials(param_space, samples), spec.train.epochs, stage)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=search_alg, scheduler=scheduler,
            num_samples=samples,
            max_concurrent_trials=max_concurrent or search.max_concurrent_trials,
            # The next trial runs in the actor (and process) of one that ended: its imports (torch,
            # Ray Train, MLflow: ~5 CPU-s on 2 cores) are paid once per concurrent slot, not per trial.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=search.trial_max_failures),
            callbacks=[ChildRunStatus(tracking_uri, parent_run_id),
                       TrialProgress(spec.model_dump(mode="json"), stage, seed_group(spec) if stage == MAIN_STAGE else None,
                                     label, tracking_uri, parent_run_id)],
            verbose=0,
        ),
    )
    return tuner, path


# How the stage picks its measuring window (README "Implementation notes", G-Blend).
GBLEND_WINDOW_RULE = ("the latest N <= estimate_epochs at which every head's validation loss still falls over the "
                      "next estimate_window_epochs epochs; none: uniform weights (uniform_fallback), announced")


def run_gblend_estimation(spec: ExperimentSpec, client: MlflowClient, parent_run_id: str, tracking_uri: str,
                          name: str, max_concurrent: int | None) -> tuple[dict[str, float], str]:
    """G-Blend offline stage (Wang et al., Sec. 3.3): train the audio-only, visual-only and naive
    joint models for N+n epochs as parallel Tune trials, read each head's train/val loss per epoch from
    MLflow, and estimate the blend weights with the models' estimator on the window
    `models.choose_estimation_window` picks. Returns the weights and their source for the main trials
    ("estimation_stage", or "estimation_fallback" when no window lets every head generalise)."""
    from models import estimate_from_histories

    n_epochs, window = estimation_epochs(spec)
    # L^T_N: each model's loss on the training split at the end of epoch N (Sec. 3.2), not the running
    # mean of its mini-batch losses while it trained: the stage's runs measure it (loss_train_eval).
    base = spec.model_copy(update={"train": spec.train.model_copy(update={"epochs": n_epochs + window,
                                                                        "train_split_loss": True})})
    # One trial training the three heads side by side (`group_members`: one Ray Train start-up, not three),
    # or with `search.group_estimation: false` three parallel trials (faster where >= 3 worker slots are free).
    grouped = group_members(base, GBLEND_STAGE) is not None
    space = {} if grouped else {"method": tune.grid_search([{"name": m} for m in GBLEND_HEADS.values()])}
    label = f"{'+'.join(GBLEND_HEADS.values())}_{base.model.fusion}_s{base.train.seed}" if grouped else None
    tuner, _ = make_tuner(base, space, f"{name}-{GBLEND_STAGE}", parent_run_id, tracking_uri, GBLEND_STAGE,
                          max_concurrent, scheduler_on=False, label=label)
    grid = tuner.fit()
    errors = [r.error for r in grid if r.error is not None]
    if errors:
        raise RuntimeError(f"G-Blend estimation trials failed: {errors[0]}")
    runs = trials_frame(client, parent_run_id, stage=GBLEND_STAGE)
    histories = {}
    for head, method_name in GBLEND_HEADS.items():
        run_id = runs.loc[runs["method"] == method_name, "run_id"].iloc[0]
        hist = {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in ("loss_train_eval", "loss")}
        histories[head] = [(hist["loss_train_eval"][e], hist["loss"][e]) for e in range(n_epochs + window)]
    estimate = estimate_from_histories(histories, n_epochs, window)
    weights = estimate.weights
    ts = int(time.time() * 1000)
    # Metrics and a tag, not params: a stage re-run after a crash may measure another window.
    window_metrics = {"gblend_window_epochs": window}
    if estimate.start_epochs is not None:
        window_metrics["gblend_window_start_epochs"] = estimate.start_epochs
    client.log_batch(parent_run_id, metrics=[Metric(key, float(v), ts, 0) for key, v in
                                             [*((f"gblend_w_{h}", w) for h, w in weights.items()), *window_metrics.items()]])
    client.set_tag(parent_run_id, "avtune.gblend_weights", estimate.source)
    # What the weights came from, per head, so an odd blend can be traced to its losses.
    start = estimate.start_epochs or n_epochs
    table = {head: {"train_loss_N": rows[start - 1][0], "val_loss_N": rows[start - 1][1],
                    "train_loss_N+n": rows[start + window - 1][0], "val_loss_N+n": rows[start + window - 1][1],
                    "delta_G": estimate.deltas[head][0], "delta_O": estimate.deltas[head][1],
                    "weight": weights[head]} for head, rows in histories.items()}
    client.log_dict(parent_run_id, {"N": estimate.start_epochs, "N_requested": n_epochs, "n": window,
                                    "source": estimate.source, "rule": GBLEND_WINDOW_RULE, "train_loss": "loss_train_eval",
                                    "heads": table, "losses_by_epoch": histories}, "gblend_estimate.json")
    if estimate.source == "uniform_fallback":
        announce(client, parent_run_id, gblend_fallback_message(estimate, n_epochs))
        return weights, "estimation_fallback"
    if estimate.start_epochs != n_epochs:
        announce(client, parent_run_id, (
            f"G-Blend: measured on epochs {estimate.start_epochs} -> {estimate.start_epochs + window}, not "
            f"{n_epochs} -> {n_epochs + window}: there the validation loss of {stalled_losses(estimate)} no longer fell"))
    return weights, "estimation_stage"


def stalled_losses(estimate) -> str:
    """"joint 1.0130 -> 1.0420, ...": the heads whose validation loss did not fall over the requested window."""
    return ", ".join(f"{h} {a:.4f} -> {b:.4f}" for h, (a, b) in estimate.stalled.items())


def gblend_fallback_message(estimate, n_epochs: int) -> str:
    window = estimate.window_epochs
    return (f"G-Blend: no window of {window} epoch(s) starting at epoch 1..{n_epochs} in which every head's "
            f"validation loss fell (epochs {n_epochs} -> {n_epochs + window}: {stalled_losses(estimate)}); the main trials use "
            "uniform weights, 1/3 each (gblend_weights_source = uniform_fallback). An estimate needs heads that "
            "still generalise over the window: a lower learning rate, or more validation clips to measure it.")


def announce(client: MlflowClient, parent_run_id: str, message: str) -> None:
    """A warning the researcher must see before the main trials train: the console board, Python's
    warnings log and the sweep's parent run (tag `avtune.warning`)."""
    import warnings

    board = current_board()
    if board is not None:
        board.announce(message)
    warnings.warn(message, stacklevel=2)
    client.set_tag(parent_run_id, "avtune.warning", message)


def swept_sections(spec: ExperimentSpec) -> list[Any]:
    """The spec's method section and one per compared method (as `compare_methods` starts them)."""
    sections = [spec.method]
    for name in spec.search.compare:
        cls = get_method(name)
        sections.append(spec.method.model_copy(update={"name": name}) if get_method(spec.method.name) is cls
                        else cls.Section(name=name))
    return sections


def estimation_epochs(spec: ExperimentSpec) -> tuple[int, int]:
    """(N, n) of the G-Blend section that needs the estimation stage: the spec's own, or a compared one's
    with its searched values (`search.space` `method.estimate_epochs` ...). One stage per sweep."""
    entries = compare_methods(spec, None) if spec.search.compare else [spec.method.model_dump(mode="json")]
    found = set()
    for entry in entries:
        cls = get_method(entry["name"])
        section = cls.Section.model_validate(entry)
        if cls.needs_estimation(section):
            found.add((section.estimate_epochs, section.estimate_window_epochs))
    if len(found) > 1:
        raise SpecError(f"search.space: G-Blend sections with different estimation epochs {sorted(found)}; "
                        "a sweep runs one estimation stage")
    return found.pop() if found else (2, 2)


def needs_gblend_estimation(spec: ExperimentSpec) -> bool:
    """Whether the spec's method, or a compared one, needs the offline estimation stage."""
    return any(get_method(s.name).needs_estimation(s) for s in swept_sections(spec))


def run_start_stages(spec: ExperimentSpec, client: MlflowClient, parent_run_id: str, tracking_uri: str,
                     name: str, max_concurrent: int | None) -> dict[str, dict[str, str]]:
    """Train first what a swept method starts from (the AVID stage of AVID-CMA's two-stage schedule) as
    a Tune trial of this sweep; returns, per method name, the `init_from` / `init_source` it starts with."""
    starts: dict[str, dict[str, str]] = {}
    for section in swept_sections(spec):
        cls = get_method(section.name)
        stage = cls.start_stage(section)
        if stage is None or section.name in starts:
            continue
        epochs = cls.start_stage_epochs(section) or spec.train.epochs
        label = f"{stage['name']}-stage"
        base = spec.model_copy(update={"method": get_method(stage["name"]).Section.model_validate(stage),
                                       "train": spec.train.model_copy(update={"epochs": epochs})})
        tuner, _ = make_tuner(base, {"method": tune.grid_search([stage])}, f"{name}-{label}", parent_run_id,
                              tracking_uri, label, max_concurrent, scheduler_on=False)
        errors = [r.error for r in tuner.fit() if r.error is not None]
        if errors:
            raise RuntimeError(f"{label} failed: {errors[0]}")
        run_id = trials_frame(client, parent_run_id, stage=label)["run_id"].iloc[0]
        path = fetch_final_checkpoint(client, run_id, stage["name"], spec.storage.runs_dir)
        starts[section.name] = {"init_from": path, "init_source": f"{label}:{run_id}"}
    return starts


def write_state(path: Path, state: dict[str, Any]) -> None:
    """The sweep's resume file, replaced atomically: a crash never leaves half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(state))
    os.replace(partial, path)


def card_ceiling(card_path: Path) -> dict[str, float]:
    """The parent's ceiling metrics (`runs.CEILING_METRICS`) from a generator's card: its validation split's
    best achievable accuracy, joint (audio_visual), audio and visual; {} when the card has none."""
    try:
        best = json.loads(card_path.read_text())["best_achievable_accuracy"]["val"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    source = {"acc": "audio_visual", "acc_audio": "audio", "acc_visual": "visual"}
    return {name: float(best[source[metric]]) for metric, name in CEILING_METRICS.items()
            if isinstance(best, dict) and isinstance(best.get(source[metric]), (int, float))}


def log_ceiling(client: MlflowClient, parent_run_id: str, spec: ExperimentSpec) -> dict[str, float]:
    """On a sweep over generated clips, the report's ceiling reference: the card's best achievable validation
    accuracies as parent metrics (``ceiling_acc``, ``ceiling_acc_audio``, ``ceiling_acc_visual``; the card
    itself is on the parent already, as on every run `start_mlflow_run` opens). A real dataset has no
    ceiling: its report measures against the uni-modal ensemble only."""
    root = Path(spec.data.root) if spec.data.root else None
    if root is None or not (spec.data.source == "generated" or made_by_generator(root)):
        return {}
    ceiling = card_ceiling(root / CARD_FILE)
    log_summary_once(client, parent_run_id, ceiling)
    return ceiling


# Fields a resume may change: how many trials run at once is the machine's business, not the sweep's.
RESUME_MAY_CHANGE = ("search.max_concurrent_trials",)


def check_resumable(client: MlflowClient, spec: ExperimentSpec, parent_run_id: str, how: str) -> str:
    """The experiment id of the sweep `parent_run_id` if `spec` may resume it: a sweep's parent run, in the
    spec's experiment, not FINISHED, started from this same spec (its params; a resume file is keyed by the
    spec's name only, which two specs can share). A SpecError naming `how` (--resume / --resume-run) else."""
    uri = client.tracking_uri
    try:
        parent = client.get_run(parent_run_id)
    except Exception as err:  # noqa: BLE001 - MLflow's RestException / MlflowException
        raise SpecError(f"{how}: no run {parent_run_id} at {redact_uri(uri)} ({redact_text(str(err), uri)})") from None
    if parent.data.tags.get(SWEEP_KIND_TAG) != "sweep":
        raise SpecError(f"{how}: run {parent_run_id} is not a sweep's parent run")
    experiment = client.get_experiment(parent.info.experiment_id).name
    wanted = spec.tracking.experiment or spec.name
    if experiment != wanted:
        raise SpecError(f"{how}: run {parent_run_id} is a sweep of experiment {experiment!r}, not of this spec's "
                        f"{wanted!r}; only a spec's own sweep is resumed")
    if parent.info.status == "FINISHED":
        raise SpecError(f"{how}: sweep {parent_run_id} is FINISHED, nothing to resume (run `avtune sweep` without "
                        "--resume for a new sweep)")
    logged, expected = parent.data.params, {k: str(v)[:6000] for k, v in logged_params(spec).items()}
    differs = [key for key, value in expected.items() if key not in RESUME_MAY_CHANGE and logged.get(key) != value]
    if differs:
        shown = ", ".join(f"{k} ({logged.get(k)!r} then, {expected[k][:60]!r} now)" for k in differs[:5])
        raise SpecError(f"{how}: sweep {parent_run_id} was started from another spec: {shown}; resume it with the "
                        "spec it was started with")
    return parent.info.experiment_id


def run_sweep(spec: ExperimentSpec, address: str | None = None, max_concurrent: int | None = None,
              resume: bool | str = False) -> SweepResult:
    """Run (or, with `resume`, continue) the spec's search as Ray Tune trials tracked in MLflow.

    `resume=True` continues the sweep this spec's resume file names (written as soon as the parent run
    exists); `resume="<parent run id>"` continues that sweep."""
    if spec.search is None:
        raise SpecError("search: this spec has no search section; use `avtune train` for a single run")
    check_search(spec)  # before any data is generated or anything logged (a resume too: the spec may be edited)
    spec = ensure_data(spec)
    tracking_uri = resolve_tracking_uri(spec.tracking.tracking_uri, spec.storage.runs_dir)
    client = MlflowClient(tracking_uri=tracking_uri)
    spec = resolve_start_point(spec, client)
    state_file = sweep_state_file(spec)
    state: dict[str, Any] = {}
    if resume:
        saved = json.loads(state_file.read_text()) if state_file.exists() else {}
        if isinstance(resume, str):
            state = saved if saved.get("parent_run_id") == resume else {"parent_run_id": resume}
        elif not saved:
            raise FileNotFoundError(f"nothing to resume: no sweep named {spec.name!r} under {state_file.parent}")
        else:
            state = saved
        parent_run_id = state["parent_run_id"]
        # Only this spec's own interrupted sweep is reopened: never a finished one, or another experiment's.
        how = "--resume-run" if isinstance(resume, str) else "--resume"
        experiment_id = check_resumable(client, spec, parent_run_id, how)
        pickled = sweep_ray_path(spec, parent_run_id) / "tuner.pkl"
        if pickled.exists():
            check_owned(pickled, how)  # Tuner.restore unpickles it: only a file this user wrote
    connect_ray(address)
    check_resources(spec)  # connected, and before the parent run exists or is reopened
    if resume:
        reopen_run(client, parent_run_id)
    else:
        experiment_id, parent_run_id = start_mlflow_run(client, spec, tags={SWEEP_KIND_TAG: "sweep"},
                                                        run_name=f"sweep_{spec.name}")
        state = {"parent_run_id": parent_run_id}
    # Right away: a crash in a stage before the main trials must resume this sweep, not an older one.
    write_state(state_file, state)
    name = sweep_ray_path(spec, parent_run_id).name

    try:
        log_ceiling(client, parent_run_id, spec)  # before training: the data's limits do not depend on it
        weights = state.get("gblend_weights")
        if weights is None and needs_gblend_estimation(spec):
            weights, source = run_gblend_estimation(spec, client, parent_run_id, tracking_uri, name, max_concurrent)
            state.update(gblend_weights=weights, gblend_weights_source=source)
            write_state(state_file, state)
        starts = state.get("start_points")
        if starts is None:
            starts = state["start_points"] = run_start_stages(spec, client, parent_run_id, tracking_uri, name,
                                                              max_concurrent)
            write_state(state_file, state)
        param_space = build_param_space(spec, weights, starts, state.get("gblend_weights_source", "estimation_stage"))
        trainable_path = str(sweep_ray_path(spec, parent_run_id))
        if resume and tune.Tuner.can_restore(trainable_path):
            trainable = make_trainable(spec, parent_run_id, tracking_uri, name, MAIN_STAGE)
            tuner = tune.Tuner.restore(trainable_path, trainable=trainable, resume_errored=True, param_space=param_space)
            path = trainable_path
        else:
            tuner, path = make_tuner(spec, param_space, name, parent_run_id, tracking_uri, MAIN_STAGE, max_concurrent)
        client.set_tag(parent_run_id, "avtune.ray_experiment_path", path)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "search_space.json").write_text(json.dumps(spec.search.model_dump(mode="json"), indent=2))
            client.log_artifact(parent_run_id, str(Path(tmp) / "search_space.json"))
        grid = tuner.fit()
        trials = trials_frame(client, parent_run_id, spec.search.metric, spec.search.mode)
        failed = int((trials["status"] == "FAILED").sum()) if not trials.empty else 0
        summary = {"trials": float(len(trials)), "trials_failed": float(failed)}
        finished = trials[trials["status"] == "FINISHED"] if not trials.empty else trials
        if not finished.empty and finished[spec.search.metric].notna().any():
            best = finished.iloc[0]
            client.set_tag(parent_run_id, "avtune.best_run_id", best["run_id"])
            client.set_tag(parent_run_id, "avtune.best_run_name", best["run_name"])
            for key in ("acc", "acc_audio", "acc_visual", "gap_av", "test_acc"):
                if best.get(key) is not None and not pd.isna(best.get(key)):
                    summary[f"best_{key}"] = float(best[key])
        log_summary_once(client, parent_run_id, summary)
        with tempfile.TemporaryDirectory() as tmp:
            csv_safe(trials).to_csv(Path(tmp) / "trials.csv", index=False)
            client.log_artifact(parent_run_id, str(Path(tmp) / "trials.csv"))
        from orchestrator.report import log_sweep_imbalance

        # Utilisation vs the uni-modal baselines, per child and per epoch, plus the parent's summary.
        log_sweep_imbalance(client, parent_run_id)
    except BaseException as err:
        # Interrupted (KILLED) or failed: no child run of this sweep is left RUNNING either.
        for child in child_runs(client, parent_run_id, experiment_id=experiment_id):
            if child.info.status == "RUNNING":
                finish_run(client, child.info.run_id, err)
        finish_run(client, parent_run_id, err)
        raise
    finish_run(client, parent_run_id)
    return SweepResult(parent_run_id=parent_run_id, experiment_id=experiment_id, tracking_uri=tracking_uri,
                       experiment_path=path, result_grid=grid, trials=trials, gblend_weights=weights)
