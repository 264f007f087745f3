"""The report at scale (issue 31): every method's trials find their same-seed baselines, a sweep is read in bulk
exactly as run by run, plots aggregate per configuration, the trial table moves to its CSV on a large sweep, and
`avtune results` / `avtune report` import neither torch nor Ray. Real MLflow (SQLite) throughout."""
from __future__ import annotations

import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from orchestrator.report import build_report, load_sweep, utilisation
from orchestrator.report.analysis import MODALITIES
from orchestrator.runs import logged_params
from workers.methods import get_method, method_names, unimodal_methods
from workers.specs import load_spec

REPO = Path(__file__).resolve().parents[1]

# Method fields a spec of each method needs to validate (CMA: the AVID checkpoint it starts from, a run id
# here: nothing is trained). A method missing here is tested with its defaults.
METHOD_FIELDS = {
    "ogm": {"alpha": 0.5, "modulation_ends": 2},
    "ogm_ge": {"alpha": 0.5, "modulation_ends": 2},
    "gblend": {"mode": "online", "estimate_epochs": 1, "estimate_window_epochs": 1},
    "avslowfast": {"config": "tiny"},
    "avid": {"config": "Cross-N64"},
    "cma": {"config": "InstX-N64-PosW-N8-Top2", "init_from": "0123456789abcdef0123456789abcdef"},
}
SEEDS = (0, 1, 2)


def method_spec(name: str, seed: int):
    """The spec a sweep's trial of `name` runs: one base spec, its method section and seed replaced."""
    return load_spec({"name": "matching", "data": {"source": "generated"}, "model": {"fusion": "concat"},
                      "method": {"name": name, **METHOD_FIELDS.get(name, {})}, "train": {"seed": seed, "epochs": 2}})


def log_trial(client: MlflowClient, experiment_id: str, parent: str, name: str, params: dict,
              metrics: dict[str, list[float]]) -> str:
    """A finished child run of `parent` with `params` and per-epoch `metrics`, as a sweep's child logs them."""
    run = client.create_run(experiment_id, run_name=name, tags={"mlflow.parentRunId": parent, "avtune.stage": "main",
                                                                "avtune.trial_id": name})
    run_id = run.info.run_id
    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])
    ts = int(time.time() * 1000)
    rows = [Metric(k, v, ts, step) for k, values in metrics.items() for step, v in enumerate(values)]
    rows += [Metric("epoch", float(step), ts, step) for step in range(len(next(iter(metrics.values()))))]
    client.log_batch(run_id, metrics=rows)
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    return run_id


def new_sweep(uri: str, experiment: str) -> tuple[MlflowClient, str, str]:
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(experiment)
    parent = client.create_run(experiment_id, tags={"avtune.kind": "sweep"}, run_name=experiment).info.run_id
    return client, experiment_id, parent


def baseline_acc(modality: str, seed: int) -> float:
    """Each baseline seed its own final accuracy, so a wrong match shows in the utilisation's number."""
    return {"audio": 0.60, "visual": 0.40}[modality] + 0.05 * seed


def test_every_methods_trials_find_their_same_seed_baselines(tmp_path):
    """Each registered joint method's trials, with the params a real run of it logs (`logged_params`: its
    derived run params included), are matched with the uni-modal baselines of their own seed."""
    client, experiment_id, parent = new_sweep(f"sqlite:///{tmp_path / 'mlflow.db'}", "matching")
    baselines = {m: name for m, name in unimodal_methods().items()}
    for modality, name in baselines.items():
        for seed in SEEDS:
            acc = baseline_acc(modality, seed)
            log_trial(client, experiment_id, parent, f"{name}_s{seed}", logged_params(method_spec(name, seed)),
                      {"acc": [acc - 0.1, acc]})
    joint = [n for n in method_names() if get_method(n).modality is None]
    assert {"normal", "ogm_ge", "gblend"} <= set(joint)
    ids = {}
    for name in joint:
        for seed in SEEDS:
            ids[name, seed] = log_trial(client, experiment_id, parent, f"{name}_s{seed}",
                                        logged_params(method_spec(name, seed)),
                                        {"acc": [0.5, 0.7], "acc_audio": [0.4, 0.54], "acc_visual": [0.1, 0.2]})
    util, _ = utilisation(load_sweep(client, parent))
    for (name, seed), run_id in ids.items():
        row = util.loc[run_id]
        for m in MODALITIES:
            assert row[f"match_{m}"] == "same seed", (name, seed, m)
            assert row[f"baseline_{m}"] == pytest.approx(baseline_acc(m, seed)), (name, seed, m)
        assert row["util_audio"] == pytest.approx(0.54 / baseline_acc("audio", seed)), name


