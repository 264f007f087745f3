"""avtune's MLflow vocabulary: the tags that tie a sweep's runs together, the one query for a
sweep's child runs, and the one row a trial becomes in a table.

The sweep driver, the CLI and the report all read runs through here, so what one writes the others
read the same way. No Ray, no torch: the report and the CLI import this without paying for either.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

if TYPE_CHECKING:  # training.py imports this module too; pandas is imported where a table is built
    import pandas as pd

# MLflow's own nesting tag: the UI shows a sweep's children under their parent run by it.
PARENT_TAG = "mlflow.parentRunId"
# Tune's trial id on the child: a restarted trial or a resumed sweep finds its run again.
TRIAL_TAG = "avtune.trial_id"
SWEEP_TAG = "avtune.sweep"
# "main", or a preliminary stage such as "gblend-estimate" whose children are not the sweep's trials.
STAGE_TAG = "avtune.stage"
# A trial's settings without its seed: runs with the same value are one configuration's repeats,
# so the MLflow UI can group by it (Group by -> tag) and compare configurations over seeds.
CONFIG_TAG = "avtune.config"
MAIN_STAGE = "main"
# "sweep" on a sweep's parent run: how a sweep is told apart from a single training run.
SWEEP_KIND_TAG = "avtune.kind"
METHOD_TAG = "avtune.method"

# Artifacts of a run with a classifier: per clip, each head's prediction (predictions.csv) and the joint
# head's whole softmax (probabilities.npz: clip_id, split, model and a float16 clips x classes `probs`).
PREDICTIONS_FILE = "predictions.csv"
PROBABILITIES_FILE = "probabilities.npz"
# On a sweep's parent when its clips are generated: the card's best achievable validation accuracy of a
# perfect recogniser of what the clips carry (orchestrator/synth.py), per prediction.
CEILING_METRICS = {"acc": "ceiling_acc", "acc_audio": "ceiling_acc_audio", "acc_visual": "ceiling_acc_visual"}

# Params (flattened spec fields) that tables show or match trials on.
METHOD_PARAM = "method.name"
SEED_PARAM = "train.seed"
FUSION_PARAM = "model.fusion"

# Final metrics a trial's row carries as logged (the last epoch's value; best_acc / test_acc at the end).
ROW_METRICS = ("acc", "acc_audio", "acc_visual", "best_acc", "test_acc")
# The columns of `trial_row`, in order: a table of an empty sweep still has them.
TRIAL_COLUMNS = ("run_id", "trial_id", "run_name", "status", "method", "alpha", "window", "fusion", "seed", "epochs",
                 *ROW_METRICS, "gap_av", "shapley_audio", "shapley_visual")


def number(value: Any) -> float | None:
    """`value` as a float; None when it is missing, not a number or NaN (params are strings)."""
    if value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


# Runs per search request of `child_runs`.
SEARCH_PAGE = 250


def child_runs(client: MlflowClient, parent_run_id: str, stage: str | None = None, trial_id: str | None = None,
               max_results: int = 10000, experiment_id: str | None = None) -> list[Run]:
    """The child runs of a sweep's parent run, in MLflow's default order (newest first).

    `stage`: only that stage's children; a run without the stage tag counts as "main" (MLflow's
    filter cannot say "missing or equal", so this one is applied here). `trial_id`: only that
    trial's run. `experiment_id`: the parent's experiment when the caller has it (saves a request).
    """
    if experiment_id is None:
        experiment_id = client.get_run(parent_run_id).info.experiment_id
    query = f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
    if trial_id is not None:
        query += f" and tags.`{TRIAL_TAG}` = '{trial_id}'"
    out: list[Run] = []
    token, seen = None, 0
    while seen < max_results:
        # Pages of SEARCH_PAGE runs: the store's row objects of one page at a time, not of a thousand runs.
        page = client.search_runs([experiment_id], filter_string=query, page_token=token,
                                  max_results=min(SEARCH_PAGE, max_results - seen))
        seen += len(page)
        out += [r for r in page if stage is None or r.data.tags.get(STAGE_TAG, MAIN_STAGE) == stage]
        token = page.token
        if not token:
            break
    return out


def logged_params(spec) -> dict[str, Any]:
    """The params a run of `spec` logs: its flattened spec (``method.*``, ``model.*``, ``train.*``, ...) and its
    method's derived run params (`Method.run_params`, e.g. OGM's ``ogm_scores_from``), which describe how the
    run went and are no setting (the report matches baselines on settings only)."""
    from orchestrator.specs import flatten
    from workers.methods import get_method

    return {**flatten(spec.model_dump(mode="json")), **get_method(spec.method.name).run_params(spec)}


def _window(params: dict[str, str]) -> str:
    """OGM's modulation window as "<starts>-<ends>" (epochs [starts, ends)); "" for other methods."""
    if "method.modulation_starts" not in params:
        return ""
    return f"{params['method.modulation_starts']}-{params.get('method.modulation_ends', '')}"


