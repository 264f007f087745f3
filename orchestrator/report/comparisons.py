"""Comparisons with their uncertainty: per configuration, the mean and a 95% interval over seeds; between
two configurations, a paired test on the same seeds and the same validation clips; over a report, every
verdict adjusted for the number of tests it makes.

A configuration's trials are its runs over seeds (``config`` of :class:`SweepData`'s trials). Two
configurations are compared on the seeds both have, and on the clips both logged (each trial's
``predictions.csv``, the final model on the validation split): per seed and clip, whether each was right;
``stats.paired_test`` treats the trained model (seed) as the unit of inference and the clips as a second,
crossed source of noise. A sweep logged without predictions falls back to a paired t over the seeds' final
accuracies. Fewer than ``stats.MIN_SEEDS`` common seeds: no verdict.

The report's tests form four families, each adjusted with Holm's method (family-wise error 5% under any
dependence; the comparisons share the normal model's runs, so they are not independent):

* ``vs_normal``: every joint configuration x {acc, acc_audio, acc_visual} against the normal
  configuration of its group;
* ``dominance``: per group, the normal model's audio head against its visual head (which modality is
  weak; "neither" when the test does not say);
* ``weak_vs_unimodal``: per group, the normal model's weak head against the weak modality's uni-modal
  baseline (is the weak modality under-used?);
* ``headroom``: per group, the references against normal on joint accuracy (``references``): the uni-modal
  ensemble minus normal (paired on seeds and clips, like any configuration) and the ceiling minus normal
  (a one-sample t over the seeds of ``ceiling - normal_s``): is there headroom above normal at all?
"""
from __future__ import annotations

import io
import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from orchestrator.report.references import (CEILING, CONFIDENCE, KINDS, References, headroom, joint_configs,
                                            normal_config)
from orchestrator.report.stats import (MIN_SEEDS, PairedComparison, adjust, components_from, detectable_difference,
                                       paired_test, t_interval)
from orchestrator.runs import PREDICTIONS_FILE
from workers.methods import unimodal_methods

ALPHA = 1.0 - CONFIDENCE
POWER = 0.8
# A metric and the prediction column behind it.
PRED_COLUMN = {"acc": "pred", "acc_audio": "pred_audio", "acc_visual": "pred_visual"}
METRICS = tuple(PRED_COLUMN)
TEST_COLUMNS = ["family", "group", "config", "metric", "reference", "reference_metric", "difference", "low", "high",
                "p_value", "p_holm", "family_size", "verdict", "n_seeds", "n_clips", "df", "standard_error", "var_seed",
                "var_clip", "var_residual", "ms_seed", "ms_clip", "ms_residual", "method"]


def check_predictions(frame: pd.DataFrame, run_id: str) -> pd.DataFrame:
    """`frame` (index clip_id) as the report may use it; a duplicated clip id or a blank label or prediction
    is refused with a ValueError naming the run and the file (it would be silently scored otherwise)."""
    where = f"run {run_id}: {PREDICTIONS_FILE}"
    if frame.index.has_duplicates:
        clip = frame.index[frame.index.duplicated()][0]
        raise ValueError(f"{where} lists clip {clip!r} {int((frame.index == clip).sum())} times "
                         "for the final model on the validation split")
    for column in ("label", *PRED_COLUMN.values()):
        if column in frame:
            blank = pd.isna(frame[column].to_numpy())
            if blank.any():
                raise ValueError(f"{where} has a blank {column} for clip {frame.index[int(np.argmax(blank))]!r}")
    return frame


