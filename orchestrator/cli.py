"""`avtune` command line: thin over the Python API (heavy imports happen inside commands)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="avtune: balanced audio-visual learning experiments on Ray, tracked in MLflow.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
console = Console(width=None if sys.stdout.isatty() else 150)

try:  # the data sub-app lives beside this file
    from orchestrator.cli_data import data_app

    app.add_typer(data_app, name="data", help="Generate and inspect audio-visual clip datasets.")
except ImportError:  # pragma: no cover - during development only
    pass

# Options shared by train / sweep / submit, declared once.
SpecArg = Annotated[Path, typer.Argument(help="experiment spec (YAML)")]
SetOpt = Annotated[Optional[List[str]], typer.Option("--set", help="override a field, e.g. --set model.fusion=film")]
AddressOpt = Annotated[Optional[str], typer.Option(help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")]

METRIC_COLUMNS = ("acc", "acc_audio", "acc_visual", "loss", "k_audio", "k_visual")


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


def _load(spec_path: Path, overrides: list[str]):
    from orchestrator.specs import SpecError, load_spec

    try:
        return load_spec(spec_path, overrides)
    except SpecError as err:
        _fail(str(err))


@app.command()
def train(
    spec: SpecArg,
    set_: SetOpt = None,
    address: AddressOpt = None,
    resume: Optional[str] = typer.Option(None, help="MLflow run id of an interrupted run to continue"),
) -> None:
    """Train one spec under Ray Train; per-epoch acc / acc_audio / acc_visual go to MLflow."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from orchestrator.training import run_training

    exp = _load(spec, set_ or [])
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task(f"{exp.name} {exp.method.name}", total=exp.train.epochs, status="starting Ray")

        def on_epoch(m: dict[str, float]) -> None:
            status = " ".join(f"{k}={m[k]:.3f}" for k in ("acc", "acc_audio", "acc_visual") if k in m)
            progress.update(task, completed=int(m["epoch"]) + 1, status=status)

        try:
            result = run_training(exp, address=address, on_epoch=on_epoch, resume_run_id=resume)
        except Exception as err:  # noqa: BLE001
            _fail(f"training failed: {err}")
    table = Table(title=f"{exp.name}: run {result.run_id}")
    table.add_column("epoch", justify="right")
    cols = [c for c in METRIC_COLUMNS if c in result.history.columns]
    for c in cols:
        table.add_column(c, justify="right")
    for epoch, row in result.history.iterrows():
        table.add_row(str(epoch), *(f"{row[c]:.3f}" for c in cols))
    console.print(table)
    tests = {k: v for k, v in result.metrics.items() if k.startswith("test_acc")}
    if tests:
        console.print("held-out test (best-val model): " + ", ".join(f"{k}={v:.3f}" for k, v in tests.items()))
    console.print(f"MLflow: {_redact(result.tracking_uri)}  run {result.run_id}")
    console.print(f"checkpoint: {result.checkpoint_path}")


def _redact(uri: str) -> str:
    from orchestrator.tracking import redact_uri

    return redact_uri(uri)


def print_trials(frame, title: str) -> None:
    table = Table(title=title)
    cols = ["run_name", "status", "method", "alpha", "window", "fusion", "acc", "acc_audio", "acc_visual", "gap_av"]
    for c in cols:
        table.add_column(c, justify="right" if c not in ("run_name", "status", "method", "fusion") else "left")
    for _, row in frame.iterrows():
        cells = []
        for c in cols:
            v = row.get(c)
            if v is None or (isinstance(v, float) and v != v):
                cells.append("")
            elif isinstance(v, float):
                cells.append(f"{v:.3f}" if c != "alpha" else f"{v:g}")
            else:
                cells.append(str(v))
        table.add_row(*cells)
    console.print(table)


@app.command()
def sweep(
    spec: SpecArg,
    set_: SetOpt = None,
    address: AddressOpt = None,
    max_concurrent: Optional[int] = typer.Option(None, help="trials at once (default: search.max_concurrent_trials)"),
    resume: bool = typer.Option(False, "--resume", help="continue this spec's interrupted sweep (same parent run)"),
    resume_run: Optional[str] = typer.Option(None, "--resume-run", help="continue the sweep with this parent run id"),
) -> None:
    """Run a Ray Tune sweep: one MLflow parent run, a child run per trial."""
    from orchestrator.sweep import run_sweep

    exp = _load(spec, set_ or [])
    if exp.search is None:
        _fail(f"{spec}: no search section; use `avtune train` for a single run")
    console.print(f"sweep [bold]{exp.name}[/]: starting Ray and the trials ...")
    try:
        result = run_sweep(exp, address=address, max_concurrent=max_concurrent, resume=resume_run or resume)
    except Exception as err:  # noqa: BLE001
        _fail(f"sweep failed: {err}")
    if result.gblend_weights:
        console.print("G-Blend weights: " + ", ".join(f"{k}={v:.3f}" for k, v in result.gblend_weights.items()))
    print_trials(result.trials, f"{exp.name}: parent run {result.parent_run_id}")
    console.print(f"MLflow: {_redact(result.tracking_uri)}; open the UI with: avtune ui --runs-dir {exp.storage.runs_dir}")


