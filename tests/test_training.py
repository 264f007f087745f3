"""End to end on real parts: spec -> Ray Train (local Ray) -> MLflow (SQLite), on generated mp4 clips.

One Ray Train run per wiring concern: here logging, params and artifacts of a 2-worker DDP run
through the CLI; resume and a failing run in tests/test_faults.py. Every method's training itself is
tested in-process through the same engine (tests/test_engine.py)."""
from __future__ import annotations


import pytest
from mlflow.tracking import MlflowClient

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
        "train": {"epochs": 2, "batch_size": 8, "optimizer": "adam", "learning_rate": 0.001, "max_failures": 0},
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


def test_cli_train_then_runs(ray_local, base_spec, tmp_path):
    """`avtune train SPEC --set ...` trains and prints the per-epoch table; `avtune runs` reads it back
    from MLflow; a bad `--set` is refused naming the field, before anything starts. The run is OGM-GE
    on 2 DDP workers: its scores are all-reduced and its noise seeded alike on both ranks
    (workers/methods/ogm.py), and every epoch reaches MLflow once."""
    import yaml
    from typer.testing import CliRunner

    from orchestrator.cli import app

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(base_spec))
    runner = CliRunner()
    bad = runner.invoke(app, ["train", str(spec_file), "--set", "model.fusion=average"])
    assert bad.exit_code == 2 and "model.fusion" in bad.output, bad.output
    res = runner.invoke(app, ["train", str(spec_file), "--set", "method.name=ogm_ge", "--set", "method.alpha=0.3",
                              "--set", "scaling.num_workers=2"])
    assert res.exit_code == 0, res.output
    assert "acc_audio" in res.output and "k_audio" in res.output and "checkpoint:" in res.output
    run_id = res.output.split(" run ")[-1].split()[0]
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["method.alpha"] == "0.3"
    assert run.data.params["scaling.num_workers"] == "2"
    assert run.data.params["method.name"] == run.data.tags["avtune.method"] == "ogm_ge"
    for key in ("acc", "acc_audio", "acc_visual", "loss", "k_audio", "ratio_av", "shapley_audio"):
        assert epochs_logged(client, run_id, key) == [0, 1], key
    assert "test_acc" in run.data.metrics
    assert {"spec.yaml", "card.json", "checkpoints/final_model.pt", "checkpoints/best_model.pt"} <= artifact_paths(client, run_id)
    listed = runner.invoke(app, ["runs", "t", "--runs-dir", str(tmp_path / "runs")])
    assert listed.exit_code == 0 and run_id[:12] in listed.output and "FINISHED" in listed.output, listed.output
