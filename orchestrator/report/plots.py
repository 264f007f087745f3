"""The report's figures: matplotlib's object-oriented API on an Agg canvas, one PNG per plot.

Each ``plot_*`` returns the path it wrote, or None when the sweep has nothing to show for it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.report.analysis import (MODALITIES, SweepData, _is_joint, baseline_method, config_means,
                                          ogm_rows)


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
    baselines = {m: trials[trials["method"] == baseline_method(m)] for m in MODALITIES}
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
        ax.set_title(f"util_{m} = acc_{m} (joint) / {baseline_method(m)} acc")
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
    ogm = ogm_rows(trials)
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


def plot_ablation(table: pd.DataFrame, by: str, path: Path, weak: str | None) -> Path | None:
    """Final joint accuracy and weak-modality accuracy of OGM/OGM-GE vs `by` ("alpha" or "window"),
    one line per value of the other field, normal as horizontal lines (OGM-GE paper, Fig. 5 / Table 4 shapes).
    `weak`: `comparisons.weak_modality`; both heads when it is None (neither is distinguishably weaker)."""
    means = config_means(table)
    ogm = ogm_rows(means)
    if ogm.empty or ogm[by].nunique() < 1:
        return None
    other = "window" if by == "alpha" else "alpha"
    normal = means[means["method"] == "normal"]
    heads = [weak] if weak else list(MODALITIES)
    fig = _figure(5 * (1 + len(heads)), 4.2)
    axes = fig.subplots(1, 1 + len(heads), sharey=True)
    panels = [(axes[0], "acc", "joint accuracy")] + [
        (ax, f"acc_{h}", f"{h} head accuracy" + (" (weak)" if weak else "")) for ax, h in zip(axes[1:], heads)]
    if by == "window":
        order = sorted(ogm["window"].unique(), key=lambda w: tuple(int(x) for x in w.split("-")))
        position = {w: i for i, w in enumerate(order)}
    for ax, key, title in panels:
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
    axes[-1].legend(fontsize=7)
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


def plot_intervals(summary: pd.DataFrame, path: Path) -> Path | None:
    """Final acc, acc_audio and acc_visual per configuration: the mean over seeds with error bars for its
    95% t-interval (none with a single seed). One panel per metric, configurations on the y axis."""
    if summary is None or summary.empty:
        return None
    keys = [k for k in ("acc", "acc_audio", "acc_visual") if summary[k].notna().any()]
    fig = _figure(4.2 * len(keys), 0.45 * len(summary) + 1.6)
    axes = fig.subplots(1, len(keys), sharey=True, squeeze=False)
    y = np.arange(len(summary))
    for ax, key in zip(axes[0], keys):
        mean = summary[key].astype(float).to_numpy()
        low = (mean - summary[f"{key}_low"].astype(float)).to_numpy()
        high = (summary[f"{key}_high"].astype(float) - mean).to_numpy()
        err = np.nan_to_num(np.vstack([low, high]), nan=0.0)
        ax.errorbar(mean, y, xerr=err, fmt="o", capsize=3)
        ax.set_title(key)
        ax.set_xlabel("accuracy (validation)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(y, [f"{c} (n={int(n)})" for c, n in zip(summary["config"], summary["n"])], fontsize=7)
    axes[0][0].invert_yaxis()
    fig.suptitle("per configuration: mean over seeds, 95% interval")
    fig.savefig(path, dpi=90)
    return path