def test_a_sweep_read_in_bulk_equals_one_read_per_run(tmp_path):
    """`load_sweep`'s histories (one query per key) hold exactly what `get_metric_history` returns run by run,
    a value logged twice at one step included (the later one counts)."""
    client, experiment_id, parent = new_sweep(f"sqlite:///{tmp_path / 'mlflow.db'}", "bulk")
    rng = np.random.default_rng(0)
    ids = [log_trial(client, experiment_id, parent, f"normal_s{s}", {"method.name": "normal", "train.seed": s},
                     {"acc": list(rng.random(4)), "acc_audio": list(rng.random(4)), "acc_visual": list(rng.random(4))})
           for s in range(7)]
    client.log_metric(ids[0], "acc", 0.123, step=3, timestamp=int(time.time() * 1000) + 10_000)
    sweep = load_sweep(client, parent)
    for run_id in ids:
        for key in ("acc", "acc_audio", "acc_visual", "epoch"):
            by_run = {m.step: m.value for m in client.get_metric_history(run_id, key)}
            if key == "epoch":
                assert key not in sweep.histories[run_id]  # not a key the report reads
                continue
            assert sweep.histories[run_id][key].to_dict() == by_run
    assert sweep.histories[ids[0]].loc[3, "acc"] == 0.123


OGM_WINDOW = {"method.modulation_starts": "0", "method.modulation_ends": "3"}


def wide_sweep(tmp_path, n_seeds: int, experiment: str = "wide") -> tuple[str, MlflowClient, str]:
    """normal, OGM-GE at two alphas and both baselines on `n_seeds` seeds each, 3 epochs, no predictions."""
    uri = f"sqlite:///{tmp_path / (experiment + '.db')}"
    client, experiment_id, parent = new_sweep(uri, experiment)
    rng = np.random.default_rng(1)
    for seed in range(n_seeds):
        for name, extra in (("audio_only", {}), ("visual_only", {}), ("normal", {}),
                            ("ogm_ge", {**OGM_WINDOW, "method.alpha": "0.3", "ogm_scores_from": "fusion_logits"}),
                            ("ogm_ge", {**OGM_WINDOW, "method.alpha": "0.8", "ogm_scores_from": "fusion_logits"})):
            noise = rng.normal(0, 0.02, 3)
            metrics = {"acc": list(np.array([0.4, 0.6, 0.7]) + noise)}
            if name not in ("audio_only", "visual_only"):
                metrics |= {"acc_audio": list(np.array([0.3, 0.5, 0.6]) + noise),
                            "acc_visual": list(np.array([0.1, 0.2, 0.3]) + noise),
                            "shapley_audio": [0.2, 0.3, 0.3], "shapley_visual": [0.05, 0.1, 0.1]}
                if name == "ogm_ge":
                    metrics |= {"k_audio": [0.5, 0.6, 0.7], "k_visual": [1.0, 1.0, 1.0]}
            log_trial(client, experiment_id, parent, f"{name}{extra.get('method.alpha', '')}_s{seed}",
                      {"method.name": name, "train.seed": seed, "model.fusion": "concat", **extra}, metrics)
    return uri, client, parent


