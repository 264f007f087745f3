"""Hostile and careless inputs (issue 16): each is refused early with the field or file named, and
nothing the user owns is overwritten."""
from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.specs import SpecError, load_spec
from conftest import sqlite_store


def plant_cremad(root: Path) -> dict[Path, bytes]:
    """A user's CREMA-D folder: real file names the generator would also write."""
    files = {root / "train.csv": b"1001_IEO_NEU_XX,NEU\n", root / "AudioWAV" / "1001_IEO_NEU_XX.wav": b"RIFF-real-audio"}
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def test_generated_data_never_overwrites_a_folder_the_generator_did_not_make(tmp_path):
    from orchestrator.synth import synthesize_dataset
    from orchestrator.training import run_training

    root = tmp_path / "cremad"
    planted = plant_cremad(root)
    # data.root without `source: dataset`: the source defaults to generated.
    spec = load_spec({"data": {"root": str(root), "layout": "cremad"}, "storage": {"runs_dir": str(tmp_path / "runs")}})
    with pytest.raises(SpecError, match=r"data.root: .*cremad is not empty and was not made by the clip generator.*"
                                        r"set data.source: dataset"):
        run_training(spec)
    with pytest.raises(FileExistsError, match="not made by the clip generator"):
        synthesize_dataset(root, layout="cremad", classes=2, clips_per_class=3, clip_seconds=0.5, fps=4, height=16,
                           width=16)
    assert {p: p.read_bytes() for p in planted} == planted
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == ["AudioWAV", "AudioWAV/1001_IEO_NEU_XX.wav",
                                                                             "train.csv"]
    assert not (tmp_path / "runs").exists()


def test_the_generator_rewrites_only_its_own_folders(tmp_path):
    from orchestrator.synth import GENERATOR_MARKER, synthesize_dataset

    small = dict(layout="avtune", classes=2, clips_per_class=3, clip_seconds=0.5, fps=4, height=16, width=16)
    root = tmp_path / "gen"
    synthesize_dataset(root, **small)  # a new folder
    assert (root / GENERATOR_MARKER).is_file() and (root / "card.json").is_file()
    (root / "card.json").unlink()  # an interrupted run: no card, the marker stays
    synthesize_dataset(root, **small)
    assert (root / "card.json").is_file()
    (root / GENERATOR_MARKER).unlink()  # a complete set from before the marker: its card says it is generated
    synthesize_dataset(root, **small)
    empty = tmp_path / "empty"
    empty.mkdir()
    synthesize_dataset(empty, **small)
    assert (empty / "card.json").is_file()


BILLION_LAUGHS = """name: laughs
a: &a ["ha", "ha", "ha", "ha", "ha", "ha", "ha", "ha", "ha", "ha"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
train: {epochs: 2}
"""


@pytest.mark.parametrize("text, match", [
    (BILLION_LAUGHS, r"line 2: YAML anchors and aliases \(&a / \*a\) are not allowed"),
    ("train: &t {epochs: 2}\nsearch: {space: {train.epochs: *t}}\n", r"line 1: YAML anchors and aliases"),
    ("name: x\ntrain:\n  epochs: 2\n  epochs: 5\n", r"line 4: duplicate key 'epochs' \(first at line 3\)"),
    ("name: x\nname: y\n", r"line 2: duplicate key 'name' \(first at line 1\)"),
])
def test_yaml_aliases_and_duplicate_keys_are_refused_naming_the_line(tmp_path, text, match):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=rf"spec {path}, {match}"):
        load_spec(path)


def test_overrides_are_parsed_by_the_same_strict_loader():
    with pytest.raises(SpecError, match=r"override 'train.epochs=\{a: 1, a: 2\}': line 1: duplicate key 'a'"):
        load_spec({}, ["train.epochs={a: 1, a: 2}"])
    assert load_spec({}, ["train.epochs=4"]).train.epochs == 4


@pytest.mark.parametrize("spec, match", [
    ({"train": {"learning_rate": float("nan")}}, r"train.learning_rate: Input should be a finite number"),
    ({"train": {"weight_decay": float("inf")}}, r"train.weight_decay: Input should be a finite number"),
    ({"search": {"compare": ["normal"], "trial_cpus": float("inf")}}, r"search.trial_cpus: Input should be a finite number"),
    ({"train": {"seed": -1}}, r"train.seed: Input should be greater than or equal to 0"),
    ({"train": {"seed": 2**64}}, r"train.seed: Input should be less than or equal to 4294967295"),
    ({"search": {"seeds": [0, 2**40]}}, r"search.seeds.1: Input should be less than or equal to 4294967295"),
    ({"search": {"compare": ["normal"], "metric": "accc"}}, r"search.metric: Input should be 'acc', 'loss'"),
    ({"tracking": {"experiment": "../../escape"}}, r"tracking.experiment: String should match pattern"),
    ({"method": {"name": "avid", "config": "Cros-N1024"}}, r"method.config: AVID config 'Cros-N1024': part 1 'Cros'"),
    ({"method": {"name": "cma", "config": "Cross-N1024"}}, r"method.config: 'Cross-N1024' is an AVID criterion"),
])
def test_late_spec_errors_are_found_at_validation(spec, match):
    with pytest.raises(SpecError, match=match):
        load_spec(spec)


