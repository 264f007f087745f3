"""The imbalance report: utilisation / balance formulas on a hand-written sweep in a real MLflow store
(numbers computed by hand below), and the whole report on a real tiny Ray Tune sweep."""
from __future__ import annotations

import html
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from orchestrator.report import build_report, log_sweep_imbalance
from orchestrator.report.stats import holm, paired_test
from conftest import sqlite_store

# ---- a sweep written by hand into MLflow ------------------------------------------------------

# Per trial: params and per-epoch metrics (epochs 0, 1), exactly as the sweep's children log them.
HAND_TRIALS = {
    "audio_only_s0": ({"method.name": "audio_only", "train.seed": "0"}, {"acc": [0.5, 0.8]}),
    "audio_only_s1": ({"method.name": "audio_only", "train.seed": "1"}, {"acc": [0.6, 0.9]}),
    "visual_only_s0": ({"method.name": "visual_only", "train.seed": "0"}, {"acc": [0.4, 0.6]}),
    "visual_only_s1": ({"method.name": "visual_only", "train.seed": "1"}, {"acc": [0.5, 0.7]}),
    "normal_s0": ({"method.name": "normal", "train.seed": "0"},
                  {"acc": [0.6, 0.85], "acc_audio": [0.5, 0.8], "acc_visual": [0.2, 0.3],
                   "shapley_audio": [0.3, 0.5], "shapley_visual": [0.05, 0.1]}),
    "normal_s2": ({"method.name": "normal", "train.seed": "2"},
                  {"acc": [0.6, 0.8], "acc_audio": [0.55, 0.85], "acc_visual": [0.3, 0.42],
                   "shapley_audio": [0.3, 0.4], "shapley_visual": [0.1, 0.2]}),
    "ogm_ge_w01_s0": ({"method.name": "ogm_ge", "method.alpha": "0.5", "method.modulation_starts": "0",
                       "method.modulation_ends": "1", "train.seed": "0"},
                      {"acc": [0.5, 0.84], "acc_audio": [0.4, 0.76], "acc_visual": [0.3, 0.45],
                       "shapley_audio": [0.2, 0.4], "shapley_visual": [0.1, 0.2], "k_audio": [0.4, 1.0], "k_visual": [1.0, 1.0]}),
    "ogm_ge_w02_s0": ({"method.name": "ogm_ge", "method.alpha": "0.5", "method.modulation_starts": "0",
                       "method.modulation_ends": "2", "train.seed": "0"},
                      {"acc": [0.45, 0.7], "acc_audio": [0.4, 0.58], "acc_visual": [0.35, 0.54],
                       "shapley_audio": [0.2, 0.3], "shapley_visual": [0.15, 0.25], "k_audio": [0.4, 0.5], "k_visual": [1.0, 1.0]}),
}


HAND_CLIPS = 100


# Three seeds of every configuration: enough for a verdict (stats.MIN_SEEDS). Final-epoch numbers only
# matter here; the first epoch is 0.1 below.
def _three_seeds(method: str, extra: dict, finals: dict[str, list[float]]) -> dict:
    return {f"{method}{'_' + extra.get('tag', '') if extra.get('tag') else ''}_s{seed}":
            ({"method.name": method, "train.seed": str(seed), **{k: v for k, v in extra.items() if k != "tag"}},
             {k: [v[seed] - 0.1, v[seed]] for k, v in finals.items()})
            for seed in range(3)}


OGM = {"method.alpha": "0.5", "method.modulation_starts": "0"}
HAND3 = {
    **_three_seeds("audio_only", {}, {"acc": [0.80, 0.90, 0.85]}),
    **_three_seeds("visual_only", {}, {"acc": [0.60, 0.70, 0.65]}),
    **_three_seeds("normal", {}, {"acc": [0.85, 0.80, 0.83], "acc_audio": [0.80, 0.85, 0.82],
                                  "acc_visual": [0.30, 0.42, 0.36], "shapley_audio": [0.5, 0.4, 0.45],
                                  "shapley_visual": [0.1, 0.2, 0.15]}),
    **_three_seeds("ogm_ge", {"tag": "w01", **OGM, "method.modulation_ends": "1"},
                   {"acc": [0.84, 0.82, 0.83], "acc_audio": [0.76, 0.78, 0.77], "acc_visual": [0.45, 0.47, 0.49],
                    "shapley_audio": [0.4, 0.4, 0.4], "shapley_visual": [0.2, 0.2, 0.2]}),
    **_three_seeds("ogm_ge", {"tag": "w02", **OGM, "method.modulation_ends": "2"},
                   {"acc": [0.70, 0.72, 0.71], "acc_audio": [0.58, 0.60, 0.59], "acc_visual": [0.54, 0.60, 0.57],
                    "shapley_audio": [0.3, 0.3, 0.3], "shapley_visual": [0.25, 0.25, 0.25]}),
}


def hand_outcomes(accuracy: float) -> np.ndarray:
    """A head of accuracy x is right on clips 0 .. 100x - 1 (as log_hand_predictions writes it)."""
    return (np.arange(HAND_CLIPS) < round(HAND_CLIPS * accuracy)).astype(float)


def hand_test(a: dict[str, list[float]], key_a: str, b: dict[str, list[float]], key_b: str):
    """The paired test of two HAND3 configurations' final heads, from the outcomes their predictions encode."""
    return paired_test(np.stack([hand_outcomes(x) for x in a[key_a]]), np.stack([hand_outcomes(x) for x in b[key_b]]))


def finals_of(name: str) -> dict[str, list[float]]:
    return {k: [HAND3[f"{name}_s{s}"][1][k][-1] for s in range(3)] for k in HAND3[f"{name}_s0"][1]}



def log_hand_predictions(client: MlflowClient, run_id: str, final: dict[str, float]) -> None:
    """predictions.csv for HAND_CLIPS validation clips matching the run's final accuracies: a head of
    accuracy x is right on clips 0 .. 100x - 1, so two runs' heads differ exactly on the clips between."""
    import tempfile

    import pandas as pd

    rows = []
    for clip in range(HAND_CLIPS):
        label = clip % 3
        row = {"split": "val", "model": "final", "clip_id": f"clip{clip:03d}", "label": label}
        for suffix, key in (("", "acc"), ("_audio", "acc_audio"), ("_visual", "acc_visual")):
            right = clip < round(HAND_CLIPS * final[key]) if key in final else None
            row[f"pred{suffix}"] = -1 if right is None else (label if right else (label + 1) % 3)
            row[f"p_true{suffix}"] = float("nan") if right is None else (0.9 if right else 0.1)
        rows.append(row)
    with tempfile.TemporaryDirectory() as tmp:
        pd.DataFrame(rows).to_csv(f"{tmp}/predictions.csv", index=False)
        client.log_artifact(run_id, f"{tmp}/predictions.csv")


