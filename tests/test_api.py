"""`import avtune`: the programmatic API. Light to import, explicit and documented, and usable from a plain
script with no `if __name__ == "__main__":` guard (nothing it calls starts a process that re-imports the
caller's main module), on real Ray, real MLflow (SQLite) and real PyAV-encoded clips."""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from conftest import sqlite_store

REPO = Path(__file__).resolve().parents[1]
API = ("load_spec", "run_training", "run_sweep", "results", "build_report")


def script_env() -> dict[str, str]:
    """The environment of a user's script: no tracking server or Ray cluster named from outside."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_script(path: Path, source: str, *args: str, timeout: float,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Write `source` to `path` and run it as a script with the repo's venv python, from `path`'s folder
    (so `avtune` comes from the installed package, not from the working directory)."""
    path.write_text(textwrap.dedent(source))
    return subprocess.run([sys.executable, str(path), *args], cwd=path.parent, env={**script_env(), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def test_import_avtune_is_light(tmp_path: Path) -> None:
    """`import avtune` (from the installed package) loads neither torch, Ray, MLflow nor pandas."""
    code = ("import avtune, json, sys; print(json.dumps({'file': avtune.__file__, "
            "'heavy': [m for m in ('torch', 'ray', 'mlflow', 'pandas', 'av') if m in sys.modules]}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=script_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert found["heavy"] == [], found
    assert Path(found["file"]) == REPO / "avtune" / "__init__.py"


def test_api_names_are_documented_and_explicit() -> None:
    """Every API name has a docstring naming its arguments, annotated parameters and return, no *args /
    **kwargs; the wrappers take the same parameters as the orchestrator functions they call."""
    import avtune
    from orchestrator import report, specs, sweep, training

    assert sorted(avtune.__all__) == sorted(API)
    for name in API:
        function = getattr(avtune, name)
        doc = inspect.getdoc(function) or ""
        signature = inspect.signature(function)
        assert len(doc) > 200 and "Returns:" in doc, name
        assert signature.return_annotation is not inspect.Signature.empty, name
        for parameter in signature.parameters.values():
            assert parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD), (name, parameter)
            assert parameter.annotation is not inspect.Parameter.empty, (name, parameter)
            assert parameter.name in doc, (name, parameter.name)
    for wrapper, implementation in ((avtune.load_spec, specs.load_spec), (avtune.run_training, training.run_training),
                                    (avtune.run_sweep, sweep.run_sweep)):
        assert list(inspect.signature(wrapper).parameters) == list(inspect.signature(implementation).parameters)
    assert set(inspect.signature(report.build_report).parameters) <= set(inspect.signature(avtune.build_report).parameters)


def test_synthesis_from_a_script_without_main_guard(tmp_path: Path) -> None:
    """A guard-less script generates clips on 2 encoding workers (no process is spawned to re-run it: the
    script would print its banner twice, or fail with BrokenProcessPool); the clips are byte-identical
    to a serial run's."""
    source = """
        import hashlib, json, sys
        from pathlib import Path
        from orchestrator.synth import synthesize_dataset

        print("script started", flush=True)
        digests = {}
        for workers in (1, 2):
            root = Path(sys.argv[1]) / f"w{workers}"
            synthesize_dataset(root, classes=2, clips_per_class=6, clip_seconds=0.5, fps=4, height=16, width=16,
                               num_workers=workers)
            digest = hashlib.sha256()
            for path in sorted(root.rglob("*.mp4")):
                digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
            digests[workers] = digest.hexdigest()
        print(json.dumps(digests))
        """
    out = run_script(tmp_path / "synth_script.py", source, str(tmp_path), timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("script started") == 1, out.stdout
    digests = json.loads(out.stdout.strip().splitlines()[-1])
    assert digests["1"] == digests["2"]
    assert len(list((tmp_path / "w2").rglob("*.mp4"))) == 12


# A user's script as written, with no main guard: generated data (64 clips: enough for the generator to
# use 2 encoding workers where 2 CPUs are there) into a fresh folder, then a training.
USER_SCRIPT = """
    import json, sys
    from pathlib import Path

    import avtune

    print("script started", flush=True)
    tmp = Path(sys.argv[1])
    data = {
        "name": "api",
        "data": {"source": "generated", "root": str(tmp / "data"), "cache_dir": str(tmp / "cache"),
                 "synth": {"classes": 2, "clips_per_class": 8, "clip_seconds": 0.5, "fps": 4, "height": 32, "width": 32},
                 "decode": {"num_frames": 2, "frame_height": 32, "frame_width": 32, "clip_seconds": 0.5}},
        "model": {"width": 8},
        "train": {"epochs": 1, "global_batch_size": 4, "optimizer": "adam", "learning_rate": 0.001, "max_failures": 0},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "storage": {"runs_dir": str(tmp / "runs")},
    }
    result = avtune.run_training(avtune.load_spec(data))
    print("RESULT " + json.dumps({"run_id": result.run_id, "acc": result.metrics["acc"], "epochs": len(result.history)}))
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_script_without_main_guard_generates_and_trains(tmp_path: Path, ray_address: str) -> None:
    """A plain script (no main guard) generates clips and calls avtune.run_training (on the session's Ray,
    named by RAY_ADDRESS as a user names a cluster); the run is FINISHED in MLflow with the numbers the call
    returned. Several trainings and sweeps in one process: this test session itself, which runs many."""
    out = run_script(tmp_path / "user_script.py", USER_SCRIPT, str(tmp_path), timeout=540,
                     env={"RAY_ADDRESS": ray_address})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert out.stdout.count("script started") == 1, out.stdout[-4000:]
    found = json.loads(out.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert len(list((tmp_path / "data").rglob("*.mp4"))) == 16 and (tmp_path / "data" / "card.json").is_file()
    run = MlflowClient(sqlite_store(tmp_path / "runs" / "mlflow.db")).get_run(found["run_id"])
    assert run.info.status == "FINISHED" and found["epochs"] == 1
    assert run.data.metrics["acc"] == pytest.approx(found["acc"])


def test_results_read_back_the_sweep_run_sweep_returned(shared_sweep, session_mlflow_server) -> None:
    """avtune.results, latest and by parent run id, is the trials table run_sweep returned (the session's
    shared sweep, on a real `mlflow server`)."""
    import avtune
    from conftest import SHARED_SWEEP
    from orchestrator.runs import TRIAL_COLUMNS

    result, _ = shared_sweep
    latest = avtune.results(SHARED_SWEEP, tracking_uri=session_mlflow_server.uri)
    by_id = avtune.results(SHARED_SWEEP, result.parent_run_id, tracking_uri=session_mlflow_server.uri)
    assert set(TRIAL_COLUMNS) <= set(latest.columns) and len(latest) == len(result.trials) > 0
    pd.testing.assert_frame_equal(latest.reset_index(drop=True), result.trials.reset_index(drop=True))
    pd.testing.assert_frame_equal(by_id.reset_index(drop=True), result.trials.reset_index(drop=True))
    worst_first = avtune.results(SHARED_SWEEP, tracking_uri=session_mlflow_server.uri, mode="min")
    assert worst_first["acc"].dropna().is_monotonic_increasing and set(worst_first["run_id"]) == set(result.trials["run_id"])


def test_results_and_report_name_a_missing_sweep(tmp_path: Path) -> None:
    """avtune.results / avtune.build_report on a store without the experiment, or without a sweep in it,
    raise ValueError naming what is missing (the CLI's messages)."""
    import avtune

    runs = tmp_path / "runs"
    with pytest.raises(ValueError, match="experiment 'nothing' not found"):
        avtune.results("nothing", runs_dir=runs)
    MlflowClient(sqlite_store(runs / "mlflow.db")).create_experiment("empty")
    with pytest.raises(ValueError, match="experiment 'empty' has no sweep"):
        avtune.results("empty", runs_dir=runs)
    with pytest.raises(ValueError, match="experiment 'empty' has no sweep"):
        avtune.build_report("empty", runs_dir=runs)
    with pytest.raises(ValueError, match="mode"):
        avtune.results("empty", runs_dir=runs, mode="best")
