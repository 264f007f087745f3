"""Comparisons with their uncertainty: per configuration, the mean and a 95% interval over seeds; between
two configurations, a paired test on the same seeds and the same validation clips.

A configuration's trials are its runs over seeds (``config`` of :class:`SweepData`'s trials). Two
configurations are compared on the seeds both have, and on the clips both logged (each trial's
``predictions.csv``, the final model on the validation split): per seed and clip, whether each was
right; ``stats.paired_bootstrap`` resamples seeds and clips. A sweep logged without predictions falls
back to a paired t over the seeds' final accuracies. An interval that covers 0 is reported as "not
distinguishable on this data".
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from orchestrator.report.stats import (PairedComparison, detectable_difference, paired_bootstrap, paired_seed_t_interval,
                                       t_interval)

PREDICTIONS_FILE = "predictions.csv"
CONFIDENCE = 0.95
# A metric and the prediction column behind it.
PRED_COLUMN = {"acc": "pred", "acc_audio": "pred_audio", "acc_visual": "pred_visual"}


def load_predictions(client: MlflowClient, run_id: str) -> pd.DataFrame | None:
    """The run's per-clip validation predictions of its final model; None when it logged none."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, PREDICTIONS_FILE, tmp)
        except Exception:  # noqa: BLE001 - no such artifact (older or foreign runs): fall back to seeds
            return None
        frame = pd.read_csv(Path(path), dtype={"clip_id": str})
    frame = frame[(frame["split"] == "val") & (frame["model"] == "final")]
    return frame.set_index("clip_id") if not frame.empty else None


def config_intervals(table: pd.DataFrame, keys: tuple[str, ...] = ("acc", "acc_audio", "acc_visual")) -> pd.DataFrame:
    """Per (group, config): n seeds and, for each key, mean, low and high of a t-interval over seeds."""
    done = table[table["acc"].notna()]
    rows = []
    for (group, config), trials in done.groupby(["group", "config"], sort=False, dropna=False):
        row = {"group": group, "config": config, "method": trials["method"].iloc[0], "n": len(trials)}
        for key in keys:
            interval = t_interval(trials[key].astype(float).tolist(), CONFIDENCE)
            row.update({key: interval.mean, f"{key}_low": interval.low, f"{key}_high": interval.high})
        rows.append(row)
    return pd.DataFrame(rows)


def _outcomes(predictions: dict[str, pd.DataFrame | None], run_by_seed: dict[str, str], seeds: list[str],
              column: str) -> dict[str, pd.Series] | None:
    out = {}
    for seed in seeds:
        frame = predictions.get(run_by_seed[seed])
        if frame is None or column not in frame or (frame[column] < 0).all():
            return None
        out[seed] = (frame[column] == frame["label"]).astype(float)
    return out


def compare(table: pd.DataFrame, predictions: dict[str, pd.DataFrame | None], config_a: str, config_b: str,
            metric_a: str, metric_b: str | None = None) -> PairedComparison | None:
    """`metric_a` of configuration `config_a` minus `metric_b` (default the same) of `config_b`, paired on
    their common seeds and validation clips. None when they share no seed."""
    metric_b = metric_b or metric_a
    runs = {}
    for config in (config_a, config_b):
        trials = table[(table["config"] == config) & table["acc"].notna()]
        runs[config] = dict(zip(trials["seed"].astype(str), trials["run_id"]))
    seeds = sorted(set(runs[config_a]) & set(runs[config_b]))
    if not seeds:
        return None
    a = _outcomes(predictions, runs[config_a], seeds, PRED_COLUMN[metric_a])
    b = _outcomes(predictions, runs[config_b], seeds, PRED_COLUMN[metric_b])
    if a is not None and b is not None:
        clips = sorted(set.intersection(*(set(s.index) for s in (*a.values(), *b.values()))))
        if clips:
            return paired_bootstrap(np.stack([a[s].loc[clips].to_numpy() for s in seeds]),
                                    np.stack([b[s].loc[clips].to_numpy() for s in seeds]), confidence=CONFIDENCE)
    final = table.set_index("run_id")
    return paired_seed_t_interval([float(final.loc[runs[config_a][s], metric_a]) for s in seeds],
                                  [float(final.loc[runs[config_b][s], metric_b]) for s in seeds], CONFIDENCE)


def describe(result: PairedComparison) -> str:
    """"+0.052, 95% CI +0.021 to +0.083, p = 0.002 (paired bootstrap over 3 seeds and 120 clips)"."""
    if np.isnan(result.low):
        return f"{result.difference:+.3f}, no interval ({result.method})"
    return (f"{result.difference:+.3f}, {result.confidence:.0%} CI {result.low:+.3f} to {result.high:+.3f}, "
            f"p = {result.p_value:.2g} ({result.method})")


