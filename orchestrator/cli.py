"""`avtune` command line: thin over the Python API (heavy imports happen inside commands)."""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

class AvtuneApp(typer.Typer):
    """The `avtune` command (the console script calls the app itself). Ctrl-C anywhere, also where Ray or
    click turned it into SystemExit(1) or Abort, exits 130 as a shell expects of SIGINT and says so."""

    def __call__(self, *args, **kwargs):
        import signal

        interrupted: list[int] = []
        previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame):
            interrupted.append(signum)
            if callable(previous):
                previous(signum, frame)
            else:
                raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)
        try:
            return super().__call__(*args, **kwargs)
        except (KeyboardInterrupt, SystemExit) as err:
            if interrupted or isinstance(err, KeyboardInterrupt):
                print("avtune: interrupted (Ctrl-C)", file=sys.stderr)
                raise SystemExit(130) from None
            raise


app = AvtuneApp(help="avtune: balanced audio-visual learning experiments on Ray, tracked in MLflow.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
# markup off: names from specs, MLflow and the command line ("[/]", "[bold]") are printed as they are; the
# few styled words are marked where they are printed (markup=True, the values escaped).
console = Console(width=None if sys.stdout.isatty() else 150, markup=False)
# MLflow draws a progress bar per artifact download (the report reads every trial's predictions.csv).
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

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
    console.print(f"[bold red]error:[/] {escape(message)}", markup=True)
    raise typer.Exit(2)


def _load(spec_path: Path, overrides: list[str]):
    from orchestrator.specs import SpecError, load_spec

    try:
        return load_spec(spec_path, overrides)
    except SpecError as err:
        _fail(str(err))


VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="stream Ray's own output to the console "
                                            "(default: into a log file under <runs_dir>/logs, whose path is printed)")]


@contextmanager
def quiet_ray(runs_dir: str, name: str, verbose: bool):
    """Ray's, Ray Train's and Tune's output into runs/logs/<name>-<time>.log for the block (nothing with
    --verbose); what this CLI prints (views, tables, errors) still reaches the console. Ray is shut
    down inside the block, so its exit messages land in the log too."""
    from orchestrator.console import log_file_for, ray_output_to

    log_path = None if verbose else log_file_for(runs_dir, name)
    with ray_output_to(log_path) as stream:
        console.file = stream
        try:
            if log_path is not None:
                console.print(f"Ray log: {log_path}", soft_wrap=True, highlight=False)
            yield log_path
        finally:
            if "ray" in sys.modules and sys.modules["ray"].is_initialized():
                sys.modules["ray"].shutdown()
            console.file = None


@contextmanager
def showing(board):
    """The board as a live table on a terminal, else one plain line per finished epoch or trial."""
    from orchestrator.console import LiveView, watching

    with watching(board):
        if console.is_terminal:
            with LiveView(board, console):
                yield board
        else:
            board.on_line = lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True)
            yield board


@app.command()
def train(
    spec: SpecArg,
    set_: SetOpt = None,
    address: AddressOpt = None,
    resume: Optional[str] = typer.Option(None, help="MLflow run id of an interrupted run to continue"),
    verbose: VerboseOpt = False,
) -> None:
    """Train one spec under Ray Train; per-epoch acc / acc_audio / acc_visual go to MLflow."""
    from orchestrator.console import Board
    from orchestrator.training import run_name_for, run_training

    exp = _load(spec, set_ or [])
    with quiet_ray(exp.storage.runs_dir, exp.name, verbose):
        board = Board(f"avtune train {exp.name}", per_epoch=True)
        with showing(board):
            board.expect(1, exp.train.epochs)
            board.trial_started("run", run_name_for(exp), exp.train.epochs)
            try:
                result = run_training(exp, address=address, on_epoch=lambda m: board.epoch_done("run", m),
                                      resume_run_id=resume)
            except Exception as err:  # noqa: BLE001
                board.trial_ended("run", "FAILED", str(err))
                _fail(f"training failed: {err}")
            board.trial_ended("run", "FINISHED")
        print_history(exp, result)


def print_history(exp, result) -> None:
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
    console.print(f"MLflow: {_redact(result.tracking_uri)}  run {result.run_id}", soft_wrap=True)
    console.print(f"checkpoint: {result.checkpoint_path}", soft_wrap=True)


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
    verbose: VerboseOpt = False,
) -> None:
    """Run a Ray Tune sweep: one MLflow parent run, a child run per trial."""
    exp = _load(spec, set_ or [])
    if exp.search is None:
        _fail(f"{spec}: no search section; use `avtune train` for a single run")
    with quiet_ray(exp.storage.runs_dir, exp.name, verbose):
        result = _run_sweep_shown(exp, f"avtune sweep {exp.name}", "sweep", address=address,
                                  max_concurrent=max_concurrent, resume=resume_run or resume)
        print_trials(result.trials, f"{exp.name}: parent run {result.parent_run_id}")
        console.print(f"MLflow: {_redact(result.tracking_uri)}; open the UI with: avtune ui --runs-dir {exp.storage.runs_dir}")


