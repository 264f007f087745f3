"""Sweeps on real local Ray Tune + Ray Train, tracked in real MLflow (SQLite)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import RAY_LINES

from orchestrator import load_spec
from orchestrator.specs import SpecError
from orchestrator.sweep import PARENT_TAG, STAGE_TAG, build_param_space, run_sweep

REPO = Path(__file__).resolve().parents[1]


def sweep_spec(synth_dataset, tmp_path, **extra) -> dict:
    spec = {
        "name": "sw",
        "data": {"source": "dataset", "root": str(synth_dataset), "cache_dir": str(tmp_path / "cache"),
                 "decode": {"num_frames": 2, "frame_height": 32, "frame_width": 32, "clip_seconds": 0.5}},
        "model": {"width": 8},
        "method": {"name": "ogm_ge", "alpha": 0.5, "modulation_starts": 0, "modulation_ends": 2},
        "train": {"epochs": 2, "global_batch_size": 8, "optimizer": "adam", "learning_rate": 0.001},
        "storage": {"runs_dir": str(tmp_path / "runs")},
        "search": {"space": {"method.alpha": {"grid": [0.1, 0.8]}}, "max_concurrent_trials": 2},
    }
    for key, value in extra.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec


def children(client: MlflowClient, parent_run_id: str, stage: str | None = "main"):
    exp_id = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
    return [r for r in runs if stage is None or r.data.tags.get(STAGE_TAG) == stage]


def steps(client: MlflowClient, run_id: str, key: str = "acc") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_compare_expands_methods_with_searched_alphas():
    spec = load_spec({"method": {"name": "ogm_ge", "modulation_ends": 3}, "train": {"epochs": 3},
                      "search": {"compare": ["normal", "ogm_ge", "audio_only"],
                                 "space": {"method.alpha": {"grid": [0.1, 0.8]}, "train.learning_rate": {"grid": [0.01]}}}})
    methods = build_param_space(spec)["method"]["grid_search"]
    names = Counter(m["name"] for m in methods)
    assert names == {"normal": 1, "ogm_ge": 2, "audio_only": 1}
    assert sorted(m["alpha"] for m in methods if m["name"] == "ogm_ge") == [0.1, 0.8]


@pytest.mark.parametrize("space,expected", [
    ({}, "search.space is empty"),
    ({"method.alpha": {"grid": []}}, "at least one value"),
    ({"method.alpha": {"uniform": [0.5, 0.1]}}, "low < high"),
    ({"method.alpha": {"grid": [0.1], "choice": [0.2]}}, "exactly one"),
    ({"nosuch.field": {"grid": [1]}}, "not a searchable spec field path"),
])
def test_bad_search_sections(space, expected):
    with pytest.raises(SpecError, match=expected):
        load_spec({"search": {"space": space}})


def test_invalid_grid_combination_is_rejected_before_running(synth_dataset, tmp_path):
    spec = load_spec(sweep_spec(synth_dataset, tmp_path, search={
        "space": {"method.modulation_starts": {"grid": [0, 1]}, "method.modulation_ends": {"grid": [1, 2]}}}))
    with pytest.raises(SpecError, match="invalid combinations"):
        run_sweep(spec)


@pytest.mark.slow
def test_compare_sweep_has_parent_and_complete_children(shared_sweep):
    result, _ = shared_sweep
    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["avtune.kind"] == "sweep"
    assert parent.data.metrics["trials"] == 5 and parent.data.metrics["trials_failed"] == 0
    kids = {k.data.params["method.name"]: k for k in children(client, result.parent_run_id)}
    assert sorted(kids) == ["audio_only", "gblend", "normal", "ogm_ge", "visual_only"]
    assert float(kids["ogm_ge"].data.params["method.alpha"]) == 0.5
    for name, kid in kids.items():
        assert kid.info.status == "FINISHED"
        keys = ("acc", "loss") if name.endswith("_only") else ("acc", "acc_audio", "acc_visual", "shapley_audio")
        for key in keys + (("k_audio", "k_visual", "ratio_av") if name == "ogm_ge" else ()):
            assert steps(client, kid.info.run_id, key) == [0, 1], (name, key)
    assert set(result.trials["run_id"]) == {k.info.run_id for k in kids.values()}
    assert parent.data.tags["avtune.best_run_id"] == result.trials.iloc[0]["run_id"]
    for name, kid in kids.items():
        # One configuration per setting without the seed (the MLflow UI groups runs by this tag) ...
        assert kid.data.tags["avtune.config"] == kid.info.run_name.removesuffix("_s0"), name
        # ... and the per-clip predictions behind its final numbers, so comparisons can be recomputed.
        assert "predictions.csv" in {a.path for a in client.list_artifacts(kid.info.run_id)}, name
    assert kids["ogm_ge"].data.tags["avtune.config"] == "ogm_ge_concat_a0.5_w0-2"


def test_seeds_cross_every_configuration():
    spec = load_spec({"method": {"name": "ogm_ge", "modulation_ends": 3}, "train": {"epochs": 3},
                      "search": {"compare": ["normal", "ogm_ge", "audio_only"], "seeds": [0, 1, 2],
                                 "space": {"method.alpha": {"grid": [0.1, 0.8]}}}})
    # By default a trial trains every seed of its configuration (search.group_seeds): 4 method entries, 4 trials,
    # each with the 3 seeds.
    from orchestrator.sweep import seed_group

    space = build_param_space(spec)
    assert "train.seed" not in space and len(space["method"]["grid_search"]) == 4
    assert seed_group(spec) == [0, 1, 2]
    # One trial per seed: Tune's grid is the product of its grid dimensions, 4 method entries x 3 seeds = 12 trials.
    apart = spec.model_copy(update={"search": spec.search.model_copy(update={"group_seeds": False})})
    assert build_param_space(apart)["train.seed"] == {"grid_search": [0, 1, 2]} and seed_group(apart) is None
    one = spec.model_copy(update={"search": spec.search.model_copy(update={"seeds": [5]})})
    assert build_param_space(one)["train.seed"] == {"grid_search": [5]} and seed_group(one) is None
    with pytest.raises(SpecError, match=r"search.seeds and search.space\['train.seed'\] both set the seed"):
        load_spec({"search": {"seeds": [0, 1], "space": {"train.seed": {"grid": [0, 1]}}}})
    with pytest.raises(SpecError, match=r"search.seeds: \[0, 0\] repeats a seed"):
        load_spec({"search": {"seeds": [0, 0], "compare": ["normal"]}})
    assert load_spec({"search": {"seeds": [3, 4]}}).search.seeds == [3, 4]  # seeds alone are a search


def test_config_label_is_the_settings_without_the_seed():
    from orchestrator.training import config_label

    spec = load_spec({"method": {"name": "ogm_ge", "alpha": 0.8, "modulation_ends": 3}, "train": {"epochs": 3, "seed": 7,
                                                                                              "learning_rate": 0.05}})
    assert config_label(spec) == "ogm_ge_concat_a0.8_w0-3"
    assert config_label(spec, ["method", "train.seed", "train.learning_rate"]) == "ogm_ge_concat_a0.8_w0-3 train.learning_rate=0.05"


@pytest.mark.slow
def test_gblend_stage_weights_are_on_parent_and_used_by_main_trial(shared_sweep):
    result, _ = shared_sweep
    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    weights = {h: parent.data.metrics[f"gblend_w_{h}"] for h in ("audio", "visual", "joint")}
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-6)
    assert weights == pytest.approx(result.gblend_weights)
    estimation = children(client, result.parent_run_id, stage="gblend-estimate")
    assert sorted(r.data.params["method.name"] for r in estimation) == ["audio_only", "normal", "visual_only"]
    # The three heads train side by side in one trial (search.group_estimation): one Ray Train start-up.
    assert len({r.data.tags["avtune.trial_id"] for r in estimation}) == 1
    for run in estimation:  # N + n = 2 epochs, read at epochs N and N + n
        assert run.info.status == "FINISHED" and steps(client, run.info.run_id, "loss") == [0, 1]
    # L^T is each model's loss on the training split at the end of epochs N and N + n (Sec. 3.2), logged
    # by the stage's runs as loss_train_eval; the weights follow from those losses and no others, on the
    # window the stage's rule picks (or uniform, announced, when no window lets every head generalise).
    from models import estimate_from_histories

    heads = {"audio_only": "audio", "visual_only": "visual", "normal": "joint"}
    histories = {}
    for run in estimation:
        history = {k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)} for k in ("loss_train_eval", "loss")}
        histories[heads[run.data.params["method.name"]]] = [(history["loss_train_eval"][e], history["loss"][e]) for e in (0, 1)]
    estimate = estimate_from_histories(histories, 1, 1)
    assert estimate.weights == pytest.approx(weights)
    assert parent.data.tags["avtune.gblend_weights"] == estimate.source
    assert ("avtune.warning" in parent.data.tags) == (estimate.source == "uniform_fallback")
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        logged = json.loads(Path(client.download_artifacts(result.parent_run_id, "gblend_estimate.json", tmp)).read_text())
    assert (logged["N"], logged["N_requested"], logged["n"], logged["train_loss"]) == (estimate.start_epochs, 1, 1, "loss_train_eval")
    assert logged["losses_by_epoch"] == {h: [list(p) for p in rows] for h, rows in histories.items()}
    for head, row in logged["heads"].items():
        assert (row["train_loss_N"], row["val_loss_N"]) == pytest.approx(histories[head][0])
        assert row["delta_G"] == pytest.approx(histories[head][0][1] - histories[head][1][1]) and row["weight"] == pytest.approx(weights[head])
    (main,) = [k for k in children(client, result.parent_run_id) if k.data.params["method.name"] == "gblend"]
    assert main.data.params["gblend_weights_source"] == estimate.source  # "estimated" or "uniform_fallback"
    for head, w in weights.items():
        assert float(main.data.params[f"method.weights.{head}"]) == pytest.approx(w)
        assert main.data.metrics[f"gblend_w_{head}"] == pytest.approx(w)


@pytest.mark.slow
def test_resume_after_killing_the_driver(synth_dataset, tmp_path):
    # One trial: what resuming does to a trial (restart from its checkpoint, each epoch logged once, the
    # same child run) is per trial, and each trial costs ~30 CPU-s of Ray start-up per driver on 2 cores.
    # 8 epochs (each reported and checkpointed) and a 0.25 s watch, so the kill lands mid-run: a trial
    # whose Train run had ended before the kill is resumed with nothing left to train.
    epochs = 8
    # Two seeds trained side by side in that trial (search.group_seeds): the group resumes from one checkpoint.
    spec = sweep_spec(synth_dataset, tmp_path, train={"epochs": epochs}, search={
        "space": {"method.alpha": {"grid": [0.8]}}, "seeds": [0, 1], "max_concurrent_trials": 1})
    spec["method"]["modulation_ends"] = 3
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    checkpoints = Path(spec["storage"]["runs_dir"]) / "ray"
    db = Path(spec["storage"]["runs_dir"]) / "mlflow.db"
    cli = [sys.executable, "-m", "orchestrator.cli", "sweep", str(path)]
    # Each driver starts its own local Ray, killed with it: on a shared Ray the killed driver's Train worker
    # group keeps its placement group (README, Known limitations) and the resumed trials wait for CPUs.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen(cli, cwd=tmp_path, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        # Kill the driver (and its local Ray) once the first trial has reported a checkpointed epoch.
        # Watched on disk, not through MLflow: a second client on the SQLite store while the driver
        # is still creating it races its schema migration.
        while time.monotonic() < deadline:
            time.sleep(0.25)
            if any(checkpoints.glob("*/checkpoint_*")):
                break
            assert driver.poll() is None, "the sweep ended before it could be interrupted"
        else:
            pytest.fail("no epoch checkpointed within the deadline")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert len(list(checkpoints.glob("*/checkpoint_*"))) < epochs, "the trial ended before the kill: nothing left to resume"
    time.sleep(2)
    resumed = subprocess.run(cli + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    # Piped, as in CI or `| tee`: one plain line per finished trial, no Ray log line; those are in the log file.
    finished = re.findall(rf"^\[\d+:\d\d\] ogm_ge_concat_a0\.8_w0-3_s0-1  FINISHED\s+{epochs}/{epochs} epochs  acc \d\.\d{{3}}",
                          resumed.stdout, flags=re.M)
    assert len(finished) == 1, resumed.stdout
    shown = resumed.stdout + resumed.stderr
    assert not [line for line in RAY_LINES if line in shown], shown[-3000:]
    log_file = Path(resumed.stdout.split("Ray log:")[1].split()[0])
    assert "Reporting training result" in log_file.read_text(errors="replace")
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("sw")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`avtune.kind` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    kids = children(client, parents[0].info.run_id)
    # The resumed trial continued its own child runs, one per seed: each epoch once (a repeat shows in steps).
    assert sorted(kid.data.params["train.seed"] for kid in kids) == ["0", "1"]
    assert len({kid.data.tags["avtune.trial_id"] for kid in kids}) == 1
    assert {kid.data.tags["avtune.config"] for kid in kids} == {"ogm_ge_concat_a0.8_w0-3"}
    for kid in kids:
        assert kid.info.status == "FINISHED" and kid.info.run_name.endswith(f"_s{kid.data.params['train.seed']}")
        assert steps(client, kid.info.run_id) == list(range(epochs))
        assert "predictions.csv" in {a.path for a in client.list_artifacts(kid.info.run_id)}


def test_trial_retries_are_validated():
    assert load_spec({"search": {"compare": ["normal"], "trial_max_failures": 0}}).search.trial_max_failures == 0
    with pytest.raises(SpecError, match=r"search\.trial_max_failures"):
        load_spec({"search": {"compare": ["normal"], "trial_max_failures": -1}})


@pytest.mark.slow
def test_cma_sweep_trains_the_avid_stage_first_and_a_failing_trial_is_counted(ray_local, synth_dataset, tmp_path):
    """AVID-CMA's two stages as one sweep: with `cma` and no start point, the AVID stage runs first as a
    trial of its own, and the CMA trials start from its final checkpoint (model, memory banks, Z). One of
    the two CMA trials reads a dataset with a broken clip: it fails (FAILED, the clip named), the sweep
    goes on, finishes and counts it. One sweep for both: each Tune run costs ~15 CPU-s of Ray's own."""
    import shutil

    import torch

    bad_root = tmp_path / "bad"
    shutil.copytree(synth_dataset, bad_root)
    broken_clip = sorted((bad_root / "clips").rglob("*.mp4"))[0]
    broken_clip.write_bytes(os.urandom(2048))  # junk where an mp4 was: PyAV cannot open it
    cma = {"name": "cma", "config": "InstX-N64-PosW-N8-Top2", "probe_epochs": 20, "embedding_dim": 16, "avid_stage_epochs": 2}
    # A broken clip fails the same way every time: no Train restart, no Tune re-run of the trial either.
    spec = sweep_spec(synth_dataset, tmp_path, data={"on_bad_media": "error"}, train={"epochs": 1, "max_failures": 0},
                      search={"compare": ["cma"], "space": {"data.root": {"grid": [str(synth_dataset), str(bad_root)]}},
                              "max_concurrent_trials": 2, "trial_max_failures": 0})
    spec["method"] = cma
    result = run_sweep(load_spec(spec))  # returns: Tune reports the errored trial, it does not raise
    client = MlflowClient(result.tracking_uri)
    (stage,) = children(client, result.parent_run_id, stage="avid-stage")
    assert stage.data.params["method.name"] == "avid" and stage.data.params["method.config"] == "Cross-N64"
    assert stage.data.params["data.root"] == str(synth_dataset)
    assert stage.info.status == "FINISHED" and steps(client, stage.info.run_id) == [0, 1]  # avid_stage_epochs
    by_root = {k.data.params["data.root"]: k for k in children(client, result.parent_run_id)}
    assert set(by_root) == {str(synth_dataset), str(bad_root)}
    main, bad = by_root[str(synth_dataset)], by_root[str(bad_root)]
    assert main.info.status == "FINISHED" and main.data.params["method.name"] == "cma"
    assert main.data.params["cma_init_from"] == f"avid-stage:{stage.info.run_id}"
    start = torch.load(main.data.params["method.init_from"], map_location="cpu", weights_only=True)
    assert start["method_name"] == "avid" and start["epoch"] == 1
    assert steps(client, main.info.run_id) == [0]
    assert bad.info.status == "FAILED" and broken_clip.name in bad.data.tags["error"]
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials"] == 2 and parent.data.metrics["trials_failed"] == 1
    assert [r.error is not None for r in result.result_grid].count(True) == 1
    assert parent.data.tags["avtune.best_run_id"] == main.info.run_id
