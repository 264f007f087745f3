"""The training engine: plain PyTorch, no Ray, no MLflow.

`fit` is one loop read top to bottom (setup; per epoch the method's step, validation, best-on-
validation selection, one `report`; test numbers of the selected model at the end). Everything a
balancing method does differently is a hook of its registered class (`workers.methods`); the loop
never branches on a method's name. What runs it is injected, as torchtune's recipes take a metric
logger: `report(metrics, state)` receives each epoch's metrics and, on rank 0, the full checkpoint
state; `load_state()` returns the state to resume from, or None. `Runtime` carries the device, the
rank and the wrappers for DDP (`ray.train.torch.prepare_model` / `prepare_data_loader` under Ray
Train, identity in-process).
"""
from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from workers.augment import for_training
from workers.datasets import AVClipDataset
from workers.distributed import all_reduce_sum, broadcast_buffers, unwrap
from workers.evaluation import pack_probabilities
from workers.methods import Method, get_method
from workers.schedules import learning_rate_at
from workers.specs import ExperimentSpec

Report = Callable[[dict[str, float], "dict[str, Any] | None"], None]


def _identity(x):
    return x


@dataclass
class Runtime:
    """Where and how the engine runs: one process on the CPU unless told otherwise."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    prepare_model: Callable[[nn.Module], nn.Module] = _identity
    prepare_data_loader: Callable[[DataLoader], DataLoader] = _identity


class Batch(NamedTuple):
    audio: torch.Tensor
    visual: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor


# ---- building blocks -------------------------------------------------------------------


def build_datasets(spec: ExperimentSpec) -> dict[str, AVClipDataset]:
    data = spec.data
    cache_dir = None
    if data.cache:
        cache_dir = Path(data.cache_dir) if data.cache_dir else Path(data.root) / ".avtune-cache"
    out: dict[str, AVClipDataset] = {}
    class_names = None
    for split in ("train", "val", "test"):
        out[split] = AVClipDataset(Path(data.root), data.layout, split, data.decode, cache_dir=cache_dir,
                                   on_bad_media=data.on_bad_media, class_names=class_names)
        class_names = out[split].class_names
    return out


def build_loaders(spec: ExperimentSpec, datasets: dict[str, AVClipDataset], runtime: Runtime,
                  evaluation_batch_size: int | None = None) -> dict[str, DataLoader]:
    """The training loader (``spec.worker_batch`` clips per worker and step, so the global batch over the
    workers is the spec's, never the per-worker batch times the workers) and the evaluation loaders
    (``evaluation_batch_size``, default the global batch: every official code evaluates with its training batch)."""
    kw = dict(num_workers=spec.data.loader_workers, pin_memory=runtime.device.type == "cuda")
    train, batch = datasets["train"], spec.worker_batch
    train = for_training(train, spec.data.augment)  # crop / flip / frame draws: the training loader only
    # drop_last: a trailing batch of one breaks BatchNorm (AVSlowFast's audio lateral sees B x 1 slow frame).
    loaders = {"train": runtime.prepare_data_loader(
        DataLoader(train, batch_size=batch, shuffle=True, drop_last=len(train) > batch, **kw))}
    # Every rank evaluates the whole (small) held-out split: identical numbers on every rank,
    # no sampler padding skewing accuracy. Model selection uses `val`; `test` is only reported.
    for name, split in (("val", "val"), ("test", "test"), ("train_eval", "train")):
        loaders[name] = DataLoader(datasets[split], batch_size=evaluation_batch_size or spec.global_batch, shuffle=False, **kw)
    return loaders


def set_learning_rate(optimizer: torch.optim.Optimizer, rate: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = rate


def build_optimizer(spec: ExperimentSpec, params) -> torch.optim.Optimizer:
    t = spec.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.learning_rate, momentum=t.momentum, weight_decay=t.weight_decay,
                               nesterov=t.nesterov)
    if t.optimizer == "adamw":  # decoupled weight decay (BalanceBenchmark's global_config.yaml: AdamW)
        return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    return torch.optim.Adam(params, lr=t.learning_rate, weight_decay=t.weight_decay)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def weights_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def epoch_means(sums: dict[str, Any], steps: int, device: torch.device, world_size: int) -> dict[str, float]:
    """Per-step running sums -> means over the epoch and over all ranks (each rank saw its own shard).

    Every rank gets the same numbers, so what a method derives from them (online G-Blend's weights
    from the per-head train losses) is identical on every DDP rank. One all-reduce and one
    device->host copy per epoch, not one `.item()` sync per step (a stall per step on CUDA).
    """
    keys = sorted(sums)
    if not keys:
        return {}
    stacked = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32, device=device).reshape(()) for k in keys])
    means = all_reduce_sum(stacked / max(steps, 1)) / world_size
    return dict(zip(keys, means.cpu().tolist()))


# ---- the loop ----------------------------------------------------------------------------


def fit(spec: ExperimentSpec, report: Report, load_state: Callable[[], dict[str, Any] | None] = lambda: None,
        runtime: Runtime | None = None) -> list[dict[str, float]]:
    """Train `spec` for `spec.train.epochs` epochs (continuing from `load_state()` if it returns a
    state), `report` each epoch, and return the per-epoch metrics history."""
    epochs = train_epochs(spec, load_state, runtime)
    while True:
        try:
            metrics, checkpoint = next(epochs)
        except StopIteration as done:
            return done.value
        report(metrics, checkpoint)


def train_epochs(spec: ExperimentSpec, load_state: Callable[[], dict[str, Any] | None] = lambda: None,
                 runtime: Runtime | None = None) -> Iterator[tuple[dict[str, float], "dict[str, Any] | None"]]:
    """The loop of `fit` as a generator: yields each epoch's `(metrics, checkpoint state or None)`
    and returns the history, so a caller can interleave several runs' epochs (`fit_group`)."""
    runtime = runtime or Runtime()
    t = spec.train
    # Each worker gets cpus_per_worker cores; more torch threads would oversubscribe them.
    torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
    seed_everything(t.seed)
    device = runtime.device

    datasets = build_datasets(spec)
    num_classes = datasets["train"].num_classes
    method: Method = get_method(spec.method.name)(spec, runtime)
    loaders = build_loaders(spec, datasets, runtime, method.evaluation_batch_size())

    model = method.build_model(num_classes).to(device)
    if t.channels_last and device.type == "cuda":
        # AVSlowFast mixes 4-D (audio) and 5-D (video) convs and converts each itself.
        model = model.to_channels_last() if hasattr(model, "to_channels_last") else model.to(memory_format=torch.channels_last)
    model = runtime.prepare_model(model)
    raw = unwrap(model)
    method.loaders = loaders  # e.g. PMR's prototypes are computed over the training split
    method.setup(raw, datasets)

    optimizer = build_optimizer(spec, [p for p in raw.parameters() if p.requires_grad])
    use_bf16 = t.bf16_autocast and device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext

    start_epoch, best, history = 0, {"acc": -1.0, "epoch": -1, "state": None}, []
    state = load_state()
    if state is not None:
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        method.load_state_dict(state["method"])
        best, history = state["best"], state["history"]
        restore_rng_state(state["rng"])
        start_epoch = state["epoch"] + 1

    for epoch in range(start_epoch, t.epochs):
        started = time.perf_counter()
        if runtime.world_size > 1:
            loaders["train"].sampler.set_epoch(epoch)
        method.start_epoch(epoch)
        model.train()
        sums: dict[str, torch.Tensor] = defaultdict(float)  # running sums kept on the device
        steps, steps_per_epoch = 0, max(len(loaders["train"]), 1)
        for step, (audio, visual, labels, index) in enumerate(loaders["train"]):
            # The schedule's rate at this step's fractional epoch (workers.schedules: PySlowFast sets it so
            # before every iteration; a step schedule is constant within an epoch, as StepLR per epoch is).
            set_learning_rate(optimizer, learning_rate_at(t, epoch + step / steps_per_epoch))
            batch = Batch(audio.to(device), visual.to(device), labels.to(device), index.to(device))
            loss = method.train_step(model, optimizer, batch, epoch, step, sums, autocast)
            sums["loss_train"] += loss.detach().float()
            steps += 1
        broadcast_buffers(raw)  # every rank evaluates the same model rank 0 checkpoints
        train_seconds = time.perf_counter() - started

        metrics: dict[str, float] = {"epoch": epoch, "lr": learning_rate_at(t, epoch)}  # the rate the epoch began with
        metrics.update(epoch_means(sums, steps, device, runtime.world_size))
        metrics.update(method.evaluate(loaders, autocast))
        method.end_epoch(epoch, metrics)

        if metrics["acc"] > best["acc"]:
            best = {"acc": metrics["acc"], "epoch": epoch, "state": weights_copy(raw)}
        metrics["best_acc"], metrics["best_epoch"] = best["acc"], best["epoch"]
        metrics["epoch_seconds"] = time.perf_counter() - started
        metrics["train_seconds"] = train_seconds

        predictions: list[dict[str, Any]] = []
        probabilities = None
        if epoch == t.epochs - 1:
            # Per-clip predictions behind `acc` (this model on validation) and `test_acc` (below).
            predictions = method.predictions(loaders, "val", "final", autocast)
            # Held-out test numbers of the model chosen on validation; never used for selection.
            current = weights_copy(raw)
            raw.load_state_dict(best["state"])
            metrics.update({f"test_{k}": v for k, v in method.test_metrics(loaders, autocast).items()})
            predictions += method.predictions(loaders, "test", "selected", autocast)
            raw.load_state_dict(current)
            # The joint softmax of every row, out of the rows and into one float16 array: compact in the
            # checkpoint, logged as probabilities.npz beside predictions.csv.
            probabilities = pack_probabilities(predictions)

        metrics = {k: float(v) for k, v in metrics.items() if v is not None and not math.isnan(float(v))}
        history.append(metrics)
        checkpoint = None
        if runtime.rank == 0:
            checkpoint = {
                "model": raw.state_dict(), "optimizer": optimizer.state_dict(),
                "method": method.state_dict(), "method_name": spec.method.name, "epoch": epoch, "best": best, "rng": rng_state(),
                "num_classes": num_classes, "history": history, "class_names": list(datasets["train"].class_names),
                "predictions": predictions, "probabilities": probabilities,
            }
        yield metrics, checkpoint
    return history


# ---- several runs side by side -------------------------------------------------------------


def member_prefix(name: str) -> str:
    """The prefix of one member's metrics in a group's report (`fit_group`): ``seed-3/acc``."""
    return f"{name}/"


def seed_member(seed: int) -> str:
    """A seed group's member name for `seed`; also the folder of its `state.pt` in the group checkpoint."""
    return f"seed-{seed}"


def seed_members(spec: ExperimentSpec, seeds: list[int]) -> dict[str, ExperimentSpec]:
    """`spec` once per seed, named for `fit_group`: a sweep configuration's seeds."""
    return {seed_member(seed): spec.model_copy(update={"train": spec.train.model_copy(update={"seed": seed})})
            for seed in seeds}


def group_metrics(per_member: dict[str, dict[str, float]], means: bool = True) -> dict[str, float]:
    """A group's epoch report: every member's metrics under its prefix, and the mean over the members of
    each metric they all have (for a seed group what a scheduler such as ASHA decides on: the
    configuration, not one seed). `means=False` (members of different methods, whose mean means nothing):
    of the shared metrics only the epoch."""
    out: dict[str, float] = {}
    shared = set.intersection(*(set(m) for m in per_member.values()))
    for key in sorted(shared if means else shared & {"epoch"}):
        out[key] = float(np.mean([m[key] for m in per_member.values()]))
    for name, metrics in per_member.items():
        out.update({member_prefix(name) + k: v for k, v in metrics.items()})
    return out


def fit_group(specs: dict[str, ExperimentSpec], report: Report,
              load_state: Callable[[], dict[str, Any] | None] = lambda: None,
              runtime: Runtime | None = None) -> dict[str, list[dict[str, float]]]:
    """Train every spec of `specs` (by member name) in this process, side by side: each epoch every member
    trains and evaluates its epoch in turn, then one `report(group_metrics(...), {name: checkpoint state} or None)`.

    A member is `train_epochs` of its own spec: a sweep configuration's seeds (`seed_members`), or the
    G-Blend estimation stage's three heads, each with its own model, optimizer, loaders and its own random
    streams (the global torch / numpy / Python generators are swapped in and out around every epoch), so a
    member trained in a group computes what it computes alone, and a group resumes from one checkpoint
    holding every member's state (`load_state()` returns {name: state}). Amortises a run's fixed start-up
    (processes, imports, a worker group: seconds per Ray Train run) over the group. Returns each member's
    history."""
    epochs = {s.train.epochs for s in specs.values()}
    if len(epochs) != 1:
        raise ValueError(f"a group's members train the same number of epochs, not {sorted(epochs)}")
    one_configuration = len({s.method.name for s in specs.values()}) == 1  # seeds: their mean is the configuration's
    loaded = load_state() or {}
    runs = {name: train_epochs(s, lambda name=name: loaded.get(name), runtime) for name, s in specs.items()}
    streams: dict[str, dict[str, Any]] = {}
    histories: dict[str, list[dict[str, float]]] = {}
    while True:
        per_member, states = {}, {}
        for name, member_epochs in runs.items():
            if name in streams:
                restore_rng_state(streams[name])
            try:
                per_member[name], states[name] = next(member_epochs)
            except StopIteration as done:
                histories[name] = done.value
            streams[name] = rng_state()
        if histories:  # every member has the same epochs: they end together
            return histories
        report(group_metrics(per_member, means=one_configuration), None if any(s is None for s in states.values()) else states)
