"""Simulated sweeps for the report's statistics: the table and per-clip predictions a real sweep's runs
log (`analysis.imbalance_summary` rows, `predictions.csv` frames), drawn from a model whose truth is known.

A configuration k trained with seed s is right on clip c with probability ``base_m[c] + u[k, s] + effect``,
per head m (joint, audio, visual): ``base_m`` a clip's difficulty (shared by every configuration, as real
clips are easier or harder for every model), ``u[k, s] ~ N(0, seed_sd^2)`` the luck of that trained model,
``effect`` the configuration's true gain on that head (0 in a null sweep)."""
from __future__ import annotations

import numpy as np
import pandas as pd

HEADS = {"acc": "pred", "acc_audio": "pred_audio", "acc_visual": "pred_visual"}
# Mean accuracy per head: audio the strong modality, visual the weak one, as in the README's sweeps.
HEAD_MEAN = {"acc": 0.85, "acc_audio": 0.8, "acc_visual": 0.35}


def clip_difficulty(rng: np.random.Generator, n_clips: int) -> dict[str, np.ndarray]:
    """Per head, each clip's probability of being right for an average model (Beta, mean HEAD_MEAN, sd ~0.15)."""
    out = {}
    for head, mean in HEAD_MEAN.items():
        strength = mean * (1 - mean) / 0.15 ** 2 - 1
        out[head] = rng.beta(mean * strength, (1 - mean) * strength, size=n_clips)
    return out


def simulated_sweep(rng: np.random.Generator, n_configs: int, n_seeds: int, n_clips: int, seed_sd: float,
                    effects: dict[tuple[int, str], float] | None = None,
                    base: dict[str, np.ndarray] | None = None) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """(table, predictions) of a sweep: configuration 0 is normal, 1 .. n_configs - 1 OGM-GE variants
    (alpha differs), each over seeds 0 .. n_seeds - 1; `effects` maps (configuration, head) to a true
    difference in that head's accuracy."""
    effects = effects or {}
    base = base if base is not None else clip_difficulty(rng, n_clips)
    labels = rng.integers(0, 6, size=n_clips)
    clip_ids = pd.Index([f"clip{c:04d}" for c in range(n_clips)], name="clip_id")
    rows, predictions = [], {}
    for k in range(n_configs):
        method, config = ("normal", "normal") if k == 0 else ("ogm_ge", f"ogm_ge alpha={k}")
        for s in range(n_seeds):
            run_id = f"run{k:02d}s{s}"
            frame = {"label": labels}
            row = {"run_id": run_id, "group": "", "config": config, "method": method, "seed": str(s)}
            for head, column in HEADS.items():
                p = np.clip(base[head] + rng.normal(0.0, seed_sd) + effects.get((k, head), 0.0), 0.0, 1.0)
                right = rng.random(n_clips) < p
                frame[column] = np.where(right, labels, (labels + 1) % 6)
                row[head] = float(right.mean())
            predictions[run_id] = pd.DataFrame(frame, index=clip_ids)
            rows.append(row)
    return pd.DataFrame(rows), predictions
