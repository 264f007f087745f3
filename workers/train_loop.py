"""Ray Train adapter: the function each Ray Train worker runs. The training itself is
`workers.engine.fit` (plain PyTorch); Ray is touched only at the marked points: the worker's
context and device, DDP wrapping, the checkpoint to resume from, and `ray.train.report`.

The spec arrives as plain data (`ExperimentSpec.model_dump(mode="json")`) and is validated back
into the pydantic model here, or as `group` {member name: spec} when the run trains several side by side
(a sweep configuration's seeds, the G-Blend estimation stage's heads); MLflow is not touched: the controller-side callback logs the reports.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

import ray.train
import ray.train.torch

from workers.engine import Runtime, fit, fit_group
from workers.specs import ExperimentSpec

CHECKPOINT_FILE = "state.pt"


def load_checkpoint_state(ckpt_dir: str | os.PathLike[str]) -> dict[str, Any]:
    state_file = Path(ckpt_dir) / CHECKPOINT_FILE
    try:
        return torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as err:
        # A registered checkpoint always holds a complete state.pt (written, then renamed, before
        # the report), so this is damage on disk or a foreign file: stop and name it rather than
        # train on from scratch or from whatever could be read.
        # The path goes last: Ray Train keeps the tail of a worker's error.
        raise RuntimeError(f"checkpoint cannot be loaded ({type(err).__name__}): truncated, corrupt, or holding "
                           f"objects other than tensors and plain data, which weights_only refuses: {state_file}") from err


def save_checkpoint_state(state: dict[str, Any], folder: str | os.PathLike[str]) -> None:
    # Written under a temporary name then renamed, so a kill mid-write never leaves a file named
    # state.pt that could be loaded half-written.
    partial = Path(folder) / (CHECKPOINT_FILE + ".partial")
    torch.save(state, partial)
    os.replace(partial, Path(folder) / CHECKPOINT_FILE)


def _load_ray_checkpoint() -> dict[str, Any] | None:
    checkpoint = ray.train.get_checkpoint()  # Ray: the latest reported checkpoint after a restart or resume
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as ckpt_dir:
        return load_checkpoint_state(ckpt_dir)


def _load_ray_group_checkpoint() -> dict[str, dict[str, Any]] | None:
    """A group's checkpoint holds one `state.pt` per member, in a subfolder named after it (`seed-3`)."""
    checkpoint = ray.train.get_checkpoint()  # Ray: the latest reported checkpoint after a restart or resume
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as ckpt_dir:
        return {folder.name: load_checkpoint_state(folder) for folder in Path(ckpt_dir).iterdir() if folder.is_dir()}


def _report_to_ray(metrics: dict[str, float], state: dict[str, Any] | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if state is not None:
            save_checkpoint_state(state, tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)  # Ray: metrics to the controller, checkpoint to storage


def _report_group_to_ray(metrics: dict[str, float], states: dict[str, dict[str, Any]] | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if states is not None:
            for name, state in states.items():
                folder = Path(tmp) / name
                folder.mkdir()
                save_checkpoint_state(state, folder)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)  # Ray: one report and one checkpoint for the group


def train_loop_per_worker(config: dict[str, Any]) -> None:
    ctx = ray.train.get_context()  # Ray: this worker's place in the group
    runtime = Runtime(
        device=ray.train.torch.get_device(),
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        prepare_model=ray.train.torch.prepare_model,  # Ray: DDP (and device placement)
        prepare_data_loader=ray.train.torch.prepare_data_loader,  # Ray: DistributedSampler per rank
    )
    if "group" in config:  # several runs side by side: a configuration's seeds, or the estimation stage's heads
        specs = {name: ExperimentSpec.model_validate(data) for name, data in config["group"].items()}
        fit_group(specs, report=_report_group_to_ray, load_state=_load_ray_group_checkpoint, runtime=runtime)
    else:
        fit(ExperimentSpec.model_validate(config["spec"]), report=_report_to_ray, load_state=_load_ray_checkpoint,
            runtime=runtime)
