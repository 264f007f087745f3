"""Hostile and careless inputs, third round (issue 30): each is refused at spec validation, before data is
generated or an MLflow run exists, with the field named; console and MLflow tell the same story."""
from __future__ import annotations

import time

import pytest

from orchestrator.specs import MAX_SWEEP_RUNS, SpecError, load_spec


def sweep_spec(tmp_path, search: dict, **sections):
    return load_spec({"name": "hostile", "storage": {"runs_dir": str(tmp_path / "runs")},
                      "train": {"epochs": 2}, "search": search, **sections})


def check_before_anything(tmp_path, spec, match: str) -> None:
    """`check_search` refuses the spec (what `avtune sweep` and `avtune submit` call first) and nothing exists yet."""
    from orchestrator.sweep import check_search

    with pytest.raises(SpecError, match=match):
        check_search(spec)
    assert not (tmp_path / "runs").exists()


# ---- (9) search.metric is one every swept method reports ----------------------------------------------


@pytest.mark.parametrize("search, sections, match", [
    ({"compare": ["normal", "audio_only"], "scheduler": "asha", "metric": "acc_visual"}, {},
     r"search.metric 'acc_visual' is not reported by method audio_only"),
    ({"compare": ["normal", "visual_only"], "metric": "shapley_audio"}, {},
     r"search.metric 'shapley_audio' is not reported by method visual_only"),
    ({"searcher": "optuna", "space": {"train.learning_rate": {"loguniform": [0.001, 0.1]}}, "metric": "k_audio"}, {},
     r"every trial: search.metric 'k_audio' is not reported by method normal"),
    ({"compare": ["ogm", "normal"], "scheduler": "asha", "metric": "k_visual"}, {"method": {"name": "ogm"}},
     r"search.metric 'k_visual' is not reported by method normal"),
    ({"compare": ["gblend", "normal"], "metric": "gblend_w_joint"}, {"method": {"name": "gblend", "weights": "uniform"}},
     r"search.metric 'gblend_w_joint' is not reported by method normal"),
    ({"seeds": [0, 1], "scheduler": "asha", "metric": "loss_train_eval"}, {},
     r"search.metric 'loss_train_eval' is not reported by method normal"),
    ({"compare": ["avid", "normal"], "scheduler": "asha", "metric": "shapley_visual"},
     {"method": {"name": "avid", "config": "Cross-N64"}},
     r"search.metric 'shapley_visual' is not reported by method avid"),
])
def test_a_search_metric_some_swept_method_never_reports_is_refused(tmp_path, search, sections, match):
    """Tune's strict metric check ended such sweeps (parent FAILED) at the first result without the metric,
    after trials had trained; now the spec is refused naming the method and the metric."""
    check_before_anything(tmp_path, sweep_spec(tmp_path, search, **sections), match)


@pytest.mark.parametrize("search, sections", [
    ({"compare": ["normal", "ogm"], "scheduler": "asha", "metric": "acc_visual"}, {}),
    ({"compare": ["normal", "audio_only", "visual_only"], "scheduler": "asha", "metric": "acc"}, {}),
    ({"seeds": [0, 1], "scheduler": "asha", "metric": "loss_train_eval"}, {"train": {"epochs": 2, "train_split_loss": True}}),
    ({"compare": ["gblend", "normal"], "metric": "acc_audio", "scheduler": "asha"}, {"method": {"name": "gblend"}}),
])
def test_a_search_metric_every_swept_method_reports_is_accepted(tmp_path, search, sections):
    from orchestrator.sweep import check_search

    check_search(sweep_spec(tmp_path, search, **sections))


def test_stages_before_the_main_trials_are_neither_searched_nor_scheduled(tmp_path):
    """G-Blend's estimation heads (audio-only, visual-only) and the AVID stage never report what the main
    search ranks by: their tuners have no searcher (Optuna) and no scheduler to demand it."""
    from orchestrator.sweep import GBLEND_STAGE, make_tuner

    spec = sweep_spec(tmp_path, {"searcher": "optuna", "scheduler": "asha", "metric": "acc_visual",
                                 "space": {"train.learning_rate": {"choice": [0.01, 0.1]}}},
                      method={"name": "gblend"})
    tuner, _ = make_tuner(spec, {}, "stage", "0" * 32, "sqlite:///unused.db", GBLEND_STAGE, scheduler_on=False)
    config = tuner._local_tuner._tune_config  # noqa: SLF001 - what the Tuner was built with (Ray 2.60)
    assert config.search_alg is None and config.scheduler is None
    main, _ = make_tuner(spec, {"train.learning_rate": __import__("ray").tune.choice([0.01, 0.1])}, "main",
                         "0" * 32, "sqlite:///unused.db", "main")
    assert main._local_tuner._tune_config.search_alg is not None  # noqa: SLF001


