"""What a joint configuration could reach, besides normal: the references, and the share of the headroom above
normal each configuration recovers.

* **Uni-modal ensemble** (every sweep with both uni-modal baselines): per group and seed, late fusion of the
  ``audio_only`` and ``visual_only`` runs of that seed: the mean of their softmax over the classes (final
  model, validation split, each run's ``probabilities.npz``), argmax, right or wrong per clip. Two networks
  that never trained together reach this on the same clips, so a joint model below it leaves accuracy that
  each modality alone delivers unused. A pseudo-configuration (``ENSEMBLE``) with per-seed per-clip
  outcomes, so ``comparisons.compare`` pairs it with normal on seeds and clips like any configuration.
* **Ceiling** (generated clips only): the best accuracy a perfect recogniser of what the clips carry reaches
  on the validation split, from the generator's card (``ceiling_acc`` on the sweep's parent run; see
  ``orchestrator.sweep.log_ceiling``). A real dataset has none.
* **Headroom recovered** of a joint configuration against a reference R: ``(acc - normal) / (R - normal)``
  over the seeds they share (``stats.headroom_recovered``: mean gain over mean headroom with Fieller's
  interval over seeds). 1 = reaches the reference, 0 = no better than normal, below 0 = worse than normal;
  "no headroom" when normal is at or above R on average. The interval is over seeds and conditional on
  the validation clips.

Only the uni-modal runs' probabilities are read (``load_probabilities``): a report of 1,000 runs downloads
two small files per seed, not one per run.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from orchestrator.report.stats import headroom_recovered, t_interval
from orchestrator.runs import CEILING_METRICS, PROBABILITIES_FILE
from workers.methods import unimodal_methods

# The report's one confidence level (comparisons, which imports this module, takes it from here).
CONFIDENCE = 0.95
ENSEMBLE = "ensemble (audio_only + visual_only)"
CEILING = "ceiling (best achievable)"
# The references a configuration's headroom is measured against, in the order the report shows them.
KINDS = ("ensemble", "ceiling")
HEADROOM_COLUMNS = ["group", "config", "reference", "estimate", "low", "high", "status", "n_seeds", "mean_gain",
                    "mean_headroom"]


def load_probabilities(client: MlflowClient, run_id: str) -> tuple[pd.Index, np.ndarray] | None:
    """The run's joint softmax per validation clip of its final model: (clip ids, float16 clips x classes);
    None when it logged none (an older run, or a method without a classifier). A clip listed twice is
    refused with a ValueError naming the run and the file, as a duplicated prediction is."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, PROBABILITIES_FILE, tmp)
        except Exception:  # noqa: BLE001 - no such artifact: no ensemble from this run
            return None
        return read_probabilities(path, run_id)


def read_probabilities(path: str | Path, run_id: str) -> tuple[pd.Index, np.ndarray] | None:
    """As `load_probabilities`, from the run's `probabilities.npz` at `path`."""
    with np.load(Path(path), allow_pickle=False) as npz:
        keep = (npz["split"] == "val") & (npz["model"] == "final")
        clips, probs = pd.Index(npz["clip_id"][keep].astype(str), name="clip_id"), npz["probs"][keep]
    if clips.has_duplicates:
        raise ValueError(f"run {run_id}: {PROBABILITIES_FILE} lists clip {clips[clips.duplicated()][0]!r} more than "
                         "once for the final model on the validation split")
    return (clips, probs) if len(clips) else None


def ensemble_probabilities(audio: tuple[pd.Index, np.ndarray],
                           visual: tuple[pd.Index, np.ndarray]) -> tuple[pd.Index, np.ndarray]:
    """Late fusion of two runs' softmax on the clips both scored (in the audio run's order): their mean per
    class, in float32 (float16 sums would round)."""
    (clips_a, probs_a), (clips_v, probs_v) = audio, visual
    common = clips_a[clips_a.isin(clips_v)]
    a = probs_a[clips_a.get_indexer(common)].astype(np.float32)
    v = probs_v[clips_v.get_indexer(common)].astype(np.float32)
    return common, (a + v) / 2.0


def ensemble_correct(clips: pd.Index, probs: np.ndarray, labels: pd.Series) -> tuple[pd.Index, np.ndarray]:
    """1.0 where the ensemble's argmax is the clip's label (ties: the lowest class index, numpy's argmax),
    on the clips with a label."""
    known = clips[clips.isin(labels.index)]
    pred = probs[clips.get_indexer(known)].argmax(axis=1)
    return known, (pred == labels.loc[known].to_numpy()).astype(float)


@dataclass(frozen=True)
class Ensemble:
    """A group's uni-modal ensemble: per seed, the averaged probabilities and the per-clip outcomes."""

    config: str
    audio_config: str
    visual_config: str
    probabilities: dict[str, tuple[pd.Index, np.ndarray]]
    outcomes: dict[str, tuple[pd.Index, np.ndarray]]

    def accuracy(self) -> dict[str, float]:
        """Per seed, the share of validation clips the ensemble gets right."""
        return {seed: float(right.mean()) for seed, (_, right) in self.outcomes.items() if right.size}