def _run_sweep_shown(exp, title: str, what: str, **kwargs):
    """`run_sweep` with its trials on the board; a failure is printed and exits 2."""
    from orchestrator.console import Board
    from orchestrator.sweep import run_sweep

    with showing(Board(title)):
        try:
            result = run_sweep(exp, **kwargs)
        except Exception as err:  # noqa: BLE001
            _fail(f"{what} failed: {err}")
    if result.gblend_weights:
        console.print("G-Blend weights: " + ", ".join(f"{k}={v:.3f}" for k, v in result.gblend_weights.items()))
    return result


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

    # orchestrator.runs and orchestrator.report, not orchestrator.sweep: reading a sweep imports neither
    # torch nor Ray (tests/test_report.py checks it).
    from orchestrator.report import resolve_sweep
    from orchestrator.runs import MAIN_STAGE, child_runs, trials_frame_of
    from orchestrator.tracking import resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri(tracking_uri, runs_dir))
    try:
        sweep_id = resolve_sweep(client, experiment, sweep_id)
    except ValueError as err:
        _fail(str(err))
    from orchestrator.report import load_sweep

    runs = child_runs(client, sweep_id, stage=MAIN_STAGE)  # one search for both tables
    print_trials(trials_frame_of(runs, metric), f"{experiment}: sweep {sweep_id}")
    # Final values only (no per-epoch histories); the runs themselves are not kept once read.
    sweep = load_sweep(client, sweep_id, runs=runs, histories=False)
    del runs
    print_configurations(sweep)


def print_configurations(sweep) -> None:
    """Per configuration of `sweep` (``orchestrator.report.load_sweep``): mean [95% interval] over seeds, the
    paired difference from normal and the share of the headroom recovered; then the references (uni-modal
    ensemble, ceiling) against normal."""
    from orchestrator.report import config_summary, imbalance_summary
    from orchestrator.report.comparisons import format_interval, report_tests
    from orchestrator.report.html import READING_INTERVALS, READING_REFERENCES, comparison_cell
    from orchestrator.report.references import reference_summary
    trials = imbalance_summary(sweep)[0]
    references = sweep.references()
    tests = report_tests(trials, sweep.predictions, references)
    summary = config_summary(trials, sweep.predictions, tests, references)
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
            cells.append("" if d is None or d != d else comparison_cell(r, k))
        table.add_row(*cells)
    console.print(table)
    console.print(READING_INTERVALS, markup=False)
    refs = reference_summary(trials, references)
    if refs.empty:
        return
    print_references(refs, tests)
    print_headroom(summary)
    console.print(READING_REFERENCES, markup=False)


def print_headroom(summary) -> None:
    """Per joint configuration, its share of the headroom above normal recovered against each reference; a
    table of its own: beside the comparisons with normal, the rows would wrap at 150 columns."""
    from orchestrator.report.comparisons import format_interval
    from orchestrator.report.references import KINDS, format_ratio

    joint = summary[summary[[f"headroom_{k}_status" for k in KINDS]].notna().any(axis=1)]
    if joint.empty:
        return
    table = Table(title="headroom recovered: (acc - normal) / (reference - normal) [95% Fieller interval over seeds]")
    for c in ("config", "acc", *(f"vs {k}" for k in KINDS)):
        table.add_column(c, justify="left" if c == "config" else "right")
    for _, r in joint.iterrows():
        table.add_row(str(r["config"]), format_interval(r["acc"], r["acc_low"], r["acc_high"]),
                      *(format_ratio(r[f"headroom_{k}"], r[f"headroom_{k}_low"], r[f"headroom_{k}_high"],
                                     r[f"headroom_{k}_status"]) for k in KINDS))
    console.print(table)