# ---- (3) the size of a search is counted, capped, and validated without a copy per combination ------------


def test_a_search_of_100000_seeds_is_refused_at_load_naming_the_count(tmp_path):
    started = time.perf_counter()
    with pytest.raises(SpecError, match=rf"search: .*search plans 100,000 runs \(.*100000 seed\(s\).* more than the "
                                        rf"{MAX_SWEEP_RUNS:,} a sweep may run"):
        sweep_spec(tmp_path, {"seeds": list(range(100_000))})
    assert time.perf_counter() - started < 10  # was: 12 minutes and 743 MB, then killed


@pytest.mark.parametrize("search, runs", [
    ({"space": {"train.learning_rate": {"grid": [0.1 / (i + 1) for i in range(101)]},
                "model.width": {"grid": list(range(4, 104))}}}, 10_100),
    ({"compare": ["normal", "ogm"], "space": {"method.alpha": {"grid": [0.1 * i for i in range(1, 101)]}},
      "seeds": list(range(100))}, 100 * 101),
    ({"space": {"model.fusion": {"choice": ["sum", "concat"]}}, "searcher": "random", "num_samples": 5001,
      "seeds": [0, 1]}, 10_002),
])
def test_every_way_a_search_multiplies_out_counts_against_the_cap(tmp_path, search, runs):
    with pytest.raises(SpecError, match=rf"search plans {runs:,} runs"):
        sweep_spec(tmp_path, search)


def test_validating_a_large_search_builds_one_trial_spec_per_configuration_not_per_seed(tmp_path, monkeypatch):
    """9,000 seeds of one configuration: one trial spec validated (the seeds' range is checked by search.seeds),
    none of them a deep copy of a spec holding the 9,000 seeds."""
    import orchestrator.sweep as sweep

    spec = sweep_spec(tmp_path, {"seeds": list(range(9_000)), "group_seeds": False})
    built = []
    real = sweep.validate_spec
    monkeypatch.setattr(sweep, "validate_spec", lambda data, source="": built.append(data) or real(data, source))
    started = time.perf_counter()
    sweep.check_search(spec)
    assert len(built) == 1 and built[0]["search"] is None
    assert time.perf_counter() - started < 5  # was: about 10 s (0.6 s for 2,000 seeds, quadratic)


# ---- (5) derived sizes: bytes per clip and per batch, AVID negatives, the generator's bounds --------------


def test_decode_fields_whose_caps_multiply_out_are_refused_naming_them(tmp_path):
    """Each field within its own cap, together an 11.8 GB audio feature per clip (plus its STFT and frames)."""
    hostile = {"num_frames": 256, "frame_height": 1024, "frame_width": 1024, "clip_seconds": 60,
               "sample_rate_hz": 96000, "hop_ms": 0.01, "n_mels": 512}
    with pytest.raises(SpecError, match=r"data.decode: .*one clip decodes to 110 GB \(audio .*clip_seconds 60 x "
                                        r"sample_rate_hz 96000 / a 1-sample hop \(hop_ms / hop_samples\).*5,760,001 x 512 "
                                        r"feature.*video .*256 frames \(num_frames / pool_frames\) of frame_height 1024"):
        load_spec({"data": {"decode": hostile}})


def test_a_batch_that_cannot_fit_in_memory_is_refused_naming_the_batch_fields():
    decode = {"num_frames": 32, "frame_height": 224, "frame_width": 224}
    with pytest.raises(SpecError, match=r"a batch of 4096 clips \(train.global_batch_size / batch_size_per_worker x "
                                        r"scaling.num_workers.*\(data.decode\) is 79 GB"):
        load_spec({"data": {"decode": decode}, "train": {"batch_size_per_worker": 4096}})
    assert load_spec({"data": {"decode": decode}, "train": {"batch_size_per_worker": 64}})


@pytest.mark.parametrize("method, data, match", [
    ({"name": "avid", "config": "Cross-N999999999"}, {},
     r"method.config Cross-N999999999: 999,999,999 negatives per clip, but data.synth makes only 300 clips.*"
     r"999,999,999 negatives x method.embedding_dim 128 x a batch of 16 clips is 1.64e\+04 GB"),
    ({"name": "avid"}, {"synth": {"classes": 2, "clips_per_class": 20}},
     r"method.config \(default Cross-N1024\): 1,024 negatives per clip, but data.synth makes only 40 clips"),
    ({"name": "avid", "config": "Cross-N999999999"}, {"source": "dataset", "root": "/somewhere"},
     r"999,999,999 negatives x method.embedding_dim 128"),
])
def test_avid_negatives_are_bounded_by_the_clips_and_the_memory(method, data, match):
    with pytest.raises(SpecError, match=match):
        load_spec({"method": method, "data": data})
    assert load_spec({"method": {"name": "avid", "config": "Cross-N64"}})