def test_plots_aggregate_per_configuration_with_one_legend_entry_each(tmp_path):
    """40 seeds of 3 joint configurations: one legend entry per configuration (and per baseline), no trial
    lines drawn per seed, and matplotlib's constrained layout never gives up."""
    from orchestrator.report.plots import (gap_figure, modality_curves_figure, ogm_coefficients_figure,
                                           shapley_figure, utilisation_figure)

    _, client, parent = wide_sweep(tmp_path, n_seeds=40)
    sweep = load_sweep(client, parent)
    _, per_epoch = utilisation(sweep)
    table = sweep.trials.assign(shapley_audio=0.3, shapley_visual=0.1)
    table.loc[table["method"].isin(["audio_only", "visual_only"]), ["shapley_audio", "shapley_visual"]] = np.nan
    figures = {"modality": modality_curves_figure(sweep), "gap": gap_figure(sweep),
               "utilisation": utilisation_figure(sweep, per_epoch), "ogm": ogm_coefficients_figure(sweep),
               "shapley": shapley_figure(table)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "constrained_layout not applied ... collapsed" is a UserWarning
        for name, fig in figures.items():
            fig.savefig(tmp_path / f"{name}.png", dpi=90)
    for name, fig in figures.items():
        for ax in fig.axes:
            labels = ax.get_legend_handles_labels()[1]
            assert len(labels) <= 3 + 1, (name, labels)  # 3 joint configurations (+ the panel's baseline)
            assert len(ax.get_lines()) <= 3 + 1 + 2, (name, len(ax.get_lines()))  # no line per seed; axhlines
    assert [t.get_text() for t in figures["gap"].axes[0].get_legend().get_texts()] == [
        "normal (n=40)", "ogm_ge alpha=0.3 window=0-3 (n=40)", "ogm_ge alpha=0.8 window=0-3 (n=40)"]


def test_a_configuration_with_few_seeds_shows_them_as_thin_lines(tmp_path):
    from orchestrator.report.plots import gap_figure

    _, client, parent = wide_sweep(tmp_path, n_seeds=3)
    ax = gap_figure(load_sweep(client, parent)).axes[0]
    # 3 configurations x 3 seeds thin lines (lw 0.6, no legend entry) under the 3 means.
    assert len([line for line in ax.get_lines() if line.get_linewidth() == 0.6]) == 3 * 3
    assert len(ax.get_legend_handles_labels()[1]) == 3


def test_many_configurations_share_one_grey_legend_entry(tmp_path):
    """A search over many settings: the panel names the best LEGEND_CONFIGS configurations, the others are one
    entry ("N other configurations")."""
    from orchestrator.report.plots import LEGEND_CONFIGS, gap_figure

    uri = f"sqlite:///{tmp_path / 'search.db'}"
    client, experiment_id, parent = new_sweep(uri, "search")
    for i in range(LEGEND_CONFIGS + 8):
        gap = 0.01 * i
        log_trial(client, experiment_id, parent, f"ogm_ge_{i}",
                  {"method.name": "ogm_ge", "method.alpha": f"{0.05 * (i + 1):.2f}", "train.seed": 0},
                  {"acc": [0.5, 0.6], "acc_audio": [0.4, 0.5 + gap], "acc_visual": [0.3, 0.5]})
    labels = gap_figure(load_sweep(client, parent)).axes[0].get_legend_handles_labels()[1]
    assert len(labels) == LEGEND_CONFIGS + 1 and labels[0] == "8 other configurations"
    # The named ones are the best by the last epoch's gap: the highest alphas here.
    assert set(labels[1:]) == {f"ogm_ge alpha={0.05 * (i + 1):g}" for i in range(8, LEGEND_CONFIGS + 8)}


def test_a_large_sweeps_trials_are_in_the_csv_not_on_the_page(tmp_path, monkeypatch):
    import orchestrator.report.html as report_html

    uri, _, _ = wide_sweep(tmp_path, n_seeds=4)
    monkeypatch.setattr(report_html, "TRIALS_SHOWN", 10)  # 20 trials: over the limit
    page = build_report("wide", tracking_uri=uri, out_dir=tmp_path / "out", log_to_mlflow=False).read_text()
    assert "20 trials: one row each in <a href='imbalance_summary.csv'>" in page
    assert "<td>normal_s0</td>" not in page
    assert len(pd.read_csv(tmp_path / "out" / "imbalance_summary.csv")) == 20
    monkeypatch.setattr(report_html, "TRIALS_SHOWN", 300)
    page = build_report("wide", tracking_uri=uri, out_dir=tmp_path / "out", log_to_mlflow=False).read_text()
    assert "<td>normal_s0</td>" in page


@pytest.mark.parametrize("command", ["results", "report"])
def test_results_and_report_import_neither_torch_nor_ray(tmp_path, command):
    """The CLI's `results` / `avtune report` path, run on a real sweep in a fresh interpreter: afterwards
    neither torch nor Ray is in sys.modules."""
    uri, _, _ = wide_sweep(tmp_path, n_seeds=3)
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from orchestrator.cli import app\n"
        f"args = [{command!r}, 'wide', '--tracking-uri', {uri!r}]"
        + (f" + ['--out', {str(tmp_path / 'out')!r}]\n" if command == "report" else "\n")
        + "result = CliRunner().invoke(app, args)\n"
        "assert result.exit_code == 0, result.output\n"
        "print('loaded:', sorted(m for m in ('torch', 'ray') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "loaded: []" in out.stdout, out.stdout[-2000:]



def log_clip_files(client: MlflowClient, run_id: str, seed: int, tmp: Path) -> None:
    """predictions.csv and probabilities.npz of 30 validation clips (and 5 test rows the report skips)."""
    rng = np.random.default_rng(seed)
    clips = [f"clip{c:02d}" for c in range(30)]
    labels = rng.integers(0, 3, 30)
    rows = pd.DataFrame({"split": "val", "model": "final", "clip_id": clips, "label": labels,
                         "pred": rng.integers(0, 3, 30), "pred_audio": rng.integers(0, 3, 30),
                         "pred_visual": rng.integers(0, 3, 30)})
    test_rows = rows.head(5).assign(split="test", model="best")
    folder = tmp / run_id
    folder.mkdir()
    pd.concat([rows, test_rows]).to_csv(folder / "predictions.csv", index=False)
    probs = rng.dirichlet(np.ones(3), 30).astype(np.float16)
    np.savez(folder / "probabilities.npz", clip_id=np.array(clips), split=np.array(["val"] * 30),
             model=np.array(["final"] * 30), probs=probs)
    client.log_artifacts(run_id, str(folder))


def test_a_sweep_read_over_http_equals_the_same_sweep_read_from_its_store(mlflow_server, tmp_path):
    """Over a real `mlflow server` (no bulk history query: one request per run and key; artifacts proxied) a
    sweep reads the same as from its SQLite store directly: histories, predictions, probabilities."""
    client, experiment_id, parent = new_sweep(mlflow_server.uri, "http")
    for seed in range(3):
        for name in ("audio_only", "visual_only", "normal"):
            metrics = {"acc": [0.3 + 0.1 * seed, 0.5]}
            if name == "normal":
                metrics |= {"acc_audio": [0.2, 0.4], "acc_visual": [0.1, 0.3]}
            run_id = log_trial(client, experiment_id, parent, f"{name}_s{seed}",
                               {"method.name": name, "train.seed": seed}, metrics)
            log_clip_files(client, run_id, seed, tmp_path)
    from orchestrator.report.comparisons import read_predictions
    from orchestrator.report.references import read_probabilities

    over_http = load_sweep(client, parent)
    # The server's own SQLite store, read directly: one bulk query per key (its artifacts need the server).
    direct = load_sweep(MlflowClient(f"sqlite:///{mlflow_server.folder / 'm.db'}"), parent)
    assert len(over_http.trials) == 9
    for run_id in over_http.params:
        pd.testing.assert_frame_equal(over_http.histories[run_id], direct.histories[run_id])
        # Parsed in one pass with the other runs' files, as one file alone gives it.
        pd.testing.assert_frame_equal(over_http.predictions[run_id],
                                      read_predictions(tmp_path / run_id / "predictions.csv", run_id))
        assert len(over_http.predictions[run_id]) == 30
    assert len(over_http.probabilities) == 6  # the baselines' only
    for run_id, (clips, probs) in over_http.probabilities.items():
        clips_file, probs_file = read_probabilities(tmp_path / run_id / "probabilities.npz", run_id)
        assert list(clips) == list(clips_file)
        np.testing.assert_array_equal(probs, probs_file)
