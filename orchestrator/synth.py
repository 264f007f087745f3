"""Generated audio-visual clip datasets with a known, controllable modality imbalance.

Each class has a visual signature (colour, shape and motion direction of a moving object over a
noisy background) and an audio signature (a two-tone chord with a class-specific pitch and
amplitude-modulation rate, plus noise). Clips are encoded as real media with PyAV (H.264 video
via ``libx264``, AAC or PCM audio), so the whole decode path is exercised.

Imbalance: with ``audio_informative = p``, exactly ``round(p * n)`` clips of every split (n clips;
halves round up) carry their own class's audio signature and the others carry the signature of
another class drawn uniformly (``audio_uninformative="other_class"``: the modalities conflict) or no
signature at all (``"no_signature"``: only that modality's noise, a silent-but-noisy track or an empty
scene, so the other modality can complement it); the same holds for video, drawn independently. The informative
clips are allocated to classes proportionally to class size (largest remainder, ties broken by
the seeded RNG). A classifier that recognises the signature perfectly can therefore reach at most
the "best achievable" accuracies the card reports, which are computed from the realised signatures.

Difficulty: ``audio_noise_std`` (white noise on the waveform, full scale 1; the chord peaks at
0.25-0.4) and ``visual_noise_std`` (Gaussian pixel noise, 0-255 scale, on the background; half of
it on the object) set how hard each signature is to *recognise*, independently of how often it is
informative. They change how fast a network learns a modality, not which signature a clip carries,
so the card's best achievable accuracies stay exact for a perfect recogniser (an upper bound for a
real one). The defaults (0.03 and 12) are the generator's original levels: outputs for existing
parameters are byte-identical, and the card lists these two parameters only when they differ
from the defaults. E.g. ``audio_noise_std=0.45`` makes audio the slower modality to learn even
when fully informative (the visual-dominant case of ``tests/test_phenomenon.py``).

Outputs next to the media: ``manifest.csv`` (``path,label,split[,audio_path]``), ``classes.txt``,
``signatures.csv`` (per-clip ground truth: which class's signature each modality carries),
and ``card.json`` (written last: its presence means the set is complete).
"""

from __future__ import annotations

import colorsys
import base64
import csv
import hashlib
import io
import json
import logging
import math
import os
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

import av
import numpy as np

from orchestrator.folders import claim_folder, holds_marker, make_parents_inside
from workers.layouts import (
    AVE_HEADER,
    CREMAD_EMOTIONS,
    DERIVED_VAL_FRACTION,
    LAYOUTS,
    LAYOUTS_WITH_DERIVED_VAL,
    SPLITS,
    derive_validation,
    round_half_up,
)
from workers.specs import (
    CONTENT_DEFAULTS,
    DIFFICULTY_DEFAULTS,
    UNINFORMATIVE_CONTENT,
    SynthSpec,
    drop_added_defaults,
    field_bounds,
)

__all__ = [
    "synthesize_dataset",
    "inspect_dataset",
    "class_signatures",
    "best_achievable_accuracy",
    "CARD_FILE",
    "MANIFEST_FILE",
    "SIGNATURES_FILE",
]

logger = logging.getLogger(__name__)

CARD_FILE = "card.json"
# Written first into every folder the generator makes: the only folders it ever writes into again.
GENERATOR_MARKER = ".avtune-generated"
MANIFEST_FILE = "manifest.csv"
SIGNATURES_FILE = "signatures.csv"
CLASSES_FILE = "classes.txt"
CARD_VERSION = 1
# The signature index of a modality that carries none (audio_uninformative="no_signature").
NO_SIGNATURE = -1

SHAPES = ("square", "disc", "diamond")
# Class pitches are spread log-uniformly between these (the upper bound also stays below
# 0.35 x the sampling rate, well inside the Nyquist band).
_LOW_HZ = 200.0
_HIGH_HZ = 3500.0
_CHORD_RATIO = 1.25  # second tone a major third above the first
# Default noise levels (audio_noise_std / visual_noise_std of synthesize_dataset): the spec's.
_NOISE_STD_AUDIO = DIFFICULTY_DEFAULTS["audio_noise_std"]
_NOISE_STD_PIXEL = DIFFICULTY_DEFAULTS["visual_noise_std"]
_BACKGROUND = 110.0
# CREMA-D clip ids are ACTOR_SENTENCE_EMOTION_LEVEL; these are its 12 sentence codes.
_CREMAD_SENTENCES = ("IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI")


# ---- signatures ---------------------------------------------------------------------------


def class_signatures(classes: int, sample_rate_hz: int) -> list[dict[str, Any]]:
    """Per-class visual and audio signatures (deterministic; depends only on the class index).

    Visual: colour hue ``c / classes`` (HSV s=0.9, v=0.95), shape ``SHAPES[c % 3]``, motion
    direction ``360 * c / classes`` degrees. Audio: chord ``(f_c, 1.25 f_c)`` with ``f_c``
    log-uniform from 200 Hz to ``min(3500, 0.35 sr)`` Hz over the classes, amplitude-modulated at
    ``3 + 2 (c mod 6)`` Hz.
    """
    high = min(_HIGH_HZ, 0.35 * sample_rate_hz)
    out = []
    for c in range(classes):
        position = c / (classes - 1) if classes > 1 else 0.0
        base = _LOW_HZ * (high / _LOW_HZ) ** position
        red, green, blue = colorsys.hsv_to_rgb(c / classes, 0.9, 0.95)
        out.append(
            {
                "colour_rgb": [int(round(255 * red)), int(round(255 * green)), int(round(255 * blue))],
                "shape": SHAPES[c % len(SHAPES)],
                "motion_deg": round(360.0 * c / classes, 3),
                "tone_hz": [round(base, 3), round(base * _CHORD_RATIO, 3)],
                "am_hz": 3.0 + 2.0 * (c % 6),
            }
        )
    return out