def verdict(result: PairedComparison | None) -> str:
    """"higher" / "lower" when the interval excludes 0, else "not distinguishable"."""
    if result is None or not result.distinguishable:
        return "not distinguishable"
    return "higher" if result.difference > 0 else "lower"


def against_normal(table: pd.DataFrame, predictions: dict[str, pd.DataFrame | None]) -> pd.DataFrame:
    """Every joint configuration of each group against that group's normal configuration, paired, for acc,
    acc_audio and acc_visual: columns config, metric, difference, low, high, p_value, verdict, method."""
    rows = []
    for group, trials in table[table["acc"].notna()].groupby("group", sort=False, dropna=False):
        normal = trials.loc[trials["method"] == "normal", "config"].unique()
        if len(normal) != 1:
            continue
        joint = trials[trials["acc_audio"].notna() & trials["acc_visual"].notna() & (trials["method"] != "normal")]
        for config in joint["config"].unique():
            for metric in PRED_COLUMN:
                result = compare(table, predictions, config, normal[0], metric)
                if result is None:
                    continue
                rows.append({"group": group, "config": config, "metric": metric, "difference": result.difference,
                             "low": result.low, "high": result.high, "p_value": result.p_value,
                             "verdict": verdict(result), "method": result.method})
    return pd.DataFrame(rows, columns=["group", "config", "metric", "difference", "low", "high", "p_value", "verdict",
                                       "method"])


def config_summary(table: pd.DataFrame, predictions: dict[str, pd.DataFrame | None]) -> pd.DataFrame:
    """One row per configuration: n seeds, mean and 95% t-interval over seeds of acc / acc_audio /
    acc_visual, and for joint configurations the paired difference from the group's normal
    configuration (``d_<metric>``, ``d_<metric>_low`` / ``_high``, ``p_<metric>``, ``vs_normal_<metric>``)."""
    summary = config_intervals(table)
    if summary.empty:
        return summary
    paired = against_normal(table, predictions)
    for _, row in paired.iterrows():
        at = summary.index[summary["config"] == row["config"]]
        m = row["metric"]
        summary.loc[at, [f"d_{m}", f"d_{m}_low", f"d_{m}_high", f"p_{m}"]] = \
            [row["difference"], row["low"], row["high"], row["p_value"]]
        summary.loc[at, f"vs_normal_{m}"] = row["verdict"]
        summary.loc[at, "paired_test"] = row["method"]
    return summary


def format_interval(mean: float, low: float, high: float) -> str:
    """"0.812 [0.790, 0.834]"; the mean alone when there is no interval (one seed)."""
    if mean is None or pd.isna(mean):
        return ""
    if pd.isna(low) or pd.isna(high):
        return f"{mean:.3f}"
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def power(table: pd.DataFrame, predictions: dict[str, pd.DataFrame | None], reference: str) -> dict | None:
    """What this sweep can resolve against configuration `reference` (normal): its seeds, the validation clips
    they share, the observed discordance (the share of seed x clip outcomes on which a compared joint
    configuration and the reference disagree, pooled over acc / acc_audio / acc_visual) and the
    smallest paired difference detectable at 80% power, 5% two-sided (``stats.detectable_difference``)."""
    done = table[table["acc"].notna()]
    ref = dict(zip(done.loc[done["config"] == reference, "seed"].astype(str), done.loc[done["config"] == reference, "run_id"]))
    others = done[(done["config"] != reference) & done["acc_audio"].notna() & done["acc_visual"].notna()]
    if not ref or others.empty or any(predictions.get(r) is None for r in ref.values()):
        return None
    clips = sorted(set.intersection(*(set(predictions[r].index) for r in ref.values())))
    disagree, total = 0.0, 0
    for _, row in others.iterrows():
        mine, theirs = predictions.get(row["run_id"]), predictions[ref.get(str(row["seed"]), "")] \
            if str(row["seed"]) in ref else None
        if mine is None or theirs is None:
            continue
        shared = sorted(set(mine.index) & set(clips))
        for column in PRED_COLUMN.values():
            a = mine.loc[shared, column] == mine.loc[shared, "label"]
            b = theirs.loc[shared, column] == theirs.loc[shared, "label"]
            disagree += float((a != b).sum())
            total += len(shared)
    if total == 0 or disagree == 0:
        return None
    rate = disagree / total
    return {"n_seeds": len(ref), "n_clips": len(clips), "discordant_rate": rate,
            "detectable": detectable_difference(len(clips), len(ref), rate)}