@dataclass(frozen=True)
class References:
    """A sweep's references: ``ceiling`` (metric -> best achievable accuracy; empty on real data),
    ``ensembles`` (group -> its uni-modal ensemble) and ``missing`` (group -> why it has no ensemble)."""

    ceiling: dict[str, float] = field(default_factory=dict)
    ensembles: dict[str, Ensemble] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)


def ceiling_from(parent_metrics: dict[str, float]) -> dict[str, float]:
    """metric -> ceiling from the sweep parent's ``ceiling_acc*`` metrics (``runs.CEILING_METRICS``)."""
    return {metric: float(parent_metrics[name]) for metric, name in CEILING_METRICS.items() if name in parent_metrics}


def joint_configs(trials: pd.DataFrame) -> list[str]:
    """The configurations compared with normal: joint (both heads' accuracies logged), not normal itself."""
    joint = trials[trials["acc_audio"].notna() & trials["acc_visual"].notna() & (trials["method"] != "normal")]
    return list(joint["config"].unique())


def normal_config(trials: pd.DataFrame) -> str | None:
    """The group's normal configuration; None without exactly one."""
    normal = trials.loc[trials["method"] == "normal", "config"].unique()
    return normal[0] if len(normal) == 1 else None


def _baseline_config(done: pd.DataFrame, group: str, method: str) -> str | None:
    """The group's configuration of a uni-modal baseline; when the group has none (baselines not crossed
    with the group's settings, e.g. one audio_only for every fusion) the sweep's only one."""
    for rows in (done[done["group"] == group], done):
        configs = rows.loc[rows["method"] == method, "config"].unique()
        if len(configs):
            return configs[0] if len(configs) == 1 else None
    return None


def _labels(predictions: dict[str, pd.DataFrame | None], *run_ids: str) -> pd.Series | None:
    for run_id in run_ids:
        frame = predictions.get(run_id)
        if frame is not None and "label" in frame:
            return frame["label"]
    return None


def _ensemble(done: pd.DataFrame, group: str, predictions: dict[str, pd.DataFrame | None],
              probabilities: dict[str, tuple[pd.Index, np.ndarray] | None]) -> Ensemble | str:
    """The group's ensemble, or why there is none."""
    methods = unimodal_methods()
    audio, visual = (_baseline_config(done, group, methods[m]) for m in ("audio", "visual"))
    if audio is None or visual is None:
        return "the sweep has no single audio_only and visual_only configuration to fuse"
    runs = {c: dict(zip(done.loc[done["config"] == c, "seed"].astype(str), done.loc[done["config"] == c, "run_id"]))
            for c in (audio, visual)}
    fused, outcomes = {}, {}
    for seed in sorted(set(runs[audio]) & set(runs[visual])):
        run_a, run_v = runs[audio][seed], runs[visual][seed]
        labels = _labels(predictions, run_a, run_v)
        if probabilities.get(run_a) is None or probabilities.get(run_v) is None or labels is None:
            continue
        fused[seed] = ensemble_probabilities(probabilities[run_a], probabilities[run_v])
        outcomes[seed] = ensemble_correct(*fused[seed], labels)
    if not outcomes:
        return (f"no seed has both an {audio} and a {visual} run with {PROBABILITIES_FILE} and predictions "
                "(runs logged before it existed cannot be fused)")
    name = ENSEMBLE + (f" ({group})" if group else "")
    return Ensemble(name, audio, visual, fused, outcomes)


def build_references(table: pd.DataFrame, predictions: dict[str, pd.DataFrame | None],
                     probabilities: dict[str, tuple[pd.Index, np.ndarray] | None],
                     parent_metrics: dict[str, float]) -> References:
    """The references of every group with a normal configuration (`table`: the sweep's trials, with group,
    config, method, seed, run_id and acc)."""
    done = table[table["acc"].notna()]
    ensembles, missing = {}, {}
    for group, trials in done.groupby("group", sort=False, dropna=False):
        if normal_config(trials) is None:
            continue
        found = _ensemble(done, group, predictions, probabilities)
        if isinstance(found, Ensemble):
            ensembles[group] = found
        else:
            missing[group] = found
    return References(ceiling_from(parent_metrics), ensembles, missing)


def _per_seed(trials: pd.DataFrame, config: str) -> dict[str, float]:
    rows = trials[trials["config"] == config]
    return dict(zip(rows["seed"].astype(str), rows["acc"].astype(float)))


def reference_values(references: References, group: str, kind: str) -> dict[str, float] | float | None:
    """Per seed (the ensemble) or one constant (the ceiling) joint accuracy of a reference; None when the
    sweep lacks it."""
    if kind == "ceiling":
        return references.ceiling.get("acc")
    ensemble = references.ensembles.get(group)
    return ensemble.accuracy() if ensemble is not None else None


