"""Imbalance analysis of a sweep, from MLflow alone: utilisation, balance, the summary and the findings
(the figures are ``orchestrator.report.plots``', the page ``orchestrator.report.html``').

Everything here reads what the sweep logged (the parent run, its child runs, their per-epoch
metrics and params), so a report can be rebuilt later against any tracking URI.

Definitions (also written into the report):

* **Utilisation** of modality m in a joint trial (the "uni-modal accuracy gap" of Peng et al.,
  OGM-GE, CVPR 2022, Sec. 1 / Fig. 1, as a ratio): the accuracy of m's head inside the joint
  model (``acc_audio`` / ``acc_visual``) divided by the accuracy of the matching uni-modal
  baseline (``audio_only`` / ``visual_only``) at the same epoch. 1 means the joint model uses m
  as well as a network trained on m alone; below 1, m is under-optimised. The baseline is the
  run with the same params apart from the method (so the same seed) when the sweep has one,
  else the mean over the baselines of the other seeds, else the mean over all baselines of m.
  An epoch the baseline never reached is compared with the baseline's last epoch.
* **Balance** of a joint trial: ``min(util_audio, util_visual)``, the utilisation of its
  less-used modality (1 = neither modality is under-used). Without uni-modal baselines in the
  sweep it falls back to the Shapley balance ``1 - |phi_a - phi_v| / (|phi_a| + |phi_v|)``
  of the final two-player Shapley values of joint accuracy (1 = both contribute equally).
* **Dominant modality**: the one whose head is more accurate in the normal joint model by a paired
  test of its audio head against its visual head on the same seeds and clips (Holm-adjusted over the
  report's groups; ``comparisons.weak_modality``). The other one is "weak"; when the test does not
  distinguish them, neither is, and the findings about the weak modality are not made.
"""
from __future__ import annotations

import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
from mlflow.entities import Metric, Run
from mlflow.tracking import MlflowClient

from orchestrator.runs import (FUSION_PARAM, MAIN_STAGE, PREDICTIONS_FILE, PROBABILITIES_FILE, SEED_PARAM,
                               SWEEP_KIND_TAG, TRIAL_COLUMNS, child_runs, csv_safe, number, trial_row)
from orchestrator.tracking import log_summary_once, redact_text, redact_uri
from orchestrator.report.comparisons import (baseline_method, config_summary, describe, parse_predictions, power,
                                             report_tests, find_test, tests_table, verdict, weak_modality)
from orchestrator.report.reading import artifact_bytes, artifact_files, metric_histories
from orchestrator.report.references import (CEILING, KINDS, References, build_references, describe_ratio, headroom,
                                            read_probabilities, reference_summary)
from workers.methods import get_method, run_param_keys, unimodal_methods

MODALITIES = ("audio", "visual")
# Per-epoch metrics the report reads (each child logs more; only these are fetched).
HISTORY_KEYS = ("acc", "acc_audio", "acc_visual", "gap_av", "k_audio", "k_visual", "shapley_audio",
                "shapley_visual", "util_audio", "util_visual", "gblend_w_audio", "gblend_w_visual", "gblend_w_joint",
                "train_seconds")
SUMMARY_FILE = "imbalance_summary.csv"
CONFIG_SUMMARY_FILE = "config_summary.csv"
# Every test the report states, raw and Holm-adjusted p-values side by side (comparisons.report_tests).
TESTS_FILE = "comparisons.csv"
REPORT_DIR = "report"
BALANCE_UTIL = "min(util_audio, util_visual): utilisation of the less-used modality"
BALANCE_SHAPLEY = "1 - |shapley_audio - shapley_visual| / (|shapley_audio| + |shapley_visual|)"


# ---- which methods are which: the method registry says -------------------------------------


def is_unimodal(method: str) -> bool:
    """A uni-modal baseline; an unknown name (a run logged by a foreign tool) is not one."""
    return method in unimodal_methods().values()


def is_ogm(method: str) -> bool:
    """OGM's family (ogm, ogm_ge): the methods whose trials are labelled by alpha (and a window).
    An unknown name (a run logged by a foreign tool) is not OGM: the report reads, it does not judge."""
    try:
        return "alpha" in get_method(method).label_fields
    except ValueError:
        return False


def ogm_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of `frame` whose method is OGM's family."""
    return frame[frame["method"].map(is_ogm).astype(bool)]


# ---- reading a sweep from MLflow ----------------------------------------------------------


@dataclass
class SweepData:
    """A sweep's main-stage trials as logged in MLflow.

    ``trials``: one row per child run: the columns of :func:`orchestrator.runs.trial_row` (run_id,
    run_name, status, method, alpha, window, fusion, seed, epochs, the final metrics, ...),
    ``config`` (label of the trial's settings without the seed) and ``group`` (label of the
    non-method settings without the seed; "" when only methods vary).
    ``histories``: run_id -> per-epoch metrics (index = epoch). ``params``: run_id -> params.
    """

    parent_run_id: str
    experiment_name: str
    tracking_uri: str
    parent_metrics: dict[str, float]
    trials: pd.DataFrame
    histories: dict[str, pd.DataFrame]
    params: dict[str, dict[str, str]] = field(repr=False)
    # run_id -> the run's per-clip validation predictions (final model), None when it logged none.
    predictions: dict[str, pd.DataFrame | None] = field(default_factory=dict, repr=False)
    # run_id -> (clip ids, joint softmax) of the uni-modal baselines only (the ensemble reference's inputs).
    probabilities: dict[str, tuple[pd.Index, np.ndarray] | None] = field(default_factory=dict, repr=False)
    # False when read without the per-epoch histories (`load_sweep(..., histories=False)`): final values only.
    with_histories: bool = True

    def references(self) -> References:
        """The sweep's references (``orchestrator.report.references``): its uni-modal ensembles and, on
        generated clips, the ceiling logged on the parent run."""
        return build_references(self.trials, self.predictions, self.probabilities, self.parent_metrics)