def write_hand_sweep(uri: str, experiment: str, trials: dict,
                     with_predictions: bool = True) -> tuple[MlflowClient, str, dict[str, str]]:
    client = MlflowClient(uri)
    exp_id = client.create_experiment(experiment)
    parent = client.create_run(exp_id, tags={"avtune.kind": "sweep"}, run_name=f"sweep_{experiment}").info.run_id
    ids = {}
    for name, (params, metrics) in trials.items():
        run = client.create_run(exp_id, run_name=name,
                                tags={"mlflow.parentRunId": parent, "avtune.stage": "main", "avtune.trial_id": name})
        run_id = run.info.run_id
        full = {"model.fusion": "concat", "train.epochs": "2", **params}
        client.log_batch(run_id, params=[Param(k, v) for k, v in full.items()])
        ts = int(time.time() * 1000)
        rows = [Metric(k, v, ts, step) for k, values in metrics.items() for step, v in enumerate(values)]
        rows += [Metric("epoch", float(step), ts, step) for step in range(2)]
        client.log_batch(run_id, metrics=rows)
        if with_predictions:
            log_hand_predictions(client, run_id, {k: values[-1] for k, values in metrics.items()})
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
        ids[name] = run_id
    # A G-Blend estimation stage child must be ignored by the report.
    extra = client.create_run(exp_id, run_name="estimate", tags={"mlflow.parentRunId": parent, "avtune.stage": "gblend-estimate"})
    client.log_batch(extra.info.run_id, params=[Param("method.name", "normal")],
                     metrics=[Metric("acc", 0.99, 0, 0), Metric("acc_audio", 0.01, 0, 0), Metric("acc_visual", 0.99, 0, 0)])
    client.log_batch(parent, metrics=[Metric("gblend_w_audio", 0.2, 0, 0), Metric("gblend_w_visual", 0.5, 0, 0),
                                      Metric("gblend_w_joint", 0.3, 0, 0)])
    return client, parent, ids


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def sentence(page: str, finding_id: str) -> str:
    match = re.search(rf"<li id='{finding_id}'>(.*?)</li>", page, re.S)
    assert match, f"no finding {finding_id!r} in the report"
    return html.unescape(match.group(1))


def numbers(text: str) -> list[float]:
    """Every number written with three decimals, in order of appearance."""
    return [float(x) for x in re.findall(r"[-+]?\d+\.\d{3}\b", text)]


@pytest.fixture()
def hand_sweep(tmp_path):
    uri = sqlite_store(tmp_path / "mlflow.db")
    client, parent, ids = write_hand_sweep(uri, "hand", HAND_TRIALS)
    return uri, client, parent, ids


def test_utilisation_is_logged_per_epoch_against_the_matching_baseline(hand_sweep):
    uri, client, parent, ids = hand_sweep
    log_sweep_imbalance(client, parent)
    # normal s0 vs the seed-0 baselines: audio 0.5/0.5, 0.8/0.8; visual 0.2/0.4, 0.3/0.6.
    assert history(client, ids["normal_s0"], "util_audio") == [(0, pytest.approx(1.0)), (1, pytest.approx(1.0))]
    assert history(client, ids["normal_s0"], "util_visual") == [(0, pytest.approx(0.5)), (1, pytest.approx(0.5))]
    # normal s2 has no seed-2 baseline: mean over seeds 0 and 1, audio (0.55, 0.85), visual (0.45, 0.65).
    assert history(client, ids["normal_s2"], "util_audio") == [(0, pytest.approx(0.55 / 0.55)), (1, pytest.approx(0.85 / 0.85))]
    assert history(client, ids["normal_s2"], "util_visual") == [(0, pytest.approx(0.3 / 0.45)), (1, pytest.approx(0.42 / 0.65))]
    # ogm_ge window 0-2 (seed 0): visual 0.35/0.4, 0.54/0.6.
    assert history(client, ids["ogm_ge_w02_s0"], "util_visual") == [(0, pytest.approx(0.875)), (1, pytest.approx(0.9))]
    # Baselines get no utilisation of their own.
    assert client.get_metric_history(ids["audio_only_s0"], "util_audio") == []
    # A second call adds nothing (each epoch logged once).
    log_sweep_imbalance(client, parent)
    assert len(client.get_metric_history(ids["normal_s0"], "util_visual")) == 2


def test_summary_and_best_trials_on_the_parent(hand_sweep, tmp_path):
    uri, client, parent, ids = hand_sweep
    table = log_sweep_imbalance(client, parent).set_index("run_name")
    # balance = min(util_audio, util_visual), finals:
    # normal_s0 min(1.0, 0.5) = 0.5; normal_s2 min(1.0, 0.42/0.65 = 0.6462); w01 min(0.76/0.8 = 0.95, 0.45/0.6 = 0.75) = 0.75;
    # w02 min(0.58/0.8 = 0.725, 0.54/0.6 = 0.9) = 0.725.
    assert table.loc["normal_s0", "balance"] == pytest.approx(0.5)
    assert table.loc["normal_s2", "balance"] == pytest.approx(0.42 / 0.65)
    assert table.loc["ogm_ge_w01_s0", "balance"] == pytest.approx(0.75)
    assert table.loc["ogm_ge_w02_s0", "balance"] == pytest.approx(0.725)
    assert table.loc["normal_s2", "match_visual"] == "mean over seeds"
    assert table.loc["normal_s0", "match_visual"] == "same seed"
    assert table.loc["normal_s0", "gap"] == pytest.approx(0.8 - 0.3)
    assert "estimate" not in table.index
    run = client.get_run(parent)
    assert run.data.tags["avtune.imbalance.best_by_acc_run_id"] == ids["normal_s0"]  # acc 0.85
    assert run.data.tags["avtune.imbalance.best_by_balance_run_id"] == ids["ogm_ge_w01_s0"]
    assert run.data.tags["avtune.imbalance.balance_definition"].startswith("min(util_audio, util_visual)")
    assert run.data.metrics["best_by_balance/balance"] == pytest.approx(0.75)
    assert run.data.metrics["best_by_acc/util_visual"] == pytest.approx(0.5)
    local = Path(client.download_artifacts(parent, "imbalance_summary.csv", str(tmp_path)))
    header = local.read_text().splitlines()[0].split(",")
    for column in ("method", "alpha", "window", "fusion", "acc", "acc_audio", "acc_visual", "gap", "util_audio",
                   "util_visual", "shapley_audio", "shapley_visual", "balance"):
        assert column in header


def test_without_baselines_balance_is_the_shapley_balance(tmp_path):
    trials = {k: v for k, v in HAND_TRIALS.items() if not k.endswith("only_s0") and not k.endswith("only_s1")}
    client, parent, ids = write_hand_sweep(sqlite_store(tmp_path / "m.db"), "noref", trials)
    table = log_sweep_imbalance(client, parent).set_index("run_name")
    # 1 - |phi_a - phi_v| / (|phi_a| + |phi_v|): normal_s0 1 - 0.4/0.6; w02 1 - 0.05/0.55.
    assert table.loc["normal_s0", "balance"] == pytest.approx(1 - 0.4 / 0.6)
    assert table.loc["ogm_ge_w02_s0", "balance"] == pytest.approx(1 - 0.05 / 0.55)
    assert table["util_visual"].isna().all()
    assert client.get_run(parent).data.tags["avtune.imbalance.best_by_balance_run_id"] == ids["ogm_ge_w02_s0"]
    assert client.get_metric_history(ids["normal_s0"], "util_visual") == []


def test_report_words_with_fewer_than_three_seeds_give_no_verdict(hand_sweep, tmp_path):
    """HAND_TRIALS has normal on 2 seeds and each OGM configuration on 1: the report states the means but no
    verdict (stats.MIN_SEEDS), so no weak modality and none of the findings about it; every plot still applies."""
    uri, client, parent, ids = hand_sweep
    page = html.unescape(build_report("hand", tracking_uri=uri, out_dir=tmp_path / "out").read_text())
    dominance = sentence(page, "dominance")
    assert dominance.startswith("Neither head is distinguishably stronger in the normal joint model")
    assert "a verdict needs at least 3 seeds" in dominance
    # Normal (mean over s0, s2): audio (0.8 + 0.85) / 2 = 0.825, visual (0.3 + 0.42) / 2 = 0.36; the paired
    # difference on those seeds: 0.465; Shapley (0.5 + 0.4) / 2, (0.1 + 0.2) / 2; baselines (0.8 + 0.9) / 2, (0.6 + 0.7) / 2.
    assert numbers(dominance) == pytest.approx([0.825, 0.36, 0.465, 0.45, 0.15, 0.85, 0.65])
    for finding in ("weak_vs_unimodal", "ogm_vs_normal", "tradeoff", "window", "power"):
        assert f"<li id='{finding}'>" not in page, finding
    # The ablation plots show both heads when neither is weak. Every planned plot applies to this sweep.
    for name in ("configurations", "acc_per_modality", "gap", "utilisation", "ogm_coefficients", "ablation_alpha",
                 "ablation_window", "shapley", "gblend_weights"):
        assert (tmp_path / "out" / f"{name}.png").stat().st_size > 1000, name
        assert f"id=\"fig-{name}\"" in page
    assert "G-Blend weights: audio 0.200, visual 0.500, joint 0.300" in page
    # Self-contained: images are embedded.
    assert page.count("src=\"data:image/png;base64,") == 9


