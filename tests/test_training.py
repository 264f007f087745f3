"""End to end on real parts: spec -> Ray Train (local Ray) -> MLflow (SQLite), on generated mp4 clips.

One Ray Train run per wiring concern: here logging, params and artifacts of a 2-worker DDP run
through the CLI; resume and a failing run in tests/test_faults.py. Every method's training itself is
tested in-process through the same engine (tests/test_engine.py)."""
from __future__ import annotations

import sys
from pathlib import Path


import pytest
from mlflow.tracking import MlflowClient

from conftest import sqlite_store, RAY_LINES, on_a_terminal
from orchestrator import load_spec
from orchestrator.specs import SpecError

pytestmark = pytest.mark.slow

def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out.get(key, {}), value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.fixture()
def base_spec(synth_dataset, tmp_path) -> dict:
    return {
        "name": "t",
        "data": {"source": "dataset", "layout": "avtune", "root": str(synth_dataset),
                 "cache_dir": str(tmp_path / "cache"),
                 "decode": {"num_frames": 2, "frame_height": 32, "frame_width": 32, "clip_seconds": 0.5}},
        "model": {"width": 8},
        "train": {"epochs": 2, "global_batch_size": 8, "optimizer": "adam", "learning_rate": 0.001, "max_failures": 0},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "storage": {"runs_dir": str(tmp_path / "runs")},
    }


def epochs_logged(client: MlflowClient, run_id: str, key: str = "acc") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for info in client.list_artifacts(run_id, path):
        if info.is_dir:
            found |= artifact_paths(client, run_id, info.path)
        else:
            found.add(info.path)
    return found


def test_spec_error_names_the_field(base_spec):
    with pytest.raises(SpecError, match=r"model\.fusion"):
        load_spec(merge(base_spec, {"model": {"fusion": "average"}}))


@pytest.fixture(scope="module")
def cli_run(ray_address, synth_dataset, tmp_path_factory) -> dict:
    """`avtune train` of OGM-GE on 2 DDP workers, once for this module: its scores are all-reduced and
    its noise seeded alike on both ranks (workers/methods/ogm.py). A bad `--set` first, refused."""
    import yaml
    from typer.testing import CliRunner

    from orchestrator.cli import app

    tmp = tmp_path_factory.mktemp("cli_run")
    spec = {
        "name": "t",
        "data": {"source": "dataset", "layout": "avtune", "root": str(synth_dataset), "cache_dir": str(tmp / "cache"),
                 "decode": {"num_frames": 2, "frame_height": 32, "frame_width": 32, "clip_seconds": 0.5}},
        "model": {"width": 8},
        "train": {"epochs": 2, "global_batch_size": 8, "optimizer": "adam", "learning_rate": 0.001, "max_failures": 0},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "storage": {"runs_dir": str(tmp / "runs")},
    }
    spec_file = tmp / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    runner = CliRunner()
    bad = runner.invoke(app, ["train", str(spec_file), "--set", "model.fusion=average"])
    overrides = ["--set", "method.name=ogm_ge", "--set", "method.alpha=0.3", "--set", "scaling.num_workers=2"]
    # As a person runs it: a real process on a pseudo-terminal (util-linux `script`), so the live view draws.
    res = on_a_terminal([sys.executable, "-m", "orchestrator.cli", "train", str(spec_file), *overrides], tmp,
                        env={"RAY_ADDRESS": ray_address})
    return {"tmp": tmp, "spec_file": spec_file, "overrides": overrides, "bad": bad, "res": res, "runner": runner,
            "client": MlflowClient(f"sqlite:///{tmp / 'runs' / 'mlflow.db'}")}




