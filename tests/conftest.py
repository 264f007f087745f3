"""Shared fixtures: small generated datasets of real PyAV-encoded clips (session-scoped)."""
from __future__ import annotations

from pathlib import Path

import pytest

from workers.layouts import LAYOUTS
from workers.synth import synthesize_dataset

# One place for the small-set parameters, so tests can compute expectations from them.
SMALL_SET = dict(
    classes=3,
    clips_per_class=8,
    clip_seconds=1.0,
    fps=8,
    height=32,
    width=32,
    sample_rate_hz=16000,
    audio_informative=0.9,
    visual_informative=0.6,
    seed=0,
)


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a generated ``avtune``-layout dataset: 3 classes x 8 clips of 1 s, 32x32, 8 fps.

    Splits per class: 6 train / 1 val / 1 test. Read-only for tests: copy it before modifying.
    """
    root = tmp_path_factory.mktemp("synth") / "avtune"
    synthesize_dataset(root, layout="avtune", **SMALL_SET)
    return root


@pytest.fixture(scope="session")
def synth_layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small generated dataset per layout (3 classes x 4 clips, 0.5 s, 32x32): layout -> root."""
    base = tmp_path_factory.mktemp("layouts")
    roots = {}
    for layout in LAYOUTS:
        roots[layout] = base / layout
        synthesize_dataset(
            roots[layout], layout=layout, classes=3, clips_per_class=4, clip_seconds=0.5, fps=8,
            height=32, width=32, sample_rate_hz=16000, seed=1,
        )
    return roots


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session (token auth as Ray sets it by default); shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
