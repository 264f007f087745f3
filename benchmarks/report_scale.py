"""`avtune results` and `avtune report` on sweeps of 50, 200 and 1,000 runs cloned from a real sweep's runs.

    nice -n 19 .venv/bin/python benchmarks/report_scale.py [--sizes 50 200 1000]

The source: the latest sweep of benchmarks/report_scale_source.yaml (the demo's five configurations, normal,
OGM-GE, G-Blend with its estimation stage, audio-only and visual-only, on 2 seeds and 3 epochs), read from
runs/report_scale_source/mlflow.db; when absent it is trained first (`avtune sweep`, a few minutes on 2 cores).

A sweep of N runs: a new SQLite store with the source's parent run (tags, params, metrics, artifacts) and its
estimation-stage children once, then N/5 seeds of each of the five configurations. Seed k of a configuration is
a clone of the source run of that configuration with seed k mod 2: its params (train.seed set to k), tags (the
new parent, a new trial id), every metric's full history and every artifact file (predictions.csv,
probabilities.npz, ...), as logged. Same-seed baselines exist for every seed, as in a real sweep.

Timed, each command in a fresh process (peak RSS of that process from wait4): `avtune results` twice, then
`avtune report` twice (the first writes utilisation into every joint run and the report onto the parent, the
second finds them logged). Start-up: `avtune report` of an experiment the store lacks (imports, opening the
store, no run read). Writes benchmarks/results/report_scale.json and prints a
table (also in report_scale.md).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SOURCE_SPEC = ROOT / "benchmarks" / "report_scale_source.yaml"
SOURCE_DIR = ROOT / "runs" / "report_scale_source"
WORK_DIR = ROOT / "runs" / "report_scale"
AVTUNE = [sys.executable, "-m", "orchestrator.cli"]
TARGETS = {"report_1000_s": 20.0, "results_1000_s": 10.0, "results_1000_peak_rss_mib": 300.0, "report_ratio_1000_200": 5.5}


def source_sweep():
    """(client, parent run, main-stage children, other children) of the latest source sweep; trained when absent."""
    from mlflow.tracking import MlflowClient

    from orchestrator.report import resolve_sweep
    from orchestrator.runs import MAIN_STAGE, STAGE_TAG, child_runs

    uri = f"sqlite:///{SOURCE_DIR / 'mlflow.db'}"
    if not (SOURCE_DIR / "mlflow.db").exists():
        print("training the source sweep (benchmarks/report_scale_source.yaml) ...", flush=True)
        subprocess.run([*AVTUNE, "sweep", str(SOURCE_SPEC), "--set", f"storage.runs_dir={SOURCE_DIR}"], cwd=ROOT,
                       check=True)
    client = MlflowClient(uri)
    parent = client.get_run(resolve_sweep(client, "report_scale_source"))
    children = child_runs(client, parent.info.run_id)
    main = [r for r in children if r.data.tags.get(STAGE_TAG, MAIN_STAGE) == MAIN_STAGE]
    return client, parent, main, [r for r in children if r not in main]


def _local(artifact_uri: str) -> Path:
    return Path(unquote(urlparse(artifact_uri).path))


def clone_run(src_client, run, client, experiment_id: str, tags: dict, params: dict, name: str) -> str:
    """A new run in `experiment_id` with `run`'s metric histories and artifact files, and `tags` / `params`."""
    from mlflow.entities import Metric, Param, RunStatus, RunTag

    tags = {**tags, "mlflow.runName": name}
    new = client.create_run(experiment_id, start_time=run.info.start_time, tags=tags, run_name=name)
    run_id = new.info.run_id
    metrics = [Metric(m.key, m.value, m.timestamp, m.step) for key in run.data.metrics
               for m in src_client.get_metric_history(run.info.run_id, key)]
    params = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(params), 100):  # MLflow's batch limits: 100 params, 1000 metrics
        client.log_batch(run_id, params=params[i : i + 100])
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    source = _local(run.info.artifact_uri)
    if source.is_dir():
        shutil.copytree(source, _local(new.info.artifact_uri), dirs_exist_ok=True)
    client.set_terminated(run_id, run.info.status, end_time=run.info.end_time)
    return run_id


