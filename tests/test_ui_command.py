"""`avtune ui`: a real `mlflow server` with only what the dashboard needs, in a process group of its own,
and nothing of it left running after SIGTERM or Ctrl-C (SIGINT). The process table is read from /proc
here, independently of the command's own bookkeeping."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port, wait_for_health

pytestmark = pytest.mark.slow  # starts a server (~5 s on a quiet machine)

REPO = Path(__file__).resolve().parents[1]


def process_table() -> dict[int, dict]:
    """pid -> state, ppid, pgrp, session and command line of every process, from /proc."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text(errors="replace")
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        state, ppid, pgrp, sid = stat[stat.rindex(")") + 2:].split()[:4]
        table[int(name)] = {"state": state, "ppid": int(ppid), "pgrp": int(pgrp), "sid": int(sid), "cmd": cmdline.strip()}
    return table


def started_by(root: int, table: dict[int, dict]) -> dict[int, dict]:
    """`root` and every live process descending from it, plus every process in a group or session of one of them."""
    found = {root} if root in table else set()
    while True:
        groups = {table[p]["pgrp"] for p in found} | {table[p]["sid"] for p in found}
        more = {p for p, info in table.items() if p not in found and
                (info["ppid"] in found or info["pgrp"] in groups or info["sid"] in groups)}
        if not more:
            break
        found |= more
    return {p: table[p] for p in found if table[p]["state"] != "Z"}


def still_running(before: dict[int, dict]) -> dict[int, dict]:
    """Processes of `before` alive now (the same pid with the same command line), and any live process in
    one of their groups or sessions."""
    table = process_table()
    groups = {info["pgrp"] for info in before.values()} | {info["sid"] for info in before.values()}
    return {p: info for p, info in table.items() if info["state"] != "Z" and
            ((p in before and info["cmd"] == before[p]["cmd"]) or info["pgrp"] in groups or info["sid"] in groups)}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT], ids=["SIGTERM", "SIGINT", "SIGQUIT"])
def test_avtune_ui_runs_only_the_web_server_and_stops_all_of_it(tmp_path, sig):
    port = free_port()
    # Once bound to every interface (what a user who means it asks for): said so before the server starts.
    host = ["--host", "0.0.0.0"] if sig == signal.SIGQUIT else []
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    log = tmp_path / "ui.log"
    with open(log, "wb") as out:
        # A session of its own, as a shell gives a foreground job: Ctrl-C is SIGINT to that job's group.
        ui = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", "--runs-dir", str(tmp_path / "runs"),
                               "--port", str(port), *host], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                              start_new_session=True)
    before: dict[int, dict] = {}
    try:
        wait_for_health(ui, f"http://127.0.0.1:{port}", lambda: log.read_text()[-3000:], what="avtune ui")
        time.sleep(2)  # anything the server starts after it first answers
        before = started_by(ui.pid, process_table())
        commands = [info["cmd"] for info in before.values()]
        server = [p for p, info in before.items() if " -m mlflow server " in f"{info['cmd']} "]
        assert len(server) == 1, commands
        # Its own process group and session, apart from the command's (which a terminal's Ctrl-C reaches).
        assert before[server[0]]["pgrp"] == before[server[0]]["sid"] == server[0] != ui.pid, before
        assert any("uvicorn" in c for c in commands), commands
        assert not any("huey" in c or "_job_runner" in c or "_executor_runner" in c for c in commands), commands
        assert len(before) == 3, commands  # avtune, mlflow server, its single uvicorn worker

        started = time.monotonic()
        if sig == signal.SIGINT:
            os.killpg(ui.pid, signal.SIGINT)  # what Ctrl-C does: the foreground group
        else:
            os.kill(ui.pid, sig)
        code = ui.wait(timeout=60)
        stop_seconds = time.monotonic() - started
        left = still_running(before)  # at once: the command exits only after its processes have
        assert not left, f"still running after {sig.name}: {left}"
        assert code == 128 + sig, (code, log.read_text()[-2000:])
        assert f"MLflow UI stopped ({sig.name})" in log.read_text()
        warned = "warning: --host 0.0.0.0 serves the MLflow UI, which has no login" in log.read_text()
        assert warned == bool(host), log.read_text()[-2000:]
        print(f"{sig.name}: {len(before)} processes before, 0 after; stopped in {stop_seconds:.1f} s")
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
    finally:
        if ui.poll() is None:
            ui.kill()
            ui.wait(10)
        for pid in still_running(before):  # never leave a server behind a failed test
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