@pytest.mark.parametrize("args, match", [
    (["--height", "100000", "--width", "100000"], r"height: must be at most 512 \(the bound of a spec's data.synth.height\)"),
    (["--clip-seconds", "1e6"], r"clip_seconds: must be at most 30"),
    (["--seed", "-5"], r"seed: must be at least 0, got -5"),
    (["--clips-per-class", "100000000"], r"clips_per_class: must be at most 10000"),
    (["--sample-rate-hz", "10000000"], r"sample_rate_hz: must be at most 48000"),
])
def test_avtune_data_synth_has_the_specs_bounds_and_writes_nothing_out_of_them(tmp_path, args, match):
    from typer.testing import CliRunner

    from orchestrator.cli_data import data_app

    result = CliRunner().invoke(data_app, ["synth", "--out", str(tmp_path / "set"), *args], terminal_width=300,
                                env={"COLUMNS": "300"})
    assert result.exit_code != 0
    assert __import__("re").search(match, " ".join(result.output.split())), result.output
    assert not (tmp_path / "set").exists()


def test_a_negative_synth_seed_is_refused_at_validation_before_any_folder_exists(tmp_path):
    from orchestrator.training import ensure_data

    with pytest.raises(SpecError, match=r"data.synth.seed: Input should be greater than or equal to 0"):
        ensure_data(load_spec({"data": {"synth": {"seed": -1}}, "storage": {"runs_dir": str(tmp_path / "runs")}}))
    assert not (tmp_path / "runs").exists()


# ---- (10) method.init_from: checked completely before the run exists ------------------------------------


CMA = {"name": "cma", "config": "InstX-N8-PosW-N4-Top2", "probe_epochs": 20, "embedding_dim": 16}


def start_spec(root, tmp_path, method: dict, name: str = "t"):
    return load_spec({"name": name, "model": {"width": 8}, "method": method,
                      "data": {"source": "dataset", "root": str(root),
                               "decode": {"num_frames": 2, "frame_height": 32, "frame_width": 32, "clip_seconds": 0.5}},
                      "train": {"global_batch_size": 8}, "storage": {"runs_dir": str(tmp_path / "runs")}})


def avid_run(client, spec, checkpoint: str, status: str = "FINISHED") -> str:
    """A finished avtune avid run of `spec`'s experiment and data whose final model is `checkpoint`."""
    from orchestrator.training import start_mlflow_run

    _, run_id = start_mlflow_run(client, spec.model_copy(update={"method": spec.method.model_copy(
        update={"name": "avid", "config": "Cross-N8", "init_from": ""})}))
    folder = spec.storage.runs_dir / "upload" / run_id
    folder.mkdir(parents=True)
    (folder / "final_model.pt").write_bytes(open(checkpoint, "rb").read())
    client.log_artifact(run_id, str(folder / "final_model.pt"), artifact_path="checkpoints")
    client.set_terminated(run_id, status)
    return run_id


def without(checkpoint: str, tmp_path, *keys: str) -> str:
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    for key in keys:
        del state["method"]["criterion"][key]
    torch.save(state, tmp_path / "cut.pt")
    return str(tmp_path / "cut.pt")


def test_an_avid_checkpoint_without_memory_banks_is_refused_before_the_run_exists(synth_dataset, tmp_path, avid_checkpoint):
    from mlflow.tracking import MlflowClient

    from orchestrator.training import resolve_start_point

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    cut = without(avid_checkpoint, tmp_path, "video_memory.memory")
    with pytest.raises(SpecError, match=r"method.init_from: .*cut.pt has no video_memory.memory in its AVID criterion"):
        resolve_start_point(start_spec(synth_dataset, tmp_path, {**CMA, "init_from": cut}), client)
    assert client.search_experiments() == [] or not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_memory_banks_of_another_training_set_are_refused_before_the_run_exists(synth_dataset, synth_layouts, tmp_path,
                                                                               avid_checkpoint):
    """The checkpoint's banks hold one row per clip of the AVID run's training split (18 here); the other set has 6."""
    from mlflow.tracking import MlflowClient

    from orchestrator.training import resolve_start_point

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    other = start_spec(synth_layouts["avtune"], tmp_path, {**CMA, "init_from": avid_checkpoint})
    with pytest.raises(SpecError, match=r"video_memory.memory is \(18, 16\) \(clips x embedding_dim\), but this spec "
                                        r"trains on [0-9]+ clips \(data\) with method.embedding_dim 16"):
        resolve_start_point(other, client)
    wide = start_spec(synth_dataset, tmp_path, {**CMA, "init_from": avid_checkpoint, "embedding_dim": 32})
    with pytest.raises(SpecError, match=r"is \(18, 16\).*method.embedding_dim 32"):
        resolve_start_point(wide, client)
    resolve_start_point(start_spec(synth_dataset, tmp_path, {**CMA, "init_from": avid_checkpoint}), client)


