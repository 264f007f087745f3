"""`avtune data ...`: generate and inspect audio-visual clip datasets (thin over orchestrator.synth)."""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

data_app = typer.Typer(
    help="Generate synthetic audio-visual clip datasets and inspect dataset folders.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()


@data_app.callback()
def _console_sized_now() -> None:
    # rich fixes a console's width from COLUMNS when the console is created: create it when a command
    # runs, not when this module is imported (a width from whatever environment imported it first).
    global console
    console = Console()


class Layout(str, Enum):
    avtune = "avtune"
    cremad = "cremad"
    vggsound = "vggsound"
    kinetics_sounds = "kinetics-sounds"
    ave = "ave"


def _fail(message: str) -> None:
    # escape: paths in messages may hold "[...]", which rich would read as markup
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(2)


class CardError(ValueError):
    """A ``card.json`` that cannot be used: the message names the file and what is wrong."""


# What `_print_card_summary` reads: top-level keys, then the keys of each split's entry.
CARD_KEYS = ("informative_realised", "best_achievable_accuracy", "params")
CARD_SPLIT_KEYS = {
    "informative_realised": ("clips", "audio", "visual"),
    "best_achievable_accuracy": ("audio", "visual", "audio_visual"),
}


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def read_card(root: Path) -> dict[str, Any] | None:
    """The dataset's generation card, ``root/card.json``; ``None`` when the folder has none.

    Raises :class:`CardError` ("card.json at <path>: <what is wrong>") for a file that is unreadable,
    not UTF-8, empty, not valid JSON, not a JSON object, or lacks a key the card summary needs.
    """
    from orchestrator.synth import CARD_FILE

    path = Path(root) / CARD_FILE
    if not path.is_file():
        return None
    where = f"{CARD_FILE} at {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CardError(f"{where}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except OSError as err:
        raise CardError(f"{where}: cannot be read ({err.strerror or err})") from None
    if not text.strip():
        raise CardError(f"{where}: empty file (regenerate the dataset with `avtune data synth`)")
    try:
        card = json.loads(text)
    except json.JSONDecodeError as err:
        raise CardError(f"{where}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    if not isinstance(card, dict):
        raise CardError(f"{where}: top level is {_json_type(card)}, expected a JSON object")
    missing = [key for key in CARD_KEYS if key not in card]
    if missing:
        raise CardError(f"{where}: missing key{'s' if len(missing) > 1 else ''} "
                        + ", ".join(repr(key) for key in missing))
    for key in CARD_KEYS:
        if not isinstance(card[key], dict):
            raise CardError(f"{where}: key {key!r} is {_json_type(card[key])}, expected a JSON object")
    for split in card["informative_realised"]:
        if split not in card["best_achievable_accuracy"]:
            raise CardError(f"{where}: missing key 'best_achievable_accuracy.{split}'")
        for key, needed in CARD_SPLIT_KEYS.items():
            entry = card[key][split]
            if not isinstance(entry, dict):
                raise CardError(f"{where}: key '{key}.{split}' is {_json_type(entry)}, expected a JSON object")
            for sub in needed:
                if sub not in entry:
                    raise CardError(f"{where}: missing key '{key}.{split}.{sub}'")
    return card


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _print_card_summary(card: dict[str, Any]) -> None:
    table = Table(title="Card: informative clips and best achievable accuracy")
    for column in ("split", "clips", "audio informative", "visual informative",
                   "best audio acc", "best visual acc", "best audio+visual acc"):
        table.add_column(column, justify="right" if column != "split" else "left")
    for split, info in card["informative_realised"].items():
        best = card["best_achievable_accuracy"][split]
        table.add_row(split, _fmt(info["clips"]), _fmt(info["audio"]), _fmt(info["visual"]),
                      _fmt(best["audio"]), _fmt(best["visual"]), _fmt(best["audio_visual"]))
    console.print(table)
    params = card.get("params", {})
    console.print("generation parameters: " + ", ".join(f"{k}={v}" for k, v in params.items()))
    console.print(f"validation split: {card.get('validation_split', '-')}")


@data_app.command()
def synth(
    out: Path = typer.Option(..., "--out", help="folder to write the dataset into"),
    layout: Layout = typer.Option(Layout.avtune, help="on-disk layout of the dataset"),
    classes: int = typer.Option(6, help="number of classes K"),
    clips_per_class: int = typer.Option(50, help="clips per class"),
    clip_seconds: float = typer.Option(1.0, help="clip length in seconds"),
    fps: float = typer.Option(10, help="video frame rate"),
    height: int = typer.Option(64, help="frame height in pixels"),
    width: int = typer.Option(64, help="frame width in pixels"),
    sample_rate_hz: int = typer.Option(16000, help="audio sampling rate"),
    audio_informative: float = typer.Option(0.9, help="share of clips whose audio carries their class signature"),
    visual_informative: float = typer.Option(0.6, help="share of clips whose video carries their class signature"),
    audio_noise_std: float = typer.Option(0.03, help="white-noise std on the waveform (full scale 1): how hard audio is to recognise"),
    visual_noise_std: float = typer.Option(12.0, help="pixel-noise std (0-255): how hard video is to recognise"),
    audio_uninformative: str = typer.Option(
        "other_class", help="a non-informative clip's audio: other_class (another class's chord) or no_signature (noise)"),
    visual_uninformative: str = typer.Option(
        "other_class", help="a non-informative clip's video: other_class (another class's object) or no_signature"),
    seed: int = typer.Option(0, help="random seed"),
) -> None:
    """Generate H.264/AAC clips with per-class audio and visual signatures and a known imbalance."""
    import time

    from orchestrator.synth import synthesize_dataset

    started = time.perf_counter()
    try:
        with console.status(f"encoding {classes * clips_per_class} clips into {out}"):
            card = synthesize_dataset(
                out, layout=layout.value, classes=classes, clips_per_class=clips_per_class,
                clip_seconds=clip_seconds, fps=fps, height=height, width=width,
                sample_rate_hz=sample_rate_hz, audio_informative=audio_informative,
                visual_informative=visual_informative, audio_noise_std=audio_noise_std,
                visual_noise_std=visual_noise_std, audio_uninformative=audio_uninformative,
                visual_uninformative=visual_uninformative, seed=seed,
            )
    except FileExistsError as err:  # a folder the generator does not write into: named, no traceback
        _fail(str(err).replace("data.root:", "--out:", 1))
    except ValueError as err:
        _fail(str(err))
    console.print(
        f"[green]wrote[/] {card['num_clips']} clips ({card['num_classes']} classes, {layout.value} layout) "
        f"to {escape(str(out))} in {time.perf_counter() - started:.1f} s"
    )
    _print_card_summary(card)


@data_app.command()
def inspect(
    root: Path = typer.Argument(..., help="dataset folder"),
    layout: Layout = typer.Option(Layout.avtune, help="on-disk layout of the dataset"),
    probe_limit: int = typer.Option(64, help="clips whose media are probed (0 = all)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON instead of tables"),
) -> None:
    """Show clips per class and split, stream properties, durations and the generation card."""
    from workers.layouts import ManifestError
    from orchestrator.synth import inspect_dataset

    try:
        card = read_card(root)  # first: inspect_dataset would fail on a bad card without naming it
        summary = inspect_dataset(root, layout.value, probe_limit=probe_limit)
    except (ValueError, ManifestError) as err:
        _fail(str(err))
    summary["card"] = card
    problems = summary["problems"] + summary["media"]["errors"]
    if as_json:
        console.print_json(json.dumps(summary, default=str))
        if problems:
            raise typer.Exit(1)
        return

    counts = Table(title=f"Clips per class and split: {root} ({layout.value})")
    counts.add_column("class")
    splits = list(summary["counts"])
    for split in splits:
        counts.add_column(split, justify="right")
    counts.add_column("total", justify="right")
    for name in summary["class_names"]:
        per = [summary["counts"][split][name] for split in splits]
        counts.add_row(name, *map(str, per), str(sum(per)))
    counts.add_row("[bold]all", *(str(summary["totals"][s]) for s in splits), str(summary["totals"]["all"]))
    console.print(counts)

    media = summary["media"]
    streams = Table(title=f"Streams ({media['files_probed']} files of {media['clips_probed']} clips probed)")
    for column in ("type", "ext", "codec", "size / rate", "detail", "files"):
        streams.add_column(column)
    for s in media["streams"]:
        streams.add_row(s["type"], s["extension"], str(s["codec"]), s["size_or_rate"], s["detail"], str(s["files"]))
    console.print(streams)
    if media["duration_s"]:
        d = media["duration_s"]
        console.print(f"durations: min {d['min']:.3f} s, mean {d['mean']:.3f} s, max {d['max']:.3f} s")
    if summary["card"]:
        _print_card_summary(summary["card"])
    else:
        console.print("no card.json (not a generated dataset)")
    if problems:
        # One plain "where: problem" line each, never wrapped or cut (a table would fold or
        # ellipsize long paths), so the full path can be copied or grepped; exit 1 = problems found.
        console.print(f"[bold red]{len(problems)} problem(s):[/]")
        for where, problem in problems:
            console.print(Text(f"{where}: {problem}", style="red"), soft_wrap=True, highlight=False)
        raise typer.Exit(1)
