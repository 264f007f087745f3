"""Where the CPU of a sweep trial goes: every process's CPU time, sampled from /proc while a 2-trial
sweep (2 epochs each, one trial at a time) runs on a freshly started local Ray, grouped by what the
process is (Ray names its actor processes `ray::<Class>`). Counted: the sweep's process, every process
started under it, and Ray workers reparented to init meanwhile (run it where no other Ray runs).

    .venv/bin/python benchmarks/trial_cpu.py [--trials 2]

On 2 cores CPU-seconds, not wall time, bound how many Ray runs the test suite and a sweep can do; each
trial is a Tune trial actor (ImplicitFunc), a Train controller, a Train worker and Ray Train's helper
actors. Linux only (/proc). Prints a table and writes benchmarks/results/trial_cpu.json.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")

SWEEP = """
import sys
from orchestrator import load_spec
from orchestrator.training import start_local_ray
from orchestrator.sweep import run_sweep
start_local_ray(num_cpus=2, log_to_driver=False)
runs_dir, trials = sys.argv[1], int(sys.argv[2])
run_sweep(load_spec({
    "name": "bench_trial_cpu",
    "data": {"synth": {"classes": 3, "clips_per_class": 8, "height": 32, "width": 32},
             "decode": {"num_frames": 2, "frame_height": 32, "frame_width": 32}},
    "model": {"width": 8},
    "method": {"name": "ogm_ge"},
    "train": {"epochs": 2, "global_batch_size": 8},
    "storage": {"runs_dir": runs_dir},
    "search": {"space": {"method.alpha": {"grid": [0.1 * (i + 1) for i in range(trials)]}},
               "max_concurrent_trials": 1},
}))
"""


def sample(seen: dict[tuple[int, int], tuple[str, float, int]]) -> None:
    """Each process's (latest non-idle title, CPU seconds so far, parent pid), keyed by (pid, start time)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            title = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        cpu = (int(fields[11]) + int(fields[12])) / TICKS
        key = (int(entry), int(fields[19]))
        old_title, old_cpu, _ = seen.get(key, ("", 0.0, 0))
        # A Ray worker is `ray::IDLE` until it becomes an actor; an exited process has no command line.
        keep = title if title and "IDLE" not in title else old_title or title
        seen[key] = (keep, max(cpu, old_cpu), int(fields[1]))


def descendants(seen: dict[tuple[int, int], tuple[str, float, int]], root: int, root_started: int) -> set[int]:
    """`root` and every process started under it (Ray's GCS, raylet, agents and workers), by parent pid
    as recorded while each was alive; also Ray workers started after it whose parent was init, as a
    worker launched through Ray's runtime-env setup (the Train controller) is reparented from the start."""
    family = {root} | {pid for (pid, started), (title, _, parent) in seen.items()
                       if parent == 1 and started >= root_started and "ray::" in title}
    grew = True
    while grew:
        found = {pid for (pid, _), (_, _, parent) in seen.items() if parent in family}
        grew = not found <= family
        family |= found
    return family


def kind(title: str) -> str:
    if "ray::" in title:
        return title[title.index("ray::"):].split()[0]
    for marker in ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py", "default_worker", "runtime_env"):
        if marker in title:
            return marker
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2)
    args = parser.parse_args()
    runs_dir = tempfile.mkdtemp(prefix="avtune-trial-cpu-")
    before: dict[tuple[int, int], tuple[str, float, int]] = {}
    sample(before)
    seen = dict(before)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", SWEEP, runs_dir, str(args.trials)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        sample(seen)
        time.sleep(0.1)
    sample(seen)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        sys.exit(f"the sweep failed (exit {proc.returncode}); its Ray logs are under /tmp/ray/session_latest")
    root_started = next(started for pid, started in seen if pid == proc.pid)
    family = descendants(seen, proc.pid, root_started)
    groups: dict[str, list[float]] = collections.defaultdict(list)
    for (pid, started_at), (title, cpu, _) in seen.items():
        used = cpu - before.get((pid, started_at), ("", 0.0, 0))[1]
        if used > 0 and pid in family:
            groups["sweep driver" if pid == proc.pid else kind(title)].append(used)
    rows = sorted(((name, len(v), sum(v)) for name, v in groups.items()), key=lambda r: -r[2])
    total = sum(r[2] for r in rows)
    print(f"{args.trials}-trial sweep: {wall:.1f} s wall, {total:.1f} CPU-s in all")
    print(f"{'process':34s} {'count':>5s} {'CPU-s':>7s} {'per trial':>9s}")
    for name, count, cpu in rows:
        print(f"{name:34s} {count:5d} {cpu:7.2f} {cpu / args.trials:9.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "trial_cpu.json").write_text(json.dumps({
        "machine": "2 CPU cores, no GPU", "trials": args.trials, "wall_s": wall, "cpu_s_total": total,
        "by_process": {name: {"processes": count, "cpu_s": cpu, "cpu_s_per_trial": cpu / args.trials}
                       for name, count, cpu in rows}}, indent=2))
    print(f"wrote {RESULTS / 'trial_cpu.json'}")


if __name__ == "__main__":
    main()
