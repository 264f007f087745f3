"""Imbalance analysis of a sweep, from MLflow alone: utilisation, balance, plots and an HTML report.

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
* **Dominant modality**: the one whose head is more accurate in the normal joint model (mean
  over its seeds; all joint trials when the sweep has no normal run). The other one is "weak".
"""
from __future__ import annotations

import base64
import html
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

MODALITIES = ("audio", "visual")
UNIMODAL = {"audio": "audio_only", "visual": "visual_only"}
UNIMODAL_METHODS = tuple(UNIMODAL.values())
OGM_METHODS = ("ogm", "ogm_ge")
PARENT_TAG = "mlflow.parentRunId"  # same tags as orchestrator.sweep (not imported: it pulls in Ray)
STAGE_TAG = "avtune.stage"
SWEEP_KIND_TAG = "avtune.kind"
# Per-epoch metrics the report reads (each child logs more; only these are fetched).
HISTORY_KEYS = ("acc", "acc_audio", "acc_visual", "gap_av", "k_audio", "k_visual", "shapley_audio",
                "shapley_visual", "util_audio", "util_visual", "gblend_w_audio", "gblend_w_visual", "gblend_w_joint")
SUMMARY_FILE = "imbalance_summary.csv"
REPORT_DIR = "report"
# Params that never separate two trials' settings: the method's own fields and the seed are
# handled explicitly, the rest is bookkeeping.
SEED_PARAM = "train.seed"
FUSION_PARAM = "model.fusion"
BALANCE_UTIL = "min(util_audio, util_visual): utilisation of the less-used modality"
BALANCE_SHAPLEY = "1 - |shapley_audio - shapley_visual| / (|shapley_audio| + |shapley_visual|)"


# ---- reading a sweep from MLflow ----------------------------------------------------------


@dataclass
class SweepData:
    """A sweep's main-stage trials as logged in MLflow.

    ``trials``: one row per child run: run_id, run_name, status, method, alpha, window, fusion,
    seed, epochs, the final metrics, ``config`` (label of the trial's settings without the seed)
    and ``group`` (label of the non-method settings without the seed; "" when only methods vary).
    ``histories``: run_id -> per-epoch metrics (index = epoch). ``params``: run_id -> params.
    """

    parent_run_id: str
    experiment_name: str
    tracking_uri: str
    parent_metrics: dict[str, float]
    trials: pd.DataFrame
    histories: dict[str, pd.DataFrame]
    params: dict[str, dict[str, str]] = field(repr=False)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def _history(client: MlflowClient, run_id: str, keys: Iterable[str]) -> pd.DataFrame:
    columns = {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in keys}
    frame = pd.DataFrame(columns, dtype=float).sort_index()
    frame.index.name = "epoch"
    return frame


def _window(params: dict[str, str]) -> str:
    if "method.modulation_starts" not in params:
        return ""
    return f"{params['method.modulation_starts']}-{params['method.modulation_ends']}"