def test_a_start_run_must_be_avtunes_of_this_experiment_and_data(synth_dataset, synth_layouts, tmp_path, avid_checkpoint):
    from mlflow.tracking import MlflowClient

    from orchestrator.training import resolve_start_point

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    spec = start_spec(synth_dataset, tmp_path, CMA)

    def resolve(run_id: str, **method):
        return resolve_start_point(spec.model_copy(update={"method": spec.method.model_copy(
            update={"init_from": run_id, **method})}), client)

    # A foreign tool's run that only says method.name=avid.
    foreign = client.create_run(client.create_experiment("foreign")).info.run_id
    client.log_param(foreign, "method.name", "avid")
    client.set_terminated(foreign)
    with pytest.raises(SpecError, match=rf"method.init_from: run {foreign} was not made by avtune"):
        resolve(foreign)
    # An avtune run of another experiment: refused unless the spec says so.
    elsewhere = avid_run(client, start_spec(synth_dataset, tmp_path, CMA, name="other"), avid_checkpoint)
    with pytest.raises(SpecError, match=rf"run {elsewhere} belongs to experiment 'other', not this spec's 't'; set "
                                        r"method.init_from_other_experiment: true"):
        resolve(elsewhere)
    assert resolve(elsewhere, init_from_other_experiment=True).method.init_source == f"run:{elsewhere}"
    # An avtune run of this experiment trained on other clips (the digest of its logged training dataset).
    other_data = avid_run(client, start_spec(synth_layouts["avtune"], tmp_path, CMA), avid_checkpoint)
    with pytest.raises(SpecError, match=rf"run {other_data} trained on .*\(digest [0-9a-f]+\), this spec's data is "
                                        r".*: its memory banks hold other clips"):
        resolve(other_data)
    same = avid_run(client, spec, avid_checkpoint)
    assert resolve(same).method.init_source == f"run:{same}"


# ---- (4) resource requests the cluster can never meet; a bounded start-up ------------------------------


def no_runs_logged(runs_dir) -> bool:
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri(None, runs_dir))
    return not client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.parametrize("sections, match", [
    ({"scaling": {"cpus_per_worker": 4}}, r"scaling.num_workers 1 x scaling.cpus_per_worker 4 CPUs, but the Ray cluster has 2"),
    ({"scaling": {"num_workers": 3}, "train": {"epochs": 1, "global_batch_size": 6}},
     r"scaling.num_workers 3 x scaling.cpus_per_worker 1 CPUs, but the Ray cluster has 2"),
    ({"search": {"seeds": [0, 1], "trial_cpus": 1e9}}, r"\+ search.trial_cpus 1e\+09 CPUs, but the Ray cluster has 2"),
    ({"scaling": {"use_gpu": True}}, r"scaling.use_gpu with scaling.num_workers 1: one GPU each, but the Ray cluster has 0"),
    # A searched resource field: its largest value must fit too, not only the base spec's.
    ({"search": {"space": {"scaling.cpus_per_worker": {"grid": [1, 4]}}}},
     r"scaling.num_workers 1 x scaling.cpus_per_worker 4 CPUs, but the Ray cluster has 2"),
])
def test_resource_requests_the_cluster_cannot_meet_are_refused_before_any_run_exists(ray_local, synth_dataset, tmp_path,
                                                                                    sections, match):
    """Ray Train retried the worker-group start every 60 s, forever; now refused after connecting, naming the field."""
    from orchestrator.sweep import run_sweep
    from orchestrator.training import run_training

    spec = load_spec({"name": "big", "data": {"source": "dataset", "root": str(synth_dataset)},
                      "storage": {"runs_dir": str(tmp_path / "runs")}, **sections})
    if ray_local.cluster_resources().get("GPU") and "use_gpu" in str(sections):
        pytest.skip("this machine has a GPU")
    with pytest.raises(SpecError, match=rf"asks for more than the Ray cluster has.*{match}"):
        (run_sweep if spec.search else run_training)(spec)
    assert no_runs_logged(tmp_path / "runs")


