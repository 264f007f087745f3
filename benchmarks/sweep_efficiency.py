"""How much of a sweep's machine time goes into training: the demo's sweep against the same runs back to back.

    .venv/bin/python benchmarks/sweep_efficiency.py [--ungrouped] [--asha-trials 16]

1. The demo spec's sweep (experiments/demo.yaml: a G-Blend estimation stage, then 5 configurations x 5 seeds,
   2 trials at a time), run with `run_sweep` on a local Ray started as avtune starts it; its clips are generated
   first and Ray started before the clock starts (both are paid once per session, not per sweep). With
   `--ungrouped` the same sweep again with `search.group_seeds: false` (one trial per configuration and seed,
   as before issue 29), for comparison.
2. The limit: every run the sweep made (each child run's own spec.yaml, as MLflow has it), trained through the
   engine (`workers.engine.fit`, no Ray, no MLflow) in one process per core, back to back (a process pool of
   2: each process takes the next run when it is done), its clips already cached as the sweep's were.
3. An ASHA sweep of 16 short trials (normal, learning rates log-spaced over 1e-5..1e-1, 6 epochs, grace 1,
   reduction factor 2, 2 at a time) and its limit: each trial for the epochs ASHA let it run.

For each: wall time, the sum of the runs' `epoch_seconds` (training plus validation, as each run logged it),
the share of slot time spent in epochs (epoch seconds / (slots x wall), slots = trials at a time = the
machine's cores here), runs per minute, and the ratio of the limit's wall time to the sweep's (1.0 = as fast
as the limit). Prints a table and writes benchmarks/results/sweep_efficiency.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))

SLOTS = 2  # the demo's max_concurrent_trials, the machine's cores


def child_specs(client, parent_run_id: str) -> list[tuple[str, str, int]]:
    """(spec.yaml text, stage, epochs the run logged) of every child run of a sweep, all stages."""
    from orchestrator.runs import STAGE_TAG, child_runs

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in child_runs(client, parent_run_id):
            text = Path(client.download_artifacts(run.info.run_id, "spec.yaml", tmp)).read_text()
            epochs = len(client.get_metric_history(run.info.run_id, "epoch"))
            out.append((text, run.data.tags.get(STAGE_TAG, "main"), epochs))
    return out


def epoch_seconds(client, parent_run_id: str) -> tuple[float, int, int]:
    """Sum of every child run's logged `epoch_seconds`, the number of child runs and of their epochs."""
    from orchestrator.runs import child_runs

    total, runs, epochs = 0.0, 0, 0
    for run in child_runs(client, parent_run_id):
        history = client.get_metric_history(run.info.run_id, "epoch_seconds")
        total += sum(m.value for m in history)
        runs += 1
        epochs += len(history)
    return total, runs, epochs


def timed_sweep(spec) -> dict:
    from mlflow.tracking import MlflowClient

    from orchestrator.sweep import run_sweep

    started = time.perf_counter()
    result = run_sweep(spec)
    wall = time.perf_counter() - started
    client = MlflowClient(result.tracking_uri)
    seconds, runs, epochs = epoch_seconds(client, result.parent_run_id)
    return {"wall_s": wall, "epoch_s": seconds, "runs": runs, "epochs": epochs, "trials": len(result.result_grid),
            "slots": SLOTS, "epoch_share": seconds / (SLOTS * wall), "runs_per_min": runs / wall * 60,
            "specs": child_specs(client, result.parent_run_id)}


def train_in_process(spec_text: str, epochs: int) -> float:
    """One run through the engine alone, for the epochs the sweep gave it; its summed epoch_seconds."""
    import yaml

    from workers.engine import fit
    from workers.specs import ExperimentSpec

    spec = ExperimentSpec.model_validate(yaml.safe_load(spec_text))
    if epochs < spec.train.epochs:  # stopped by ASHA: the limit trains as many epochs
        spec = spec.model_copy(update={"train": spec.train.model_copy(update={"epochs": epochs})})
    history = fit(spec, report=lambda metrics, state: None)
    return sum(m["epoch_seconds"] for m in history)