def _render_video(
    signature: dict[str, Any] | None, rng: np.random.Generator, num_frames: int, height: int, width: int,
    noise_std: float = _NOISE_STD_PIXEL,
) -> np.ndarray:
    """uint8 ``(num_frames, height, width, 3)``: a moving object over a noisy grey background (no
    object when `signature` is None: an empty scene)."""
    if signature is None:
        noise = rng.normal(0.0, noise_std, size=(num_frames, height, width, 3)).astype(np.float32)
        return np.clip(_BACKGROUND + noise, 0, 255).astype(np.uint8)
    side = min(height, width)
    radius = 0.14 * side * rng.uniform(0.85, 1.15)
    travel = 0.3 * side  # distance covered over the whole clip
    angle = math.radians(signature["motion_deg"])
    dx, dy = math.cos(angle) * travel, -math.sin(angle) * travel

    def start(extent: int, delta: float) -> float:
        low, high = radius - min(0.0, delta), extent - radius - max(0.0, delta)
        return rng.uniform(low, high) if high > low else extent / 2.0 - delta / 2.0

    x0, y0 = start(width, dx), start(height, dy)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    colour = np.array(signature["colour_rgb"], dtype=np.float32)
    noise = rng.normal(0.0, noise_std, size=(num_frames, height, width, 3)).astype(np.float32)
    frames = np.full((num_frames, height, width, 3), _BACKGROUND, dtype=np.float32) + noise
    for t in range(num_frames):
        progress = t / (num_frames - 1) if num_frames > 1 else 0.0
        ox, oy = xx - (x0 + dx * progress), yy - (y0 + dy * progress)
        if signature["shape"] == "square":
            mask = np.maximum(np.abs(ox), np.abs(oy)) <= radius
        elif signature["shape"] == "disc":
            mask = ox * ox + oy * oy <= radius * radius
        else:
            mask = np.abs(ox) + np.abs(oy) <= 1.3 * radius
        frames[t][mask] = colour + noise[t][mask] * 0.5
    return np.clip(frames, 0, 255).astype(np.uint8)


def _render_audio(
    signature: dict[str, Any] | None, rng: np.random.Generator, num_samples: int, sample_rate_hz: int,
    noise_std: float = _NOISE_STD_AUDIO,
) -> np.ndarray:
    """float32 ``(num_samples,)`` in [-1, 1]: the class chord, amplitude-modulated, plus noise (the noise
    alone when `signature` is None: a silent-but-noisy track)."""
    if signature is None:
        return np.clip(rng.normal(0.0, noise_std, size=num_samples), -1.0, 1.0).astype(np.float32)
    t = np.arange(num_samples, dtype=np.float64) / sample_rate_hz
    detune = 1.0 + rng.uniform(-0.02, 0.02)
    low, high = (f * detune for f in signature["tone_hz"])
    phases = rng.uniform(0, 2 * np.pi, size=3)
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * signature["am_hz"] * t + phases[0])
    chord = (np.sin(2 * np.pi * low * t + phases[1]) + 0.7 * np.sin(2 * np.pi * high * t + phases[2])) / 1.7
    amplitude = rng.uniform(0.25, 0.4)
    signal = amplitude * envelope * chord + rng.normal(0.0, noise_std, size=num_samples)
    return np.clip(signal, -1.0, 1.0).astype(np.float32)


# ---- encoding -----------------------------------------------------------------------------


def _add_video_stream(container: av.container.OutputContainer, fps: float, height: int, width: int):
    stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
    stream.width, stream.height = width, height
    # 4:2:0 needs even sizes; odd sizes use 4:4:4 (High 4:4:4 profile, decodable by FFmpeg).
    stream.pix_fmt = "yuv420p" if height % 2 == 0 and width % 2 == 0 else "yuv444p"
    # Constant QP and one thread keep the output byte-identical run to run: in CRF mode x264's
    # macroblock-tree rate control gave run-to-run differences on these small, flat frames.
    stream.codec_context.options = {"preset": "veryfast", "qp": "18"}
    stream.codec_context.thread_count = 1
    return stream