def print_references(refs, tests) -> None:
    """One line per group: normal, the ensemble and the ceiling (joint accuracy) and each one's paired
    difference from normal with its Holm-adjusted verdict."""
    import pandas as pd

    from orchestrator.report.comparisons import find_test, format_interval
    from orchestrator.report.html import test_cell
    from orchestrator.report.references import CEILING

    for _, r in refs.iterrows():
        where = f"[{r['group']}] " if r["group"] else ""
        line = f"references {where}(joint accuracy): normal {format_interval(r['normal'], r['normal_low'], r['normal_high'])}"
        if r["ensemble_config"] is not None:
            test = find_test(tests, "headroom", r["group"], r["ensemble_config"], "acc")
            line += (f"; ensemble (audio_only + visual_only) {format_interval(r['ensemble'], r['ensemble_low'], r['ensemble_high'])}"
                     f", ensemble - normal {test_cell(test)}")
        else:
            line += f"; no ensemble ({r['ensemble_missing']})"
        if not pd.isna(r["ceiling"]):
            line += f"; ceiling {r['ceiling']:.3f}, ceiling - normal {test_cell(find_test(tests, 'headroom', r['group'], CEILING, 'acc'))}"
        else:
            line += "; no ceiling on the parent run (real data)"
        console.print(line, markup=False)


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
    from orchestrator.tracking import redact_uri

    exp = _load(spec, set_ or [])
    command = "train" if train_only or exp.search is None else "sweep"
    try:
        job_id = submit_spec(exp, address, tracking_uri=tracking_uri, command=command, token_file=token_file,
                             allow_insecure_http=allow_insecure_http)
    except (SubmitError, SpecError) as err:
        _fail(str(err))
    console.print(f"submitted [bold]{escape(job_id)}[/] ({command} {exp.name}) to {escape(redact_uri(address))}", markup=True)
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


LOOPBACK_BINDS = ("127.0.0.1", "localhost", "::1")


def _die_with_parent() -> None:
    """In the `mlflow server` child before it runs (Linux): SIGTERM when `avtune ui` dies, even by SIGKILL, which
    no handler sees; `mlflow server` ends its own workers on SIGTERM."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the handlers in `ui` still stop it on SIGINT / SIGTERM / SIGHUP / SIGQUIT
        pass


UI_STOP_TIMEOUT_S = 15.0  # SIGTERM to the UI's process group, then SIGKILL after this long


def _ui_processes(leader: int) -> list[int]:
    """Live processes that `avtune ui` started: the session / process group of `leader` (the `mlflow server`
    it launched with start_new_session) and every descendant, from /proc (Linux); zombies are not counted.
    Without /proc: the leader's group while it answers."""
    if not os.path.isdir("/proc"):
        try:
            os.killpg(leader, 0)
            return [leader]
        except (ProcessLookupError, PermissionError):
            return []
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="utf-8", errors="replace") as handle:
                stat = handle.read()
        except OSError:  # gone meanwhile
            continue
        state, ppid, pgrp, sid = stat[stat.rindex(")") + 2:].split()[:4]
        table[int(entry.name)] = (state, int(ppid), int(pgrp), int(sid))
    found = {pid for pid, (_, _, pgrp, sid) in table.items() if leader in (pid, pgrp, sid)}
    while True:  # descendants that left the group or session
        more = {pid for pid, (_, ppid, _, _) in table.items() if ppid in found and pid not in found}
        if not more:
            break
        found |= more
    return sorted(pid for pid in found if table[pid][0] != "Z" and pid != os.getpid())