def test_cli_train_then_runs(cli_run):
    """`avtune train SPEC --set ...` trains and prints the per-epoch table; `avtune runs` reads it back
    from MLflow; a bad `--set` is refused naming the field, before anything starts; every epoch of
    the 2-worker run reaches MLflow once, with params, tags and artifacts."""
    from orchestrator.cli import app

    bad, res, client, tmp = cli_run["bad"], cli_run["res"], cli_run["client"], cli_run["tmp"]
    assert bad.exit_code == 2 and "model.fusion" in bad.output, bad.output
    assert res.exit_code == 0, res.output[-5000:]
    # The live view: its header, the trial's row and the overall line; Ray's own lines only in the log file.
    assert "avtune train t" in res.output and "ogm_ge_concat_a0.3" in res.output
    assert "1/1 trials done" in res.output and "FINISHED" in res.output
    assert not [line for line in RAY_LINES if line in res.output], res.output[-3000:]
    log_file = Path(res.output.split("Ray log:")[1].split()[0])
    assert log_file.parent == tmp / "runs" / "logs"
    assert "Reporting training result" in log_file.read_text(errors="replace")
    assert "acc_audio" in res.output and "k_audio" in res.output and "checkpoint:" in res.output
    run_id = res.output.split(" run ")[-1].split()[0]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["method.alpha"] == "0.3"
    assert run.data.params["scaling.num_workers"] == "2"
    assert run.data.params["method.name"] == run.data.tags["avtune.method"] == "ogm_ge"
    for key in ("acc", "acc_audio", "acc_visual", "loss", "k_audio", "ratio_av", "shapley_audio"):
        assert epochs_logged(client, run_id, key) == [0, 1], key
    assert "test_acc" in run.data.metrics
    assert {"spec.yaml", "card.json", "checkpoints/final_model.pt", "checkpoints/best_model.pt",
            "predictions.csv"} <= artifact_paths(client, run_id)
    listed = cli_run["runner"].invoke(app, ["runs", "t", "--runs-dir", str(tmp / "runs")])
    assert listed.exit_code == 0 and run_id[:12] in listed.output and "FINISHED" in listed.output, listed.output