def _mux_video(container, stream, frames: np.ndarray) -> None:
    for index, image in enumerate(frames):
        # Converting to the encoder's pixel format here (rather than letting the encoder do it)
        # makes the output byte-identical run to run; the implicit conversion was not.
        frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=stream.pix_fmt)
        frame.pts = index
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def _mux_audio(container, stream, samples: np.ndarray, sample_rate_hz: int) -> None:
    codec_format = stream.codec_context.format.name
    chunk = stream.codec_context.frame_size or 1024
    for start in range(0, samples.shape[0], chunk):
        piece = samples[start : start + chunk]
        if codec_format.startswith("s16"):
            array = np.round(piece * 32767.0).astype(np.int16)[None, :]
            frame = av.AudioFrame.from_ndarray(array, format="s16", layout="mono")
        else:
            frame = av.AudioFrame.from_ndarray(piece[None, :], format=codec_format, layout="mono")
        frame.sample_rate = sample_rate_hz
        frame.pts = start
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def _write_media(
    path: Path,
    *,
    frames: np.ndarray | None,
    samples: np.ndarray | None,
    fps: float,
    sample_rate_hz: int,
    container_format: str | None = None,
) -> None:
    """Encode to ``path`` (video: libx264; audio: AAC, or PCM s16 for .wav) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(handle)
    try:
        fmt = container_format or {".mp4": "mp4", ".flv": "flv", ".wav": "wav"}[path.suffix]
        with av.open(temporary, mode="w", format=fmt) as container:
            video = None
            if frames is not None:
                video = _add_video_stream(container, fps, frames.shape[1], frames.shape[2])
            audio = None
            if samples is not None:
                codec = "pcm_s16le" if fmt == "wav" else "aac"
                audio = container.add_stream(codec, rate=sample_rate_hz, layout="mono")
                if codec == "aac":
                    audio.bit_rate = 64000
            if video is not None:
                _mux_video(container, video, frames)
            if audio is not None:
                _mux_audio(container, audio, samples, sample_rate_hz)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# ---- clip plan ----------------------------------------------------------------------------


@dataclass
class _Clip:
    index: int  # global, class-major
    label: int
    clip_id: str
    split: str = ""
    audio_signature: int = -1
    visual_signature: int = -1
    video_rel: str = ""
    audio_rel: str = ""
    video_has_audio: bool = True  # False: the video file is video-only (CREMA-D's VideoFlash)


def _youtube_like_id(seed: int, index: int) -> str:
    digest = hashlib.sha1(f"avtune-synth/{seed}/{index}".encode()).digest()
    return base64.urlsafe_b64encode(digest).decode()[:11]


def _class_names(layout: str, classes: int) -> list[str]:
    if layout == "cremad":
        if classes > len(CREMAD_EMOTIONS):
            raise ValueError(
                f"classes: the cremad layout has {len(CREMAD_EMOTIONS)} emotion classes "
                f"{CREMAD_EMOTIONS}, got classes={classes}"
            )
        return list(CREMAD_EMOTIONS[:classes])
    return [f"class_{c:02d}" for c in range(classes)]


def _clip_id(layout: str, seed: int, index: int, label_name: str, within_class: int) -> str:
    if layout == "cremad":
        actor = 1001 + index // len(_CREMAD_SENTENCES)
        return f"{actor}_{_CREMAD_SENTENCES[index % len(_CREMAD_SENTENCES)]}_{label_name}_XX"
    if layout == "vggsound":
        return f"{_youtube_like_id(seed, index)}_{(index * 7) % 300}"
    if layout == "kinetics-sounds":
        start = (index * 7) % 300
        return f"{_youtube_like_id(seed, index)}_{start:06d}_{start + 10:06d}"
    if layout == "ave":
        return _youtube_like_id(seed, index)
    return f"{label_name}_{within_class:04d}"


def _assign_splits(
    clips: list[_Clip], classes: int, layout: str, fractions: Sequence[float], rng: np.random.Generator
) -> None:
    """Per class: shuffle, then test / val / train counts from ``fractions``.

    Layouts without an official val list put val + train into the official train list and take
    val from it with :func:`workers.layouts.derive_validation`, exactly as the loader does.
    """
    f_train, f_val, f_test = fractions
    for c in range(classes):
        members = [clip for clip in clips if clip.label == c]
        order = rng.permutation(len(members))
        n = len(members)
        n_test = round_half_up(f_test * n)
        n_val = round_half_up(f_val * n)
        # Every split with a positive share gets a clip when the class has enough of them.
        if f_test > 0 and n >= 3:
            n_test = max(n_test, 1)
        if f_val > 0 and n >= 3:
            n_val = max(n_val, 1)
        n_test = min(n_test, n - 1)
        n_val = min(n_val, n - 1 - n_test)
        for rank, position in enumerate(order):
            clip = members[position]
            if rank < n_test:
                clip.split = "test"
            elif layout not in LAYOUTS_WITH_DERIVED_VAL and rank < n_test + n_val:
                clip.split = "val"
            else:
                clip.split = "train"
    if layout in LAYOUTS_WITH_DERIVED_VAL:
        official_train = [clip for clip in clips if clip.split == "train"]
        val_ids = derive_validation(((c.clip_id, str(c.label)) for c in official_train), DERIVED_VAL_FRACTION)
        for clip in official_train:
            if clip.clip_id in val_ids:
                clip.split = "val"


def _allocate(total: int, sizes: list[int], rng: np.random.Generator) -> list[int]:
    """Split ``total`` over groups proportionally to ``sizes`` (largest remainder, random ties)."""
    n = sum(sizes)
    if n == 0:
        return [0] * len(sizes)
    quotas = [total * size / n for size in sizes]
    counts = [min(int(math.floor(q)), size) for q, size in zip(quotas, sizes)]
    tie_break = rng.random(len(sizes))
    order = sorted(range(len(sizes)), key=lambda g: (-(quotas[g] - math.floor(quotas[g])), tie_break[g]))
    remaining = total - sum(counts)
    while remaining > 0:
        progressed = False
        for g in order:
            if remaining == 0:
                break
            if counts[g] < sizes[g]:
                counts[g] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            break
    return counts


def _assign_signatures(
    clips: list[_Clip], classes: int, fraction: float, attribute: str, rng: np.random.Generator,
    uninformative: str = "other_class",
) -> None:
    """Exactly ``round_half_up(fraction * n)`` clips per split carry their own class's signature; the
    others another class's (``"other_class"``) or none (``"no_signature"``: ``NO_SIGNATURE``)."""
    for split in SPLITS:
        members = [clip for clip in clips if clip.split == split]
        if not members:
            continue
        target = round_half_up(fraction * len(members))
        by_class = [[clip for clip in members if clip.label == c] for c in range(classes)]
        counts = _allocate(target, [len(group) for group in by_class], rng)
        for group, count in zip(by_class, counts):
            informative = set(rng.permutation(len(group))[:count].tolist())
            for position, clip in enumerate(group):
                if position in informative:
                    setattr(clip, attribute, clip.label)
                elif uninformative == "no_signature":
                    setattr(clip, attribute, NO_SIGNATURE)
                else:
                    other = int(rng.integers(0, classes - 1))
                    setattr(clip, attribute, other if other < clip.label else other + 1)