def _groups_with_normal(table: pd.DataFrame):
    """(group, its finished trials, its normal configuration, normal's joint accuracy by seed) for every group
    with one normal configuration."""
    done = table[table["acc"].notna()]
    for group, trials in done.groupby("group", sort=False, dropna=False):
        normal = normal_config(trials)
        if normal is not None:
            yield group, trials, normal, _per_seed(trials, normal)


def headroom(table: pd.DataFrame, references: References) -> pd.DataFrame:
    """Per group, joint configuration and available reference: the share of the headroom it recovers
    (columns ``HEADROOM_COLUMNS``, plus ``ratio``, the :class:`stats.Ratio`), on the seeds the
    configuration, normal and (the ensemble) the reference share."""
    rows = []
    for group, trials, _, normal_acc in _groups_with_normal(table):
        for config in joint_configs(trials):
            acc = _per_seed(trials, config)
            for kind in KINDS:
                reference = reference_values(references, group, kind)
                if reference is None:
                    continue
                per_seed = reference if isinstance(reference, dict) else dict.fromkeys(normal_acc, reference)
                seeds = sorted(set(acc) & set(normal_acc) & set(per_seed))
                ratio = headroom_recovered([acc[s] for s in seeds], [normal_acc[s] for s in seeds],
                                           [per_seed[s] for s in seeds], CONFIDENCE)
                rows.append({"group": group, "config": config, "reference": kind, "estimate": ratio.estimate,
                             "low": ratio.low, "high": ratio.high, "status": ratio.status, "n_seeds": ratio.n,
                             "mean_gain": ratio.mean_x, "mean_headroom": ratio.mean_y, "ratio": ratio})
    return pd.DataFrame(rows, columns=[*HEADROOM_COLUMNS, "ratio"])


def reference_summary(table: pd.DataFrame, references: References) -> pd.DataFrame:
    """Per group with a normal configuration: normal's and the ensemble's joint accuracy (mean and 95%
    t-interval over seeds), the ceiling, and the headroom above normal to each (the ensemble's paired on
    seeds: mean of ensemble_s - normal_s)."""
    rows = []
    for group, _, normal, normal_acc in _groups_with_normal(table):
        row = {"group": group, "normal_config": normal, **_interval("normal", list(normal_acc.values()))}
        ensemble = references.ensembles.get(group)
        row["ensemble_config"] = ensemble.config if ensemble is not None else None
        row["ensemble_missing"] = references.missing.get(group)
        accuracy = ensemble.accuracy() if ensemble is not None else {}
        row.update(_interval("ensemble", list(accuracy.values())))
        seeds = sorted(set(accuracy) & set(normal_acc))
        row["headroom_ensemble"] = float(np.mean([accuracy[s] - normal_acc[s] for s in seeds])) if seeds else math.nan
        row["ceiling"] = references.ceiling.get("acc", math.nan)
        row["headroom_ceiling"] = row["ceiling"] - row["normal"]
        rows.append(row)
    return pd.DataFrame(rows)


def _interval(prefix: str, values: list[float]) -> dict[str, float]:
    interval = t_interval(values, CONFIDENCE, bounds=(0.0, 1.0))
    return {prefix: interval.mean, f"{prefix}_low": interval.low, f"{prefix}_high": interval.high,
            f"{prefix}_n": interval.n}


def format_ratio(estimate: float, low: float, high: float, status: str | None) -> str:
    """"0.45 [0.20, 0.70]"; "0.45 [unbounded]" when Fieller's set is not an interval; "0.45" without an
    interval (fewer than 3 seeds); "no headroom" when normal is at or above the reference; "" without one."""
    if status == "no headroom":
        return "no headroom"
    if status is None or (isinstance(status, float) and math.isnan(status)) or pd.isna(estimate):
        return ""
    if status == "bounded":
        return f"{estimate:.2f} [{low:.2f}, {high:.2f}]"
    if status == "unbounded":
        return f"{estimate:.2f} [unbounded]"
    return f"{estimate:.2f}"


def describe_ratio(row: pd.Series | dict, reference: str) -> str:
    """A `headroom` row in words: "0.45 of the headroom to the ensemble (95% Fieller interval 0.20 to 0.70
    over 3 seeds)"."""
    status, n = row["status"], int(row["n_seeds"])
    if status == "no headroom":
        return f"no headroom to the {reference} (normal is at or above it on average over {n} seeds)"
    if status == "no values":
        return f"no common seed with the {reference}"
    text = f"{row['estimate']:.2f} of the headroom to the {reference}"
    if status == "bounded":
        return text + f" (95% Fieller interval {row['low']:.2f} to {row['high']:.2f} over {n} seeds)"
    if status == "unbounded":
        return text + f" (interval unbounded: the headroom is not distinguishable from 0 over {n} seeds)"
    return text + f" (no interval from {n} seed{'s' if n != 1 else ''})"
