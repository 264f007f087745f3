"""The leaderboard: one row per configuration (in a method comparison, one per method), side by side.

Per row, over the seeds of that configuration (t-intervals, `orchestrator.report.stats`):
joint / audio-head / visual-head validation accuracy (mean and 95% interval), the utilisation of the
weak modality (its head's accuracy over its uni-modal baseline's; see `analysis`), the Shapley balance
``1 - |phi_a - phi_v| / (|phi_a| + |phi_v|)``, the training seconds per epoch, and the paired difference of
joint accuracy (and of the weak head) from the normal configuration of the same group (same seeds, same
validation clips: `comparisons.report_tests`) with its interval, raw and Holm-adjusted p-value, the seeds
it paired on, and the verdict (from the adjusted p-value), and the share of the headroom above normal it
recovers against the uni-modal ensemble and the ceiling (`references.headroom`: Fieller's interval over
seeds). The weak modality is `comparisons.weak_modality`'s: none when the normal model's heads are not
distinguishable.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from orchestrator.report.analysis import MODALITIES, SweepData, shapley_balance
from orchestrator.report.comparisons import CONFIDENCE, format_p
from orchestrator.report.references import KINDS, format_ratio
from orchestrator.report.stats import t_interval

# On the parent run: the table as shown (MLflow's artifact view renders a CSV as a table) and its numbers.
LEADERBOARD_FILE = "leaderboard.csv"
LEADERBOARD_NUMBERS_FILE = "leaderboard_numbers.csv"
COLUMNS = ["group", "config", "method", "n", "acc", "acc_low", "acc_high", "acc_audio", "acc_audio_low",
           "acc_audio_high", "acc_visual", "acc_visual_low", "acc_visual_high", "weak", "util_weak",
           "util_weak_low", "util_weak_high", "shapley_balance", "train_seconds_per_epoch", "d_acc", "d_acc_low",
           "d_acc_high", "p_acc", "p_holm_acc", "n_paired_acc", "vs_normal_acc", "d_weak", "d_weak_low", "d_weak_high",
           "p_weak", "p_holm_weak", "n_paired_weak", "vs_normal_weak",
           *(f"headroom_{kind}{part}" for kind in KINDS for part in ("", "_low", "_high", "_status", "_n"))]


def train_seconds(sweep: SweepData, run_id: str) -> float | None:
    """Mean training seconds per epoch of one run (its `train_seconds` history)."""
    history = sweep.histories.get(run_id)
    if history is None or "train_seconds" not in history:
        return None
    values = history["train_seconds"].dropna()
    return float(values.mean()) if not values.empty else None


def _interval(values: list[float]) -> tuple[float, float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return (np.nan, np.nan, np.nan)
    interval = t_interval(values, CONFIDENCE)
    return interval.mean, interval.low, interval.high


def leaderboard(sweep: SweepData, table: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration of the sweep (columns `COLUMNS`), joint accuracy first, per group.

    `table`: `analysis.imbalance_summary(sweep)`; `summary`: `comparisons.config_summary` of it (its
    intervals, weak modality and Holm-adjusted comparisons with normal)."""
    rows = []
    done = table[table["acc"].notna()]
    for group, trials in done.groupby("group", sort=False, dropna=False):
        for config, runs in trials.groupby("config", sort=False):
            paired = summary[(summary["config"] == config) & (summary["group"] == group)] if not summary.empty else summary
            weak = paired["weak"].iloc[0] if not paired.empty and "weak" in paired else None
            weak = weak if isinstance(weak, str) else None
            row: dict = {"group": group, "config": config, "method": runs["method"].iloc[0], "n": len(runs), "weak": weak}
            # The accuracies' intervals are the configuration summary's (comparisons.config_intervals).
            for key in ("acc", "acc_audio", "acc_visual"):
                for column in (key, f"{key}_low", f"{key}_high"):
                    row[column] = paired[column].iloc[0] if not paired.empty else np.nan
            if weak is not None and f"util_{weak}" in runs:
                row["util_weak"], row["util_weak_low"], row["util_weak_high"] = \
                    _interval(runs[f"util_{weak}"].astype(float).tolist())
            balances = [shapley_balance(a, v) for a, v in zip(runs["shapley_audio"], runs["shapley_visual"])]
            balances = [b for b in balances if b is not None]
            row["shapley_balance"] = float(np.mean(balances)) if balances else np.nan
            seconds = [s for s in (train_seconds(sweep, r) for r in runs["run_id"]) if s is not None]
            row["train_seconds_per_epoch"] = float(np.mean(seconds)) if seconds else np.nan
            for target, metric in (("acc", "acc"), ("weak", f"acc_{weak}" if weak else None)):
                if metric is None or paired.empty or f"d_{metric}" not in paired or pd.isna(paired[f"d_{metric}"].iloc[0]):
                    continue
                for part in ("d_{}", "d_{}_low", "d_{}_high", "p_{}", "p_holm_{}", "n_paired_{}", "vs_normal_{}"):
                    row[part.format(target)] = paired[part.format(metric)].iloc[0]
            for column in COLUMNS:
                if column.startswith("headroom_") and not paired.empty and column in paired:
                    row[column] = paired[column].iloc[0]
            rows.append(row)
    board = pd.DataFrame(rows, columns=COLUMNS)
    return board.sort_values(["group", "acc"], ascending=[True, False], kind="stable").reset_index(drop=True)


