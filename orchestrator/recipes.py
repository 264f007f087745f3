"""The recipe table: each paper spec's effective training recipe against the official one.

``experiments/recipes/official.yaml`` holds, for every ``experiments/<method>_<dataset>.yaml``, the official value of
each recipe item with the file and line it comes from, and the items where avtune departs with the reason.
:func:`effective_recipe` reads the same items off a loaded spec through the code that trains it (the audio
shape from ``workers.features.feature_shape``, the batches from the spec's own properties, the evaluation
batch from the method), so the table is checked against what runs, not against what a comment says
(``tests/test_recipes.py``, which also decodes a real clip per spec). ``python -m orchestrator.recipes``
prints the README's table.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from workers.specs import ExperimentSpec, load_spec

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
RECIPES_FILE = EXPERIMENTS / "recipes" / "official.yaml"
# The items of a recipe row, in the order the table shows them.
ITEMS = ("front_end", "sample_rate_hz", "clip_seconds", "audio_input", "audio_norm", "frames", "frame_choice",
         "frame_size", "augmentation", "global_batch", "eval_batch", "optimizer", "learning_rate", "weight_decay",
         "schedule", "epochs", "method")


def _number(value: float) -> str:
    return f"{value:.10g}"


def front_end(decode) -> str:
    """The audio transform in words, with the sizes that define it."""
    if decode.audio_feature == "spectrogram":
        return f"stft n_fft {decode.n_fft or decode.window_samples} hop {decode.hop_length}, log magnitude"
    if decode.audio_feature == "fbank":
        return f"kaldi fbank {decode.n_mels} mel, {_number(decode.win_ms)}/{_number(decode.hop_ms)} ms"
    return f"log-mel {decode.n_mels} mel, {_number(decode.win_ms)}/{_number(decode.hop_ms)} ms"


def _frame_choice(spec: ExperimentSpec) -> str:
    augment = spec.data.augment
    if not augment.random_frames:
        return "uniform"
    return "random per segment" if augment.frame_draw == "segment" else "random sorted choice"


def _augmentation(augment) -> str:
    parts = [name for on, name in ((augment.random_resized_crop, "random resized crop"),
                                   (augment.horizontal_flip, "flip")) if on]
    return " + ".join(parts) or "none"


def _schedule(train) -> str:
    if train.lr_schedule == "constant":
        text = "constant"
    elif train.lr_schedule == "step":
        text = f"step {train.lr_decay_step} x {_number(train.lr_decay_ratio)}"
        if train.lr_decay_ratio == 1:
            text = "constant"
    else:
        text = "cosine" + (f" to {_number(train.cosine_end_lr)}" if train.cosine_end_lr else "")
    if train.warmup_epochs:
        text += f", warm-up {_number(train.warmup_epochs)} epochs from {_number(train.warmup_start_lr)}"
    return text


def _optimizer(train) -> str:
    if train.optimizer != "sgd":
        return train.optimizer
    return f"sgd{' nesterov' if train.nesterov else ''} momentum {_number(train.momentum)}"


def effective_recipe(spec: ExperimentSpec, audio_input: tuple[int, int] | None = None) -> dict[str, Any]:
    """The recipe items of ``spec`` as avtune trains it. ``audio_input``: the ``(T, F)`` of a real decoded
    clip; by default the shape the feature function gives for the spec's clip length."""
    from workers.features import feature_shape  # torch: only where shapes are computed
    from workers.methods import get_method

    decode, train = spec.data.decode, spec.train
    if audio_input is None:
        audio_input = feature_shape(decode)[1:]
    method = get_method(spec.method.name)(spec, None)
    norm = "none" if decode.audio_mean is None else f"(x - {_number(decode.audio_mean)}) / {_number(decode.audio_std)}"
    return {
        "front_end": front_end(decode),
        "sample_rate_hz": decode.sample_rate_hz,
        "clip_seconds": decode.clip_seconds,
        "audio_input": f"{audio_input[0]} x {audio_input[1]}",
        "audio_norm": norm,
        "frames": decode.num_frames,
        "frame_choice": _frame_choice(spec),
        "frame_size": f"{decode.frame_height} x {decode.frame_width}",
        "augmentation": _augmentation(spec.data.augment),
        "global_batch": spec.global_batch,
        "eval_batch": method.evaluation_batch_size() or spec.global_batch,
        "optimizer": _optimizer(train),
        "learning_rate": train.learning_rate,
        "weight_decay": train.weight_decay,
        "schedule": _schedule(train),
        "epochs": train.epochs,
        "method": spec.method.model_dump(mode="json", exclude={"name"}),
    }


def load_recipes(path: Path = RECIPES_FILE) -> dict[str, dict[str, Any]]:
    with open(path) as handle:
        return yaml.safe_load(handle)


def _official_method(official: dict[str, Any], effective: dict[str, Any]) -> dict[str, Any]:
    """The official method values, compared on the fields the row gives."""
    return {k: effective.get(k) for k in official}


def compare(name: str, row: dict[str, Any], effective: dict[str, Any]) -> list[str]:
    """Problems of one row: an item that differs and is not listed as a departure, or a listed departure
    that no longer differs (the table would then claim a departure that is gone)."""
    problems = []
    departures = row.get("departures", {})
    for item in ITEMS:
        if item not in row["official"]:
            problems.append(f"{name}: no official value for {item}")
            continue
        official = row["official"][item]["value"]
        if official is None:  # the official code does not fix it (e.g. no released recipe for this dataset)
            continue
        value = effective[item]
        if item == "method":
            value = _official_method(official, value)
        same = value == official
        if not same and item not in departures:
            problems.append(f"{name}: {item} is {value!r}, official {official!r} ({row['official'][item]['ref']}), "
                            "and the row lists no departure")
        if same and item in departures:
            problems.append(f"{name}: {item} matches the official {official!r} but the row lists a departure")
    return problems


def _cell(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_cell(v)}" for k, v in value.items())
    return "not given" if value is None else str(value).replace("|", "\\|")


def markdown(recipes: dict[str, dict[str, Any]] | None = None) -> str:
    """README's recipe table: per paper spec, the official source and every departure with its reason."""
    recipes = recipes or load_recipes()
    lines = ["| spec | official recipe | departures (avtune: why) |", "|---|---|---|"]
    for name, row in recipes.items():
        spec = load_spec(EXPERIMENTS / f"{name}.yaml")
        effective = effective_recipe(spec)
        official = row["official"]
        summary = (f"{_cell(row['source'])}: {official['front_end']['value']} ({official['audio_input']['value']}), "
                   f"frames {official['frames']['value']}, global batch {official['global_batch']['value']}, "
                   f"{official['optimizer']['value']} lr {official['learning_rate']['value']}, "
                   f"{official['schedule']['value']}, {official['epochs']['value']} epochs")
        departures = "; ".join(
            f"**{item}** {_cell(effective[item] if item != 'method' else _official_method(official[item]['value'], effective[item]))} "
            f"(official {_cell(official[item]['value'])}): {why}"
            for item, why in row.get("departures", {}).items())
        notes = "; ".join(_cell(note) for note in row.get("notes", []))
        departures = "; ".join(part for part in (departures, notes) if part) or "none"
        lines.append(f"| `{name}` | {summary} | {departures} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(markdown() + "\n")