@pytest.fixture()
def hand3_sweep(tmp_path):
    uri = sqlite_store(tmp_path / "mlflow3.db")
    client, parent, ids = write_hand_sweep(uri, "hand3", HAND3)
    return uri, client, parent, ids


def test_report_words_state_the_hand_numbers(hand3_sweep, tmp_path):
    """Three seeds per configuration: the words follow the paired tests on the clips each run's predictions
    encode (recomputed here from HAND3 with stats.paired_test, itself checked by hand in test_stats.py), with
    Holm's adjustment within each family."""
    uri, client, parent, ids = hand3_sweep
    page = html.unescape(build_report("hand3", tracking_uri=uri, out_dir=tmp_path / "out").read_text())
    normal, w01, w02 = finals_of("normal"), finals_of("ogm_ge_w01"), finals_of("ogm_ge_w02")
    visual_only = finals_of("visual_only")
    # Dominance: normal's audio head minus its visual head, per seed 0.50, 0.43, 0.46; one test in its family.
    dominance_test = hand_test(normal, "acc_audio", normal, "acc_visual")
    assert dominance_test.p_value <= 0.05
    dominance = sentence(page, "dominance")
    assert dominance.startswith("Audio is the dominant modality")
    assert numbers(dominance)[:3] == pytest.approx([0.823333, 0.36, dominance_test.difference], abs=6e-4)
    assert f"p = {dominance_test.p_value:.2g}, Holm-adjusted p = {dominance_test.p_value:.2g}" in dominance
    # Under-use: normal's visual head against visual_only, per seed -0.30, -0.28, -0.29 (one test in its family).
    under_test = hand_test(normal, "acc_visual", visual_only, "acc")
    under = sentence(page, "weak_vs_unimodal")
    assert "visual head reaches 0.360, below the visual_only baseline's 0.650" in under
    assert f"paired difference {under_test.difference:+.3f}" in under and "seed x clip paired t over 3 seeds and 100 clips" in under
    # The vs-normal family: 2 OGM configurations x 3 heads, Holm over the 6 p-values.
    family = {(name, key): hand_test(finals, key, normal, key) for name, finals in (("w01", w01), ("w02", w02))
              for key in ("acc", "acc_audio", "acc_visual")}
    adjusted = dict(zip(family, holm([t.p_value for t in family.values()])))
    best = family[("w02", "acc_visual")]  # window 0-2 has the best visual head (0.57)
    ogm = sentence(page, "ogm_vs_normal")
    assert "ogm_ge alpha=0.5 window=0-2" in ogm and "the best of 2 OGM configurations" in ogm
    assert f"paired difference {best.difference:+.3f}" in ogm
    assert f"Holm-adjusted p = {adjusted[('w02', 'acc_visual')]:.2g}" in ogm
    verb = "raises" if adjusted[("w02", "acc_visual")] <= 0.05 else "is not distinguishable from normal"
    assert verb in ogm
    assert numbers(ogm)[:3] == pytest.approx([0.36, 0.57, best.difference], abs=6e-4)
    tradeoff = sentence(page, "tradeoff")
    # joint + visual: normal 0.8267 + 0.36, w01 0.83 + 0.47 = 1.30, w02 0.71 + 0.57 = 1.28.
    assert "ogm_ge alpha=0.5 window=0-1" in tradeoff and numbers(tradeoff)[:2] == pytest.approx([0.83, 0.47])
    assert "window 0-1: joint 0.830, visual 0.470; window 0-2: joint 0.710, visual 0.570" in sentence(page, "window")
    assert "What this sweep can resolve: with Holm over the 6 comparisons with normal" in sentence(page, "power")
    # The same adjusted numbers in the configuration summary and the comparisons file on the parent run.
    summary = pd.read_csv(tmp_path / "out" / "config_summary.csv").set_index("config")
    row = summary.loc["ogm_ge alpha=0.5 window=0-2"]
    assert row["p_acc_visual"] == pytest.approx(best.p_value, rel=1e-9)
    assert row["p_holm_acc_visual"] == pytest.approx(adjusted[("w02", "acc_visual")], rel=1e-9)
    assert row["n_paired_acc_visual"] == 3 and summary.loc["normal", "weak"] == "visual"
    logged = pd.read_csv(client.download_artifacts(parent, "comparisons.csv", str(tmp_path)))
    assert sorted(logged["family"].value_counts().items()) == [("dominance", 1), ("vs_normal", 6), ("weak_vs_unimodal", 1)]
    assert logged.loc[logged["family"] == "vs_normal", "p_holm"].tolist() == pytest.approx(
        [adjusted[(c, k)] for c in ("w01", "w02") for k in ("acc", "acc_audio", "acc_visual")], rel=1e-9)


def test_bad_names_give_clear_errors(hand_sweep, tmp_path):
    uri, client, parent, ids = hand_sweep
    with pytest.raises(ValueError, match="experiment 'nope' not found"):
        build_report("nope", tracking_uri=uri, out_dir=tmp_path / "out")
    with pytest.raises(ValueError, match="not a sweep's parent run"):
        build_report("hand", sweep_run_id=ids["normal_s0"], tracking_uri=uri, out_dir=tmp_path / "out")
    with pytest.raises(ValueError, match="sweep run 'deadbeef' not found"):
        build_report("hand", sweep_run_id="deadbeef", tracking_uri=uri, out_dir=tmp_path / "out")


# ---- the report of the real shared sweep (conftest.shared_sweep) ----------------------------


def final_metrics(client: MlflowClient, parent: str) -> dict[str, dict[str, float]]:
    """method -> final metrics of its (single) main-stage trial, read straight from MLflow."""
    exp_id = client.get_run(parent).info.experiment_id
    runs = client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and tags.`avtune.stage` = 'main'")
    return {r.data.params["method.name"]: {**r.data.metrics, "run_id": r.info.run_id} for r in runs}