def _signature(signatures: list[dict[str, Any]], index: int) -> dict[str, Any] | None:
    return None if index == NO_SIGNATURE else signatures[index]


def _signature_name(class_names: list[str], index: int) -> str:
    """A signature as signatures.csv names it: its class, or "none"."""
    return "none" if index == NO_SIGNATURE else class_names[index]


def _place_files(clip: _Clip, layout: str, label_name: str) -> None:
    cid = clip.clip_id
    if layout == "avtune":
        clip.video_rel = clip.audio_rel = f"clips/{label_name}/{cid}.mp4"
    elif layout == "cremad":
        clip.video_rel, clip.audio_rel = f"VideoFlash/{cid}.flv", f"AudioWAV/{cid}.wav"
        clip.video_has_audio = False
    elif layout == "vggsound":
        official = "test" if clip.split == "test" else "train"
        clip.video_rel = f"{official}-videos/{official}-set/{cid}.mp4"
        # The mp4 keeps its audio; the wav is what OGM-GE's data/VGGSound/mp4_to_wav.py extracts.
        clip.audio_rel = f"{official}-audios/{official}-set/{cid}.wav"
    elif layout == "kinetics-sounds":
        clip.video_rel = clip.audio_rel = f"videos/{cid}.mp4"
    else:  # ave
        clip.video_rel = clip.audio_rel = f"AVE/{cid}.mp4"


# ---- rendering workers --------------------------------------------------------------------


@dataclass(frozen=True)
class _RenderJob:
    root: str
    seed: int
    index: int
    audio_signature: dict[str, Any] | None
    visual_signature: dict[str, Any] | None
    video_rel: str
    audio_rel: str
    video_has_audio: bool
    num_frames: int
    num_samples: int
    fps: float
    height: int
    width: int
    sample_rate_hz: int
    audio_noise_std: float = _NOISE_STD_AUDIO
    visual_noise_std: float = _NOISE_STD_PIXEL


def _render_clip(job: _RenderJob) -> None:
    # Separate streams per modality so the video of a clip does not depend on its audio draws.
    video_rng = np.random.default_rng([job.seed, job.index, 1])
    audio_rng = np.random.default_rng([job.seed, job.index, 2])
    frames = _render_video(job.visual_signature, video_rng, job.num_frames, job.height, job.width,
                           job.visual_noise_std)
    samples = _render_audio(job.audio_signature, audio_rng, job.num_samples, job.sample_rate_hz,
                            job.audio_noise_std)
    root = Path(job.root)
    common = dict(fps=job.fps, sample_rate_hz=job.sample_rate_hz)
    # Sub-folders (clips/<class>/, AudioWAV/, ...) made here, never through a symlink planted in the set.
    video = make_parents_inside(root, root / job.video_rel)
    _write_media(video, frames=frames, samples=samples if job.video_has_audio else None, **common)
    if job.audio_rel != job.video_rel:
        _write_media(make_parents_inside(root, root / job.audio_rel), frames=None, samples=samples, **common)


# ---- card ---------------------------------------------------------------------------------


def best_achievable_accuracy(labels: Sequence[int], signatures: Sequence[Sequence[int]]) -> float:
    """Accuracy of the best classifier that sees only the given signatures of each clip.

    For every distinct signature tuple, the best prediction is its most frequent label, so the
    accuracy is ``sum_s max_y count(s, y) / n``.
    """
    if not labels:
        return float("nan")
    table: dict[tuple[int, ...], Counter[int]] = {}
    for label, signature in zip(labels, signatures):
        table.setdefault(tuple(signature), Counter())[label] += 1
    return sum(max(counter.values()) for counter in table.values()) / len(labels)


