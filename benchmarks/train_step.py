"""Training-step cost: the avtune loop under Ray Train (1 worker) vs a bare PyTorch loop on the same
model, data and batch; OGM-GE vs normal; MLflow logging as a share of an epoch.

    .venv/bin/python benchmarks/train_step.py [--epochs 6] [--clips-per-class 40]

Start-up (Ray, worker group, dataset decode) is excluded: per-step times come from the training
part of each epoch (`train_seconds` reported by the loop), first epoch dropped as warm-up.
Prints a table and writes benchmarks/results/train_step.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

RESULTS = Path(__file__).resolve().parent / "results"


def bare_loop_step_seconds(spec, epochs: int) -> float:
    """The same model, loader and optimiser, no Ray, no metrics: seconds per step."""
    from workers.train_loop import build_datasets, build_model, build_optimizer, seed_everything

    data = spec.model_dump(mode="json")
    torch.set_num_threads(int(spec.scaling.cpus_per_worker))
    seed_everything(spec.train.seed)
    train = build_datasets(data)["train"]
    model = build_model(data, train.num_classes)
    opt = build_optimizer(data, model.parameters())
    loader = DataLoader(train, batch_size=spec.train.batch_size, shuffle=True, drop_last=len(train) > spec.train.batch_size)
    per_epoch = []
    for _ in range(epochs):
        model.train()
        start, steps = time.perf_counter(), 0
        for audio, visual, labels, _ in loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(audio, visual).logits, labels).backward()
            opt.step()
            steps += 1
        per_epoch.append((time.perf_counter() - start) / steps)
    return statistics.median(per_epoch[1:])


def avtune_step_seconds(spec) -> tuple[float, float, object]:
    from orchestrator.training import run_training

    result = run_training(spec)
    hist = result.history.iloc[1:]
    steps = len_train_steps(spec)
    return float((hist["train_seconds"] / steps).median()), float(hist["epoch_seconds"].median()), result


def len_train_steps(spec) -> int:
    from workers.train_loop import build_datasets

    n = len(build_datasets(spec.model_dump(mode="json"))["train"])
    b = spec.train.batch_size
    return n // b if n > b else 1


def mlflow_log_seconds(tracking_uri: str, run_id: str, metrics: dict[str, float], repeats: int = 20) -> float:
    """Time of what the controller-side logger does per epoch (one batched log to the store)."""
    from orchestrator.tracking import MlflowEpochLogger

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
    parser.add_argument("--clips-per-class", type=int, default=40)
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
        "train": {"epochs": args.epochs, "batch_size": 16, "optimizer": "adam", "learning_rate": 0.001},
        "scaling": {"num_workers": 1, "cpus_per_worker": 2},
        "storage": {"runs_dir": str(runs_dir)},
    }
    normal = ensure_data(load_spec({**base, "method": {"name": "normal"}}))
    ogm = ensure_data(load_spec({**base, "method": {"name": "ogm_ge", "alpha": 0.5, "modulation_ends": args.epochs}}))

    bare = bare_loop_step_seconds(normal, args.epochs)
    av_normal, epoch_normal, result = avtune_step_seconds(normal)
    av_ogm, _, _ = avtune_step_seconds(ogm)
    metrics = {k: float(v) for k, v in result.history.iloc[-1].items() if v == v}
    log_s = mlflow_log_seconds(result.tracking_uri, result.run_id, metrics)

    rows = [
        ("bare PyTorch loop, s/step", bare, None, None),
        ("avtune loop under Ray Train (normal), s/step", av_normal, av_normal / bare, 1.10),
        ("avtune loop under Ray Train (ogm_ge), s/step", av_ogm, av_ogm / av_normal, 1.05),
        ("MLflow per-epoch logging, s", log_s, log_s / epoch_normal, 0.02),
    ]
    print(f"{'measure':50s} {'value':>10s} {'ratio':>8s} {'target':>8s}")
    for name, value, ratio, target in rows:
        r = f"{ratio:.3f}" if ratio is not None else ""
        t = f"<= {target:g}" if target is not None else ""
        print(f"{name:50s} {value:10.4f} {r:>8s} {t:>8s}")
    print(f"(median epoch {epoch_normal:.2f} s incl. validation; ratios: avtune/bare, ogm_ge/normal, log/epoch)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "machine": {"cpu_count": torch.get_num_threads(), "platform": platform.platform(), "device": "cpu"},
        "config": base,
        "bare_step_s": bare, "avtune_normal_step_s": av_normal, "avtune_ogm_ge_step_s": av_ogm,
        "ratio_avtune_vs_bare": av_normal / bare, "ratio_ogm_ge_vs_normal": av_ogm / av_normal,
        "mlflow_log_s": log_s, "epoch_s": epoch_normal, "mlflow_share_of_epoch": log_s / epoch_normal,
        "targets": {"ratio_avtune_vs_bare": 1.10, "ratio_ogm_ge_vs_normal": 1.05, "mlflow_share_of_epoch": 0.02},
    }
    (RESULTS / "train_step.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'train_step.json'}")


if __name__ == "__main__":
    main()
