"""Where a Ray Train run's start-up goes: the wall time of `run_training` on a tiny spec, split at the
points Ray Train itself marks, with the local Ray already started.

    .venv/bin/python benchmarks/startup.py [--runs 3]

Phases of one run (median over runs; clock: time.time() on this one machine):
  controller   `TorchTrainer.fit()` called -> the Train controller actor has started
  worker_group controller started -> the worker group (actors, torch.distributed setup) has started
  to_first_step worker group started -> the first training step (inside the worker: importing the
               training code, building datasets, model and optimiser; the engine's `epoch 0` begins)
  epochs       the training itself (the engine's epoch_seconds)
  finish       last report -> `run_training` returns (controller shutdown, final artifacts, MLflow)
Also, in a fresh process: the import time of what a Train worker imports for avtune
(`workers.train_loop`) and of the model code (`models`).
Prints a table and writes benchmarks/results/startup.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def import_seconds(statement: str, after: str = "") -> float:
    """Wall time of `statement` in a fresh interpreter that has already run `after` (median of 3)."""
    code = f"{after}\nimport time\nt = time.perf_counter()\n{statement}\nprint(time.perf_counter() - t)"
    runs = [float(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.strip()) for _ in range(3)]
    return statistics.median(runs)


def marks_callbacks(marks_file: str):
    """Ray Train callbacks (internal in Ray 2.60, as in orchestrator/sweep.py) that append
    `name time` lines to a file when the controller and the worker group have started."""
    from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

    def mark(name: str) -> None:
        with open(marks_file, "a") as f:
            f.write(f"{name} {time.time()}\n")

    class Marks(ControllerCallback, WorkerGroupCallback):
        def after_controller_start(self, train_run_context) -> None:
            mark("controller")

        def after_worker_group_start(self, worker_group) -> None:
            mark("worker_group")

    return Marks()


def one_run(spec, marks_file: str) -> dict[str, float]:
    import orchestrator.training as training

    build_trainer = training.build_trainer

    def with_marks(spec, name, callbacks):
        return build_trainer(spec, name, [*callbacks, marks_callbacks(marks_file)])

    Path(marks_file).write_text("")
    training.build_trainer = with_marks
    try:
        called = time.time()
        result = training.run_training(spec)
        returned = time.time()
    finally:
        training.build_trainer = build_trainer
    marks = dict(line.split() for line in Path(marks_file).read_text().splitlines())
    controller, group = float(marks["controller"]), float(marks["worker_group"])
    history = result.history
    # The engine reports each epoch when it ends: the first step began epoch_seconds before that report.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(result.tracking_uri)
    epoch_marks = sorted((m.step, m.timestamp / 1000) for m in client.get_metric_history(result.run_id, "epoch"))
    first_report, last_report = epoch_marks[0][1], epoch_marks[-1][1]
    first_step = first_report - float(history["epoch_seconds"].iloc[0])
    return {
        "total": returned - called,
        "controller": controller - called,
        "worker_group": group - controller,
        "to_first_step": first_step - group,
        "epochs": float(history["epoch_seconds"].sum()),
        "finish": returned - last_report,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    from orchestrator import load_spec
    from orchestrator.training import connect_ray, ensure_data

    runs_dir = tempfile.mkdtemp(prefix="avtune-startup-")
    spec = ensure_data(load_spec({
        "name": "bench_startup",
        "data": {"synth": {"classes": 3, "clips_per_class": 8, "height": 32, "width": 32},
                 "decode": {"num_frames": 2, "frame_height": 32, "frame_width": 32}},
        "model": {"width": 8},
        "train": {"epochs": 1, "global_batch_size": 8},
        "storage": {"runs_dir": runs_dir},
    }))
    connect_ray()
    one_run(spec, os.path.join(runs_dir, "marks.txt"))  # warm-up: decode cache, first actor pool
    phases = [one_run(spec, os.path.join(runs_dir, "marks.txt")) for _ in range(args.runs)]
    median = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
    import ray

    ray.shutdown()
    imports = {
        "workers.train_loop": import_seconds("import workers.train_loop"),
        "models, after torch": import_seconds("import models", after="import torch"),
    }
    print(f"{'phase':16s} {'seconds (median of ' + str(args.runs) + ')':>24s}")
    for key, value in median.items():
        print(f"{key:16s} {value:24.2f}")
    for key, value in imports.items():
        print(f"import {key:30s} {value:8.2f} s (fresh process)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "startup.json").write_text(json.dumps(
        {"machine": "2 CPU cores, no GPU", "runs": phases, "median_s": median, "import_s": imports}, indent=2))
    print(f"wrote {RESULTS / 'startup.json'}")


if __name__ == "__main__":
    main()