# Files a generated set has besides its clips (the layouts' official lists included).
GENERATED_FILES = {CARD_FILE, MANIFEST_FILE, SIGNATURES_FILE, CLASSES_FILE, GENERATOR_MARKER, "train.csv", "test.csv",
                   "stat.csv", "vggsound.csv", "stat.txt", "my_train.txt", "my_test.txt", "Annotations.txt",
                   "trainSet.txt", "valSet.txt", "testSet.txt"}


def made_by_generator(root: Path) -> bool:
    """The folder holds the generator's marker as a regular file (written before anything else; a symlink
    does not count), or is a complete set made before the marker existed (`complete_old_set`)."""
    return holds_marker(root, GENERATOR_MARKER) or complete_old_set(root)


def complete_old_set(root: Path) -> bool:
    """A set from before the marker: a card with the generator's params, and nothing in the folder but what
    such a set holds (its manifest's clips and the generator's files; no symlink). A card copied into a
    folder of other files does not make that folder the generator's."""
    try:
        card = json.loads((root / CARD_FILE).read_text())
        with open(root / MANIFEST_FILE, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, ValueError, csv.Error):
        return False
    if not (isinstance(card, dict) and isinstance(card.get("params"), dict) and "audio_informative" in card["params"]):
        return False
    allowed = GENERATED_FILES | {row.get(k) or "" for row in rows for k in ("path", "audio_path")}
    for folder, dirs, files in os.walk(root):  # followlinks=False: a linked folder is listed in dirs, not entered
        for name in dirs + files:
            path = Path(folder) / name
            if path.is_symlink() or (name in files and path.relative_to(root).as_posix() not in allowed):
                return False
    return True


def claim_output_folder(root: Path) -> None:
    """Make `root` the generator's, or refuse: it must be new, empty, or made by the generator, and no symlink
    (`orchestrator.folders.claim_folder`). Never write into a folder the generator did not create (a real
    dataset's files share names with generated ones)."""
    claim_folder(root, GENERATOR_MARKER, "data.root", legacy=complete_old_set, refusal=(
        "the clip generator, so nothing is generated into it (its files could be a real dataset's). To train on "
        "a dataset there, set data.source: dataset and data.layout; to generate clips, give an empty or new "
        "folder (or leave data.root unset)"))


def _expected_best(p: float, k: int, uninformative: str) -> float:
    """Best achievable accuracy of one modality with informative share `p` over `k` balanced classes."""
    if k <= 1:
        return 1.0
    if uninformative == "no_signature":
        # The signature names the class on the informative share; a clip without one is a guess (1/K).
        return p + (1 - p) / k
    # Recognising the signature and predicting the class it names is optimal when p >= 1/K;
    # below that any other class is the better guess, (1 - p) / (K - 1).
    return max(p, (1 - p) / (k - 1))


def _card(
    clips: list[_Clip], class_names: list[str], signatures: list[dict[str, Any]], params: dict[str, Any]
) -> dict[str, Any]:
    counts: dict[str, dict[str, int]] = {}
    informative: dict[str, dict[str, Any]] = {}
    best: dict[str, dict[str, float]] = {}
    for split in SPLITS:
        members = [clip for clip in clips if clip.split == split]
        counts[split] = {name: sum(1 for m in members if m.label == c) for c, name in enumerate(class_names)}
        n = len(members)
        audio_hits = sum(1 for m in members if m.audio_signature == m.label)
        visual_hits = sum(1 for m in members if m.visual_signature == m.label)
        informative[split] = {
            "clips": n,
            "audio_informative_clips": audio_hits,
            "visual_informative_clips": visual_hits,
            "audio": audio_hits / n if n else None,
            "visual": visual_hits / n if n else None,
        }
        labels = [m.label for m in members]
        best[split] = {
            "audio": best_achievable_accuracy(labels, [(m.audio_signature,) for m in members]) if n else None,
            "visual": best_achievable_accuracy(labels, [(m.visual_signature,) for m in members]) if n else None,
            "audio_visual": best_achievable_accuracy(
                labels, [(m.audio_signature, m.visual_signature) for m in members]
            ) if n else None,
        }
    k = len(class_names)
    expected = {
        modality: _expected_best(p, k, params.get(f"{modality}_uninformative", CONTENT_DEFAULTS[f"{modality}_uninformative"]))
        for modality, p in (("audio", params["audio_informative"]), ("visual", params["visual_informative"]))
    }
    layout = params["layout"]
    if layout in LAYOUTS_WITH_DERIVED_VAL:
        validation = (
            f"derived from the official train list: per class, the {DERIVED_VAL_FRACTION:g} share "
            "with the lowest SHA-1(clip_id) (workers.layouts.derive_validation); "
            "split_fractions[1] is not used"
        )
    elif layout == "ave":
        validation = "valSet.txt"
    else:
        validation = "manifest.csv split column"
    return {
        "format": "avtune-synth",
        "version": CARD_VERSION,
        "layout": layout,
        "seed": params["seed"],
        "classes": class_names,
        "num_classes": k,
        "num_clips": len(clips),
        "counts": counts,
        "informative_fraction_requested": {
            "audio": params["audio_informative"],
            "visual": params["visual_informative"],
        },
        "informative_realised": informative,
        "best_achievable_accuracy": best,
        "best_achievable_accuracy_expected": expected,
        "validation_split": validation,
        "signatures": {name: sig for name, sig in zip(class_names, signatures)},
        "params": params,
        "files": {
            "manifest": MANIFEST_FILE,
            "classes": CLASSES_FILE,
            "signatures": SIGNATURES_FILE,
        },
    }


