"""Training-step cost: the avtune engine under Ray Train (1 worker) and in-process vs a bare PyTorch loop
on the same model, data and batch; OGM-GE vs normal; MLflow logging as a share of an epoch.

    .venv/bin/python benchmarks/train_step.py [--epochs 6] [--clips-per-class 80] [--rounds 3] [--cpus 1 2]

Start-up (Ray, worker group, dataset decode) is excluded: per-step times come from the training
part of each epoch (`train_seconds` reported by the loop; the bare loop times the same span), first
epoch dropped as warm-up, median over the rest. Bare and avtune runs alternate in each round and
the ratios are taken within a round, then the median over rounds, so a slow spell on the machine
hits both sides of a ratio.

The engine (`workers.engine.fit`, the code every Train worker runs) also runs in-process, without
Ray: OGM-GE's own extra work, above all the Gaussian noise it draws for every conv weight each step,
is part of the method, not of Ray or the engine, so `ogm_ge vs normal` is reported in-process and
under Ray Train. Each setting of `cpus_per_worker` (torch
threads of the worker, and of the bare loop) is measured: on a 2-core machine, 2 threads leave no
core for Ray's own processes. Prints a table and writes benchmarks/results/train_step.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"avtune_vs_bare": 1.10, "ogm_ge_vs_normal": 1.05, "mlflow_share_of_epoch": 0.02}


def bare_loop_step_seconds(spec, epochs: int) -> float:
    """The same model, loader and optimiser in a plain PyTorch loop (normal training, no metrics):
    seconds per step."""
    from workers.engine import Runtime, build_datasets, build_optimizer, seed_everything
    from workers.methods import get_method

    torch.set_num_threads(int(spec.scaling.cpus_per_worker))
    seed_everything(spec.train.seed)
    train = build_datasets(spec)["train"]
    model = get_method(spec.method.name)(spec, Runtime()).build_model(train.num_classes)
    opt = build_optimizer(spec, model.parameters())
    loader = DataLoader(train, batch_size=spec.worker_batch, shuffle=True, drop_last=len(train) > spec.worker_batch)
    per_epoch = []
    for epoch in range(epochs):
        model.train()
        start, steps = time.perf_counter(), 0
        for audio, visual, labels, _ in loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(audio, visual).logits, labels).backward()
            opt.step()
            steps += 1
        per_epoch.append((time.perf_counter() - start) / steps)
    return statistics.median(per_epoch[1:])


def engine_step_seconds(spec) -> float:
    """`workers.engine.fit` in this process, no Ray: seconds per step of its training span."""
    from workers.engine import fit

    history = fit(spec, report=lambda metrics, state: None)
    return statistics.median(h["train_seconds"] for h in history[1:]) / len_train_steps(spec)


def avtune_step_seconds(spec) -> tuple[float, float, object]:
    import ray

    from orchestrator.training import run_training

    result = run_training(spec)
    ray.shutdown()  # the bare loop that follows runs on a machine without Ray, as a bare loop would
    hist = result.history.iloc[1:]
    steps = len_train_steps(spec)
    return float((hist["train_seconds"] / steps).median()), float(hist["epoch_seconds"].median()), result


def len_train_steps(spec) -> int:
    from workers.engine import build_datasets

    n = len(build_datasets(spec)["train"])
    b = spec.worker_batch
    return n // b if n > b else 1


def mlflow_log_seconds(tracking_uri: str, run_id: str, metrics: dict[str, float], repeats: int = 20) -> float:
    """Time of what the controller-side logger does per epoch (one batched log to the store)."""
    from orchestrator.train_callbacks import MlflowEpochLogger

    times = []
    for i in range(repeats):
        logger = MlflowEpochLogger(tracking_uri, run_id)
        logger._logged_epochs = set()  # measure the log itself, not the one-off history read
        start = time.perf_counter()
        logger.after_report(None, [{**metrics, "epoch": 10_000 + i}], None)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--clips-per-class", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2], help="cpus_per_worker settings to measure")
    parser.add_argument("--runs-dir", type=Path, default=None)
    args = parser.parse_args()

    from orchestrator import load_spec
    from orchestrator.training import ensure_data

    runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="avtune-bench-"))
    base = {
        "name": "bench_train_step",
        "data": {"synth": {"classes": 6, "clips_per_class": args.clips_per_class, "height": 48, "width": 48},
                 "decode": {"num_frames": 2, "frame_height": 48, "frame_width": 48}},
        "model": {"width": 16},
        "train": {"epochs": args.epochs, "global_batch_size": 16, "optimizer": "adam", "learning_rate": 0.001},
        "storage": {"runs_dir": str(runs_dir)},
    }
    methods = {"normal": {"name": "normal"},
               "ogm_ge": {"name": "ogm_ge", "alpha": 0.5, "modulation_ends": args.epochs}}
    settings, log_share = {}, None
    for cpus in args.cpus:
        specs = {m: ensure_data(load_spec({**base, "method": md, "scaling": {"num_workers": 1, "cpus_per_worker": cpus}}))
                 for m, md in methods.items()}
        rounds = []
        for _ in range(args.rounds):
            r = {}
            r["bare_normal"] = bare_loop_step_seconds(specs["normal"], args.epochs)
            for m, spec in specs.items():
                r[f"engine_{m}"] = engine_step_seconds(spec)
                r[f"avtune_{m}"], epoch_s, result = avtune_step_seconds(spec)
                if m == "normal":
                    r["epoch_s"] = epoch_s
                    last = result
            rounds.append(r)
        med = lambda f: statistics.median(f(r) for r in rounds)
        settings[cpus] = {
            "rounds": rounds,
            **{k: med(lambda r, k=k: r[k]) for k in rounds[0]},
            "avtune_vs_bare_normal": med(lambda r: r["avtune_normal"] / r["bare_normal"]),
            "engine_vs_bare_normal": med(lambda r: r["engine_normal"] / r["bare_normal"]),
            "ogm_ge_vs_normal_avtune": med(lambda r: r["avtune_ogm_ge"] / r["avtune_normal"]),
            "ogm_ge_vs_normal_engine": med(lambda r: r["engine_ogm_ge"] / r["engine_normal"]),
        }
        if log_share is None:
            metrics = {k: float(v) for k, v in last.history.iloc[-1].items() if v == v}
            log_s = mlflow_log_seconds(last.tracking_uri, last.run_id, metrics)
            log_share = {"mlflow_log_s": log_s, "epoch_s": settings[cpus]["epoch_s"],
                         "mlflow_share_of_epoch": log_s / settings[cpus]["epoch_s"]}

    print(f"{'measure':58s} {'value':>9s} {'target':>8s}")
    row = lambda name, value, target=None: print(
        f"{name:58s} {value:9.4f} {('<= ' + format(target, 'g')) if target else '':>8s}")
    for cpus, s in settings.items():
        print(f"-- cpus_per_worker={cpus} (torch threads), median of {args.rounds} rounds")
        row("bare loop normal, s/step", s["bare_normal"])
        row("engine in-process normal, s/step", s["engine_normal"])
        row("avtune under Ray Train normal, s/step", s["avtune_normal"])
        row("  avtune under Ray Train / bare (normal)", s["avtune_vs_bare_normal"], TARGETS["avtune_vs_bare"])
        row("  engine in-process / bare (normal)", s["engine_vs_bare_normal"], TARGETS["avtune_vs_bare"])
        row("  ogm_ge / normal, under Ray Train", s["ogm_ge_vs_normal_avtune"], TARGETS["ogm_ge_vs_normal"])
        row("  ogm_ge / normal, engine in-process (the method's own cost)", s["ogm_ge_vs_normal_engine"])
    row("MLflow per-epoch logging, s", log_share["mlflow_log_s"])
    row("  share of a median epoch", log_share["mlflow_share_of_epoch"], TARGETS["mlflow_share_of_epoch"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "machine": {"cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "device": "cpu"},
        "config": base, "rounds": args.rounds, "targets": TARGETS,
        "by_cpus_per_worker": {str(k): v for k, v in settings.items()}, **log_share,
    }
    (RESULTS / "train_step.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'train_step.json'}")


if __name__ == "__main__":
    main()
