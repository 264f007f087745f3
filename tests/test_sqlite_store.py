"""A new SQLite tracking store made from the migrated template (`orchestrator.sqlite_store`) is the store
MLflow makes itself: the same schema and migration head, MLflow's Default experiment at this store's own
artifact location, and it takes runs; a store that exists is never replaced."""
from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.sqlite_store import prepare_sqlite_store, sqlite_file, template_file
from orchestrator.tracking import resolve_tracking_uri


def schema(db: Path) -> tuple[list, list]:
    """Tables, indexes and their definitions; the lines of a definition as a set, since MLflow's own migrations
    write a table's constraints in an order that differs from one run to the next."""
    with closing(sqlite3.connect(db)) as con:
        rows = con.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
        tables = sorted((kind, name, sorted(line.strip().rstrip(",") for line in (sql or "").splitlines()))
                        for kind, name, sql in rows)
        head = list(con.execute("SELECT version_num FROM alembic_version"))
    return tables, head


def test_a_store_from_the_template_is_the_store_mlflow_makes(tmp_path, monkeypatch):
    monkeypatch.setenv("AVTUNE_CACHE_DIR", str(tmp_path / "cache"))
    own, copied = tmp_path / "own" / "mlflow.db", tmp_path / "copied" / "mlflow.db"
    own.parent.mkdir()
    copied.parent.mkdir()
    MlflowClient(f"sqlite:///{own}").search_experiments()  # MLflow's own migrations
    assert prepare_sqlite_store(f"sqlite:///{copied}") and template_file().is_file()
    client = MlflowClient(f"sqlite:///{copied}")
    default = client.get_experiment("0")
    assert default.name == "Default" and default.artifact_location == MlflowClient(f"sqlite:///{own}").get_experiment("0").artifact_location
    assert schema(copied) == schema(own)
    run = client.create_run(client.create_experiment("e"))
    client.log_metric(run.info.run_id, "acc", 0.5)
    assert client.get_run(run.info.run_id).data.metrics == {"acc": 0.5}


def test_an_existing_store_is_never_replaced_and_other_uris_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("AVTUNE_CACHE_DIR", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    uri = resolve_tracking_uri(None, runs)  # the default store under a new runs folder: made from the template
    client = MlflowClient(uri)
    experiment = client.create_experiment("kept")
    assert not prepare_sqlite_store(uri)
    assert MlflowClient(uri).get_experiment(experiment).name == "kept"
    assert not list(runs.glob(".*partial"))
    for other in ("http://127.0.0.1:5000", "sqlite://", "sqlite:///:memory:", f"sqlite:///{tmp_path}/x.db?mode=ro",
                  f"sqlite:///{tmp_path}/missing-folder/m.db"):
        assert not prepare_sqlite_store(other), other
    assert sqlite_file("sqlite:////abs/m.db") == Path("/abs/m.db") and sqlite_file("sqlite:///rel/m.db") == Path("rel/m.db")


def test_an_unusable_cache_leaves_the_store_to_mlflow(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("AVTUNE_CACHE_DIR", str(blocker))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert not prepare_sqlite_store(uri) and not (tmp_path / "m.db").exists()
    assert MlflowClient(uri).get_experiment("0").name == "Default"