def load_sweep(client: MlflowClient, parent_run_id: str) -> SweepData:
    """Read a sweep's parent run and its main-stage child runs (their histories included)."""
    parent = client.get_run(parent_run_id)
    if parent.data.tags.get(SWEEP_KIND_TAG) != "sweep":
        raise ValueError(f"run {parent_run_id} is not a sweep's parent run (no tag {SWEEP_KIND_TAG}=sweep)")
    experiment = client.get_experiment(parent.info.experiment_id)
    runs = client.search_runs([parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                              max_results=10000)
    runs = [r for r in runs if r.data.tags.get(STAGE_TAG, "main") == "main"]
    params = {r.info.run_id: dict(r.data.params) for r in runs}
    # Settings that differ between trials (besides the method and the seed) name configurations.
    all_keys = sorted({k for p in params.values() for k in p})
    varying = [k for k in all_keys if len({p.get(k, "") for p in params.values()}) > 1]
    context_keys = [k for k in varying if not k.startswith("method.") and k != SEED_PARAM]
    rows, histories = [], {}
    for run in runs:
        p, m = params[run.info.run_id], run.data.metrics
        method = p.get("method.name", run.data.tags.get("avtune.method", ""))
        alpha = _number(p.get("method.alpha"))
        window = _window(p)
        group = ", ".join(f"{k.split('.', 1)[-1]}={p.get(k, '')}" for k in context_keys)
        config = method
        if alpha is not None:
            config += f" alpha={alpha:g}"
        if window:
            config += f" window={window}"
        if group:
            config += f" ({group})"
        keys = [k for k in HISTORY_KEYS if k in m]
        histories[run.info.run_id] = _history(client, run.info.run_id, keys) if keys else pd.DataFrame()
        rows.append({
            "run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status,
            "method": method, "alpha": alpha, "window": window, "fusion": p.get(FUSION_PARAM, ""),
            "seed": p.get(SEED_PARAM, ""), "epochs": int(m["epoch"]) + 1 if "epoch" in m else 0,
            "config": config, "group": group,
            **{k: m.get(k) for k in ("acc", "acc_audio", "acc_visual", "shapley_audio", "shapley_visual", "test_acc")},
        })
    trials = pd.DataFrame(rows, columns=["run_id", "run_name", "status", "method", "alpha", "window", "fusion", "seed",
                                         "epochs", "config", "group", "acc", "acc_audio", "acc_visual",
                                         "shapley_audio", "shapley_visual", "test_acc"])
    trials = trials.sort_values(["group", "method", "alpha", "window", "seed"], na_position="first").reset_index(drop=True)
    return SweepData(parent_run_id=parent_run_id, experiment_name=experiment.name,
                     tracking_uri=client._tracking_client.tracking_uri, parent_metrics=dict(parent.data.metrics),
                     trials=trials, histories=histories, params=params)


# ---- utilisation and balance --------------------------------------------------------------


def _is_joint(row: pd.Series) -> bool:
    return row["method"] not in UNIMODAL_METHODS and _number(row["acc_audio"]) is not None \
        and _number(row["acc_visual"]) is not None


def matching_baselines(sweep: SweepData, run_id: str, modality: str) -> tuple[list[str], str]:
    """Run ids of the uni-modal baselines of `modality` that a trial is compared with, and how
    they were matched: "same seed" (same params apart from the method, fusion aside when the
    baselines were not crossed with it), "mean over seeds" (same params apart from the seed),
    "mean over all baselines", or "none"."""
    trials = sweep.trials
    candidates = trials[(trials["method"] == UNIMODAL[modality]) & trials["acc"].notna()]["run_id"].tolist()
    if not candidates:
        return [], "none"
    mine = sweep.params[run_id]

    def context(params: dict[str, str], drop: tuple[str, ...]) -> dict[str, str]:
        return {k: v for k, v in params.items() if not k.startswith("method.") and k not in drop}

    for drop, how in (((), "same seed"), ((FUSION_PARAM,), "same seed"), ((FUSION_PARAM, SEED_PARAM), "mean over seeds")):
        found = [c for c in candidates if context(sweep.params[c], drop) == context(mine, drop)]
        if found:
            return found, how
    return candidates, "mean over all baselines"


def baseline_curve(sweep: SweepData, run_ids: list[str]) -> tuple[pd.Series, float]:
    """Per-epoch accuracy (mean over `run_ids`) and the mean of their final accuracies."""
    curves = [sweep.histories[r]["acc"] for r in run_ids if "acc" in sweep.histories[r]]
    curve = pd.concat(curves, axis=1).mean(axis=1) if curves else pd.Series(dtype=float)
    finals = sweep.trials.set_index("run_id").loc[run_ids, "acc"].astype(float)
    return curve, float(finals.mean())


def utilisation(sweep: SweepData) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Final utilisation per joint trial (columns util_audio, util_visual, baseline_audio,
    baseline_visual, match_audio, match_visual; index run_id) and per-epoch utilisation
    (run_id -> DataFrame with util_audio / util_visual, index epoch). See the module docstring."""
    finals, per_epoch = {}, {}
    for _, row in sweep.trials.iterrows():
        if not _is_joint(row):
            continue
        run_id, out, curves = row["run_id"], {}, {}
        hist = sweep.histories[run_id]
        for m in MODALITIES:
            baselines, how = matching_baselines(sweep, run_id, m)
            out[f"match_{m}"] = how
            if not baselines:
                continue
            curve, final = baseline_curve(sweep, baselines)
            out[f"baseline_{m}"] = final
            if final > 0:
                out[f"util_{m}"] = float(row[f"acc_{m}"]) / final
            if f"acc_{m}" in hist and not curve.empty:
                # Epochs the baseline never reached (e.g. stopped early) use its last epoch.
                reference = curve.reindex(hist.index).fillna(curve.iloc[-1])
                ratio = hist[f"acc_{m}"] / reference.where(reference > 0)
                curves[f"util_{m}"] = ratio
        finals[run_id] = out
        if curves:
            per_epoch[run_id] = pd.DataFrame(curves).dropna(how="all")
    frame = pd.DataFrame.from_dict(finals, orient="index")
    for col in ("util_audio", "util_visual", "baseline_audio", "baseline_visual", "match_audio", "match_visual"):
        if col not in frame:
            frame[col] = np.nan if not col.startswith("match") else "none"
    frame.index.name = "run_id"
    return frame, per_epoch


def shapley_balance(shapley_audio: float | None, shapley_visual: float | None) -> float | None:
    """1 - |phi_a - phi_v| / (|phi_a| + |phi_v|): 1 when both modalities add the same to joint accuracy."""
    a, v = _number(shapley_audio), _number(shapley_visual)
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
    joint = table.apply(_is_joint, axis=1)
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
    joint = table[table.apply(_is_joint, axis=1) & table[key].notna()]
    if joint.empty:
        return None
    return joint.sort_values([key, "acc"], ascending=False, kind="stable").iloc[0]


def log_sweep_imbalance(client: MlflowClient, parent_run_id: str, sweep: SweepData | None = None) -> pd.DataFrame:
    """Log utilisation into each joint child run (``util_audio`` / ``util_visual``, step = epoch;
    epochs already logged are skipped, so calling it twice is harmless) and, on the parent,
    ``imbalance_summary.csv`` plus tags and metrics for the best trial by joint accuracy
    (``best_by_acc/*``) and by balance (``best_by_balance/*``). Returns the summary table.

    `sweep`: the sweep as already read with :func:`load_sweep` (read here when None).
    """
    if sweep is None:
        sweep = load_sweep(client, parent_run_id)
    util, per_epoch = utilisation(sweep)
    table, definition = imbalance_summary(sweep, util)
    ts = int(time.time() * 1000)
    for run_id, curves in per_epoch.items():
        metrics = []
        for key in curves.columns:
            logged = {m.step for m in client.get_metric_history(run_id, key)}
            metrics += [Metric(key, float(v), ts, int(epoch)) for epoch, v in curves[key].dropna().items()
                        if int(epoch) not in logged]
        for i in range(0, len(metrics), 500):
            client.log_batch(run_id, metrics=metrics[i : i + 500])
    parent_metrics, tags = [], {"avtune.imbalance.balance_definition": definition}
    for label, key in (("best_by_acc", "acc"), ("best_by_balance", "balance")):
        best = _best(table, key)
        if best is None:
            continue
        tags[f"avtune.imbalance.{label}_run_id"] = best["run_id"]
        tags[f"avtune.imbalance.{label}_run_name"] = str(best["run_name"])
        for col in ("acc", "acc_audio", "acc_visual", "gap", "util_audio", "util_visual", "shapley_audio",
                    "shapley_visual", "balance"):
            value = _number(best[col])
            if value is not None:
                parent_metrics.append(Metric(f"{label}/{col}", value, ts, 0))
    for key, value in tags.items():
        client.set_tag(parent_run_id, key, value)
    if parent_metrics:
        client.log_batch(parent_run_id, metrics=parent_metrics)
    with tempfile.TemporaryDirectory() as tmp:
        table.to_csv(Path(tmp) / SUMMARY_FILE, index=False)
        client.log_artifact(parent_run_id, str(Path(tmp) / SUMMARY_FILE))
    return table


# ---- findings in words ----------------------------------------------------------------------


def _f(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


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


def findings(table: pd.DataFrame) -> list[dict[str, Any]]:
    """The comparisons the report states, per group of trials sharing their non-method settings.

    Each finding: ``{"id", "group", "text", **numbers}``; numbers are means over seeds.
    """
    out: list[dict[str, Any]] = []
    means = config_means(table)
    for group, configs in means.groupby("group", sort=False):
        prefix = f"[{group}] " if group else ""
        joint = configs[~configs["method"].isin(UNIMODAL_METHODS) & configs["acc_audio"].notna() & configs["acc_visual"].notna()]
        if joint.empty:
            continue
        normal = joint[joint["method"] == "normal"]
        reference = normal if not normal.empty else joint
        ref_name = "the normal joint model" if not normal.empty else "the joint trials"
        normal_acc = float((normal["acc"] * normal["n"]).sum() / normal["n"].sum()) if not normal.empty else None
        acc_a = float((reference["acc_audio"] * reference["n"]).sum() / reference["n"].sum())
        acc_v = float((reference["acc_visual"] * reference["n"]).sum() / reference["n"].sum())
        n_ref = int(reference["n"].sum())
        seeds = f" (mean over {n_ref} trials)" if n_ref > 1 else ""
        baselines = {m: configs[configs["method"] == UNIMODAL[m]] for m in MODALITIES}
        base_acc = {m: (float((b["acc"] * b["n"]).sum() / b["n"].sum()) if not b.empty else None) for m, b in baselines.items()}
        if acc_a == acc_v:
            out.append({"id": "dominance", "group": group, "dominant": None, "acc_audio": acc_a, "acc_visual": acc_v,
                        "text": f"{prefix}Neither modality dominates: in {ref_name} both heads reach {_f(acc_a)}{seeds}."})
            continue
        dominant = "audio" if acc_a > acc_v else "visual"
        weak = "visual" if dominant == "audio" else "audio"
        accs = {"audio": acc_a, "visual": acc_v}
        shap = {m: float((reference[f"shapley_{m}"] * reference["n"]).sum() / reference["n"].sum())
                if reference[f"shapley_{m}"].notna().all() else None for m in MODALITIES}
        text = (f"{prefix}{dominant.capitalize()} is the dominant modality: in {ref_name} its head reaches "
                f"{_f(accs[dominant])} against {_f(accs[weak])} for {weak}{seeds}")
        if shap["audio"] is not None and shap["visual"] is not None:
            text += f"; Shapley values of joint accuracy: audio {_f(shap['audio'])}, visual {_f(shap['visual'])}"
        if base_acc["audio"] is not None and base_acc["visual"] is not None:
            text += (f"; trained alone, audio reaches {_f(base_acc['audio'])} (audio_only) and visual "
                     f"{_f(base_acc['visual'])} (visual_only)")
        out.append({"id": "dominance", "group": group, "dominant": dominant, "weak": weak, "acc_audio": acc_a,
                    "acc_visual": acc_v, "shapley_audio": shap["audio"], "shapley_visual": shap["visual"],
                    "text": text + "."})

        if not normal.empty and base_acc[weak] is not None:
            util = accs[weak] / base_acc[weak] if base_acc[weak] > 0 else None
            verdict = ("below" if accs[weak] < base_acc[weak] else "not below")
            tail = (f": the joint model under-uses the {weak} modality" if verdict == "below"
                    else f": no under-use of the {weak} modality shows in this sweep")
            out.append({"id": "weak_vs_unimodal", "group": group, "weak": weak, "normal_weak_acc": accs[weak],
                        "unimodal_acc": base_acc[weak], "utilisation": util, "below": verdict == "below",
                        "text": f"{prefix}The normal joint model's {weak} head reaches {_f(accs[weak])}, {verdict} the "
                                f"{UNIMODAL[weak]} baseline's {_f(base_acc[weak])} (utilisation {_f(util)}){tail}."})

        ogm = joint[joint["method"].isin(OGM_METHODS)]
        if not normal.empty and not ogm.empty:
            best = ogm.sort_values([f"acc_{weak}", "acc"], ascending=False, kind="stable").iloc[0]
            delta = float(best[f"acc_{weak}"]) - accs[weak]
            change = "raises" if delta > 0 else ("leaves" if delta == 0 else "lowers")
            text = (f"{prefix}The best OGM/OGM-GE trial for the {weak} modality, {best['config']}, {change} the {weak} "
                    f"head's accuracy {'from' if delta else 'at'} {_f(accs[weak])} (normal)"
                    + (f" to {_f(float(best[f'acc_{weak}']))} ({delta:+.3f})" if delta else "")
                    + f"; its joint accuracy is {_f(float(best['acc']))} against {_f(normal_acc)} for normal.")
            out.append({"id": "ogm_vs_normal", "group": group, "weak": weak, "config": best["config"],
                        "ogm_weak_acc": float(best[f"acc_{weak}"]), "normal_weak_acc": accs[weak], "delta": delta,
                        "ogm_acc": float(best["acc"]), "normal_acc": normal_acc, "text": text})

        # Trade-off: the configuration with the highest joint + weak-head accuracy (equal weights).
        score = joint["acc"] + joint[f"acc_{weak}"]
        best = joint.loc[score.idxmax()]
        text = (f"{prefix}Best trade-off (highest joint + {weak}-head accuracy): {best['config']}, joint "
                f"{_f(float(best['acc']))}, {weak} head {_f(float(best[f'acc_{weak}']))}")
        if not normal.empty and best["method"] != "normal":
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
                                "accuracy: " + " | ".join(w["text"] for w in windows) + "."})
        elif not ogm.empty:
            out.append({"id": "window", "group": group, "weak": weak, "by_alpha": [],
                        "text": f"{prefix}Only one modulation window per alpha was run; search "
                                "method.modulation_ends to see how the window trades joint for weak-modality accuracy."})
    return out


# ---- plots ----------------------------------------------------------------------------------


def _figure(width: float, height: float):
    # The object-oriented API with the Agg canvas: no pyplot, no global figure state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _epoch_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)


def _colours(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(max(n, 1))]


def _short(row: pd.Series) -> str:
    label = row["config"]
    if row["seed"] not in ("", None) and (row.get("_seeds", 1) or 1) > 1:
        label += f" s{row['seed']}"
    return label


def plot_modality_curves(sweep: SweepData, path: Path) -> Path | None:
    """acc_audio / acc_visual vs epoch: one column per joint method, one line per trial, the
    uni-modal baselines dashed in every panel of their modality."""
    trials = sweep.trials.assign(_seeds=sweep.trials.groupby("config")["run_id"].transform("count"))
    joint = trials[trials.apply(_is_joint, axis=1)]
    if joint.empty:
        return None
    methods = list(dict.fromkeys(joint["method"]))
    fig = _figure(4.2 * len(methods), 6.4)
    axes = fig.subplots(2, len(methods), squeeze=False, sharey=True)
    baselines = {m: trials[trials["method"] == UNIMODAL[m]] for m in MODALITIES}
    for col, method in enumerate(methods):
        rows = joint[joint["method"] == method]
        colours = _colours(len(rows))
        for r, m in enumerate(MODALITIES):
            ax = axes[r][col]
            for colour, (_, row) in zip(colours, rows.iterrows()):
                hist = sweep.histories[row["run_id"]]
                if f"acc_{m}" in hist:
                    ax.plot(hist.index, hist[f"acc_{m}"], marker="o", ms=3, color=colour, label=_short(row))
            for _, base in baselines[m].iterrows():
                hist = sweep.histories[base["run_id"]]
                if "acc" in hist:
                    ax.plot(hist.index, hist["acc"], ls="--", color="black", alpha=0.7, label=f"{_short(base)} (alone)")
            ax.set_title(f"{method}: {m} head")
            _epoch_axis(ax)
            ax.set_ylabel(f"acc_{m} (val)")
            ax.legend(fontsize=6)
    fig.suptitle("Per-modality accuracy inside the joint model (dashed: uni-modal baselines)")
    fig.savefig(path, dpi=90)
    return path


def plot_gap(sweep: SweepData, path: Path) -> Path | None:
    """gap_av = acc_audio - acc_visual vs epoch, one line per joint trial."""
    trials = sweep.trials.assign(_seeds=sweep.trials.groupby("config")["run_id"].transform("count"))
    joint = trials[trials.apply(_is_joint, axis=1)]
    if joint.empty:
        return None
    fig = _figure(7.5, 4.2)
    ax = fig.subplots()
    for colour, (_, row) in zip(_colours(len(joint)), joint.iterrows()):
        hist = sweep.histories[row["run_id"]]
        if {"acc_audio", "acc_visual"} <= set(hist.columns):
            ax.plot(hist.index, hist["acc_audio"] - hist["acc_visual"], marker="o", ms=3, color=colour, label=_short(row))
    ax.axhline(0, color="grey", lw=0.8)
    _epoch_axis(ax)
    ax.set_ylabel("gap_av = acc_audio - acc_visual")
    ax.set_title("Audio-visual accuracy gap of the joint model's heads")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=90)
    return path


def plot_utilisation(sweep: SweepData, per_epoch: dict[str, pd.DataFrame], path: Path) -> Path | None:
    if not per_epoch:
        return None
    trials = sweep.trials.assign(_seeds=sweep.trials.groupby("config")["run_id"].transform("count")).set_index("run_id")
    fig = _figure(10, 4.2)
    axes = fig.subplots(1, 2, sharey=True)
    colours = _colours(len(per_epoch))
    for colour, (run_id, curves) in zip(colours, per_epoch.items()):
        row = trials.loc[run_id].copy()
        row["run_id"] = run_id
        for ax, m in zip(axes, MODALITIES):
            if f"util_{m}" in curves:
                ax.plot(curves.index, curves[f"util_{m}"], marker="o", ms=3, color=colour, label=_short(row))
    for ax, m in zip(axes, MODALITIES):
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(f"util_{m} = acc_{m} (joint) / {UNIMODAL[m]} acc")
        _epoch_axis(ax)
    axes[0].set_ylabel("utilisation")
    # A sweep with one uni-modal baseline has curves on one side only: the legend goes where they are.
    drawn = [ax for ax in axes if ax.get_legend_handles_labels()[0]]
    if drawn:
        drawn[-1].legend(fontsize=7)
    fig.savefig(path, dpi=90)
    return path


def plot_ogm_coefficients(sweep: SweepData, path: Path) -> Path | None:
    """k_audio / k_visual (epoch means of OGM's coefficients) vs epoch, one line per alpha / window."""
    trials = sweep.trials.assign(_seeds=sweep.trials.groupby("config")["run_id"].transform("count"))
    ogm = trials[trials["method"].isin(OGM_METHODS)]
    ogm = ogm[[("k_audio" in sweep.histories[r]) for r in ogm["run_id"]]]
    if ogm.empty:
        return None
    fig = _figure(10, 4.2)
    axes = fig.subplots(1, 2, sharey=True)
    alphas = sorted(ogm["alpha"].dropna().unique())
    cmap = _colours(len(alphas))
    styles = ["-", "--", ":", "-."]
    windows = sorted(ogm["window"].unique())
    for _, row in ogm.iterrows():
        hist = sweep.histories[row["run_id"]]
        colour = cmap[alphas.index(row["alpha"])] if row["alpha"] in alphas else "black"
        for ax, m in zip(axes, MODALITIES):
            ax.plot(hist.index, hist[f"k_{m}"], marker="o", ms=3, color=colour,
                    ls=styles[windows.index(row["window"]) % len(styles)], label=_short(row))
    for ax, m in zip(axes, MODALITIES):
        ax.set_title(f"k_{m} (1 = not damped)")
        _epoch_axis(ax)
    axes[0].set_ylabel("mean modulation coefficient")
    axes[1].legend(fontsize=7)
    fig.suptitle("OGM coefficients per alpha (colour) and modulation window (line style)")
    fig.savefig(path, dpi=90)
    return path


def _weak(table: pd.DataFrame) -> str | None:
    for item in findings(table):
        if item["id"] == "dominance" and item.get("weak"):
            return item["weak"]
    return None


def plot_ablation(table: pd.DataFrame, by: str, path: Path) -> Path | None:
    """Final joint accuracy and weak-modality accuracy of OGM/OGM-GE vs `by` ("alpha" or "window"),
    one line per value of the other field, normal as horizontal lines (OGM-GE paper, Fig. 5 / Table 4 shapes)."""
    weak = _weak(table)
    means = config_means(table)
    ogm = means[means["method"].isin(OGM_METHODS)]
    if weak is None or ogm.empty or ogm[by].nunique() < 1:
        return None
    other = "window" if by == "alpha" else "alpha"
    normal = means[means["method"] == "normal"]
    fig = _figure(10, 4.2)
    axes = fig.subplots(1, 2, sharey=True)
    if by == "window":
        order = sorted(ogm["window"].unique(), key=lambda w: tuple(int(x) for x in w.split("-")))
        position = {w: i for i, w in enumerate(order)}
    for ax, key, title in ((axes[0], "acc", "joint accuracy"), (axes[1], f"acc_{weak}", f"{weak} head accuracy (weak)")):
        lines = list(ogm.groupby(["method", other], sort=True))
        for colour, ((method, value), same) in zip(_colours(len(lines)), lines):
            same = same.copy()
            same["_x"] = same[by].astype(float) if by == "alpha" else same["window"].map(position)
            same = same.sort_values("_x")
            label = f"{method}, {other}={value:g}" if other == "alpha" else f"{method}, {other}={value}"
            ax.plot(same["_x"], same[key], marker="o", color=colour, label=label)
        for _, row in normal.iterrows():
            ax.axhline(row[key], color="black", ls="--", lw=1, label=f"normal ({row['config']})" if row["group"] else "normal")
        ax.set_title(title)
        ax.set_xlabel("alpha" if by == "alpha" else "modulation window [starts-ends)")
        if by == "window":
            ax.set_xticks(range(len(order)), order)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final validation accuracy (mean over seeds)")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"OGM/OGM-GE ablation over {by}")
    fig.savefig(path, dpi=90)
    return path


def plot_shapley(table: pd.DataFrame, path: Path) -> Path | None:
    """Final two-player Shapley values of joint accuracy, per trial (grouped bars)."""
    rows = table[table["shapley_audio"].notna() & table["shapley_visual"].notna()]
    if rows.empty:
        return None
    labels = [f"{c}" + (f" s{s}" if (table["config"] == c).sum() > 1 else "") for c, s in zip(rows["config"], rows["seed"])]
    fig = _figure(max(6.0, 0.9 * len(rows) + 2), 4.6)
    ax = fig.subplots()
    x = np.arange(len(rows))
    ax.bar(x - 0.2, rows["shapley_audio"].astype(float), 0.4, label="audio", color="tab:blue")
    ax.bar(x + 0.2, rows["shapley_visual"].astype(float), 0.4, label="visual", color="tab:orange")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("Shapley value of joint accuracy")
    ax.set_title("Each modality's contribution to joint accuracy (final epoch, validation)")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=90)
    return path


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


def plot_gblend(weights: dict[str, float] | None, path: Path) -> Path | None:
    if not weights:
        return None
    fig = _figure(5, 3.6)
    ax = fig.subplots()
    names = list(weights)
    bars = ax.bar(names, [weights[n] for n in names], color=["tab:blue", "tab:orange", "tab:green"][: len(names)])
    for bar, name in zip(bars, names):
        ax.annotate(f"{weights[name]:.3f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    ax.set_ylabel("blend weight")
    ax.set_title("G-Blend loss weights per head")
    fig.savefig(path, dpi=90)
    return path


# ---- the HTML page --------------------------------------------------------------------------


TABLE_COLUMNS = ["run_name", "status", "method", "alpha", "window", "fusion", "seed", "epochs", "acc", "acc_audio",
                 "acc_visual", "gap", "util_audio", "util_visual", "shapley_audio", "shapley_visual", "balance"]


def _html_table(frame: pd.DataFrame, columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for _, row in frame.iterrows():
        cells = []
        for c in columns:
            v = row.get(c)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                text = ""
            elif isinstance(v, (float, np.floating)):
                text = f"{v:g}" if c == "alpha" else f"{v:.3f}"
            else:
                text = str(v)
            cells.append(f"<td>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure id="fig-{html.escape(path.stem)}"><img alt="{html.escape(caption)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)} '
            f'(<code>{html.escape(path.name)}</code>)</figcaption></figure>')


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;font-size:12px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f0f0f0}td:nth-child(-n+3),th:nth-child(-n+3){text-align:left}figure{margin:1.5em 0}img{max-width:100%;border:1px solid #ddd}
li{margin:.4em 0}code{background:#f4f4f4;padding:0 3px}.meta{color:#666;font-size:13px}"""


def render_html(sweep: SweepData, table: pd.DataFrame, definition: str, items: list[dict[str, Any]],
                figures: list[tuple[Path, str]], weights: dict[str, float] | None) -> str:
    title = f"avtune imbalance report: {sweep.experiment_name}"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p class='meta'>sweep parent run <code>{sweep.parent_run_id}</code>, {len(table)} trials, "
             f"tracking URI <code>{html.escape(sweep.tracking_uri)}</code>, generated {stamp}. "
             "All accuracies are on the validation split at the last epoch; numbers in the findings are means over seeds.</p>",
             "<h2>Findings</h2><ul>"]
    parts += [f"<li id='{html.escape(i['id'])}'>{html.escape(i['text'])}</li>" for i in items]
    if not items:
        parts.append("<li>No joint audio-visual trial with per-modality accuracies in this sweep.</li>")
    parts.append("</ul>")
    parts.append("<h2>Definitions</h2><ul>"
                 "<li><b>utilisation</b> util_m = accuracy of modality m's head inside the joint model / accuracy of the "
                 "matching uni-modal baseline (same seed when the sweep has it, else mean over seeds), per epoch and final.</li>"
                 f"<li><b>balance</b> = {html.escape(definition)}.</li>"
                 "<li><b>Shapley values</b>: two-player Shapley values of joint accuracy, a modality masked by zero input.</li>"
                 "<li><b>dominant modality</b>: the one whose head is more accurate in the normal joint model.</li></ul>")
    parts.append("<h2>Trials</h2>" + _html_table(table, TABLE_COLUMNS))
    means = config_means(table)
    if (means["n"] > 1).any():
        parts.append("<h3>Means over seeds</h3>" + _html_table(
            means, ["config", "n", "acc", "acc_audio", "acc_visual", "gap", "util_audio", "util_visual", "balance"]))
    if weights:
        parts.append("<p>G-Blend weights: " + ", ".join(f"{k} {v:.3f}" for k, v in weights.items()) + "</p>")
    parts.append("<h2>Plots</h2>")
    parts += [_img(path, caption) for path, caption in figures]
    parts.append("</body></html>")
    return "\n".join(parts)


def resolve_sweep(client: MlflowClient, experiment: str, sweep_run_id: str | None = None) -> str:
    """The sweep's parent run id: `sweep_run_id` checked to belong to `experiment`, or the
    experiment's latest sweep. Raises ValueError naming what was not found."""
    uri = client._tracking_client.tracking_uri
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
        raise ValueError(f"sweep run {sweep_run_id!r} not found at tracking URI {uri}: {err}") from None
    if run.info.experiment_id != exp.experiment_id:
        raise ValueError(f"sweep run {sweep_run_id} belongs to another experiment than {experiment!r}")
    return sweep_run_id


def default_report_dir(runs_dir: Path, experiment: str, sweep_run_id: str) -> Path:
    return Path(runs_dir) / "reports" / f"{experiment}-{sweep_run_id[:8]}"


def build_report(experiment: str, sweep_run_id: str | None = None, tracking_uri: str | None = None,
                 out_dir: Path | None = None, log_to_mlflow: bool = True) -> Path:
    """Write the imbalance report of a sweep (default: the experiment's latest) and return the
    path of ``report.html``.

    Reads MLflow only (`tracking_uri` default: MLFLOW_TRACKING_URI, else ``runs/mlflow.db``).
    Writes PNG plots, ``report.html`` (self-contained: images embedded),
    ``imbalance_summary.csv`` and ``findings.json`` into `out_dir` (default
    ``runs/reports/<experiment>-<run id prefix>``). With `log_to_mlflow`, also logs utilisation
    into the child runs and the summary on the parent (:func:`log_sweep_imbalance`), and the
    report's files as artifacts under ``report/`` of the sweep's parent run.
    """
    from orchestrator.tracking import resolve_tracking_uri

    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri, Path("runs")))
    sweep_run_id = resolve_sweep(client, experiment, sweep_run_id)
    sweep = load_sweep(client, sweep_run_id)
    if log_to_mlflow:
        log_sweep_imbalance(client, sweep_run_id, sweep)
    util, per_epoch = utilisation(sweep)
    table, definition = imbalance_summary(sweep, util)
    items = findings(table)

    out = Path(out_dir) if out_dir is not None else default_report_dir(Path("runs"), experiment, sweep_run_id)
    out.mkdir(parents=True, exist_ok=True)
    weights = gblend_weights(sweep)
    planned = [
        (lambda p: plot_modality_curves(sweep, p), "acc_per_modality.png",
         "acc_audio / acc_visual vs epoch per method, one line per trial; dashed: uni-modal baselines"),
        (lambda p: plot_gap(sweep, p), "gap.png", "acc_audio - acc_visual vs epoch"),
        (lambda p: plot_utilisation(sweep, per_epoch, p), "utilisation.png", "utilisation vs epoch (1 = as good as alone)"),
        (lambda p: plot_ogm_coefficients(sweep, p), "ogm_coefficients.png", "OGM k_audio / k_visual vs epoch for each alpha (computed every epoch, applied only inside the modulation window)"),
        (lambda p: plot_ablation(table, "alpha", p), "ablation_alpha.png",
         "final joint and weak-modality accuracy vs alpha (dashed: normal)"),
        (lambda p: plot_ablation(table, "window", p), "ablation_window.png",
         "final joint and weak-modality accuracy vs modulation window (dashed: normal)"),
        (lambda p: plot_shapley(table, p), "shapley.png", "final Shapley values of joint accuracy per trial"),
        (lambda p: plot_gblend(weights, p), "gblend_weights.png", "G-Blend loss weights"),
    ]
    figures = []
    for plot, name, caption in planned:
        (out / name).unlink(missing_ok=True)  # a plot that no longer applies must not linger from an older report
        path = plot(out / name)
        if path is not None:
            figures.append((path, caption))
    table.to_csv(out / SUMMARY_FILE, index=False)
    (out / "findings.json").write_text(json.dumps(
        {"parent_run_id": sweep_run_id, "experiment": experiment, "balance_definition": definition, "findings": items},
        indent=2, default=str))
    report = out / "report.html"
    report.write_text(render_html(sweep, table, definition, items, figures, weights), encoding="utf-8")
    if log_to_mlflow:
        for path in [report, out / SUMMARY_FILE, out / "findings.json", *(p for p, _ in figures)]:
            client.log_artifact(sweep_run_id, str(path), artifact_path=REPORT_DIR)
    return report.resolve()