@pytest.mark.slow
def test_report_of_a_real_sweep(shared_sweep):
    result, tmp = shared_sweep
    client = MlflowClient(result.tracking_uri)
    report = build_report("shared", tracking_uri=result.tracking_uri, out_dir=tmp / "report")
    assert report == (tmp / "report" / "report.html").resolve()
    pngs = sorted(p.name for p in report.parent.glob("*.png"))
    # Every plot applies to this sweep (OGM-GE, G-Blend, both baselines).
    assert pngs == ["ablation_alpha.png", "ablation_window.png", "acc_per_modality.png", "configurations.png", "gap.png",
                    "gblend_weights.png", "ogm_coefficients.png", "shapley.png", "utilisation.png"]
    for name in pngs:
        data = (report.parent / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    logged = {a.path for a in client.list_artifacts(result.parent_run_id, "report")}
    assert {f"report/{n}" for n in pngs} | {"report/report.html", "report/imbalance_summary.csv",
                                            "report/config_summary.csv", "report/comparisons.csv",
                                            "report/findings.json"} <= logged
    assert {"imbalance_summary.csv", "config_summary.csv"} <= {a.path for a in client.list_artifacts(result.parent_run_id)}

    finals = final_metrics(client, result.parent_run_id)
    normal, ogm = finals["normal"], finals["ogm_ge"]
    base = {"audio": finals["audio_only"]["acc"], "visual": finals["visual_only"]["acc"]}
    # Utilisation in the joint children, per epoch, = head accuracy / same-seed baseline accuracy.
    for m in ("audio", "visual"):
        util = history(client, normal["run_id"], f"util_{m}")
        assert [step for step, _ in util] == [0, 1]
        baseline_curve = dict(history(client, finals[f"{m}_only"]["run_id"], "acc"))
        for step, value in util:
            assert value == pytest.approx(dict(history(client, normal["run_id"], f"acc_{m}"))[step] / baseline_curve[step])

    # The words match the numbers logged in MLflow. One seed per method: means, but no verdict.
    page = html.unescape(report.read_text())
    dominance = sentence(page, "dominance")
    assert dominance.startswith("Neither head is distinguishably stronger in the normal joint model")
    assert "no test, a verdict needs at least 3 seeds" in dominance
    assert numbers(dominance)[:2] == pytest.approx([normal["acc_audio"], normal["acc_visual"]], abs=6e-4)
    assert "<li id='weak_vs_unimodal'>" not in page
    summary = pd.read_csv(report.parent / "config_summary.csv").set_index("config")
    assert set(summary.loc["ogm_ge alpha=0.5 window=0-2", ["vs_normal_acc", "vs_normal_acc_visual"]]) == {"no verdict"}
    assert summary.loc["normal", "n"] == 1 and pd.isna(summary.loc["normal", "acc_low"])

    # References: the clips are generated, so the sweep logged the card's ceiling on its parent before training;
    # every classifier logged its joint softmax, and the report fused the two baselines' into the ensemble.
    import json

    from orchestrator.report import load_sweep
    from orchestrator.report.references import load_probabilities

    parent = client.get_run(result.parent_run_id).data.metrics
    card = json.loads(Path(client.download_artifacts(result.parent_run_id, "card.json", str(tmp / "card"))).read_text())
    best = card["best_achievable_accuracy"]["val"]
    assert (parent["ceiling_acc"], parent["ceiling_acc_audio"], parent["ceiling_acc_visual"]) == \
        (best["audio_visual"], best["audio"], best["visual"])
    for method in ("normal", "ogm_ge", "audio_only", "visual_only"):
        clips, probs = load_probabilities(client, finals[method]["run_id"])
        assert probs.dtype == np.float16 and probs.shape == (card["informative_realised"]["val"]["clips"], 3), method
        np.testing.assert_allclose(probs.astype(float).sum(axis=1), 1.0, atol=3e-3)
    ensemble = load_sweep(client, result.parent_run_id).references().ensembles[""]
    assert parent["ensemble_acc_mean"] == pytest.approx(list(ensemble.accuracy().values())[0])
    assert "id='references'" in page and "ceiling (best achievable on these validation clips)" in sentence(page, "headroom")


@pytest.mark.slow
def test_cli_report_prints_the_path(shared_sweep):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    result, tmp = shared_sweep
    out = tmp / "cli_report"
    res = CliRunner().invoke(app, ["report", "shared", "--sweep", result.parent_run_id, "--out", str(out),
                                   "--tracking-uri", result.tracking_uri])
    assert res.exit_code == 0, res.output
    assert str((out / "report.html").resolve()) in res.output.replace("\n", "")
    assert (out / "report.html").stat().st_size > 10_000
    bad = CliRunner().invoke(app, ["report", "nosuch", "--tracking-uri", result.tracking_uri, "--out", str(out)])
    assert bad.exit_code == 2 and "nosuch" in bad.output


def ogm_trials_logging_their_score_source() -> dict:
    """HAND_TRIALS with the OGM runs' `ogm_scores_from` param, as the OGM runs of a sweep log it."""
    trials = dict(HAND_TRIALS)
    for name in ("ogm_ge_w01_s0", "ogm_ge_w02_s0"):
        params, metrics = trials[name]
        trials[name] = ({**params, "ogm_scores_from": "fusion_logits"}, metrics)
    return trials


def hand_report_page(tmp_path, experiment: str, trials: dict) -> str:
    uri = sqlite_store(tmp_path / (experiment + ".db"))
    write_hand_sweep(uri, experiment, trials)
    return html.unescape(build_report(experiment, tracking_uri=uri, out_dir=tmp_path / experiment).read_text())


def test_ablation_captions_say_when_ogm_scores_come_from_two_kinds_of_heads(tmp_path):
    trials = ogm_trials_logging_their_score_source()
    ogm_params, ogm_metrics = trials["ogm_ge_w01_s0"]
    trials["ogm_ge_film_s0"] = ({**ogm_params, "model.fusion": "film", "ogm_scores_from": "probe_heads"}, ogm_metrics)
    assert "mix scores from the fusion's own per-modality logits" in hand_report_page(tmp_path, "mixed", trials)
    assert "mix scores" not in hand_report_page(tmp_path, "one", HAND_TRIALS)


def test_derived_run_params_do_not_split_configurations(tmp_path):
    """OGM runs log `ogm_scores_from`, other runs do not: that must not make a context group."""
    page = hand_report_page(tmp_path, "derived", ogm_trials_logging_their_score_source())
    # One group: the dominance finding is there once, without a "[group]" prefix.
    assert len(re.findall(r"<li id='dominance'>", page)) == 1
    assert sentence(page, "dominance").startswith("Neither head is distinguishably stronger")


def test_an_effect_within_noise_is_reported_as_not_distinguishable(tmp_path):
    """Two configurations identical but for the name (OGM-GE that did exactly what normal did, seed by seed
    and clip by clip): the report must not claim it raises anything."""
    joint = {"acc": [0.5, 0.8], "acc_audio": [0.5, 0.8], "acc_visual": [0.2, 0.4]}
    ogm = {"method.name": "ogm_ge", "method.alpha": "0.5", "method.modulation_starts": "0", "method.modulation_ends": "2"}
    trials = {}
    for seed in ("0", "1", "2"):
        trials[f"normal_s{seed}"] = ({"method.name": "normal", "train.seed": seed}, joint)
        trials[f"ogm_s{seed}"] = ({**ogm, "train.seed": seed}, joint)
        trials[f"visual_only_s{seed}"] = ({"method.name": "visual_only", "train.seed": seed}, {"acc": [0.5, 0.6]})
    page = hand_report_page(tmp_path, "noise", trials)
    # Normal's audio head is right on clips 0-79, its visual head on 0-39, on every seed: the clips alone
    # make the dominance test (seed x clip paired t: 3 seeds, 100 clips).
    assert sentence(page, "dominance").startswith("Audio is the dominant modality")
    verdict = sentence(page, "ogm_vs_normal")
    assert "is not distinguishable from normal on this data" in verdict and "raises" not in verdict
    assert "paired difference +0.000, 95% CI +0.000 to +0.000, p = 1" in verdict
    assert "identical outcomes on every seed and clip" in verdict
    # The per-configuration table: 3 equal seeds give no interval (not a zero-width one); "not distinguishable".
    summary = pd.read_csv(tmp_path / "noise" / "config_summary.csv")
    row = summary.set_index("config").loc["ogm_ge alpha=0.5 window=0-2"]
    assert row["acc_visual"] == pytest.approx(0.4) and pd.isna(row["acc_visual_low"]) and pd.isna(row["acc_visual_high"])
    assert row["vs_normal_acc_visual"] == "not distinguishable" and row["p_acc_visual"] == 1.0


def test_configuration_intervals_are_t_intervals_over_seeds(hand_sweep, tmp_path):
    """Normal's joint accuracy over seeds 0 and 2: 0.85 and 0.80 -> mean 0.825, s = 0.035355, t(0.975, 1) =
    12.7062: half-width 12.7062 * 0.035355 / sqrt(2) = 0.31766, cut at 1 (an accuracy). Logged on the parent
    and shown in the page."""
    uri, client, parent, ids = hand_sweep
    page = build_report("hand", tracking_uri=uri, out_dir=tmp_path / "out").read_text()
    summary = pd.read_csv(tmp_path / "out" / "config_summary.csv").set_index("config")
    assert (summary.loc["normal", ["acc", "acc_low", "acc_high"]].tolist()
            == pytest.approx([0.825, 0.825 - 0.31766, 1.0], abs=1e-4))
    assert summary.loc["normal", "n"] == 2 and summary.loc["ogm_ge alpha=0.5 window=0-1", "n"] == 1
    assert "0.825 [0.507, 1.000]" in page and "How to read" in page
    metrics = client.get_run(parent).data.metrics
    assert metrics["cfg/normal/acc_mean"] == pytest.approx(0.825)
    assert metrics["cfg/normal/acc_low"] == pytest.approx(0.825 - 0.31766, abs=1e-4)
    assert metrics["cfg/normal/acc_high"] == 1.0
    assert "config_summary.csv" in {a.path for a in client.list_artifacts(parent)}


def test_cli_results_show_intervals_and_paired_differences(hand3_sweep):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    uri, client, parent, ids = hand3_sweep
    res = CliRunner().invoke(app, ["results", "hand3", "--tracking-uri", uri], env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output
    assert "normal_s0" in res.output  # the trials table
    text = " ".join(res.output.split())
    # The configurations table (rich may wrap cells): normal's joint t-interval over its 3 seeds
    # (0.85, 0.80, 0.83: mean 0.8267, s 0.02517, t(0.975, 2) 4.3027: half-width 0.0625) and window 0-2's
    # visual head against normal's, with its raw and Holm-adjusted p-values.
    assert "0.827 [0.764," in text and "0.889]" in text
    best = hand_test(finals_of("ogm_ge_w02"), "acc_visual", finals_of("normal"), "acc_visual")
    assert f"{best.difference:+.3f} [{best.low:+.3f}," in text and f"p={best.p_value:.2g}" in text
    assert "Holm p=" in text and "not distinguishable" in text
    assert "How to read: [low, high] is a 95% t-interval" in text


def test_gblend_finding_names_its_weights_and_a_starved_head(tmp_path):
    trials = {f"{m}_s0": ({"method.name": m, "train.seed": "0", **extra}, metrics) for m, extra, metrics in (
        ("normal", {}, {"acc": [0.5, 0.8], "acc_audio": [0.5, 0.8], "acc_visual": [0.2, 0.4]}),
        ("gblend", {"gblend_weights_source": "estimated"},
         {"acc": [0.1, 0.2], "acc_audio": [0.1, 0.1], "acc_visual": [0.3, 0.4]}))}
    page = hand_report_page(tmp_path, "blend", trials)  # the hand sweep's parent has weights 0.2 / 0.5 / 0.3
    text = sentence(page, "gblend")
    assert "audio 0.200, visual 0.500, joint 0.300 (estimated)" in text and "joint accuracy is 0.200" in text
    assert "weight 0" not in text
    uri = sqlite_store(tmp_path / "starved.db")
    client, parent, _ = write_hand_sweep(uri, "starved", trials)
    client.log_batch(parent, metrics=[Metric("gblend_w_audio", 0.0, 1, 0), Metric("gblend_w_visual", 1.0, 1, 0),
                                      Metric("gblend_w_joint", 0.0, 1, 0)])
    starved = sentence(html.unescape(build_report("starved", tracking_uri=uri, out_dir=tmp_path / "s").read_text()), "gblend")
    assert "The audio and joint heads get weight 0 and no gradient" in starved
    assert "uniform fallback" not in starved
    fallback_trials = {name: ({**params, **({"gblend_weights_source": "uniform_fallback"} if "gblend_weights_source" in params else {})},
                              metrics) for name, (params, metrics) in trials.items()}
    (tmp_path / "fb").mkdir()
    fallback = sentence(hand_report_page(tmp_path / "fb", "fallback", fallback_trials), "gblend")
    assert "(uniform_fallback)" in fallback and "trained with the uniform fallback, not estimated weights" in fallback


def test_leaderboard_rows_are_hand_computed_and_logged_on_the_parent(hand_sweep, tmp_path):
    """Methods as rows: mean and 95% t-interval over seeds, the weak modality's utilisation, the Shapley
    balance, training seconds per epoch and the paired difference from normal, as computed by hand."""
    uri, client, parent, ids = hand_sweep
    ts = int(time.time() * 1000)
    for name, seconds in (("normal_s0", [1.0, 3.0]), ("normal_s2", [2.0, 4.0])):
        client.log_batch(ids[name], metrics=[Metric("train_seconds", v, ts, step) for step, v in enumerate(seconds)])
    out = build_report("hand", tracking_uri=uri, out_dir=tmp_path / "report")
    board = pd.read_csv(tmp_path / "report" / "leaderboard_numbers.csv").set_index("config")
    # Best joint accuracy first: audio_only (0.8, 0.9) 0.85, ogm_ge w0-1 0.84, normal (0.85, 0.8) 0.825, ...
    assert list(board.index[:3]) == ["audio_only", "ogm_ge alpha=0.5 window=0-1", "normal"]
    normal = board.loc["normal"]
    # n = 2: mean 0.825, sd 0.0353553, t(0.975, 1) = 12.7062 -> half-width 0.317655, cut at 1 (an accuracy).
    assert normal["n"] == 2 and normal["acc"] == pytest.approx(0.825)
    assert (normal["acc_low"], normal["acc_high"]) == pytest.approx((0.507345, 1.0), abs=1e-5)
    # Normal's heads (audio 0.825, visual 0.36) are on 2 seeds: no verdict on which is weak, so no weak columns.
    assert pd.isna(normal["weak"]) and pd.isna(normal["util_weak"]) and pd.isna(normal["d_weak"])
    # Shapley balance 1 - |a - v| / (|a| + |v|): seed 0 (0.5, 0.1) -> 1/3, seed 2 (0.4, 0.2) -> 2/3.
    assert normal["shapley_balance"] == pytest.approx(0.5)
    # Mean over epochs per run (2.0, 3.0), then over runs.
    assert normal["train_seconds_per_epoch"] == pytest.approx(2.5)
    ogm = board.loc["ogm_ge alpha=0.5 window=0-1"]
    assert ogm["shapley_balance"] == pytest.approx(1 - 0.2 / 0.6)
    # Paired on the one seed both ran (0) and the same 100 clips: 0.84 - 0.85, on 1 seed: no verdict.
    assert ogm["d_acc"] == pytest.approx(-0.01) and ogm["n_paired_acc"] == 1 and ogm["vs_normal_acc"] == "no verdict"
    assert pd.isna(board.loc["audio_only", "d_acc"]) and pd.isna(board.loc["audio_only", "acc_visual"])
    page = out.read_text()
    # The interval [0.507, 1.143] is cut at 1, so it is shown with its ends.
    assert "id='leaderboard'" in page and "0.825 [0.507, 1.000]" in page
    logged = {a.path for a in client.list_artifacts(parent)}
    assert {"leaderboard.csv", "leaderboard_numbers.csv"} <= logged
    shown = pd.read_csv(client.download_artifacts(parent, "leaderboard.csv", str(tmp_path)))
    assert shown.loc[shown["method"] == "normal", "acc"].item() == "0.825 [0.507, 1.000]"


def test_leaderboard_weak_columns_and_holm_on_three_seeds(hand3_sweep, tmp_path):
    uri, client, parent, ids = hand3_sweep
    build_report("hand3", tracking_uri=uri, out_dir=tmp_path / "report")
    board = pd.read_csv(tmp_path / "report" / "leaderboard_numbers.csv").set_index("config")
    normal = board.loc["normal"]
    # Visual is weak (the dominance test). util_visual per seed against the same-seed visual_only:
    # 0.30 / 0.60, 0.42 / 0.70, 0.36 / 0.65.
    assert normal["weak"] == "visual"
    assert normal["util_weak"] == pytest.approx((0.30 / 0.60 + 0.42 / 0.70 + 0.36 / 0.65) / 3)
    w02 = board.loc["ogm_ge alpha=0.5 window=0-2"]
    best = hand_test(finals_of("ogm_ge_w02"), "acc_visual", finals_of("normal"), "acc_visual")
    assert (w02["d_weak"], w02["p_weak"]) == pytest.approx((best.difference, best.p_value), rel=1e-9)
    assert w02["p_holm_weak"] >= w02["p_weak"] and w02["n_paired_weak"] == 3
    shown = pd.read_csv(tmp_path / "report" / "leaderboard.csv").set_index("method")
    assert {"p Holm", "p weak Holm"} <= set(shown.columns)
    assert shown.loc["ogm_ge alpha=0.5 window=0-2", "weak vs normal"] == w02["vs_normal_weak"]


@pytest.mark.parametrize("damage,message", [
    ("duplicate", r"lists clip 'clip001' 2 times"),
    ("blank", r"has a blank pred_visual for clip 'clip002'"),
])
def test_duplicated_or_blank_predictions_are_refused_naming_the_run_and_file(tmp_path, damage, message):
    """A clip listed twice would count twice in a paired test, a blank prediction would be scored as wrong:
    the report refuses both, naming the run and its predictions.csv."""
    from orchestrator.report.comparisons import load_predictions

    client = MlflowClient(sqlite_store(tmp_path / "m.db"))
    run_id = client.create_run(client.create_experiment("bad")).info.run_id
    rows = [{"split": "val", "model": "final", "clip_id": f"clip{c:03d}", "label": 0, "pred": 0, "pred_audio": 0,
             "pred_visual": 0} for c in range(4)]
    if damage == "duplicate":
        rows.append(dict(rows[1]))
    else:
        rows[2]["pred_visual"] = None
    pd.DataFrame(rows).to_csv(tmp_path / "predictions.csv", index=False)
    client.log_artifact(run_id, str(tmp_path / "predictions.csv"))
    with pytest.raises(ValueError, match=rf"run {run_id}: predictions\.csv {message}"):
        load_predictions(client, run_id)


# ---- references: the uni-modal ensemble, the ceiling and the headroom recovered ------------------------


def unimodal_probabilities(accuracy: float, confidence: np.ndarray) -> np.ndarray:
    """(HAND_CLIPS, 3) softmax of a uni-modal run whose predictions.csv (log_hand_predictions) is right on
    clips 0 .. 100 x - 1 and otherwise says label + 1: its predicted class gets `confidence[clip]` (> 1/3,
    so it is the argmax), the other two classes half of the rest each."""
    probs = np.repeat(((1.0 - confidence) / 2.0)[:, None], 3, axis=1)
    for clip in range(HAND_CLIPS):
        label = clip % 3
        probs[clip, label if clip < round(HAND_CLIPS * accuracy) else (label + 1) % 3] = confidence[clip]
    return probs


def log_hand_probabilities(client: MlflowClient, run_id: str, probs: np.ndarray) -> None:
    """probabilities.npz as training.log_probabilities writes it: the final model's validation rows, and
    test rows of the selected model (uniform here: the report must not read them)."""
    import tempfile

    clips = [f"clip{c:03d}" for c in range(HAND_CLIPS)]
    with tempfile.TemporaryDirectory() as tmp:
        np.savez_compressed(f"{tmp}/probabilities.npz", clip_id=np.array(clips * 2),
                            split=np.array(["val"] * HAND_CLIPS + ["test"] * HAND_CLIPS),
                            model=np.array(["final"] * HAND_CLIPS + ["selected"] * HAND_CLIPS),
                            probs=np.vstack([probs, np.full_like(probs, 1 / 3)]).astype(np.float16))
        client.log_artifact(run_id, f"{tmp}/probabilities.npz")


def write_sweep_with_probabilities(uri: str, experiment: str, trials: dict, confidence: dict[str, np.ndarray],
                                   ceiling: float | None = None) -> tuple[MlflowClient, str, dict[str, str]]:
    """A hand sweep whose uni-modal runs also log probabilities.npz (confidence per method: per clip), and
    whose parent logs `ceiling_acc` as sweep.log_ceiling does for generated clips."""
    client, parent, ids = write_hand_sweep(uri, experiment, trials)
    for name, (params, metrics) in trials.items():
        method = params["method.name"]
        if method in confidence:
            log_hand_probabilities(client, ids[name], unimodal_probabilities(metrics["acc"][-1], confidence[method]))
    if ceiling is not None:
        client.log_batch(parent, metrics=[Metric("ceiling_acc", ceiling, 0, 0)])
    return client, parent, ids


def mixed_confidence() -> dict[str, np.ndarray]:
    """Per clip, how sure each uni-modal run is: drawn once (fixed seed) so that fusing them changes the
    answer on some clips: neither modality always wins."""
    rng = np.random.default_rng(27)
    return {"audio_only": rng.uniform(0.4, 0.95, HAND_CLIPS), "visual_only": rng.uniform(0.4, 0.95, HAND_CLIPS)}


def test_the_ensemble_is_late_fusion_of_the_logged_probabilities_and_needs_no_ceiling(tmp_path):
    """Recomputed here from the two probabilities.npz files of each seed (downloaded from MLflow): the mean of
    the audio_only and visual_only softmax, argmax, right or wrong per clip; the report uses exactly that,
    pairs it with normal on seeds and clips, and logs its mean over seeds on the parent. The sweep has no
    ceiling (real data): the ensemble is then the only reference."""
    from orchestrator.report import load_sweep

    uri = sqlite_store(tmp_path / "ens.db")
    client, parent, ids = write_sweep_with_probabilities(uri, "ens", HAND3, mixed_confidence())
    labels = np.arange(HAND_CLIPS) % 3
    fused, right = {}, {}
    for seed in range(3):
        loaded = []
        for method in ("audio_only", "visual_only"):
            path = client.download_artifacts(ids[f"{method}_s{seed}"], "probabilities.npz", str(tmp_path / f"{method}{seed}"))
            with np.load(path) as npz:
                val = (npz["split"] == "val") & (npz["model"] == "final")
                assert list(npz["clip_id"][val]) == [f"clip{c:03d}" for c in range(HAND_CLIPS)]
                loaded.append(npz["probs"][val].astype(np.float64))
        fused[seed] = (loaded[0] + loaded[1]) / 2
        right[seed] = (fused[seed].argmax(axis=1) == labels).astype(float)
    # Fusion changes answers: on some clips exactly one of the two runs is right.
    audio, visual = (hand_outcomes(finals_of(m)["acc"][0]) for m in ("audio_only", "visual_only"))
    assert np.any(right[0] != audio) and np.any(right[0] != visual)

    ensemble = load_sweep(client, parent).references().ensembles[""]
    assert ensemble.config == "ensemble (audio_only + visual_only)"
    assert (ensemble.audio_config, ensemble.visual_config) == ("audio_only", "visual_only")
    for seed in range(3):
        clips, probs = ensemble.probabilities[str(seed)]
        assert list(clips) == [f"clip{c:03d}" for c in range(HAND_CLIPS)]
        np.testing.assert_allclose(probs, fused[seed], atol=1e-6)
        np.testing.assert_array_equal(ensemble.outcomes[str(seed)][1], right[seed])
    assert ensemble.accuracy() == pytest.approx({str(s): right[s].mean() for s in range(3)})

    page = html.unescape(build_report("ens", tracking_uri=uri, out_dir=tmp_path / "out").read_text())
    expected = paired_test(np.stack([right[s] for s in range(3)]),
                           np.stack([hand_outcomes(x) for x in finals_of("normal")["acc"]]))
    tests = pd.read_csv(tmp_path / "out" / "comparisons.csv")
    row = tests[tests["family"] == "headroom"].iloc[0]
    assert (row["config"], row["reference"], row["metric"]) == ("ensemble (audio_only + visual_only)", "normal", "acc")
    assert (row["difference"], row["p_value"]) == pytest.approx((expected.difference, expected.p_value), rel=1e-9)
    metrics = client.get_run(parent).data.metrics
    assert metrics["ensemble_acc_mean"] == pytest.approx(np.mean([right[s].mean() for s in range(3)]))
    assert {"ensemble_acc_low", "ensemble_acc_high"} <= set(metrics)

    # This sweep has no card, as real data: no ceiling, and the ensemble is the only reference, in the page,
    # the findings, the tests, the configuration summary and the leaderboard.
    assert "id='references'" in page and "no ceiling (real data" in sentence(page, "headroom")
    assert "uni-modal ensemble (late fusion of audio_only and visual_only, same seed)" in sentence(page, "headroom")
    assert tests.loc[tests["family"] == "headroom", "config"].tolist() == ["ensemble (audio_only + visual_only)"]
    summary = pd.read_csv(tmp_path / "out" / "config_summary.csv").set_index("config")
    assert summary.loc["ogm_ge alpha=0.5 window=0-1", "headroom_ensemble_status"] in ("bounded", "unbounded", "no headroom")
    assert summary["headroom_ceiling_status"].isna().all()
    shown = pd.read_csv(tmp_path / "out" / "leaderboard.csv").set_index("method")
    assert shown["headroom recovered vs ceiling"].isna().all()
    assert shown.loc["ogm_ge alpha=0.5 window=0-1", "headroom recovered vs ensemble"] != ""
    assert not any(k.startswith("ceiling") for k in metrics)


# Per seed: normal 0.80 / 0.82 / 0.78; window 0-1 gains 0.03 / 0.04 / 0.02, window 0-2 0.12 on every seed;
# audio_only (0.90, 0.94, 0.86) is sure of every clip (0.9) and visual_only unsure (0.4), so the ensemble says
# what audio_only says: its accuracy per seed is audio_only's.
HEADROOM = {
    **_three_seeds("audio_only", {}, {"acc": [0.90, 0.94, 0.86]}),
    **_three_seeds("visual_only", {}, {"acc": [0.50, 0.55, 0.45]}),
    **_three_seeds("normal", {}, {"acc": [0.80, 0.82, 0.78], "acc_audio": [0.80, 0.85, 0.82],
                                  "acc_visual": [0.30, 0.42, 0.36]}),
    **_three_seeds("ogm_ge", {"tag": "w01", **OGM, "method.modulation_ends": "1"},
                   {"acc": [0.83, 0.86, 0.80], "acc_audio": [0.80, 0.85, 0.82], "acc_visual": [0.30, 0.42, 0.36]}),
    **_three_seeds("ogm_ge", {"tag": "w02", **OGM, "method.modulation_ends": "2"},
                   {"acc": [0.92, 0.94, 0.90], "acc_audio": [0.80, 0.85, 0.82], "acc_visual": [0.30, 0.42, 0.36]}),
}
# t(0.975, 2)^2 = 0.95^2 / (2 * 0.975 * 0.025) = 722 / 39 (the df = 2 closed form, tests/test_stats.py).
T2 = 722 / 39


def fieller_by_hand(a: float, b: float, c: float) -> tuple[float, float]:
    """Roots of a r^2 - 2 b r + c = 0: the ends of Fieller's interval."""
    root = (b * b - a * c) ** 0.5
    return (b - root) / a, (b + root) / a


def test_headroom_recovered_matches_a_hand_computation(tmp_path):
    """(acc - normal) / (R - normal) per seed, Fieller's interval over the 3 seeds, computed by hand:
    window 0-1: x = (0.03, 0.04, 0.02), xbar 0.03, s_xx 1e-4.
      vs the ensemble: y = (0.10, 0.12, 0.08), ybar 0.10, s_yy 4e-4, s_xy 2e-4: 0.30; times 3 / 1e-4 the quadratic
      is a = 300 - 4 t^2, b = 90 - 2 t^2, c = 27 - t^2.
      vs the ceiling 0.95: y = (0.15, 0.13, 0.17), s_yy 4e-4, s_xy -2e-4: 0.20; a = 675 - 4 t^2, b = 135 + 2 t^2,
      c = 27 - t^2.
    window 0-2: x = 0.12 on every seed (s_xx = s_xy = 0): 1.2 of the ensemble's headroom (a = 300 - 4 t^2,
      b = 360, c = 432) and 0.8 of the ceiling's (a = 675 - 4 t^2, b = 540, c = 432)."""
    uri = sqlite_store(tmp_path / "head.db")
    confidence = {"audio_only": np.full(HAND_CLIPS, 0.9), "visual_only": np.full(HAND_CLIPS, 0.4)}
    client, parent, ids = write_sweep_with_probabilities(uri, "head", HEADROOM, confidence, ceiling=0.95)
    page = html.unescape(build_report("head", tracking_uri=uri, out_dir=tmp_path / "out").read_text())
    summary = pd.read_csv(tmp_path / "out" / "config_summary.csv").set_index("config")
    expected = {
        ("ogm_ge alpha=0.5 window=0-1", "ensemble"): (0.30, fieller_by_hand(300 - 4 * T2, 90 - 2 * T2, 27 - T2)),
        ("ogm_ge alpha=0.5 window=0-1", "ceiling"): (0.20, fieller_by_hand(675 - 4 * T2, 135 + 2 * T2, 27 - T2)),
        ("ogm_ge alpha=0.5 window=0-2", "ensemble"): (1.20, fieller_by_hand(300 - 4 * T2, 360, 432)),
        ("ogm_ge alpha=0.5 window=0-2", "ceiling"): (0.80, fieller_by_hand(675 - 4 * T2, 540, 432)),
    }
    metrics = client.get_run(parent).data.metrics
    for (config, kind), (estimate, (low, high)) in expected.items():
        row = summary.loc[config]
        assert row[f"headroom_{kind}_status"] == "bounded" and row[f"headroom_{kind}_n"] == 3
        assert (row[f"headroom_{kind}"], row[f"headroom_{kind}_low"], row[f"headroom_{kind}_high"]) == \
            pytest.approx((estimate, low, high), rel=1e-6)
        name = f"cfg/{config.replace('=', '_')}/headroom_recovered_{kind}"  # MLflow allows no "=" in a name
        assert (metrics[name], metrics[name + "_low"], metrics[name + "_high"]) == pytest.approx((estimate, low, high), rel=1e-6)
        assert f"{estimate:.2f} [{low:.2f}, {high:.2f}]" in page
    assert (summary.loc["ogm_ge alpha=0.5 window=0-1", "headroom_ceiling_low"],
            summary.loc["ogm_ge alpha=0.5 window=0-1", "headroom_ceiling_high"]) == pytest.approx((0.025834, 0.546685), abs=1e-5)
    # The ensemble is what audio_only says: 0.90 / 0.94 / 0.86 over seeds; the ceiling is the parent's.
    assert metrics["ensemble_acc_mean"] == pytest.approx(0.90)
    board = pd.read_csv(tmp_path / "out" / "leaderboard_numbers.csv").set_index("config")
    assert board.loc["ogm_ge alpha=0.5 window=0-1", "headroom_ceiling"] == pytest.approx(0.20)
    shown = pd.read_csv(tmp_path / "out" / "leaderboard.csv").set_index("method")
    low, high = expected[("ogm_ge alpha=0.5 window=0-1", "ensemble")][1]
    assert shown.loc["ogm_ge alpha=0.5 window=0-1", "headroom recovered vs ensemble"] == f"0.30 [{low:.2f}, {high:.2f}]"
    # The finding gives each configuration's paired verdict with its shares. Window 0-2's +0.12 on every seed
    # sits on 12-14 of the 100 clips (every run here is right on its first clips): the clips' own spread keeps
    # it "not distinguishable" on 3 seeds, so nothing recovers joint accuracy.
    tests = pd.read_csv(tmp_path / "out" / "comparisons.csv")
    w02 = tests[(tests["family"] == "vs_normal") & (tests["config"] == "ogm_ge alpha=0.5 window=0-2") & (tests["metric"] == "acc")]
    text = sentence(page, "headroom")
    assert (f"ogm_ge alpha=0.5 window=0-2 is not distinguishable from normal (acc - normal +0.120, Holm p = "
            f"{w02['p_holm'].item():.2g}; 1.20 of the headroom to the ensemble (95% Fieller interval") in text
    assert "0.80 of the headroom to the ceiling" in text and "ceiling (best achievable on these validation clips) 0.950" in text
    headroom_tests = tests[tests["family"] == "headroom"].set_index("config")
    # ceiling - normal per seed 0.15, 0.13, 0.17: a one-sample t over the seeds.
    assert headroom_tests.loc["ceiling (best achievable)", "difference"] == pytest.approx(0.15)
    assert headroom_tests.loc["ceiling (best achievable)", "p_value"] == pytest.approx(
        paired_test([0.95] * 3, [0.80, 0.82, 0.78]).p_value, rel=1e-9)
    assert headroom_tests.loc["ensemble (audio_only + visual_only)", "difference"] == pytest.approx(0.10)


def test_when_no_method_recovers_joint_accuracy_the_report_says_so(tmp_path):
    """HAND3: window 0-1 is not distinguishable from normal, window 0-2 is lower: nothing recovers; the finding
    says so with the headroom above normal to each reference (ensemble - normal paired on seeds, ceiling - mean
    normal)."""
    uri = sqlite_store(tmp_path / "none.db")
    client, parent, ids = write_sweep_with_probabilities(uri, "none", HAND3, mixed_confidence(), ceiling=0.95)
    page = html.unescape(build_report("none", tracking_uri=uri, out_dir=tmp_path / "out").read_text())
    text = sentence(page, "headroom")
    ensemble = client.get_run(parent).data.metrics["ensemble_acc_mean"]
    normal = float(np.mean(finals_of("normal")["acc"]))
    # These unsure uni-modal runs fuse to below normal (0.743 against 0.827): no headroom to the ensemble.
    assert ensemble < normal
    assert (f"No method recovers joint accuracy: none is distinguishably above normal after Holm's adjustment "
            f"(headroom above normal: none to the ensemble (normal is {normal - ensemble:.3f} above it) and "
            f"{0.95 - normal:+.3f} to the ceiling)") in text
    assert "no headroom to the ensemble (normal is at or above it on average over 3 seeds)" in text
    for config in ("ogm_ge alpha=0.5 window=0-1", "ogm_ge alpha=0.5 window=0-2"):
        assert f"{config} is not distinguishable from normal" in text
    import json

    finding = next(f for f in json.loads((tmp_path / "out" / "findings.json").read_text())["findings"] if f["id"] == "headroom")
    assert finding["recovering"] == [] and finding["ceiling"] == 0.95


def test_a_configuration_above_normal_recovers_joint_accuracy_with_its_share():
    """In-process, on a simulated sweep (tests/simulated_sweeps.py; 5 seeds, 400 clips): configuration 1 truly
    gains 0.12 in joint accuracy, the others nothing. Its Holm-adjusted paired test says "higher", so the finding
    says it recovers joint accuracy, with its share of the headroom to the ceiling (mean gain over mean
    headroom, the same numbers as references.headroom)."""
    from orchestrator.report.analysis import findings
    from orchestrator.report.references import References, headroom
    from simulated_sweeps import simulated_sweep

    table, predictions = simulated_sweep(np.random.default_rng(7), 3, 5, 400, 0.02, effects={(1, "acc"): 0.12})
    # The columns of analysis.imbalance_summary that the simulation has no use for.
    for column in ("alpha", "window", "fusion", "gap", "util_audio", "util_visual", "shapley_audio", "shapley_visual",
                   "balance"):
        table[column] = np.nan
    references = References(ceiling={"acc": 0.99})
    finding = next(f for f in findings(table, predictions, references=references) if f["id"] == "headroom")
    assert finding["recovering"] == ["ogm_ge alpha=1"]
    share = headroom(table, references).set_index("config").loc["ogm_ge alpha=1"]
    normal = table[table["config"] == "normal"]["acc"].to_numpy()
    gained = table[table["config"] == "ogm_ge alpha=1"]["acc"].to_numpy()
    assert share["estimate"] == pytest.approx((gained - normal).mean() / (0.99 - normal).mean())
    assert f"ogm_ge alpha=1 recovers joint accuracy (acc - normal {(gained - normal).mean():+.3f}" in finding["text"]
    assert f"{share['estimate']:.2f} of the headroom to the ceiling" in finding["text"]
    assert "1 of 2 recover joint accuracy" in finding["text"] and "No method recovers" not in finding["text"]
    assert "no uni-modal ensemble" in finding["text"]


def test_probabilities_travel_from_the_engine_rows_to_the_report(tmp_path):
    """`workers.evaluation.pack_probabilities` (what the engine puts in the checkpoint) ->
    `training.log_probabilities` (probabilities.npz on the run) -> `references.load_probabilities` (the
    report's reader): the final model's validation rows, float16, in order."""
    import torch

    from orchestrator.report.references import load_probabilities
    from orchestrator.training import log_probabilities
    from workers.evaluation import pack_probabilities

    rows = [{"split": split, "model": model, "clip_id": f"c{i}", "label": 0, "probs": [0.7 - 0.1 * i, 0.2, 0.1 + 0.1 * i]}
            for split, model in (("val", "final"), ("test", "selected")) for i in range(3)]
    packed = pack_probabilities(rows)
    assert packed["probs"].dtype == torch.float16 and all("probs" not in r for r in rows)
    client = MlflowClient(sqlite_store(tmp_path / "p.db"))
    run_id = client.create_run(client.create_experiment("p")).info.run_id
    log_probabilities(client, run_id, packed)
    clips, probs = load_probabilities(client, run_id)
    assert list(clips) == ["c0", "c1", "c2"] and probs.dtype == np.float16
    np.testing.assert_allclose(probs, [[0.7, 0.2, 0.1], [0.6, 0.2, 0.2], [0.5, 0.2, 0.3]], atol=1e-3)
    assert load_probabilities(client, client.create_run(client.get_run(run_id).info.experiment_id).info.run_id) is None


def test_a_sweep_over_generated_clips_logs_the_cards_ceiling(synth_dataset, tmp_path):
    """sweep.log_ceiling: the generator's card's best achievable validation accuracies on the parent run, as
    ceiling_acc (audio_visual), ceiling_acc_audio and ceiling_acc_visual; a folder without the generator's card
    (real data) gets none."""
    import json

    from orchestrator.specs import load_spec
    from orchestrator.sweep import log_ceiling

    client = MlflowClient(sqlite_store(tmp_path / "c.db"))
    parent = client.create_run(client.create_experiment("c")).info.run_id
    spec = load_spec({"name": "c", "data": {"source": "dataset", "root": str(synth_dataset)}})
    logged = log_ceiling(client, parent, spec)
    best = json.loads((synth_dataset / "card.json").read_text())["best_achievable_accuracy"]["val"]
    assert logged == {"ceiling_acc": best["audio_visual"], "ceiling_acc_audio": best["audio"],
                      "ceiling_acc_visual": best["visual"]}
    assert {k: v for k, v in client.get_run(parent).data.metrics.items() if k.startswith("ceiling")} == logged
    real = tmp_path / "real"
    real.mkdir()
    assert log_ceiling(client, parent, spec.model_copy(update={"data": spec.data.model_copy(update={"root": real})})) == {}