@app.command()
def results(
    experiment: str = typer.Argument(..., help="MLflow experiment name"),
    sweep_id: Optional[str] = typer.Option(None, "--sweep", help="parent run id (default: the latest sweep)"),
    tracking_uri: Optional[str] = typer.Option(None, help="default: MLFLOW_TRACKING_URI, else sqlite under --runs-dir"),
    runs_dir: Path = typer.Option(Path("runs"), help="local runs folder (for the default SQLite store)"),
    metric: str = typer.Option("acc"),
) -> None:
    """Print a sweep's trials table (method, alpha, window, fusion, accuracies, gap), sorted by the metric."""
    from mlflow.tracking import MlflowClient

    from orchestrator.report import resolve_sweep
    from orchestrator.sweep import trials_frame
    from orchestrator.tracking import resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri(tracking_uri, runs_dir))
    try:
        sweep_id = resolve_sweep(client, experiment, sweep_id)
    except ValueError as err:
        _fail(str(err))
    print_trials(trials_frame(client, sweep_id, metric), f"{experiment}: sweep {sweep_id}")
    print_configurations(client, sweep_id)


def print_configurations(client, sweep_id: str) -> None:
    """Per configuration: mean [95% interval] over seeds and the paired difference from normal."""
    from orchestrator.report import config_summary, imbalance_summary, load_sweep
    from orchestrator.report.comparisons import format_interval
    from orchestrator.report.html import READING_INTERVALS

    sweep = load_sweep(client, sweep_id)
    summary = config_summary(imbalance_summary(sweep)[0], sweep.predictions)
    if summary.empty:
        return
    table = Table(title="configurations: mean [95% interval] over seeds; paired difference from normal")
    keys = ("acc", "acc_audio", "acc_visual")
    for c in ("config", "n", *keys, *(f"{k} vs normal" for k in keys)):
        table.add_column(c, justify="left" if c == "config" else "right")
    for _, r in summary.iterrows():
        cells = [str(r["config"]), str(int(r["n"]))]
        cells += [format_interval(r[k], r[f"{k}_low"], r[f"{k}_high"]) for k in keys]
        for k in keys:
            d = r.get(f"d_{k}")
            cells.append("" if d is None or d != d else
                         f"{d:+.3f} [{r[f'd_{k}_low']:+.3f}, {r[f'd_{k}_high']:+.3f}] p={r[f'p_{k}']:.2g} {r[f'vs_normal_{k}']}")
        table.add_row(*cells)
    console.print(table)
    console.print(READING_INTERVALS, markup=False)


@app.command()
def submit(
    spec: SpecArg,
    address: str = typer.Option(..., help="Ray Jobs address, e.g. http://HOST:8265"),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI the job logs to"),
    set_: SetOpt = None,
    train_only: bool = typer.Option(False, "--train", help="run `avtune train` instead of `avtune sweep`"),
    token_file: Optional[Path] = typer.Option(None, help="Ray auth token file (default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)"),
    allow_insecure_http: bool = typer.Option(False, "--allow-insecure-http",
                                             help="send the token over plain http to a non-loopback host"),
) -> None:
    """Submit a spec to a Ray cluster with Ray Jobs (token auth on)."""
    from orchestrator.jobs import SubmitError, submit_spec
    from orchestrator.specs import SpecError

    exp = _load(spec, set_ or [])
    command = "train" if train_only or exp.search is None else "sweep"
    try:
        job_id = submit_spec(exp, address, tracking_uri=tracking_uri, command=command, token_file=token_file,
                             allow_insecure_http=allow_insecure_http)
    except (SubmitError, SpecError) as err:
        _fail(str(err))
    console.print(f"submitted [bold]{job_id}[/] ({command} {exp.name}) to {address}")
    console.print(f"follow it: avtune jobs logs {job_id} --address {address}")


jobs_app = typer.Typer(help="List, inspect and stop submitted Ray jobs.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


def _jobs_client(address: str, token_file: Optional[Path]):
    from orchestrator.jobs import SubmitError, job_client

    try:
        return job_client(address, token_file)
    except SubmitError as err:
        _fail(str(err))


@jobs_app.command("list")
def jobs_list(address: str = typer.Option(...), token_file: Optional[Path] = typer.Option(None)) -> None:
    """List the cluster's jobs."""
    table = Table(title=f"jobs on {address}")
    for c in ("job", "status", "entrypoint"):
        table.add_column(c)
    for job in _jobs_client(address, token_file).list_jobs():
        table.add_row(job.submission_id or job.job_id or "", str(job.status), job.entrypoint)
    console.print(table)


@jobs_app.command("status")
def jobs_status(job_id: str, address: str = typer.Option(...), token_file: Optional[Path] = typer.Option(None)) -> None:
    """Print a job's status."""
    console.print(str(_jobs_client(address, token_file).get_job_status(job_id)))


@jobs_app.command("logs")
def jobs_logs(job_id: str, address: str = typer.Option(...), token_file: Optional[Path] = typer.Option(None)) -> None:
    """Print a job's logs."""
    console.print(_jobs_client(address, token_file).get_job_logs(job_id), markup=False, highlight=False)


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: str = typer.Option(...), token_file: Optional[Path] = typer.Option(None)) -> None:
    """Stop a running job."""
    stopped = _jobs_client(address, token_file).stop_job(job_id)
    console.print("stopped" if stopped else "not running")


