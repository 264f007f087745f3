"""The report's figures: matplotlib's object-oriented API on an Agg canvas, one PNG per plot.

Each ``plot_*`` returns the path it wrote, or None when the sweep has nothing to show for it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.report.analysis import (MODALITIES, SweepData, baseline_method, config_means, joint_mask,
                                          ogm_rows)
from orchestrator.report.references import CONFIDENCE
from orchestrator.report.stats import t_interval

# An accuracy's interval stays in [0, 1], as in the report's tables.
ACCURACY = (0.0, 1.0)


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


# A configuration's seeds are drawn as thin lines under its mean only up to this many; more would hide it.
SEEDS_DRAWN = 5
# Configurations named in one panel's legend (the best by their last mean value); the others are drawn in
# grey under one legend entry. A search over thousands of settings stays readable.
LEGEND_CONFIGS = 12
OTHERS_COLOUR = "0.75"


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=90)
    return path


def _per_config(sweep: SweepData, rows: pd.DataFrame, value) -> dict[str, pd.DataFrame]:
    """config -> its trials' per-epoch `value(history)` (epochs x runs; `value` returns None when a run
    lacks what it needs), in the order configurations appear in `rows`."""
    out: dict[str, dict[str, pd.Series]] = {}
    for run_id, config in zip(rows["run_id"], rows["config"]):
        series = value(sweep.histories[run_id])
        if series is not None:
            out.setdefault(config, {})[run_id] = series
    return {config: pd.DataFrame(runs) for config, runs in out.items() if runs}


def _band(frame: pd.DataFrame, bounds: tuple[float, float] | None) -> pd.DataFrame:
    """Per epoch (row) of `frame` (epochs x seeds): the mean and its 95% t-interval over seeds
    (``stats.t_interval``, as the report's tables; no interval from a single seed)."""
    rows = {epoch: t_interval(values, CONFIDENCE, bounds) for epoch, values in frame.iterrows()}
    return pd.DataFrame({"mean": {e: i.mean for e, i in rows.items()}, "low": {e: i.low for e, i in rows.items()},
                         "high": {e: i.high for e, i in rows.items()}}).sort_index()


def _draw_config(ax, frame: pd.DataFrame, colour, label: str | None, bounds: tuple[float, float] | None = None,
                 **style) -> None:
    """One configuration: its seeds as thin lines when there are few, its mean over seeds with the
    interval as a band, one legend entry (`label`; none when None)."""
    if frame.shape[1] <= SEEDS_DRAWN and frame.shape[1] > 1:
        for _, seed in frame.items():
            ax.plot(seed.index, seed, color=colour, lw=0.6, alpha=0.35, **style)
    band = _band(frame, bounds)
    ax.plot(band.index, band["mean"], marker="o", ms=3, color=colour, label=label, **style)
    if band["low"].notna().any():
        ax.fill_between(band.index, band["low"], band["high"], color=colour, alpha=0.15, lw=0)


def _labelled(frames: dict[str, pd.DataFrame]) -> list[str]:
    """The configurations a panel names in its legend: all when few, else the LEGEND_CONFIGS best by the
    last epoch's mean."""
    if len(frames) <= LEGEND_CONFIGS:
        return list(frames)
    last = {c: f.iloc[-1].mean() for c, f in frames.items()}
    return sorted(frames, key=lambda c: -np.nan_to_num(last[c], nan=-np.inf))[:LEGEND_CONFIGS]


def _draw_configs(ax, frames: dict[str, pd.DataFrame], bounds: tuple[float, float] | None = None) -> None:
    """Every configuration of a panel (`frames`: config -> epochs x seeds), named ones in colour, the rest
    (beyond LEGEND_CONFIGS) in grey behind them under a single legend entry."""
    named = _labelled(frames)
    others = [c for c in frames if c not in named]
    for i, config in enumerate(others):
        label = f"{len(others)} other configurations" if i == 0 else None
        _draw_config(ax, frames[config], OTHERS_COLOUR, label, bounds)
    for colour, config in zip(_colours(len(named)), named):
        _draw_config(ax, frames[config], colour, _n_label(config, frames[config].shape[1]), bounds)


def _n_label(config: str, n: int) -> str:
    """A configuration's legend entry: its label and, over several seeds, how many."""
    return f"{config} (n={n})" if n > 1 else config


def _column(key: str):
    return lambda hist: hist[key] if key in hist else None


def _joint_trials(sweep: SweepData) -> pd.DataFrame:
    return sweep.trials[joint_mask(sweep.trials)]


def modality_curves_figure(sweep: SweepData):
    """acc_audio / acc_visual vs epoch: one column per joint method, per configuration its mean over seeds with
    a 95% band (seeds as thin lines when few), the uni-modal baselines' means dashed in black."""
    joint = _joint_trials(sweep)
    if joint.empty:
        return None
    methods = list(dict.fromkeys(joint["method"]))
    fig = _figure(4.2 * len(methods), 6.4)
    axes = fig.subplots(2, len(methods), squeeze=False, sharey=True)
    baselines = {m: _per_config(sweep, sweep.trials[sweep.trials["method"] == baseline_method(m)], _column("acc"))
                 for m in MODALITIES}
    for col, method in enumerate(methods):
        rows = joint[joint["method"] == method]
        for r, m in enumerate(MODALITIES):
            ax = axes[r][col]
            _draw_configs(ax, _per_config(sweep, rows, _column(f"acc_{m}")), ACCURACY)
            for config, frame in baselines[m].items():
                _draw_config(ax, frame, "black", f"{_n_label(config, frame.shape[1])} (alone)", ACCURACY, ls="--")
            ax.set_title(f"{method}: {m} head")
            _epoch_axis(ax)
            ax.set_ylabel(f"acc_{m} (val)")
            ax.legend(fontsize=6)
    fig.suptitle("Per-modality accuracy inside the joint model, mean over seeds with 95% band "
                 "(dashed: uni-modal baselines)")
    return fig


def plot_modality_curves(sweep: SweepData, path: Path) -> Path | None:
    fig = modality_curves_figure(sweep)
    return _save(fig, path) if fig is not None else None


def _gap(hist: pd.DataFrame) -> pd.Series | None:
    return hist["acc_audio"] - hist["acc_visual"] if {"acc_audio", "acc_visual"} <= set(hist.columns) else None


def gap_figure(sweep: SweepData):
    """gap_av = acc_audio - acc_visual vs epoch, per joint configuration (mean over seeds, 95% band)."""
    joint = _joint_trials(sweep)
    frames = _per_config(sweep, joint, _gap)
    if not frames:
        return None
    fig = _figure(7.5, 4.2)
    ax = fig.subplots()
    _draw_configs(ax, frames)
    ax.axhline(0, color="grey", lw=0.8)
    _epoch_axis(ax)
    ax.set_ylabel("gap_av = acc_audio - acc_visual")
    ax.set_title("Audio-visual accuracy gap of the joint model's heads (mean over seeds, 95% band)")
    ax.legend(fontsize=7)
    return fig


def plot_gap(sweep: SweepData, path: Path) -> Path | None:
    fig = gap_figure(sweep)
    return _save(fig, path) if fig is not None else None


def utilisation_figure(sweep: SweepData, per_epoch: dict[str, pd.DataFrame]):
    """util_audio / util_visual vs epoch per joint configuration (mean over seeds, 95% band)."""
    if not per_epoch:
        return None
    rows = sweep.trials[sweep.trials["run_id"].isin(per_epoch)]
    fig = _figure(10, 4.2)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, m in zip(axes, MODALITIES):
        _draw_configs(ax, _util_frames(rows, per_epoch, m))
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(f"util_{m} = acc_{m} (joint) / {baseline_method(m)} acc")
        _epoch_axis(ax)
    axes[0].set_ylabel("utilisation (mean over seeds, 95% band)")
    # A sweep with one uni-modal baseline has curves on one side only: the legend goes where they are.
    drawn = [ax for ax in axes if ax.get_legend_handles_labels()[0]]
    if drawn:
        drawn[-1].legend(fontsize=7)
    return fig


def _util_frames(rows: pd.DataFrame, per_epoch: dict[str, pd.DataFrame], m: str) -> dict[str, pd.DataFrame]:
    out: dict[str, dict[str, pd.Series]] = {}
    for run_id, config in zip(rows["run_id"], rows["config"]):
        if f"util_{m}" in per_epoch[run_id]:
            out.setdefault(config, {})[run_id] = per_epoch[run_id][f"util_{m}"]
    return {config: pd.DataFrame(runs) for config, runs in out.items()}


def plot_utilisation(sweep: SweepData, per_epoch: dict[str, pd.DataFrame], path: Path) -> Path | None:
    fig = utilisation_figure(sweep, per_epoch)
    return _save(fig, path) if fig is not None else None


def ogm_coefficients_figure(sweep: SweepData):
    """k_audio / k_visual (epoch means of OGM's coefficients) vs epoch per OGM configuration: colour by alpha,
    line style by window (mean over seeds, 95% band)."""
    ogm = ogm_rows(sweep.trials)
    ogm = ogm[[("k_audio" in sweep.histories[r]) for r in ogm["run_id"]]]
    if ogm.empty:
        return None
    fig = _figure(10, 4.2)
    axes = fig.subplots(1, 2, sharey=True)
    alphas = sorted(ogm["alpha"].dropna().unique())
    windows = sorted(ogm["window"].unique())
    cmap, line_styles = _colours(len(alphas)), ["-", "--", ":", "-."]
    firsts = ogm.drop_duplicates("config")
    styles = {c: {"ls": line_styles[windows.index(w) % len(line_styles)]} for c, w in zip(firsts["config"], firsts["window"])}
    colours = {c: (cmap[alphas.index(a)] if a in alphas else "black") for c, a in zip(firsts["config"], firsts["alpha"])}
    for ax, m in zip(axes, MODALITIES):
        frames = _per_config(sweep, ogm, _column(f"k_{m}"))
        named = _labelled(frames)
        others = [c for c in frames if c not in named]
        for config in others:
            label = f"{len(others)} other configurations" if config == others[0] else None
            _draw_config(ax, frames[config], OTHERS_COLOUR, label, **styles[config])
        for config in named:
            _draw_config(ax, frames[config], colours[config], _n_label(config, frames[config].shape[1]), **styles[config])
        ax.set_title(f"k_{m} (1 = not damped)")
        _epoch_axis(ax)
    axes[0].set_ylabel("mean modulation coefficient")
    axes[1].legend(fontsize=7)
    fig.suptitle("OGM coefficients per alpha (colour) and modulation window (line style), mean over seeds")
    return fig


def plot_ogm_coefficients(sweep: SweepData, path: Path) -> Path | None:
    fig = ogm_coefficients_figure(sweep)
    return _save(fig, path) if fig is not None else None


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


def shapley_figure(table: pd.DataFrame):
    """Final two-player Shapley values of joint accuracy per configuration: grouped bars of the mean over seeds
    with its 95% t-interval (none from one seed)."""
    rows = table[table["shapley_audio"].notna() & table["shapley_visual"].notna()]
    if rows.empty:
        return None
    configs = list(dict.fromkeys(rows["config"]))
    fig = _figure(max(6.0, 0.9 * len(configs) + 2), 4.6)
    ax = fig.subplots()
    x = np.arange(len(configs))
    for offset, m, colour in ((-0.2, "audio", "tab:blue"), (0.2, "visual", "tab:orange")):
        intervals = [t_interval(rows.loc[rows["config"] == c, f"shapley_{m}"].astype(float), CONFIDENCE)
                     for c in configs]
        means = np.array([i.mean for i in intervals])
        err = np.nan_to_num(np.array([[i.mean - i.low for i in intervals], [i.high - i.mean for i in intervals]]))
        ax.bar(x + offset, means, 0.4, yerr=err, capsize=2, label=m, color=colour)
    ax.axhline(0, color="grey", lw=0.8)
    counts = rows["config"].value_counts()
    ax.set_xticks(x, [_n_label(c, int(counts[c])) for c in configs],
                  rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("Shapley value of joint accuracy")
    ax.set_title("Each modality's contribution to joint accuracy (final epoch, validation; mean over seeds, 95% CI)")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    return fig


def plot_shapley(table: pd.DataFrame, path: Path) -> Path | None:
    fig = shapley_figure(table)
    return _save(fig, path) if fig is not None else None


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