def limit(specs: list[tuple[str, str, int]]) -> dict:
    """The same runs in one process per core, back to back; longest first so the two processes end together."""
    ordered = sorted(specs, key=lambda item: -item[2])
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=SLOTS, mp_context=get_context("spawn")) as pool:
        seconds = list(pool.map(train_in_process, [s for s, _, _ in ordered], [e for _, _, e in ordered]))
    wall = time.perf_counter() - started
    total = sum(seconds)
    return {"wall_s": wall, "epoch_s": total, "runs": len(specs), "slots": SLOTS,
            "epoch_share": total / (SLOTS * wall), "runs_per_min": len(specs) / wall * 60}


def asha_spec(demo, trials: int, runs_dir: str):
    from orchestrator import load_spec

    data = demo.model_dump(mode="json")
    data.update(name="asha_efficiency", method={"name": "normal"})
    data["storage"]["runs_dir"] = runs_dir
    rates = [round(10 ** (-5 + 4 * i / (trials - 1)), 8) for i in range(trials)]
    data["search"] = {"space": {"train.learning_rate": {"grid": rates}}, "scheduler": "asha", "metric": "acc",
                      "mode": "max", "asha_grace_epochs": 1, "asha_reduction_factor": 2, "max_concurrent_trials": SLOTS}
    return load_spec(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ungrouped", action="store_true", help="also the demo sweep with one trial per seed")
    parser.add_argument("--asha-trials", type=int, default=16)
    parser.add_argument("--skip-asha", action="store_true")
    args = parser.parse_args()

    import ray

    from orchestrator import load_spec
    from orchestrator.training import connect_ray, ensure_data

    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        demo = load_spec(REPO / "experiments" / "demo.yaml")
        demo = demo.model_copy(update={"storage": demo.storage.model_copy(update={"runs_dir": Path(tmp) / "runs"})})
        demo = ensure_data(demo)  # generated once, before the clock
        started = time.perf_counter()
        connect_ray()
        ray_start_s = time.perf_counter() - started
        variants = [("demo sweep, seeds side by side", True)] + ([("demo sweep, one trial per seed", False)] if args.ungrouped else [])
        for label, group in variants:
            spec = demo.model_copy(update={"name": f"demo_{'grouped' if group else 'apart'}",
                                           "search": demo.search.model_copy(update={"group_seeds": group})})
            rows[label] = timed_sweep(spec)
            print(f"{label}: {rows[label]['wall_s']:.0f} s", flush=True)
        first = rows[variants[0][0]]
        rows["demo runs, engine in 2 processes (limit)"] = limit(first["specs"])
        if not args.skip_asha:
            rows["ASHA sweep, 16 trials"] = timed_sweep(asha_spec(demo, args.asha_trials, str(Path(tmp) / "runs")))
            rows["ASHA trials, engine in 2 processes (limit)"] = limit(rows["ASHA sweep, 16 trials"]["specs"])
        ray.shutdown()

    for row in rows.values():
        row.pop("specs", None)
    demo_limit = rows["demo runs, engine in 2 processes (limit)"]["wall_s"]
    for label in rows:
        if label.startswith("demo sweep"):
            rows[label]["limit_ratio"] = demo_limit / rows[label]["wall_s"]
    if "ASHA sweep, 16 trials" in rows:
        rows["ASHA sweep, 16 trials"]["limit_ratio"] = (rows["ASHA trials, engine in 2 processes (limit)"]["wall_s"]
                                                        / rows["ASHA sweep, 16 trials"]["wall_s"])
    print(f"2 CPUs, load average {os.getloadavg()[0]:.2f}; local Ray started in {ray_start_s:.1f} s (not counted)")
    print(f"{'':<45} {'wall s':>7} {'runs':>5} {'epochs':>7} {'epoch s':>8} {'in epochs':>10} {'runs/min':>9} {'limit/wall':>11}")
    for label, row in rows.items():
        ratio = f"{row['limit_ratio']:.2f}" if "limit_ratio" in row else ""
        print(f"{label:<45} {row['wall_s']:>7.1f} {row['runs']:>5} {row.get('epochs', ''):>7} {row['epoch_s']:>8.1f} "
              f"{row['epoch_share']:>9.0%} {row['runs_per_min']:>9.1f} {ratio:>11}")
    RESULTS.mkdir(exist_ok=True)
    out = {"rows": rows, "ray_start_s": ray_start_s, "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
           "load_average": os.getloadavg()[0]}
    (RESULTS / "sweep_efficiency.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