def _pm(mean: float, low: float, high: float) -> str:
    """"0.889 ±0.015" (a t-interval is symmetric about the mean); "0.990 [0.950, 1.000]" when cut at 0 or 1;
    the mean alone without an interval (one seed, or no spread)."""
    if mean is None or pd.isna(mean):
        return ""
    if pd.isna(low) or pd.isna(high):
        return f"{mean:.3f}"
    if abs((high - mean) - (mean - low)) > 1e-9:
        return f"{mean:.3f} [{low:.3f}, {high:.3f}]"
    return f"{mean:.3f} ±{(high - low) / 2:.3f}"


def _difference(r: pd.Series, target: str) -> str:
    d = r.get(f"d_{target}")
    if d is None or pd.isna(d):
        return ""
    paired = r.get(f"n_paired_{target}")
    on = f" on {int(paired)} seeds" if paired is not None and not pd.isna(paired) and int(paired) != int(r["n"]) else ""
    if pd.isna(r[f"d_{target}_low"]):
        return f"{d:+.3f}{on}"
    return f"{d:+.3f} [{r[f'd_{target}_low']:+.3f}, {r[f'd_{target}_high']:+.3f}]{on}"


def display_rows(board: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard as text cells, as the report page, the CLI and the MLflow table show it."""
    out = []
    for _, r in board.iterrows():
        paired = not pd.isna(r.get("d_acc"))
        weak_paired = not pd.isna(r.get("d_weak"))
        out.append({
            **({"group": r["group"]} if board["group"].astype(bool).any() else {}),
            "method": r["config"], "seeds": str(int(r["n"])),
            "acc": _pm(r["acc"], r["acc_low"], r["acc_high"]),
            "acc_audio": _pm(r["acc_audio"], r["acc_audio_low"], r["acc_audio_high"]),
            "acc_visual": _pm(r["acc_visual"], r["acc_visual_low"], r["acc_visual_high"]),
            "weak util": "" if pd.isna(r["util_weak"]) else f"{r['weak']} " + _pm(r["util_weak"], r["util_weak_low"],
                                                                                   r["util_weak_high"]),
            "balance": "" if pd.isna(r["shapley_balance"]) else f"{r['shapley_balance']:.3f}",
            "s/epoch": "" if pd.isna(r["train_seconds_per_epoch"]) else f"{r['train_seconds_per_epoch']:.2f}",
            "acc - normal [95% CI]": _difference(r, "acc"),
            "p": format_p(r["p_acc"]) if paired else "",
            "p Holm": format_p(r["p_holm_acc"]) if paired else "",
            "vs normal": r["vs_normal_acc"] if paired else "",
            "weak head - normal [95% CI]": _difference(r, "weak"),
            "p weak": format_p(r["p_weak"]) if weak_paired else "",
            "p weak Holm": format_p(r["p_holm_weak"]) if weak_paired else "",
            "weak vs normal": r["vs_normal_weak"] if weak_paired else "",
            **{f"headroom recovered vs {kind}": format_ratio(r[f"headroom_{kind}"], r[f"headroom_{kind}_low"],
                                                             r[f"headroom_{kind}_high"], r[f"headroom_{kind}_status"])
               for kind in KINDS},
        })
    return pd.DataFrame(out)


def log_leaderboard(client, parent_run_id: str, board: pd.DataFrame) -> None:
    """The leaderboard on the sweep's parent run (replacing an older one of the same name)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        display_rows(board).to_csv(Path(tmp) / LEADERBOARD_FILE, index=False)
        board.to_csv(Path(tmp) / LEADERBOARD_NUMBERS_FILE, index=False)
        client.log_artifact(parent_run_id, str(Path(tmp) / LEADERBOARD_FILE))
        client.log_artifact(parent_run_id, str(Path(tmp) / LEADERBOARD_NUMBERS_FILE))


__all__ = ["COLUMNS", "LEADERBOARD_FILE", "LEADERBOARD_NUMBERS_FILE", "log_leaderboard", "MODALITIES", "display_rows", "leaderboard"]