def load_predictions(client: MlflowClient, run_id: str) -> pd.DataFrame | None:
    """The run's per-clip validation predictions of its final model; None when it logged none."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, PREDICTIONS_FILE, tmp)
        except Exception:  # noqa: BLE001 - no such artifact (older or foreign runs): fall back to seeds
            return None
        return read_predictions(path, run_id)


def read_predictions(path, run_id: str) -> pd.DataFrame | None:
    """The per-clip validation predictions of the final model in a run's `predictions.csv` at `path` (or a
    file object)."""
    frame = pd.read_csv(path, dtype={"clip_id": str})
    frame = frame[(frame["split"] == "val") & (frame["model"] == "final")]
    return check_predictions(frame.set_index("clip_id"), run_id) if not frame.empty else None


def parse_predictions(files: dict[str, bytes | None]) -> dict[str, pd.DataFrame | None]:
    """run_id -> the run's validation predictions of its final model (as `read_predictions`), from the bytes of
    each run's `predictions.csv`: the files sharing a header are parsed as one CSV (a thousand runs' files in
    one pass instead of a thousand parser calls), then split back by each file's row count and checked
    (`check_predictions`, which names the run of a damaged file)."""
    out: dict[str, pd.DataFrame | None] = {run_id: None for run_id in files}
    by_header: dict[bytes, list[tuple[str, bytes]]] = {}
    for run_id, data in files.items():
        if data:
            header, _, body = data.partition(b"\n")
            by_header.setdefault(header.rstrip(b"\r"), []).append((run_id, body if body.endswith(b"\n") or not body
                                                                     else body + b"\n"))
    for header, items in by_header.items():
        out.update(_parse_together(header, items))
    return out


def _parse_together(header: bytes, items: list[tuple[str, bytes]]) -> dict[str, pd.DataFrame | None]:
    rows = np.array([body.count(b"\n") for _, body in items])
    frame = pd.read_csv(io.BytesIO(header + b"\n" + b"".join(body for _, body in items)), dtype={"clip_id": str})
    if len(frame) != rows.sum():  # blank lines or quoted line breaks: a file's rows cannot be told apart
        return {run_id: _read_one(header + b"\n" + body, run_id) for run_id, body in items}
    owner = np.repeat(np.arange(len(items)), rows)
    keep = (frame["split"].to_numpy() == "val") & (frame["model"].to_numpy() == "final")
    frame, owner = frame[keep].set_index("clip_id"), owner[keep]
    bounds = np.searchsorted(owner, np.arange(len(items) + 1))
    out = {}
    for i, (run_id, _) in enumerate(items):
        part = frame.iloc[bounds[i] : bounds[i + 1]]
        out[run_id] = check_predictions(part, run_id) if len(part) else None
    return out


def _read_one(data: bytes, run_id: str) -> pd.DataFrame | None:
    return read_predictions(io.BytesIO(data), run_id)


def config_intervals(table: pd.DataFrame, keys: tuple[str, ...] = METRICS) -> pd.DataFrame:
    """Per (group, config): n seeds and, for each key, mean, low and high of a t-interval over seeds (cut to
    [0, 1]; no interval from one seed or from equal values)."""
    done = table[table["acc"].notna()]
    rows = []
    for (group, config), trials in done.groupby(["group", "config"], sort=False, dropna=False):
        row = {"group": group, "config": config, "method": trials["method"].iloc[0], "n": len(trials)}
        for key in keys:
            interval = t_interval(trials[key].astype(float).tolist(), CONFIDENCE, bounds=(0.0, 1.0))
            row.update({key: interval.mean, f"{key}_low": interval.low, f"{key}_high": interval.high})
        rows.append(row)
    return pd.DataFrame(rows)


class Outcomes:
    """Per run and prediction column, whether the final model was right on each validation clip (0/1 per
    clip, with the clip ids), computed once per report; and each configuration's runs by seed.

    With `references`, each group's uni-modal ensemble is one more configuration (its name,
    ``references.ENSEMBLE``): per seed a pseudo-run whose joint prediction is the ensemble's, so it is
    compared on seeds and clips like a trained one."""

    def __init__(self, table: pd.DataFrame, predictions: dict[str, pd.DataFrame | None],
                 references: References | None = None):
        done = table[table["acc"].notna()]
        self.predictions = predictions
        self._runs = {config: dict(zip(trials["seed"].astype(str), trials["run_id"]))
                      for config, trials in done.groupby("config", sort=False)}
        self._final = {run_id: {m: float(row[m]) for m in METRICS}
                       for run_id, row in done.set_index("run_id")[list(METRICS)].iterrows()}
        self._correct: dict[str, dict[str, tuple[pd.Index, np.ndarray] | None]] = {}
        for ensemble in (references.ensembles.values() if references is not None else ()):
            runs = self._runs[ensemble.config] = {}
            for seed, (clips, right) in ensemble.outcomes.items():
                # A pseudo-run id no MLflow run has; only the joint prediction exists.
                runs[seed] = f"{ensemble.config}/seed={seed}"
                self._correct[runs[seed]] = {PRED_COLUMN["acc"]: (clips, right)}
                self._final[runs[seed]] = {"acc": float(right.mean()), "acc_audio": math.nan, "acc_visual": math.nan}

    def correct(self, run_id: str, column: str) -> tuple[pd.Index, np.ndarray] | None:
        if run_id not in self._correct:
            frame = self.predictions.get(run_id)
            heads: dict[str, tuple[pd.Index, np.ndarray] | None] = {}
            if frame is not None:
                check_predictions(frame, run_id)
                label = frame["label"].to_numpy()
                for name in PRED_COLUMN.values():
                    values = frame[name].to_numpy() if name in frame else None
                    # A head the run does not have is logged as -1 for every clip.
                    heads[name] = None if values is None or bool((values < 0).all()) else \
                        (frame.index, (values == label).astype(float))
            self._correct[run_id] = heads
        return self._correct[run_id].get(column)

    def runs(self, config: str) -> dict[str, str]:
        return self._runs.get(config, {})

    def final(self, run_id: str, metric: str) -> float:
        return self._final[run_id][metric]


def _aligned(outcomes: list[tuple[pd.Index, np.ndarray]]) -> np.ndarray:
    """(runs, clips) on the clips every run logged, in one order."""
    index = outcomes[0][0]
    if all(i is index or i.equals(index) for i, _ in outcomes):
        return np.stack([v for _, v in outcomes])
    common = sorted(set.intersection(*(set(i) for i, _ in outcomes)))
    return np.stack([pd.Series(v, index=i).loc[common].to_numpy() for i, v in outcomes])


def compare(outcomes: Outcomes, config_a: str, config_b: str, metric_a: str,
            metric_b: str | None = None) -> PairedComparison | None:
    """`metric_a` of configuration `config_a` minus `metric_b` (default the same) of `config_b`, paired on
    their common seeds and validation clips (unadjusted). None when they share no seed."""
    metric_b = metric_b or metric_a
    runs_a, runs_b = outcomes.runs(config_a), outcomes.runs(config_b)
    seeds = sorted(set(runs_a) & set(runs_b))
    if not seeds:
        return None
    a = [outcomes.correct(runs_a[s], PRED_COLUMN[metric_a]) for s in seeds]
    b = [outcomes.correct(runs_b[s], PRED_COLUMN[metric_b]) for s in seeds]
    if all(x is not None for x in a + b):
        both = _aligned(a + b)
        if both.shape[1]:
            return paired_test(both[:len(seeds)], both[len(seeds):], CONFIDENCE)
    return paired_test([outcomes.final(runs_a[s], metric_a) for s in seeds],
                       [outcomes.final(runs_b[s], metric_b) for s in seeds], CONFIDENCE)


def describe(result: PairedComparison) -> str:
    """"+0.052, 95% CI +0.021 to +0.083, p = 0.002, Holm p = 0.02 (seed x clip paired test over ...)"."""
    if not result.testable:
        return f"{result.difference:+.3f}, no test ({result.method})"
    holm = "" if math.isnan(result.p_adjusted) else f", Holm-adjusted p = {result.p_adjusted:.2g}"
    return (f"{result.difference:+.3f}, {result.confidence:.0%} CI {result.low:+.3f} to {result.high:+.3f}, "
            f"p = {result.p_value:.2g}{holm} ({result.method})")


def verdict(result: PairedComparison | None) -> str:
    """"higher" / "lower" when the (Holm-adjusted) p-value is at most 5%; "no verdict" without a test (too
    few seeds); else "not distinguishable"."""
    if result is None or not result.testable:
        return "no verdict"
    if not result.distinguishable:
        return "not distinguishable"
    return "higher" if result.difference > 0 else "lower"


def _row(family: str, group: str, config: str, metric: str, reference: str, reference_metric: str,
         result: PairedComparison) -> dict:
    parts = result.components
    return {"family": family, "group": group, "config": config, "metric": metric, "reference": reference,
            "reference_metric": reference_metric, "difference": result.difference, "low": result.low,
            "high": result.high, "p_value": result.p_value, "p_holm": result.p_adjusted, "verdict": verdict(result),
            "n_seeds": result.n_seeds, "n_clips": result.n_clips, "df": result.df,
            "standard_error": result.standard_error, "var_seed": parts.seed if parts else math.nan,
            "var_clip": parts.clip if parts else math.nan, "var_residual": parts.residual if parts else math.nan,
            **dict(zip(("ms_seed", "ms_clip", "ms_residual"), result.mean_squares or (math.nan,) * 3)),
            "method": result.method, "result": result}


def _family(rows: list[tuple]) -> list[dict]:
    """`rows`: (family, group, config, metric, reference, reference_metric, result); Holm over the family."""
    adjusted = adjust([r[-1] for r in rows])
    size = sum(1 for r in adjusted if r.testable)
    return [{**_row(*r[:-1], result), "family_size": size} for r, result in zip(rows, adjusted)]


def _groups(table: pd.DataFrame):
    done = table[table["acc"].notna()]
    for group, trials in done.groupby("group", sort=False, dropna=False):
        yield group, trials, normal_config(trials)


def baseline_method(modality: str) -> str:
    """The uni-modal baseline method of `modality` ("audio" -> "audio_only")."""
    return unimodal_methods()[modality]


def headroom_tests(outcomes: Outcomes, groups: list, references: References) -> list[tuple]:
    """Per group: the ensemble minus normal (paired on seeds and clips) and the ceiling minus normal (a
    one-sample t over the seeds of ceiling - normal_s: the ceiling is one number, normal varies by seed),
    both on joint accuracy, as rows for `_family`."""
    rows = []
    for group, _, normal in groups:
        if normal is None:
            continue
        ensemble = references.ensembles.get(group)
        if ensemble is not None and (result := compare(outcomes, ensemble.config, normal, "acc")) is not None:
            rows.append(("headroom", group, ensemble.config, "acc", normal, "acc", result))
        if "acc" in references.ceiling:
            normal_acc = [outcomes.final(run_id, "acc") for run_id in outcomes.runs(normal).values()]
            result = paired_test([references.ceiling["acc"]] * len(normal_acc), normal_acc, CONFIDENCE)
            rows.append(("headroom", group, CEILING, "acc", normal, "acc", result))
    return rows


def report_tests(table: pd.DataFrame, predictions: dict[str, pd.DataFrame | None],
                 references: References | None = None) -> pd.DataFrame:
    """Every test the report states, one row each (columns ``TEST_COLUMNS`` plus ``result``, the
    :class:`PairedComparison`), Holm-adjusted within its family (module docstring). ``verdict`` comes from
    the adjusted p-value. The ``headroom`` family only with `references`."""
    outcomes = Outcomes(table, predictions, references)
    groups = list(_groups(table))
    dominance, versus = [], []
    for group, trials, normal in groups:
        if normal is None:
            continue
        result = compare(outcomes, normal, normal, "acc_audio", "acc_visual")
        if result is not None:
            dominance.append(("dominance", group, normal, "acc_audio", normal, "acc_visual", result))
        for config in joint_configs(trials):
            for metric in METRICS:
                result = compare(outcomes, config, normal, metric)
                if result is not None:
                    versus.append(("vs_normal", group, config, metric, normal, metric, result))
    rows = _family(dominance) + _family(versus)
    weak = {r["group"]: weak_from(r) for r in rows if r["family"] == "dominance"}
    under = []
    for group, trials, normal in groups:
        if normal is None or weak.get(group) is None:
            continue
        baseline = trials.loc[trials["method"] == baseline_method(weak[group]), "config"].unique()
        if len(baseline) == 1:
            result = compare(outcomes, normal, baseline[0], f"acc_{weak[group]}", "acc")
            if result is not None:
                under.append(("weak_vs_unimodal", group, normal, f"acc_{weak[group]}", baseline[0], "acc", result))
    rows += _family(under)
    if references is not None:
        rows += _family(headroom_tests(outcomes, groups, references))
    return pd.DataFrame(rows, columns=[*TEST_COLUMNS, "result"])


def tests_table(tests: pd.DataFrame) -> pd.DataFrame:
    """`report_tests` as written to comparisons.csv (the PairedComparison objects left out)."""
    return tests.drop(columns=["result"])


def weak_from(dominance_row: dict | pd.Series) -> str | None:
    """The weak modality from a dominance test (audio head minus visual head of the normal model): the
    lower head when the adjusted test says so, else None (neither head is distinguishably stronger)."""
    if dominance_row["verdict"] == "higher":
        return "visual"
    if dominance_row["verdict"] == "lower":
        return "audio"
    return None


def weak_modality(tests: pd.DataFrame, group: str | None = None) -> str | None:
    """The weak modality of `group` (default: the first group with a dominance test), decided by the
    paired test of the normal model's audio head against its visual head; None when that test does not
    distinguish them or there is no normal model. Every part of the report takes the weak modality from here."""
    rows = tests[tests["family"] == "dominance"]
    if group is not None:
        rows = rows[rows["group"] == group]
    return weak_from(rows.iloc[0]) if not rows.empty else None


def find_test(tests: pd.DataFrame, family: str, group: str, config: str, metric: str) -> PairedComparison | None:
    """The report test of `family` for (`group`, `config`, `metric`); None when the report has none."""
    rows = tests[(tests["family"] == family) & (tests["group"] == group) & (tests["config"] == config)
                 & (tests["metric"] == metric)]
    return rows["result"].iloc[0] if not rows.empty else None


def config_summary(table: pd.DataFrame, predictions: dict[str, pd.DataFrame | None],
                   tests: pd.DataFrame | None = None, references: References | None = None) -> pd.DataFrame:
    """One row per configuration: n seeds, mean and 95% t-interval over seeds of acc / acc_audio /
    acc_visual, the group's weak modality, and for joint configurations the paired difference from the
    group's normal configuration (``d_<metric>``, ``d_<metric>_low`` / ``_high``, ``p_<metric>``, the
    Holm-adjusted ``p_holm_<metric>``, ``n_paired_<metric>`` seeds, ``vs_normal_<metric>``) and, with
    `references`, the share of the headroom above normal it recovers against each reference
    (``headroom_<ensemble|ceiling>``, ``_low`` / ``_high`` (Fieller), ``_status``, ``_n``)."""
    summary = config_intervals(table)
    if summary.empty:
        return summary
    tests = report_tests(table, predictions, references) if tests is None else tests
    summary["weak"] = [weak_modality(tests, g) for g in summary["group"]]
    for _, row in tests[tests["family"] == "vs_normal"].iterrows():
        at = summary.index[(summary["config"] == row["config"]) & (summary["group"] == row["group"])]
        m = row["metric"]
        summary.loc[at, [f"d_{m}", f"d_{m}_low", f"d_{m}_high", f"p_{m}", f"p_holm_{m}", f"n_paired_{m}"]] = \
            [row["difference"], row["low"], row["high"], row["p_value"], row["p_holm"], row["n_seeds"]]
        summary.loc[at, f"vs_normal_{m}"] = row["verdict"]
        summary.loc[at, "paired_test"] = row["method"]
    if references is not None:
        add_headroom(summary, headroom(table, references))
    return summary


def add_headroom(summary: pd.DataFrame, recovered: pd.DataFrame) -> None:
    """`summary` with the columns ``headroom_<reference>[_low|_high|_status|_n]`` of `references.headroom`."""
    for kind in KINDS:
        for suffix in ("", "_low", "_high"):
            summary[f"headroom_{kind}{suffix}"] = np.nan
        summary[f"headroom_{kind}_status"] = None
        summary[f"headroom_{kind}_n"] = np.nan
    for _, row in recovered.iterrows():
        at = summary.index[(summary["config"] == row["config"]) & (summary["group"] == row["group"])]
        kind = row["reference"]
        summary.loc[at, [f"headroom_{kind}", f"headroom_{kind}_low", f"headroom_{kind}_high", f"headroom_{kind}_n"]] = \
            [row["estimate"], row["low"], row["high"], row["n_seeds"]]
        summary.loc[at, f"headroom_{kind}_status"] = row["status"]


def format_interval(mean: float, low: float, high: float) -> str:
    """"0.812 [0.790, 0.834]"; the mean alone when there is no interval (one seed, or no spread)."""
    if mean is None or pd.isna(mean):
        return ""
    if pd.isna(low) or pd.isna(high):
        return f"{mean:.3f}"
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def format_p(p: float) -> str:
    return "" if p is None or pd.isna(p) else f"{p:.2g}"


def pooled_components(tests: pd.DataFrame, group: str, metric: str) -> tuple[VarianceComponents, int, int] | None:
    """The variance components of the group's comparisons with normal on `metric`: their mean squares
    averaged over those comparisons (averaging each one's components, cut at 0, would overstate them),
    with their (smallest) number of seeds and clips; None without a tested comparison. Only comparisons
    of one design are pooled: those with the most clips. A configuration without per-clip predictions
    (AVID's and CMA's linear probes: one value per seed) has mean squares of seed means, on another scale;
    pooled with per-clip ones at "1 clip", it made the detectable difference nonsense."""
    rows = tests[(tests["family"] == "vs_normal") & (tests["group"] == group) & (tests["metric"] == metric)
                 & tests["ms_seed"].notna() & (tests["n_seeds"] >= MIN_SEEDS)]
    if rows.empty:
        return None
    rows = rows[rows["n_clips"] == rows["n_clips"].max()]
    n_seeds, n_clips = int(rows["n_seeds"].min()), int(rows["n_clips"].min())
    ms = tuple(float(rows[k].mean()) for k in ("ms_seed", "ms_clip", "ms_residual"))
    return components_from(ms, n_seeds, n_clips), n_seeds, n_clips


def power(tests: pd.DataFrame, group: str, seeds: tuple[int, ...] = (5, 10)) -> dict | None:
    """What this group's comparisons with normal can resolve, per head: with the family's size m (Holm's
    first step tests at 5%/m: what a single real difference among m comparisons must pass), the
    difference ``stats.paired_test`` detects with 80% power on this sweep's seeds and clips, and on
    `seeds` seeds with the same spread. None when nothing was tested."""
    versus = tests[tests["family"] == "vs_normal"]
    size = int(versus["family_size"].max()) if not versus.empty else 0
    if size == 0:
        return None
    alpha = ALPHA / size
    heads = {}
    for metric in METRICS:
        pooled = pooled_components(tests, group, metric)
        if pooled is None:
            continue
        parts, n_seeds, n_clips = pooled
        heads[metric] = {"n_seeds": n_seeds, "n_clips": n_clips, "sd_seed": math.sqrt(parts.seed),
                         "sd_clip": math.sqrt(parts.clip), "sd_residual": math.sqrt(parts.residual),
                         "detectable": detectable_difference(parts, n_seeds, n_clips, alpha, POWER),
                         "detectable_with_seeds": {s: detectable_difference(parts, s, n_clips, alpha, POWER)
                                                   for s in seeds if s != n_seeds}}
    if not heads:
        return None
    return {"family_size": size, "alpha": alpha, "power": POWER, "heads": heads}