def _atomic_write_text(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _csv_text(rows: list[list[Any]], header: list[str] | None = None) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if header:
        writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _write_official_lists(
    root: Path, layout: str, clips: list[_Clip], class_names: list[str], clip_seconds: float
) -> None:
    def name(clip: _Clip) -> str:
        return class_names[clip.label]

    official_train = [c for c in clips if c.split in ("train", "val")]
    test = [c for c in clips if c.split == "test"]
    if layout == "cremad":
        # OGM-GE data/CREMAD/{train,test}.csv: "clip_id,EMOTION", no header; stat.csv: the classes.
        _atomic_write_text(root / "train.csv", _csv_text([[c.clip_id, name(c)] for c in official_train]))
        _atomic_write_text(root / "test.csv", _csv_text([[c.clip_id, name(c)] for c in test]))
        _atomic_write_text(root / "stat.csv", _csv_text([[n] for n in class_names]))
    elif layout == "vggsound":
        rows = []
        for c in official_train + test:
            ytid, start = c.clip_id.rsplit("_", 1)
            rows.append([ytid, start, name(c), "test" if c.split == "test" else "train"])
        _atomic_write_text(root / "vggsound.csv", _csv_text(rows))
    elif layout == "kinetics-sounds":
        # data/KineticSound/my_{train,test}.txt: "clip_id,seconds,label_index"; stat.txt: classes
        # (label index = position in the sorted class list, as AVDataset sorts them).
        seconds = max(1, round_half_up(clip_seconds))
        order = sorted(class_names)
        _atomic_write_text(root / "stat.txt", "".join(f"{n}\n" for n in class_names))
        for file_name, members in (("my_train.txt", official_train), ("my_test.txt", test)):
            rows = [[c.clip_id, seconds, order.index(name(c))] for c in members]
            _atomic_write_text(root / file_name, _csv_text(rows))
    elif layout == "ave":
        end = max(1, round_half_up(clip_seconds))

        def line(c: _Clip) -> str:
            return f"{name(c)}&{c.clip_id}&good&0&{end}\n"

        _atomic_write_text(root / "Annotations.txt", AVE_HEADER + "\n" + "".join(line(c) for c in clips))
        for file_name, split in (("trainSet.txt", "train"), ("valSet.txt", "val"), ("testSet.txt", "test")):
            _atomic_write_text(root / file_name, "".join(line(c) for c in clips if c.split == split))


# ---- entry point ---------------------------------------------------------------------------


def synthesize_dataset(
    out_dir: str | os.PathLike[str],
    layout: str = "avtune",
    classes: int = 6,
    clips_per_class: int = 50,
    clip_seconds: float = 1.0,
    fps: float = 10,
    height: int = 64,
    width: int = 64,
    sample_rate_hz: int = 16000,
    audio_informative: float = 0.9,
    visual_informative: float = 0.6,
    seed: int = 0,
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
    num_workers: int | None = None,
    audio_noise_std: float = _NOISE_STD_AUDIO,
    visual_noise_std: float = _NOISE_STD_PIXEL,
    audio_uninformative: str = CONTENT_DEFAULTS["audio_uninformative"],
    visual_uninformative: str = CONTENT_DEFAULTS["visual_uninformative"],
) -> dict[str, Any]:
    """Generate a dataset of encoded clips under ``out_dir``; return the card (also ``card.json``).

    Args:
        layout: one of ``avtune, cremad, vggsound, kinetics-sounds, ave`` (see
            :mod:`workers.layouts`); ``manifest.csv`` is written for every layout.
        classes, clips_per_class: K classes with the same number of clips each.
        clip_seconds, fps, height, width, sample_rate_hz: media parameters.
        audio_informative, visual_informative: share of clips per split whose audio / video
            carries the clip's own class signature.
        seed: seeds labels-to-splits, informative flags and all per-clip randomness.
        split_fractions: (train, val, test) shares per class. For layouts without an official
            validation list the val share is fixed by the loader's derivation rule instead.
        num_workers: encoding threads (default: up to 2, one for small sets).
        audio_noise_std, visual_noise_std: difficulty of recognising each modality's signature
            (see the module docstring): std of the white noise added to the waveform (full
            scale 1) and of the pixel noise (0-255). The defaults reproduce the original clips
            byte for byte; the card's ``params`` lists them only when they differ.
        audio_uninformative, visual_uninformative: what a non-informative clip's modality carries,
            ``"other_class"`` (another class's signature: conflict) or ``"no_signature"`` (noise only:
            the modalities complement each other). Listed in the card only when not ``"other_class"``.
    """
    params = _validate(
        layout=layout, classes=classes, clips_per_class=clips_per_class, clip_seconds=clip_seconds,
        fps=fps, height=height, width=width, sample_rate_hz=sample_rate_hz,
        audio_informative=audio_informative, visual_informative=visual_informative, seed=seed,
        split_fractions=split_fractions, audio_noise_std=audio_noise_std, visual_noise_std=visual_noise_std,
        audio_uninformative=audio_uninformative, visual_uninformative=visual_uninformative,
    )
    params = drop_added_defaults(params)
    started = time.perf_counter()
    root = Path(out_dir)
    claim_output_folder(root)
    (root / CARD_FILE).unlink(missing_ok=True)  # the card marks a complete set; written last

    class_names = _class_names(layout, classes)
    signatures = class_signatures(classes, sample_rate_hz)
    clips: list[_Clip] = []
    for c in range(classes):
        for i in range(clips_per_class):
            index = c * clips_per_class + i
            clips.append(_Clip(index, c, _clip_id(layout, seed, index, class_names[c], i)))
    rng = np.random.default_rng(seed)
    _assign_splits(clips, classes, layout, params["split_fractions"], rng)
    _assign_signatures(clips, classes, audio_informative, "audio_signature", rng, audio_uninformative)
    _assign_signatures(clips, classes, visual_informative, "visual_signature", rng, visual_uninformative)
    for clip in clips:
        _place_files(clip, layout, class_names[clip.label])

    num_frames = max(1, round_half_up(clip_seconds * fps))
    num_samples = round_half_up(clip_seconds * sample_rate_hz)
    jobs = [
        _RenderJob(
            str(root), seed, clip.index, _signature(signatures, clip.audio_signature),
            _signature(signatures, clip.visual_signature),
            clip.video_rel, clip.audio_rel, clip.video_has_audio, num_frames, num_samples, float(fps),
            height, width, sample_rate_hz, float(audio_noise_std), float(visual_noise_std),
        )
        for clip in clips
    ]
    if num_workers is None:
        num_workers = 1 if len(jobs) < 64 else min(2, os.cpu_count() or 1)
    if num_workers > 1:
        # Threads, not processes: a process pool would have to fork (copying the caller's threads,
        # Ray's and gRPC's, in an inconsistent state) or spawn (re-importing the caller's main module,
        # which breaks a script without an `if __name__ == "__main__":` guard, and a notebook). x264,
        # AAC and numpy's array work release the GIL; every clip has its own seeded RNGs and its own
        # output files, so the clips are byte-identical to a serial run.
        with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="avtune-synth") as pool:
            list(pool.map(_render_clip, jobs))
    else:
        for job in jobs:
            _render_clip(job)

    _write_official_lists(root, layout, clips, class_names, clip_seconds)
    manifest_rows = []
    for clip in clips:
        audio = clip.audio_rel if clip.audio_rel != clip.video_rel else ""
        manifest_rows.append([clip.video_rel, class_names[clip.label], clip.split, audio])
    _atomic_write_text(root / MANIFEST_FILE, _csv_text(manifest_rows, ["path", "label", "split", "audio_path"]))
    _atomic_write_text(root / CLASSES_FILE, "".join(f"{n}\n" for n in class_names))
    _atomic_write_text(
        root / SIGNATURES_FILE,
        _csv_text(
            [
                [c.clip_id, c.video_rel, c.split, class_names[c.label],
                 _signature_name(class_names, c.audio_signature), _signature_name(class_names, c.visual_signature),
                 int(c.audio_signature == c.label), int(c.visual_signature == c.label)]
                for c in clips
            ],
            ["clip_id", "path", "split", "label", "audio_signature", "visual_signature",
             "audio_informative", "visual_informative"],
        ),
    )
    card = _card(clips, class_names, signatures, params)
    _atomic_write_text(root / CARD_FILE, json.dumps(card, indent=2, sort_keys=False) + "\n")
    logger.info("synthesised %d clips (%s layout) in %s in %.1f s", len(clips), layout, root,
                time.perf_counter() - started)
    return card


