"""Reproduce (or rule out) the raylet abort seen after killed workers (issue 25).

A local Ray started the way avtune starts it (`orchestrator.training.start_local_ray`, token auth on),
a sweep of short Ray Train runs under ASHA, and a killer thread that SIGKILLs one of this Ray's Train
worker processes every `--kill-every-s` seconds. At the end it checks that the raylet is alive and
serving (a task runs), and searches this Ray's session logs for Ray check failures.

    .venv/bin/python tools/ray_kill_stress.py --runs-dir /tmp/stress-a [--trials 12] [--kill-every-s 4]

Two at once on one machine (two local Rays side by side, as two pytest-xdist workers or two
`avtune sweep` commands are):

    .venv/bin/python tools/ray_kill_stress.py --runs-dir /tmp/stress-a & \
    .venv/bin/python tools/ray_kill_stress.py --runs-dir /tmp/stress-b; wait

Prints one JSON line: kills, trials and their states, raylet alive, check failures found.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def descendants(root: int) -> set[int]:
    """Pids of every process under `root` (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def processes_titled(title: str, among: set[int]) -> list[int]:
    found = []
    for pid in among:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith(title):
            found.append(pid)
    return found


class Killer:
    """SIGKILLs a random process titled one of `titles` under `root` (a raylet: its workers are its
    children) every `every_s` seconds, until `limit` kills if given. `kills`: (seconds, title, pid)."""

    def __init__(self, titles: tuple[str, ...], every_s: float, root: int, limit: int | None = None, seed: int = 0):
        self.titles, self.every_s, self.root, self.limit = titles, every_s, root, limit
        self.rng = random.Random(seed)
        self.kills: list[tuple[float, str, int]] = []
        self._stop = threading.Event()
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            if self.limit is not None and len(self.kills) >= self.limit:
                return
            under_root = descendants(self.root)
            # The titles take turns, so a kind that is quick to come back cannot crowd out a slow one;
            # the kill waits until a process of this turn's kind is up.
            title = self.titles[len(self.kills) % len(self.titles)]
            victims = processes_titled(title, under_root)
            if not victims:
                continue
            pid = self.rng.choice(victims)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.kills.append((round(time.monotonic() - self._start, 1), title, pid))

    def stop(self) -> list[tuple[float, str, int]]:
        self._stop.set()
        self._thread.join(10)
        return self.kills


def raylet_pid() -> int:
    """The pid of the raylet of the Ray this process is connected to (a local one: same machine)."""
    import ray

    from ray._private import ray_constants

    node = ray._private.worker.global_worker.node
    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def check_failures(session_dir: Path) -> list[str]:
    """Lines of Ray's fatal check failures in this Ray's logs (raylet, GCS, workers)."""
    lines = []
    for path in (session_dir / "logs").glob("*"):
        if path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                if "Check failed" in line:
                    lines.append(f"{path.name}: {line.strip()[:300]}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", required=True, type=Path)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--kill-every-s", type=float, default=4.0)
    parser.add_argument("--kill", default="ray::RayTrainWorker",
                        help="comma-separated process titles to kill, e.g. ray::RayTrainWorker,ray::TrainController")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import ray
    from mlflow.tracking import MlflowClient

    from orchestrator import load_spec
    from orchestrator.sweep import run_sweep
    from orchestrator.training import start_local_ray

    start_local_ray(num_cpus=2, log_to_driver=False)
    session_dir = Path(ray._private.worker.global_worker.node.get_session_dir_path())
    spec = load_spec({
        "name": "stress",
        "data": {"synth": {"classes": 3, "clips_per_class": 8, "height": 32, "width": 32},
                 "decode": {"num_frames": 2, "frame_height": 32, "frame_width": 32}},
        "model": {"width": 8},
        "method": {"name": "normal"},
        "train": {"epochs": args.epochs, "global_batch_size": 8, "max_failures": 1000},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "storage": {"runs_dir": str(args.runs_dir)},
        "search": {"space": {"train.learning_rate": {"grid": [10.0 ** -(1 + i % 6) for i in range(args.trials)]},
                             "train.seed": {"grid": [0]}},
                   "scheduler": "asha", "metric": "loss", "mode": "min", "asha_grace_epochs": 1,
                   "asha_reduction_factor": 2, "max_concurrent_trials": 2, "trial_max_failures": 3},
    })
    killer = Killer(tuple(args.kill.split(",")), args.kill_every_s, root=raylet_pid(), seed=args.seed)
    started = time.monotonic()
    error = None
    try:
        result = run_sweep(spec)
    except Exception as err:  # noqa: BLE001 - reported in the JSON line
        error, result = f"{type(err).__name__}: {err}"[:500], None
    kills = killer.stop()
    alive = False
    try:
        alive = ray.get(ray.remote(lambda: True).options(num_cpus=0).remote(), timeout=60)
    except Exception as err:  # noqa: BLE001
        error = error or f"raylet not serving: {err}"
    states = {}
    if result is not None:
        client = MlflowClient(result.tracking_uri)
        parent = client.get_run(result.parent_run_id)
        kids = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
        for kid in kids:
            states[kid.info.status] = states.get(kid.info.status, 0) + 1
    failures = check_failures(session_dir)
    print(json.dumps({"kills": len(kills), "seconds": round(time.monotonic() - started), "trial_states": states,
                      "raylet_alive": alive, "check_failures": failures, "error": error,
                      "session_dir": str(session_dir)}))
    return 0 if alive and not failures and error is None else 1


if __name__ == "__main__":
    sys.exit(main())