@app.command()
def runs(
    experiment: str = typer.Argument(..., help="MLflow experiment name"),
    tracking_uri: Optional[str] = typer.Option(None, help="default: MLFLOW_TRACKING_URI, else sqlite under --runs-dir"),
    runs_dir: Path = typer.Option(Path("runs"), help="local runs folder (for the default SQLite store)"),
) -> None:
    """Print the runs of an experiment with their final metrics, from MLflow."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri(tracking_uri, runs_dir))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        _fail(f"experiment {experiment!r} not found")
    table = Table(title=experiment)
    for c in ("run", "name", "status", "method", *METRIC_COLUMNS):
        table.add_column(c)
    for run in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"]):
        m = run.data.metrics
        table.add_row(run.info.run_id[:12], run.info.run_name or "", run.info.status,
                      run.data.tags.get("avtune.method", ""),
                      *(f"{m[c]:.3f}" if c in m else "" for c in METRIC_COLUMNS))
    console.print(table)


@app.command()
def ui(
    runs_dir: Path = typer.Option(Path("runs"), help="runs folder holding mlflow.db"),
    host: str = typer.Option("127.0.0.1", help="bind address (loopback unless you mean it)"),
    port: int = typer.Option(5000),
) -> None:
    """Start the MLflow UI for the local store (binds 127.0.0.1 by default)."""
    from orchestrator.tracking import artifact_root, resolve_tracking_uri

    uri = resolve_tracking_uri(None, runs_dir)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    root = artifact_root(uri, runs_dir)
    if root:
        cmd += ["--default-artifact-root", root]
    console.print(f"MLflow UI for {uri} at http://{host}:{port}")
    raise typer.Exit(subprocess.call(cmd))


@app.command()
def demo(
    spec: Path = typer.Option(Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml", help="demo spec"),
    runs_dir: Path = typer.Option(Path("runs"), help="where data, Ray results and the MLflow store go"),
    max_concurrent: Optional[int] = typer.Option(None, help="trials at once"),
) -> None:
    """The demo: generate clips if absent, run experiments/demo.yaml on a local Ray, print the trials."""
    import time

    from orchestrator.sweep import run_sweep

    exp = _load(spec, [f"storage.runs_dir={runs_dir}"])
    started = time.perf_counter()
    try:
        result = run_sweep(exp, max_concurrent=max_concurrent)
    except Exception as err:  # noqa: BLE001
        _fail(f"demo failed: {err}")
    if result.gblend_weights:
        console.print("G-Blend weights: " + ", ".join(f"{k}={v:.3f}" for k, v in result.gblend_weights.items()))
    print_trials(result.trials, f"demo: parent run {result.parent_run_id}")
    from orchestrator.report import build_report

    report_path = build_report(exp.tracking.experiment or exp.name, sweep_run_id=result.parent_run_id,
                               tracking_uri=result.tracking_uri, out_dir=Path(runs_dir) / "reports" / exp.name)
    console.print(f"demo wall time: {time.perf_counter() - started:.0f} s")
    console.print(f"report: {report_path} (also on the parent run under report/)")
    console.print(f"open the MLflow UI: .venv/bin/avtune ui --runs-dir {runs_dir}   (then http://127.0.0.1:5000)")


@app.command()
def report(
    experiment: str = typer.Argument(..., help="MLflow experiment name"),
    sweep_id: Optional[str] = typer.Option(None, "--sweep", help="parent run id (default: the latest sweep)"),
    out: Optional[Path] = typer.Option(None, "--out", help="output folder (default: <runs-dir>/reports/<experiment>-<run>)"),
    tracking_uri: Optional[str] = typer.Option(None, help="default: MLFLOW_TRACKING_URI, else sqlite under --runs-dir"),
    runs_dir: Path = typer.Option(Path("runs"), help="local runs folder (for the default SQLite store)"),
) -> None:
    """Imbalance report of a sweep (plots + report.html), also logged under report/ on its parent run."""
    from mlflow.tracking import MlflowClient

    from orchestrator.report import build_report, default_report_dir, resolve_sweep
    from orchestrator.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri, runs_dir)
    try:
        sweep_id = resolve_sweep(MlflowClient(uri), experiment, sweep_id)
        path = build_report(experiment, sweep_id, uri, out_dir=out or default_report_dir(runs_dir, experiment, sweep_id))
    except ValueError as err:
        _fail(str(err))
    console.print(f"report: {path}", soft_wrap=True)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