def _validate(**params: Any) -> dict[str, Any]:
    def fail(field: str, problem: str) -> None:
        raise ValueError(f"{field}: {problem}, got {params[field]!r}")

    if params["layout"] not in LAYOUTS:
        fail("layout", f"must be one of {LAYOUTS}")
    for field in ("classes", "clips_per_class", "height", "width", "sample_rate_hz"):
        if not isinstance(params[field], (int, np.integer)) or isinstance(params[field], bool):
            fail(field, "must be an integer")
    if params["classes"] < 2:
        fail("classes", "must be at least 2")
    if params["layout"] == "cremad" and params["classes"] > len(CREMAD_EMOTIONS):
        fail("classes", f"the cremad layout has {len(CREMAD_EMOTIONS)} emotion classes {CREMAD_EMOTIONS}")
    if params["clips_per_class"] < 1:
        fail("clips_per_class", "must be at least 1")
    if not params["clip_seconds"] > 0:
        fail("clip_seconds", "must be positive")
    if not params["fps"] > 0:
        fail("fps", "must be positive")
    for field in ("height", "width"):
        if params[field] < 16:
            fail(field, "must be at least 16 pixels")
    if params["sample_rate_hz"] < 4000:
        fail("sample_rate_hz", "must be at least 4000")
    for field in ("audio_informative", "visual_informative"):
        if not 0.0 <= params[field] <= 1.0:
            fail(field, "must be in [0, 1]")
    for field in CONTENT_DEFAULTS:
        if params[field] not in UNINFORMATIVE_CONTENT:
            fail(field, f"must be one of {UNINFORMATIVE_CONTENT}")
    for field in DIFFICULTY_DEFAULTS:
        value = params[field]
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not math.isfinite(value) or value < 0:
            fail(field, "must be a finite number >= 0")
    _within_spec_bounds(params, fail)
    fractions = tuple(float(f) for f in params["split_fractions"])
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        fail("split_fractions", "must be three non-negative shares (train, val, test) summing to 1")
    if fractions[0] <= 0:
        fail("split_fractions", "the train share must be positive")
    out = dict(params)
    out["split_fractions"] = list(fractions)
    for field in DIFFICULTY_DEFAULTS:
        out[field] = float(params[field])
    out["fps"] = float(params["fps"]) if not float(params["fps"]).is_integer() else int(params["fps"])
    return out


