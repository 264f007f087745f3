"""Sweep cost on this machine: per-trial overhead (Ray Train start-up + MLflow) and 2 concurrent
trials vs the same 2 one after the other.

    .venv/bin/python benchmarks/sweep.py

Overhead of a run = wall time of `run_training` minus the time its epochs took (the loop's own
`epoch_seconds`), with Ray already started. Measured with Ray Train's default controller poll
interval (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=2.0) and with the value avtune sets (0.2): reports,
worker-group start and shutdown all wait on that poll. Each setting runs in its own process so
the controller sees it. Prints a table and writes benchmarks/results/sweep.json.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def spec_dict(runs_dir: str, epochs: int = 2) -> dict:
    return {
        "name": "bench_sweep",
        "data": {"synth": {"classes": 6, "clips_per_class": 20, "height": 48, "width": 48},
                 "decode": {"num_frames": 2, "frame_height": 48, "frame_width": 48}},
        "model": {"width": 8},
        "method": {"name": "ogm_ge", "alpha": 0.5, "modulation_ends": epochs},
        "train": {"epochs": epochs, "global_batch_size": 16, "optimizer": "adam", "learning_rate": 0.001},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "storage": {"runs_dir": runs_dir},
        "search": {"space": {"method.alpha": {"grid": [0.1, 0.8]}}, "max_concurrent_trials": 2},
    }


def measure(runs_dir: str) -> dict:
    """Runs inside a child process: overhead of single runs, then the two sweeps."""
    import ray

    from orchestrator import load_spec
    from orchestrator.sweep import run_sweep
    from orchestrator.training import connect_ray, ensure_data, run_training

    spec = ensure_data(load_spec(spec_dict(runs_dir)))
    connect_ray()
    overheads = []
    for _ in range(3):
        start = time.perf_counter()
        result = run_training(spec.model_copy(update={"search": None}))
        wall = time.perf_counter() - start
        overheads.append(wall - float(result.history["epoch_seconds"].sum()))
    sweeps = {}
    for concurrent in (2, 1):
        start = time.perf_counter()
        run_sweep(spec, max_concurrent=concurrent)
        sweeps[concurrent] = time.perf_counter() - start
    ray.shutdown()
    return {"overhead_s": overheads, "sweep_2_concurrent_s": sweeps[2], "sweep_sequential_s": sweeps[1]}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print("RESULT " + json.dumps(measure(sys.argv[2])))
        return
    results = {}
    for label, interval in (("ray_default", "2.0"), ("avtune", "0.2")):
        env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": interval, "PYTHONPATH": str(ROOT)}
        with tempfile.TemporaryDirectory() as runs:
            out = subprocess.run([sys.executable, __file__, "--child", runs], env=env, capture_output=True, text=True)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"benchmark child failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        results[label] = {"health_check_interval_s": float(interval), **json.loads(line[7:])}
    print(f"{'setting':14s} {'poll s':>7s} {'overhead/run s (median of 3)':>30s} {'2 concurrent s':>15s} {'sequential s':>13s} {'speed-up':>9s}")
    for label, r in results.items():
        med = sorted(r["overhead_s"])[1]
        r["overhead_median_s"] = med
        r["concurrency_speedup"] = r["sweep_sequential_s"] / r["sweep_2_concurrent_s"]
        print(f"{label:14s} {r['health_check_interval_s']:7.1f} {med:30.1f} {r['sweep_2_concurrent_s']:15.1f} "
              f"{r['sweep_sequential_s']:13.1f} {r['concurrency_speedup']:9.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sweep.json").write_text(json.dumps({"machine": "2 CPU cores, no GPU", "results": results}, indent=2))
    print(f"wrote {RESULTS / 'sweep.json'}")


if __name__ == "__main__":
    main()