def _config(row: dict[str, Any], group: str, labels: dict[str, str] | None = None) -> str:
    """A trial's settings without the seed, e.g. "ogm_ge alpha=0.5 window=0-2 (fusion=film)"; `labels`: other
    label fields of its method that differ between this method's trials (e.g. "magnitude_scale": "2")."""
    config = row["method"]
    if row["alpha"] is not None:
        config += f" alpha={row['alpha']:g}"
    if row["window"]:
        config += f" window={row['window']}"
    for key, value in (labels or {}).items():
        config += f" {key}={value}"
    if group:
        config += f" ({group})"
    return config


def _varying_label_fields(runs: list, params: dict[str, dict[str, str]]) -> dict[str, list[str]]:
    """Per method: its label fields (`Method.label_fields`, OGM's alpha and window aside, which the trial
    row carries) whose values differ between its trials in this sweep; a field every trial shares
    names nothing apart."""
    out: dict[str, list[str]] = {}
    by_method: dict[str, list[dict[str, str]]] = {}
    for run in runs:
        p = params[run.info.run_id]
        by_method.setdefault(p.get("method.name", ""), []).append(p)
    for method, trials in by_method.items():
        try:
            fields = get_method(method).label_fields
        except ValueError:  # a run logged by a foreign tool
            continue
        out[method] = [f for f in fields if f not in ("alpha", "modulation_starts", "modulation_ends")
                       and len({t.get(f"method.{f}", "") for t in trials}) > 1]
    return out


def load_sweep(client: MlflowClient, parent_run_id: str, runs: list[Run] | None = None,
               histories: bool = True) -> SweepData:
    """Read a sweep's parent run and its main-stage child runs: their params, final metrics, per-epoch
    histories (`histories`; False leaves every history empty, for a caller that needs only final values),
    predictions and the baselines' probabilities. `runs`: the main-stage child runs when the caller has
    just searched them (``orchestrator.runs.child_runs``). Everything is read now: nothing is cached
    between two reads of a running sweep."""
    parent = client.get_run(parent_run_id)
    if parent.data.tags.get(SWEEP_KIND_TAG) != "sweep":
        raise ValueError(f"run {parent_run_id} is not a sweep's parent run (no tag {SWEEP_KIND_TAG}=sweep)")
    experiment = client.get_experiment(parent.info.experiment_id)
    if runs is None:
        runs = child_runs(client, parent_run_id, stage=MAIN_STAGE, experiment_id=parent.info.experiment_id)
    params = {r.info.run_id: _shared(r.data.params) for r in runs}
    trials = _trials(runs, params)
    history = metric_histories(client, runs, HISTORY_KEYS) if histories else {r.info.run_id: pd.DataFrame() for r in runs}
    predictions = parse_predictions(artifact_bytes(client, runs, PREDICTIONS_FILE))
    # Only the baselines' probabilities: the ensemble needs nothing else, and a large sweep stays cheap.
    baselines = [r for r in runs if is_unimodal(params[r.info.run_id].get("method.name", ""))]
    probabilities = artifact_files(client, baselines, PROBABILITIES_FILE, read_probabilities)
    return SweepData(parent_run_id=parent_run_id, experiment_name=experiment.name, tracking_uri=client.tracking_uri,
                     parent_metrics=dict(parent.data.metrics), trials=trials, histories=history, params=params,
                     predictions=predictions, probabilities=probabilities, with_histories=histories)


def _shared(params: dict[str, str]) -> dict[str, str]:
    """`params` with its keys and values interned: a thousand runs share one copy of each name and of each value
    that repeats (most of a flattened spec), instead of a thousand."""
    return {sys.intern(k): sys.intern(v) for k, v in params.items()}


def _trials(runs: list[Run], params: dict[str, dict[str, str]]) -> pd.DataFrame:
    """The sweep's trial rows (`trial_row` plus ``config`` and ``group``), sorted by group, method and settings."""
    # Settings that differ between trials (besides the method and the seed) name configurations.
    all_keys = sorted({k for p in params.values() for k in p})
    varying = [k for k in all_keys if len({p.get(k, "") for p in params.values()}) > 1]
    context_keys = [k for k in varying if is_setting(k) and k != SEED_PARAM]
    rows = []
    label_keys = _varying_label_fields(runs, params)
    for run in runs:
        row, p = trial_row(run), params[run.info.run_id]
        row["group"] = ", ".join(f"{k.split('.', 1)[-1]}={p.get(k, '')}" for k in context_keys)
        labels = {k: p.get(f"method.{k}", "") for k in label_keys.get(row["method"], ())}
        row["config"] = _config(row, row["group"], labels)
        rows.append(row)
    trials = pd.DataFrame(rows, columns=[*TRIAL_COLUMNS, "config", "group"])
    return trials.sort_values(["group", "method", "alpha", "window", "seed"], na_position="first").reset_index(drop=True)


def is_setting(key: str) -> bool:
    """A run param that is a non-method setting (data, model, train, ...): not a method field (``method.*``) and
    not a method's derived run param (`Method.run_param_keys`, e.g. OGM's ``ogm_scores_from``), which describes
    how a run went, never what it was asked to do. Groups and same-seed baselines are matched on settings."""
    return not key.startswith("method.") and key not in run_param_keys()


def resolve_sweep(client: MlflowClient, experiment: str, sweep_run_id: str | None = None) -> str:
    """The sweep's parent run id: `sweep_run_id` checked to belong to `experiment`, or the
    experiment's latest sweep. Raises ValueError naming what was not found."""
    uri = redact_uri(client.tracking_uri)  # a client made elsewhere (the API) may hold credentials
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"experiment {experiment!r} not found at tracking URI {uri}")
    if sweep_run_id is None:
        parents = client.search_runs([exp.experiment_id], filter_string=f"tags.`{SWEEP_KIND_TAG}` = 'sweep'",
                                     order_by=["attributes.start_time DESC"], max_results=1)
        if not parents:
            raise ValueError(f"experiment {experiment!r} has no sweep (no run tagged {SWEEP_KIND_TAG}=sweep)")
        return parents[0].info.run_id
    try:
        run = client.get_run(sweep_run_id)
    except Exception as err:  # noqa: BLE001 - MLflow raises MlflowException / RestException
        raise ValueError(f"sweep run {sweep_run_id!r} not found at tracking URI {uri}: "
                         f"{redact_text(str(err), client.tracking_uri)}") from None
    if run.info.experiment_id != exp.experiment_id:
        raise ValueError(f"sweep run {sweep_run_id} belongs to another experiment than {experiment!r}")
    return sweep_run_id