def trial_row(run: Run) -> dict[str, Any]:
    """One trial as a table row (columns `TRIAL_COLUMNS`): which run, the settings that label it,
    its final metrics. Missing values are None ("" for text fields)."""
    tags, params, m = run.data.tags, run.data.params, run.data.metrics
    have_heads = "acc_audio" in m and "acc_visual" in m
    return {
        "run_id": run.info.run_id, "trial_id": tags.get(TRIAL_TAG, ""), "run_name": run.info.run_name,
        "status": run.info.status,
        # A run whose params lack the method (logged by hand) still names it in avtune's run tag.
        "method": params.get(METHOD_PARAM, tags.get(METHOD_TAG, "")),
        "alpha": number(params.get("method.alpha")), "window": _window(params),
        "fusion": params.get(FUSION_PARAM, ""), "seed": params.get(SEED_PARAM, ""),
        # `epoch` is logged as the last epoch's index, so a run that logged nothing has 0 epochs.
        "epochs": int(m["epoch"]) + 1 if "epoch" in m else 0,
        **{k: m.get(k) for k in ROW_METRICS},
        "gap_av": m["acc_audio"] - m["acc_visual"] if have_heads else None,
        "shapley_audio": m.get("shapley_audio"), "shapley_visual": m.get("shapley_visual"),
    }


# A spreadsheet runs a cell that starts with one of these as a formula (`=HYPERLINK(...)` in a clip id or
# a run name): OWASP's CSV-injection list.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(frame):
    """`frame` (pandas) with every text cell that a spreadsheet would run as a formula prefixed with "'",
    which spreadsheets show as text; numbers (-0.5 is a float, not text) are left alone. For every CSV avtune
    writes for people: predictions.csv, trials.csv, imbalance_summary.csv."""
    def cell(value: Any) -> Any:
        return f"'{value}" if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value

    from pandas.api.types import is_numeric_dtype

    out = frame.copy()
    for column in out.columns:
        if not is_numeric_dtype(out[column]):  # object or pandas' own string dtype
            out[column] = out[column].map(cell)
    return out


def trials_frame_of(runs: list[Run], metric: str = "acc", mode: str = "max") -> pd.DataFrame:
    """One row per run, best `metric` first: the columns of `trial_row` plus `metric`."""
    import pandas as pd

    rows = []
    for run in runs:
        row = trial_row(run)
        row.setdefault(metric, run.data.metrics.get(metric))  # the search metric (e.g. ASHA on "loss") is always a column
        rows.append(row)
    frame = pd.DataFrame(rows, columns=list(dict.fromkeys([*TRIAL_COLUMNS, metric])))
    if not frame.empty:
        frame = frame.sort_values(metric, ascending=(mode == "min"), na_position="last").reset_index(drop=True)
    return frame


def trials_frame(client: MlflowClient, parent_run_id: str, metric: str = "acc", mode: str = "max",
                 stage: str | None = MAIN_STAGE) -> pd.DataFrame:
    """One row per child run of `stage` (all stages when None), best `metric` first: the columns of
    `trial_row` (method, alpha, window, fusion, accuracies, gap_av, status, ...). Lives here, not in
    `orchestrator.sweep`, so `avtune results` reads a sweep without importing torch and Ray."""
    return trials_frame_of(child_runs(client, parent_run_id, stage=stage or None), metric, mode)
