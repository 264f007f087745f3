"""A new local SQLite tracking store, copied from one MLflow migrated once per MLflow version.

MLflow makes a new SQLite store by running every schema migration it has (alembic, ~100 revisions):
measured 5 to 11 s on this 2-core machine for each new `mlflow.db`, paid whenever a runs folder is new
(a fresh clone's `make demo`, a new `--runs-dir`, each temporary folder of the test suite). For one MLflow
version the result is always the same schema, so avtune lets MLflow build it once into the user's
cache (`~/.cache/avtune`, or `$AVTUNE_CACHE_DIR`) and copies it. The template holds that schema and
MLflow's own rows less its Default experiment, whose artifact location depends on where the store is
opened: MLflow adds that experiment itself when it first opens the copy, as for a store it made.
Nothing here is needed for correctness: on any problem MLflow makes the store as it always does.
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from contextlib import closing
from pathlib import Path

SQLITE_PREFIX = "sqlite:///"


def cache_dir() -> Path:
    configured = os.environ.get("AVTUNE_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "avtune"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///relative` or `sqlite:////absolute` URI; None for anything else
    (a server, an in-memory database, a URI with query options)."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    rest = uri[len(SQLITE_PREFIX):]
    if not rest or "?" in rest or rest == ":memory:":
        return None
    return Path(rest)


def template_file() -> Path:
    import mlflow

    return cache_dir() / f"mlflow-{mlflow.__version__}-empty-store.db"


def build_template(path: Path) -> None:
    """MLflow's own store initialisation into a temporary file, its Default experiment removed, then moved
    into place atomically (two processes building it at once each move a complete file)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        db = Path(tmp) / "store.db"
        store = SqlAlchemyStore(f"{SQLITE_PREFIX}{db}", Path(tmp).as_uri())
        store.engine.dispose()
        with closing(sqlite3.connect(db)) as con:
            default = str(SqlAlchemyStore.DEFAULT_EXPERIMENT_ID)
            con.execute("DELETE FROM experiment_tags WHERE experiment_id = ?", (default,))
            con.execute("DELETE FROM experiments WHERE experiment_id = ?", (default,))
            con.commit()
        os.replace(db, path)


def prepare_sqlite_store(uri: str) -> bool:
    """Before MLflow first opens a new SQLite store at `uri`, put the migrated empty store there. Returns
    whether it did; never replaces a file that exists (a store another process has just made included)."""
    path = sqlite_file(uri)
    if path is None or path.exists() or not path.parent.is_dir():
        return False
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        template = template_file()
        if not template.is_file():
            build_template(template)
        shutil.copyfile(template, partial)
        os.link(partial, path)  # fails if the store appeared meanwhile: that one is kept
        return True
    except Exception:  # noqa: BLE001 - an optimisation only: MLflow then makes the store itself
        return False
    finally:
        partial.unlink(missing_ok=True)