def test_a_train_run_gives_up_a_worker_group_that_never_starts(tmp_path):
    """Ray Train V2 counts a worker-group start past its timeout as a controller failure, retried without limit by
    default (controller_failure_limit -1): the run's FailureConfig bounds it."""
    from orchestrator.training import CONTROLLER_FAILURE_LIMIT, build_trainer

    trainer = build_trainer(load_spec({"storage": {"runs_dir": str(tmp_path / "runs")}}), "bounded", [])
    failure = trainer.run_config.failure_config
    assert failure.controller_failure_limit == CONTROLLER_FAILURE_LIMIT and 0 <= CONTROLLER_FAILURE_LIMIT <= 5


def test_a_generated_set_at_data_root_made_with_other_synth_settings_is_refused(tmp_path):
    """`data.root` holding a generated set is used only when it was made with the spec's `data.synth`: a set of
    other settings is named with the settings that differ, before anything is trained or logged."""
    from orchestrator.synth import synthesize_dataset
    from orchestrator.training import ensure_data

    synth = {"classes": 2, "clips_per_class": 3, "clip_seconds": 0.5, "fps": 4, "height": 32, "width": 32, "seed": 0}
    root = tmp_path / "made"
    synthesize_dataset(root, layout="avtune", **synth)

    def spec(**changes):
        return load_spec({"data": {"source": "generated", "root": str(root), "synth": {**synth, **changes}},
                          "storage": {"runs_dir": str(tmp_path / "runs")}})

    assert ensure_data(spec()).data.root == root.resolve()  # the same settings: the set is used as it is
    with pytest.raises(SpecError, match=r"data.root: .*other data.synth settings \(seed 0 there, 3 in the spec; "
                                        r"clips_per_class 3 there, 5 in the spec|clips_per_class 3 there, 5 in the spec; seed"):
        ensure_data(spec(seed=3, clips_per_class=5))
    assert no_runs_logged(tmp_path / "runs")


@pytest.mark.slow
def test_ctrl_c_while_the_worker_group_waits_for_cpus_ends_the_command_at_once(ray_local, ray_address, synth_dataset,
                                                                                 tmp_path):
    """`avtune train` on a cluster whose CPUs are all taken (here by an actor of this test): its Train controller waits
    for the worker group. Ray Train's own Ctrl-C handler waited for an abort that controller never answered; now
    the command ends within seconds, exit 130, the run KILLED."""
    import os
    import signal
    import subprocess
    import sys

    import yaml
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import resolve_tracking_uri

    @ray_local.remote(num_cpus=ray_local.cluster_resources()["CPU"])
    class TakesEveryCpu:
        def ready(self) -> bool:
            return True

    holder = TakesEveryCpu.remote()
    ray_local.get(holder.ready.remote(), timeout=120)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({
        "name": "waits", "data": {"source": "dataset", "root": str(synth_dataset), "cache_dir": str(tmp_path / "cache")},
        "train": {"epochs": 1}, "storage": {"runs_dir": str(tmp_path / "runs")}}))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    command = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "train", str(spec_file)], cwd=tmp_path,
                               env={**env, "RAY_ADDRESS": ray_address}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        client = MlflowClient(resolve_tracking_uri(None, tmp_path / "runs"))
        deadline = time.monotonic() + 120
        runs = []
        while not runs and time.monotonic() < deadline and command.poll() is None:
            time.sleep(1)
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert runs and command.poll() is None, "the run never started"
        time.sleep(8)  # the controller has asked for its worker group by now, and waits
        command.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        output, _ = command.communicate(timeout=60)
        assert time.monotonic() - interrupted < 30, output[-2000:]
    finally:
        if command.poll() is None:
            command.kill()
        ray_local.kill(holder)
    assert command.returncode == 130, output[-2000:]
    assert client.get_run(runs[0].info.run_id).info.status == "KILLED"


def test_ray_train_still_registers_its_sigint_handler_through_the_hook_avtune_overrides():
    """`ClipTrainer._register_sigint_handler` replaces Ray Train 2.60's (private) hook: an upgrade that renames it
    would silently bring back the Ctrl-C that never returns."""
    import inspect

    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    assert "self._register_sigint_handler(controller)" in inspect.getsource(DataParallelTrainer._initialize_and_run_controller)