# ---- utilisation and balance --------------------------------------------------------------


def joint_mask(table: pd.DataFrame) -> pd.Series:
    """Per row of `table`: a joint trial (not a uni-modal baseline, both heads' accuracies known); `_is_joint`
    for a whole table at once."""
    unimodal = list(unimodal_methods().values())
    heads = [pd.to_numeric(table[f"acc_{m}"], errors="coerce").notna() for m in MODALITIES]
    return ~table["method"].isin(unimodal) & heads[0] & heads[1]


def _is_joint(row: pd.Series) -> bool:
    return not is_unimodal(row["method"]) and number(row["acc_audio"]) is not None \
        and number(row["acc_visual"]) is not None


# How a joint trial finds its uni-modal baselines, first rule that finds any: the same settings apart from the
# method (so the same seed); the same with the fusion aside (baselines not crossed with it); the same apart
# from the seed too (mean over seeds). Each rule: the params it drops from the context, and its name.
MATCH_RULES = (((), "same seed"), ((FUSION_PARAM,), "same seed"), ((FUSION_PARAM, SEED_PARAM), "mean over seeds"))


@dataclass
class BaselineIndex:
    """The sweep's finished uni-modal baselines, per modality, keyed by their context under each rule of
    `MATCH_RULES`: a trial's baselines are one lookup per rule, not a comparison with every baseline."""

    candidates: dict[str, list[str]]
    by_context: dict[tuple[str, int, tuple], list[str]]


def _context(params: dict[str, str], drop: tuple[str, ...], derived: frozenset[str]) -> tuple:
    """A run's settings (`is_setting`, `derived`: the methods' derived run params) without `drop`, hashable."""
    return tuple(sorted((k, v) for k, v in params.items()
                        if not k.startswith("method.") and k not in derived and k not in drop))


def baseline_index(sweep: SweepData) -> BaselineIndex:
    """The index of `sweep`'s baselines (built from the sweep as read: nothing outlives one report)."""
    derived, trials = run_param_keys(), sweep.trials
    candidates, by_context = {}, {}
    for m in MODALITIES:
        done = trials[(trials["method"] == baseline_method(m)) & trials["acc"].notna()]["run_id"].tolist()
        candidates[m] = done
        for run_id in done:
            for rule, (drop, _) in enumerate(MATCH_RULES):
                by_context.setdefault((m, rule, _context(sweep.params[run_id], drop, derived)), []).append(run_id)
    return BaselineIndex(candidates, by_context)


def matching_baselines(sweep: SweepData, run_id: str, modality: str,
                       index: BaselineIndex | None = None) -> tuple[list[str], str]:
    """Run ids of the uni-modal baselines of `modality` that a trial is compared with, and how they were
    matched: "same seed" (same settings apart from the method, fusion aside when the baselines were not
    crossed with it), "mean over seeds" (same settings apart from the seed), "mean over all baselines", or
    "none". Settings are `is_setting` params: a method's derived run params never keep a trial from its
    baselines. `index`: `baseline_index(sweep)` when the caller matches many trials."""
    index = index if index is not None else baseline_index(sweep)
    if not index.candidates[modality]:
        return [], "none"
    derived, mine = run_param_keys(), sweep.params[run_id]
    for rule, (drop, how) in enumerate(MATCH_RULES):
        found = index.by_context.get((modality, rule, _context(mine, drop, derived)))
        if found:
            return list(found), how
    return list(index.candidates[modality]), "mean over all baselines"


def baseline_curve(sweep: SweepData, run_ids: list[str],
                   finals: dict[str, float] | None = None) -> tuple[pd.Series, float]:
    """Per-epoch accuracy (mean over `run_ids`) and the mean of their final accuracies (`finals`: run_id ->
    final accuracy, when the caller has it)."""
    curves = [sweep.histories[r]["acc"] for r in run_ids if "acc" in sweep.histories[r]]
    curve = pd.concat(curves, axis=1).mean(axis=1) if curves else pd.Series(dtype=float)
    if finals is None:
        finals = dict(zip(sweep.trials["run_id"], sweep.trials["acc"]))
    return curve, float(pd.Series([finals[r] for r in run_ids], dtype=float).mean())


def _util_curve(head: pd.Series, baseline: pd.Series) -> pd.Series:
    """Per epoch of `head` (a joint trial's head accuracy): its ratio to `baseline`'s accuracy at that epoch; an
    epoch the baseline never reached (e.g. stopped early), or where it has no value, uses its last epoch; a
    baseline at 0 gives no ratio. In numpy: it runs once per joint trial and modality."""
    last = baseline.iloc[-1]
    positions = baseline.index.get_indexer(head.index)
    reference = np.where(positions >= 0, baseline.to_numpy()[positions], np.nan)
    reference = np.where(np.isnan(reference), last, reference)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = head.to_numpy(dtype=float) / np.where(reference > 0, reference, np.nan)
    return pd.Series(ratio, index=head.index)


UTIL_COLUMNS = ("util_audio", "util_visual", "baseline_audio", "baseline_visual", "match_audio", "match_visual")