# The generator's numbers bounded as the spec's data.synth bounds them (one source of truth for `avtune data synth`,
# the Python API and a spec): without them `--height 100000` or `--clip-seconds 1e6` started encoding, and a
# negative seed failed half-way through, leaving a half-made folder.
BOUNDED_PARAMS = ("classes", "clips_per_class", "clip_seconds", "fps", "height", "width", "sample_rate_hz", "seed")


def _within_spec_bounds(params: dict[str, Any], fail) -> None:
    if not isinstance(params["seed"], (int, np.integer)) or isinstance(params["seed"], bool):
        fail("seed", "must be an integer")
    for field in BOUNDED_PARAMS:
        low, high = field_bounds(SynthSpec, field)
        if field == "seed" and params[field] < low:
            fail(field, f"must be at least {low}")
        if high is not None and params[field] > high:
            fail(field, f"must be at most {high} (the bound of a spec's data.synth.{field})")


# ---- inspection -----------------------------------------------------------------------------


def inspect_dataset(root: str | os.PathLike[str], layout: str = "avtune", *, probe_limit: int = 64) -> dict[str, Any]:
    """Summarise a dataset folder: clips per class and split, stream properties, durations, card.

    Returns ``{"root", "layout", "class_names", "counts": {split: {class: n}}, "totals",
    "problems": [(where, problem)], "media": {...}, "card": dict | None}``. Media are probed for
    up to ``probe_limit`` clips spread over the splits (0 = all).
    """
    from workers.datasets import load_records
    from workers.media import BadMediaError, probe_media

    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"root: dataset folder {root} does not exist")
    problems: list[tuple[str, str]] = []
    per_split = {}
    class_names: list[str] = []
    for split in SPLITS:
        records, class_names = load_records(root, layout, split, skipped=problems)
        per_split[split] = records
    counts = {
        split: {name: sum(1 for r in per_split[split] if r.label_name == name) for name in class_names}
        for split in SPLITS
    }
    totals = {split: len(per_split[split]) for split in SPLITS}
    totals["all"] = sum(totals.values())

    chosen = []
    all_records = [r for split in SPLITS for r in per_split[split]]
    if probe_limit and len(all_records) > probe_limit:
        step = len(all_records) / probe_limit
        chosen = [all_records[int(i * step)] for i in range(probe_limit)]
    else:
        chosen = all_records
    stream_counts: Counter[tuple[Any, ...]] = Counter()
    durations: list[float] = []
    probe_errors: list[tuple[str, str]] = []
    probed_files = 0
    for record in chosen:
        files = [record.video_path]
        if record.audio_path != record.video_path:
            files.append(record.audio_path)
        for path in files:
            try:
                info = probe_media(path)
            except BadMediaError as err:
                probe_errors.append((err.path, err.problem))
                continue
            probed_files += 1
            if info["duration_s"] is not None:
                durations.append(info["duration_s"])
            for s in info["streams"]:
                if s["type"] == "video":
                    key = ("video", Path(path).suffix, s["codec"], f"{s['width']}x{s['height']}",
                           f"{s['fps']:g} fps" if s["fps"] else "? fps")
                elif s["type"] == "audio":
                    key = ("audio", Path(path).suffix, s["codec"], f"{s['sample_rate_hz']} Hz",
                           f"{s['channels']} ch")
                else:
                    key = (s["type"], Path(path).suffix, s["codec"], "", "")
                stream_counts[key] += 1
    card_path = root / CARD_FILE
    card = json.loads(card_path.read_text(encoding="utf-8")) if card_path.is_file() else None
    return {
        "root": str(root),
        "layout": layout,
        "class_names": class_names,
        "counts": counts,
        "totals": totals,
        "problems": problems,
        "media": {
            "clips_probed": len(chosen),
            "files_probed": probed_files,
            "streams": [
                {"type": k[0], "extension": k[1], "codec": k[2], "size_or_rate": k[3], "detail": k[4], "files": n}
                for k, n in sorted(stream_counts.items())
            ],
            "duration_s": {
                "min": min(durations), "mean": sum(durations) / len(durations), "max": max(durations),
            } if durations else None,
            "errors": probe_errors,
        },
        "card": card,
    }