def test_search_values_and_paths_are_checked_before_data_or_runs(tmp_path):
    from orchestrator.sweep import run_sweep

    base = {"method": {"name": "ogm_ge", "modulation_ends": 3}, "train": {"epochs": 3},
            "storage": {"runs_dir": str(tmp_path / "runs")}}
    for search, match in (
        ({"space": {"train.learnin_rate": {"grid": [0.1]}}}, r"train.learnin_rate: unknown field"),
        ({"space": {"method.alpha": {"choice": [0.5, -1]}}, "searcher": "random"}, r"method.alpha=-1: method.alpha"),
        ({"space": {"train.learning_rate": {"loguniform": [1e-4, 100]}}, "searcher": "random"},
         r"train.learning_rate=100.0: train.learning_rate: Input should be less than or equal to 10"),
    ):
        with pytest.raises(SpecError, match=match):
            run_sweep(load_spec({**base, "search": search}))
    assert not (tmp_path / "runs").exists(), "no clips generated, nothing logged"


# ---- run states ----------------------------------------------------------------------------------


def sqlite_client(tmp_path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(sqlite_store(tmp_path / "mlflow.db"))


def test_interrupt_is_killed_failure_is_failed_and_resume_reopens(tmp_path):
    from orchestrator.tracking import finish_run, reopen_run

    client = sqlite_client(tmp_path)
    exp = client.create_experiment("states")
    interrupted, failed = (client.create_run(exp).info.run_id for _ in range(2))
    finish_run(client, interrupted, KeyboardInterrupt())
    finish_run(client, failed, RuntimeError("boom"))
    run = client.get_run(interrupted)
    assert run.info.status == "KILLED" and run.data.tags["avtune.stopped_by"] == "interrupt" and "error" not in run.data.tags
    assert client.get_run(failed).info.status == "FAILED" and client.get_run(failed).data.tags["error"] == "RuntimeError: boom"
    for run_id in (interrupted, failed):
        reopen_run(client, run_id)  # what a resume does
        run = client.get_run(run_id)
        assert run.info.status == "RUNNING" and not {"error", "avtune.stopped_by"} & set(run.data.tags)


def test_a_run_that_fails_while_it_is_described_is_not_left_running(tmp_path, synth_dataset):
    from orchestrator.training import start_mlflow_run

    spec = load_spec({"data": {"source": "dataset", "root": str(synth_dataset)}, "storage": {"runs_dir": str(tmp_path / "runs")}})
    client = sqlite_client(tmp_path)
    (tmp_path / "a-file").write_text("")
    # The experiment's artifact store is a path under a file: the run is created, its spec.yaml cannot be stored.
    client.create_experiment("avtune", artifact_location=str(tmp_path / "a-file" / "artifacts"))
    with pytest.raises(OSError):
        start_mlflow_run(client, spec)
    (run,) = client.search_runs([client.get_experiment_by_name("avtune").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["error"]


def test_the_resume_file_names_the_new_parent_as_soon_as_it_exists(tmp_path, synth_dataset, monkeypatch):
    """A crash before the first trial (here: the tracking server lost while the data's ceiling is logged, the
    first thing after the parent run exists) must leave a resume file that names this sweep's parent run, not
    an older sweep's; `--resume-run` takes a parent id and checks it."""
    import json

    import orchestrator.sweep as sweep

    spec = load_spec({"name": "crash", "data": {"source": "dataset", "root": str(synth_dataset)},
                      "storage": {"runs_dir": str(tmp_path / "runs")},
                      "search": {"compare": ["normal"]}})
    state_file = sweep.sweep_state_file(spec)
    state_file.parent.mkdir(parents=True)
    state_file.write_text(json.dumps({"parent_run_id": "an-older-sweep"}))

    def unreachable(*args):
        raise ConnectionError("tracking server unreachable")

    # No Ray needed up to there: its connection and resource check come before the parent run.
    monkeypatch.setattr(sweep, "connect_ray", lambda address=None: None)
    monkeypatch.setattr(sweep, "check_resources", lambda spec: None)
    monkeypatch.setattr(sweep, "log_ceiling", unreachable)
    with pytest.raises(ConnectionError):
        sweep.run_sweep(spec)
    parent = json.loads(state_file.read_text())["parent_run_id"]
    client = sqlite_client(tmp_path / "runs")
    assert client.get_run(parent).info.status == "FAILED"
    assert not list(state_file.parent.glob("*.partial"))
    with pytest.raises(SpecError, match="--resume-run: no run 0123456789abcdef0123456789abcdef"):
        sweep.run_sweep(spec, resume="0123456789abcdef0123456789abcdef")
    child = client.create_run(client.get_run(parent).info.experiment_id).info.run_id
    with pytest.raises(SpecError, match=f"--resume-run: run {child} is not a sweep's parent run"):
        sweep.run_sweep(spec, resume=child)


# ---- the Ray token -------------------------------------------------------------------------------


def test_submit_never_sends_the_token_in_clear_or_without_one(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from orchestrator.cli import app
    from orchestrator.jobs import SubmitError, check_transport, read_auth_token

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    with pytest.raises(SubmitError, match="no Ray auth token: set RAY_AUTH_TOKEN"):
        read_auth_token()
    with pytest.raises(SubmitError, match=r"--token-file: cannot read .*missing: No such file"):
        read_auth_token(tmp_path / "missing")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t" * 32)
    assert read_auth_token() == "t" * 32
    for address in ("http://127.0.0.1:8265", "http://localhost:8265", "https://ray.example.org:8265"):
        check_transport(address)
    with pytest.raises(SubmitError, match=r"--address http://10.1.2.3:8265: plain http to a non-loopback host"):
        check_transport("http://10.1.2.3:8265")
    check_transport("http://10.1.2.3:8265", allow_insecure_http=True)

    spec = tmp_path / "spec.yaml"
    spec.write_text("name: s\nsearch: {compare: [normal]}\n")
    res = CliRunner().invoke(app, ["submit", str(spec), "--address", "http://10.1.2.3:8265"])
    assert res.exit_code == 2 and "plain http to a non-loopback host" in res.output, res.output
    res = CliRunner().invoke(app, ["submit", str(spec), "--address", "http://127.0.0.1:1",
                                   "--token-file", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "--token-file: cannot read" in res.output and "Traceback" not in res.output


def test_a_cache_that_cannot_be_written_never_stops_training(synth_dataset, tmp_path, caplog):
    """A read-only cache folder (as a dataset folder often is): the clips decode, a warning says so
    once, and training goes on."""
    import logging
    import os

    from workers.engine import fit

    if os.geteuid() == 0:
        # root writes through permission bits: make the cache path a file, which no one can mkdir under.
        (tmp_path / "cache").write_text("not a folder")
    else:
        (tmp_path / "cache").mkdir(mode=0o500)
    spec = load_spec({"data": {"source": "dataset", "root": str(synth_dataset), "cache_dir": str(tmp_path / "cache"),
                               "decode": {"num_frames": 2, "frame_height": 32, "frame_width": 32, "clip_seconds": 0.5}},
                      "model": {"width": 8}, "train": {"epochs": 1, "global_batch_size": 8, "optimizer": "adam"}})
    with caplog.at_level(logging.WARNING):
        history = fit(spec, report=lambda metrics, state: None)
    assert [h["epoch"] for h in history] == [0.0]
    warnings = [r for r in caplog.records if "cannot be written" in r.getMessage()]
    assert 1 <= len(warnings) <= 4, [r.getMessage() for r in warnings]  # once per dataset split's cache, not per clip


def test_tracking_credentials_are_never_shown():
    from orchestrator.tracking import redact_uri, split_credentials

    uri = "https://alice:s3cr%40t@mlflow.example.org:5000/path"
    assert redact_uri(uri) == "https://alice:***@mlflow.example.org:5000/path"
    assert redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert split_credentials(uri) == ("https://mlflow.example.org:5000/path",
                                      {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "s3cr@t"})
    assert split_credentials("sqlite:////tmp/x.db") == ("sqlite:////tmp/x.db", {})


def test_reports_log_each_summary_point_once_and_hide_credentials(tmp_path):
    """A second report (or a resumed sweep) adds no duplicate step-0 points on the parent; the page never
    shows a tracking password."""
    import dataclasses

    from mlflow.tracking import MlflowClient
    from test_report import HAND_TRIALS, write_hand_sweep

    from orchestrator.report import build_report, imbalance_summary, load_sweep
    from orchestrator.report.html import render_html

    uri = sqlite_store(tmp_path / "m.db")
    client, parent, _ = write_hand_sweep(uri, "hand", HAND_TRIALS)
    for _ in range(2):
        build_report("hand", tracking_uri=uri, out_dir=tmp_path / "out")
    for key in ("best_by_acc/acc", "cfg/normal/acc_mean"):
        assert len(MlflowClient(uri).get_metric_history(parent, key)) == 1, key
    assert not list((tmp_path / "out").glob(".*.partial"))
    sweep = dataclasses.replace(load_sweep(client, parent), tracking_uri="https://alice:s3cret@mlflow.example.org/")
    table, definition = imbalance_summary(sweep)
    page = render_html(sweep, table, definition, [], [], None)
    assert "s3cret" not in page and "https://alice:***@mlflow.example.org/" in page


def test_the_loader_applies_the_specs_source_limits(synth_dataset):
    """The spec's decode limits reach the decoder through the dataset (32x32 generated frames = 1024 pixels)."""
    from workers.datasets import AVClipDataset, BadMediaError

    spec = load_spec({"data": {"source": "dataset", "root": str(synth_dataset),
                               "decode": {"num_frames": 2, "frame_height": 32, "frame_width": 32, "clip_seconds": 0.5,
                                          "max_source_pixels": 1000}}})
    dataset = AVClipDataset(synth_dataset, "avtune", "train", spec.data.decode)
    with pytest.raises(BadMediaError, match=r"\.mp4.*source frames 32x32 \(1024 pixels\) exceed max_source_pixels 1000"):
        dataset[0]