def test_damaged_checkpoint_fails_the_run_naming_the_file_and_the_repaired_run_resumes(cli_run):
    """Resume of the 2-worker run above (`run_training(resume_run_id=...)`), from its last checkpoint."""
    from conftest import write_hostile_checkpoint
    from orchestrator.specs import load_spec
    from orchestrator.training import run_training
    from workers.train_loop import CHECKPOINT_FILE, load_checkpoint_state

    client, tmp = cli_run["client"], cli_run["tmp"]
    run_id = cli_run["res"].output.split(" run ")[-1].split()[0]
    checkpoint = cli_run["res"].output.split("checkpoint:")[-1].split()[0]
    state_file = Path(checkpoint) / CHECKPOINT_FILE
    overrides = [o for o in cli_run["overrides"] if o != "--set"]
    longer = load_spec(cli_run["spec_file"], [*overrides, "train.epochs=3"])
    good = state_file.read_bytes()

    # Truncated on disk (the storage, not the loop, lost its tail): never trained from silently; the
    # training raises, and its run is FAILED with the error text, which names the file.
    state_file.write_bytes(good[: len(good) // 2])
    with pytest.raises(Exception) as failure:
        run_training(longer, resume_run_id=run_id)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert str(state_file) in run.data.tags["error"], run.data.tags["error"][-2000:]
    assert str(state_file) in str(failure.value)
    assert epochs_logged(client, run_id) == [0, 1]

    # Replaced by a pickle that runs code: refused by the weights_only load the Train worker resumes
    # with (the same function the failed resume above went through), naming the file.
    marker = tmp / "code-ran"
    write_hostile_checkpoint(state_file, marker)
    with pytest.raises(RuntimeError, match="UnpicklingError") as failure:
        load_checkpoint_state(state_file.parent)
    assert str(state_file) in str(failure.value)
    assert not marker.exists()

    # Nothing logged or checkpointed was lost: with the file repaired, the same run resumes from its
    # last checkpoint, continues the epoch count and finishes.
    state_file.write_bytes(good)
    resumed = run_training(longer, resume_run_id=run_id)
    assert resumed.run_id == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    assert epochs_logged(client, run_id) == [0, 1, 2]
    assert list(resumed.history.index) == [0, 1, 2]


def test_cma_start_point_is_checked_and_resolved_before_anything_is_logged(base_spec, tmp_path, avid_checkpoint):
    """A single CMA training without an AVID start is refused (official CMA restores a trained AVID model);
    a run id is resolved to that run's final checkpoint only if it is a finished avid run; the start
    point is logged as `cma_init_from`."""
    from orchestrator.training import resolve_start_point, run_training, start_mlflow_run
    from workers.methods import get_method

    cma = {"name": "cma", "config": "InstX-N64-PosW-N8-Top2", "probe_epochs": 20, "embedding_dim": 16}
    runs = tmp_path / "runs"
    with pytest.raises(SpecError, match=r"method\.init_from: cma starts from a trained model .*\(search: \{compare: \[cma\]\}\)"):
        run_training(load_spec(merge(base_spec, {"method": cma})))
    assert not runs.exists(), "nothing is generated or logged for a refused spec"

    client = MlflowClient(tracking_uri=sqlite_store(tmp_path / "mlflow.db"))

    def logged_run(method: str, status: str = "FINISHED") -> str:
        # An avtune run of this spec's experiment and data (what a start run must be: tests/test_hardening_round3.py).
        section = {"name": method, "config": "Cross-N64", "embedding_dim": 16} if method == "avid" else {"name": method}
        _, run_id = start_mlflow_run(client, load_spec(merge(base_spec, {"method": section})))
        (tmp_path / "final_model.pt").write_bytes(Path(avid_checkpoint).read_bytes())
        client.log_artifact(run_id, str(tmp_path / "final_model.pt"), artifact_path="checkpoints")
        client.set_terminated(run_id, status)
        return run_id

    def resolve(init_from: str):
        return resolve_start_point(load_spec(merge(base_spec, {"method": {**cma, "init_from": init_from}})), client)

    normal, killed, avid = logged_run("normal"), logged_run("avid", "KILLED"), logged_run("avid")
    with pytest.raises(SpecError, match=f"method.init_from: run {normal} is a 'normal' run"):
        resolve(normal)
    with pytest.raises(SpecError, match=f"method.init_from: run {killed} is KILLED"):
        resolve(killed)
    with pytest.raises(SpecError, match="method.init_from: no MLflow run 0123456789abcdef0123456789abcdef"):
        resolve("0123456789abcdef0123456789abcdef")
    with pytest.raises(SpecError, match="method.init_from: .*test_training.py is not a readable checkpoint"):
        resolve(str(Path(__file__)))  # a file, but no checkpoint
    spec = resolve(avid)
    assert spec.method.init_source == f"run:{avid}"
    assert Path(spec.method.init_from) == runs / "starts" / avid / "final_model.pt"
    assert get_method("cma").run_params(spec) == {"cma_init_from": f"run:{avid}"}
    by_path = resolve(str(Path(avid_checkpoint).parent))  # a folder holding an avtune checkpoint.pt
    assert get_method("cma").run_params(by_path) == {"cma_init_from": f"checkpoint:{Path(avid_checkpoint).parent}"}


@pytest.mark.parametrize("embedded", [True, False])
def test_trainer_drops_the_helper_actors_a_run_cannot_use(base_spec, monkeypatch, embedded):
    """No DatasetManager (avtune passes no Ray Datasets); no PlacementGroupCleaner on the embedded Ray,
    whose missing dashboard leaves it blind. Checked against Ray Train's own list, so a Ray upgrade that
    moves these callbacks fails here instead of silently starting the actors again."""
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from orchestrator.training import EMBEDDED_RAY_ENV, build_trainer

    if embedded:
        monkeypatch.setenv(EMBEDDED_RAY_ENV, "1")
    else:
        monkeypatch.delenv(EMBEDDED_RAY_ENV, raising=False)
    trainer = build_trainer(load_spec(base_spec), "callbacks", [])
    kinds = {type(c) for c in trainer._create_default_callbacks()}
    ray_kinds = {type(c) for c in DataParallelTrainer._create_default_callbacks(trainer)}
    assert {DatasetsCallback, PlacementGroupCleanerCallback} <= ray_kinds
    assert DatasetsCallback not in kinds
    assert (PlacementGroupCleanerCallback in kinds) is not embedded
    assert kinds == ray_kinds - {DatasetsCallback} - ({PlacementGroupCleanerCallback} if embedded else set())


@pytest.mark.parametrize("workers", [1, 2])
def test_a_single_worker_run_sets_up_no_process_group(base_spec, workers):
    """One CPU worker: Ray's base backend (no torch.distributed group of size 1, no torch import in the
    Train controller); DDP over several workers keeps Ray's TorchConfig."""
    from ray.train.backend import BackendConfig
    from ray.train.torch import TorchConfig

    from orchestrator.training import build_trainer

    spec = load_spec({**base_spec, "scaling": {"num_workers": workers, "cpus_per_worker": 1}})
    backend = build_trainer(spec, "backend", []).backend_config
    assert type(backend) is (BackendConfig if workers == 1 else TorchConfig)