def _stop_ui_server(proc: subprocess.Popen, timeout: float, hurry) -> bool:
    """SIGTERM to the server's process group (and any descendant outside it), wait up to `timeout` for
    all of them to end, then SIGKILL. `hurry()` true (a second Ctrl-C) skips the wait. True when
    SIGTERM was enough."""
    import signal
    import time

    def send(sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in _ui_processes(proc.pid):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def wait(seconds: float, stop_early) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not stop_early():
            proc.poll()  # reap the leader, so it does not count as running
            if not _ui_processes(proc.pid):
                return True
            time.sleep(0.1)
        proc.poll()
        return not _ui_processes(proc.pid)

    if proc.poll() is None or _ui_processes(proc.pid):
        send(signal.SIGTERM)
        if wait(timeout, hurry):
            return True
        send(signal.SIGKILL)
        wait(10.0, lambda: False)
        return False
    return True


@app.command()
def ui(
    runs_dir: Path = typer.Option(Path("runs"), help="runs folder holding mlflow.db"),
    host: str = typer.Option("127.0.0.1", help="bind address (loopback unless you mean it)"),
    port: int = typer.Option(5000),
    stop_timeout: float = typer.Option(UI_STOP_TIMEOUT_S, help="seconds the server gets to stop on SIGTERM before SIGKILL"),
) -> None:
    """Start the MLflow UI for the local store (binds 127.0.0.1 by default).

    Only the web server runs (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: no GenAI job runner or huey
    consumers; one uvicorn worker), in a process group of its own; Ctrl-C, SIGTERM or SIGHUP stop every
    process it started (SIGTERM, then SIGKILL after --stop-timeout; a second Ctrl-C kills at once). Exit
    code: 128 + the signal (130 for Ctrl-C, 143 for SIGTERM); 1 or the server's code when it ends by itself."""
    import signal

    from orchestrator.tracking import artifact_root, resolve_tracking_uri

    uri = resolve_tracking_uri(None, runs_dir)
    if uri.startswith(("http://", "https://")):
        _fail(f"MLFLOW_TRACKING_URI is a tracking server ({_redact(uri)}): open it in a browser; "
              "`avtune ui` serves a local store (unset MLFLOW_TRACKING_URI to use the one under --runs-dir)")
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1"]
    root = artifact_root(uri, runs_dir)
    if root:
        cmd += ["--default-artifact-root", root]
    # The store's URI (a database URI may hold its password) in the environment, not in argv, which every
    # user of the machine can read (ps, /proc/PID/cmdline).
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_BACKEND_STORE_URI": uri}
    if host not in LOOPBACK_BINDS:
        console.print(f"warning: --host {host} serves the MLflow UI, which has no login, to every machine that can "
                      "reach this one; every run, param and artifact can be read and changed there", soft_wrap=True)
    received: list[int] = []
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
    previous = {sig: signal.signal(sig, lambda signum, _frame: received.append(signum)) for sig in stops}
    try:
        console.print(f"MLflow UI for {_redact(uri)} at http://{host}:{port} (Ctrl-C stops it)", soft_wrap=True)
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)
        while not received and proc.poll() is None:
            try:
                proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        if received:
            code = 128 + received[0]
        elif proc.returncode < 0:  # killed by a signal
            code = 128 - proc.returncode
        else:  # `mlflow server` exits 0 even when uvicorn could not bind the port: any end of its own is an error
            code = proc.returncode or 1
        clean = _stop_ui_server(proc, stop_timeout, hurry=lambda: len(received) > 1)
        try:
            if received:
                console.print(f"MLflow UI stopped ({signal.Signals(received[0]).name}"
                              f"{'' if clean else '; SIGKILL after --stop-timeout'})")
            else:
                console.print(f"[bold red]error:[/] mlflow server ended by itself (exit code {proc.returncode}; "
                              f"its output is above, e.g. port {port} already in use)", markup=True)
        except OSError:  # the terminal is gone (SIGHUP)
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    raise typer.Exit(code)


@app.command()
def demo(
    spec: Path = typer.Option(Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml", help="demo spec"),
    runs_dir: Path = typer.Option(Path("runs"), help="where data, Ray results and the MLflow store go"),
    max_concurrent: Optional[int] = typer.Option(None, help="trials at once"),
    verbose: VerboseOpt = False,
) -> None:
    """The demo: generate clips if absent, run experiments/demo.yaml on a local Ray, print the trials."""
    import time

    exp = _load(spec, [f"storage.runs_dir={runs_dir}"])
    started = time.perf_counter()
    with quiet_ray(exp.storage.runs_dir, exp.name, verbose):
        result = _run_sweep_shown(exp, "avtune demo", "demo", max_concurrent=max_concurrent)
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
    except (ValueError, FileExistsError) as err:
        _fail(str(err))
    print_leaderboard(path.parent)
    console.print(f"report: {path}", soft_wrap=True)


def print_leaderboard(report_dir: Path) -> None:
    """The report's leaderboard (methods as rows, mean [95% interval] over seeds, paired against normal)."""
    import pandas as pd

    from orchestrator.report.html import READING_LEADERBOARD
    from orchestrator.report.leaderboard import LEADERBOARD_FILE

    board = pd.read_csv(report_dir / LEADERBOARD_FILE, dtype=str, keep_default_na=False)
    if board.empty:
        return
    table = Table(title="leaderboard: validation accuracy, mean ± 95% interval over seeds")
    for c in board.columns:
        table.add_column(c, justify="left" if c in ("group", "method", "vs normal", "weak vs normal") else "right",
                         no_wrap=True)
    for _, row in board.iterrows():
        table.add_row(*row.tolist())
    # One line per method: piped output (a file, CI) is not cut to 150 columns.
    (console if console.is_terminal else Console(file=console.file, width=300, markup=False)).print(table)
    console.print(READING_LEADERBOARD, markup=False, highlight=False)


def main() -> None:  # pragma: no cover - run by the tests as a subprocess
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