def utilisation(sweep: SweepData) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Final utilisation per joint trial (columns util_audio, util_visual, baseline_audio,
    baseline_visual, match_audio, match_visual; index run_id) and per-epoch utilisation
    (run_id -> DataFrame with util_audio / util_visual, index epoch). See the module docstring.
    Compute it once per report and pass it on (`imbalance_summary`, `log_sweep_imbalance`)."""
    index = baseline_index(sweep)
    finals_acc = dict(zip(sweep.trials["run_id"], sweep.trials["acc"]))
    # Trials of one seed share their baselines: each distinct set is averaged once (this call only).
    baselines_of: dict[tuple[str, ...], tuple[pd.Series, float]] = {}
    finals, per_epoch = {}, {}
    for row in sweep.trials[joint_mask(sweep.trials)].to_dict("records"):
        run_id, out, curves = row["run_id"], {}, {}
        hist = sweep.histories[run_id]
        for m in MODALITIES:
            baselines, how = matching_baselines(sweep, run_id, m, index)
            out[f"match_{m}"] = how
            if not baselines:
                continue
            key = tuple(baselines)
            if key not in baselines_of:
                baselines_of[key] = baseline_curve(sweep, baselines, finals_acc)
            curve, final = baselines_of[key]
            out[f"baseline_{m}"] = final
            if final > 0:
                out[f"util_{m}"] = float(row[f"acc_{m}"]) / final
            if f"acc_{m}" in hist and not curve.empty:
                curves[f"util_{m}"] = _util_curve(hist[f"acc_{m}"], curve)
        finals[run_id] = out
        if curves:
            per_epoch[run_id] = pd.DataFrame(curves).dropna(how="all")
    frame = pd.DataFrame.from_dict(finals, orient="index")
    for col in UTIL_COLUMNS:
        if col not in frame:
            frame[col] = np.nan if not col.startswith("match") else "none"
    frame.index.name = "run_id"
    return frame, per_epoch


def shapley_balance(shapley_audio: float | None, shapley_visual: float | None) -> float | None:
    """1 - |phi_a - phi_v| / (|phi_a| + |phi_v|): 1 when both modalities add the same to joint accuracy."""
    a, v = number(shapley_audio), number(shapley_visual)
    if a is None or v is None or abs(a) + abs(v) == 0:
        return None
    return 1.0 - abs(a - v) / (abs(a) + abs(v))


def imbalance_summary(sweep: SweepData, util: pd.DataFrame | None = None) -> tuple[pd.DataFrame, str]:
    """The per-trial table (trials x method, alpha, window, fusion, acc, acc_audio, acc_visual,
    gap, util_*, shapley_*, balance) and the balance definition used (see the module docstring)."""
    if util is None:
        util, _ = utilisation(sweep)
    table = sweep.trials.merge(util, how="left", left_on="run_id", right_index=True)
    table["gap"] = table["acc_audio"].astype(float) - table["acc_visual"].astype(float)
    joint = joint_mask(table)
    have_util = joint & table["util_audio"].notna() & table["util_visual"].notna()
    if have_util.any():
        definition = BALANCE_UTIL
        table["balance"] = np.where(have_util, table[["util_audio", "util_visual"]].min(axis=1), np.nan)
    else:
        definition = BALANCE_SHAPLEY
        table["balance"] = [shapley_balance(a, v) if j else None
                            for a, v, j in zip(table["shapley_audio"], table["shapley_visual"], joint)]
    table["balance"] = table["balance"].astype(float)
    columns = ["run_id", "run_name", "status", "method", "alpha", "window", "fusion", "seed", "config", "group",
               "epochs", "acc", "acc_audio", "acc_visual", "gap", "util_audio", "util_visual", "shapley_audio",
               "shapley_visual", "balance", "baseline_audio", "baseline_visual", "match_audio", "match_visual", "test_acc"]
    return table[columns], definition


def _best(table: pd.DataFrame, key: str) -> pd.Series | None:
    """The joint trial with the highest `key`, ties broken by joint accuracy."""
    joint = table[joint_mask(table) & table[key].notna()]
    if joint.empty:
        return None
    return joint.sort_values([key, "acc"], ascending=False, kind="stable").iloc[0]


def log_sweep_imbalance(client: MlflowClient, parent_run_id: str, sweep: SweepData | None = None,
                        summary: pd.DataFrame | None = None, board: pd.DataFrame | None = None,
                        tests: pd.DataFrame | None = None, references: References | None = None,
                        util: tuple[pd.DataFrame, dict[str, pd.DataFrame]] | None = None) -> pd.DataFrame:
    """Log utilisation into each joint child run (``util_audio`` / ``util_visual``, step = epoch;
    epochs already logged are skipped, so calling it twice is harmless) and, on the parent,
    ``imbalance_summary.csv`` plus tags and metrics for the best trial by joint accuracy
    (``best_by_acc/*``) and by balance (``best_by_balance/*``), the references (``ensemble_acc_mean`` /
    ``_low`` / ``_high``, prefixed ``<group>/`` in a group) and each configuration's share of the headroom
    recovered (``cfg/<config>/headroom_recovered_<ensemble|ceiling>``, ``_low`` / ``_high``). Returns the
    summary table.

    `sweep`: the sweep as already read with :func:`load_sweep` (read here when None); `summary`: its
    :func:`config_summary` when the caller has it (its paired bootstraps are the costly part); `board`:
    its leaderboard (``orchestrator.report.leaderboard``) when the caller has it; `references`: its
    references (``sweep.references()``) when the caller has them; `util`: its :func:`utilisation` when the
    caller has it (computed once per report).
    """
    if sweep is None or not sweep.with_histories:
        sweep = load_sweep(client, parent_run_id)
        util = None  # computed from another reading of the sweep
    if references is None:
        references = sweep.references()
    util, per_epoch = util if util is not None else utilisation(sweep)
    table, definition = imbalance_summary(sweep, util)
    log_utilisation_curves(client, sweep, per_epoch)
    parent_metrics: dict[str, float] = {}
    tags = {"avtune.imbalance.balance_definition": definition}
    for label, key in (("best_by_acc", "acc"), ("best_by_balance", "balance")):
        best = _best(table, key)
        if best is None:
            continue
        tags[f"avtune.imbalance.{label}_run_id"] = best["run_id"]
        tags[f"avtune.imbalance.{label}_run_name"] = str(best["run_name"])
        for col in ("acc", "acc_audio", "acc_visual", "gap", "util_audio", "util_visual", "shapley_audio",
                    "shapley_visual", "balance"):
            value = number(best[col])
            if value is not None:
                parent_metrics[f"{label}/{col}"] = value
    for key, value in tags.items():
        client.set_tag(parent_run_id, key, value)
    if tests is None:
        tests = report_tests(table, sweep.predictions, references)
    if summary is None:
        summary = config_summary(table, sweep.predictions, tests, references)
    # Per-configuration means with 95% intervals over seeds on the parent, so the MLflow UI's metric
    # view compares configurations, not single seeds (`cfg/<config>/acc_mean`, `..._low`, `..._high`).
    for _, row in summary.iterrows():
        for key in ("acc", "acc_audio", "acc_visual"):
            for suffix, col in (("mean", key), ("low", f"{key}_low"), ("high", f"{key}_high")):
                value = number(row.get(col))
                if value is not None:
                    parent_metrics[f"cfg/{_metric_name(row['config'])}/{key}_{suffix}"] = value
    parent_metrics.update(reference_metrics(table, references))
    log_summary_once(client, parent_run_id, parent_metrics)
    with tempfile.TemporaryDirectory() as tmp:
        csv_safe(table).to_csv(Path(tmp) / SUMMARY_FILE, index=False)
        summary.to_csv(Path(tmp) / CONFIG_SUMMARY_FILE, index=False)
        tests_table(tests).to_csv(Path(tmp) / TESTS_FILE, index=False)
        for name in (SUMMARY_FILE, CONFIG_SUMMARY_FILE, TESTS_FILE):
            client.log_artifact(parent_run_id, str(Path(tmp) / name))
    from orchestrator.report.leaderboard import leaderboard, log_leaderboard

    log_leaderboard(client, parent_run_id, board if board is not None else leaderboard(sweep, table, summary))
    return table


def log_utilisation_curves(client: MlflowClient, sweep: SweepData, per_epoch: dict[str, pd.DataFrame]) -> None:
    """Log each joint trial's per-epoch utilisation into its run, skipping the epochs its history (as the sweep
    was just read) already holds: a second report writes nothing, and no run is read again to know it."""
    ts = int(time.time() * 1000)
    for run_id, curves in per_epoch.items():
        history, metrics = sweep.histories[run_id], []
        for key in curves.columns:
            todo = curves[key].dropna()
            if key in history:
                todo = todo[~todo.index.isin(history[key].dropna().index)]
            metrics += [Metric(key, float(v), ts, int(epoch)) for epoch, v in todo.items()]
        for i in range(0, len(metrics), 500):
            client.log_batch(run_id, metrics=metrics[i : i + 500])


def reference_metrics(table: pd.DataFrame, references: References) -> dict[str, float]:
    """The parent's reference metrics: per group the ensemble's joint accuracy (``ensemble_acc_mean``,
    ``_low``, ``_high``: t-interval over seeds; ``<group>/`` before them in a group) and per configuration the
    share of the headroom recovered (``cfg/<config>/headroom_recovered_<reference>``, with ``_low`` and
    ``_high`` when Fieller's interval is bounded; none where there is no headroom)."""
    out: dict[str, float] = {}
    for _, row in reference_summary(table, references).iterrows():
        prefix = f"{_metric_name(row['group'])}/" if row["group"] else ""
        for suffix, col in (("mean", "ensemble"), ("low", "ensemble_low"), ("high", "ensemble_high")):
            if (value := number(row[col])) is not None:
                out[f"{prefix}ensemble_acc_{suffix}"] = value
    for _, row in headroom(table, references).iterrows():
        name = f"cfg/{_metric_name(row['config'])}/headroom_recovered_{row['reference']}"
        for suffix, col in (("", "estimate"), ("_low", "low"), ("_high", "high")):
            if (value := number(row[col])) is not None:
                out[name + suffix] = value
    return out


def _metric_name(config: str) -> str:
    """A configuration label as MLflow allows in a metric name (alphanumerics, _ - . space / :)."""
    return "".join(c if c.isalnum() or c in "_-. :" else "_" for c in config).strip()


# ---- findings in words ----------------------------------------------------------------------


def _f(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _comparison_numbers(test) -> dict[str, Any]:
    """A paired comparison's numbers for findings.json (None when there was nothing to pair)."""
    if test is None:
        return {"difference": None, "ci_low": None, "ci_high": None, "p_value": None, "p_holm": None,
                "distinguishable": False, "n_seeds": None, "test": None}
    return {"difference": test.difference, "ci_low": number(test.low), "ci_high": number(test.high),
            "p_value": number(test.p_value), "p_holm": number(test.p_adjusted),
            "distinguishable": test.testable and test.distinguishable, "n_seeds": test.n_seeds, "test": test.method}


def config_means(table: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds of each configuration's final numbers (column n = trials averaged)."""
    numeric = ["acc", "acc_audio", "acc_visual", "gap", "util_audio", "util_visual", "shapley_audio", "shapley_visual",
               "balance"]
    done = table[table["acc"].notna()].copy()
    done[numeric] = done[numeric].astype(float)
    grouped = done.groupby(["group", "config"], sort=False, dropna=False)
    out = grouped[numeric].mean()
    out["n"] = grouped.size()
    first = grouped[["method", "alpha", "window", "fusion"]].first()
    return pd.concat([first, out], axis=1).reset_index()


def _weighted(rows: pd.DataFrame, key: str) -> float:
    return float((rows[key] * rows["n"]).sum() / rows["n"].sum())


def _power_text(prefix: str, resolution: dict) -> str:
    heads = {"acc": "joint", "acc_audio": "audio head", "acc_visual": "visual head"}
    parts = []
    for metric, h in resolution["heads"].items():
        more = "; ".join(f"{s} seeds: {_detectable(d)}" for s, d in h["detectable_with_seeds"].items())
        parts.append(f"{heads[metric]} accuracy {_detectable(h['detectable'])} with {h['n_seeds']} seeds and "
                     f"{h['n_clips']} clips (seed-to-seed sd of a difference {h['sd_seed']:.3f})"
                     + (f" ({more})" if more else ""))
    return (f"{prefix}What this sweep can resolve: with Holm over the {resolution['family_size']} comparisons with "
            f"normal, a single real difference is detected with 80% power when it is at least: " + "; ".join(parts)
            + ". Smaller real effects often read as not distinguishable.")


def _detectable(value: float) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return "more than any accuracy difference (1.0)" if math.isinf(value) else f"{value:.3f}"


def _reference_text(row: pd.Series, tests: pd.DataFrame, group: str) -> str:
    """The group's references against normal in words (`references.reference_summary` row)."""
    parts = [f"normal {_f(row['normal'])}"]
    if row["ensemble_config"] is not None:
        test = find_test(tests, "headroom", group, row["ensemble_config"], "acc")
        interval = (f" [{_f(row['ensemble_low'])}, {_f(row['ensemble_high'])}]"
                    if number(row["ensemble_low"]) is not None else "")
        parts.append(f"uni-modal ensemble (late fusion of audio_only and visual_only, same seed) "
                     f"{_f(row['ensemble'])}{interval} over {int(row['ensemble_n'])} seeds"
                     + (f", ensemble - normal {describe(test)}: {verdict(test)}" if test is not None else ""))
    else:
        parts.append(f"no uni-modal ensemble ({row['ensemble_missing']})")
    if number(row["ceiling"]) is not None:
        test = find_test(tests, "headroom", group, CEILING, "acc")
        parts.append(f"ceiling (best achievable on these validation clips) {_f(row['ceiling'])}"
                     + (f", ceiling - normal {describe(test)}: {verdict(test)}" if test is not None else ""))
    else:
        parts.append("no ceiling (real data, or clips without the generator's card)")
    return "; ".join(parts)


def _available(row: pd.Series) -> str:
    """The headroom above normal to each reference the group has: "+0.043 to the ensemble", or "none to the
    ensemble (normal is 0.020 above it)"."""
    out = []
    for kind in KINDS:
        value = number(row[f"headroom_{kind}"])
        if value is not None:
            out.append(f"{value:+.3f} to the {kind}" if value > 0 else
                       f"none to the {kind} (normal is {-value:.3f} above it)")
    return " and ".join(out) if out else "none measurable (no reference)"


# A joint configuration's paired verdict against normal on joint accuracy, as the headroom finding says it.
RECOVERY_WORDS = {"higher": "recovers joint accuracy", "lower": "is lower than normal",
                  "not distinguishable": "is not distinguishable from normal",
                  "no verdict": "has no verdict (fewer than 3 seeds shared with normal)"}


def _short(test) -> str:
    """"+0.020, Holm p = 0.03" (the raw p when the test was not adjusted; no p without a test)."""
    if not test.testable:
        return f"{test.difference:+.3f}, no test"
    p = test.p_adjusted if not math.isnan(test.p_adjusted) else test.p_value
    return f"{test.difference:+.3f}, Holm p = {p:.2g}"


def _recovery(group: str, config: str, tests: pd.DataFrame, recovered: pd.DataFrame) -> tuple[dict[str, Any], str]:
    """One joint configuration in the headroom finding: its numbers (verdict against normal on joint accuracy,
    the share of the headroom to each reference) and its sentence."""
    test = find_test(tests, "vs_normal", group, config, "acc")
    shares = recovered[(recovered["group"] == group) & (recovered["config"] == config)]
    numbers_ = {"verdict": verdict(test), **_comparison_numbers(test)}
    for _, share in shares.iterrows():
        numbers_[f"headroom_{share['reference']}"] = {**{k: number(share[k]) for k in ("estimate", "low", "high")},
                                                      "status": share["status"], "n_seeds": int(share["n_seeds"])}
    parts = ([f"acc - normal {_short(test)}"] if test is not None else [])
    parts += [describe_ratio(share, share["reference"]) for _, share in shares.iterrows()]
    return numbers_, f"{config} {RECOVERY_WORDS[verdict(test)]}" + (f" ({'; '.join(parts)})" if parts else "")


def headroom_finding(group: str, prefix: str, configs: list[str], tests: pd.DataFrame, row: pd.Series,
                     recovered: pd.DataFrame) -> dict[str, Any]:
    """Per group: the references (`row`: its `references.reference_summary` row), and for each joint
    configuration whether it recovers joint accuracy (its Holm-adjusted paired test against normal says
    "higher") with the share of the headroom it recovers (`recovered`: `references.headroom`)."""
    per_config, sentences = {}, []
    for config in configs:
        per_config[config], sentence = _recovery(group, config, tests, recovered)
        sentences.append(sentence)
    recovering = [c for c, n in per_config.items() if n["verdict"] == "higher"]
    text = f"{prefix}Joint accuracy against its references: {_reference_text(row, tests, group)}. "
    if not configs:
        text += f"No joint configuration besides normal (headroom above normal: {_available(row)})."
    elif not recovering:
        text += (f"No method recovers joint accuracy: none is distinguishably above normal after Holm's adjustment "
                 f"(headroom above normal: {_available(row)}).")
    else:
        text += f"{len(recovering)} of {len(configs)} recover joint accuracy (headroom above normal: {_available(row)})."
    if sentences:
        text += " Per configuration: " + "; ".join(sentences) + "."
    return {"id": "headroom", "group": group, "recovering": recovering, "configs": per_config, "text": text,
            **{key: number(row[col]) for key, col in (
                ("normal_acc", "normal"), ("ensemble_acc", "ensemble"), ("ensemble_low", "ensemble_low"),
                ("ensemble_high", "ensemble_high"), ("ceiling", "ceiling"), ("headroom_ensemble", "headroom_ensemble"),
                ("headroom_ceiling", "headroom_ceiling"))}}


def findings(table: pd.DataFrame, predictions: dict[str, pd.DataFrame | None] | None = None,
             tests: pd.DataFrame | None = None, references: References | None = None) -> list[dict[str, Any]]:
    """The comparisons the report states, per group of trials sharing their non-method settings.

    Each finding: ``{"id", "group", "text", **numbers}``; numbers are means over seeds. A claim that one
    configuration is above or below another, or that one modality dominates, rests on a paired test on the
    same seeds and validation clips (`predictions`: run_id -> per-clip predictions; without them, a paired
    t over seeds), Holm-adjusted within its family (`comparisons.report_tests`, passed as `tests` when the
    caller has it); otherwise the finding says "not distinguishable" (or "no verdict" with too few seeds).
    With `references` (``SweepData.references``), one "headroom" finding per group.
    """
    predictions = predictions or {}
    tests = report_tests(table, predictions, references) if tests is None else tests
    out: list[dict[str, Any]] = []
    means = config_means(table)
    summary = reference_summary(table, references) if references is not None else pd.DataFrame()
    recovered = headroom(table, references) if references is not None else pd.DataFrame()
    for group, configs in means.groupby("group", sort=False):
        prefix = f"[{group}] " if group else ""
        joint = configs[~configs["method"].map(is_unimodal).astype(bool) & configs["acc_audio"].notna()
                         & configs["acc_visual"].notna()]
        normal = joint[joint["method"] == "normal"]
        if joint.empty or normal.empty:
            continue
        normal_config = normal["config"].iloc[0]
        normal_acc = _weighted(normal, "acc")
        accs = {m: _weighted(normal, f"acc_{m}") for m in MODALITIES}
        n_ref = int(normal["n"].sum())
        seeds = f" (mean over {n_ref} seeds)" if n_ref > 1 else ""
        baselines = {m: configs[configs["method"] == baseline_method(m)] for m in MODALITIES}
        base_acc = {m: (_weighted(b, "acc") if not b.empty else None) for m, b in baselines.items()}
        shap = {m: _weighted(normal, f"shapley_{m}") if normal[f"shapley_{m}"].notna().all() else None
                for m in MODALITIES}
        dominance = find_test(tests, "dominance", group, normal_config, "acc_audio")
        weak = weak_modality(tests, group)
        detail = f"; paired audio - visual {describe(dominance)}" if dominance is not None else ""
        if shap["audio"] is not None and shap["visual"] is not None:
            detail += f"; Shapley values of joint accuracy: audio {_f(shap['audio'])}, visual {_f(shap['visual'])}"
        if base_acc["audio"] is not None and base_acc["visual"] is not None:
            detail += (f"; trained alone, audio reaches {_f(base_acc['audio'])} ({baseline_method('audio')}) and "
                       f"visual {_f(base_acc['visual'])} ({baseline_method('visual')})")
        numbers = {"acc_audio": accs["audio"], "acc_visual": accs["visual"], "shapley_audio": shap["audio"],
                   "shapley_visual": shap["visual"], **_comparison_numbers(dominance)}
        if weak is None:
            out.append({"id": "dominance", "group": group, "dominant": None, "weak": None, **numbers,
                        "text": f"{prefix}Neither head is distinguishably stronger in the normal joint model: audio "
                                f"{_f(accs['audio'])}, visual {_f(accs['visual'])}{seeds}{detail}."})
        else:
            dominant = "visual" if weak == "audio" else "audio"
            out.append({"id": "dominance", "group": group, "dominant": dominant, "weak": weak, **numbers,
                        "text": f"{prefix}{dominant.capitalize()} is the dominant modality: in the normal joint "
                                f"model its head reaches {_f(accs[dominant])} against {_f(accs[weak])} for {weak}"
                                f"{seeds}{detail}."})

        if weak is not None and base_acc[weak] is not None:
            util = accs[weak] / base_acc[weak] if base_acc[weak] > 0 else None
            test = find_test(tests, "weak_vs_unimodal", group, normal_config, f"acc_{weak}")
            position = {"lower": "below", "higher": "above"}.get(verdict(test), "not distinguishable from")
            tail = (f": the joint model under-uses the {weak} modality" if position == "below"
                    else f": no under-use of the {weak} modality shows in this sweep")
            stats = f"; paired difference {describe(test)}" if test is not None else ""
            out.append({"id": "weak_vs_unimodal", "group": group, "weak": weak, "normal_weak_acc": accs[weak],
                        "unimodal_acc": base_acc[weak], "utilisation": util, "below": position == "below",
                        **_comparison_numbers(test),
                        "text": f"{prefix}The normal joint model's {weak} head reaches {_f(accs[weak])}, {position} the "
                                f"{baseline_method(weak)} baseline's {_f(base_acc[weak])} (utilisation {_f(util)}"
                                f"{stats}){tail}."})

        ogm = ogm_rows(joint)
        if weak is not None and not ogm.empty:
            best = ogm.sort_values([f"acc_{weak}", "acc"], ascending=False, kind="stable").iloc[0]
            delta = float(best[f"acc_{weak}"]) - accs[weak]
            test = find_test(tests, "vs_normal", group, best["config"], f"acc_{weak}")
            change = {"higher": "raises", "lower": "lowers"}.get(verdict(test), "is not distinguishable from normal on "
                                                                  f"this data in")
            chosen = (f", the best of {len(ogm)} OGM configurations (Holm's adjustment covers that choice)"
                      if len(ogm) > 1 else "")
            text = (f"{prefix}The best OGM/OGM-GE trial for the {weak} modality, {best['config']}{chosen}, {change} the "
                    f"{weak} head's accuracy: from {_f(accs[weak])} (normal) to {_f(float(best[f'acc_{weak}']))}"
                    + (f" (paired difference {describe(test)})" if test is not None else f" ({delta:+.3f})")
                    + f"; its joint accuracy is {_f(float(best['acc']))} against {_f(normal_acc)} for normal.")
            out.append({"id": "ogm_vs_normal", "group": group, "weak": weak, "config": best["config"],
                        "ogm_weak_acc": float(best[f"acc_{weak}"]), "normal_weak_acc": accs[weak], "delta": delta,
                        "ogm_acc": float(best["acc"]), "normal_acc": normal_acc, **_comparison_numbers(test),
                        "text": text})

        reference_row = summary[summary["group"] == group] if not summary.empty else summary
        if not reference_row.empty:
            configs_in_group = list(joint.loc[joint["method"] != "normal", "config"])
            out.append(headroom_finding(group, prefix, configs_in_group, tests, reference_row.iloc[0], recovered))

        resolution = power(tests, group)
        if resolution is not None:
            out.append({"id": "power", "group": group, **resolution, "text": _power_text(prefix, resolution)})

        if weak is None:
            continue
        # Trade-off: the configuration with the highest joint + weak-head accuracy (equal weights).
        score = joint["acc"] + joint[f"acc_{weak}"]
        best = joint.loc[score.idxmax()]
        text = (f"{prefix}Best trade-off (highest joint + {weak}-head accuracy, means over seeds, not a test): "
                f"{best['config']}, joint {_f(float(best['acc']))}, {weak} head {_f(float(best[f'acc_{weak}']))}")
        if best["method"] != "normal":
            text += f" (normal: joint {_f(normal_acc)}, {weak} head {_f(accs[weak])})"
        out.append({"id": "tradeoff", "group": group, "weak": weak, "config": best["config"], "acc": float(best["acc"]),
                    "weak_acc": float(best[f"acc_{weak}"]), "text": text + "."})
        windows = []
        for (method, alpha), same in ogm.groupby(["method", "alpha"], sort=True):
            if same["window"].nunique() < 2:
                continue
            same = same.assign(_start=same["window"].str.split("-").str[0].astype(int),
                               _end=same["window"].str.split("-").str[1].astype(int)).sort_values(["_start", "_end"])
            parts = [f"window {w}: joint {_f(float(a))}, {weak} {_f(float(x))}"
                     for w, a, x in zip(same["window"], same["acc"], same[f"acc_{weak}"])]
            windows.append({"method": method, "alpha": float(alpha),
                            "windows": {w: {"acc": float(a), "weak_acc": float(x)}
                                        for w, a, x in zip(same["window"], same["acc"], same[f"acc_{weak}"])},
                            "text": f"{method} alpha={alpha:g}: " + "; ".join(parts)})
        if windows:
            out.append({"id": "window", "group": group, "weak": weak, "by_alpha": windows,
                        "text": f"{prefix}Modulation window against the trade-off between joint and {weak}-head "
                                "accuracy (means over seeds): " + " | ".join(w["text"] for w in windows) + "."})
        elif not ogm.empty:
            out.append({"id": "window", "group": group, "weak": weak, "by_alpha": [],
                        "text": f"{prefix}Only one modulation window per alpha was run; search "
                                "method.modulation_ends to see how the window trades joint for weak-modality accuracy."})
    return out


def gblend_weights(sweep: SweepData) -> dict[str, float] | None:
    """The offline G-Blend weights on the parent run, else the mean final weights of G-Blend trials."""
    heads = ("audio", "visual", "joint")
    if all(f"gblend_w_{h}" in sweep.parent_metrics for h in heads):
        return {h: float(sweep.parent_metrics[f"gblend_w_{h}"]) for h in heads}
    runs = sweep.trials[sweep.trials["method"] == "gblend"]["run_id"]
    finals = [sweep.histories[r][[f"gblend_w_{h}" for h in heads]].dropna().iloc[-1]
              for r in runs if {f"gblend_w_{h}" for h in heads} <= set(sweep.histories[r].columns)]
    if not finals:
        return None
    mean = pd.concat(finals, axis=1).mean(axis=1)
    return {h: float(mean[f"gblend_w_{h}"]) for h in heads}


def ogm_scores_note(sweep: SweepData) -> str:
    """A caption note when the sweep's OGM trials took their modality scores from both kinds of
    heads: the fused classifier's own per-modality logits (sum / concat, as official OGM-GE) and
    detached probe heads (FiLM / gated, avtune's extension; run param `ogm_scores_from`)."""
    kinds = sorted({p.get("ogm_scores_from", "") for p in sweep.params.values()} - {""})
    if len(kinds) < 2:
        return ""
    return ("; note: these OGM trials mix scores from the fusion's own per-modality logits (sum / concat, as "
            "official OGM-GE) and from detached probe heads (FiLM / gated, avtune's extension): compare "
            "alpha or window within one fusion")


def gblend_weights_source(sweep: SweepData) -> str:
    """How the sweep's G-Blend trials got their weights (run param `gblend_weights_source`:
    estimated / given / uniform / uniform_fallback, "+online" when re-estimated during training); "" without any."""
    return ", ".join(sorted({p["gblend_weights_source"] for p in sweep.params.values() if "gblend_weights_source" in p}))


def gblend_finding(sweep: SweepData, table: pd.DataFrame) -> dict[str, Any] | None:
    """What G-Blend trained with, and what a zero weight means: a head with weight 0 gets no gradient, so its
    accuracy (the joint one included) is whatever the untrained head gives."""
    weights = gblend_weights(sweep)
    rows = table[(table["method"] == "gblend") & table["acc"].notna()]
    if weights is None or rows.empty:
        return None
    source = gblend_weights_source(sweep)
    text = (f"G-Blend trained with loss weights audio {weights['audio']:.3f}, visual {weights['visual']:.3f}, joint "
            f"{weights['joint']:.3f} ({source or 'source not logged'}); its joint accuracy is "
            f"{float(rows['acc'].astype(float).mean()):.3f} (mean over {len(rows)} trials).")
    if "uniform_fallback" in source:
        text += (" No estimation window let every head's validation loss fall, so it trained with the uniform "
                 "fallback, not estimated weights (the parent run's avtune.warning and gblend_estimate.json say why).")
    starved = [h for h, w in weights.items() if w == 0]
    if starved:
        text += (f" The {' and '.join(starved)} head{'s get' if len(starved) > 1 else ' gets'} weight 0 and no "
                 "gradient: each head's weight follows its validation-loss drop over the estimation window (dG), and "
                 "a head whose validation loss did not fall there gets none (see gblend_estimate.json on the parent run).")
    return {"id": "gblend", "group": "", "weights": weights, "source": source, "starved": starved, "text": text}