def build_sweep(size: int, src) -> str:
    """A store under runs/report_scale/<size> holding a sweep of `size` main-stage runs; returns its URI."""
    from mlflow.tracking import MlflowClient

    from orchestrator.runs import PARENT_TAG, SEED_PARAM, TRIAL_TAG

    src_client, parent, main, others = src
    folder = WORK_DIR / str(size)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(f"scale{size}", artifact_location=(folder / "mlartifacts").as_uri())
    parent_id = clone_run(src_client, parent, client, experiment_id, dict(parent.data.tags), dict(parent.data.params),
                          parent.info.run_name)
    child_tags = lambda run, trial: {**run.data.tags, PARENT_TAG: parent_id, TRIAL_TAG: trial}
    for run in others:
        clone_run(src_client, run, client, experiment_id, child_tags(run, run.data.tags.get(TRIAL_TAG, "")),
                  dict(run.data.params), run.info.run_name)
    configs: dict[str, dict[str, object]] = {}
    for run in main:
        config = {k: v for k, v in run.data.params.items() if k != SEED_PARAM}
        configs.setdefault(json.dumps(config, sort_keys=True), {})[run.data.params[SEED_PARAM]] = run
    for k in range(size // len(configs)):
        for c, by_seed in enumerate(configs.values()):
            seeds = sorted(by_seed)
            run = by_seed[seeds[k % len(seeds)]]
            params = {**run.data.params, SEED_PARAM: str(k)}
            name = f"{run.info.run_name.rsplit('_s', 1)[0]}_s{k}"
            clone_run(src_client, run, client, experiment_id, child_tags(run, f"clone_{c}_{k}"), params, name)
    return uri


def measure(command: list[str], exit_code: int = 0) -> dict[str, float]:
    """Wall seconds and peak RSS (MiB) of `command` in a fresh process (stdout discarded), which must end with
    `exit_code`."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != exit_code:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr.read().decode()[-3000:]}")
    return {"s": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def time_size(size: int, uri: str) -> dict:
    experiment = f"scale{size}"
    results = [measure([*AVTUNE, "results", experiment, "--tracking-uri", uri]) for _ in range(2)]
    out = str(WORK_DIR / str(size) / "report")
    reports = [measure([*AVTUNE, "report", experiment, "--tracking-uri", uri, "--out", out]) for _ in range(2)]
    return {"runs": size, "results": results, "report_first": reports[0], "report_second": reports[1],
            "results_s": statistics.median(r["s"] for r in results),
            "results_peak_rss_mib": max(r["peak_rss_mib"] for r in results)}


def table(rows: list[dict], startup: float) -> str:
    lines = ["| runs | avtune results (s) | peak RSS (MiB) | avtune report, first (s) | peak RSS (MiB) | report, second (s) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['runs']} | {r['results_s']:.1f} | {r['results_peak_rss_mib']:.0f} | {r['report_first']['s']:.1f} "
                     f"| {r['report_first']['peak_rss_mib']:.0f} | {r['report_second']['s']:.1f} |")
    lines.append(f"\nstart-up (`avtune report` of a missing experiment: imports, opening the store): {startup:.1f} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 200, 1000])
    args = parser.parse_args()
    load_before = os.getloadavg()
    src = source_sweep()
    rows, build_s = [], {}
    startup = None
    for size in args.sizes:
        started = time.perf_counter()
        uri = build_sweep(size, src)
        build_s[size] = round(time.perf_counter() - started, 1)
        if startup is None:  # imports and opening the store: `avtune report` of an experiment that is not there
            startup = statistics.median(measure([*AVTUNE, "report", "nosuch", "--tracking-uri", uri], exit_code=2)["s"]
                                        for _ in range(3))
        print(f"built {size} runs in {build_s[size]} s; timing ...", flush=True)
        rows.append(time_size(size, uri))
        print(table(rows, startup), flush=True)
    by = {r["runs"]: r for r in rows}
    figures = {"startup_s": startup}
    if 1000 in by:
        figures.update(report_1000_s=by[1000]["report_first"]["s"], results_1000_s=by[1000]["results_s"],
                       results_1000_peak_rss_mib=by[1000]["results_peak_rss_mib"])
    if 1000 in by and 200 in by:
        first = lambda n: by[n]["report_first"]["s"]
        figures["report_ratio_1000_200"] = round(first(1000) / first(200), 2)
        figures["report_ratio_1000_200_less_startup"] = round((first(1000) - startup) / (first(200) - startup), 2)
    met = {k: figures[k] <= v for k, v in TARGETS.items() if k in figures}
    if "report_ratio_1000_200_less_startup" in figures:
        met["report_ratio_1000_200_less_startup"] = figures["report_ratio_1000_200_less_startup"] <= TARGETS["report_ratio_1000_200"]
    text = table(rows, startup)
    record = {"machine": f"{os.cpu_count()} CPU cores, no GPU", "nice": os.nice(0),
              "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in os.getloadavg()],
              "date": time.strftime("%Y-%m-%d %H:%M"), "source": str(SOURCE_SPEC.relative_to(ROOT)),
              "build_s": build_s, "sizes": rows, "figures": figures, "targets": TARGETS, "targets_met": met, "table": text}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "report_scale.json").write_text(json.dumps(record, indent=2))
    (RESULTS / "report_scale.md").write_text(text + "\n")
    print(json.dumps({"figures": figures, "targets_met": met, "load_average": record["load_average_after"]}, indent=2))
    print(f"wrote {RESULTS / 'report_scale.json'}")


if __name__ == "__main__":
    main()
